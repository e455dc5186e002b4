//! Every way of gaining a permission one does not hold is refused: wider custom roles,
//! Owner grants by non-Owners, demoting the last Owner, tokens of the wrong type,
//! revoked, expired or forged tokens. And the grants that are allowed leave events.

use std::time::{SystemTime, UNIX_EPOCH};

use crm_domain::access::{Role, RoleRef};
use crm_tests::harness::TestApp;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use uuid::Uuid;

async fn send(
    app: &TestApp,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    app.call_as(token, method, path, body).await
}

async fn post(app: &TestApp, token: &str, path: &str, body: Value) -> (u16, Value) {
    send(app, token, reqwest::Method::POST, path, Some(body)).await
}

async fn get(app: &TestApp, token: &str, path: &str) -> u16 {
    send(app, token, reqwest::Method::GET, path, None).await.0
}

fn new_user(role: &str) -> Value {
    json!({
        "email": format!("{}@example.com", Uuid::new_v4().simple()),
        "display_name": "New Person",
        "role": role,
        "password": "a long enough password",
    })
}

#[tokio::test]
async fn a_custom_role_wider_than_its_creator_is_refused() {
    let app = TestApp::spawn().await;
    // A role manager who may read contacts, and nothing else about them.
    let (s, body) = post(
        &app,
        &app.token,
        "/v1/roles",
        json!({"name": "Role manager", "permissions": ["roles.manage", "roles.read", "contacts.read", "users.manage"],
               "fields": {"given_name": "read"}}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let manager_role: RoleRef = body["id"]
        .as_str()
        .unwrap()
        .parse::<Uuid>()
        .map(RoleRef::Custom)
        .unwrap();
    let (_, manager) = app.user_with_role(manager_role).await;

    let (s, body) = post(
        &app,
        &manager,
        "/v1/roles",
        json!({"name": "Exporter", "permissions": ["contacts.read", "contacts.export"]}),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["code"], "grant_exceeds_own");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("contacts.export"),
        "{body}"
    );
    let (s, body) = post(
        &app,
        &manager,
        "/v1/roles",
        json!({"name": "Writer", "permissions": ["contacts.read"], "fields": {"given_name": "write"}}),
    )
    .await;
    assert_eq!(s, 403, "a wider field grant too: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("given_name"),
        "{body}"
    );
    // Within its own grant it may define roles...
    let (s, body) = post(
        &app,
        &manager,
        "/v1/roles",
        json!({"name": "Reader", "permissions": ["contacts.read"]}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    // ...but not hand out a built-in role wider than its own.
    let (s, body) = post(&app, &manager, "/v1/users", new_user("team")).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["code"], "grant_exceeds_own");
    // Nor widen the role it holds itself.
    let (s, body) = send(
        &app,
        &manager,
        reqwest::Method::PATCH,
        &format!("/v1/roles/{manager_role}"),
        Some(json!({"permissions": ["roles.manage", "roles.read", "contacts.read", "users.manage", "contacts.erase"]})),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn only_an_owner_grants_or_changes_owner_and_the_last_owner_stays() {
    let app = TestApp::spawn().await;
    let (admin_id, admin) = app.user_with_role(RoleRef::Builtin(Role::Admin)).await;
    let (s, body) = post(&app, &admin, "/v1/users", new_user("owner")).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("owner_required")),
        "{body}"
    );
    let owner = app.user_id;
    let (s, body) = post(
        &app,
        &admin,
        &format!("/v1/users/{owner}/role"),
        json!({"role": "viewer"}),
    )
    .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("owner_required")),
        "{body}"
    );
    let (s, _) = post(
        &app,
        &admin,
        &format!("/v1/users/{owner}/deactivate"),
        json!({}),
    )
    .await;
    assert_eq!(s, 403);
    // An Admin cannot make itself Owner either.
    let (s, _) = post(
        &app,
        &admin,
        &format!("/v1/users/{admin_id}/role"),
        json!({"role": "owner"}),
    )
    .await;
    assert_eq!(s, 403);

    // The only Owner cannot demote or deactivate itself.
    let (s, body) = post(
        &app,
        &app.token,
        &format!("/v1/users/{owner}/role"),
        json!({"role": "admin"}),
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("last active Owner"),
        "{body}"
    );
    let (s, _) = post(
        &app,
        &app.token,
        &format!("/v1/users/{owner}/deactivate"),
        json!({}),
    )
    .await;
    assert_eq!(s, 409);
    assert_eq!(
        get(&app, &app.token, "/v1/contacts").await,
        200,
        "still an Owner"
    );

    // With a second Owner, the first may step down, and the event names who did it.
    let (s, body) = post(
        &app,
        &app.token,
        &format!("/v1/users/{admin_id}/role"),
        json!({"role": "owner"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = post(
        &app,
        &app.token,
        &format!("/v1/users/{owner}/role"),
        json!({"role": "viewer"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        get(&app, &app.token, "/v1/users").await,
        403,
        "now a Viewer"
    );
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT payload, metadata -> 'principal' ->> 'id' FROM events \
             WHERE aggregate_type = 'user' AND aggregate_id = $1 ORDER BY sequence DESC LIMIT 1",
            &[&owner.to_string()],
        )
        .await
        .unwrap();
    let payload: Value = row.get(0);
    assert_eq!(
        payload,
        json!({"UserRoleChanged": {"from": "owner", "to": "viewer"}})
    );
    assert_eq!(row.get::<_, String>(1), owner.to_string());
    app.stop().await;
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn wrong_type_revoked_deactivated_expired_and_forged_tokens_are_401() {
    let app = TestApp::spawn().await;
    let secret = app.settings.jwt.secret.expose_secret().to_owned();
    let claims = |typ: &str, exp: u64, gen: i32| {
        json!({"sub": app.user_id.to_string(), "org": app.org_id.to_string(), "typ": typ,
               "iat": now() - 10, "exp": exp, "jti": "j", "aud": "crm-api", "iss": "crm", "gen": gen})
    };
    let sign = |c: &Value, alg: Algorithm, key: &str| {
        encode(
            &Header::new(alg),
            c,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let good = sign(&claims("staff", now() + 600, 0), Algorithm::HS256, &secret);
    assert_eq!(get(&app, &good, "/v1/contacts").await, 200, "control");
    for (what, token) in [
        (
            "a portal token",
            sign(&claims("portal", now() + 600, 0), Algorithm::HS256, &secret),
        ),
        (
            "an expired token",
            sign(&claims("staff", now() - 120, 0), Algorithm::HS256, &secret),
        ),
        (
            "another key",
            sign(
                &claims("staff", now() + 600, 0),
                Algorithm::HS256,
                &"k".repeat(40),
            ),
        ),
        (
            "HS512",
            sign(&claims("staff", now() + 600, 0), Algorithm::HS512, &secret),
        ),
        (
            "a later generation",
            sign(&claims("staff", now() + 600, 7), Algorithm::HS256, &secret),
        ),
    ] {
        assert_eq!(get(&app, &token, "/v1/contacts").await, 401, "{what}");
    }
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        good.split('.').nth(1).unwrap()
    );
    assert_eq!(get(&app, &unsigned, "/v1/contacts").await, 401, "alg=none");

    // Logout ends every token of the user, this one included.
    let (_, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (s, _) = post(&app, &team, "/v1/auth/logout", json!({})).await;
    assert_eq!(s, 204);
    assert_eq!(get(&app, &team, "/v1/contacts").await, 401, "after logout");

    // A deactivated user's token stops working, and reactivation does not revive it.
    let (support_id, support) = app.user_with_role(RoleRef::Builtin(Role::Support)).await;
    assert_eq!(get(&app, &support, "/v1/contacts").await, 200);
    let (s, _) = post(
        &app,
        &app.token,
        &format!("/v1/users/{support_id}/deactivate"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        get(&app, &support, "/v1/contacts").await,
        401,
        "deactivated"
    );
    let (s, _) = post(
        &app,
        &app.token,
        &format!("/v1/users/{support_id}/reactivate"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        get(&app, &support, "/v1/contacts").await,
        401,
        "old token stays dead"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_password_change_ends_other_sessions_and_keeps_this_one() {
    let app = TestApp::spawn().await;
    let password = "the first long password";
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let (s, body) = post(
        &app,
        &app.token,
        "/v1/users",
        json!({"email": email, "display_name": "Pat", "role": "team", "password": password}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let login = || async {
        let r = app
            .http
            .post(app.url("/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (laptop, phone) = (login().await, login().await);
    let (s, body) = post(
        &app,
        &laptop,
        "/v1/auth/password",
        json!({"current_password": "wrong password here", "new_password": "the second long password"}),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["fields"][0]["field"], "current_password");
    let (s, body) = post(
        &app,
        &laptop,
        "/v1/auth/password",
        json!({"current_password": password, "new_password": "the second long password"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let fresh = body["access_token"].as_str().unwrap();
    assert_eq!(
        get(&app, &phone, "/v1/contacts").await,
        401,
        "other session"
    );
    assert_eq!(
        get(&app, &laptop, "/v1/contacts").await,
        401,
        "the old token of this one"
    );
    assert_eq!(
        get(&app, fresh, "/v1/contacts").await,
        200,
        "this session goes on"
    );
    let r = app
        .http
        .post(app.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the old password is gone");
    let types: Vec<String> = app
        .db()
        .await
        .query(
            "SELECT event_type FROM events WHERE aggregate_type = 'user' AND org_id = $1 \
             AND aggregate_id = (SELECT user_id::text FROM credentials WHERE email_lower = $2)",
            &[&app.org_id, &email],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["UserRegistered", "PasswordChanged"]);
    app.stop().await;
}

/// Each API process caches who may do what; a change made through one process reaches
/// the others (LISTEN/NOTIFY) before they serve the old access again.
#[tokio::test]
async fn a_change_in_one_api_process_reaches_the_others() {
    let app = TestApp::spawn().await;
    let other = app.second_api().await;
    let (team_id, team) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let on_other = |path: String, token: String| {
        let http = app.http.clone();
        let url = other.url(&path);
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The other process has the Team user's access cached now.
    assert_eq!(on_other("/v1/contacts".into(), team.clone()).await, 200);
    assert_eq!(on_other("/v1/contacts".into(), team.clone()).await, 200);
    // Demoted to Board through this process: the other refuses contacts promptly.
    let (s, _) = post(
        &app,
        &app.token,
        &format!("/v1/users/{team_id}/role"),
        json!({"role": "board"}),
    )
    .await;
    assert_eq!(s, 200);
    let refused = crm_tests::harness::eventually(std::time::Duration::from_secs(2), || {
        let f = on_other("/v1/contacts".into(), team.clone());
        async move { (f.await == 403).then_some(()) }
    })
    .await;
    assert!(
        refused.is_some(),
        "the other process still serves the old role"
    );
    // Logged out through this process: the other refuses the token promptly.
    let (s, _) = post(&app, &team, "/v1/auth/logout", json!({})).await;
    assert_eq!(s, 204);
    let refused = crm_tests::harness::eventually(std::time::Duration::from_secs(2), || {
        let f = on_other("/v1/reports/contacts".into(), team.clone());
        async move { (f.await == 401).then_some(()) }
    })
    .await;
    assert!(
        refused.is_some(),
        "the other process still accepts a logged-out token"
    );
    other.stop().await;
    app.stop().await;
}

/// While it hears invalidations, a process keeps a user's access after the first
/// request (later requests need no database lookup), and forgets it on a change.
#[tokio::test]
async fn repeated_requests_use_the_access_cache() {
    let app = TestApp::spawn().await;
    let cache = app.state.access_cache.clone();
    // The listener connects in the background; until then nothing is cached.
    let cached = crm_tests::harness::eventually(std::time::Duration::from_secs(5), || {
        let cache = cache.clone();
        let app = &app;
        async move {
            get(app, &app.token, "/v1/me").await;
            cache.get(app.user_id, app.org_id)
        }
    })
    .await
    .expect("the access is never cached");
    assert!(cached.role.is_owner());
    // A change through this process empties its cache at once.
    let (s, _) = post(&app, &app.token, "/v1/auth/logout", json!({})).await;
    assert_eq!(s, 204);
    assert!(
        cache.get(app.user_id, app.org_id).is_none(),
        "still cached after logout"
    );
    app.stop().await;
}

/// The executor forgets the access it changed in its own process before it returns
/// (not only when the NOTIFY comes back), and only that organisation's: caching
/// here is on with no listener at all, so nothing else could have done it.
#[tokio::test]
async fn an_access_change_forgets_that_organisations_cached_access_at_once() {
    let app = TestApp::spawn().await;
    let cache = crm_infra::access::cache::AccessCache::new();
    let executor = crm_infra::commands::executor::Executor::new(
        app.state.pool.clone(),
        app.state.executor.crypto().clone(),
    )
    .with_hook(cache.clone());
    cache.live_without_listener_for_tests();
    let (other_org, other_user, _) = app.another_org("Other Org").await;
    let client = app.state.pool.get().await.unwrap();
    for (user, org) in [(app.user_id, app.org_id), (other_user, other_org)] {
        let access = crm_infra::access::accounts::load_access(&client, user, org)
            .await
            .unwrap()
            .expect("an active user");
        cache.put(&std::sync::Arc::new(access), cache.epoch());
        assert!(cache.get(user, org).is_some());
    }
    drop(client);
    crm_infra::access::accounts::user_command(
        &executor,
        app.org_id,
        app.user_id,
        crm_domain::user::UserCommand::SignOut,
        &crm_domain::metadata::EventMetadata::system(app.org_id, "test"),
    )
    .await
    .unwrap();
    assert!(
        cache.get(app.user_id, app.org_id).is_none(),
        "the signed-out user's access is still cached"
    );
    assert!(
        cache.get(other_user, other_org).is_some(),
        "another organisation's cached access was dropped too"
    );
    app.stop().await;
}
