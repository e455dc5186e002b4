//! The client portal: access given by staff, magic links and password resets by mail
//! (single-use, expiring), portal tokens refused by staff routes and staff tokens by
//! portal routes, the contact's own record only, its own CORS policy; and the
//! enumeration suite: unknown and known addresses answer alike.

use std::time::{Duration, Instant};

use crm_tests::harness::{eventually, Options, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

async fn post(app: &TestApp, token: Option<&str>, path: &str, body: Value) -> (u16, Value) {
    let mut rb = app.http.post(app.url(path)).json(&body);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    let s = r.status().as_u16();
    let mut v: Value = r.json().await.unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("request_id");
    }
    (s, v)
}

async fn get(app: &TestApp, token: &str, path: &str) -> (u16, Value) {
    let r = app
        .http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn portal_on(app: &TestApp) {
    let r = app
        .http
        .put(app.url("/v1/organization/modules"))
        .bearer_auth(&app.token)
        .json(&json!({"modules": ["contacts", "activity", "reports", "portal"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The token in the last mail to `to` (links end in `#token=…`).
async fn mailed_token(app: &TestApp, to: &str, count: usize) -> String {
    let mail = eventually(Duration::from_secs(5), || async {
        let sent: Vec<_> = app
            .state
            .mailer
            .sent()
            .into_iter()
            .filter(|m| m.to == to)
            .collect();
        (sent.len() >= count).then(|| sent[count - 1].clone())
    })
    .await
    .unwrap_or_else(|| panic!("no mail #{count} to {to}"));
    mail.body
        .split("#token=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_contact_signs_in_and_sees_only_its_own_record() {
    let app = TestApp::spawn().await;
    let email = format!("{}@client.example.com", Uuid::new_v4().simple());
    let (contact, created_at) = app
        .create_contact(&json!({"given_name": "Cleo", "email": email}))
        .await;
    let (other, _) = app.create_contact(&json!({"given_name": "Other"})).await;
    let grant = format!("/v1/contacts/{contact}/portal-access");
    let (s, body) = post(&app, Some(&app.token), &grant, json!({})).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("module_inactive")),
        "{body}"
    );
    portal_on(&app).await;
    let (s, body) = post(&app, Some(&app.token), &grant, json!({})).await;
    assert_eq!(s, 200, "{body}");

    // Magic link: mailed, works once.
    let (s, _) = post(
        &app,
        None,
        "/portal/auth/magic-link",
        json!({"org_id": app.org_id, "email": email}),
    )
    .await;
    assert_eq!(s, 202);
    let link = mailed_token(&app, &email, 1).await;
    let (s, body) = post(
        &app,
        None,
        "/portal/auth/magic-link/redeem",
        json!({"token": link}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let portal = body["access_token"].as_str().unwrap().to_owned();
    let (s, _) = post(
        &app,
        None,
        "/portal/auth/magic-link/redeem",
        json!({"token": link}),
    )
    .await;
    assert_eq!(s, 401, "a magic link is single-use");

    // The portal reads the read model: let it have the contact first.
    let (s, _) = get(
        &app,
        &app.token,
        &format!("/v1/contacts/{contact}?min_position={created_at}&wait_ms=5000"),
    )
    .await;
    assert_eq!(s, 200);
    let (s, me) = get(&app, &portal, "/portal/me").await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["id"], json!(contact));
    assert_eq!(me["given_name"], "Cleo");
    // A portal token on staff routes, a staff token on portal routes: refused.
    for path in [
        "/v1/contacts",
        &format!("/v1/contacts/{contact}"),
        &format!("/v1/contacts/{other}"),
        "/v1/me",
    ] {
        assert_eq!(
            get(&app, &portal, path).await.0,
            401,
            "portal token on {path}"
        );
    }
    assert_eq!(
        get(&app, &app.token, "/portal/me").await.0,
        401,
        "staff token on the portal"
    );

    // Password reset by mail; then a password login.
    let (s, _) = post(
        &app,
        None,
        "/portal/auth/password-reset",
        json!({"org_id": app.org_id, "email": email}),
    )
    .await;
    assert_eq!(s, 202);
    let reset = mailed_token(&app, &email, 2).await;
    let (s, body) = post(
        &app,
        None,
        "/portal/auth/password-reset/confirm",
        json!({"token": reset, "new_password": "short"}),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    let (s, body) = post(
        &app,
        None,
        "/portal/auth/password-reset/confirm",
        json!({"token": reset, "new_password": "a portal password"}),
    )
    .await;
    assert_eq!(s, 200, "a weak password does not use the token up: {body}");
    let (s, _) = post(
        &app,
        None,
        "/portal/auth/password-reset/confirm",
        json!({"token": reset, "new_password": "another portal password"}),
    )
    .await;
    assert_eq!(s, 401, "a reset link is single-use");
    assert_eq!(
        get(&app, &portal, "/portal/me").await.0,
        401,
        "setting a password ends sessions"
    );
    let (s, body) = post(
        &app,
        None,
        "/portal/auth/login",
        json!({"org_id": app.org_id, "email": email, "password": "a portal password"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let portal = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(get(&app, &portal, "/portal/me").await.0, 200);

    // Logout ends the token; revoked access ends login.
    let (s, _) = post(&app, Some(&portal), "/portal/auth/logout", json!({})).await;
    assert_eq!(s, 204);
    assert_eq!(get(&app, &portal, "/portal/me").await.0, 401);
    let (s, _) = post(
        &app,
        Some(&app.token),
        &format!("{grant}/revoke"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = post(
        &app,
        None,
        "/portal/auth/login",
        json!({"org_id": app.org_id, "email": email, "password": "a portal password"}),
    )
    .await;
    assert_eq!(s, 401);
    // Every change is an event with its actor.
    let rows = app
        .db()
        .await
        .query(
            "SELECT event_type, metadata -> 'principal' ->> 'kind' FROM events \
                WHERE aggregate_type = 'portal_account' ORDER BY global_position",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        seen,
        [
            ("PortalAccessGranted".into(), "user".into()),
            ("PortalPasswordSet".into(), "portal".into()),
            ("PortalSignedOut".into(), "portal".into()),
            ("PortalAccessRevoked".into(), "user".into()),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn links_expire() {
    let app = TestApp::spawn().await;
    portal_on(&app).await;
    let email = format!("{}@client.example.com", Uuid::new_v4().simple());
    let (contact, _) = app.create_contact(&json!({"email": email})).await;
    let (s, _) = post(
        &app,
        Some(&app.token),
        &format!("/v1/contacts/{contact}/portal-access"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    post(
        &app,
        None,
        "/portal/auth/magic-link",
        json!({"org_id": app.org_id, "email": email}),
    )
    .await;
    let link = mailed_token(&app, &email, 1).await;
    let db = app.db().await;
    let hours: f64 = db
        .query_one(
            "SELECT (extract(epoch FROM expires_at - now()) / 3600)::float8 FROM auth_tokens",
            &[],
        )
        .await
        .unwrap()
        .get::<_, f64>(0);
    assert!(
        (23.9..=24.0).contains(&hours),
        "magic links live 24 h: {hours}"
    );
    db.execute(
        "UPDATE auth_tokens SET expires_at = now() - interval '1 second'",
        &[],
    )
    .await
    .unwrap();
    let (s, _) = post(
        &app,
        None,
        "/portal/auth/magic-link/redeem",
        json!({"token": link}),
    )
    .await;
    assert_eq!(s, 401, "expired");
    // A day after expiry the digest is deleted (serve does this every minute).
    db.execute(
        "UPDATE auth_tokens SET expires_at = now() - interval '25 hours'",
        &[],
    )
    .await
    .unwrap();
    let client = app.state.pool.get().await.unwrap();
    assert_eq!(
        crm_infra::access::auth_tokens::purge(&client)
            .await
            .unwrap(),
        1
    );
    app.stop().await;
}

#[tokio::test]
async fn a_staff_password_reset_does_not_bypass_2fa() {
    let app = TestApp::spawn().await;
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let (s, _) = post(&app, Some(&app.token), "/v1/users", json!({
        "email": email, "display_name": "Rae", "role": "team", "password": "the first long password"})).await;
    assert_eq!(s, 201);
    // 2FA on (the seed and state written as the enable route would).
    app.db()
        .await
        .execute(
            "UPDATE credentials SET totp_enabled = true WHERE email_lower = $1",
            &[&email],
        )
        .await
        .unwrap();
    let (s, _) = post(
        &app,
        None,
        "/v1/auth/password-reset",
        json!({"email": email}),
    )
    .await;
    assert_eq!(s, 202);
    let token = mailed_token(&app, &email, 1).await;
    let hours: f64 = app
        .db()
        .await
        .query_one(
            "SELECT (extract(epoch FROM expires_at - now()) / 3600)::float8 FROM auth_tokens",
            &[],
        )
        .await
        .unwrap()
        .get::<_, f64>(0);
    assert!((1.9..=2.0).contains(&hours), "resets live 2 h: {hours}");
    let (s, body) = post(
        &app,
        None,
        "/v1/auth/password-reset/confirm",
        json!({"token": token, "new_password": "the second long password"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body.get("access_token").is_none(),
        "a reset does not sign in"
    );
    let (s, body) = post(
        &app,
        None,
        "/v1/auth/login",
        json!({"email": email, "password": "the second long password"}),
    )
    .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("two_factor_required")),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn portal_routes_have_their_own_cors_policy() {
    let app = TestApp::spawn_with(Options {
        cors_origins: vec!["https://app.example.com".into()],
        portal_cors_origins: vec!["https://portal.example.com".into()],
        ..Options::default()
    })
    .await;
    let preflight = |path: &'static str, origin: &'static str| {
        let app = &app;
        async move {
            app.http
                .request(reqwest::Method::OPTIONS, app.url(path))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        preflight("/portal/auth/login", "https://portal.example.com").await,
        204
    );
    assert_eq!(
        preflight("/portal/auth/login", "https://app.example.com").await,
        403
    );
    assert_eq!(
        preflight("/v1/contacts", "https://portal.example.com").await,
        403
    );
    assert_eq!(
        preflight("/v1/contacts", "https://app.example.com").await,
        204
    );
    app.stop().await;
}

/// Status and body of a request, the request id removed.
async fn anonymous(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    post(app, None, path, body).await
}

#[tokio::test]
async fn unknown_and_known_addresses_answer_alike() {
    let app = TestApp::spawn().await;
    portal_on(&app).await;
    let staff = format!("{}@example.com", Uuid::new_v4().simple());
    let (s, _) = post(&app, Some(&app.token), "/v1/users", json!({
        "email": staff, "display_name": "Kim", "role": "team", "password": "the real long password"})).await;
    assert_eq!(s, 201);
    let client = format!("{}@client.example.com", Uuid::new_v4().simple());
    let (contact, _) = app.create_contact(&json!({"email": client})).await;
    let (s, _) = post(
        &app,
        Some(&app.token),
        &format!("/v1/contacts/{contact}/portal-access"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    let nobody = format!("{}@nowhere.example.com", Uuid::new_v4().simple());
    let org = app.org_id;
    let cases: Vec<(&str, Value, Value)> = vec![
        (
            "/v1/auth/login",
            json!({"email": staff, "password": "a wrong long password"}),
            json!({"email": nobody, "password": "a wrong long password"}),
        ),
        (
            "/v1/auth/password-reset",
            json!({"email": staff}),
            json!({"email": nobody}),
        ),
        (
            "/portal/auth/login",
            json!({"org_id": org, "email": client, "password": "a wrong long password"}),
            json!({"org_id": org, "email": nobody, "password": "a wrong long password"}),
        ),
        (
            "/portal/auth/magic-link",
            json!({"org_id": org, "email": client}),
            json!({"org_id": org, "email": nobody}),
        ),
        (
            "/portal/auth/password-reset",
            json!({"org_id": org, "email": client}),
            json!({"org_id": org, "email": nobody}),
        ),
    ];
    for (path, known, unknown) in &cases {
        let a = anonymous(&app, path, known.clone()).await;
        let b = anonymous(&app, path, unknown.clone()).await;
        assert_eq!(a, b, "{path}: a known and an unknown address answer alike");
        assert!(matches!(a.0, 202 | 401), "{path}: {a:?}");
    }
    // The known ones did get mail; the unknown one none.
    mailed_token(&app, &staff, 1).await;
    mailed_token(&app, &client, 2).await;
    assert!(app.state.mailer.sent().iter().all(|m| m.to != nobody));

    // Logins: both run one bcrypt check, so neither is measurably faster. Medians of
    // alternating runs; bcrypt (hundreds of ms) dwarfs the noise this allows.
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..5 {
        for (i, body) in [&cases[0].1, &cases[0].2].into_iter().enumerate() {
            let t = Instant::now();
            anonymous(&app, "/v1/auth/login", body.clone()).await;
            times[i].push(t.elapsed());
        }
    }
    for t in &mut times {
        t.sort();
    }
    let (known, unknown) = (times[0][2].as_secs_f64(), times[1][2].as_secs_f64());
    let ratio = unknown / known;
    assert!(
        (0.5..2.0).contains(&ratio),
        "known {known:.3}s vs unknown {unknown:.3}s"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_signed_in_contact_downloads_its_data_and_asks_for_erasure() {
    let app = TestApp::spawn().await;
    portal_on(&app).await;
    let email = format!("{}@client.example.com", Uuid::new_v4().simple());
    let (contact, _) = app
        .create_contact(&json!({"given_name": "Dora", "email": email}))
        .await;
    let (s, _) = post(
        &app,
        Some(&app.token),
        &format!("/v1/contacts/{contact}/portal-access"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = post(
        &app,
        None,
        "/portal/auth/magic-link",
        json!({"org_id": app.org_id, "email": email}),
    )
    .await;
    assert_eq!(s, 202);
    let link = mailed_token(&app, &email, 1).await;
    let (_, body) = post(
        &app,
        None,
        "/portal/auth/magic-link/redeem",
        json!({"token": link}),
    )
    .await;
    let portal = body["access_token"].as_str().unwrap().to_owned();

    // Its own copy, every field, recorded as an export by the contact itself.
    let (s, doc) = get(&app, &portal, "/portal/export").await;
    assert_eq!(s, 200, "{doc}");
    assert_eq!(
        (
            doc["schema"].as_str(),
            doc["contact"]["given_name"].as_str()
        ),
        (Some("crm.contact-export.v1"), Some("Dora"))
    );
    let by: Value = app
        .db()
        .await
        .query_one(
            "SELECT metadata -> 'principal' FROM events WHERE event_type = 'ContactExported'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by, json!({"kind": "portal", "id": contact.to_string()}));

    // Asking for erasure sends the confirmation link; nothing is erased yet.
    let (s, v) = post(&app, Some(&portal), "/portal/erase", json!({})).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (202, Some("confirmation_sent")),
        "{v}"
    );
    let queued: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'MessageQueued' \
             AND payload -> 'MessageQueued' ->> 'purpose' = 'data_subject_request'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 1);
    let erased: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'ContactErased'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(erased, 0);
    app.stop().await;
}
