//! Security headers on every response, errors included.

use crm_tests::harness::TestApp;
use reqwest::Method;
use serde_json::json;

/// The headers issue 3 asks for, with the values it names.
fn assert_security_headers(r: &reqwest::Response, what: &str) {
    let h = r.headers();
    let get = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{what}: no {name} header"))
            .to_owned()
    };
    assert_eq!(get("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(get("x-frame-options"), "SAMEORIGIN", "{what}");
    assert!(
        get("strict-transport-security").starts_with("max-age=63072000"),
        "{what}"
    );
    assert!(
        get("content-security-policy").contains("default-src 'none'"),
        "{what}"
    );
    assert_eq!(get("referrer-policy"), "no-referrer", "{what}");
}

#[tokio::test]
async fn every_response_carries_the_security_headers_errors_included() {
    let app = TestApp::spawn().await;
    let (id, position) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let anonymous = reqwest::Client::new();
    let cases: Vec<(&str, reqwest::Response, u16)> = vec![
        (
            "health",
            anonymous.get(app.url("/healthz")).send().await.unwrap(),
            200,
        ),
        (
            "create",
            app.post("/v1/contacts", &json!({"given_name": "Bo"})).await,
            201,
        ),
        (
            "read",
            app.get(&format!("/v1/contacts/{id}?min_position={position}"))
                .await,
            200,
        ),
        (
            "no token",
            anonymous.get(app.url("/v1/contacts")).send().await.unwrap(),
            401,
        ),
        ("unknown route", app.get("/v1/nothing-here").await, 404),
        ("bad id", app.get("/v1/contacts/not-a-uuid").await, 400),
        (
            "wrong method",
            app.http
                .request(Method::PUT, app.url("/healthz"))
                .send()
                .await
                .unwrap(),
            405,
        ),
        (
            "invalid field",
            app.post("/v1/contacts", &json!({"email": "nope"})).await,
            422,
        ),
        (
            "oversize body",
            app.post(
                "/v1/contacts",
                &json!({"given_name": "A", "custom": {"n": "x".repeat(70 * 1024)}}),
            )
            .await,
            413,
        ),
        (
            "bad login",
            anonymous
                .post(app.url("/v1/auth/login"))
                .json(&json!({"email": "nobody@example.com", "password": "wrong password"}))
                .send()
                .await
                .unwrap(),
            401,
        ),
    ];
    for (what, r, status) in &cases {
        assert_eq!(r.status().as_u16(), *status, "{what}");
        assert_security_headers(r, what);
    }
    app.stop().await;
}
