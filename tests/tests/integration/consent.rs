//! Consent and the send gate through the API: GDPR and CCPA modes, double opt-in
//! (single use, expiry, pending blocks marketing), Do Not Contact, quiet hours in the
//! contact's time zone, `Sec-GPC`, receipts, and every decision an event.

use std::time::Duration;

use chrono::{Timelike, Utc};
use clap::Parser;
use crm_tests::harness::{eventually, Options, TestApp};
use crm_tests::sinks::SmtpSink;
use serde_json::{json, Value};
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

async fn contact(app: &TestApp, extra: Value) -> Uuid {
    let mut body = json!({
        "given_name": "Ada",
        "email": format!("{}@example.com", Uuid::new_v4().simple()),
        "phone": "+14155550123",
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    app.create_contact(&body).await.0
}

fn grant(purpose: &str, source: &str) -> Value {
    json!({
        "channel": "email", "purpose": purpose, "status": "granted", "source": source,
        "notice": {"id": "privacy-policy", "version": "2026-01", "sha256": NOTICE_SHA},
        "language": "en", "jurisdiction": "EU"
    })
}

async fn send(app: &TestApp, contact: Uuid, channel: &str, purpose: &str) -> (u16, Value) {
    post(
        app,
        &format!("/v1/contacts/{contact}/messages"),
        json!({"channel": channel, "purpose": purpose, "subject": "Hi", "body": "Hello"}),
    )
    .await
}

/// The confirmation token of a mail as the sink received it (quoted-printable decoded:
/// soft line breaks joined, `=3D` back to `=`).
fn mailed_token(raw: &str) -> Option<String> {
    let text = raw.replace("=\r\n", "").replace("=3D", "=");
    let token = text.split("#token=").nth(1)?.split_whitespace().next()?;
    Some(token.to_owned())
}

fn reason(v: &Value) -> &str {
    v["decision"]["reason"].as_str().unwrap_or("?")
}

#[tokio::test]
async fn gdpr_mode_needs_consent_with_its_notice_and_every_decision_is_an_event() {
    let app = TestApp::spawn().await;
    let c = contact(&app, json!({})).await;
    // Nothing implied: no consent, no marketing; a contract-based purpose is allowed.
    let (s, v) = send(&app, c, "email", "marketing").await;
    assert_eq!(
        (s, v["status"].as_str(), reason(&v)),
        (201, Some("blocked"), "no_consent")
    );
    let blocked = v["id"].as_str().unwrap().to_owned();
    let (s, v) = send(&app, c, "email", "service").await;
    assert_eq!((s, reason(&v)), (201, "lawful_basis"), "{v}");

    // A grant without the notice is refused in GDPR mode; double opt-in is required for
    // marketing unless the record was confirmed elsewhere (an import).
    let mut no_notice = grant("marketing", "import");
    no_notice.as_object_mut().unwrap().remove("notice");
    let (s, v) = post(&app, &format!("/v1/contacts/{c}/consent"), no_notice).await;
    assert_eq!(
        (s, v["fields"][0]["field"].as_str()),
        (422, Some("notice")),
        "{v}"
    );
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/consent"),
        grant("marketing", "form"),
    )
    .await;
    assert_eq!(s, 409, "double opt-in required: {v}");
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/consent"),
        grant("marketing", "import"),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let granted_event = v["event_id"].as_str().unwrap().to_owned();
    assert!(v["receipt"]["jws"].as_str().unwrap().split('.').count() == 3);

    let (s, v) = send(&app, c, "email", "marketing").await;
    assert_eq!(
        (s, v["status"].as_str(), reason(&v)),
        (201, Some("queued"), "consent")
    );
    assert_eq!(v["decision"]["relied_on"], json!([granted_event]));

    // Withdrawal is as easy as granting (no notice needed) and wins at once.
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/consent"),
        json!({"channel": "email", "purpose": "marketing", "status": "withdrawn"}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let withdrawn_event = v["event_id"].as_str().unwrap().to_owned();
    let (_, v) = send(&app, c, "email", "marketing").await;
    assert_eq!(reason(&v), "consent_withdrawn");
    assert_eq!(v["decision"]["relied_on"], json!([withdrawn_event]));

    // Why was it not sent? The message's own events say, forever.
    let (s, m) = get(&app, &format!("/v1/messages/{blocked}")).await;
    assert_eq!((s, m["status"].as_str()), (200, Some("blocked")), "{m}");
    assert_eq!(m["steps"][0]["type"], "MessageBlocked");
    assert_eq!(m["steps"][0]["decision"]["reason"], "no_consent");
    // The receipt is retrievable later.
    let (s, r) = get(&app, &format!("/v1/consent/receipts/{granted_event}")).await;
    assert_eq!(
        (s, r["event_id"].as_str()),
        (200, Some(granted_event.as_str())),
        "{r}"
    );

    // Another organisation sees none of it.
    let (_, _, other) = app.another_org("Other").await;
    let r = app
        .http
        .get(app.url(&format!("/v1/messages/{blocked}")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn ccpa_mode_is_opt_out_and_honours_a_do_not_sell_opt_out() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .put(app.url("/v1/privacy/settings"))
        .bearer_auth(&app.token)
        .json(
            &json!({"mode": "ccpa", "double_opt_in_for_marketing": false,
                      "time_zone": "America/Los_Angeles", "reason": "US launch"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .put(app.url("/v1/privacy/purposes"))
        .bearer_auth(&app.token)
        .json(
            &json!({"key": "partners", "name": "Partner offers", "default_basis": "consent",
                      "channels": ["email"], "sells_or_shares": true, "reason": "co-marketing"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, p) = get(&app, "/v1/privacy").await;
    assert_eq!(p["mode"], "ccpa");
    assert!(p["purposes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["key"] == "partners"));

    let c = contact(&app, json!({})).await;
    let (_, v) = send(&app, c, "email", "marketing").await;
    assert_eq!(reason(&v), "opt_out_model", "nobody opted out: allowed");
    let (_, v) = send(&app, c, "email", "partners").await;
    assert_eq!(reason(&v), "opt_out_model");
    let (s, _) = post(
        &app,
        &format!("/v1/contacts/{c}/sale-sharing-opt-out"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, v) = send(&app, c, "email", "partners").await;
    assert_eq!(reason(&v), "sale_or_sharing_opted_out");
    let (_, v) = send(&app, c, "email", "marketing").await;
    assert_eq!(
        reason(&v),
        "opt_out_model",
        "a purpose that does not sell is unaffected"
    );
    // A withdrawal is honoured in CCPA mode too.
    let (s, _) = post(
        &app,
        &format!("/v1/contacts/{c}/consent"),
        json!({"channel": "email", "purpose": "marketing", "status": "withdrawn"}),
    )
    .await;
    assert_eq!(s, 201);
    let (_, v) = send(&app, c, "email", "marketing").await;
    assert_eq!(reason(&v), "consent_withdrawn");

    // Retiring a purpose keeps its history and blocks it.
    let (s, _) = post(
        &app,
        "/v1/privacy/purposes/retire",
        json!({"key": "partners", "reason": "programme ended"}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, v) = send(&app, c, "email", "partners").await;
    assert_eq!(reason(&v), "purpose_retired");
}

#[tokio::test]
async fn do_not_contact_blocks_every_channel_until_lifted() {
    let app = TestApp::spawn().await;
    let c = contact(&app, json!({})).await;
    let (s, _) = post(
        &app,
        &format!("/v1/contacts/{c}/do-not-contact"),
        json!({"reason": "asked by phone"}),
    )
    .await;
    assert_eq!(s, 200);
    for channel in ["email", "sms", "phone"] {
        let (_, v) = send(&app, c, channel, "service").await;
        assert_eq!(reason(&v), "do_not_contact", "{channel}: {v}");
    }
    let (s, _) = post(
        &app,
        &format!("/v1/contacts/{c}/do-not-contact/lift"),
        json!({"reason": "asked again"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/do-not-contact/lift"),
        json!({}),
    )
    .await;
    assert_eq!(s, 409, "not marked: {v}");
    let (_, v) = send(&app, c, "email", "service").await;
    assert_eq!(reason(&v), "lawful_basis");
}

/// A fixed-offset zone where it is now `hour` o'clock (Etc/GMT signs are reversed).
fn zone_where_it_is(hour: u32) -> String {
    let utc = Utc::now().hour() as i32;
    let mut offset = hour as i32 - utc;
    if offset > 12 {
        offset -= 24;
    }
    if offset < -12 {
        offset += 24;
    }
    match offset {
        0 => "Etc/GMT".into(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

#[tokio::test]
async fn quiet_hours_follow_the_contacts_time_zone_for_sms_and_phone_only() {
    let app = TestApp::spawn().await;
    // 02:xx where the night owl lives, 12:xx where the other lives.
    let night = contact(&app, json!({"time_zone": zone_where_it_is(2)})).await;
    let noon = contact(&app, json!({"time_zone": zone_where_it_is(12)})).await;
    let (_, v) = send(&app, night, "sms", "service").await;
    assert_eq!(reason(&v), "quiet_hours", "{v}");
    let (_, v) = send(&app, night, "email", "service").await;
    assert_eq!(reason(&v), "lawful_basis", "email has no quiet hours");
    let (_, v) = send(&app, noon, "sms", "service").await;
    assert_eq!(reason(&v), "lawful_basis", "{v}");
    // A bad zone is refused by name.
    let r = app
        .post(
            "/v1/contacts",
            &json!({"given_name": "X", "time_zone": "Mars/Olympus"}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["fields"][0]["field"], "time_zone");
}

#[tokio::test]
async fn double_opt_in_is_single_use_expires_and_pending_blocks_marketing() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn_with(Options {
        smtp_url: Some(sink.url()),
        ..Options::default()
    })
    .await;
    let c = contact(&app, json!({})).await;
    let mut body = grant("marketing", "form");
    body.as_object_mut().unwrap().remove("status");
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/consent/double-opt-in"),
        body.clone(),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (_, m) = send(&app, c, "email", "marketing").await;
    assert_eq!(reason(&m), "consent_pending_confirmation");

    // The confirmation went out through the gate and the dispatcher, over SMTP.
    let mail = eventually(Duration::from_secs(15), || async {
        sink.messages()
            .into_iter()
            .find(|m| m.raw.contains("#token"))
    })
    .await
    .expect("the confirmation mail reaches the SMTP sink");
    let token = mailed_token(&mail.raw).expect("a token in the mail");
    let confirm = |token: String| {
        let app = &app;
        async move {
            app.http
                .post(app.url("/v1/public/consent/confirm"))
                .header("user-agent", "Mail/1.0")
                .json(&json!({"token": token}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(confirm(token.clone()).await, 200);
    assert_eq!(confirm(token).await, 404, "single use");
    let (_, m) = send(&app, c, "email", "marketing").await;
    assert_eq!(reason(&m), "consent", "{m}");

    // An expired link is refused.
    let c2 = contact(&app, json!({})).await;
    let (s, _) = post(
        &app,
        &format!("/v1/contacts/{c2}/consent/double-opt-in"),
        body,
    )
    .await;
    assert_eq!(s, 201);
    let mail = eventually(Duration::from_secs(15), || async {
        let to = sink.messages();
        (to.iter().filter(|m| m.raw.contains("#token")).count() >= 2)
            .then(|| to.into_iter().filter(|m| m.raw.contains("#token")).nth(1))
            .flatten()
    })
    .await
    .expect("a second confirmation mail");
    let token2 = mailed_token(&mail.raw).expect("a token in the mail");
    app.db()
        .await
        .execute(
            "UPDATE consent_confirmations SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(confirm(token2).await, 404, "expired");
    // `crm serve` purges confirmations a day past their expiry (every minute).
    let admin = app.admin_pool().get().await.unwrap();
    assert_eq!(
        crm_infra::consent::ledger::purge_expired(&admin)
            .await
            .unwrap(),
        0
    );
    admin
        .execute(
            "UPDATE consent_confirmations SET expires_at = now() - interval '2 days'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        crm_infra::consent::ledger::purge_expired(&admin)
            .await
            .unwrap(),
        1
    );
    let (_, m) = send(&app, c2, "email", "marketing").await;
    assert_eq!(reason(&m), "consent_pending_confirmation");
}

#[tokio::test]
async fn sec_gpc_from_the_portal_records_an_opt_out_of_sale_and_sharing() {
    let app = TestApp::spawn().await;
    let email = format!("{}@client.example.com", Uuid::new_v4().simple());
    let c = contact(&app, json!({"email": email})).await;
    let r = app
        .http
        .put(app.url("/v1/organization/modules"))
        .bearer_auth(&app.token)
        .json(&json!({"modules": ["contacts", "activity", "reports", "portal"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = post(&app, &format!("/v1/contacts/{c}/portal-access"), json!({})).await;
    assert_eq!(s, 200);
    let r = app
        .http
        .post(app.url("/portal/auth/magic-link"))
        .json(&json!({"org_id": app.org_id, "email": email}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mail = eventually(Duration::from_secs(5), || async {
        app.state.mailer.sent().into_iter().find(|m| m.to == email)
    })
    .await
    .expect("a magic link");
    let link = mail
        .body
        .split("#token=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let r = app
        .http
        .post(app.url("/portal/auth/magic-link/redeem"))
        .json(&json!({"token": link}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let portal: Value = r.json().await.unwrap();
    let portal = portal["access_token"].as_str().unwrap().to_owned();
    let opted_out = || async {
        let n: i64 = app
            .db()
            .await
            .query_one(
                "SELECT count(*) FROM events WHERE aggregate_type = 'consent' \
                 AND aggregate_id = $1 AND event_type = 'SaleOrSharingOptedOut'",
                &[&c.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        n
    };
    // Without the signal, nothing is recorded; with it, one opt-out, once.
    let me = |gpc: bool| {
        let mut rb = app.http.get(app.url("/portal/me")).bearer_auth(&portal);
        if gpc {
            rb = rb.header("sec-gpc", "1");
        }
        rb.send()
    };
    me(false).await.unwrap();
    assert_eq!(opted_out().await, 0);
    me(true).await.unwrap();
    me(true).await.unwrap();
    assert_eq!(opted_out().await, 1);
}

#[tokio::test]
async fn a_bulk_import_records_every_valid_row_and_names_every_bad_one() {
    let app = TestApp::spawn().await;
    let mut contacts = Vec::new();
    for _ in 0..20 {
        contacts.push(contact(&app, json!({})).await);
    }
    // 2,000 rows over 20 contacts (grant, then withdraw, alternately: the last per
    // contact wins), plus bad ones.
    let mut csv = String::from(
        "contact_id,channel,purpose,status,notice_id,notice_version,notice_sha256,language\n",
    );
    for i in 0..2000 {
        let status = if i % 2 == 0 { "granted" } else { "withdrawn" };
        let c = contacts[(i / 2) % contacts.len()];
        csv.push_str(&format!(
            "{c},email,marketing,{status},privacy-policy,7,{NOTICE_SHA},en\n"
        ));
    }
    let unknown = Uuid::now_v7();
    csv.push_str(&format!("{},fax,marketing,granted,,,,\n", contacts[0]));
    csv.push_str(&format!(
        "{unknown},email,marketing,granted,pp,1,{NOTICE_SHA},\n"
    ));
    csv.push_str(&format!("{},email,marketing,granted,,,,\n", contacts[1]));
    let (s, v) = post(
        &app,
        "/v1/consent/imports",
        json!({"format": "csv", "data": csv}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["rows"].as_u64(), v["recorded"].as_u64()),
        (Some(2003), Some(2000)),
        "{v}"
    );
    let errors = v["errors"].as_array().unwrap();
    let named: Vec<(u64, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["field"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        named,
        [(2002, "channel"), (2003, "contact_id"), (2004, "notice_id")],
        "{v}"
    );
    // Each row is an event with source import and the import's id.
    let import_id = v["import_id"].as_str().unwrap().to_owned();
    let n: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_type = 'consent' \
             AND payload->'ConsentRecorded'->'proof'->>'import_id' = $1 \
             AND payload->'ConsentRecorded'->'proof'->>'source' = 'import'",
            &[&import_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2000);
    // In file order per contact: the last row of each was a withdrawal.
    let (_, m) = send(&app, contacts[3], "email", "marketing").await;
    assert_eq!(reason(&m), "consent_withdrawn", "{m}");

    // JSON lines, from the command line, the same rules.
    let fresh = contact(&app, json!({})).await;
    let dir = std::env::temp_dir().join(format!("crm-import-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("consent.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n{{\"contact_id\":\"{}\",\"channel\":\"email\",\"purpose\":\"nope\",\"status\":\"granted\"}}\n",
            json!({"contact_id": contacts[5], "channel": "email", "purpose": "marketing",
                   "status": "granted", "notice_id": "pp", "notice_version": "1",
                   "notice_sha256": NOTICE_SHA}),
            fresh
        ),
    )
    .unwrap();
    let cli = crm_api::cli::Cli::try_parse_from([
        "crm",
        "--database-url",
        &app.db_url,
        "--kek",
        secrecy::ExposeSecret::expose_secret(&app.settings.keys.kek),
        "--kek-id",
        &app.settings.keys.kek_id,
        "--jwt-secret",
        "a-secret-only-for-parsing-the-command-line",
        "consent",
        "import",
        "--org",
        &app.org_id.to_string(),
        file.to_str().unwrap(),
    ])
    .unwrap();
    crm_api::cli::run(cli, async {}).await.unwrap();
    let (_, m) = send(&app, contacts[5], "email", "marketing").await;
    assert_eq!(reason(&m), "consent", "{m}");
    let (_, m) = send(&app, fresh, "email", "marketing").await;
    assert_eq!(
        reason(&m),
        "no_consent",
        "the bad row recorded nothing: {m}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_suppressed_contact_point_is_refused_on_every_purpose() {
    let app = TestApp::spawn().await;
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let c = contact(&app, json!({"email": email})).await;
    let (_, v) = send(&app, c, "email", "service").await;
    assert_eq!(reason(&v), "lawful_basis");
    // The bulk check reads the contact's consent_state row: once it is projected, it
    // agrees (with no suppression in the organisation, nothing is looked up there).
    projected(&app, c, 0).await;
    assert_eq!(
        bulk_check(&app, c, "service").await,
        ("lawful_basis".into(), json!([]))
    );
    // The suppression list is filled by erasure (tests/integration/rights.rs); here by
    // hand, keyed by the HMAC of the lower-cased address under the organisation's key.
    let marker = Uuid::now_v7();
    let key = app
        .state
        .crypto
        .org_secret(
            &app.state.pool.get().await.unwrap(),
            &app.org_id,
            crm_infra::crypto::org_secrets::SUPPRESSION,
        )
        .await
        .unwrap();
    let digest = crm_infra::consent::state::point_hmac(
        &key,
        crm_domain::consent::Channel::Email,
        &email.to_uppercase(),
    );
    app.db()
        .await
        .execute(
            "INSERT INTO suppression_list (org_id, channel, point_hmac, event_id) \
             VALUES ($1, 'email', $2, $3)",
            &[&app.org_id, &digest, &marker],
        )
        .await
        .unwrap();
    let (_, v) = send(&app, c, "email", "service").await;
    assert_eq!(reason(&v), "suppressed", "{v}");
    assert_eq!(v["decision"]["relied_on"], json!([marker]));
    assert_eq!(
        bulk_check(&app, c, "service").await,
        ("suppressed".into(), json!([marker])),
        "the bulk check answers as the gate does"
    );
    // WhatsApp: no quiet hours, so the answer does not depend on the hour.
    let (_, v) = send(&app, c, "whatsapp", "service").await;
    assert_eq!(
        reason(&v),
        "lawful_basis",
        "another channel's point is not suppressed"
    );
}

/// `POST /v1/consent/check` for one contact by e-mail: (reason, relied_on).
async fn bulk_check(app: &TestApp, contact: Uuid, purpose: &str) -> (String, Value) {
    let (s, v) = post(
        app,
        "/v1/consent/check",
        json!({"channel": "email", "purpose": purpose, "contact_ids": [contact]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let r = &v["results"][0];
    (
        r["reason"].as_str().unwrap().to_owned(),
        r["relied_on"].clone(),
    )
}

/// A new contact with marketing by e-mail granted (an imported, confirmed record).
async fn contact_granted_marketing(app: &TestApp) -> Uuid {
    let c = contact(app, json!({})).await;
    let (s, v) = post(
        app,
        &format!("/v1/contacts/{c}/consent"),
        grant("marketing", "import"),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    c
}

/// The consent_state row of `contact` once it has applied `consent_version` events of
/// the contact's consent stream.
async fn projected(app: &TestApp, contact: Uuid, consent_version: i64) {
    let db = app.db().await;
    eventually(Duration::from_secs(20), || async {
        db.query_opt(
            "SELECT 1 FROM consent_state WHERE contact_id = $1 AND consent_version = $2",
            &[&contact, &consent_version],
        )
        .await
        .unwrap()
    })
    .await
    .expect("the consent_state projection applied the grant");
}

#[tokio::test]
async fn a_decision_never_rests_on_a_consent_state_row_behind_the_events() {
    // No projector at all: nothing is projected, and a grant still counts at once (the
    // gate folds the contact's streams).
    let app = TestApp::spawn_with(Options {
        run_projectors: false,
        ..Options::default()
    })
    .await;
    let c = contact_granted_marketing(&app).await;
    let (s, v) = send(&app, c, "email", "marketing").await;
    assert_eq!(
        (s, v["status"].as_str(), reason(&v)),
        (201, Some("queued"), "consent"),
        "{v}"
    );
    app.stop().await;

    // With the projector: the row, once it has applied every event of both streams, is
    // what the gate reads; shown here by a row changed behind the projector's back.
    let app = TestApp::spawn().await;
    let c = contact_granted_marketing(&app).await;
    projected(&app, c, 1).await;
    let db = app.db().await;
    let no_records =
        serde_json::to_value(crm_domain::consent::gate::ConsentState::default()).unwrap();
    db.execute(
        "UPDATE consent_state SET state = $2 WHERE contact_id = $1",
        &[&c, &no_records],
    )
    .await
    .unwrap();
    let (_, v) = send(&app, c, "email", "marketing").await;
    assert_eq!(reason(&v), "no_consent", "the current row is read: {v}");

    // A row behind either of the contact's streams, or none, is never used: the gate
    // folds the streams and finds the grant.
    for (contact_version, consent_version) in [(1i64, 0i64), (0, 1)] {
        db.execute(
            "UPDATE consent_state SET contact_version = $2, consent_version = $3 \
             WHERE contact_id = $1",
            &[&c, &contact_version, &consent_version],
        )
        .await
        .unwrap();
        let (_, v) = send(&app, c, "email", "marketing").await;
        assert_eq!(
            (v["status"].as_str(), reason(&v)),
            (Some("queued"), "consent"),
            "row at contact {contact_version}, consent {consent_version}: {v}"
        );
    }
    db.execute("DELETE FROM consent_state WHERE contact_id = $1", &[&c])
        .await
        .unwrap();
    let (s, v) = send(&app, c, "email", "marketing").await;
    assert_eq!((s, reason(&v)), (201, "consent"), "no row: {v}");
}

#[tokio::test]
async fn concurrent_gate_reads_of_two_organisations_each_get_their_own_contact() {
    let app = TestApp::spawn().await;
    let (their_org, _, other) = app.another_org("Other").await;
    // Contact id → (organisation, e-mail).
    let mut known = std::collections::HashMap::new();
    for i in 0..20 {
        let email = format!("ada{i}@mine.example");
        let (id, _) = app
            .create_contact(&json!({"given_name": "Ada", "email": email}))
            .await;
        known.insert(id, (app.org_id, email));
        let email = format!("bo{i}@other.example");
        let r = app
            .http
            .post(app.url("/v1/contacts"))
            .bearer_auth(&other)
            .json(&json!({"given_name": "Bo", "email": email}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        known.insert(
            v["id"].as_str().unwrap().parse::<Uuid>().unwrap(),
            (their_org, email),
        );
    }
    // Every contact asked in both organisations, all at once (the reader batches them
    // per organisation): found with its own address in its own, not at all in the other.
    let gate = &app.state.gate;
    let asks: Vec<(Uuid, Uuid)> = known
        .keys()
        .flat_map(|c| [(app.org_id, *c), (their_org, *c)])
        .collect();
    let loaded = futures::future::join_all(asks.iter().map(|(org, c)| gate.load(*org, *c))).await;
    for ((org, c), got) in asks.iter().zip(loaded) {
        let got = got.unwrap();
        let (owner, email) = &known[c];
        if org == owner {
            let points = got.expect("its own organisation finds it").points;
            assert_eq!(points.email.map(|e| e.to_string()).as_ref(), Some(email));
        } else {
            assert!(got.is_none(), "{c} is not in {org}");
        }
    }
}
