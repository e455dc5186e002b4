//! The credentials vault (docs/vault.md): AI provider credentials over HTTP (created,
//! listed, rotated, deleted; the key never answered, never in the events nor in the
//! logs), verified against a local provider that checks the bearer key, every
//! decryption (verify, carrier dispatch) on record exactly once with principal and
//! purpose, a sealed value swapped between rows refused, and another organisation
//! shut out.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use crm_domain::access::{Role, RoleRef};
use crm_domain::consent::Channel;
use crm_infra::dispatch::carriers::credentials::legacy_aad;
use crm_infra::dispatch::carriers::{CarrierDefaults, Carriers, Outbound};
use crm_infra::vault::ai_credentials::{self, CredentialAdminError};
use crm_infra::vault::VaultError;
use crm_tests::harness::TestApp;
use crm_tests::logs::Logs;
use crm_tests::sinks::HttpReceiver;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

const KEY_1: &str = "sk-test-first-0123456789-AAAA";
const KEY_2: &str = "sk-test-second-9876543210-BBBB";

/// What a provider received: (path, `Authorization` header), in order.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// An OpenAI-shaped provider on 127.0.0.1: `GET …/models` answers 200 for the one key
/// it accepts (as `Authorization: Bearer …`), 401 otherwise; records what it got.
struct Provider {
    url: String,
    seen: Seen,
    task: JoinHandle<()>,
}

