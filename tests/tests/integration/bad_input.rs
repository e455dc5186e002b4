//! Bad requests and bad credentials: always a 4xx (never a 500) with the JSON error
//! shape `{"code","message","request_id"}` and an `x-request-id` header, and nothing
//! written.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use crm_tests::harness::TestApp;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use uuid::Uuid;

/// Asserts the status, the error `code`, a non-empty message and a request id in both
/// the header and the body (the same one); returns the body.
async fn expect_error(r: reqwest::Response, status: u16, code: &str, what: &str) -> Value {
    let got = r.status().as_u16();
    let header = r
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{what}: status; body {text}");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: the error body is not JSON ({e}): {text}"));
    assert_eq!(v["code"], code, "{what}: code; body {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: message; body {v}"
    );
    let header = header.unwrap_or_else(|| panic!("{what}: x-request-id header missing"));
    assert!(!header.is_empty(), "{what}: empty x-request-id");
    assert_eq!(
        v["request_id"],
        header.as_str(),
        "{what}: body and header ids"
    );
    v
}

/// The number of contact events stored: bad requests must write none.
async fn contact_events(app: &TestApp) -> i64 {
    app.db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_type = 'contact'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A request with the staff token, a raw body and an optional content type.
async fn send_raw(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut rb = app
        .http
        .request(method, app.url(path))
        .bearer_auth(&app.token)
        .body(body);
    if let Some(ct) = content_type {
        rb = rb.header("content-type", ct);
    }
    rb.send().await.unwrap()
}

#[tokio::test]
async fn malformed_json_wrong_types_and_unknown_fields_are_400() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let before = contact_events(&app).await;
    let patch_path = format!("/v1/contacts/{id}");
    for (method, path) in [
        (Method::POST, "/v1/contacts"),
        (Method::PATCH, patch_path.as_str()),
    ] {
        for (body, code) in [
            ("{\"given_name\": ", "invalid_json"),
            ("{\"given_name\": \"Ada\",}", "invalid_json"),
            ("not json at all", "invalid_json"),
            ("", "invalid_json"),
            ("{\"email\": 123}", "invalid_body"),
            ("{\"given_name\": true}", "invalid_body"),
            ("{\"custom\": [1, 2]}", "invalid_body"),
            ("{\"address\": \"1 Main St\"}", "invalid_body"),
            ("[]", "invalid_body"),
            ("[\"Ada\", \"Lovelace\"]", "invalid_body"),
            ("\"Ada\"", "invalid_body"),
            (
                "{\"given_name\": \"Ada\", \"shoe_size\": 9}",
                "invalid_body",
            ),
            (
                "{\"address\": {\"city\": \"Paris\", \"planet\": \"Earth\"}}",
                "invalid_body",
            ),
        ] {
            let what = format!("{method} {path} {body:?}");
            let r = send_raw(&app, method.clone(), path, Some("application/json"), body).await;
            let v = expect_error(r, 400, code, &what).await;
            if body.contains("shoe_size") || body.contains("planet") {
                let msg = v["message"].as_str().unwrap();
                assert!(
                    msg.contains("shoe_size") || msg.contains("planet"),
                    "{what}: the message names the unknown field: {msg}"
                );
            }
            if body == "{\"email\": 123}" {
                let msg = v["message"].as_str().unwrap();
                assert!(msg.contains("invalid type"), "{what}: {msg}");
            }
        }
    }
    assert_eq!(contact_events(&app).await, before, "nothing was written");
    app.stop().await;
}

#[tokio::test]
async fn bodies_need_a_json_content_type() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let before = contact_events(&app).await;
    let patch_path = format!("/v1/contacts/{id}");
    for (method, path) in [
        (Method::POST, "/v1/contacts"),
        (Method::PATCH, patch_path.as_str()),
    ] {
        for ct in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let what = format!("{method} {path} content-type {ct:?}");
            let r = send_raw(&app, method.clone(), path, ct, "{\"title\": \"Dr\"}").await;
            expect_error(r, 415, "unsupported_media_type", &what).await;
        }
    }
    // A charset parameter is fine.
    let r = send_raw(
        &app,
        Method::POST,
        "/v1/contacts",
        Some("application/json; charset=utf-8"),
        "{\"given_name\": \"Bea\"}",
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(contact_events(&app).await, before + 1);
    app.stop().await;
}

