//! Bad input and bad credentials: always a clean 4xx with the JSON error shape.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use crm_tests::harness::{create_user, TestApp};
use jsonwebtoken::{encode, EncodingKey, Header};
use secrecy::ExposeSecret;
use serde_json::{json, Value};

/// Asserts a JSON error with `code` and a request id, and returns the body.
async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "expected {status} {code}");
    assert!(
        r.headers().contains_key("x-request-id"),
        "x-request-id header"
    );
    let v: Value = r.json().await.expect("a JSON error body");
    assert_eq!(v["code"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(v["request_id"].is_string());
    v
}

#[tokio::test]
async fn malformed_bodies_are_4xx_naming_the_problem() {
    let app = TestApp::spawn().await;
    let post_raw = |body: &'static str, ct: Option<&'static str>| {
        let mut rb = app
            .http
            .post(app.url("/v1/contacts"))
            .bearer_auth(&app.token)
            .body(body);
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        rb.send()
    };
    expect_error(
        post_raw("{\"given_name\": ", Some("application/json"))
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    expect_error(
        post_raw("", Some("application/json")).await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    let v = expect_error(
        post_raw("{\"email\": 123}", Some("application/json"))
            .await
            .unwrap(),
        400,
        "invalid_body",
    )
    .await;
    assert!(
        v["message"].as_str().unwrap().contains("invalid type"),
        "{v}"
    );
    let v = expect_error(
        post_raw(
            "{\"given_name\": \"A\", \"shoe_size\": 9}",
            Some("application/json"),
        )
        .await
        .unwrap(),
        400,
        "invalid_body",
    )
    .await;
    assert!(v["message"].as_str().unwrap().contains("shoe_size"), "{v}");
    expect_error(
        post_raw("{\"given_name\": \"A\"}", None).await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    expect_error(
        post_raw("given_name=A", Some("application/x-www-form-urlencoded"))
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    let big = json!({"given_name": "A", "custom": {"note": "x".repeat(70 * 1024)}});
    expect_error(
        app.post("/v1/contacts", &big).await,
        413,
        "payload_too_large",
    )
    .await;
    // Nothing was written by any of these.
    let n: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_type = 'contact'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    app.stop().await;
}

#[tokio::test]
async fn invalid_values_name_every_bad_field() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/contacts",
            &json!({
                "given_name": "  ",
                "email": "not-an-email",
                "phone": "0123",
                "address": {"country": "Narnia"},
                "custom": {"Bad-Key": 1, "nested": {"a": 1}}
            }),
        )
        .await;
    let v = expect_error(r, 422, "validation_failed").await;
    let mut fields: Vec<String> = v["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap().to_owned())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "address.country",
            "custom.Bad-Key",
            "custom.nested",
            "email",
            "given_name",
            "phone"
        ]
    );
    let r = app.post("/v1/contacts", &json!({})).await;
    expect_error(r, 422, "validation_failed").await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let r = app.patch(&format!("/v1/contacts/{id}"), &json!({})).await;
    expect_error(r, 422, "validation_failed").await;
    let r = app
        .patch(
            &format!("/v1/contacts/{id}"),
            &json!({"expected_version": 0, "title": "x"}),
        )
        .await;
    expect_error(r, 422, "validation_failed").await;
    app.stop().await;
}

#[tokio::test]
async fn bad_ids_and_queries_are_400() {
    let app = TestApp::spawn().await;
    expect_error(app.get("/v1/contacts/not-a-uuid").await, 400, "invalid_id").await;
    expect_error(
        app.patch("/v1/contacts/123", &json!({"title": "x"})).await,
        400,
        "invalid_id",
    )
    .await;
    expect_error(app.get("/v1/contacts/zzz/history").await, 400, "invalid_id").await;
    for q in [
        "limit=0",
        "limit=abc",
        "after=nope",
        "archived=maybe",
        "shoe=9",
        "min_position=-1",
        "updated_since=yesterday",
    ] {
        expect_error(
            app.get(&format!("/v1/contacts?{q}")).await,
            400,
            "invalid_query",
        )
        .await;
    }
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    expect_error(
        app.get(&format!("/v1/contacts/{id}?as_of=yesterday")).await,
        400,
        "invalid_query",
    )
    .await;
    expect_error(
        app.get("/v1/activity?since=soon").await,
        400,
        "invalid_query",
    )
    .await;
    // An operation that takes no parameters refuses any, naming the first: a client's
    // `?limit=` there is a mistake to report, not to ignore.
    for path in [
        "/v1/me?verbose=1".to_owned(),
        format!("/v1/contacts/{id}/archive?now=1"),
        "/healthz?probe=1".to_owned(),
    ] {
        let r = if path.contains("archive") {
            app.http
                .post(app.url(&path))
                .bearer_auth(&app.token)
                .send()
                .await
                .unwrap()
        } else {
            app.get(&path).await
        };
        let v = expect_error(r, 400, "invalid_query").await;
        let name = path.split('?').nth(1).unwrap().split('=').next().unwrap();
        assert_eq!(v["fields"][0]["field"], name, "{path}: {v}");
    }
    expect_error(
        app.get("/v1/contacts?min_position=999999").await,
        400,
        "unknown_position",
    )
    .await;
    expect_error(
        app.get(&format!("/v1/contacts/{}", uuid::Uuid::now_v7()))
            .await,
        404,
        "not_found",
    )
    .await;
    expect_error(app.get("/v1/nothing-here").await, 404, "not_found").await;
    let r = app
        .http
        .delete(app.url(&format!("/v1/contacts/{id}")))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    app.stop().await;
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn missing_forged_expired_and_unsigned_tokens_are_401() {
    let app = TestApp::spawn().await;
    let secret = app.settings.jwt.secret.expose_secret().to_owned();
    let claims = |exp: u64, aud: &str, typ: &str| {
        json!({"sub": app.user_id.to_string(), "org": app.org_id.to_string(), "typ": typ,
               "iat": now() - 10, "exp": exp, "jti": "x", "aud": aud, "iss": "crm", "gen": 0})
    };
    let sign = |c: &Value, key: &str| {
        encode(
            &Header::default(),
            c,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let valid = sign(&claims(now() + 600, "crm-api", "staff"), &secret);
    let get = |auth: Option<String>| {
        let mut rb = app.http.get(app.url("/v1/contacts"));
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        rb.send()
    };
    assert_eq!(
        get(Some(format!("Bearer {valid}"))).await.unwrap().status(),
        200,
        "control: a good token works"
    );
    let unsigned = format!(
        "{}.{}.",
        B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64URL.encode(claims(now() + 600, "crm-api", "staff").to_string())
    );
    let hs512 = encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &claims(now() + 600, "crm-api", "staff"),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let cases = [
        None,
        Some("Bearer".to_owned()),
        Some("Basic dXNlcjpwYXNz".to_owned()),
        Some("Bearer garbage".to_owned()),
        Some(format!(
            "Bearer {}",
            sign(
                &claims(now() + 600, "crm-api", "staff"),
                "another-secret-of-32-bytes-or-more!!"
            )
        )),
        Some(format!(
            "Bearer {}",
            sign(&claims(now() - 120, "crm-api", "staff"), &secret)
        )),
        Some(format!(
            "Bearer {}",
            sign(&claims(now() + 600, "elsewhere", "staff"), &secret)
        )),
        Some(format!(
            "Bearer {}",
            sign(&claims(now() + 600, "crm-api", "portal"), &secret)
        )),
        Some(format!("Bearer {unsigned}")),
        Some(format!("Bearer {hs512}")),
    ];
    for (i, auth) in cases.into_iter().enumerate() {
        let r = get(auth).await.unwrap();
        assert_eq!(
            r.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "case {i}"
        );
        expect_error(r, 401, "unauthorized").await;
    }
    // Writes are refused the same way, and nothing is written.
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .json(&json!({"given_name": "A"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "unauthorized").await;
    app.stop().await;
}

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.http
        .post(app.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn login_issues_a_working_token_and_reveals_nothing_about_unknown_emails() {
    let app = TestApp::spawn().await;
    let prefix = "p".repeat(72);
    let password = format!("{prefix}-right");
    let hash = crm_api::auth::hash_password(&password).unwrap();
    create_user(&app.state, app.org_id, "staff@login.example.com", &hash).await;

    let r = login(&app, "Staff@Login.example.com", &password).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_type"], "Bearer");
    let token = v["access_token"].as_str().unwrap();
    let r = app
        .http
        .get(app.url("/v1/contacts"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The same first 72 bytes are not enough.
    let wrong_tail = login(&app, "staff@login.example.com", &format!("{prefix}-wrong")).await;
    let unknown = login(&app, "nobody@login.example.com", &password).await;
    let (s1, s2) = (wrong_tail.status(), unknown.status());
    let mut b1: Value = wrong_tail.json().await.unwrap();
    let mut b2: Value = unknown.json().await.unwrap();
    assert_eq!((s1.as_u16(), s2.as_u16()), (401, 401));
    b1["request_id"] = Value::Null;
    b2["request_id"] = Value::Null;
    assert_eq!(b1, b2, "unknown and known emails answer alike");
    let r = app
        .http
        .post(app.url("/v1/auth/login"))
        .json(&json!({"email": "x"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_body").await;
    app.stop().await;
}
