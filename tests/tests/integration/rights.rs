//! Data-subject rights over HTTP (docs/rights.md): erasure by crypto-shredding, with
//! legal holds, receipts and the suppression list; checked against every table, the
//! JetStream stream, snapshots, the logs and a rebuild of every read model.

use std::time::Duration;

use crm_domain::access::{Role, RoleRef};
use crm_infra::store::verify::verify_chains;
use crm_tests::harness::{eventually, TestApp};
use crm_tests::logs::Logs;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const NOTICE_SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Values nothing else in a test database holds: none may be found after the erasure.
const GIVEN: &str = "Zanzibarqx";
const EMAIL: &str = "canary.zq7@erasure.example";
const PHONE: &str = "+14155550177";
const NOTE: &str = "Quokkafjord";
const BODY: &str = "Hello Quokkamail";
const WHY: &str = "Wombatreason";

async fn call(app: &TestApp, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    app.call_as(&app.token, method, path, body).await
}

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    call(app, Method::POST, path, Some(body)).await
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    call(app, Method::GET, path, None).await
}

/// Where each canary value is found in the database, by table: `table: value`.
async fn found_in_tables(db: &tokio_postgres::Client, values: &[&str]) -> Vec<String> {
    let tables: Vec<String> = db
        .query(
            "SELECT quote_ident(table_name) FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() > 20, "{tables:?}");
    let mut found = Vec::new();
    for t in &tables {
        for v in values {
            let n: i64 = db
                .query_one(
                    &format!("SELECT count(*) FROM {t} x WHERE x::text ILIKE '%' || $1 || '%'"),
                    &[v],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                found.push(format!("{t}: {v}"));
            }
        }
    }
    found
}

/// The rows each read model holds about `contact`, as text (what a rebuild must
/// reproduce exactly).
async fn read_model_rows(db: &tokio_postgres::Client, contact: Uuid) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT to_jsonb(c) - 'last_position' - 'updated_at' FROM contacts c WHERE id = $1",
        "SELECT to_jsonb(s) - 'last_position' - 'updated_at' FROM consent_state s \
         WHERE contact_id = $1",
        "SELECT to_jsonb(l) FROM consent_log l WHERE contact_id = $1 ORDER BY global_position",
        "SELECT to_jsonb(r) FROM erasure_receipts r WHERE subject_id = $1",
        "SELECT to_jsonb(a) - 'updated_at' FROM ai_audit a WHERE $1 = ANY(contacts)",
    ] {
        for row in db.query(sql, &[&contact]).await.unwrap() {
            out.push(row.get::<_, Value>(0).to_string());
        }
    }
    out
}