impl Provider {
    async fn start(accepts: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let seen = Seen::default();
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let seen = seen.clone();
                        async move {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let path = req.uri().path().to_owned();
                            seen.lock().unwrap().push((path.clone(), auth.clone()));
                            let good = req.method() == hyper::Method::GET
                                && path == "/v1/models"
                                && auth.as_deref() == Some(&*format!("Bearer {accepts}"));
                            let (status, body) = if good {
                                (200, r#"{"object":"list","data":[{"id":"m"}]}"#)
                            } else {
                                (401, r#"{"error":"invalid api key"}"#)
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url, seen, task }
    }

    fn seen(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn create(app: &TestApp, token: &str, body: Value) -> (u16, Value) {
    app.call_as(token, Method::POST, "/v1/ai/credentials", Some(body))
        .await
}

/// Creates a credential of provider `other` at `base_url`; returns its id.
async fn credential(app: &TestApp, token: &str, key: &str, base_url: &str) -> Uuid {
    let (status, body) = create(
        app,
        token,
        json!({"provider": "other", "label": "Local", "secret": key, "base_url": base_url}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn verify(app: &TestApp, token: &str, id: Uuid) -> (u16, Value) {
    app.call_as(
        token,
        Method::POST,
        &format!("/v1/ai/credentials/{id}/verify"),
        None,
    )
    .await
}

/// The decryption events of stream (`aggregate_type`, `id`): (event type, payload,
/// principal), in order.
async fn decryptions(app: &TestApp, aggregate_type: &str, id: &str) -> Vec<(String, Value, Value)> {
    app.db()
        .await
        .query(
            "SELECT event_type, payload, metadata -> 'principal' FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 \
               AND event_type IN ('CredentialDecrypted', 'CarrierSecretDecrypted') \
             ORDER BY sequence",
            &[&aggregate_type, &id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn credentials_are_created_listed_rotated_and_deleted_and_the_key_is_never_answered_stored_or_logged(
) {
    let (logs, _guard) = Logs::capture();
    let app = TestApp::spawn().await;
    let mut answers = String::new();

    let (status, created) = create(
        &app,
        &app.token,
        json!({"provider": "openai", "label": " Production ", "secret": KEY_1}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    answers.push_str(&created.to_string());
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["provider"], "openai");
    assert_eq!(created["label"], "Production");
    assert_eq!(created["base_url"], "https://api.openai.com/v1");
    assert_eq!(created["secret_last4"], "AAAA");
    assert_eq!(created["rotated_at"], Value::Null);
    assert!(created.get("secret").is_none(), "{created}");

    let r = app.get("/v1/ai/credentials").await;
    assert_eq!(r.status(), 200);
    let listed: Value = r.json().await.unwrap();
    answers.push_str(&listed.to_string());
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0], created);
    let r = app.get(&format!("/v1/ai/credentials/{id}")).await;
    assert_eq!(r.status(), 200);
    let one: Value = r.json().await.unwrap();
    assert_eq!(one, created);

    let (status, rotated) = app
        .call_as(
            &app.token,
            Method::POST,
            &format!("/v1/ai/credentials/{id}/rotate"),
            Some(json!({"secret": KEY_2})),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    answers.push_str(&rotated.to_string());
    assert_eq!(rotated["secret_last4"], "BBBB");
    assert!(rotated["rotated_at"].is_string(), "{rotated}");

    // What is stored: sealed in the vault, last four beside it; nowhere in clear.
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT sealed, kek_id, last4 FROM vault_secrets \
             WHERE org_id = $1 AND record_type = 'credential' AND record_id = $2 AND field = 'secret'",
            &[&app.org_id, &id],
        )
        .await
        .unwrap();
    let sealed: Vec<u8> = row.get(0);
    for key in [KEY_1, KEY_2] {
        assert!(!sealed.windows(key.len()).any(|w| w == key.as_bytes()));
    }
    assert_eq!(row.get::<_, String>(1), "test");
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("BBBB"));
    let events: Vec<(String, String, String)> = db
        .query(
            "SELECT event_type, payload::text, metadata::text FROM events \
             WHERE aggregate_type = 'credential' AND aggregate_id = $1 ORDER BY sequence",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["CredentialCreated", "CredentialRotated"]
    );
    assert!(
        events[0].1.contains("\"secret_last4\": \"AAAA\""),
        "{}",
        events[0].1
    );
    let everything_stored: String = db
        .query(
            "SELECT payload::text || metadata::text FROM events \
             UNION ALL SELECT row_to_json(a)::text FROM ai_credentials a",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    for key in [KEY_1, KEY_2] {
        assert!(!everything_stored.contains(key));
        assert!(!answers.contains(key), "{answers}");
    }

    // Deleted: 204, then gone everywhere (the vault row too), and 404 from then on.
    let r = app
        .http
        .delete(app.url(&format!("/v1/ai/credentials/{id}")))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.text().await.unwrap(), "");
    let left: i64 = db
        .query_one("SELECT count(*) FROM vault_secrets", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let listed: Value = app.get("/v1/ai/credentials").await.json().await.unwrap();
    assert_eq!(listed["items"], json!([]));
    assert_eq!(
        app.get(&format!("/v1/ai/credentials/{id}")).await.status(),
        404
    );
    for (method, path, body) in [
        (Method::DELETE, format!("/v1/ai/credentials/{id}"), None),
        (
            Method::POST,
            format!("/v1/ai/credentials/{id}/rotate"),
            Some(json!({"secret": KEY_1})),
        ),
        (
            Method::POST,
            format!("/v1/ai/credentials/{id}/verify"),
            None,
        ),
    ] {
        let (status, body) = app.call_as(&app.token, method, &path, body).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["code"], "not_found");
    }
    assert_eq!(decryptions(&app, "credential", &id).await, vec![]);

    // The logs saw the requests, never a key.
    let logged = logs.text();
    assert!(
        logged.contains("/v1/ai/credentials"),
        "nothing captured: {logged}"
    );
    for key in [KEY_1, KEY_2] {
        assert!(!logged.contains(key), "{logged}");
    }
    app.stop().await;
}

#[tokio::test]
async fn credentials_need_organization_manage_and_a_valid_body() {
    let app = TestApp::spawn().await;
    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let good = json!({"provider": "anthropic", "label": "Claude", "secret": KEY_1});
    let (status, body) = create(&app, &team, good.clone()).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "permission_denied");
    let (status, _) = app
        .call_as(&team, Method::GET, "/v1/ai/credentials", None)
        .await;
    assert_eq!(status, 403);

    let fields = |body: &Value| -> Vec<String> {
        body["fields"]
            .as_array()
            .map(|f| {
                f.iter()
                    .map(|e| e["field"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for (body, expected) in [
        (
            json!({"provider": "azure_openai", "label": "Azure", "secret": KEY_1}),
            vec!["base_url"],
        ),
        (
            json!({"provider": "other", "label": "x", "secret": KEY_1, "base_url": "ftp://h/v1"}),
            vec!["base_url"],
        ),
        (
            json!({"provider": "other", "label": "x", "secret": KEY_1, "base_url": "https://u:p@h/v1"}),
            vec!["base_url"],
        ),
        (
            json!({"provider": "openai", "label": "  ", "secret": "short"}),
            vec!["label", "secret"],
        ),
        (
            json!({"provider": "openai", "label": "x", "secret": "has a space in it"}),
            vec!["secret"],
        ),
    ] {
        let (status, answer) = create(&app, &app.token, body.clone()).await;
        assert_eq!(status, 422, "{body} → {answer}");
        assert_eq!(fields(&answer), expected, "{body} → {answer}");
        assert!(!answer.to_string().contains(KEY_1), "{answer}");
    }
    // Unknown provider, unknown member, missing secret: refused by the edge (400).
    for body in [
        json!({"provider": "acme", "label": "x", "secret": KEY_1}),
        json!({"provider": "openai", "label": "x", "secret": KEY_1, "key": "x"}),
        json!({"provider": "openai", "label": "x"}),
    ] {
        let (status, answer) = create(&app, &app.token, body.clone()).await;
        assert_eq!(status, 400, "{body} → {answer}");
    }
    let (status, answer) = app
        .call_as(
            &app.token,
            Method::POST,
            &format!("/v1/ai/credentials/{}/rotate", Uuid::now_v7()),
            Some(json!({"secret": "bad key"})),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(fields(&answer), ["secret"]);
    let (status, answer) = create(&app, &app.token, good).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["base_url"], "https://api.anthropic.com/v1");
    let id = answer["id"].as_str().unwrap();

    // Decrypting is the sensitive `credentials.decrypt`, apart from managing: a role
    // that manages the organisation without it lists and rotates, but cannot verify.
    let (status, role) = app
        .call_as(
            &app.token,
            Method::POST,
            "/v1/roles",
            Some(json!({"name": "Org manager", "permissions": ["organization.manage"]})),
        )
        .await;
    assert_eq!(status, 201, "{role}");
    let (_, manager) = app
        .user_with_role(RoleRef::Custom(
            role["id"].as_str().unwrap().parse().unwrap(),
        ))
        .await;
    let (status, listed) = app
        .call_as(&manager, Method::GET, "/v1/ai/credentials", None)
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    let (status, body) = verify(&app, &manager, id.parse().unwrap()).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("credentials.decrypt"),
        "{body}"
    );
    let (status, body) = verify(&app, &team, id.parse().unwrap()).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(decryptions(&app, "credential", id).await, vec![]);
    app.stop().await;
}

#[tokio::test]
async fn verify_decrypts_on_record_and_calls_the_provider_with_the_key() {
    let (logs, _guard) = Logs::capture();
    let app = TestApp::spawn().await;
    let provider = Provider::start(KEY_1).await;
    let id = credential(&app, &app.token, KEY_1, &provider.url).await;

    let (status, body) = verify(&app, &app.token, id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"ok": true, "status": 200, "error": null}));
    assert_eq!(
        provider.seen(),
        [("/v1/models".to_owned(), Some(format!("Bearer {KEY_1}")))]
    );
    let principal = json!({"kind": "user", "id": app.user_id.to_string()});
    let decrypted = decryptions(&app, "credential", &id.to_string()).await;
    assert_eq!(
        decrypted,
        [(
            "CredentialDecrypted".to_owned(),
            json!({"CredentialDecrypted": {"purpose": "verify"}}),
            principal.clone()
        )]
    );

    // Rotated: the provider refuses the new key (it knows only the first); each verify
    // is one more decryption on record, one more request.
    let (status, _) = app
        .call_as(
            &app.token,
            Method::POST,
            &format!("/v1/ai/credentials/{id}/rotate"),
            Some(json!({"secret": KEY_2})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = verify(&app, &app.token, id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"ok": false, "status": 401, "error": null}));
    assert_eq!(
        provider.seen()[1].1.as_deref(),
        Some(&*format!("Bearer {KEY_2}"))
    );
    assert_eq!(
        decryptions(&app, "credential", &id.to_string()).await.len(),
        2
    );

    // Nobody listening: no answer, still one decryption on record.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let nowhere = credential(&app, &app.token, KEY_1, &format!("http://{closed}/v1")).await;
    let (status, body) = verify(&app, &app.token, nowhere).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"ok": false, "status": null, "error": "unreachable"})
    );
    assert_eq!(
        decryptions(&app, "credential", &nowhere.to_string())
            .await
            .len(),
        1
    );

    // An API key with the permission decrypts as itself.
    let (status, key) = app
        .call_as(
            &app.token,
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "ops", "role": "admin"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let (status, body) = verify(&app, key["key"].as_str().unwrap(), nowhere).await;
    assert_eq!(status, 200, "{body}");
    let decrypted = decryptions(&app, "credential", &nowhere.to_string()).await;
    assert_eq!(decrypted.len(), 2);
    assert_eq!(
        decrypted[1].2,
        json!({"kind": "api_key", "id": key["id"].as_str().unwrap()})
    );

    // The activity log names every decryption `credentials.decrypt`, with who did it.
    let last: i64 = app
        .db()
        .await
        .query_one("SELECT max(global_position) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    let r = app
        .get(&format!(
            "/v1/activity?action=credentials.decrypt&min_position={last}&wait_ms=10000"
        ))
        .await;
    assert_eq!(r.status(), 200);
    let activity: Value = r.json().await.unwrap();
    let items = activity["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{activity}");
    assert!(items
        .iter()
        .all(|e| e["action"] == "credentials.decrypt" && e["entity"]["type"] == "credential"));
    assert_eq!(items[3]["actor"], principal);

    let logged = logs.text();
    assert!(logged.contains("verify"), "nothing captured: {logged}");
    for k in [KEY_1, KEY_2] {
        assert!(!logged.contains(k), "{logged}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_sealed_key_swapped_between_rows_fails_to_decrypt() {
    let app = TestApp::spawn().await;
    let provider = Provider::start(KEY_1).await;
    let a = credential(&app, &app.token, KEY_1, &provider.url).await;
    let b = credential(&app, &app.token, KEY_2, &provider.url).await;
    let (other_org, _, other_token) = app.another_org("Other").await;
    let c = credential(&app, &other_token, KEY_1, &provider.url).await;
    let db = app.db().await;
    let sealed_of = |org: Uuid, id: Uuid| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT sealed FROM vault_secrets WHERE org_id = $1 AND record_id = $2",
                &[&org, &id.to_string()],
            )
            .await
            .unwrap()
            .get::<_, Vec<u8>>(0)
        }
    };
    let set_sealed = |org: Uuid, record_type: &'static str, id: String, sealed: Vec<u8>| {
        let db = &db;
        async move {
            let n = db
                .execute(
                    "UPDATE vault_secrets SET sealed = $4 \
                     WHERE org_id = $1 AND record_type = $2 AND record_id = $3",
                    &[&org, &record_type, &id, &sealed],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
    };
    let (sealed_a, sealed_b) = (
        sealed_of(app.org_id, a).await,
        sealed_of(app.org_id, b).await,
    );
    set_sealed(app.org_id, "credential", a.to_string(), sealed_b.clone()).await;
    set_sealed(app.org_id, "credential", b.to_string(), sealed_a.clone()).await;

    // Over HTTP: a clear error (409 secret_unreadable), never a key, nothing sent.
    for id in [a, b] {
        let (status, body) = verify(&app, &app.token, id).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["code"], "secret_unreadable", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("sealed for another row"),
            "{body}"
        );
        assert!(!body.to_string().contains("sk-test"), "{body}");
    }
    assert!(provider.seen().is_empty(), "{:?}", provider.seen());
    // Each attempt is on record (the event comes first), once.
    assert_eq!(
        decryptions(&app, "credential", &a.to_string()).await.len(),
        1
    );
    assert_eq!(
        decryptions(&app, "credential", &b.to_string()).await.len(),
        1
    );

    // In the vault itself: another organisation's sealed value copied over ours.
    set_sealed(
        app.org_id,
        "credential",
        a.to_string(),
        sealed_of(other_org, c).await,
    )
    .await;
    let meta = crm_domain::metadata::EventMetadata::system(app.org_id, "test");
    match ai_credentials::decrypt(&app.state.executor, app.org_id, a, "test", &meta).await {
        Err(CredentialAdminError::Vault(VaultError::Unbound(row))) => {
            assert_eq!(row, format!("credential {a} secret"))
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a key copied from another organisation decrypted"),
    }
    // And a credential's sealed key copied into a carrier's row: the carrier is refused
    // (permanently), nothing is sent.
    let rx = HttpReceiver::start().await;
    let (status, body) = app
        .call_as(
            &app.token,
            Method::PUT,
            "/v1/organization/carriers",
            Some(json!({
                "channel": "sms", "kind": "twilio",
                "settings": {"base_url": rx.url(), "account_sid": "AC42", "from": "+15005550006"},
                "secret": "auth-token-0123456789",
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    set_sealed(app.org_id, "carrier", "sms".into(), sealed_a).await;
    let carriers = Carriers::new(
        app.state.pool.clone(),
        app.state.crypto.clone(),
        CarrierDefaults::default(),
    );
    let e = match carriers.for_channel(app.org_id, Channel::Sms).await {
        Err(e) => e,
        Ok(_) => panic!("a credential's key opened as the carrier's secret"),
    };
    assert!(!e.retryable, "{e}");
    assert!(e.message.contains("cannot be decrypted"), "{e}");
    assert!(!e.message.contains("sk-test"), "{e}");
    assert!(rx.requests().is_empty());
    assert_eq!(decryptions(&app, "carrier", "sms").await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn another_organisation_cannot_see_or_use_a_credential() {
    let app = TestApp::spawn().await;
    let provider = Provider::start(KEY_1).await;
    let id = credential(&app, &app.token, KEY_1, &provider.url).await;
    let (_, _, other) = app.another_org("Other").await;

    let (status, body) = app
        .call_as(&other, Method::GET, "/v1/ai/credentials", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["items"], json!([]));
    for (method, path, body) in [
        (Method::GET, format!("/v1/ai/credentials/{id}"), None),
        (
            Method::POST,
            format!("/v1/ai/credentials/{id}/verify"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/ai/credentials/{id}/rotate"),
            Some(json!({"secret": KEY_2})),
        ),
        (Method::DELETE, format!("/v1/ai/credentials/{id}"), None),
    ] {
        let (status, body) = app.call_as(&other, method, &path, body).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    // Untouched: never decrypted, still the first key, still verifying.
    assert!(provider.seen().is_empty());
    assert_eq!(
        decryptions(&app, "credential", &id.to_string()).await,
        vec![]
    );
    let one: Value = app
        .get(&format!("/v1/ai/credentials/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["secret_last4"], "AAAA");
    assert_eq!(verify(&app, &app.token, id).await.1["ok"], true);
    app.stop().await;
}

fn text(key: &str) -> Outbound {
    Outbound {
        idempotency_key: key.into(),
        channel: Channel::Sms,
        to: "+4915112345678".into(),
        subject: None,
        body: "Your code is 1234".into(),
        unsubscribe_url: None,
    }
}

#[tokio::test]
async fn a_carrier_secret_lives_in_the_vault_and_one_sealed_before_it_is_still_read_then_moved() {
    let app = TestApp::spawn().await;
    let rx = HttpReceiver::start().await;
    let secret = "auth-token-0123456789-WXYZ";
    let configure = || {
        app.call_as(
            &app.token,
            Method::PUT,
            "/v1/organization/carriers",
            Some(json!({
                "channel": "sms", "kind": "twilio",
                "settings": {"base_url": rx.url(), "account_sid": "AC42", "from": "+15005550006"},
                "secret": secret,
            })),
        )
    };
    assert_eq!(configure().await.0, 200);
    let db = app.db().await;
    let vault_rows = || async {
        db.query(
            "SELECT record_type, record_id, field, last4 FROM vault_secrets WHERE org_id = $1",
            &[&app.org_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, Option<String>>(3),
            )
        })
        .collect::<Vec<_>>()
    };
    let moved = vec![(
        "carrier".to_owned(),
        "sms".to_owned(),
        "secret".to_owned(),
        Some("WXYZ".to_owned()),
    )];
    assert_eq!(vault_rows().await, moved);
    let legacy = || async {
        db.query_one(
            "SELECT sealed_secret FROM carrier_secrets WHERE org_id = $1 AND channel = 'sms'",
            &[&app.org_id],
        )
        .await
        .unwrap()
        .get::<_, Option<Vec<u8>>>(0)
    };
    assert_eq!(legacy().await, None);

    // Dispatch decrypts once, on record: principal `dispatch`, purpose `dispatch`.
    let carriers = || {
        Carriers::new(
            app.state.pool.clone(),
            app.state.crypto.clone(),
            CarrierDefaults::default(),
        )
    };
    let sms = carriers()
        .for_channel(app.org_id, Channel::Sms)
        .await
        .unwrap();
    sms.send(&text("m-1")).await.unwrap();
    let dispatch = json!({"kind": "system", "id": "dispatch"});
    assert_eq!(
        decryptions(&app, "carrier", "sms").await,
        [(
            "CarrierSecretDecrypted".to_owned(),
            json!({"CarrierSecretDecrypted": {"channel": "sms", "purpose": "dispatch"}}),
            dispatch.clone()
        )]
    );

    // A carrier configured before the vault: its secret sealed in carrier_secrets
    // under the old binding, nothing in the vault. Still read (decryption recorded)...
    let old = app
        .state
        .crypto
        .wrap_secret(&legacy_aad(app.org_id, Channel::Sms), secret.as_bytes())
        .unwrap();
    db.execute(
        "UPDATE carrier_secrets SET sealed_secret = $2 WHERE org_id = $1",
        &[&app.org_id, &old],
    )
    .await
    .unwrap();
    db.execute("DELETE FROM vault_secrets", &[]).await.unwrap();
    let listed: Value = app
        .get("/v1/organization/carriers")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["has_secret"], true);
    let sms = carriers()
        .for_channel(app.org_id, Channel::Sms)
        .await
        .unwrap();
    sms.send(&text("m-2")).await.unwrap();
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("AC42:{secret}"),
    );
    for r in rx.requests() {
        assert_eq!(r.header("authorization"), Some(&*format!("Basic {basic}")));
    }
    assert_eq!(rx.requests().len(), 2);
    let decrypted = decryptions(&app, "carrier", "sms").await;
    assert_eq!(decrypted.len(), 2);
    assert_eq!(decrypted[1].2, dispatch);

    // ...and moved into the vault by the next configuration.
    assert_eq!(configure().await.0, 200);
    assert_eq!(legacy().await, None);
    assert_eq!(vault_rows().await, moved);
    let sms = carriers()
        .for_channel(app.org_id, Channel::Sms)
        .await
        .unwrap();
    sms.send(&text("m-3")).await.unwrap();
    assert_eq!(decryptions(&app, "carrier", "sms").await.len(), 3);

    // Removed: gone from both tables.
    let r = app
        .post(
            "/v1/organization/carriers/remove",
            &json!({"channel": "sms"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(vault_rows().await, vec![]);
    app.stop().await;
}
