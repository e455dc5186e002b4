//! The dispatcher end to end: a queued email reaches the SMTP sink with its stable
//! Message-ID and one-click unsubscribe headers, and that link withdraws at once; a
//! withdrawal between queueing and dispatch stops the message at dispatch; a deferred
//! attempt is retried under the same key; and a dispatcher killed with sends in flight
//! is followed by another that sends every message, each key delivered (at least) once.

use std::collections::BTreeSet;
use std::time::Duration;

use crm_api::startup;
use crm_tests::harness::{eventually, Options, TestApp};
use crm_tests::sinks::SmtpSink;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const NOTICE_SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let r = app.post(path, &body).await;
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let r = app.get(path).await;
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// A contact with an e-mail address and marketing e-mail consent (an import, which
/// needs no double opt-in); returns (id, address).
async fn consenting_contact(app: &TestApp) -> (Uuid, String) {
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let (id, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": email}))
        .await;
    let (s, v) = post(
        app,
        &format!("/v1/contacts/{id}/consent"),
        json!({
            "channel": "email", "purpose": "marketing", "status": "granted", "source": "import",
            "notice": {"id": "pp", "version": "1", "sha256": NOTICE_SHA}
        }),
    )
    .await;
    assert!(s == 200 || s == 201, "grant: {s} {v}");
    (id, email)
}

/// Submits a marketing e-mail; returns (status, id, body).
async fn send(app: &TestApp, contact: Uuid) -> (String, Uuid, Value) {
    let (s, v) = post(
        app,
        &format!("/v1/contacts/{contact}/messages"),
        json!({"channel": "email", "purpose": "marketing", "subject": "Hi", "body": "Hello"}),
    )
    .await;
    assert_eq!(s, 201, "submit: {v}");
    (
        v["status"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().parse().unwrap(),
        v,
    )
}

async fn message(app: &TestApp, id: Uuid) -> Value {
    let (s, v) = get(app, &format!("/v1/messages/{id}")).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Waits until the message's status is no longer `queued`; returns its document.
async fn settled(app: &TestApp, id: Uuid, timeout: Duration) -> Value {
    let found = eventually(timeout, || async {
        let v = message(app, id).await;
        (v["status"] != "queued").then_some(v)
    })
    .await;
    match found {
        Some(v) => v,
        None => panic!("still queued: {}", message(app, id).await),
    }
}

fn step_types(v: &Value) -> Vec<String> {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["type"].as_str().unwrap().to_owned())
        .collect()
}

/// The Message-ID the SMTP carrier gives a message (the harness's sender is
/// crm@localhost).
fn message_id_of(id: Uuid) -> String {
    format!("<{id}@localhost>")
}

/// A dispatcher in a task of this runtime, stopped (gracefully) by the token.
fn run_dispatcher(
    app: &TestApp,
    ack_wait: Duration,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut d = startup::dispatcher(&app.state);
    d.ack_wait = ack_wait;
    let token = CancellationToken::new();
    let handle = tokio::spawn(d.run(token.clone()));
    (token, handle)
}

#[tokio::test]
async fn a_queued_email_is_sent_with_its_message_id_and_its_unsubscribe_link_withdraws_at_once() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn_with(Options {
        smtp_url: Some(sink.url()),
        ..Default::default()
    })
    .await;
    let (contact, email) = consenting_contact(&app).await;
    let (status, id, v) = send(&app, contact).await;
    assert_eq!(status, "queued", "{v}");

    let doc = settled(&app, id, Duration::from_secs(15)).await;
    assert_eq!(doc["status"], "sent", "{doc}");
    assert_eq!(step_types(&doc), ["MessageQueued", "MessageSent"], "{doc}");
    let sent = &doc["steps"][1];
    assert_eq!(sent["carrier"], "smtp", "{doc}");
    assert_eq!(sent["attempt"], 1, "{doc}");

    let mails = sink.messages();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let m = &mails[0];
    assert_eq!(m.to, [email]);
    assert_eq!(m.message_id.as_deref(), Some(&*message_id_of(id)));
    assert_eq!(m.subject.as_deref(), Some("Hi"));
    assert_eq!(
        m.list_unsubscribe_post.as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    let link = m
        .list_unsubscribe
        .as_deref()
        .and_then(|l| l.strip_prefix('<'))
        .and_then(|l| l.strip_suffix('>'))
        .unwrap_or_else(|| panic!("List-Unsubscribe: {:?}", m.list_unsubscribe));
    let link = reqwest::Url::parse(link).unwrap();
    assert_eq!(link.scheme(), "https");
    assert_eq!(link.host_str(), Some("crm.example.com"));
    assert_eq!(link.path(), "/v1/public/unsubscribe");
    let query = link.query().expect("the link carries its token");

    // Still allowed until the link is used.
    let (status, _, v) = send(&app, contact).await;
    assert_eq!(status, "queued", "{v}");

    // One click, as a mail client does it (RFC 8058): no credentials.
    let r = app
        .http
        .post(app.url(&format!("{}?{query}", link.path())))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_eq!(s, 200, "unsubscribe: {}", r.text().await.unwrap());

    // At once: the very next message for that purpose is blocked.
    let (status, _, v) = send(&app, contact).await;
    assert_eq!(status, "blocked", "{v}");
    assert_eq!(v["decision"]["reason"], "consent_withdrawn", "{v}");
    assert_eq!(v["decision"]["allowed"], false, "{v}");

    // A forged token is not a withdrawal.
    let r = app
        .http
        .post(app.url("/v1/public/unsubscribe?token=not-a-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn a_withdrawal_between_queueing_and_dispatch_blocks_the_message_at_dispatch() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn_with(Options {
        smtp_url: Some(sink.url()),
        run_dispatcher: false,
        ..Default::default()
    })
    .await;
    let (contact, _) = consenting_contact(&app).await;
    let (status, id, v) = send(&app, contact).await;
    assert_eq!(status, "queued", "{v}");
    assert_eq!(v["decision"]["allowed"], true, "{v}");

    let (s, w) = post(
        &app,
        &format!("/v1/contacts/{contact}/consent"),
        json!({"channel": "email", "purpose": "marketing", "status": "withdrawn"}),
    )
    .await;
    assert!(s == 200 || s == 201, "withdraw: {s} {w}");
    // Nothing dispatches yet: still queued.
    assert_eq!(message(&app, id).await["status"], "queued");

    let (stop, handle) = run_dispatcher(&app, Duration::from_secs(5));
    let doc = settled(&app, id, Duration::from_secs(15)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;

    assert_eq!(doc["status"], "blocked", "{doc}");
    assert_eq!(
        step_types(&doc),
        ["MessageQueued", "MessageBlockedAtDispatch"],
        "{doc}"
    );
    let blocked = &doc["steps"][1];
    assert_eq!(blocked["decision"]["allowed"], false, "{doc}");
    assert_eq!(blocked["decision"]["reason"], "consent_withdrawn", "{doc}");
    assert_eq!(blocked["attempt"], 1, "{doc}");
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
    assert_eq!(sink.data_attempts(), 0);
    app.stop().await;
}

#[tokio::test]
async fn a_message_queued_before_its_recipient_was_erased_is_never_sent() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn_with(Options {
        smtp_url: Some(sink.url()),
        run_dispatcher: false,
        ..Default::default()
    })
    .await;
    let (contact, _) = consenting_contact(&app).await;
    // A `service` message: allowed on its lawful basis, with or without consent.
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{contact}/messages"),
        json!({"channel": "email", "purpose": "service", "subject": "Hi", "body": "Hello"}),
    )
    .await;
    assert_eq!((s, v["status"].as_str()), (201, Some("queued")), "{v}");
    let id: Uuid = v["id"].as_str().unwrap().parse().unwrap();
    let (s, v) = post(&app, &format!("/v1/contacts/{contact}/erase"), json!({})).await;
    assert_eq!(s, 200, "{v}");

    let (stop, handle) = run_dispatcher(&app, Duration::from_secs(5));
    let doc = settled(&app, id, Duration::from_secs(15)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert_eq!(
        step_types(&doc),
        ["MessageQueued", "MessageFailed"],
        "{doc}"
    );
    assert_eq!(
        doc["steps"][1]["error"], "the recipient was erased",
        "{doc}"
    );
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
    assert_eq!(sink.data_attempts(), 0);
    app.stop().await;
}

#[tokio::test]
async fn a_deferred_attempt_is_retried_under_the_same_message_id() {
    let sink = SmtpSink::start().await;
    sink.defer_next_data(1);
    let app = TestApp::spawn_with(Options {
        smtp_url: Some(sink.url()),
        ..Default::default()
    })
    .await;
    let (contact, _) = consenting_contact(&app).await;
    let (status, id, v) = send(&app, contact).await;
    assert_eq!(status, "queued", "{v}");

    // The first attempt is answered 451; the retry comes after the 2 s backoff.
    let doc = settled(&app, id, Duration::from_secs(20)).await;
    assert_eq!(doc["status"], "sent", "{doc}");
    assert_eq!(
        step_types(&doc),
        ["MessageQueued", "MessageAttemptFailed", "MessageSent"],
        "{doc}"
    );
    let failed = &doc["steps"][1];
    assert_eq!(failed["attempt"], 1, "{doc}");
    assert!(failed["error"].as_str().unwrap().contains("451"), "{doc}");
    assert!(failed["next_attempt_at"].is_string(), "{doc}");
    assert_eq!(doc["steps"][2]["attempt"], 2, "{doc}");
    assert_eq!(doc["steps"][2]["carrier"], "smtp", "{doc}");

    // Two DATA commands, one message accepted, under the message's one Message-ID.
    assert_eq!(sink.data_attempts(), 2);
    let mails = sink.messages();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0].message_id.as_deref(), Some(&*message_id_of(id)));
    assert_eq!(sink.distinct_keys(), 1);
    app.stop().await;
}

