//! Rate limits per client address: 30 requests/s on the API, 5/s on authentication,
//! answered 429 with Retry-After; health probes are not limited.

use crm_api::edge::ratelimit::RateLimitSettings;
use crm_tests::harness::{Options, TestApp};
use serde_json::{json, Value};

/// Sends `n` requests at once; the statuses, and the 429s' Retry-After and error code.
async fn burst(n: usize, send: impl Fn() -> reqwest::RequestBuilder) -> (usize, usize) {
    let responses = futures::future::join_all((0..n).map(|_| send().send())).await;
    let (mut passed, mut limited) = (0, 0);
    for r in responses {
        let r = r.unwrap();
        if r.status() == 429 {
            limited += 1;
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(retry, 1, "Retry-After: the budget refills within a second");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["code"], "rate_limited", "{body}");
        } else {
            passed += 1;
        }
    }
    (passed, limited)
}

#[tokio::test]
async fn the_31st_api_request_and_the_6th_auth_request_in_a_second_get_429() {
    let app = TestApp::spawn_with(Options {
        rate_limits: RateLimitSettings {
            api_per_sec: 30,
            auth_per_sec: 5,
            failed_logins_per_hour: 100,
        },
        ..Default::default()
    })
    .await;
    let (http, token) = (app.http.clone(), app.token.clone());
    let url = app.url("/v1/contacts");
    let (passed, limited) = burst(40, || http.get(&url).bearer_auth(&token)).await;
    // The budget is 30 at once; one more may have been earned while the 40 arrived.
    assert!((30..=32).contains(&passed), "{passed} passed");
    assert_eq!(passed + limited, 40);

    // Authentication has its own, smaller budget.
    let login = app.url("/v1/auth/login");
    let (passed, limited) = burst(10, || {
        http.post(&login)
            .json(&json!({"email": "nobody@example.com", "password": "not the password"}))
    })
    .await;
    assert!((5..=6).contains(&passed), "{passed} passed");
    assert_eq!(passed + limited, 10);

    // Probes are never limited.
    let health = app.url("/healthz");
    let (passed, _) = burst(60, || http.get(&health)).await;
    assert_eq!(passed, 60);

    // The budget comes back.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(app.get("/v1/contacts").await.status(), 200);
    app.stop().await;
}

/// Past the failed-login budget of an account, its logins are refused (429, even with
/// the right password) until the budget refills; an unknown email is counted and
/// answered the same way, and other accounts are not affected.
#[tokio::test]
async fn too_many_failed_logins_lock_the_account_out() {
    let app = TestApp::spawn_with(Options {
        rate_limits: RateLimitSettings {
            api_per_sec: 0,
            auth_per_sec: 0,
            failed_logins_per_hour: 3,
        },
        ..Default::default()
    })
    .await;
    let password = "correct horse battery staple";
    let email = format!("{}@lockout.example.com", uuid::Uuid::new_v4().simple());
    let hash = crm_api::auth::hash_password(password).unwrap();
    crm_tests::harness::create_user(&app.state, app.org_id, &email, &hash).await;
    let login = |email: String, password: &'static str| {
        let (http, url) = (app.http.clone(), app.url("/v1/auth/login"));
        async move {
            let r = http
                .post(url)
                .json(&json!({"email": email, "password": password}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (status, retry)
        }
    };
    let unknown = format!("{}@lockout.example.com", uuid::Uuid::new_v4().simple());
    for who in [&email, &unknown] {
        for _ in 0..3 {
            assert_eq!(login(who.clone(), "wrong password").await.0, 401);
        }
        let (status, retry) = login(who.clone(), "wrong password").await;
        assert_eq!(status, 429, "the fourth failure");
        // 3 per hour: one more attempt every 20 minutes.
        assert!(retry.is_some_and(|s| (1..=1200).contains(&s)), "{retry:?}");
    }
    // Locked: even the right password (and in another case) is refused.
    let (status, _) = login(email.to_uppercase(), password).await;
    assert_eq!(status, 429);
    // Another account logs in as usual.
    let other = format!("{}@lockout.example.com", uuid::Uuid::new_v4().simple());
    crm_tests::harness::create_user(&app.state, app.org_id, &other, &hash).await;
    assert_eq!(login(other, password).await.0, 200);
    app.stop().await;
}
