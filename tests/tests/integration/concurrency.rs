//! Optimistic concurrency under contention: no lost update, no 500.

use std::collections::BTreeSet;

use crm_tests::harness::TestApp;
use serde_json::{json, Value};

#[tokio::test]
async fn fifty_concurrent_updates_each_version_won_once() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let path = format!("/v1/contacts/{id}");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let http = app.http.clone();
        let url = app.url(&path);
        let token = app.token.clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .patch(url)
                .bearer_auth(token)
                .json(&json!({"custom": {format!("k{i}"): i}}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (i, status, body)
        }));
    }
    let mut won = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (i, status, body) = t.await.unwrap();
        match status {
            200 => won.push((
                i,
                body["version"].as_i64().unwrap(),
                body["positions"][0].as_i64().unwrap(),
            )),
            409 => {
                assert_eq!(body["code"], "version_conflict");
                conflicts += 1;
            }
            other => panic!("update {i} got {other}: {body}"),
        }
    }
    assert_eq!(won.len() + conflicts, 50);
    assert!(!won.is_empty());
    // Each version from 2 upwards was won exactly once.
    let versions: BTreeSet<i64> = won.iter().map(|w| w.1).collect();
    assert_eq!(versions.len(), won.len(), "a version was won twice");
    assert_eq!(versions, (2..2 + won.len() as i64).collect::<BTreeSet<_>>());

    // No lost update: the contact holds exactly the winners' fields.
    let last = won.iter().map(|w| w.2).max().unwrap();
    let r = app.get(&format!("{path}?min_position={last}")).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"].as_i64().unwrap(), 1 + won.len() as i64);
    let keys: BTreeSet<String> = v["custom"].as_object().unwrap().keys().cloned().collect();
    let expected: BTreeSet<String> = won.iter().map(|w| format!("k{}", w.0)).collect();
    assert_eq!(keys, expected);
    let h: Value = app
        .get(&format!("{path}/history"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(h["events"].as_array().unwrap().len(), 1 + won.len());

    // The conflicts are counted.
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    if conflicts > 0 {
        assert!(metrics.contains("crm_command_conflicts_total"));
    }
    app.stop().await;
}

#[tokio::test]
async fn a_stale_expected_version_is_a_409() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let path = format!("/v1/contacts/{id}");
    let r = app
        .patch(&path, &json!({"title": "Dr", "expected_version": 1}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .patch(&path, &json!({"title": "Prof", "expected_version": 1}))
        .await;
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "version_conflict");
    assert!(v["message"].as_str().unwrap().contains("version 2"));
    app.stop().await;
}