/// The statuses of `ids`, by id.
async fn statuses(app: &TestApp, ids: &[Uuid]) -> Vec<(Uuid, String)> {
    let mut out = Vec::new();
    for id in ids {
        let v = message(app, *id).await;
        out.push((*id, v["status"].as_str().unwrap().to_owned()));
    }
    out
}

/// The messages the event store records as sent (one entry per `MessageSent`).
async fn recorded_sent(db: &tokio_postgres::Client) -> Vec<Uuid> {
    db.query(
        "SELECT aggregate_id FROM events WHERE event_type = 'MessageSent' ORDER BY global_position",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0).parse().unwrap())
    .collect()
}

/// How many messages the sink received under `id`'s Message-ID.
fn received(sink: &SmtpSink, id: Uuid) -> usize {
    let key = message_id_of(id);
    sink.messages()
        .iter()
        .filter(|m| m.message_id.as_deref() == Some(&*key))
        .count()
}

#[tokio::test]
async fn a_dispatcher_killed_with_sends_in_flight_is_followed_by_one_that_sends_every_message_once_per_key(
) {
    // Half the messages are sent and recorded before the crash; the other half have
    // reached the carrier (the sink holds its `250` back) but are not recorded when the
    // dispatcher dies. Both halves fit in one dispatcher's sends in flight (32).
    const FIRST: usize = 20;
    const N: usize = 40;
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn_with(Options {
        smtp_url: Some(sink.url()),
        run_dispatcher: false,
        ..Default::default()
    })
    .await;
    let db = app.db().await;
    let (contact, _) = consenting_contact(&app).await;
    let mut ids = Vec::new();
    for _ in 0..FIRST {
        let (status, id, v) = send(&app, contact).await;
        assert_eq!(status, "queued", "{v}");
        ids.push(id);
    }

    // The first dispatcher runs as its own "process": a runtime of its own with its own
    // database pool and NATS connection, so shutting the runtime down ends its sends, its
    // connections and its unacknowledged deliveries at once, as a crash would.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let settings = app.settings.clone();
    doomed.spawn(async move {
        let state = startup::connect(&settings).await.expect("connect");
        let mut d = startup::dispatcher(&state);
        d.ack_wait = Duration::from_secs(2);
        d.run(CancellationToken::new()).await;
    });
    let first_sent = eventually(Duration::from_secs(20), || async {
        (recorded_sent(&db).await.len() >= FIRST).then_some(())
    })
    .await;
    assert!(
        first_sent.is_some(),
        "the first dispatcher sent {} of {FIRST}",
        recorded_sent(&db).await.len()
    );

    // Now the sink keeps every sender waiting for its `250`: the rest stay in flight.
    sink.delay_acceptance(Duration::from_secs(20));
    for _ in FIRST..N {
        let (status, id, v) = send(&app, contact).await;
        assert_eq!(status, "queued", "{v}");
        ids.push(id);
    }
    let all_at_carrier = eventually(Duration::from_secs(20), || async {
        (sink.distinct_keys() == N).then_some(())
    })
    .await;
    assert!(
        all_at_carrier.is_some(),
        "{} of {N} reached the sink",
        sink.distinct_keys()
    );
    doomed.shutdown_background();

    // Killed mid-flight: every message reached the carrier, only the first half is
    // recorded as sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_at_kill: BTreeSet<Uuid> = recorded_sent(&db).await.into_iter().collect();
    assert_eq!(
        sent_at_kill,
        ids[..FIRST].iter().copied().collect::<BTreeSet<_>>(),
        "what was recorded sent when the dispatcher died"
    );

    // A new dispatcher: the dead one's deliveries come back after the ack wait.
    sink.delay_acceptance(Duration::ZERO);
    let (stop, handle) = run_dispatcher(&app, Duration::from_secs(2));
    let all_sent = eventually(Duration::from_secs(25), || async {
        (recorded_sent(&db).await.len() >= N).then_some(())
    })
    .await;
    // Whatever is still to come back has had its chance.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    let final_statuses = statuses(&app, &ids).await;
    assert!(
        all_sent.is_some(),
        "not all sent: {:?}",
        final_statuses
            .iter()
            .filter(|(_, s)| s != "sent")
            .collect::<Vec<_>>()
    );

    // Every message is `sent`, recorded once; every message id reached the sink as its
    // Message-ID, so a de-duplicating relay delivers each exactly once.
    let sent = recorded_sent(&db).await;
    assert_eq!(sent.len(), N, "one MessageSent per message: {sent:?}");
    assert_eq!(
        sent.iter().copied().collect::<BTreeSet<_>>(),
        ids.iter().copied().collect::<BTreeSet<_>>()
    );
    assert_eq!(sink.distinct_keys(), N);
    for (id, status) in &final_statuses {
        assert_eq!(status, "sent", "{id}");
        assert!(
            received(&sink, *id) >= 1,
            "{id} recorded sent but not received"
        );
    }
    // What was recorded sent before the crash is not sent again; what was in flight is
    // sent again, under the same key.
    for id in &ids[..FIRST] {
        assert_eq!(received(&sink, *id), 1, "{id} was sent again");
    }
    for id in &ids[FIRST..] {
        assert!(received(&sink, *id) >= 2, "{id} was not sent again");
    }
    app.stop().await;
}
