//! Carriers: the SMTP and Twilio-shaped adapters against local receivers (headers,
//! idempotency keys, how failures are classified), and an organisation's carrier
//! configured over HTTP: the secret sealed, shown by its last four only, every
//! decryption recorded, the route guarded and its body checked.

use std::sync::Arc;

use base64::Engine;
use crm_domain::access::{Role, RoleRef};
use crm_domain::consent::Channel;
use crm_infra::dispatch::carriers::smtp::SmtpCarrier;
use crm_infra::dispatch::carriers::twilio::TwilioCarrier;
use crm_infra::dispatch::carriers::{Carrier, CarrierDefaults, Carriers, Outbound};
use crm_tests::harness::TestApp;
use crm_tests::sinks::{HttpReceiver, SmtpSink};
use secrecy::SecretString;
use serde_json::{json, Value};

fn email(key: &str, unsubscribe: Option<&str>) -> Outbound {
    Outbound {
        idempotency_key: key.into(),
        channel: Channel::Email,
        to: "ada@example.com".into(),
        subject: Some("Your appointment".into()),
        body: "Hello Ada,\n.see you tomorrow.\n".into(),
        unsubscribe_url: unsubscribe.map(str::to_owned),
    }
}

fn text(key: &str, channel: Channel) -> Outbound {
    Outbound {
        idempotency_key: key.into(),
        channel,
        to: "+4915112345678".into(),
        subject: None,
        body: "Your code is 1234".into(),
        unsubscribe_url: None,
    }
}

