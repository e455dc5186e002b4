//! Liveness, readiness and metrics, as an orchestrator and a scraper see them.

use std::time::Duration;

use crm_tests::harness::{eventually, TestApp};
use serde_json::{json, Value};

#[tokio::test]
async fn healthz_is_ok_without_a_token() {
    let app = TestApp::spawn().await;
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ok");
    app.stop().await;
}

#[tokio::test]
async fn readyz_reports_dependencies_and_numeric_lags() {
    let app = TestApp::spawn().await;
    let (_, pos) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ready", "{v}");
    assert_eq!(v["postgres"], "ok", "{v}");
    assert_eq!(v["nats"], "ok", "{v}");
    let relay = v["relay_lag_events"]
        .as_i64()
        .expect("relay lag is a number");
    assert!(relay >= 0, "{v}");
    for p in ["contacts", "activity"] {
        let lag = v["projector_lag_events"][p]
            .as_i64()
            .unwrap_or_else(|| panic!("{p} lag is a number: {v}"));
        assert!(lag >= 0, "{v}");
    }

    // Once the projections caught up with the write, the lags it reports go to zero.
    let r = app.get(&format!("/v1/activity?min_position={pos}")).await;
    assert_eq!(r.status(), 200);
    let settled = eventually(Duration::from_secs(10), || async {
        let v: Value = app
            .http
            .get(app.url("/readyz"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let lags = [
            v["relay_lag_events"].as_i64()?,
            v["projector_lag_events"]["contacts"].as_i64()?,
            v["projector_lag_events"]["activity"].as_i64()?,
        ];
        (lags == [0, 0, 0]).then_some(v)
    })
    .await;
    assert!(
        settled.is_some(),
        "lags reach zero once everything is processed"
    );
    app.stop().await;
}

#[tokio::test]
async fn readyz_reports_projection_lag_when_projectors_are_stopped() {
    let app = TestApp::spawn_with(crm_tests::harness::Options {
        run_projectors: false,
        ..Default::default()
    })
    .await;
    let mut positions = Vec::new();
    for i in 0..3 {
        let (_, pos) = app
            .create_contact(&json!({"given_name": format!("P{i}")}))
            .await;
        positions.push(pos);
    }
    let readyz = || async { app.get("/readyz").await.json::<Value>().await.unwrap() };
    let v = readyz().await;
    for p in ["contacts", "activity"] {
        let lag = v["projector_lag_events"][p].as_i64().unwrap();
        assert!(lag >= 3, "{p} lag counts the unprojected events: {v}");
    }

    // Read models at different checkpoints each report their own lag (the lags are
    // counted once per distinct checkpoint): `contacts` as if it had applied up to the
    // second contact, the others still at the start.
    let db = app.state.pool.get().await.unwrap();
    let second = crm_infra::store::event_store::commit_key_of(&db, positions[1])
        .await
        .unwrap()
        .expect("the second contact's event");
    crm_infra::feed::projector::set_checkpoint(&db, "contacts", second)
        .await
        .unwrap();
    let v = readyz().await;
    let lag = |p: &str| v["projector_lag_events"][p].as_i64().unwrap();
    assert_eq!(
        lag("contacts"),
        1,
        "only the third contact is after it: {v}"
    );
    assert!(lag("activity") >= 3, "{v}");
    assert_eq!(lag("consent_log"), lag("activity"), "same checkpoint: {v}");
    app.stop().await;
}

/// The value of a sample line `name{labels} value` (first match of `prefix`).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_expose_commands_conflicts_and_lags() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    // One conflicting command, too.
    let r = app
        .patch(
            &format!("/v1/contacts/{id}"),
            &json!({"title": "Dr", "expected_version": 7}),
        )
        .await;
    assert_eq!(r.status(), 409);

    let r = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = r.text().await.unwrap();
    for name in [
        "crm_commands_total",
        "crm_command_conflicts_total",
        "crm_append_duration_seconds",
        "crm_relay_lag_events",
        "crm_projector_lag_events",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} has a sample in /metrics:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {name}")),
            "{name} has a TYPE line"
        );
    }
    assert!(
        sample(&text, "crm_commands_total{").is_some_and(|v| v >= 1.0),
        "a command was counted:\n{text}"
    );
    assert!(
        sample(&text, "crm_append_duration_seconds_count").is_some_and(|v| v >= 1.0),
        "an append was timed:\n{text}"
    );
    assert!(
        sample(&text, "crm_command_conflicts_total").is_some_and(|v| v >= 1.0),
        "the conflict was counted:\n{text}"
    );
    assert!(sample(&text, "crm_relay_lag_events").is_some_and(|v| v >= 0.0));
    assert!(sample(&text, "crm_projector_lag_events{").is_some_and(|v| v >= 0.0));
    app.stop().await;
}
