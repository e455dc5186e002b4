//! API keys over HTTP: shown once, stored as a digest, scoped, recorded as the actor,
//! refused when mistyped, revoked or expired.

use crm_tests::harness::TestApp;
use serde_json::{json, Value};

async fn with_key(
    app: &TestApp,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    app.call_as(key, method, path, body).await
}

#[tokio::test]
async fn an_api_key_acts_within_its_scope_until_revoked() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/api-keys",
            &json!({"name": "Import job", "role": "team", "permissions": ["contacts.read", "contacts.create"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let issued: Value = r.json().await.unwrap();
    let key = issued["key"].as_str().unwrap().to_owned();
    let key_id = issued["id"].as_str().unwrap().to_owned();
    assert!(
        key.starts_with("ck_live_") && key.len() >= 8 + 22 + 6,
        "{key}"
    );
    assert_eq!(issued["last4"], &key[key.len() - 4..]);

    // It acts, as principal api_key.
    let (s, created) = with_key(
        &app,
        &key,
        reqwest::Method::POST,
        "/v1/contacts",
        Some(json!({"given_name": "Ada"})),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT metadata -> 'principal' FROM events WHERE aggregate_id = $1",
            &[&created["id"].as_str().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Value>(0),
        json!({"kind": "api_key", "id": key_id})
    );
    // Within its narrowed scope only: Team may update, this key may not.
    let (s, body) = with_key(
        &app,
        &key,
        reqwest::Method::PATCH,
        &format!("/v1/contacts/{}", created["id"].as_str().unwrap()),
        Some(json!({"given_name": "Eve"})),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("contacts.update"));
    let (s, _) = with_key(&app, &key, reqwest::Method::POST, "/v1/auth/logout", None).await;
    assert_eq!(s, 403, "a key has no session to end");

    // Only a digest and the last four characters are stored; the list never shows it.
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM api_keys WHERE digest = sha256($1::bytea) AND last4 = $2 \
             AND last_used_at IS NOT NULL",
            &[&key.as_bytes(), &&key[key.len() - 4..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);
    let dump: String = db
        .query_one("SELECT string_agg(t::text, '') FROM api_keys t", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!dump.contains(&key[8..]), "the secret is not stored");
    let list = app.get("/v1/api-keys").await.text().await.unwrap();
    assert!(!list.contains(&key[8..]), "{list}");
    assert!(list.contains("Import job"));

    // A mistyped key is refused (its checksum fails before any lookup).
    let mut typo = key.clone().into_bytes();
    typo[12] = if typo[12] == b'x' { b'y' } else { b'x' };
    let (s, _) = with_key(
        &app,
        &String::from_utf8(typo).unwrap(),
        reqwest::Method::GET,
        "/v1/contacts",
        None,
    )
    .await;
    assert_eq!(s, 401);

    // Revoked: refused from then on, and the revocation is an event.
    let r = app
        .post(&format!("/v1/api-keys/{key_id}/revoke"), &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let (s, _) = with_key(&app, &key, reqwest::Method::GET, "/v1/contacts", None).await;
    assert_eq!(s, 401);
    let types: Vec<String> = db
        .query(
            "SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence",
            &[&key_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["ApiKeyIssued", "ApiKeyRevoked"]);
    app.stop().await;
}

#[tokio::test]
async fn keys_expire_and_never_exceed_their_issuer() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/api-keys",
            &json!({"name": "Old", "role": "viewer", "expires_at": "2001-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status(), 422, "an expiry in the past");
    let r = app
        .post(
            "/v1/api-keys",
            &json!({"name": "Soon", "role": "viewer", "expires_at": "2100-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let issued: Value = r.json().await.unwrap();
    let key = issued["key"].as_str().unwrap();
    let (s, _) = with_key(&app, key, reqwest::Method::GET, "/v1/contacts", None).await;
    assert_eq!(s, 200);
    // Time passes.
    app.db()
        .await
        .execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let (s, _) = with_key(&app, key, reqwest::Method::GET, "/v1/contacts", None).await;
    assert_eq!(s, 401, "expired");

    // An Admin's key may not be an Owner key; a Team key may not issue keys at all.
    let (_, admin) = app
        .user_with_role(crm_domain::access::RoleRef::Builtin(
            crm_domain::access::Role::Admin,
        ))
        .await;
    let (s, body) = with_key(
        &app,
        &admin,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"name": "Root", "role": "owner"})),
    )
    .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("owner_required")),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_agent_acts_as_itself_and_never_beyond_its_registering_user_now() {
    let app = TestApp::spawn().await;
    let (admin_id, admin) = app
        .user_with_role(crm_domain::access::RoleRef::Builtin(
            crm_domain::access::Role::Admin,
        ))
        .await;
    // The Admin registers an agent with the Team role.
    let (s, issued) = with_key(
        &app,
        &admin,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"name": "Assistant", "role": "team", "kind": "agent"})),
    )
    .await;
    assert_eq!(
        (s, issued["kind"].as_str()),
        (201, Some("agent")),
        "{issued}"
    );
    let agent = issued["key"].as_str().unwrap().to_owned();
    let agent_id = issued["id"].as_str().unwrap().to_owned();
    let listed = app.get("/v1/api-keys").await.json::<Value>().await.unwrap();
    let item = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == agent_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(
        (item["kind"].as_str(), item["registered_by"].as_str()),
        (Some("agent"), Some(admin_id.to_string().as_str()))
    );

    // It acts as principal ai_agent, under its own id.
    let (s, created) = with_key(
        &app,
        &agent,
        reqwest::Method::POST,
        "/v1/contacts",
        Some(json!({"given_name": "Ada"})),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let contact = created["id"].as_str().unwrap().to_owned();
    let created_at = created["positions"][0].as_i64().unwrap();
    let principal: Value = app
        .db()
        .await
        .query_one(
            "SELECT metadata -> 'principal' FROM events WHERE aggregate_id = $1",
            &[&contact],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(principal, json!({"kind": "ai_agent", "id": agent_id}));

    // The Admin is demoted to Viewer: from the next request on, the agent may only
    // read, though its own grant (Team) is unchanged.
    let r = app
        .post(
            &format!("/v1/users/{admin_id}/role"),
            &json!({"role": "viewer"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (s, body) = with_key(
        &app,
        &agent,
        reqwest::Method::POST,
        "/v1/contacts",
        Some(json!({"given_name": "Eve"})),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, _) = with_key(
        &app,
        &agent,
        reqwest::Method::GET,
        &format!("/v1/contacts/{contact}?min_position={created_at}&wait_ms=10000"),
        None,
    )
    .await;
    assert_eq!(s, 200, "what both may do, it still does");

    // Deactivated: the agent authenticates nothing until the user is back.
    let r = app
        .post(&format!("/v1/users/{admin_id}/deactivate"), &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let (s, _) = with_key(&app, &agent, reqwest::Method::GET, "/v1/contacts", None).await;
    assert_eq!(s, 401);
    let r = app
        .post(&format!("/v1/users/{admin_id}/reactivate"), &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let (s, _) = with_key(&app, &agent, reqwest::Method::GET, "/v1/contacts", None).await;
    assert_eq!(s, 200);
    app.stop().await;
}

#[tokio::test]
async fn only_a_signed_in_user_registers_an_agent_and_within_their_own_grant() {
    let app = TestApp::spawn().await;
    // A key (even an Admin one) cannot register an agent.
    let r = app
        .post("/v1/api-keys", &json!({"name": "Ops", "role": "admin"}))
        .await;
    assert_eq!(r.status(), 201);
    let ops: Value = r.json().await.unwrap();
    let (s, body) = with_key(
        &app,
        ops["key"].as_str().unwrap(),
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"name": "Bot", "role": "viewer", "kind": "agent"})),
    )
    .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("user_only")),
        "{body}"
    );
    // A user cannot give an agent more than they hold.
    let (_, admin) = app
        .user_with_role(crm_domain::access::RoleRef::Builtin(
            crm_domain::access::Role::Admin,
        ))
        .await;
    let (s, body) = with_key(
        &app,
        &admin,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"name": "Root bot", "role": "owner", "kind": "agent"})),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, body) = with_key(
        &app,
        &admin,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"name": "Bot", "role": "viewer", "kind": "robot"})),
    )
    .await;
    assert_eq!(s, 400, "an unknown kind: {body}");
    app.stop().await;
}
