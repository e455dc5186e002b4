//! "Who could see this field on that day" from history, and inviting a user by mail.

use std::time::Duration;

use chrono::{DateTime, Utc};
use crm_tests::harness::{eventually, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

async fn db_now(app: &TestApp) -> DateTime<Utc> {
    app.db()
        .await
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

/// (id → access) of who could read `field` at `at`.
async fn readers(app: &TestApp, field: &str, at: DateTime<Utc>) -> Vec<(String, String, String)> {
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let r = app
        .get(&format!(
            "/v1/audit/field-access?field={field}&at={}",
            at.replace('+', "%2B")
        ))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["readers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["id"].as_str().unwrap().to_owned(),
                h["kind"].as_str().unwrap().to_owned(),
                h["access"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn has(list: &[(String, String, String)], id: &str) -> Option<String> {
    list.iter()
        .find(|(i, _, _)| i == id)
        .map(|(_, _, a)| a.clone())
}

#[tokio::test]
async fn who_could_read_a_field_on_a_given_day() {
    let app = TestApp::spawn().await;
    let owner = app.user_id.to_string();
    let r = app
        .post(
            "/v1/users",
            &json!({"email": format!("{}@example.com", Uuid::new_v4().simple()),
        "display_name": "Vic", "role": "viewer", "password": "a long enough password"}),
        )
        .await;
    let vic = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let as_viewer = db_now(&app).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = app
        .post(
            &format!("/v1/users/{vic}/role"),
            &json!({"role": "support"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let as_support = db_now(&app).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = app
        .post(&format!("/v1/users/{vic}/deactivate"), &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .post(
            "/v1/api-keys",
            &json!({"name": "Log shipper", "role": "team", "permissions": ["activity.read"]}),
        )
        .await;
    let shipper = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .post("/v1/api-keys", &json!({"name": "Sync", "role": "viewer"}))
        .await;
    let sync = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let now = db_now(&app).await;

    let then = readers(&app, "email", as_viewer).await;
    assert_eq!(has(&then, &owner).as_deref(), Some("write"));
    assert_eq!(has(&then, &vic), None, "a Viewer does not see email");
    let then = readers(&app, "email", as_support).await;
    assert_eq!(
        has(&then, &vic).as_deref(),
        Some("write"),
        "Support writes email"
    );
    let names = readers(&app, "given_name", as_viewer).await;
    assert_eq!(
        has(&names, &vic).as_deref(),
        Some("read"),
        "a Viewer reads names"
    );
    let today = readers(&app, "email", now).await;
    assert_eq!(has(&today, &vic), None, "deactivated");
    assert_eq!(has(&today, &shipper), None, "narrowed to activity.read");
    assert_eq!(has(&today, &sync), None, "a Viewer key does not see email");
    assert_eq!(
        has(&readers(&app, "title", now).await, &sync).as_deref(),
        Some("read")
    );

    let r = app.get("/v1/audit/field-access?field=password").await;
    assert_eq!(r.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn an_invited_user_sets_a_password_by_mail() {
    let app = TestApp::spawn().await;
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let r = app
        .post(
            "/v1/users",
            &json!({"email": email, "display_name": "Ines", "role": "team"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["invited"], true);
    let mail = eventually(Duration::from_secs(5), || async {
        app.state.mailer.sent().into_iter().find(|m| m.to == email)
    })
    .await
    .expect("an invitation");
    assert!(mail.body.contains("72 hours"), "{}", mail.body);
    let token = mail
        .body
        .split("#token=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let r = app
        .http
        .post(app.url("/v1/auth/password-reset/confirm"))
        .json(&json!({"token": token, "new_password": "my own long password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .post(app.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": "my own long password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}
