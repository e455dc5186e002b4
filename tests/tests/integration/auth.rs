//! Logging in with a real bcrypt password over HTTP.

use crm_tests::harness::{create_user, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.http
        .post(app.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

/// Status, request id header and body of a response.
async fn parts(r: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = r.status().as_u16();
    let rid = r
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, rid, body)
}

/// A user of the test's organisation with `password` hashed as the service hashes it.
async fn user_with_password(app: &TestApp, password: &str) -> (Uuid, String) {
    let email = format!("{}@login.example.com", Uuid::new_v4().simple());
    let hash = crm_api::auth::hash_password(password).unwrap();
    let user = create_user(&app.state, app.org_id, &email, &hash).await;
    (user, email)
}

#[tokio::test]
async fn login_issues_a_token_that_works() {
    let app = TestApp::spawn().await;
    let password = "correct horse battery staple";
    let (user, email) = user_with_password(&app, password).await;

    let (status, rid, v) = parts(login(&app, &email, password).await).await;
    assert_eq!(status, 200, "{v}");
    assert!(rid.is_some(), "x-request-id on success too");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(
        v["expires_in"].as_u64(),
        Some(app.settings.jwt.ttl.as_secs())
    );
    let token = v["access_token"].as_str().expect("access_token").to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT");

    // The token works for the API, as that user of that organisation.
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .bearer_auth(&token)
        .json(&json!({"given_name": "Ada"}))
        .send()
        .await
        .unwrap();
    let (status, _, created) = parts(r).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let pos = created["positions"][0].as_i64().unwrap();
    let r = app
        .http
        .get(app.url(&format!("/v1/contacts?min_position={pos}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (status, _, list) = parts(r).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["items"][0]["id"], id);
    let r = app
        .http
        .get(app.url(&format!("/v1/contacts/{id}/history")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (_, _, history) = parts(r).await;
    assert_eq!(
        history["events"][0]["metadata"]["principal"],
        json!({"kind": "user", "id": user.to_string()}),
        "commands are attributed to the user who logged in"
    );

    // The email is matched without regard to case.
    let (status, _, _) = parts(login(&app, &email.to_uppercase(), password).await).await;
    assert_eq!(status, 200, "email case does not matter");
    app.stop().await;
}

#[tokio::test]
async fn wrong_passwords_and_unknown_emails_look_the_same() {
    let app = TestApp::spawn().await;
    let password = "correct horse battery staple";
    let (_, email) = user_with_password(&app, password).await;

    let wrong = parts(login(&app, &email, "correct horse battery stapler").await).await;
    let unknown = parts(login(&app, "nobody-here@login.example.com", password).await).await;
    let empty = parts(login(&app, &email, "").await).await;
    for (what, (status, rid, body)) in [
        ("wrong password", &wrong),
        ("unknown email", &unknown),
        ("empty password", &empty),
    ] {
        assert_eq!(*status, 401, "{what}: {body}");
        assert_eq!(body["code"], "unauthorized", "{what}");
        assert_eq!(body["message"], "invalid email or password", "{what}");
        assert!(body.get("access_token").is_none(), "{what}");
        let rid = rid
            .as_deref()
            .unwrap_or_else(|| panic!("{what}: x-request-id"));
        assert_eq!(body["request_id"], rid, "{what}");
    }
    let strip = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("request_id");
        v
    };
    assert_eq!(
        strip(&wrong.2),
        strip(&unknown.2),
        "a wrong password and an unknown email are indistinguishable"
    );
    assert_ne!(
        wrong.2["request_id"], unknown.2["request_id"],
        "each answer has its own request id"
    );
    app.stop().await;
}

#[tokio::test]
async fn every_byte_of_a_long_password_counts() {
    let app = TestApp::spawn().await;
    let prefix = "Tr0ub4dor&3-".repeat(6); // 72 bytes
    assert_eq!(prefix.len(), 72);
    let right = format!("{prefix}right-01"); // 80 bytes
    let wrong = format!("{prefix}wrong-02"); // 80 bytes, same first 72
    assert_eq!((right.len(), wrong.len()), (80, 80));
    let (_, email) = user_with_password(&app, &right).await;

    let (status, _, v) = parts(login(&app, &email, &wrong).await).await;
    assert_eq!(status, 401, "same first 72 bytes must not log in: {v}");
    assert_eq!(v["code"], "unauthorized");
    let (status, _, v) = parts(login(&app, &email, &prefix).await).await;
    assert_eq!(status, 401, "the 72-byte prefix alone must not log in: {v}");
    let (status, _, v) = parts(login(&app, &email, &right).await).await;
    assert_eq!(status, 200, "the right password logs in: {v}");
    assert!(v["access_token"].is_string());
    app.stop().await;
}
