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
    let metrics = app.metrics().await;
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

/// Concurrent creates share commits (group commit) yet each command gets its own event,
/// position and data key; and a create of a stream that exists is a conflict.
#[tokio::test]
async fn concurrent_creates_each_get_their_own_event_and_an_existing_stream_conflicts() {
    use crm_domain::contact::{Contact, ContactCommand, ContactProfile};
    use crm_domain::metadata::EventMetadata;
    use crm_domain::values::Name;
    use crm_infra::commands::executor::CommandError;
    use uuid::Uuid;

    let app = TestApp::spawn().await;
    let org = app.org_id;
    let create = |id: Uuid, name: &str| ContactCommand::Create {
        contact_id: id,
        org_id: org,
        profile: ContactProfile {
            given_name: Some(Name::parse(name).unwrap()),
            ..Default::default()
        },
    };
    let meta = EventMetadata::system(org, "test");
    let ids: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
    let outcomes = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let (executor, meta, command) = (
            app.state.executor.clone(),
            meta.clone(),
            create(*id, &format!("N{i}")),
        );
        async move {
            executor
                .execute::<Contact>(org, &id.to_string(), command, &meta, Some(0))
                .await
        }
    }))
    .await;
    let positions: BTreeSet<i64> = outcomes
        .iter()
        .map(|o| {
            let o = o.as_ref().expect("every create succeeds");
            assert_eq!(o.version, 1);
            o.positions[0]
        })
        .collect();
    assert_eq!(positions.len(), ids.len(), "one distinct position each");

    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT tx_id::text), \
                    (SELECT count(*) FROM data_keys WHERE org_id = $1 AND subject_id = ANY($2)) \
             FROM events WHERE org_id = $1 AND aggregate_id = ANY($2)",
            &[&org, &ids.iter().map(Uuid::to_string).collect::<Vec<_>>()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 200, "one event per create");
    assert_eq!(row.get::<_, i64>(2), 200, "one data key per contact");
    assert!(
        row.get::<_, i64>(1) < 200,
        "concurrent creates shared commits"
    );

    // Each contact reads back with its own (decrypted) name.
    let i = 123;
    let got: Value = app
        .get(&format!(
            "/v1/contacts/{}?min_position={}",
            ids[i],
            outcomes[i].as_ref().unwrap().positions[0]
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["given_name"], format!("N{i}"));

    // Creating a stream that exists is a conflict, whether alone or in a crowd.
    let first = ids[0];
    let again = futures::future::join_all((0..5).map(|_| {
        let (executor, meta, command) = (
            app.state.executor.clone(),
            meta.clone(),
            create(first, "Dup"),
        );
        async move {
            executor
                .execute::<Contact>(org, &first.to_string(), command, &meta, Some(0))
                .await
        }
    }))
    .await;
    for o in again {
        assert!(matches!(o, Err(CommandError::Conflict)), "{o:?}");
    }
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_id = $1",
            &[&ids[0].to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the duplicate create wrote nothing");
    app.stop().await;
}
