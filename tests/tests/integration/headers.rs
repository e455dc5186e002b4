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

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// CORS only for the configured origins: their preflights get the policy and their
/// responses (errors too) the allow-origin header; any other origin gets a 403 on
/// preflight and no CORS header at all.
#[tokio::test]
async fn cors_answers_only_configured_origins() {
    use crm_tests::harness::Options;
    let app = TestApp::spawn_with(Options {
        cors_origins: vec!["https://app.example.com".into()],
        ..Default::default()
    })
    .await;
    let anonymous = reqwest::Client::new();
    let preflight = |origin: &'static str, method: &'static str| {
        anonymous
            .request(Method::OPTIONS, app.url("/v1/contacts"))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };

    let ok = preflight("https://app.example.com", "POST").await.unwrap();
    assert_eq!(ok.status(), 204);
    assert_eq!(
        header(&ok, "access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    let methods = header(&ok, "access-control-allow-methods").unwrap();
    assert!(
        methods.contains("POST") && methods.contains("PATCH"),
        "{methods}"
    );
    let allowed_headers = header(&ok, "access-control-allow-headers").unwrap();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    assert_security_headers(&ok, "allowed preflight");

    for (origin, method) in [
        ("https://evil.example.com", "POST"),
        ("https://app.example.com.evil.net", "GET"),
        ("http://app.example.com", "GET"),
        ("https://app.example.com", "PUT"),
    ] {
        let r = preflight(origin, method).await.unwrap();
        assert_eq!(r.status(), 403, "{origin} {method}");
        if origin != "https://app.example.com" {
            // (The allowed origin may read why its PUT was refused.)
            assert_eq!(header(&r, "access-control-allow-origin"), None, "{origin}");
        }
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["code"], "cors_forbidden");
    }

    // Actual requests: the allowed origin can read successes and errors alike.
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .bearer_auth(&app.token)
        .header("origin", "https://app.example.com")
        .json(&json!({"given_name": "Cy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    assert!(header(&r, "access-control-expose-headers")
        .unwrap()
        .contains("x-request-id"));
    let r = anonymous
        .get(app.url("/v1/contacts"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    let r = app
        .http
        .get(app.url("/v1/contacts"))
        .bearer_auth(&app.token)
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the server answers; the browser may not read it"
    );
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    assert!(header(&r, "vary").is_some_and(|v| v.contains("Origin")));
    app.stop().await;
}

/// With no origins configured (the default), no origin gets CORS headers.
#[tokio::test]
async fn without_configured_origins_no_cross_origin_access() {
    let app = TestApp::spawn().await;
    let r = reqwest::Client::new()
        .request(Method::OPTIONS, app.url("/v1/contacts"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = app.get("/v1/contacts").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    app.stop().await;
}
