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