#[tokio::test]
async fn bodies_over_64_kib_are_413_and_smaller_ones_are_read() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let before = contact_events(&app).await;
    let big = json!({"given_name": "A", "custom": {"note": "x".repeat(65 * 1024)}});
    assert!(big.to_string().len() > 64 * 1024);
    let r = app.post("/v1/contacts", &big).await;
    expect_error(r, 413, "payload_too_large", "POST 65 KiB").await;
    let r = app.patch(&format!("/v1/contacts/{id}"), &big).await;
    expect_error(r, 413, "payload_too_large", "PATCH 65 KiB").await;
    // Much larger, too: refused without reading it all.
    let huge = format!(
        "{{\"given_name\": \"A\", \"title\": \"{}\"}}",
        "y".repeat(4 << 20)
    );
    let r = send_raw(
        &app,
        Method::POST,
        "/v1/contacts",
        Some("application/json"),
        huge,
    )
    .await;
    expect_error(r, 413, "payload_too_large", "POST 4 MiB").await;
    assert_eq!(contact_events(&app).await, before, "nothing was written");

    // Just under the limit: read and accepted (41 custom fields of 1500 characters).
    let custom: serde_json::Map<String, Value> = (0..41)
        .map(|i| (format!("f{i}"), json!("z".repeat(1500))))
        .collect();
    let near = json!({"given_name": "Big", "custom": custom});
    let len = near.to_string().len();
    assert!(len > 60 * 1024 && len <= 64 * 1024, "{len}");
    let r = app.post("/v1/contacts", &near).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    app.stop().await;
}

