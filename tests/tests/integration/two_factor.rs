//! TOTP two-factor authentication over HTTP, with codes computed here independently of
//! the service (HMAC-SHA1 per RFC 6238/4226), reuse refused, backup codes single-use,
//! and an organisation's requirement for Owners and Admins.

use std::time::{SystemTime, UNIX_EPOCH};

use crm_tests::harness::TestApp;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use uuid::Uuid;

/// RFC 4648 base32 (no padding), as authenticator apps read the seed.
fn base32_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut bits, mut acc, mut out) = (0u32, 0u64, Vec::new());
    for c in s.trim_end_matches('=').bytes() {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base32") as u64;
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// RFC 6238 TOTP: HOTP (RFC 4226 dynamic truncation) of the 30 s step counter.
fn totp(secret: &[u8], step: u64, digits: u32) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).unwrap();
    mac.update(&step.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = (h[19] & 0x0f) as usize;
    let bin =
        u32::from_be_bytes([h[offset], h[offset + 1], h[offset + 2], h[offset + 3]]) & 0x7fff_ffff;
    format!(
        "{:0width$}",
        bin % 10u32.pow(digits),
        width = digits as usize
    )
}

#[test]
fn the_independent_totp_matches_rfc_6238() {
    let secret = b"12345678901234567890";
    assert_eq!(totp(secret, 59 / 30, 8), "94287082");
    assert_eq!(totp(secret, 1111111109 / 30, 8), "07081804");
    assert_eq!(totp(secret, 20000000000 / 30, 8), "65353130");
}

fn step_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30
}