#[tokio::test]
async fn an_erased_contact_leaves_no_readable_trace_and_its_address_stays_suppressed() {
    let (logs, _guard) = Logs::capture();
    let app = TestApp::spawn().await;
    let canaries = [GIVEN, EMAIL, PHONE, NOTE, BODY, WHY];

    // A contact with consents, a message, an AI action, history and a legal hold.
    let (c, _) = app
        .create_contact(&json!({
            "given_name": GIVEN, "email": EMAIL, "phone": PHONE,
            "custom": {"note": NOTE}
        }))
        .await;
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/consent"),
        json!({
            "channel": "email", "purpose": "marketing", "status": "granted",
            "source": "import", "contact_point": EMAIL,
            "notice": {"id": "privacy-policy", "version": "2026-01", "sha256": NOTICE_SHA},
            "language": "en", "jurisdiction": "EU"
        }),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/messages"),
        json!({"channel": "email", "purpose": "marketing", "subject": "Hi", "body": BODY}),
    )
    .await;
    assert_eq!((s, v["status"].as_str()), (201, Some("queued")), "{v}");
    let message = v["id"].as_str().unwrap().to_owned();
    let (s, v) = call(
        &app,
        Method::PATCH,
        &format!("/v1/contacts/{c}"),
        Some(json!({"title": "Dr"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, agent) = post(
        &app,
        "/v1/api-keys",
        json!({"name": "Assistant", "role": "team", "kind": "agent"}),
    )
    .await;
    assert_eq!(s, 201, "{agent}");
    let (s, action) = app
        .call_as(
            agent["key"].as_str().unwrap(),
            Method::POST,
            "/v1/ai/actions",
            Some(json!({
                "type": "update_contact", "contact_id": c,
                "arguments": {"given_name": "Someone"},
                "reasoning_summary": format!("{GIVEN} asked to be renamed"),
            })),
        )
        .await;
    assert_eq!(
        (s, action["status"].as_str()),
        (201, Some("pending_approval")),
        "{action}"
    );
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/legal-hold"),
        json!({"reason": WHY}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let held_at = v["positions"][0].as_i64().unwrap();

    // Under the hold the erasure is refused and changes nothing.
    let (s, v) = post(&app, &format!("/v1/contacts/{c}/erase"), json!({})).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("legal_hold")), "{v}");
    let (s, v) = get(&app, &format!("/v1/contacts/{c}?min_position={held_at}")).await;
    assert_eq!(
        (s, v["email"].as_str(), v["legal_hold"].as_bool()),
        (200, Some(EMAIL), Some(true))
    );
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/legal-hold/lift"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    // A Team member may not erase; an Admin may.
    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (s, v) = app
        .call_as(
            &team,
            Method::POST,
            &format!("/v1/contacts/{c}/erase"),
            None,
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, receipt) = post(&app, &format!("/v1/contacts/{c}/erase"), json!({})).await;
    assert_eq!(s, 200, "{receipt}");
    assert_eq!(receipt["status"], "complete", "{receipt}");
    assert_eq!(receipt["subject_id"], json!(c));
    assert_eq!(receipt["source"], "staff");
    let keys: Vec<String> = serde_json::from_value(receipt["keys_destroyed"].clone()).unwrap();
    assert_eq!(
        keys[0],
        c.to_string(),
        "the contact's own key first: {keys:?}"
    );
    for subject in [&message, action["id"].as_str().unwrap()] {
        assert!(
            keys.iter().any(|k| k == subject),
            "{subject} not in {keys:?}"
        );
    }
    assert_eq!(
        receipt["suppressed"],
        json!(["email", "phone", "sms", "whatsapp"])
    );
    let receipt_text = receipt.to_string();
    for v in canaries {
        assert!(!receipt_text.contains(v), "the receipt names {v}");
    }

    // Erased once: a second erasure, a change or a consent is refused.
    let (s, v) = post(&app, &format!("/v1/contacts/{c}/erase"), json!({})).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("erased")), "{v}");
    let (s, v) = call(
        &app,
        Method::PATCH,
        &format!("/v1/contacts/{c}"),
        Some(json!({"title": "Prof"})),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("erased")), "{v}");
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/do-not-contact"),
        json!({"reason": "x"}),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("erased")), "{v}");

    // Reads show the contact as erased; its history keeps every event, without the
    // personal fields.
    let (s, v) = get(&app, &format!("/v1/contacts/{c}")).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["erased_at"].is_string() && v.get("email").is_none_or(Value::is_null),
        "{v}"
    );
    let (s, h) = get(&app, &format!("/v1/contacts/{c}/history")).await;
    assert_eq!(s, 200, "{h}");
    let types: Vec<&str> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "ContactCreated",
            "ContactUpdated",
            "LegalHoldPlaced",
            "LegalHoldLifted",
            "ContactErased"
        ]
    );
    assert!(
        h["events"][0]["data"]["profile"]["given_name"].is_null(),
        "{h}"
    );
    let (s, m) = get(&app, &format!("/v1/messages/{message}")).await;
    assert_eq!(s, 200, "{m}");
    let (s, audit) = get(&app, &format!("/v1/ai/audit?contact_id={c}")).await;
    assert_eq!(s, 200, "{audit}");
    assert!(audit["items"][0]["reasoning_summary"].is_null(), "{audit}");

    // The receipt is stored and listed for auditors, its hash the tombstone's.
    let (s, list) = get(
        &app,
        &format!(
            "/v1/erasures?contact_id={c}&wait_ms=5000&min_position={}",
            receipt["tombstone"]["position"]
        ),
    )
    .await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(
        list["items"][0]["request_id"], receipt["request_id"],
        "{list}"
    );
    let db = app.db().await;
    let hash: String = db
        .query_one(
            "SELECT encode(hash, 'hex') FROM events WHERE event_id = $1",
            &[&receipt["tombstone"]["event_id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(receipt["tombstone"]["hash"].as_str(), Some(hash.as_str()));
    let (s, one) = get(
        &app,
        &format!("/v1/erasures/{}", receipt["request_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!((s, &one["tombstone"]), (200, &receipt["tombstone"]));

    // The history still verifies.
    let pool = app.admin_pool();
    let report = verify_chains(&pool.get().await.unwrap(), None)
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.breaks);

    // No table holds a canary value, nor the plain digest of the address.
    assert_eq!(found_in_tables(&db, &canaries).await, Vec::<String>::new());
    let digest = hex::encode(Sha256::digest(EMAIL.as_bytes()));
    assert_eq!(found_in_tables(&db, &[&digest]).await, Vec::<String>::new());
    let snapshots: i64 = db
        .query_one(
            "SELECT count(*) FROM snapshots WHERE aggregate_id = ANY($1)",
            &[&keys],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(snapshots, 0);

    // Every JetStream message of an erased subject holds ciphertext that no longer opens.
    let client = app.state.pool.get().await.unwrap();
    let mut sealed = 0;
    let bodies = app.stream_payloads().await;
    for raw in &bodies {
        let text = String::from_utf8_lossy(raw);
        for v in canaries {
            assert!(!text.contains(v), "a JetStream message holds {v}");
        }
    }
    for e in bodies
        .iter()
        .flat_map(|b| crm_infra::feed::bus::events_of(b).unwrap())
    {
        let e = serde_json::to_value(e).unwrap();
        let text = e.to_string();
        let subject = e["aggregate_id"].as_str().unwrap();
        if !keys.iter().any(|k| k == subject) || !text.contains("enc:v1:") {
            continue;
        }
        sealed += 1;
        let (mut payload, mut metadata) = (e["payload"].clone(), e["metadata"].clone());
        app.state
            .crypto
            .decrypt_event(&client, &app.org_id, subject, &mut payload, &mut metadata)
            .await
            .unwrap();
        let opened = format!("{payload}{metadata}");
        assert!(!opened.contains("enc:v1:"), "{opened}");
        for v in canaries {
            assert!(!opened.contains(v), "{v} decrypts from JetStream: {opened}");
        }
    }
    assert!(
        sealed >= 5,
        "only {sealed} sealed messages of the erased subjects"
    );

    // A rebuild of every read model yields the same purged state.
    let before = read_model_rows(&db, c).await;
    assert!(before.len() >= 4, "{before:?}");
    for p in crm_infra::read_models::all() {
        app.rebuild(p.name()).await;
    }
    assert_eq!(read_model_rows(&db, c).await, before);

    // The same address again is not marketed to: the gate answers `suppressed`.
    let (again, _) = app
        .create_contact(&json!({"given_name": "New", "email": EMAIL.to_uppercase()}))
        .await;
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{again}/messages"),
        json!({"channel": "email", "purpose": "marketing", "subject": "Hi", "body": "Hello"}),
    )
    .await;
    assert_eq!(
        (s, v["decision"]["reason"].as_str()),
        (201, Some("suppressed")),
        "{v}"
    );
    let tombstone = receipt["tombstone"]["event_id"].clone();
    assert_eq!(v["decision"]["relied_on"], json!([tombstone]), "{v}");
    // A new contact with the same address has a key of its own.
    let key_rows: i64 = db
        .query_one(
            "SELECT count(*) FROM data_keys WHERE subject_id = $1 AND wrapped_key IS NOT NULL",
            &[&again.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key_rows, 1);

    // Nothing was logged of the contact, at any level.
    let logged = logs.text();
    assert!(logged.len() > 1000, "the logs were not captured");
    for v in canaries {
        assert!(!logged.contains(v), "{v} was logged");
    }
    app.stop().await;
}

#[tokio::test]
async fn another_process_forgets_a_destroyed_key_at_once() {
    let app = TestApp::spawn().await;
    let (c, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada.k@example.com"}))
        .await;
    // A second API process reads the contact (and caches its key).
    let second = app.second_api().await;
    let r = app
        .http
        .get(second.url(&format!("/v1/contacts/{c}/history")))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, v) = post(&app, &format!("/v1/contacts/{c}/erase"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    // The second process heard of it: its history has no name left.
    let cleared = eventually(Duration::from_secs(5), || async {
        let r = app
            .http
            .get(second.url(&format!("/v1/contacts/{c}/history")))
            .bearer_auth(&app.token)
            .send()
            .await
            .unwrap();
        let h: Value = r.json().await.unwrap();
        h["events"][0]["data"]["profile"]["given_name"]
            .is_null()
            .then_some(())
    })
    .await;
    assert!(cleared.is_some(), "the second process still decrypts");
    second.stop().await;
    app.stop().await;
}

/// Gives `contact` (reached at `email`) a consent, a message, a history and an AI
/// action; returns the message's and the action's ids.
async fn lived(app: &TestApp, token: &str, contact: Uuid, email: &str) -> (String, String) {
    let (s, v) = app
        .call_as(
            token,
            Method::POST,
            &format!("/v1/contacts/{contact}/consent"),
            Some(json!({
                "channel": "email", "purpose": "marketing", "status": "granted",
                "source": "import", "contact_point": email,
                "notice": {"id": "privacy-policy", "version": "2026-01", "sha256": NOTICE_SHA},
            })),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, m) = app
        .call_as(
            token,
            Method::POST,
            &format!("/v1/contacts/{contact}/messages"),
            Some(json!({"channel": "email", "purpose": "marketing", "subject": "Hi", "body": "Hello"})),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    let (s, v) = app
        .call_as(
            token,
            Method::PATCH,
            &format!("/v1/contacts/{contact}"),
            Some(json!({"title": "Dr"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, agent) = app
        .call_as(
            token,
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "Assistant", "role": "team", "kind": "agent"})),
        )
        .await;
    assert_eq!(s, 201, "{agent}");
    let (s, a) = app
        .call_as(
            agent["key"].as_str().unwrap(),
            Method::POST,
            "/v1/ai/actions",
            Some(json!({
                "type": "update_contact", "contact_id": contact,
                "arguments": {"given_name": "Someone"}, "reasoning_summary": "asked by phone",
            })),
        )
        .await;
    assert_eq!(s, 201, "{a}");
    (
        m["id"].as_str().unwrap().to_owned(),
        a["id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn an_export_holds_every_category_of_the_contact_and_nothing_of_anyone_else() {
    let app = TestApp::spawn().await;
    let email = "export.subject@example.com";
    let (c, _) = app
        .create_contact(&json!({"given_name": "Exportina", "email": email}))
        .await;
    let (message, action) = lived(&app, &app.token, c, email).await;
    // Another contact of the organisation, and a contact of another organisation, with
    // lives of their own.
    let other_email = "bystander.zz9@example.com";
    let (other, _) = app
        .create_contact(&json!({"given_name": "Bystanderina", "email": other_email}))
        .await;
    lived(&app, &app.token, other, other_email).await;
    let (other_org, _, other_token) = app.another_org("Elsewhere").await;
    let (s, v) = app
        .call_as(
            &other_token,
            Method::POST,
            "/v1/contacts",
            Some(json!({"given_name": "Foreignina", "email": "foreign.yy8@example.com"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let foreign = v["id"].as_str().unwrap().to_owned();

    // Who may not export, and what cannot be exported.
    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (s, _) = app
        .call_as(
            &team,
            Method::GET,
            &format!("/v1/contacts/{c}/export"),
            None,
        )
        .await;
    assert_eq!(s, 403);
    let (s, v) = get(&app, &format!("/v1/contacts/{foreign}/export")).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");

    let r = app
        .http
        .get(app.url(&format!("/v1/contacts/{c}/export")))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    let text = r.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).expect("the export is one JSON document");
    assert_eq!(doc["schema"], "crm.contact-export.v1");
    assert_eq!(doc["organization_id"], json!(app.org_id));
    assert_eq!(
        (
            doc["contact"]["id"].clone(),
            doc["contact"]["email"].as_str()
        ),
        (json!(c), Some(email))
    );
    assert_eq!(
        doc["consent"]["records"][0]["status"], "granted",
        "{}",
        doc["consent"]
    );
    let log = doc["consent_log"].as_array().unwrap();
    assert!(!log.is_empty() && log.iter().all(|e| e["contact_id"] == json!(c)));
    assert_eq!(
        doc["messages"][0]["id"],
        json!(message),
        "{}",
        doc["messages"]
    );
    assert_eq!(doc["messages"][0]["to"], email);
    assert_eq!(
        doc["messages"][0]["steps"][0]["decision"]["reason"],
        "consent"
    );
    assert_eq!(doc["ai_actions"][0]["id"], json!(action));
    assert_eq!(doc["ai_actions"][0]["reasoning_summary"], "asked by phone");
    assert_eq!(doc["ai_actions"][0]["contacts"], json!([c]));
    let entities: Vec<&str> = doc["activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entity"]["id"].as_str().unwrap())
        .collect();
    for id in [c.to_string(), message.clone(), action.clone()] {
        assert!(entities.contains(&id.as_str()), "{id} not in {entities:?}");
    }
    let history: Vec<(String, String)> = doc["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["stream"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (stream, ty) in [
        ("contact", "ContactCreated"),
        ("contact", "ContactUpdated"),
        ("contact", "ContactExported"),
        ("consent", "ConsentRecorded"),
    ] {
        assert!(
            history.contains(&(stream.to_owned(), ty.to_owned())),
            "{stream}/{ty} not in {history:?}"
        );
    }
    assert_eq!(history[0].1, "ContactCreated");
    assert_eq!(
        doc["history"][0]["data"]["profile"]["given_name"],
        "Exportina"
    );

    // Nothing of the other contact or the other organisation.
    for foreign_value in [
        other.to_string(),
        other_email.to_owned(),
        "Bystanderina".to_owned(),
        foreign.clone(),
        "Foreignina".to_owned(),
        other_org.to_string(),
    ] {
        assert!(
            !text.contains(&foreign_value),
            "the export holds {foreign_value}"
        );
    }

    // The export itself is an event: who exported whom, when.
    let exported: Vec<(String, Value)> = app
        .db()
        .await
        .query(
            "SELECT aggregate_id, metadata -> 'principal' FROM events \
             WHERE event_type = 'ContactExported'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0].0, c.to_string());
    assert_eq!(exported[0].1["id"], json!(app.user_id.to_string()));
    app.stop().await;
}

/// `processing_restricted` of the contact `GET path` answers (which must be a 200).
async fn restricted(app: &TestApp, path: &str) -> Option<bool> {
    let (s, v) = get(app, path).await;
    assert_eq!(s, 200, "{path}: {v}");
    v["processing_restricted"].as_bool()
}

#[tokio::test]
async fn a_restriction_of_processing_blocks_the_gate_but_for_purposes_allowed_under_it() {
    let app = TestApp::spawn().await;
    let email = "restricted.r1@example.com";
    let (c, _) = app
        .create_contact(&json!({"given_name": "Rosa", "email": email}))
        .await;
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/consent"),
        json!({
            "channel": "email", "purpose": "marketing", "status": "granted", "source": "import",
            "notice": {"id": "privacy-policy", "version": "2026-01", "sha256": NOTICE_SHA},
        }),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let send = |purpose: &'static str| {
        let app = &app;
        async move {
            let (s, v) = post(
                app,
                &format!("/v1/contacts/{c}/messages"),
                json!({"channel": "email", "purpose": purpose, "subject": "Hi", "body": "Hello"}),
            )
            .await;
            assert_eq!(s, 201, "{v}");
            v
        }
    };
    assert_eq!(send("marketing").await["decision"]["reason"], "consent");

    // Only holders of contacts.restrict restrict.
    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (s, _) = app
        .call_as(
            &team,
            Method::POST,
            &format!("/v1/contacts/{c}/restriction"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 403);
    let before_restriction = chrono::Utc::now();
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/restriction"),
        json!({"reason": "accuracy contested"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let while_restricted = chrono::Utc::now();
    let at = v["positions"][0].as_i64().unwrap();
    let restriction = app
        .db()
        .await
        .query_one(
            "SELECT event_id FROM events WHERE global_position = $1",
            &[&at],
        )
        .await
        .unwrap()
        .get::<_, Uuid>(0);
    let (s, v) = post(&app, &format!("/v1/contacts/{c}/restriction"), json!({})).await;
    assert_eq!(s, 409, "restricted twice: {v}");

    // Every purpose is refused, naming the restriction, in the gate and the bulk check.
    for purpose in ["marketing", "service"] {
        let v = send(purpose).await;
        assert_eq!(
            (v["status"].as_str(), v["decision"]["reason"].as_str()),
            (Some("blocked"), Some("restricted")),
            "{v}"
        );
        assert_eq!(v["decision"]["relied_on"], json!([restriction]));
    }
    let (s, v) = get(
        &app,
        &format!("/v1/contacts/{c}/consent?min_position={at}&wait_ms=5000"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["processing_restricted"].as_bool(),
            v["restriction_event_id"].clone()
        ),
        (Some(true), json!(restriction))
    );
    // The contact itself says so (its read model), once it has applied the restriction.
    let contact_at =
        |position: i64| format!("/v1/contacts/{c}?min_position={position}&wait_ms=5000");
    assert_eq!(restricted(&app, &contact_at(at)).await, Some(true));
    let (s, v) = post(
        &app,
        "/v1/consent/check",
        json!({"channel": "email", "purpose": "marketing", "contact_ids": [c]}),
    )
    .await;
    assert_eq!(
        (s, v["results"][0]["reason"].as_str()),
        (200, Some("restricted")),
        "{v}"
    );

    // The organisation lets service messages through under restriction.
    let (s, v) = call(
        &app,
        Method::PUT,
        "/v1/privacy/purposes",
        Some(json!({
            "key": "service", "name": "Service", "default_basis": "contract",
            "channels": ["email", "sms", "whatsapp", "phone", "postal"],
            "allowed_when_restricted": true, "reason": "contract notices must go out"
        })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(send("service").await["decision"]["reason"], "lawful_basis");
    assert_eq!(send("marketing").await["decision"]["reason"], "restricted");

    // Lifted, consent counts again.
    let (s, v) = post(
        &app,
        &format!("/v1/contacts/{c}/restriction/lift"),
        json!({"reason": "resolved"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let lifted_at = v["positions"][0].as_i64().unwrap();
    assert_eq!(send("marketing").await["decision"]["reason"], "consent");
    assert_eq!(restricted(&app, &contact_at(lifted_at)).await, Some(false));
    // A read of the past shows the restriction that stood then.
    let as_of = while_restricted.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let past = format!("/v1/contacts/{c}?as_of={as_of}");
    assert_eq!(restricted(&app, &past).await, Some(true));

    // The consent as it stood at a past moment shows the restriction that stood then.
    for (when, restricted) in [
        (before_restriction, None),
        (while_restricted, Some(restriction)),
        (chrono::Utc::now(), None),
    ] {
        let as_of = when.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let (s, v) = get(&app, &format!("/v1/contacts/{c}/consent?as_of={as_of}")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            (
                v["processing_restricted"].as_bool(),
                v["restriction_event_id"].clone(),
                v["records"][0]["status"].as_str()
            ),
            (
                Some(restricted.is_some()),
                json!(restricted),
                Some("granted")
            ),
            "as of {as_of}: {v}"
        );
    }
    app.stop().await;
}

/// `crm retention sweep --now NOW` against the test's database, as an operator runs it.
async fn sweep_at(app: &TestApp, now: chrono::DateTime<chrono::Utc>) {
    use clap::Parser;
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
        "retention",
        "sweep",
        "--now",
        &now.to_rfc3339(),
    ])
    .unwrap();
    crm_api::cli::run(cli, async {}).await.unwrap();
}

/// The contacts erased so far, by id.
async fn erased(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT aggregate_id FROM events WHERE event_type = 'ContactErased' ORDER BY aggregate_id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

#[tokio::test]
async fn the_retention_sweep_erases_contacts_past_their_period_but_not_under_a_legal_hold() {
    let app = TestApp::spawn().await;
    let (s, v) = call(
        &app,
        Method::PUT,
        "/v1/privacy/retention",
        Some(json!({"days": 0, "reason": "x"})),
    )
    .await;
    assert_eq!(
        (s, v["fields"][0]["field"].as_str()),
        (422, Some("days")),
        "{v}"
    );
    let (s, v) = call(
        &app,
        Method::PUT,
        "/v1/privacy/retention",
        Some(json!({"days": 30, "reason": "records schedule 4.2"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = get(&app, "/v1/privacy").await;
    assert_eq!((s, v["retention_days"].as_i64()), (200, Some(30)), "{v}");

    let mut ids = Vec::new();
    for name in ["Default", "Longer", "Held", "Shorter"] {
        ids.push(
            app.create_contact(
                &json!({"given_name": name, "email": format!("{name}@example.com")}),
            )
            .await
            .0,
        );
    }
    let (default, longer, held, shorter) = (ids[0], ids[1], ids[2], ids[3]);
    for (c, days) in [(longer, json!(365)), (shorter, json!(10))] {
        let (s, v) = call(
            &app,
            Method::PUT,
            &format!("/v1/contacts/{c}/retention"),
            Some(json!({"days": days})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        // The contact shows its own period (its read model, once applied).
        let at = v["positions"][0].as_i64().unwrap();
        let (s, v) = get(
            &app,
            &format!("/v1/contacts/{c}?min_position={at}&wait_ms=5000"),
        )
        .await;
        assert_eq!((s, &v["retention_days"]), (200, &days), "{v}");
    }
    let (s, v) = get(&app, &format!("/v1/contacts/{default}")).await;
    assert_eq!((s, &v["retention_days"]), (200, &Value::Null), "{v}");
    let (s, v) = post(&app, &format!("/v1/contacts/{held}/legal-hold"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    // The sweep reads the contacts read model: let it apply the hold.
    let at = v["positions"][0].as_i64().unwrap();
    let (s, _) = get(
        &app,
        &format!("/v1/contacts/{held}?min_position={at}&wait_ms=5000"),
    )
    .await;
    assert_eq!(s, 200);

    // Now, nobody is past a period; 31 days on (a fixed clock), the organisation's
    // 30 days and the contact's 10 have run out, the 365 have not.
    let now = chrono::Utc::now();
    sweep_at(&app, now).await;
    let db = app.db().await;
    assert!(erased(&db).await.is_empty());
    let later = now + chrono::Duration::days(31);
    sweep_at(&app, later).await;
    let mut expected = vec![default.to_string(), shorter.to_string()];
    expected.sort();
    assert_eq!(erased(&db).await, expected);

    // Each through the erasure's own path (its receipt says `retention`), the hold
    // respected, and the run recorded on the organisation's privacy stream.
    let receipt = eventually(Duration::from_secs(5), || async {
        let (_, v) = get(&app, &format!("/v1/erasures?contact_id={default}")).await;
        v["items"].get(0).cloned()
    })
    .await
    .expect("a receipt");
    assert_eq!(
        (
            receipt["source"].as_str(),
            receipt["requested_by"]["id"].as_str()
        ),
        (Some("retention"), Some("retention"))
    );
    let swept: Vec<Value> = db
        .query(
            "SELECT payload -> 'RetentionSwept' FROM events WHERE event_type = 'RetentionSwept'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(swept.len(), 1, "{swept:?}");
    let mut named: Vec<String> = serde_json::from_value(swept[0]["erased"].clone()).unwrap();
    named.sort();
    assert_eq!(named, expected);
    assert_eq!(swept[0]["on_hold"], json!([held]));
    assert_eq!(
        swept[0]["now"]
            .as_str()
            .map(|t| t.parse::<chrono::DateTime<chrono::Utc>>().unwrap()),
        Some(later)
    );
    for c in [longer, held] {
        let (s, v) = get(&app, &format!("/v1/contacts/{c}")).await;
        assert_eq!((s, v["erased_at"].is_null()), (200, true), "{v}");
    }

    // A second run at the same clock has nothing left to do and records nothing.
    sweep_at(&app, later).await;
    assert_eq!(erased(&db).await, expected);
    let runs: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'RetentionSwept'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 1);
    app.stop().await;
}

#[tokio::test]
async fn an_organisations_suppression_key_is_made_once_under_concurrent_first_use() {
    let app = TestApp::spawn().await;
    // A fresh organisation: its key does not exist yet, and 16 requests want it at once
    // (the first erasures of an organisation, the gate's lookups).
    let (org, _, _) = app.another_org("Fresh").await;
    let calls = (0..16).map(|_| {
        let (crypto, pool) = (app.state.crypto.clone(), app.state.pool.clone());
        tokio::spawn(async move {
            let client = pool.get().await.unwrap();
            crypto
                .org_secret(&client, &org, crm_infra::crypto::org_secrets::SUPPRESSION)
                .await
        })
    });
    let keys: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().expect("every first use gets the key"))
        .collect();
    assert!(keys.iter().all(|k| k == &keys[0]), "one key for all");
    let rows: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM org_secrets WHERE org_id = $1",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    app.stop().await;
}

#[tokio::test]
async fn an_erased_contacts_portal_access_is_refused_as_erased_not_a_500() {
    let app = TestApp::spawn().await;
    let (c, _) = app
        .create_contact(&json!({"given_name": "Pia", "email": "pia.portal@example.com"}))
        .await;
    let (s, v) = call(
        &app,
        Method::PUT,
        "/v1/organization/modules",
        Some(json!({"modules": ["contacts", "activity", "reports", "portal"]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let grant = format!("/v1/contacts/{c}/portal-access");
    let (s, v) = post(&app, &grant, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(&app, &format!("/v1/contacts/{c}/erase"), json!({})).await;
    assert!(s < 300, "erase: {s} {v}");
    // Found by the fuzzer: granting again loaded the portal stream, whose login became
    // unreadable with the erasure, and answered 500.
    for path in [grant.clone(), format!("{grant}/revoke")] {
        let (s, v) = post(&app, &path, json!({"email": "pia.again@example.com"})).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (409, Some("erased")),
            "{path}: {v}"
        );
    }
    app.stop().await;
}