#[tokio::test]
async fn validation_names_every_bad_field() {
    let app = TestApp::spawn().await;
    let before = contact_events(&app).await;
    let fields = |v: &Value| {
        let mut f: Vec<String> = v["fields"]
            .as_array()
            .unwrap_or_else(|| panic!("fields array: {v}"))
            .iter()
            .map(|e| {
                assert!(
                    e["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "each field error says why: {e}"
                );
                e["field"].as_str().unwrap().to_owned()
            })
            .collect();
        f.sort();
        f
    };
    let r = app
        .post(
            "/v1/contacts",
            &json!({
                "given_name": "   ",
                "family_name": "x".repeat(201),
                "email": "not-an-email",
                "phone": "0044 1632 960961",
                "address": {"city": "Paris", "country": "FRA", "postal_code": "1".repeat(21)},
                "company": "ok",
                "title": "bad\u{0007}bell",
                "custom": {"Bad-Key": 1, "nested": {"a": 1}, "list": [1], "ok_key": "fine"}
            }),
        )
        .await;
    let v = expect_error(r, 422, "validation_failed", "many bad fields").await;
    assert_eq!(
        fields(&v),
        [
            "address.country",
            "address.postal_code",
            "custom.Bad-Key",
            "custom.list",
            "custom.nested",
            "email",
            "family_name",
            "given_name",
            "phone",
            "title"
        ]
    );

    let r = app
        .post(
            "/v1/contacts",
            &json!({"given_name": "Ada", "email": null, "custom": {"k": null}}),
        )
        .await;
    let v = expect_error(r, 422, "validation_failed", "nulls on create").await;
    assert_eq!(fields(&v), ["custom.k", "email"]);
    let r = app.post("/v1/contacts", &json!({})).await;
    expect_error(r, 422, "validation_failed", "empty contact").await;
    let r = app
        .post(
            "/v1/contacts",
            &json!({"given_name": "Ada", "expected_version": 1}),
        )
        .await;
    let v = expect_error(r, 422, "validation_failed", "expected_version on create").await;
    assert_eq!(fields(&v), ["expected_version"]);
    let r = app.post("/v1/contacts", &json!({"address": {}})).await;
    let v = expect_error(r, 422, "validation_failed", "empty address").await;
    assert_eq!(fields(&v), ["address"]);
    assert_eq!(contact_events(&app).await, before, "nothing was written");

    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let path = format!("/v1/contacts/{id}");
    let r = app
        .patch(
            &path,
            &json!({"email": "a@b", "phone": "+1", "address": {"country": "1X"}, "given_name": "Ok"}),
        )
        .await;
    let v = expect_error(r, 422, "validation_failed", "bad patch").await;
    assert_eq!(fields(&v), ["address.country", "email", "phone"]);
    let r = app.patch(&path, &json!({})).await;
    expect_error(r, 422, "validation_failed", "empty patch").await;
    let r = app
        .patch(&path, &json!({"title": "x", "expected_version": 0}))
        .await;
    let v = expect_error(r, 422, "validation_failed", "expected_version 0").await;
    assert_eq!(fields(&v), ["expected_version"]);
    // The good part of a rejected patch was not applied either.
    let h: Value = app
        .get(&format!("{path}/history"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(h["events"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn bad_ids_are_400_and_unknown_ones_404() {
    let app = TestApp::spawn().await;
    let body = Some("application/json");
    for raw in ["not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g"] {
        for (method, path) in [
            (Method::GET, format!("/v1/contacts/{raw}")),
            (Method::PATCH, format!("/v1/contacts/{raw}")),
            (Method::POST, format!("/v1/contacts/{raw}/archive")),
            (Method::GET, format!("/v1/contacts/{raw}/history")),
            (
                Method::GET,
                format!("/v1/contacts/{raw}?as_of=2024-01-01T00:00:00Z"),
            ),
        ] {
            let what = format!("{method} {path}");
            let r = send_raw(&app, method, &path, body, "{\"title\": \"x\"}").await;
            let v = expect_error(r, 400, "invalid_id", &what).await;
            assert!(v["message"].as_str().unwrap().contains(raw), "{v}");
        }
    }
    let ghost = Uuid::now_v7();
    for (method, path) in [
        (Method::GET, format!("/v1/contacts/{ghost}")),
        (Method::PATCH, format!("/v1/contacts/{ghost}")),
        (Method::POST, format!("/v1/contacts/{ghost}/archive")),
        (Method::GET, format!("/v1/contacts/{ghost}/history")),
    ] {
        let what = format!("{method} {path}");
        let r = send_raw(&app, method, &path, body, "{\"title\": \"x\"}").await;
        expect_error(r, 404, "not_found", &what).await;
    }
    let r = app.get("/v1/no-such-thing").await;
    expect_error(r, 404, "not_found", "unknown route").await;
    app.stop().await;
}

#[tokio::test]
async fn bad_query_parameters_are_400_invalid_query() {
    let app = TestApp::spawn().await;
    let (id, pos) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let list = [
        "limit=0",
        "limit=501",
        "limit=-3",
        "limit=ten",
        "limit=3&limit=4",
        "after=not-a-uuid",
        "archived=maybe",
        "updated_since=yesterday",
        "min_position=0",
        "min_position=abc",
        "wait_ms=-1",
        "shoe_size=9",
        "as_of=2024-01-01T00:00:00Z",
    ];
    for q in list {
        let r = app.get(&format!("/v1/contacts?{q}")).await;
        expect_error(r, 400, "invalid_query", &format!("list ?{q}")).await;
    }
    for q in [
        "as_of=yesterday",
        "as_of=2024-13-01T00:00:00Z",
        "as_of=1700000000",
        "min_position=-5",
        "wait_ms=soon",
        "limit=10",
        "verbose=true",
    ] {
        let r = app.get(&format!("/v1/contacts/{id}?{q}")).await;
        expect_error(r, 400, "invalid_query", &format!("get ?{q}")).await;
    }
    for q in [
        "limit=0",
        "limit=1000",
        "before=latest",
        "since=yesterday",
        "until=tomorrow",
        "min_position=0",
        "entity=contact",
        "after=5",
    ] {
        let r = app.get(&format!("/v1/activity?{q}")).await;
        expect_error(r, 400, "invalid_query", &format!("activity ?{q}")).await;
    }
    // The unknown parameter is named.
    let v = expect_error(
        app.get("/v1/contacts?shoe_size=9").await,
        400,
        "invalid_query",
        "named",
    )
    .await;
    assert!(v["message"].as_str().unwrap().contains("shoe_size"), "{v}");
    // Control: the same routes with good parameters work.
    for path in [
        format!("/v1/contacts?limit=500&archived=any&min_position={pos}"),
        format!("/v1/contacts/{id}?min_position={pos}&wait_ms=100"),
        format!("/v1/activity?limit=1&min_position={pos}"),
    ] {
        assert_eq!(app.get(&path).await.status(), 200, "{path}");
    }
    app.stop().await;
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn missing_and_invalid_tokens_are_401() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let before = contact_events(&app).await;
    let secret = app.settings.jwt.secret.expose_secret().to_owned();
    let claims = |exp: u64, aud: &str, iss: &str, typ: &str| {
        json!({
            "sub": app.user_id.to_string(), "org": app.org_id.to_string(), "typ": typ,
            "iat": now() - 30, "exp": exp, "jti": Uuid::now_v7().to_string(),
            "aud": aud, "iss": iss, "gen": 0
        })
    };
    let sign_with = |alg: Algorithm, c: &Value, key: &str| {
        encode(
            &Header::new(alg),
            c,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let good = claims(now() + 600, "crm-api", "crm", "staff");
    let sign = |c: &Value| sign_with(Algorithm::HS256, c, &secret);

    // Control: a token built the same way, correctly, is accepted.
    let control = sign(&good);
    let r = app
        .http
        .get(app.url("/v1/contacts"))
        .bearer_auth(&control)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "control token");

    let unsigned = format!(
        "{}.{}.",
        B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64URL.encode(good.to_string())
    );
    let tampered = {
        // Claims of another organisation pasted onto a good signature.
        let parts: Vec<&str> = control.split('.').collect();
        let mut c = good.clone();
        c["org"] = json!(Uuid::now_v7().to_string());
        format!("{}.{}.{}", parts[0], B64URL.encode(c.to_string()), parts[2])
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("empty bearer", Some("Bearer ".into())),
        ("scheme only", Some("Bearer".into())),
        ("basic auth", Some("Basic dXNlcjpwYXNzd29yZA==".into())),
        ("token without scheme", Some(control.clone())),
        ("garbage", Some("Bearer garbage".into())),
        ("three garbage parts", Some("Bearer a.b.c".into())),
        (
            "another secret",
            Some(format!(
                "Bearer {}",
                sign_with(
                    Algorithm::HS256,
                    &good,
                    "another-secret-that-is-long-enough-0123456789"
                )
            )),
        ),
        ("alg none", Some(format!("Bearer {unsigned}"))),
        (
            "alg none with a signature",
            Some(format!(
                "Bearer {unsigned}{}",
                control.split('.').nth(2).unwrap()
            )),
        ),
        ("tampered claims", Some(format!("Bearer {tampered}"))),
        (
            "HS512",
            Some(format!(
                "Bearer {}",
                sign_with(Algorithm::HS512, &good, &secret)
            )),
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                sign(&claims(now() - 120, "crm-api", "crm", "staff"))
            )),
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                sign(&claims(now() + 600, "portal-api", "crm", "staff"))
            )),
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                sign(&claims(now() + 600, "crm-api", "someone-else", "staff"))
            )),
        ),
        (
            "wrong typ",
            Some(format!(
                "Bearer {}",
                sign(&claims(now() + 600, "crm-api", "crm", "portal"))
            )),
        ),
        (
            "no exp",
            Some(format!("Bearer {}", {
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("exp");
                sign(&c)
            })),
        ),
        (
            "subject not a uuid",
            Some(format!("Bearer {}", {
                let mut c = good.clone();
                c["sub"] = json!("root");
                sign(&c)
            })),
        ),
    ];
    let routes = [
        (Method::GET, "/v1/contacts".to_owned()),
        (Method::POST, "/v1/contacts".to_owned()),
        (Method::GET, format!("/v1/contacts/{id}")),
        (Method::PATCH, format!("/v1/contacts/{id}")),
        (Method::POST, format!("/v1/contacts/{id}/archive")),
        (Method::GET, format!("/v1/contacts/{id}/history")),
        (Method::GET, "/v1/activity".to_owned()),
    ];
    for (name, auth) in &cases {
        for (method, path) in &routes {
            let mut rb = app
                .http
                .request(method.clone(), app.url(path))
                .json(&json!({"title": "Mallory"}));
            if let Some(a) = auth {
                rb = rb.header("authorization", a);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(
                r.headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{name}: {method} {path}"
            );
            expect_error(r, 401, "unauthorized", &format!("{name}: {method} {path}")).await;
        }
    }
    // Authentication comes before the body is looked at.
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "unauthorized", "no token and bad JSON").await;
    assert_eq!(contact_events(&app).await, before, "nothing was written");
    app.stop().await;
}

#[tokio::test]
async fn odd_headers_and_methods_are_4xx_not_500() {
    let app = TestApp::spawn().await;
    // A header value that is not valid UTF-8.
    let r = app
        .http
        .get(app.url("/v1/contacts"))
        .header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        )
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert!(r.headers().contains_key("x-request-id"));
    let v: Value = r.json().await.unwrap();
    assert!(
        [400, 401].contains(&status),
        "a bad Authorization header is a bad request, not {status}: {v}"
    );
    assert!(v["code"].is_string(), "{v}");

    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    for (method, path) in [
        (Method::DELETE, format!("/v1/contacts/{id}")),
        (Method::PUT, "/v1/contacts".to_owned()),
        (Method::POST, "/v1/activity".to_owned()),
    ] {
        let r = app
            .http
            .request(method.clone(), app.url(&path))
            .bearer_auth(&app.token)
            .send()
            .await
            .unwrap();
        let what = format!("{method} {path}");
        expect_error(r, 405, "method_not_allowed", &what).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_client_request_id_is_kept_on_errors() {
    let app = TestApp::spawn().await;
    let send = |rb: reqwest::RequestBuilder| {
        rb.header("x-request-id", "client-req-42")
            .header("content-type", "application/json")
            .send()
    };
    let big = format!("{{\"title\": \"{}\"}}", "x".repeat(70 * 1024));
    for (what, rb) in [
        ("unauthorized", app.http.get(app.url("/v1/contacts"))),
        (
            "invalid_json",
            app.http
                .post(app.url("/v1/contacts"))
                .bearer_auth(&app.token)
                .body("{"),
        ),
        (
            "invalid_query",
            app.http
                .get(app.url("/v1/contacts?limit=0"))
                .bearer_auth(&app.token),
        ),
        (
            "payload_too_large",
            app.http
                .post(app.url("/v1/contacts"))
                .bearer_auth(&app.token)
                .body(big.clone()),
        ),
    ] {
        let r = send(rb).await.unwrap();
        let v = expect_error(r, r_status(what), what, what).await;
        assert_eq!(v["request_id"], "client-req-42", "{what}");
    }
    app.stop().await;
}

fn r_status(code: &str) -> u16 {
    match code {
        "unauthorized" => 401,
        "payload_too_large" => 413,
        _ => 400,
    }
}

/// A NUL (or another control character) in free text is refused at the edge: stored, it
/// would be an event no read model can hold (PostgreSQL's jsonb has no NUL), stopping
/// the projection for everyone. Line breaks and tabs are text.
#[tokio::test]
async fn control_characters_in_custom_text_are_422_and_line_breaks_are_kept() {
    let app = TestApp::spawn().await;
    let before = contact_events(&app).await;
    let r = app
        .post(
            "/v1/contacts",
            &json!({"given_name": "Nul", "custom": {"note": "a\u{0000}b"}}),
        )
        .await;
    let v = expect_error(r, 422, "validation_failed", "NUL in a custom value").await;
    assert_eq!(v["fields"][0]["field"], "custom.note", "{v}");
    let (id, _) = app.create_contact(&json!({"given_name": "Ok"})).await;
    let r = app
        .patch(
            &format!("/v1/contacts/{id}"),
            &json!({"custom": {"note": "esc\u{001b}[31m"}}),
        )
        .await;
    expect_error(r, 422, "validation_failed", "ESC in a custom value").await;
    assert_eq!(
        contact_events(&app).await,
        before + 1,
        "only the valid create"
    );

    // Multi-line text is accepted and reaches the read model (the projection runs).
    let r = app
        .patch(
            &format!("/v1/contacts/{id}"),
            &json!({"custom": {"note": "line one\nline two\tend"}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let pos = r.json::<Value>().await.unwrap()["positions"][0]
        .as_i64()
        .unwrap();
    let got: Value = app
        .get(&format!("/v1/contacts/{id}?min_position={pos}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["custom"]["note"], "line one\nline two\tend", "{got}");
    app.stop().await;
}