async fn post(app: &TestApp, token: Option<&str>, path: &str, body: Value) -> (u16, Value) {
    let mut rb = app.http.post(app.url(path)).json(&body);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// A user with a real password, created over HTTP by the Owner; logs in.
async fn user(app: &TestApp, role: &str) -> (String, String, String) {
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let password = "a long enough password".to_owned();
    let (s, body) = post(
        app,
        Some(&app.token),
        "/v1/users",
        json!({"email": email, "display_name": "Tess", "role": role, "password": password}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = post(
        app,
        None,
        "/v1/auth/login",
        json!({"email": email, "password": password}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    (
        email,
        password,
        body["access_token"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn totp_codes_work_once_and_backup_codes_once() {
    let app = TestApp::spawn().await;
    let (email, password, token) = user(&app, "team").await;
    let (s, setup) = post(&app, Some(&token), "/v1/auth/2fa/setup", json!({})).await;
    assert_eq!(s, 200, "{setup}");
    let secret = base32_decode(setup["secret"].as_str().unwrap());
    assert_eq!(secret.len(), 20);
    assert!(setup["otpauth_url"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/"));
    // The seed is stored sealed, not as given.
    let stored: Vec<u8> = app
        .db()
        .await
        .query_one(
            "SELECT totp_secret FROM credentials WHERE email_lower = $1",
            &[&email],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !stored.windows(secret.len()).any(|w| w == secret.as_slice()),
        "sealed"
    );

    let (s, body) = post(
        &app,
        Some(&token),
        "/v1/auth/2fa/enable",
        json!({"code": "000000x"}),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    let step = step_now();
    let (s, enabled) = post(
        &app,
        Some(&token),
        "/v1/auth/2fa/enable",
        json!({"code": totp(&secret, step, 6)}),
    )
    .await;
    assert_eq!(s, 200, "{enabled}");
    let backup: Vec<String> = serde_json::from_value(enabled["backup_codes"].clone()).unwrap();
    assert_eq!(backup.len(), 10);
    let r = app
        .http
        .get(app.url("/v1/contacts"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "enabling 2FA ends earlier tokens");

    let login = |code: Option<String>| {
        let mut body = json!({"email": email, "password": password});
        if let Some(c) = code {
            body["code"] = json!(c);
        }
        post(&app, None, "/v1/auth/login", body)
    };
    let (s, body) = login(None).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("two_factor_required")),
        "{body}"
    );
    // The code the enabling used, and the step before it, are spent.
    for spent in [totp(&secret, step, 6), totp(&secret, step - 1, 6)] {
        let (s, body) = login(Some(spent)).await;
        assert_eq!(
            (s, body["code"].as_str()),
            (401, Some("invalid_two_factor_code")),
            "{body}"
        );
    }
    // Time passes: the last accepted step is before the current one. The current code
    // works, once.
    let now = step_now();
    app.db()
        .await
        .execute(
            "UPDATE credentials SET totp_last_step = $2 WHERE email_lower = $1",
            &[&email, &(now as i64 - 1)],
        )
        .await
        .unwrap();
    let current = totp(&secret, now, 6);
    let (s, body) = login(Some(current.clone())).await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = login(Some(current)).await;
    assert_eq!(s, 401, "a code cannot be used twice");
    // A code from two steps ago is too old, even unspent.
    app.db()
        .await
        .execute(
            "UPDATE credentials SET totp_last_step = 0 WHERE email_lower = $1",
            &[&email],
        )
        .await
        .unwrap();
    let (s, _) = login(Some(totp(&secret, step_now() - 2, 6))).await;
    assert_eq!(s, 401, "only the current and previous step");
    // Backup codes: each works once, in any case and with or without dashes.
    let (s, body) = login(Some(backup[0].to_uppercase())).await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = login(Some(backup[0].clone())).await;
    assert_eq!(s, 401, "a backup code is single-use");
    let (s, _) = login(Some(backup[1].replace('-', ""))).await;
    assert_eq!(s, 200);
    // The wrong password with a right code is still the wrong password.
    let (s, body) = post(
        &app,
        None,
        "/v1/auth/login",
        json!({"email": email, "password": "not the password at all", "code": backup[2]}),
    )
    .await;
    assert_eq!((s, body["code"].as_str()), (401, Some("unauthorized")));
    let stored: i32 = app
        .db()
        .await
        .query_one(
            "SELECT cardinality(backup_codes) FROM credentials WHERE email_lower = $1",
            &[&email],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 8);
    app.stop().await;
}

#[tokio::test]
async fn an_organisation_can_require_2fa_of_owners_and_admins() {
    let app = TestApp::spawn().await;
    let (_, _, admin) = user(&app, "admin").await;
    let (_, _, team) = user(&app, "team").await;
    let r = app
        .http
        .put(app.url("/v1/organization/two-factor"))
        .bearer_auth(&app.token)
        .json(&json!({"required": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let get = |token: String, path: &'static str| {
        let app = &app;
        async move {
            let r = app
                .http
                .get(app.url(path))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, body) = get(admin.clone(), "/v1/contacts").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("two_factor_setup_required")),
        "{body}"
    );
    assert_eq!(
        get(admin.clone(), "/v1/me").await.0,
        200,
        "own account stays open"
    );
    assert_eq!(
        get(team.clone(), "/v1/contacts").await.0,
        200,
        "Team is not required"
    );
    // Once set up, the Admin is let in again.
    let (_, setup) = post(&app, Some(&admin), "/v1/auth/2fa/setup", json!({})).await;
    let secret = base32_decode(setup["secret"].as_str().unwrap());
    let (s, enabled) = post(
        &app,
        Some(&admin),
        "/v1/auth/2fa/enable",
        json!({"code": totp(&secret, step_now(), 6)}),
    )
    .await;
    assert_eq!(s, 200, "{enabled}");
    let fresh = enabled["access_token"].as_str().unwrap().to_owned();
    assert_eq!(get(fresh, "/v1/contacts").await.0, 200);
    app.stop().await;
}

/// Turns 2FA on for the holder of `token`: (seed, backup codes, the new token).
async fn enable(app: &TestApp, token: &str) -> (Vec<u8>, Vec<String>, String) {
    let (s, setup) = post(app, Some(token), "/v1/auth/2fa/setup", json!({})).await;
    assert_eq!(s, 200, "{setup}");
    let secret = base32_decode(setup["secret"].as_str().unwrap());
    let (s, enabled) = post(
        app,
        Some(token),
        "/v1/auth/2fa/enable",
        json!({"code": totp(&secret, step_now(), 6)}),
    )
    .await;
    assert_eq!(s, 200, "{enabled}");
    let backup = serde_json::from_value(enabled["backup_codes"].clone()).unwrap();
    (
        secret,
        backup,
        enabled["access_token"].as_str().unwrap().to_owned(),
    )
}

/// The user's events, in order: (type, the principal's id).
async fn user_events(app: &TestApp, email: &str) -> Vec<(String, String)> {
    app.db()
        .await
        .query(
            "SELECT e.event_type, e.metadata -> 'principal' ->> 'id' FROM events e \
             JOIN credentials c ON e.aggregate_type = 'user' AND e.aggregate_id = c.user_id::text \
             WHERE c.email_lower = $1 ORDER BY e.sequence",
            &[&email],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The id of the user `token` belongs to (`/v1/me`).
async fn user_id_of(app: &TestApp, token: &str) -> String {
    let me: Value = app
        .http
        .get(app.url("/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    me["user_id"].as_str().unwrap().to_owned()
}

async fn status_of(app: &TestApp, token: &str, path: &str) -> u16 {
    app.http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_user_turns_their_own_2fa_off_with_password_and_code() {
    let app = TestApp::spawn().await;
    let (email, password, token) = user(&app, "team").await;
    let (secret, backup, token2) = enable(&app, &token).await;
    let user_id = user_id_of(&app, &token2).await;
    let disable = |password: &str, code: &str| {
        post(
            &app,
            Some(&token2),
            "/v1/auth/2fa/disable",
            json!({"password": password, "code": code}),
        )
    };
    // A session alone is not enough: the password, then a code, each named when wrong.
    let (s, body) = disable("not the password at all", &backup[0]).await;
    assert_eq!(
        (s, body["fields"][0]["field"].as_str()),
        (422, Some("password")),
        "{body}"
    );
    let (s, body) = disable(&password, "123456").await;
    assert_eq!(
        (s, body["fields"][0]["field"].as_str()),
        (422, Some("code")),
        "{body}"
    );
    // A current TOTP code does it (time has moved past the step the enabling used).
    let now = step_now();
    app.db()
        .await
        .execute(
            "UPDATE credentials SET totp_last_step = $2 WHERE email_lower = $1",
            &[&email, &(now as i64 - 1)],
        )
        .await
        .unwrap();
    let (s, body) = disable(&password, &totp(&secret, now, 6)).await;
    assert_eq!(s, 200, "{body}");
    let fresh = body["access_token"].as_str().unwrap();
    assert_eq!(
        status_of(&app, &token2, "/v1/me").await,
        401,
        "other sessions end"
    );
    assert_eq!(status_of(&app, fresh, "/v1/me").await, 200);
    // Off: a login needs no code, and nothing of the seed or the codes is kept.
    let (s, body) = post(
        &app,
        None,
        "/v1/auth/login",
        json!({"email": email, "password": password}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let row = app
        .db()
        .await
        .query_one(
            "SELECT totp_enabled, totp_secret IS NULL, cardinality(backup_codes) \
             FROM credentials WHERE email_lower = $1",
            &[&email],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, i32>(2)
        ),
        (false, true, 0)
    );
    let (s, body) = post(
        &app,
        Some(fresh),
        "/v1/auth/2fa/disable",
        json!({"password": password, "code": backup[1]}),
    )
    .await;
    assert_eq!(s, 409, "{body}");
    // The history says who turned it off: the user.
    let events = user_events(&app, &email).await;
    assert_eq!(
        events.last(),
        Some(&("TwoFactorDisabled".to_owned(), user_id))
    );
    app.stop().await;
}

#[tokio::test]
async fn failed_attempts_to_turn_2fa_off_lock_the_account_out() {
    let mut opts = crm_tests::harness::Options::default();
    opts.rate_limits.failed_logins_per_hour = 3;
    let app = TestApp::spawn_with(opts).await;
    let (email, password, token) = user(&app, "team").await;
    let (_, backup, token) = enable(&app, &token).await;
    let disable = |code: &str| {
        post(
            &app,
            Some(&token),
            "/v1/auth/2fa/disable",
            json!({"password": password, "code": code}),
        )
    };
    for _ in 0..3 {
        assert_eq!(disable("000000").await.0, 422);
    }
    // One failure too many: the account is locked out, and even the right code is
    // refused for now (as a login would be).
    assert_eq!(disable("000000").await.0, 429);
    let (s, body) = disable(&backup[0]).await;
    assert_eq!(s, 429, "{body}");
    // The same budget as logins: the account's logins are locked out too.
    let (s, _) = post(
        &app,
        None,
        "/v1/auth/login",
        json!({"email": email, "password": password, "code": backup[1]}),
    )
    .await;
    assert_eq!(s, 429, "one lockout for the account");
    app.stop().await;
}

#[tokio::test]
async fn an_organisation_that_requires_2fa_keeps_it_on() {
    let app = TestApp::spawn().await;
    let (email, password, token) = user(&app, "admin").await;
    let (_, backup, token) = enable(&app, &token).await;
    let (_, team_password, team) = user(&app, "team").await;
    let (_, team_backup, team) = enable(&app, &team).await;
    let r = app
        .http
        .put(app.url("/v1/organization/two-factor"))
        .bearer_auth(&app.token)
        .json(&json!({"required": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, body) = post(
        &app,
        Some(&token),
        "/v1/auth/2fa/disable",
        json!({"password": password, "code": backup[0]}),
    )
    .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("two_factor_required_by_organization")),
        "{body}"
    );
    // Still on, and the session goes on.
    let (s, body) = post(
        &app,
        None,
        "/v1/auth/login",
        json!({"email": email, "password": password}),
    )
    .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("two_factor_required"))
    );
    assert_eq!(status_of(&app, &token, "/v1/contacts").await, 200);
    // The refusal spent nothing: the backup code still signs in.
    let (s, body) = post(
        &app,
        None,
        "/v1/auth/login",
        json!({"email": email, "password": password, "code": backup[0]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    // A role the requirement does not cover may still turn it off.
    let (s, body) = post(
        &app,
        Some(&team),
        "/v1/auth/2fa/disable",
        json!({"password": team_password, "code": team_backup[0]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn an_admin_resets_a_lost_2fa_but_not_an_owners_nor_their_own() {
    let app = TestApp::spawn().await;
    // Everyone first: enabling the Owner's 2FA below ends the Owner's token.
    let (email, password, token) = user(&app, "team").await;
    let (_, _, admin) = user(&app, "admin").await;
    let (_, _, owner2) = user(&app, "owner").await;
    let (s, body) = post(
        &app,
        Some(&app.token),
        "/v1/roles",
        json!({"name": "User manager", "permissions": ["users.read", "users.manage"]}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let (_, _, manager) = user(&app, body["id"].as_str().unwrap()).await;
    let (team_id, admin_id, owner_id) = (
        user_id_of(&app, &token).await,
        user_id_of(&app, &admin).await,
        user_id_of(&app, &app.token).await,
    );
    let (_, _, token) = enable(&app, &token).await;
    let (_, _, admin) = enable(&app, &admin).await;
    enable(&app, &app.token).await;
    let reset = |by: &str, who: &str| {
        let path = format!("/v1/users/{who}/two-factor/reset");
        let (app, by) = (&app, by.to_owned());
        async move { post(app, Some(&by), &path, json!({})).await }
    };

    let (s, body) = reset(&admin, &admin_id).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("own_two_factor")),
        "{body}"
    );
    let (s, body) = reset(&admin, &owner_id).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("owner_required")),
        "an Admin cannot take an Owner's off: {body}"
    );
    let (s, body) = reset(&manager, &admin_id).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("user_exceeds_own")),
        "a user manager whose role holds less than an Admin's: {body}"
    );

    let (s, body) = reset(&admin, &team_id).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        status_of(&app, &token, "/v1/me").await,
        401,
        "its sessions end"
    );
    let (s, body) = post(
        &app,
        None,
        "/v1/auth/login",
        json!({"email": email, "password": password}),
    )
    .await;
    assert_eq!(
        s, 200,
        "signs in with the password alone, to set 2FA up again: {body}"
    );
    let (s, _) = reset(&admin, &team_id).await;
    assert_eq!(s, 409, "nothing left to reset");
    // The history names the Admin who did it.
    let events = user_events(&app, &email).await;
    assert_eq!(
        events.last(),
        Some(&("TwoFactorReset".to_owned(), admin_id))
    );
    // Another Owner may reset an Owner's.
    let (s, body) = reset(&owner2, &owner_id).await;
    assert_eq!(s, 200, "{body}");
    app.stop().await;
}
