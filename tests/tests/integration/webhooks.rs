//! Outbound webhooks (docs/webhooks.md), against real PostgreSQL and NATS, with a
//! receiver that verifies every delivery with the official Standard Webhooks library
//! for Python (tests/py/webhook_receiver.py), written apart from our signer.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use crm_infra::webhooks::net::{NetPolicy, WebhookClient};
use crm_infra::webhooks::signer;
use crm_infra::webhooks::worker::{Clock, Deliverer, DeliverySettings, ManualClock, SystemClock};
use crm_tests::harness::{eventually, Options, TestApp};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The Python receiver, killed when dropped.
struct Receiver {
    _child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Receiver {
    async fn start() -> Self {
        let python = crate::receipts::jose_python().await;
        let script = crate::receipts::repo_root().join("tests/py/webhook_receiver.py");
        let mut child = tokio::process::Command::new(python)
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the Python webhook receiver");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the receiver printed no port in 30 s")
            .unwrap()
            .expect("the receiver ended before printing its port");
        Self {
            _child: child,
            base: format!("http://127.0.0.1:{}", port.trim()),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn control(&self, path: &str, mut set: Value) {
        set["path"] = json!(path);
        let r = self
            .http
            .post(self.url("/_control"))
            .json(&set)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn deliveries(&self, path: &str) -> Vec<Value> {
        self.http
            .get(self.url("/_deliveries"))
            .query(&[("path", path)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until `path` has received at least `n` requests.
    async fn wait_for(&self, path: &str, n: usize, within: Duration) -> Vec<Value> {
        eventually(within, || async {
            let d = self.deliveries(path).await;
            (d.len() >= n).then_some(d)
        })
        .await
        .unwrap_or_else(|| panic!("{path} did not receive {n} deliveries in {within:?}"))
    }

    /// The library's verdict on a delivery given by hand.
    async fn verify(&self, secrets: &[&str], body: &str, headers: &Value) -> (bool, String) {
        let v: Value = self
            .http
            .post(self.url("/_verify"))
            .json(&json!({"secrets": secrets, "body": body, "headers": headers}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            v["verified"].as_bool().unwrap(),
            v["error"].as_str().unwrap_or_default().to_owned(),
        )
    }
}

async fn json_of(r: reqwest::Response, status: u16, what: &str) -> Value {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{what}: {text}");
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    }
}

/// Registers an endpoint; answers (id, secret).
async fn endpoint(app: &TestApp, url: &str, types: &[&str], role: &str) -> (Uuid, String) {
    let v = json_of(
        app.post(
            "/v1/webhooks",
            &json!({"url": url, "event_types": types, "role": role}),
        )
        .await,
        201,
        "create endpoint",
    )
    .await;
    (
        v["id"].as_str().unwrap().parse().unwrap(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

async fn messages(app: &TestApp, id: Uuid, query: &str) -> Vec<Value> {
    let v = json_of(
        app.get(&format!("/v1/webhooks/{id}/messages?limit=500{query}"))
            .await,
        200,
        "messages",
    )
    .await;
    v["items"].as_array().unwrap().clone()
}

fn body_of(d: &Value) -> Value {
    serde_json::from_str(d["body"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn every_delivery_passes_an_independent_standard_webhooks_verifier() {
    let app = TestApp::spawn_with(Options {
        run_deliverer: true,
        ..Default::default()
    })
    .await;
    let rx = Receiver::start().await;
    let (id, secret) = endpoint(
        &app,
        &rx.url("/a"),
        &["contact.created", "contact.updated"],
        "admin",
    )
    .await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    // Shown once: the endpoint's reads name the last four characters only.
    let read = json_of(app.get(&format!("/v1/webhooks/{id}")).await, 200, "read").await;
    assert!(read.get("secret").is_none(), "{read}");
    assert_eq!(read["secret_last4"], secret[secret.len() - 4..]);
    rx.control("/a", json!({"secrets": [secret], "status": 204}))
        .await;

    let mut contacts = Vec::new();
    for i in 0..3 {
        let (c, _) = app
            .create_contact(&json!({"given_name": format!("Hook {i}"), "email": format!("hook{i}@example.com")}))
            .await;
        contacts.push(c);
    }
    let r = app
        .patch(
            &format!("/v1/contacts/{}", contacts[0]),
            &json!({"title": "Chief Receiver"}),
        )
        .await;
    assert_eq!(r.status(), 200);

    let got = rx.wait_for("/a", 4, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 4, "{got:#?}");
    for d in &got {
        assert!(d["verified"].as_bool().unwrap(), "not verified: {d}");
    }
    let ids: BTreeSet<&str> = got
        .iter()
        .map(|d| d["webhook_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "one webhook-id per message");
    let types: Vec<&str> = got.iter().map(|d| d["type"].as_str().unwrap()).collect();
    assert_eq!(
        types.iter().filter(|t| **t == "contact.created").count(),
        3,
        "{types:?}"
    );
    let updated = got
        .iter()
        .map(body_of)
        .find(|b| b["type"] == "contact.updated")
        .unwrap();
    assert_eq!(updated["data"]["contact_id"], contacts[0].to_string());
    assert_eq!(updated["data"]["fields"]["title"], "Chief Receiver");
    assert!(updated["data"]["position"].as_i64().unwrap() > 0);

    // A tampered body, or a timestamp from ten minutes ago, fails in the library.
    // (A creation's body, which names "Hook": deliveries arrive in any order.)
    let d = got
        .iter()
        .find(|d| d["body"].as_str().unwrap().contains("Hook"))
        .expect("a contact.created delivery");
    let headers = json!({
        "webhook-id": d["webhook_id"], "webhook-timestamp": d["timestamp"],
        "webhook-signature": d["signature"],
    });
    let body = d["body"].as_str().unwrap();
    assert!(
        rx.verify(&[&secret], body, &headers).await.0,
        "the copy as sent verifies"
    );
    let tampered = body.replacen("Hook", "Hack", 1);
    assert_ne!(tampered, body);
    let (ok, why) = rx.verify(&[&secret], &tampered, &headers).await;
    assert!(!ok, "a tampered body must fail");
    assert!(!why.is_empty());
    let key = signer::key_of(&secret).unwrap();
    let msg_id = d["webhook_id"].as_str().unwrap();
    for (age, expect) in [(0i64, true), (600, false)] {
        let ts = Utc::now().timestamp() - age;
        let resigned = json!({
            "webhook-id": msg_id, "webhook-timestamp": ts.to_string(),
            "webhook-signature": signer::sign(&[&key], msg_id, ts, body.as_bytes()),
        });
        let (ok, why) = rx.verify(&[&secret], body, &resigned).await;
        assert_eq!(ok, expect, "signed {age} s ago: {why}");
    }

    // A rotation: both secrets verify during the grace period.
    let rotated = json_of(
        app.post(
            &format!("/v1/webhooks/{id}/rotate"),
            &json!({"grace_hours": 1}),
        )
        .await,
        200,
        "rotate",
    )
    .await;
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    assert_eq!(rotated["secret_version"], 2);
    rx.control("/a", json!({"secrets": [new_secret]})).await;
    app.create_contact(&json!({"given_name": "After rotation"}))
        .await;
    let got = rx.wait_for("/a", 5, Duration::from_secs(20)).await;
    let last = &got[4];
    assert!(last["verified"].as_bool().unwrap(), "{last}");
    assert_eq!(
        last["signature"].as_str().unwrap().split(' ').count(),
        2,
        "signed with both secrets during the grace period"
    );
    let headers = json!({
        "webhook-id": last["webhook_id"], "webhook-timestamp": last["timestamp"],
        "webhook-signature": last["signature"],
    });
    assert!(
        rx.verify(&[&secret], last["body"].as_str().unwrap(), &headers)
            .await
            .0,
        "the old secret still verifies during the grace period"
    );

    // The delivery log: five delivered messages, each with its one attempt.
    let log = messages(&app, id, "").await;
    assert_eq!(log.len(), 5);
    assert!(log.iter().all(|m| m["status"] == "delivered"), "{log:#?}");
    let m = &log[0];
    let one = json_of(
        app.get(&format!(
            "/v1/webhooks/{id}/messages/{}",
            m["id"].as_str().unwrap()
        ))
        .await,
        200,
        "message",
    )
    .await;
    let attempts = one["attempt_log"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["status_code"], 204);
    assert!(got.iter().any(|d| d["webhook_id"] == one["webhook_id"]));
    // Every decryption of a signing secret is on the record.
    let n: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'WebhookSecretDecrypted'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n >= 2, "one per secret version used: {n}");
}

#[tokio::test]
async fn retries_follow_the_schedule_then_the_endpoint_is_disabled_and_a_replay_sends_what_it_missed(
) {
    let mut opts = Options::default();
    opts.webhooks.delivery.disable_after_failures = 3;
    opts.webhooks.delivery.disable_after = Duration::ZERO;
    let app = TestApp::spawn_with(opts).await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let deliverer = crm_api::startup::deliverer_with_clock(&app.state, clock.clone()).unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(deliverer.run(stop.clone()));
    let rx = Receiver::start().await;
    let (id, secret) = endpoint(&app, &rx.url("/f"), &["contact.created"], "admin").await;
    rx.control("/f", json!({"secrets": [secret], "status": 500}))
        .await;
    let t0 = Utc::now() - chrono::Duration::seconds(1);

    app.create_contact(&json!({"given_name": "First"})).await;
    let got = rx.wait_for("/f", 1, Duration::from_secs(20)).await;
    let first_id = got[0]["webhook_id"].as_str().unwrap().to_owned();
    let log = eventually(Duration::from_secs(10), || async {
        let m = messages(&app, id, "").await;
        (m.len() == 1 && m[0]["status"] == "pending" && m[0]["attempts"] == 1).then_some(m)
    })
    .await
    .expect("the failed attempt is logged, the message pending");
    let due = log[0]["next_attempt_at"]
        .as_str()
        .unwrap()
        .parse::<chrono::DateTime<Utc>>();
    let waited = due.unwrap() - clock.now();
    // (PostgreSQL keeps microseconds.)
    assert!(
        (waited.num_milliseconds() - 5_000).abs() <= 1,
        "the first retry waits 5 s: {waited}"
    );

    // Not before it is due...
    clock.advance(chrono::Duration::seconds(4));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rx.deliveries("/f").await.len(), 1, "retried too early");
    // ...then on time, with the same webhook-id; the next wait is 30 s.
    clock.advance(chrono::Duration::seconds(1));
    let got = rx.wait_for("/f", 2, Duration::from_secs(10)).await;
    assert_eq!(got[1]["webhook_id"], first_id);
    clock.advance(chrono::Duration::seconds(30));
    let got = rx.wait_for("/f", 3, Duration::from_secs(10)).await;
    assert_eq!(got[2]["webhook_id"], first_id);

    // Three failures in a row: disabled, on the record, and the admins are mailed.
    let read = eventually(Duration::from_secs(10), || async {
        let v = json_of(app.get(&format!("/v1/webhooks/{id}")).await, 200, "read").await;
        (v["status"] == "auto_disabled").then_some(v)
    })
    .await
    .expect("the endpoint is disabled after three failures");
    assert_eq!(read["consecutive_failures"], 3);
    let n: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'WebhookEndpointAutoDisabled' \
             AND aggregate_id = $1",
            &[&id.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let mail = eventually(Duration::from_secs(5), || async {
        app.state
            .mailer
            .sent()
            .into_iter()
            .find(|m| m.subject.contains("webhook endpoint was disabled"))
    })
    .await
    .expect("the owner is mailed");
    assert!(mail.body.contains(&id.to_string()), "{}", mail.body);

    // While disabled: nothing is sent, what happens is kept as missed.
    app.create_contact(&json!({"given_name": "Second"})).await;
    app.create_contact(&json!({"given_name": "Third"})).await;
    let missed = eventually(Duration::from_secs(10), || async {
        let m = messages(&app, id, "&status=missed").await;
        (m.len() == 3).then_some(m)
    })
    .await
    .expect("three missed messages");
    clock.advance(chrono::Duration::hours(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.deliveries("/f").await.len(), 3);

    // Replay before enabling: refused, naming why.
    let r = json_of(
        app.post(&format!("/v1/webhooks/{id}/replay"), &json!({"since": t0}))
            .await,
        409,
        "replay while disabled",
    )
    .await;
    assert_eq!(r["code"], "endpoint_disabled");
    rx.control("/f", json!({"status": 200})).await;
    json_of(
        app.post_without_body(&format!("/v1/webhooks/{id}/enable"))
            .await,
        200,
        "enable",
    )
    .await;
    let r = json_of(
        app.post(&format!("/v1/webhooks/{id}/replay"), &json!({"since": t0}))
            .await,
        202,
        "replay",
    )
    .await;
    assert_eq!(r["queued"], 3);
    let got = rx.wait_for("/f", 6, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_now = rx.deliveries("/f").await;
    assert_eq!(
        got_now.len(),
        6,
        "exactly what was missed, once: {got_now:#?}"
    );
    let ok: BTreeMap<String, usize> = got[3..].iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d["webhook_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        m
    });
    let expected: BTreeSet<String> = missed
        .iter()
        .map(|m| m["webhook_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ok.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(ok.values().all(|n| *n == 1));
    assert!(ok.contains_key(&first_id), "the first keeps its webhook-id");
    assert!(got[3..].iter().all(|d| d["verified"].as_bool().unwrap()));

    // One message again, by hand.
    let first_msg = missed.iter().find(|m| m["webhook_id"] == first_id).unwrap()["id"].clone();
    let r = json_of(
        app.post(
            &format!("/v1/webhooks/{id}/replay"),
            &json!({"message_id": first_msg}),
        )
        .await,
        202,
        "replay one",
    )
    .await;
    assert_eq!(r["queued"], 1);
    let got = rx.wait_for("/f", 7, Duration::from_secs(20)).await;
    assert_eq!(got[6]["webhook_id"], first_id);
    let one = json_of(
        app.get(&format!(
            "/v1/webhooks/{id}/messages/{}",
            first_msg.as_str().unwrap()
        ))
        .await,
        200,
        "message",
    )
    .await;
    let codes: Vec<i64> = one["attempt_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(codes, vec![500, 500, 500, 200, 200], "{one:#}");
    stop.cancel();
    worker.await.unwrap();

    // The log is kept for its period (30 days by default), then pruned.
    let pruner = crm_api::startup::deliverer_with_clock(&app.state, clock.clone()).unwrap();
    assert_eq!(
        pruner.prune().await.unwrap(),
        0,
        "nothing is old enough yet"
    );
    clock.advance(chrono::Duration::days(31));
    assert!(pruner.prune().await.unwrap() > 0);
    assert!(messages(&app, id, "").await.is_empty(), "the log is pruned");
}

#[tokio::test]
async fn a_worker_killed_mid_batch_leaves_every_message_delivered_with_its_webhook_id() {
    let app = TestApp::spawn().await;
    let rx = Receiver::start().await;
    let (id, secret) = endpoint(&app, &rx.url("/k"), &["contact.created"], "admin").await;
    // Slow answers: the worker is killed with requests in flight.
    rx.control(
        "/k",
        json!({"secrets": [secret], "status": 200, "delay_ms": 1500}),
    )
    .await;
    let deliver = |app: &TestApp| {
        crate::faults::crm(app, "deliver")
            .env("CRM_WEBHOOK_ALLOW_NETS", "127.0.0.0/8")
            .env("CRM_WEBHOOK_TIMEOUT_SECS", "2")
            .env("CRM_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start crm deliver")
    };
    let mut worker = deliver(&app);
    for i in 0..12 {
        app.create_contact(&json!({"given_name": format!("Batch {i}")}))
            .await;
    }
    let before = rx.wait_for("/k", 3, Duration::from_secs(30)).await;
    worker.kill().unwrap();
    worker.wait().unwrap();
    let cut: BTreeSet<String> = before
        .iter()
        .map(|d| d["webhook_id"].as_str().unwrap().to_owned())
        .collect();
    let mut worker = deliver(&app);
    let delivered = eventually(Duration::from_secs(60), || async {
        let m = messages(&app, id, "").await;
        (m.len() == 12 && m.iter().all(|m| m["status"] == "delivered")).then_some(m)
    })
    .await;
    worker.kill().unwrap();
    worker.wait().unwrap();
    let delivered = delivered.expect("every message delivered after the restart");
    let got = rx.deliveries("/k").await;
    let received: BTreeSet<String> = got
        .iter()
        .map(|d| d["webhook_id"].as_str().unwrap().to_owned())
        .collect();
    for m in &delivered {
        let wid = m["webhook_id"].as_str().unwrap();
        assert!(received.contains(wid), "{wid} never reached the receiver");
    }
    assert!(got.iter().all(|d| d["verified"].as_bool().unwrap()));
    // A message cut off by the kill came again with the same webhook-id, and its log
    // shows the unfinished attempt, then the one that delivered.
    let again = cut
        .iter()
        .find(|w| got.iter().filter(|d| d["webhook_id"] == **w).count() >= 2)
        .expect("a message cut off by the kill is delivered again with its id");
    let m = delivered
        .iter()
        .find(|m| m["webhook_id"] == **again)
        .unwrap();
    let one = json_of(
        app.get(&format!(
            "/v1/webhooks/{id}/messages/{}",
            m["id"].as_str().unwrap()
        ))
        .await,
        200,
        "message",
    )
    .await;
    let attempts = one["attempt_log"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{one:#}");
    assert!(attempts[0]["finished_at"].is_null(), "{one:#}");
    assert_eq!(attempts.last().unwrap()["status_code"], 200);
}

#[tokio::test]
async fn the_services_own_addresses_are_refused_unless_allowlisted() {
    let mut opts = Options::default();
    opts.webhooks.allow_nets = NetPolicy::default();
    let app = TestApp::spawn_with(opts).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:9/hook",
        "http://[::ffff:127.0.0.1]:9/hook",
        "http://[fe80::1]/hook",
        "http://localhost:9/hook",
        "http://0.0.0.0:9/hook",
    ] {
        let v = json_of(
            app.post(
                "/v1/webhooks",
                &json!({"url": url, "event_types": ["contact.created"], "role": "admin"}),
            )
            .await,
            422,
            url,
        )
        .await;
        assert_eq!(v["fields"][0]["field"], "url", "{url}: {v}");
        assert!(
            v["fields"][0]["message"]
                .as_str()
                .unwrap()
                .contains("CRM_WEBHOOK_ALLOW_NETS"),
            "{url}: {v}"
        );
    }
    // Bad input is named, too.
    for (body, field) in [
        (
            json!({"url": "ftp://example.com/", "event_types": ["contact.created"], "role": "admin"}),
            "url",
        ),
        (
            json!({"url": "https://example.com/", "event_types": ["contact.exploded"], "role": "admin"}),
            "event_types",
        ),
        (
            json!({"url": "https://example.com/", "event_types": ["api_key.revoked"], "role": "viewer"}),
            "event_types",
        ),
        (
            json!({"url": "https://example.com/", "event_types": ["contact.created"], "role": "nobody"}),
            "role",
        ),
    ] {
        let v = json_of(app.post("/v1/webhooks", &body).await, 422, field).await;
        assert_eq!(v["fields"][0]["field"], field, "{v}");
    }

    // At each attempt, too: an endpoint registered while loopback was allowed is not
    // reached by a worker whose policy refuses it (by name: `localhost`).
    let allowing = TestApp::spawn().await;
    let rx = Receiver::start().await;
    let port = rx.base.rsplit(':').next().unwrap().to_owned();
    let (id, secret) = endpoint(
        &allowing,
        &format!("http://localhost:{port}/s"),
        &["contact.created"],
        "admin",
    )
    .await;
    rx.control("/s", json!({"secrets": [secret]})).await;
    let (redirecting, secret2) =
        endpoint(&allowing, &rx.url("/r"), &["contact.created"], "admin").await;
    rx.control(
        "/r",
        json!({"secrets": [secret2], "status": 302, "redirect": rx.url("/t")}),
    )
    .await;
    rx.control("/t", json!({"secrets": [secret2]})).await;
    let worker = |policy: NetPolicy| {
        Deliverer::new(
            allowing.state.executor.clone(),
            allowing.state.bus.clone(),
            WebhookClient::new(policy, Duration::from_secs(5)).unwrap(),
            DeliverySettings {
                jitter: false,
                poll: Duration::from_millis(50),
                ..Default::default()
            },
            Arc::new(SystemClock),
            None,
        )
    };
    let stop = CancellationToken::new();
    let strict = tokio::spawn(worker(NetPolicy::default()).run(stop.clone()));
    allowing
        .create_contact(&json!({"given_name": "Nobody home"}))
        .await;
    let log = eventually(Duration::from_secs(20), || async {
        let m = messages(&allowing, id, "").await;
        (m.len() == 1 && m[0]["attempts"] == 1 && m[0]["status"] == "pending").then_some(m)
    })
    .await
    .expect("the attempt is logged");
    let error = log[0]["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("forbidden_address") && error.contains("loopback"),
        "{error}"
    );
    assert!(rx.deliveries("/s").await.is_empty(), "nothing reached it");
    stop.cancel();
    strict.await.unwrap();

    // A redirect is not followed: the attempt fails with the 302.
    let stop = CancellationToken::new();
    let lenient = tokio::spawn(worker(NetPolicy::parse("127.0.0.0/8").unwrap()).run(stop.clone()));
    let log = eventually(Duration::from_secs(20), || async {
        let m = messages(&allowing, redirecting, "").await;
        (m.len() == 1 && m[0]["last_status"] == 302).then_some(m)
    })
    .await
    .expect("the redirect's attempt is logged");
    assert_eq!(log[0]["status"], "pending");
    assert_eq!(rx.deliveries("/r").await.len(), 1);
    assert!(
        rx.deliveries("/t").await.is_empty(),
        "the redirect was followed"
    );
    stop.cancel();
    lenient.await.unwrap();
}

#[tokio::test]
async fn payloads_hold_only_what_the_endpoints_role_may_read_and_nothing_of_an_erased_contact() {
    let app = TestApp::spawn_with(Options {
        run_deliverer: true,
        ..Default::default()
    })
    .await;
    let rx = Receiver::start().await;
    let (viewer, vs) = endpoint(&app, &rx.url("/v"), &["contact.created"], "viewer").await;
    let (admin, as_) = endpoint(
        &app,
        &rx.url("/adm"),
        &["contact.created", "contact.erased"],
        "admin",
    )
    .await;
    rx.control("/v", json!({"secrets": [vs]})).await;
    rx.control("/adm", json!({"secrets": [as_]})).await;

    app.create_contact(
        &json!({"given_name": "Vera", "email": "vera@example.com", "phone": "+4930123456"}),
    )
    .await;
    let v = body_of(&rx.wait_for("/v", 1, Duration::from_secs(20)).await[0]);
    let a = body_of(&rx.wait_for("/adm", 1, Duration::from_secs(20)).await[0]);
    assert_eq!(v["data"]["fields"]["given_name"], "Vera");
    assert!(v["data"]["fields"].get("email").is_none(), "{v}");
    assert!(v["data"]["fields"].get("phone").is_none(), "{v}");
    assert!(!v.to_string().contains("vera@example.com"));
    assert_eq!(a["data"]["fields"]["email"], "vera@example.com");
    // A Viewer may not be given a type it may not read.
    let r = app
        .patch(
            &format!("/v1/webhooks/{viewer}"),
            &json!({"event_types": ["consent.changed"]}),
        )
        .await;
    assert_eq!(r.status(), 422);

    // The admin endpoint is disabled while a contact is created and erased; replayed
    // afterwards, the creation carries none of its data.
    json_of(
        app.post_without_body(&format!("/v1/webhooks/{admin}/disable"))
            .await,
        200,
        "disable",
    )
    .await;
    let t0 = Utc::now() - chrono::Duration::seconds(1);
    let (e, _) = app
        .create_contact(&json!({"given_name": "Erasmus", "email": "erasmus.q9@example.com"}))
        .await;
    rx.wait_for("/v", 2, Duration::from_secs(20)).await;
    let r = app
        .post(&format!("/v1/contacts/{e}/erase"), &json!({}))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    eventually(Duration::from_secs(10), || async {
        let m = messages(&app, admin, "&status=missed").await;
        (m.len() == 2).then_some(())
    })
    .await
    .expect("the creation and the erasure were missed");
    json_of(
        app.post_without_body(&format!("/v1/webhooks/{admin}/enable"))
            .await,
        200,
        "enable",
    )
    .await;
    json_of(
        app.post(
            &format!("/v1/webhooks/{admin}/replay"),
            &json!({"since": t0}),
        )
        .await,
        202,
        "replay",
    )
    .await;
    let got = rx.wait_for("/adm", 3, Duration::from_secs(20)).await;
    let created = got
        .iter()
        .map(body_of)
        .find(|b| b["type"] == "contact.created" && b["data"]["contact_id"] == e.to_string())
        .expect("the erased contact's creation");
    assert_eq!(created["data"]["fields"], json!({}), "{created}");
    let erased = got
        .iter()
        .map(body_of)
        .find(|b| b["type"] == "contact.erased")
        .expect("the erasure");
    assert_eq!(erased["data"]["contact_id"], e.to_string());
    for d in &got[1..] {
        let text = d["body"].as_str().unwrap();
        assert!(
            !text.contains("Erasmus") && !text.contains("erasmus.q9"),
            "{text}"
        );
        assert!(d["verified"].as_bool().unwrap());
    }
}

#[tokio::test]
async fn a_failed_login_lockout_reaches_an_admins_security_endpoint() {
    let mut opts = Options {
        run_deliverer: true,
        ..Default::default()
    };
    opts.rate_limits.failed_logins_per_hour = 2;
    let app = TestApp::spawn_with(opts).await;
    let rx = Receiver::start().await;
    let (_, secret) = endpoint(
        &app,
        &rx.url("/sec"),
        &["user.locked_out", "api_key.revoked"],
        "admin",
    )
    .await;
    rx.control("/sec", json!({"secrets": [secret]})).await;
    let email: String = app
        .db()
        .await
        .query_one(
            "SELECT email_lower FROM credentials WHERE user_id = $1",
            &[&app.user_id],
        )
        .await
        .unwrap()
        .get(0);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = app
            .http
            .post(app.url("/v1/auth/login"))
            .json(&json!({"email": email, "password": "not the password at all"}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let got = rx.wait_for("/sec", 1, Duration::from_secs(20)).await;
    let b = body_of(&got[0]);
    assert_eq!(b["type"], "user.locked_out");
    assert_eq!(b["data"]["user_id"], app.user_id.to_string());
    assert!(b["data"]["until"].is_string(), "{b}");
    assert!(got[0]["verified"].as_bool().unwrap());
    assert!(!got[0]["body"].as_str().unwrap().contains(&email));
}

#[tokio::test]
async fn an_ordered_endpoint_gets_its_messages_in_feed_order_and_every_endpoint_gets_each_once() {
    let app = TestApp::spawn_with(Options {
        run_deliverer: true,
        ..Default::default()
    })
    .await;
    let rx = Receiver::start().await;
    let r = app
        .post(
            "/v1/webhooks",
            &json!({"url": rx.url("/ordered"), "event_types": ["contact.created"],
                    "role": "admin", "ordered": true}),
        )
        .await;
    let v = json_of(r, 201, "create the ordered endpoint").await;
    assert_eq!(v["ordered"], true, "{v}");
    rx.control(
        "/ordered",
        json!({"secrets": [v["secret"]], "delay_ms": 40}),
    )
    .await;
    let (_, loose) = endpoint(&app, &rx.url("/loose"), &["contact.created"], "admin").await;
    rx.control("/loose", json!({"secrets": [loose], "delay_ms": 40}))
        .await;

    // Created one after the other, faster than the receiver answers: the queue grows,
    // and the fan-out queues several events at once.
    let mut positions = Vec::new();
    for i in 0..12 {
        let (_, p) = app
            .create_contact(&json!({"given_name": format!("Order {i}")}))
            .await;
        positions.push(p);
    }
    let ordered = rx.wait_for("/ordered", 12, Duration::from_secs(30)).await;
    let loose = rx.wait_for("/loose", 12, Duration::from_secs(30)).await;
    let arrived: Vec<i64> = ordered
        .iter()
        .map(|d| body_of(d)["data"]["position"].as_i64().unwrap())
        .collect();
    assert_eq!(arrived, positions, "the ordered endpoint, in arrival order");
    for (name, got) in [("ordered", &ordered), ("loose", &loose)] {
        assert!(
            got.iter().all(|d| d["verified"].as_bool().unwrap()),
            "{name}"
        );
        let ids: BTreeSet<&str> = got
            .iter()
            .map(|d| d["webhook_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 12, "{name}: each message once");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.deliveries("/ordered").await.len(), 12, "nothing more");
    assert_eq!(rx.deliveries("/loose").await.len(), 12, "nothing more");
}

/// The `webhooks` consumer's (delivered stream sequence, pending messages).
async fn fan_out_consumer(app: &TestApp) -> (u64, u64) {
    let client = async_nats::connect(app.settings.nats.url.as_str())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(
            crm_infra::webhooks::worker::CONSUMER,
            &app.settings.nats.stream,
        )
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.delivered.stream_sequence, info.num_pending)
}

#[tokio::test]
async fn without_any_endpoint_the_fan_out_reads_nothing_and_a_new_endpoint_gets_what_follows() {
    let app = TestApp::spawn_with(Options {
        run_deliverer: true,
        ..Default::default()
    })
    .await;
    let rx = Receiver::start().await;
    for i in 0..3 {
        app.create_contact(&json!({"given_name": format!("Before {i}")}))
            .await;
    }
    // Published, and left in the stream: the consumer takes nothing while no
    // organisation has an endpoint.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (delivered, pending) = fan_out_consumer(&app).await;
        assert_eq!(delivered, 0, "the fan-out read the feed with no endpoint");
        if pending >= 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(crm_infra::webhooks::worker::ENDPOINTS_CHECK * 2).await;
    assert_eq!(fan_out_consumer(&app).await.0, 0);

    let (_, secret) = endpoint(&app, &rx.url("/late"), &["contact.created"], "admin").await;
    rx.control("/late", json!({"secrets": [secret], "status": 204}))
        .await;
    let mut after = Vec::new();
    for i in 0..2 {
        let (c, _) = app
            .create_contact(&json!({"given_name": format!("After {i}")}))
            .await;
        after.push(c.to_string());
    }
    // Exactly the events recorded after the endpoint: the pause owes it nothing.
    let got = rx.wait_for("/late", 2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_now = rx.deliveries("/late").await;
    assert_eq!(got_now.len(), 2, "{got_now:#?}");
    let ids: BTreeSet<String> = got
        .iter()
        .map(|d| {
            body_of(d)["data"]["contact_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, after.into_iter().collect::<BTreeSet<_>>());
    // And the stream was read to its end.
    let (delivered, pending) = fan_out_consumer(&app).await;
    assert!(delivered > 0 && pending == 0, "{delivered} {pending}");
    app.stop().await;
}
