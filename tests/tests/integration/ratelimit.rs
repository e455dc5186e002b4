//! Rate limits per client address: 30 requests/s on the API, 5/s on authentication,
//! answered 429 with Retry-After; health probes are not limited.

use crm_api::ratelimit::RateLimitSettings;
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
