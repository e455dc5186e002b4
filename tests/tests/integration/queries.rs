//! Contacts, history, as_of, the activity log and health, as a client sees them.

use std::collections::HashSet;

use crm_tests::harness::TestApp;
use serde_json::{json, Value};

async fn body(r: reqwest::Response) -> Value {
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    v
}

#[tokio::test]
async fn a_contact_round_trips_every_field_and_updates_set_and_clear() {
    let app = TestApp::spawn().await;
    let full = json!({
        "given_name": "Ada", "family_name": "Lovelace", "email": "Ada@Example.COM",
        "phone": "+441632960961", "company": "Analytical Engines", "title": "Countess",
        "address": {"line1": "12 St James's Square", "city": "London", "postal_code": "SW1Y 4JH", "country": "gb"},
        "custom": {"tier": "gold", "score": 42, "vip": true}
    });
    let (id, pos) = app.create_contact(&full).await;
    let v = body(
        app.get(&format!("/v1/contacts/{id}?min_position={pos}"))
            .await,
    )
    .await;
    assert_eq!(v["email"], "Ada@example.com");
    assert_eq!(v["address"]["country"], "GB");
    assert_eq!(
        v["custom"],
        json!({"tier": "gold", "score": 42, "vip": true})
    );
    assert_eq!(
        (v["version"].as_i64(), v["archived"].as_bool()),
        (Some(1), Some(false))
    );

    let r = body(
        app.patch(
            &format!("/v1/contacts/{id}"),
            &json!({"title": null, "phone": "+14155550123", "custom": {"vip": null}}),
        )
        .await,
    )
    .await;
    assert_eq!(r["version"], 2);
    let p = r["positions"][0].as_i64().unwrap();
    let v = body(
        app.get(&format!("/v1/contacts/{id}?min_position={p}"))
            .await,
    )
    .await;
    assert!(v.get("title").is_none());
    assert_eq!(v["phone"], "+14155550123");
    assert_eq!(v["custom"], json!({"tier": "gold", "score": 42}));

    // Nothing to change: same version, nothing written.
    let r = body(
        app.patch(
            &format!("/v1/contacts/{id}"),
            &json!({"phone": "+14155550123"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (
            r["version"].as_i64(),
            r["positions"].as_array().map(Vec::len)
        ),
        (Some(2), Some(0))
    );

    let r = body(
        app.post(&format!("/v1/contacts/{id}/archive"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(r["version"], 3);
    let r = app
        .patch(&format!("/v1/contacts/{id}"), &json!({"title": "Dr"}))
        .await;
    assert_eq!(r.status(), 409);
    let r = app
        .post(&format!("/v1/contacts/{id}/archive"), &json!({}))
        .await;
    assert_eq!(r.status(), 409);
    app.stop().await;
}

#[tokio::test]
async fn lists_paginate_and_filter() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    let mut last = 0;
    for i in 0..7 {
        let company = if i % 2 == 0 { "Even Ltd" } else { "Odd plc" };
        let (id, pos) = app
            .create_contact(&json!({"given_name": format!("Person{i}"), "email": format!("p{i}@example.com"), "company": company}))
            .await;
        ids.push(id);
        last = pos;
    }
    let r = body(
        app.post(&format!("/v1/contacts/{}/archive", ids[6]), &json!({}))
            .await,
    )
    .await;
    last = last.max(r["positions"][0].as_i64().unwrap());

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/contacts?limit=3&archived=any&after={a}&min_position={last}"),
            None => format!("/v1/contacts?limit=3&archived=any&min_position={last}"),
        };
        let page = body(app.get(&q).await).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        match page["next_after"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    assert_eq!(seen, expected, "every contact once, in creation order");

    let count = |v: Value| v["items"].as_array().unwrap().len();
    assert_eq!(
        count(body(app.get("/v1/contacts").await).await),
        6,
        "archived hidden by default"
    );
    assert_eq!(
        count(body(app.get("/v1/contacts?archived=true").await).await),
        1
    );
    assert_eq!(
        count(body(app.get("/v1/contacts?company=Odd%20plc").await).await),
        3
    );
    assert_eq!(
        count(body(app.get("/v1/contacts?email=P3@EXAMPLE.com").await).await),
        1
    );
    assert_eq!(
        count(body(app.get("/v1/contacts?q=person1").await).await),
        1
    );
    assert_eq!(
        count(body(app.get("/v1/contacts?q=%25").await).await),
        0,
        "LIKE wildcards are literal"
    );
    app.stop().await;
}

#[tokio::test]
async fn history_as_of_and_activity_come_from_the_events() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .bearer_auth(&app.token)
        .header("user-agent", "history-test/1.0")
        .header("x-correlation-id", "flow-42")
        .json(&json!({"given_name": "Ada", "title": "Miss"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = body(
        app.patch(&format!("/v1/contacts/{id}"), &json!({"title": "Countess"}))
            .await,
    )
    .await;
    let pos = r["positions"][0].as_i64().unwrap();

    let h = body(app.get(&format!("/v1/contacts/{id}/history")).await).await;
    let events = h["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    let first = &events[0];
    assert_eq!(first["type"], "ContactCreated");
    assert_eq!(first["data"]["profile"]["title"], "Miss");
    let meta = &first["metadata"];
    assert_eq!(
        meta["principal"],
        json!({"kind": "user", "id": app.user_id.to_string()})
    );
    assert_eq!(meta["request_id"], rid.as_str());
    assert_eq!(meta["correlation_id"], "flow-42");
    assert_eq!(meta["user_agent"], "history-test/1.0");
    assert_eq!(meta["ip"], "127.0.0.1");
    assert_eq!(events[1]["data"]["set"]["title"], "Countess");

    let then = body(
        app.get(&format!(
            "/v1/contacts/{id}?as_of={}",
            urlencode(&between.to_rfc3339())
        ))
        .await,
    )
    .await;
    assert_eq!(
        (then["title"].as_str(), then["version"].as_i64()),
        (Some("Miss"), Some(1))
    );
    let before = between - chrono::Duration::hours(1);
    let r = app
        .get(&format!(
            "/v1/contacts/{id}?as_of={}",
            urlencode(&before.to_rfc3339())
        ))
        .await;
    assert_eq!(r.status(), 404);

    let a = body(
        app.get(&format!("/v1/activity?entity_id={id}&min_position={pos}"))
            .await,
    )
    .await;
    let items = a["items"].as_array().unwrap();
    let actions: Vec<&str> = items
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["ContactUpdated", "ContactCreated"],
        "newest first"
    );
    assert_eq!(
        items[1]["actor"],
        json!({"kind": "user", "id": app.user_id.to_string()})
    );
    assert_eq!(items[1]["request_id"], rid.as_str());
    assert!(
        !a.to_string().contains("127.0.0.1") && !a.to_string().contains("history-test"),
        "no IP or user agent in the activity log"
    );
    let only = body(
        app.get("/v1/activity?action=ContactCreated&entity_type=contact")
            .await,
    )
    .await;
    assert_eq!(only["items"].as_array().unwrap().len(), 1);
    let page = body(
        app.get(&format!("/v1/activity?limit=1&entity_id={id}"))
            .await,
    )
    .await;
    let next = page["next_before"].as_i64().unwrap();
    let page2 = body(
        app.get(&format!(
            "/v1/activity?limit=1&entity_id={id}&before={next}"
        ))
        .await,
    )
    .await;
    assert_eq!(page2["items"][0]["action"], "ContactCreated");
    app.stop().await;
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test]
async fn another_organisation_learns_nothing() {
    let app = TestApp::spawn().await;
    let (id, pos) = app
        .create_contact(&json!({"given_name": "Secret", "email": "secret@example.com"}))
        .await;
    let _ = body(
        app.get(&format!("/v1/contacts/{id}?min_position={pos}"))
            .await,
    )
    .await;
    let (_, _, other) = app.another_org("Rival").await;
    let as_other = |method: reqwest::Method, path: String| {
        app.http
            .request(method, app.url(&path))
            .bearer_auth(&other)
            .json(&json!({"title": "x"}))
            .send()
    };
    for (m, p) in [
        (reqwest::Method::GET, format!("/v1/contacts/{id}")),
        (
            reqwest::Method::GET,
            format!("/v1/contacts/{id}?as_of=2999-01-01T00:00:00Z"),
        ),
        (reqwest::Method::GET, format!("/v1/contacts/{id}/history")),
        (reqwest::Method::PATCH, format!("/v1/contacts/{id}")),
        (reqwest::Method::POST, format!("/v1/contacts/{id}/archive")),
    ] {
        let r = as_other(m.clone(), p.clone()).await.unwrap();
        assert_eq!(r.status(), 404, "{m} {p}");
        let v: Value = r.json().await.unwrap();
        assert!(!v.to_string().contains("Secret"));
    }
    let list = body(
        app.http
            .get(app.url("/v1/contacts?archived=any"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    let activity = body(
        app.http
            .get(app.url("/v1/activity"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let entities: HashSet<String> = activity["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entity"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!entities.contains(&id.to_string()));
    // And the owner's contact is untouched.
    let v = body(app.get(&format!("/v1/contacts/{id}")).await).await;
    assert_eq!(v["version"], 1);
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::spawn().await;
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.create_contact(&json!({"given_name": "Ada"})).await;
    let ready = body(app.http.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(
        (ready["postgres"].as_str(), ready["nats"].as_str()),
        (Some("ok"), Some("ok"))
    );
    assert!(ready["relay_lag_events"].is_i64());
    assert!(ready["projector_lag_events"]["contacts"].is_i64());
    assert!(ready["projector_lag_events"]["activity"].is_i64());
    let m = app.metrics().await;
    for name in [
        "crm_commands_total",
        "crm_command_duration_seconds",
        "crm_append_duration_seconds",
        "crm_relay_lag_events",
        "crm_projector_lag_events",
        "crm_http_requests_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    assert!(m.contains("crm_commands_total{aggregate=\"contact\",outcome=\"ok\"}"));
    app.stop().await;
}