#[tokio::test]
async fn email_goes_through_smtp_with_a_stable_message_id_and_one_click_unsubscribe() {
    let sink = SmtpSink::start().await;
    let smtp = SmtpCarrier::from_url(&sink.url(), "CRM <crm@shop.example.com>", None).unwrap();
    let key = uuid::Uuid::now_v7().to_string();
    let delivered = smtp
        .send(&email(&key, Some("https://crm.example.com/u/tok")))
        .await
        .unwrap();
    assert_eq!(delivered.carrier, "smtp");
    let expected_id = format!("<{key}@shop.example.com>");
    assert_eq!(delivered.carrier_message_id.as_deref(), Some(&*expected_id));

    let mails = sink.messages();
    assert_eq!(mails.len(), 1);
    let m = &mails[0];
    assert_eq!(m.from, "crm@shop.example.com");
    assert_eq!(m.to, ["ada@example.com"]);
    assert_eq!(m.message_id.as_deref(), Some(&*expected_id));
    assert_eq!(m.subject.as_deref(), Some("Your appointment"));
    assert_eq!(
        m.list_unsubscribe.as_deref(),
        Some("<https://crm.example.com/u/tok>")
    );
    assert_eq!(
        m.list_unsubscribe_post.as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    // Dot-stuffed on the wire, unstuffed by the sink: the body arrives as written.
    assert!(
        m.body().contains("Hello Ada,\r\n.see you tomorrow."),
        "{}",
        m.raw
    );

    // Without an unsubscribe URL: no List-Unsubscribe pair.
    smtp.send(&email("other", None)).await.unwrap();
    assert_eq!(sink.messages()[1].list_unsubscribe, None);
    assert_eq!(sink.messages()[1].list_unsubscribe_post, None);

    // The same key again: the same Message-ID (what a de-duplicating relay keys on).
    smtp.send(&email(&key, None)).await.unwrap();
    let mails = sink.messages();
    assert_eq!(mails[2].message_id.as_deref(), Some(&*expected_id));
    assert_eq!(sink.distinct_keys(), 2);
}

#[tokio::test]
async fn smtp_failures_are_classified() {
    let sink = SmtpSink::start().await;
    let smtp = SmtpCarrier::from_url(&sink.url(), "crm@example.com", None).unwrap();

    sink.defer_next_data(1);
    let e = smtp.send(&email("k1", None)).await.unwrap_err();
    assert!(e.retryable, "451 is temporary: {e}");
    assert!(e.message.contains("451"), "{e}");
    assert!(!e.message.contains("Hello"), "no body in errors: {e}");
    // The retry, under the same key, succeeds.
    smtp.send(&email("k1", None)).await.unwrap();
    assert_eq!(sink.messages().len(), 1);

    sink.reject_next_data(1);
    let e = smtp.send(&email("k2", None)).await.unwrap_err();
    assert!(!e.retryable, "554 is permanent: {e}");

    // Nobody listening: retryable.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let nowhere =
        SmtpCarrier::from_url(&format!("smtp://{closed}"), "crm@example.com", None).unwrap();
    let e = nowhere.send(&email("k3", None)).await.unwrap_err();
    assert!(e.retryable, "{e}");
}

#[tokio::test]
async fn sms_and_whatsapp_go_through_the_twilio_shaped_api() {
    let rx = HttpReceiver::start().await;
    let twilio = TwilioCarrier::new(
        &rx.url(),
        "AC0123456789",
        SecretString::from("tok-secret-9876".to_owned()),
        "+15005550006",
    )
    .unwrap();
    let d = twilio.send(&text("key-1", Channel::Sms)).await.unwrap();
    assert_eq!(d.carrier, "twilio");
    assert!(d.carrier_message_id.unwrap().starts_with("SM"));

    let r = &rx.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/2010-04-01/Accounts/AC0123456789/Messages.json");
    let basic = base64::engine::general_purpose::STANDARD.encode("AC0123456789:tok-secret-9876");
    assert_eq!(r.header("authorization"), Some(&*format!("Basic {basic}")));
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(r.field("To"), Some("+4915112345678"));
    assert_eq!(r.field("From"), Some("+15005550006"));
    assert_eq!(r.field("Body"), Some("Your code is 1234"));
    assert_eq!(r.header("i-twilio-idempotency-token"), Some("key-1"));
    assert_eq!(r.header("idempotency-key"), Some("key-1"));

    // WhatsApp: both numbers prefixed.
    twilio
        .send(&text("key-2", Channel::Whatsapp))
        .await
        .unwrap();
    let r = &rx.requests()[1];
    assert_eq!(r.field("To"), Some("whatsapp:+4915112345678"));
    assert_eq!(r.field("From"), Some("whatsapp:+15005550006"));

    // 500 → retryable; the retry carries the same key.
    rx.fail_next(1);
    let e = twilio.send(&text("key-3", Channel::Sms)).await.unwrap_err();
    assert!(e.retryable, "{e}");
    assert!(!e.message.contains("tok-secret"), "{e}");
    twilio.send(&text("key-3", Channel::Sms)).await.unwrap();
    let keys: Vec<_> = rx
        .requests()
        .iter()
        .map(|r| r.header("i-twilio-idempotency-token").unwrap().to_owned())
        .collect();
    assert_eq!(keys, ["key-1", "key-2", "key-3", "key-3"]);
    assert_eq!(rx.distinct_keys(), 3);

    // 429 → retryable; 400 → permanent.
    rx.fail_next_with(1, 429);
    assert!(
        twilio
            .send(&text("key-4", Channel::Sms))
            .await
            .unwrap_err()
            .retryable
    );
    rx.fail_next_with(1, 400);
    let e = twilio.send(&text("key-5", Channel::Sms)).await.unwrap_err();
    assert!(!e.retryable, "{e}");
    assert!(e.message.contains("400"), "{e}");

    // Email is not a Twilio channel.
    assert!(
        !twilio
            .send(&email("key-6", None))
            .await
            .unwrap_err()
            .retryable
    );
}

async fn put(app: &TestApp, token: &str, body: &Value) -> (u16, Value) {
    let r = app
        .http
        .put(app.url("/v1/organization/carriers"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn fields(body: &Value) -> Vec<String> {
    body["fields"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|e| e["field"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_carrier_is_configured_with_its_secret_sealed_and_every_decryption_recorded() {
    let app = TestApp::spawn().await;
    let rx = HttpReceiver::start().await;
    let secret = "auth-token-0123456789-WXYZ";
    let (status, body) = put(
        &app,
        &app.token,
        &json!({
            "channel": "sms",
            "kind": "twilio",
            "settings": {"base_url": rx.url(), "account_sid": "AC42", "from": "+15005550006"},
            "secret": secret,
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "sms");

    // Listed with the last four only.
    let r = app.get("/v1/organization/carriers").await;
    assert_eq!(r.status(), 200);
    let listed = r.text().await.unwrap();
    assert!(!listed.contains(secret), "{listed}");
    let list: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(list["items"][0]["channel"], "sms");
    assert_eq!(list["items"][0]["kind"], "twilio");
    assert_eq!(list["items"][0]["secret_last4"], "WXYZ");
    assert_eq!(list["items"][0]["settings"]["account_sid"], "AC42");

    // Neither the tables nor the events hold it in clear: it is sealed in the vault.
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT v.sealed, c.settings::text, c.sealed_secret IS NULL \
             FROM carrier_secrets c JOIN vault_secrets v ON v.org_id = c.org_id \
               AND v.record_type = 'carrier' AND v.record_id = c.channel AND v.field = 'secret' \
             WHERE c.org_id = $1 AND c.channel = 'sms'",
            &[&app.org_id],
        )
        .await
        .unwrap();
    let sealed: Vec<u8> = row.get(0);
    assert!(!sealed.windows(secret.len()).any(|w| w == secret.as_bytes()));
    assert!(!row.get::<_, String>(1).contains(secret));
    assert!(row.get::<_, bool>(2), "no legacy secret beside the vault's");
    let events: Vec<String> = db
        .query(
            "SELECT payload::text FROM events WHERE aggregate_type = 'carrier'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events.len(), 1);
    assert!(!events[0].contains(secret), "{}", events[0]);

    // The dispatcher's view: decrypted once, on record, then cached.
    let carriers = Carriers::new(
        app.state.pool.clone(),
        app.state.crypto.clone(),
        CarrierDefaults::default(),
    );
    let sms = carriers
        .for_channel(app.org_id, Channel::Sms)
        .await
        .unwrap();
    sms.send(&text("m-1", Channel::Sms)).await.unwrap();
    let r = &rx.requests()[0];
    assert_eq!(r.path, "/2010-04-01/Accounts/AC42/Messages.json");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("AC42:{secret}"));
    assert_eq!(r.header("authorization"), Some(&*format!("Basic {basic}")));
    let again = carriers
        .for_channel(app.org_id, Channel::Sms)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&sms, &again), "the second lookup is cached");
    let decrypted = db
        .query(
            "SELECT payload, metadata -> 'principal' FROM events \
             WHERE aggregate_type = 'carrier' AND event_type = 'CarrierSecretDecrypted'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(decrypted.len(), 1);
    let payload: Value = decrypted[0].get(0);
    assert_eq!(
        payload,
        json!({"CarrierSecretDecrypted": {"channel": "sms", "purpose": "dispatch"}})
    );
    let principal: Value = decrypted[0].get(1);
    assert_eq!(principal, json!({"kind": "system", "id": "dispatch"}));

    // No carrier for email and no defaults: a permanent error naming the channel.
    let e = match carriers.for_channel(app.org_id, Channel::Email).await {
        Err(e) => e,
        Ok(_) => panic!("email has no carrier"),
    };
    assert!(!e.retryable);
    assert_eq!(e.message, "no carrier configured for email");

    // Removed: gone from the list and the table.
    let r = app
        .post(
            "/v1/organization/carriers/remove",
            &json!({"channel": "sms"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let list: Value = app
        .get("/v1/organization/carriers")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([]));
    let left: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM carrier_secrets) + (SELECT count(*) FROM vault_secrets)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let r = app
        .post(
            "/v1/organization/carriers/remove",
            &json!({"channel": "sms"}),
        )
        .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn the_defaults_serve_organisations_without_a_carrier() {
    let app = TestApp::spawn().await;
    let sink = SmtpSink::start().await;
    let spool = std::env::temp_dir().join(format!("crm-carriers-{}", uuid::Uuid::now_v7()));
    let carriers = Carriers::new(
        app.state.pool.clone(),
        app.state.crypto.clone(),
        CarrierDefaults {
            smtp_url: Some(sink.url()),
            mail_from: "crm@shop.example.com".into(),
            spool_dir: Some(spool.clone()),
        },
    );
    let mail = carriers
        .for_channel(app.org_id, Channel::Email)
        .await
        .unwrap();
    assert_eq!(
        mail.send(&email("d-1", None)).await.unwrap().carrier,
        "smtp"
    );
    assert_eq!(
        sink.messages()[0].message_id.as_deref(),
        Some("<d-1@shop.example.com>")
    );
    let sms = carriers
        .for_channel(app.org_id, Channel::Sms)
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            sms.send(&text("d-2", Channel::Sms)).await.unwrap().carrier,
            "spool"
        );
    }
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 1);
    assert!(carriers
        .for_channel(app.org_id, Channel::Postal)
        .await
        .is_err());
    std::fs::remove_dir_all(spool).unwrap();

    // A carrier configured through an executor with the cache's hook replaces the
    // cached default at once.
    let hooked = crm_infra::commands::executor::Executor::new(
        app.state.pool.clone(),
        app.state.crypto.clone(),
    )
    .with_hook(carriers.commit_hook());
    crm_infra::dispatch::carriers::credentials::configure(
        &hooked,
        app.org_id,
        Channel::Email,
        crm_domain::carrier::CarrierSettings::Smtp {
            url: sink.url(),
            from: "news@other.example.com".into(),
        },
        None,
        &crm_domain::metadata::EventMetadata::system(app.org_id, "test"),
    )
    .await
    .unwrap();
    let mail = carriers
        .for_channel(app.org_id, Channel::Email)
        .await
        .unwrap();
    mail.send(&email("d-3", None)).await.unwrap();
    assert_eq!(
        sink.messages()[1].message_id.as_deref(),
        Some("<d-3@other.example.com>")
    );
}

#[tokio::test]
async fn configuring_carriers_needs_organization_manage_and_a_valid_body() {
    let app = TestApp::spawn().await;
    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let good = json!({
        "channel": "email",
        "kind": "smtp",
        "settings": {"url": "smtp://127.0.0.1:2525", "from": "crm@example.com"},
    });
    let (status, body) = put(&app, &team, &good).await;
    assert_eq!(status, 403, "{body}");
    let r = app
        .http
        .get(app.url("/v1/organization/carriers"))
        .bearer_auth(&team)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    for (body, expected) in [
        (
            json!({"channel": "fax", "kind": "smtp", "settings": {"url": "smtp://h", "from": "a@b.c"}}),
            vec!["channel"],
        ),
        (
            json!({"channel": "sms", "kind": "smtp", "settings": {"url": "smtp://h", "from": "a@b.c"}}),
            vec!["kind"],
        ),
        (
            json!({"channel": "email", "kind": "carrier-pigeon", "settings": {}}),
            vec!["kind"],
        ),
        (
            json!({"channel": "email", "kind": "smtp", "settings": {"url": "http://h", "from": "nobody"}}),
            vec!["settings.url", "settings.from"],
        ),
        (
            json!({"channel": "email", "kind": "smtp", "settings": {"url": "smtp://u:pw@h", "from": "a@b.c"}}),
            vec!["settings.url"],
        ),
        (
            json!({"channel": "sms", "kind": "twilio", "settings": {"base_url": "https://api.twilio.com", "from": "+15005550006"}}),
            vec!["settings.account_sid"],
        ),
        (
            json!({"channel": "whatsapp", "kind": "twilio", "settings": {"base_url": "https://api.twilio.com", "account_sid": "AC1", "from": "+15005550006"}}),
            vec!["secret"],
        ),
        (
            json!({"channel": "email", "kind": "smtp", "settings": {"url": "smtp://h", "from": "a@b.c", "account_sid": "AC1"}}),
            vec!["settings.account_sid"],
        ),
    ] {
        let (status, answer) = put(&app, &app.token, &body).await;
        assert_eq!(status, 422, "{body} → {answer}");
        assert_eq!(fields(&answer), expected, "{body} → {answer}");
    }

    // An unknown member is refused by the edge (400 naming it).
    let (status, answer) = put(
        &app,
        &app.token,
        &json!({"channel": "email", "kind": "smtp", "settings": {}, "password": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");

    let (status, answer) = put(&app, &app.token, &good).await;
    assert_eq!(status, 200, "{answer}");
}
