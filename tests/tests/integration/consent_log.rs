//! The consent read models as a client sees them: the ConsentLog with its proof and
//! filters, who sees IP and user agent, organisations walled apart, a contact's consent
//! now and as of a past moment, the bulk check, and rebuilds equal to the live
//! projections.
//!
//! Consent changes are made through the consent ledger's executor (the commands the
//! consent routes run), with metadata carrying an IP address and a user agent.

use std::time::Duration;

use chrono::{DateTime, Utc};
use crm_domain::access::{Role, RoleRef};
use crm_domain::consent::ledger::{Choice, ConsentCommand, Rules};
use crm_domain::consent::proof::{
    CaptureSource, ConsentProof, Jurisdiction, LanguageTag, Notice, NoticeHash,
};
use crm_domain::consent::{Channel, LawfulBasis, PrivacyMode, PurposeKey};
use crm_domain::metadata::{EventMetadata, Principal, PrincipalKind};
use crm_domain::values::Line;
use crm_tests::harness::{Options, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

const IP: &str = "203.0.113.7";
const UA: &str = "ConsentTest/1.0";

fn meta(app: &TestApp) -> EventMetadata {
    EventMetadata {
        org_id: app.org_id,
        principal: Principal {
            kind: PrincipalKind::User,
            id: app.user_id.to_string(),
        },
        on_behalf_of: None,
        ip: Some(IP.into()),
        user_agent: Some(UA.into()),
        request_id: Some("req-consent".into()),
        correlation_id: None,
        causation_id: None,
        occurred_at: Utc::now(),
    }
}

fn proof(source: CaptureSource) -> ConsentProof {
    ConsentProof {
        lawful_basis: LawfulBasis::Consent,
        source,
        notice: Some(Notice {
            id: Line::parse("privacy-policy").unwrap(),
            version: Line::parse("2026-01").unwrap(),
            sha256: NoticeHash::parse(&"ab".repeat(32)).unwrap(),
        }),
        language: Some(LanguageTag::parse("de-CH").unwrap()),
        jurisdiction: Some(Jurisdiction::parse("EU").unwrap()),
        expires_at: None,
        import_id: None,
    }
}

/// Records `choice` for `research` on `channel` (the whole channel); returns the
/// event's position.
async fn record(
    app: &TestApp,
    contact: Uuid,
    channel: Channel,
    choice: Choice,
    source: CaptureSource,
) -> i64 {
    let command = ConsentCommand::Record {
        contact_id: contact,
        channel,
        purpose: PurposeKey::parse("research").unwrap(),
        contact_point: None,
        choice,
        proof: proof(source),
        rules: Rules {
            mode: PrivacyMode::Gdpr,
            double_opt_in_for_marketing: true,
        },
    };
    let outcome = crm_infra::consent::ledger::execute(
        &app.state.executor,
        app.org_id,
        contact,
        command,
        &meta(app),
    )
    .await
    .expect("consent recorded");
    *outcome.positions.last().unwrap()
}

async fn set_do_not_contact(app: &TestApp, contact: Uuid) -> i64 {
    let outcome = crm_infra::consent::ledger::execute(
        &app.state.executor,
        app.org_id,
        contact,
        ConsentCommand::SetDoNotContact {
            contact_id: contact,
            reason: Some("asked us on the phone".into()),
        },
        &meta(app),
    )
    .await
    .expect("marked");
    *outcome.positions.last().unwrap()
}

async fn get_as(app: &TestApp, token: &str, path: &str) -> (u16, Value) {
    let r = app
        .http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn ok(app: &TestApp, path: &str) -> Value {
    let (status, v) = get_as(app, &app.token, path).await;
    assert_eq!(status, 200, "{path}: {v}");
    v
}

fn items(v: &Value) -> &Vec<Value> {
    v["items"].as_array().unwrap()
}

#[tokio::test]
async fn the_log_lists_changes_with_proof_and_filters_work() {
    let app = TestApp::spawn().await;
    let (ada, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let (bob, _) = app
        .create_contact(&json!({"given_name": "Bob", "phone": "+441632960961"}))
        .await;
    let p1 = record(
        &app,
        ada,
        Channel::Email,
        Choice::Granted,
        CaptureSource::Form,
    )
    .await;
    let p2 = record(
        &app,
        bob,
        Channel::Phone,
        Choice::Denied,
        CaptureSource::Import,
    )
    .await;
    let p3 = set_do_not_contact(&app, bob).await;

    let all = ok(
        &app,
        &format!("/v1/consent/log?min_position={p3}&wait_ms=10000"),
    )
    .await;
    let list = items(&all);
    assert_eq!(list.len(), 3, "{all}");
    let positions: Vec<i64> = list
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, vec![p3, p2, p1], "newest first");
    assert!(all["next_before"].is_null());

    let grant = &list[2];
    assert_eq!(grant["contact_id"], json!(ada));
    assert_eq!(grant["action"], "ConsentRecorded");
    assert_eq!(grant["channel"], "email");
    assert_eq!(grant["purpose"], "research");
    assert_eq!(grant["status"], "granted");
    assert_eq!(grant["lawful_basis"], "consent");
    assert_eq!(grant["source"], "form");
    assert_eq!(
        grant["notice"],
        json!({"id": "privacy-policy", "version": "2026-01", "sha256": "ab".repeat(32)})
    );
    assert_eq!(grant["language"], "de-CH");
    assert_eq!(grant["jurisdiction"], "EU");
    assert!(grant["contact_point"].is_null() && grant.get("contact_point").is_some());
    assert_eq!(
        grant["actor"],
        json!({"kind": "user", "id": app.user_id.to_string()})
    );
    assert_eq!(grant["ip"], IP);
    assert_eq!(grant["user_agent"], UA);
    // The event's hash, as stored.
    let db = app.db().await;
    let hash: String = db
        .query_one(
            "SELECT encode(hash, 'hex') FROM events WHERE global_position = $1",
            &[&p1],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(grant["event_hash"], hash);
    let mark = &list[0];
    assert_eq!(mark["action"], "DoNotContactSet");
    assert!(mark["channel"].is_null() && mark["notice"].is_null());
    assert!(
        !mark.to_string().contains("asked us"),
        "the mark's reason is not listed"
    );

    let count = |v: &Value| items(v).len();
    for (query, n) in [
        (format!("contact_id={ada}"), 1),
        (format!("contact_id={bob}"), 2),
        ("channel=email".to_owned(), 1),
        ("channel=phone".to_owned(), 1),
        ("purpose=research".to_owned(), 2),
        ("purpose=marketing".to_owned(), 0),
        ("source=import".to_owned(), 1),
        ("source=form".to_owned(), 1),
        ("since=2000-01-01T00:00:00Z".to_owned(), 3),
        ("until=2000-01-01T00:00:00Z".to_owned(), 0),
        ("since=2999-01-01T00:00:00Z".to_owned(), 0),
        (format!("before={p2}"), 1),
    ] {
        let v = ok(&app, &format!("/v1/consent/log?{query}")).await;
        assert_eq!(count(&v), n, "{query}: {v}");
    }
    // Paging.
    let page = ok(&app, "/v1/consent/log?limit=2").await;
    assert_eq!(count(&page), 2);
    let next = page["next_before"].as_i64().unwrap();
    let rest = ok(&app, &format!("/v1/consent/log?limit=2&before={next}")).await;
    assert_eq!(count(&rest), 1);
    assert_eq!(rest["items"][0]["position"], p1);
    // Bad parameters are named.
    for bad in [
        "channel=fax",
        "source=telepathy",
        "purpose=Not%20A%20Key",
        "limit=0",
    ] {
        let (status, v) = get_as(&app, &app.token, &format!("/v1/consent/log?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {v}");
    }
    app.stop().await;
}

#[tokio::test]
async fn ip_and_user_agent_only_with_consent_proof_view_and_other_orgs_see_nothing() {
    let app = TestApp::spawn().await;
    let (ada, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let pos = record(
        &app,
        ada,
        Channel::Email,
        Choice::Granted,
        CaptureSource::Form,
    )
    .await;
    let path = format!("/v1/consent/log?min_position={pos}&wait_ms=10000");

    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (status, v) = get_as(&app, &team, &path).await;
    assert_eq!(status, 200, "{v}");
    let entry = &v["items"][0];
    assert_eq!(entry["source"], "form");
    assert!(entry.get("ip").is_none(), "{entry}");
    assert!(entry.get("user_agent").is_none(), "{entry}");
    assert!(!v.to_string().contains(IP));
    // Team may read e-mail addresses: the (whole-channel) point is there, null.
    assert!(entry.get("contact_point").is_some());

    // A role without consent.read gets nothing.
    let (_, viewer) = app.user_with_role(RoleRef::Builtin(Role::Viewer)).await;
    let (status, _) = get_as(&app, &viewer, "/v1/consent/log").await;
    assert_eq!(status, 403);

    let (_, _, other) = app.another_org("Other Org").await;
    let (status, v) = get_as(&app, &other, &path).await;
    assert_eq!(status, 200, "{v}");
    assert!(items(&v).is_empty(), "{v}");
    let (status, _) = get_as(&app, &other, &format!("/v1/contacts/{ada}/consent")).await;
    assert_eq!(status, 404);
    let (status, _) = get_as(
        &app,
        &other,
        &format!("/v1/contacts/{ada}/consent?as_of=2999-01-01T00:00:00Z"),
    )
    .await;
    assert_eq!(status, 404);
    let r = app
        .http
        .post(app.url("/v1/consent/check"))
        .bearer_auth(&other)
        .json(&json!({"channel": "email", "purpose": "research", "contact_ids": [ada]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["results"][0]["reason"], "contact_unknown", "{v}");
    app.stop().await;
}

#[tokio::test]
async fn current_state_after_grant_then_withdraw_and_as_of_answers_the_past() {
    let app = TestApp::spawn().await;
    let (ada, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let p1 = record(
        &app,
        ada,
        Channel::Email,
        Choice::Granted,
        CaptureSource::Form,
    )
    .await;
    let v = ok(
        &app,
        &format!("/v1/contacts/{ada}/consent?min_position={p1}&wait_ms=10000"),
    )
    .await;
    assert_eq!(v["records"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["records"][0]["status"], "granted");
    let granted_by = v["records"][0]["event_id"].clone();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between: DateTime<Utc> = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let p2 = record(
        &app,
        ada,
        Channel::Email,
        Choice::Withdrawn,
        CaptureSource::Form,
    )
    .await;
    let now = ok(
        &app,
        &format!("/v1/contacts/{ada}/consent?min_position={p2}&wait_ms=10000"),
    )
    .await;
    let records = now["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{now}");
    assert_eq!(records[0]["status"], "withdrawn");
    assert_eq!(records[0]["channel"], "email");
    assert_eq!(records[0]["purpose"], "research");
    assert_ne!(records[0]["event_id"], granted_by);
    assert_eq!(now["do_not_contact"], false);
    assert_eq!(now["sale_or_sharing_opted_out"], false);
    assert_eq!(now["position"], p2);
    assert!(now.get("as_of").is_none());

    let as_of = between.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let past = ok(
        &app,
        &format!(
            "/v1/contacts/{ada}/consent?as_of={}",
            as_of.replace('+', "%2B")
        ),
    )
    .await;
    assert_eq!(past["records"][0]["status"], "granted", "{past}");
    assert_eq!(past["records"][0]["event_id"], granted_by);
    assert!(past["as_of"].is_string());
    assert!(past.get("position").is_none());
    let before_all = ok(
        &app,
        &format!("/v1/contacts/{ada}/consent?as_of=2000-01-01T00:00:00Z"),
    )
    .await;
    assert!(before_all["records"].as_array().unwrap().is_empty());

    // A contact without any consent change has an empty state; an unknown one is 404.
    let (bob, pos) = app.create_contact(&json!({"given_name": "Bob"})).await;
    let v = ok(
        &app,
        &format!("/v1/contacts/{bob}/consent?min_position={pos}&wait_ms=10000"),
    )
    .await;
    assert!(v["records"].as_array().unwrap().is_empty());
    let (status, _) = get_as(
        &app,
        &app.token,
        &format!("/v1/contacts/{}/consent", Uuid::now_v7()),
    )
    .await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[tokio::test]
async fn the_bulk_check_allows_refuses_and_names_unknown_contacts() {
    // 10,001 ids take more than the default 64 KiB body: the check takes a bulk body
    // (4 MiB) with the default settings.
    let app = TestApp::spawn_with(Options::default()).await;
    let (ada, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let (bob, _) = app
        .create_contact(&json!({"given_name": "Bob", "email": "bob@example.com"}))
        .await;
    let (cyd, _) = app
        .create_contact(&json!({"given_name": "Cyd", "email": "cyd@example.com"}))
        .await;
    let (dee, _) = app.create_contact(&json!({"given_name": "Dee"})).await;
    let granted = record(
        &app,
        ada,
        Channel::Email,
        Choice::Granted,
        CaptureSource::Form,
    )
    .await;
    record(
        &app,
        bob,
        Channel::Email,
        Choice::Granted,
        CaptureSource::Form,
    )
    .await;
    let last = set_do_not_contact(&app, bob).await;
    // The check reads the read model: wait until it has the last change.
    ok(
        &app,
        &format!("/v1/contacts/{bob}/consent?min_position={last}&wait_ms=10000"),
    )
    .await;
    let unknown = Uuid::now_v7();
    let r = app
        .post(
            "/v1/consent/check",
            &json!({"channel": "email", "purpose": "research",
                    "contact_ids": [ada, bob, cyd, dee, unknown]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let results = v["results"].as_array().unwrap();
    let got: Vec<(String, bool, String)> = results
        .iter()
        .map(|r| {
            (
                r["contact_id"].as_str().unwrap().to_owned(),
                r["allowed"].as_bool().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (ada.to_string(), true, "consent".to_owned()),
            (bob.to_string(), false, "do_not_contact".to_owned()),
            (cyd.to_string(), false, "no_consent".to_owned()),
            (dee.to_string(), false, "no_contact_point".to_owned()),
            (unknown.to_string(), false, "contact_unknown".to_owned()),
        ],
        "{v}"
    );
    // Relied on: the grant, and the mark.
    let grant_id: Uuid = app
        .db()
        .await
        .query_one(
            "SELECT event_id FROM events WHERE global_position = $1",
            &[&granted],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(results[0]["relied_on"], json!([grant_id]));
    assert_eq!(results[1]["relied_on"].as_array().unwrap().len(), 1);
    assert!(v["checked_at"].is_string());

    // A service message has another basis (GDPR: allowed without consent), but not
    // for a contact marked Do Not Contact.
    let v: Value = app
        .post(
            "/v1/consent/check",
            &json!({"channel": "email", "purpose": "service", "contact_ids": [cyd, bob]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["results"][0]["reason"], "lawful_basis", "{v}");
    assert_eq!(v["results"][1]["reason"], "do_not_contact", "{v}");

    // 10,000 is the limit; one more is refused, naming the member.
    let many: Vec<Uuid> = (0..10_000).map(|_| Uuid::now_v7()).collect();
    let r = app
        .post(
            "/v1/consent/check",
            &json!({"channel": "email", "purpose": "research", "contact_ids": many}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 10_000);
    let too_many: Vec<Uuid> = (0..10_001).map(|_| Uuid::now_v7()).collect();
    let r = app
        .post(
            "/v1/consent/check",
            &json!({"channel": "email", "purpose": "research", "contact_ids": too_many}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(v.to_string().contains("contact_ids"), "{v}");
    let r = app
        .post(
            "/v1/consent/check",
            &json!({"channel": "email", "purpose": "Bad Key", "contact_ids": []}),
        )
        .await;
    assert_eq!(r.status(), 422);
    app.stop().await;
}

/// Every row of `table`, in key order, as JSON text.
async fn table_rows(app: &TestApp, table: &str, key: &str) -> Vec<String> {
    app.db()
        .await
        .query(
            &format!("SELECT row_to_json(t)::text FROM {table} t ORDER BY org_id, {key}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn index_names(app: &TestApp, table: &str) -> Vec<String> {
    app.db()
        .await
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = $1 ORDER BY 1",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_rebuild_of_each_consent_read_model_equals_the_live_one() {
    let app = TestApp::spawn().await;
    let mut last = 0;
    let mut ids = Vec::new();
    for i in 0..6 {
        let (id, _) = app
            .create_contact(
                &json!({"given_name": format!("C{i}"), "email": format!("c{i}@example.com"),
                                    "phone": "+441632960961", "time_zone": "Europe/Berlin"}),
            )
            .await;
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        last = record(
            &app,
            *id,
            Channel::Email,
            Choice::Granted,
            CaptureSource::Form,
        )
        .await;
        if i % 2 == 0 {
            last = record(
                &app,
                *id,
                Channel::Email,
                Choice::Withdrawn,
                CaptureSource::Api,
            )
            .await;
        }
        if i % 3 == 0 {
            last = set_do_not_contact(&app, *id).await;
        }
    }
    // A contact change after its consent changes moves its points.
    let r = app
        .patch(
            &format!("/v1/contacts/{}", ids[1]),
            &json!({"email": "moved@example.com", "time_zone": null}),
        )
        .await;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "{v}");
    let patched = v["positions"][0].as_i64().unwrap();
    ok(
        &app,
        &format!("/v1/consent/log?min_position={last}&wait_ms=10000"),
    )
    .await;
    ok(
        &app,
        &format!(
            "/v1/contacts/{}/consent?min_position={}&wait_ms=10000",
            ids[1], patched
        ),
    )
    .await;

    for (table, key, count) in [
        ("consent_log", "event_id", 6 + 3 + 2),
        ("consent_state", "contact_id", 6),
    ] {
        let live = table_rows(&app, table, key).await;
        assert_eq!(live.len(), count, "{table}");
        let indexes = index_names(&app, table).await;
        let report = app.rebuild(table).await;
        assert!(report.events > 0);
        assert_eq!(
            table_rows(&app, table, key).await,
            live,
            "{table}: rebuild differs"
        );
        assert_eq!(
            index_names(&app, table).await,
            indexes,
            "{table}: index names"
        );
    }
    let moved = table_rows(&app, "consent_state", "contact_id").await;
    assert!(moved.iter().any(|r| r.contains("moved@example.com")));

    // The live projections go on after the swap.
    let p = record(
        &app,
        ids[5],
        Channel::Phone,
        Choice::Granted,
        CaptureSource::Form,
    )
    .await;
    let v = ok(
        &app,
        &format!("/v1/consent/log?channel=phone&min_position={p}&wait_ms=10000"),
    )
    .await;
    assert_eq!(items(&v).len(), 1);
    let v = ok(
        &app,
        &format!(
            "/v1/contacts/{}/consent?min_position={p}&wait_ms=10000",
            ids[5]
        ),
    )
    .await;
    assert_eq!(v["records"].as_array().unwrap().len(), 2, "{v}");
    app.stop().await;
}
