//! The relay and the projectors: nothing skipped, nothing doubled, order kept, and a
//! killed projector converges to what a rebuild produces.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crm_api::startup;
use crm_infra::feed::projector;
use crm_infra::read_models;
use crm_infra::store::event_store::{self, CommitKey, RawEvent};
use crm_tests::harness::{eventually, Options, TestApp};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Every event of the test's stream, parsed, in stream order.
async fn published(app: &TestApp) -> Vec<RawEvent> {
    app.stream_events().await
}

/// Event ids in commit order, as the store has them.
async fn store_order(app: &TestApp) -> Vec<Uuid> {
    let db = app.db().await;
    db.query(
        "SELECT event_id FROM events ORDER BY tx_id, global_position",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Waits until JetStream holds every event the store has.
async fn wait_published(app: &TestApp, timeout: Duration) -> Vec<RawEvent> {
    let want = store_order(app).await.len();
    eventually(timeout, || async {
        let p = published(app).await;
        (p.len() >= want).then_some(p)
    })
    .await
    .unwrap_or_else(|| panic!("relay did not publish {want} events in time"))
}

async fn insert_probe_event(tx: &tokio_postgres::Transaction<'_>, org: Uuid) -> Uuid {
    let event_id = Uuid::now_v7();
    tx.execute(
        "INSERT INTO events (event_id, org_id, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, payload, metadata, prev_hash, hash) \
         VALUES ($1, $2, 'probe', $3, 1, 'ProbeRecorded', '1', '{\"ProbeRecorded\": {}}', $4, NULL, '\\x00')",
        &[&event_id, &org, &event_id.to_string(), &json!({"org_id": org, "principal": {"kind": "system", "id": "test"}, "occurred_at": "2026-01-01T00:00:00Z", "request_id": null, "correlation_id": null, "causation_id": null})],
    )
    .await
    .unwrap();
    event_id
}

#[tokio::test]
async fn relay_skips_nothing_while_a_transaction_is_held_open() {
    let app = TestApp::spawn_with(Options {
        run_projectors: false,
        ..Default::default()
    })
    .await;
    // A writer opens a transaction, appends, and keeps it open for seconds.
    let mut slow = app.db().await;
    let tx = slow.transaction().await.unwrap();
    let late = insert_probe_event(&tx, app.org_id).await;

    // Meanwhile many writers commit.
    let mut writers = Vec::new();
    for w in 0..16 {
        let http = app.http.clone();
        let url = app.url("/v1/contacts");
        let token = app.token.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..8 {
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"given_name": format!("W{w}N{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Nothing that sorts after the open transaction may have been published yet.
    let early = published(&app).await;
    assert!(early.iter().all(|e| e.event_id != late));
    tx.commit().await.unwrap();

    let all = wait_published(&app, Duration::from_secs(30)).await;
    let order = store_order(&app).await;
    let got: Vec<Uuid> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(got, order, "every event exactly once, in commit order");
    assert!(
        got.contains(&late),
        "the late-committing event was delivered"
    );
    // Commit keys strictly increase along the stream.
    let keys: Vec<CommitKey> = all.iter().map(RawEvent::commit_key).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]));
    app.stop().await;
}

#[tokio::test]
async fn two_relays_and_a_replay_publish_each_event_once() {
    let app = TestApp::spawn_with(Options {
        run_relay: false,
        run_projectors: false,
        ..Default::default()
    })
    .await;
    let token = CancellationToken::new();
    let r1 = tokio::spawn(startup::relay(&app.state).unwrap().run(token.clone()));
    let r2 = tokio::spawn(startup::relay(&app.state).unwrap().run(token.clone()));
    for i in 0..30 {
        app.create_contact(&json!({"given_name": format!("N{i}")}))
            .await;
    }
    let all = wait_published(&app, Duration::from_secs(30)).await;
    assert_eq!(
        all.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        store_order(&app).await
    );

    // Stop both, rewind the checkpoint as if the relay crashed before checkpointing:
    // the re-published events are dropped by JetStream's duplicate window.
    token.cancel();
    r1.await.unwrap();
    r2.await.unwrap();
    app.db()
        .await
        .execute("DELETE FROM relay_checkpoints", &[])
        .await
        .unwrap();
    let token = CancellationToken::new();
    let r3 = tokio::spawn(startup::relay(&app.state).unwrap().run(token.clone()));
    let rewound_done = eventually(Duration::from_secs(20), || async {
        let n: i64 = app
            .db()
            .await
            .query_one("SELECT count(*) FROM relay_checkpoints", &[])
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    assert!(rewound_done.is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = published(&app).await;
    assert_eq!(
        again.len(),
        all.len(),
        "a replay must not duplicate messages"
    );
    token.cancel();
    r3.await.unwrap();
    app.stop().await;
}

async fn contacts_table(app: &TestApp) -> Vec<(Uuid, i64, Value, bool)> {
    app.db()
        .await
        .query(
            "SELECT id, version, profile, archived FROM contacts ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

async fn wait_caught_up(app: &TestApp, name: &str) {
    let pool = app.admin_pool();
    // A killed worker's unacknowledged batch comes back after the ack wait.
    let ok = eventually(projector::ACK_WAIT * 4, || async {
        let c = pool.get().await.unwrap();
        let ck = projector::checkpoint(&c, name).await.unwrap();
        (event_store::count_after(&c, ck, 1_000_000).await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(ok.is_some(), "projection {name} did not catch up");
}

/// Writes a mix of creates, updates and archives from several tasks.
async fn write_traffic(app: &TestApp, contacts: usize, updates_each: usize) {
    let mut tasks = Vec::new();
    for c in 0..contacts {
        let http = app.http.clone();
        let base = app.base.clone();
        let token = app.token.clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/contacts"))
                .bearer_auth(&token)
                .json(&json!({"given_name": format!("C{c}"), "email": format!("c{c}@example.com")}))
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            let id = v["id"].as_str().unwrap().to_owned();
            for u in 0..updates_each {
                let r = http
                    .patch(format!("{base}/v1/contacts/{id}"))
                    .bearer_auth(&token)
                    .json(&json!({"title": format!("T{u}"), "custom": {format!("u{u}"): u}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
            if c % 5 == 0 {
                http.post(format!("{base}/v1/contacts/{id}/archive"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn a_killed_projector_converges_to_the_rebuild() {
    let app = TestApp::spawn_with(Options {
        run_projectors: false,
        ..Default::default()
    })
    .await;
    let contacts = read_models::by_name("contacts").unwrap();
    let worker = tokio::spawn(
        startup::projector(&app.state, contacts.clone()).run(CancellationToken::new()),
    );
    {
        let traffic = write_traffic(&app, 40, 5);
        tokio::pin!(traffic);
        // Kill the projector (no graceful stop) while events are flowing.
        tokio::select! {
            _ = &mut traffic => {},
            _ = tokio::time::sleep(Duration::from_millis(300)) => {},
        }
        worker.abort();
        let _ = worker.await;
        traffic.await;
    }
    let token = CancellationToken::new();
    let restarted =
        tokio::spawn(startup::projector(&app.state, contacts.clone()).run(token.clone()));
    wait_caught_up(&app, "contacts").await;
    let live = contacts_table(&app).await;
    assert_eq!(live.len(), 40);
    assert!(live.iter().all(|(_, v, _, _)| *v >= 6));

    let report = app.rebuild("contacts").await;
    assert!(report.events >= 40 * 6);
    let rebuilt = contacts_table(&app).await;
    assert_eq!(live, rebuilt, "live projection and rebuild disagree");
    token.cancel();
    restarted.await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn two_projector_processes_share_the_work_without_double_applying() {
    let app = TestApp::spawn_with(Options {
        run_projectors: false,
        ..Default::default()
    })
    .await;
    let token = CancellationToken::new();
    let mut workers = Vec::new();
    for p in read_models::all() {
        for _ in 0..2 {
            workers.push(tokio::spawn(
                startup::projector(&app.state, p.clone()).run(token.clone()),
            ));
        }
    }
    write_traffic(&app, 20, 4).await;
    wait_caught_up(&app, "contacts").await;
    wait_caught_up(&app, "activity").await;
    let live = contacts_table(&app).await;
    let db = app.db().await;
    let activity: i64 = db
        .query_one("SELECT count(*) FROM activity", &[])
        .await
        .unwrap()
        .get(0);
    let events: i64 = db
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(activity, events, "one activity entry per event");
    token.cancel();
    for w in workers {
        w.await.unwrap();
    }
    app.rebuild("contacts").await;
    assert_eq!(live, contacts_table(&app).await);
    app.stop().await;
}

#[tokio::test]
async fn a_redelivered_message_changes_the_read_model_once() {
    let app = TestApp::spawn().await;
    let (id, pos) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let r = app
        .patch(
            &format!("/v1/contacts/{id}"),
            &json!({"custom": {"visits": 1}}),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    let pos2 = v["positions"][0].as_i64().unwrap();
    let _ = app
        .get(&format!("/v1/contacts/{id}?min_position={pos2}"))
        .await;
    let before = contacts_table(&app).await;

    // Deliver both events again, as a redelivery would (a new message id so that
    // JetStream does not drop them as duplicates before the projector sees them).
    for e in published(&app)
        .await
        .into_iter()
        .filter(|e| [pos, pos2].contains(&e.global_position))
    {
        let body = serde_json::to_vec(&e).unwrap();
        redeliver(&app, &e.org_id, &e.aggregate_type, &e.aggregate_id, body).await;
    }
    // A later event still goes through, so the duplicates were consumed before it.
    let r = app
        .patch(&format!("/v1/contacts/{id}"), &json!({"title": "Countess"}))
        .await;
    let v: Value = r.json().await.unwrap();
    let pos3 = v["positions"][0].as_i64().unwrap();
    let got: Value = app
        .get(&format!("/v1/contacts/{id}?min_position={pos3}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["version"], 3);
    assert_eq!(got["custom"]["visits"], 1);
    consumer_drained(&app).await;
    let after = contacts_table(&app).await;
    assert_eq!(after[0].0, before[0].0);
    assert_eq!(after[0].1, 3);
    let db = app.db().await;
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM activity WHERE entity_id = $1",
            &[&id.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "one activity entry per event despite redelivery");
    app.stop().await;
}

#[tokio::test]
async fn queries_keep_working_during_a_rebuild() {
    let app = TestApp::spawn().await;
    write_traffic(&app, 30, 2).await;
    wait_caught_up(&app, "contacts").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (http, url, token, stop) = (
            app.http.clone(),
            app.url("/v1/contacts?archived=any&limit=500"),
            app.token.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["items"].as_array().unwrap().len(), 30);
                n += 1;
            }
            n
        })
    };
    for p in read_models::all() {
        app.rebuild(p.name()).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);
    // Live projectors continue after the swap.
    let (id, pos) = app.create_contact(&json!({"given_name": "After"})).await;
    let r = app
        .get(&format!("/v1/contacts/{id}?min_position={pos}"))
        .await;
    assert_eq!(r.status(), 200);
    app.stop().await;
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.db().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// `crm serve`'s single worker feeds both read models, also when they are at different
/// checkpoints: here contacts has applied everything (its own worker ran) and the
/// activity log nothing, so every message is a redelivery for one and new for the other.
#[tokio::test]
async fn one_worker_feeds_read_models_at_different_checkpoints() {
    let app = TestApp::spawn_with(Options {
        run_projectors: false,
        ..Default::default()
    })
    .await;
    write_traffic(&app, 5, 2).await;
    let token = CancellationToken::new();
    let contacts_only = tokio::spawn(
        startup::projector(&app.state, read_models::by_name("contacts").unwrap())
            .run(token.clone()),
    );
    wait_caught_up(&app, "contacts").await;
    token.cancel();
    contacts_only.await.unwrap();
    let events = "SELECT count(*) FROM events WHERE aggregate_type = 'contact'";
    let activity = "SELECT count(*) FROM activity WHERE entity_type = 'contact'";
    assert_eq!(count(&app, activity).await, 0, "the activity log is behind");

    let token = CancellationToken::new();
    let both = startup::projectors(&app.state, read_models::all());
    assert_eq!(both.consumer_name(), all_read_models_consumer());
    let both = tokio::spawn(both.run(token.clone()));
    write_traffic(&app, 2, 1).await;
    wait_caught_up(&app, "contacts").await;
    wait_caught_up(&app, "activity").await;
    assert_eq!(
        count(&app, activity).await,
        count(&app, events).await,
        "one activity entry per contact event"
    );
    let live = contacts_table(&app).await;
    assert_eq!(live.len(), 7);
    app.rebuild("contacts").await;
    assert_eq!(
        live,
        contacts_table(&app).await,
        "live and rebuilt disagree"
    );
    token.cancel();
    both.await.unwrap();
    app.stop().await;
}

/// Publishes `body` to the stream's subject again under a new message id, as a
/// redelivery would (JetStream does not drop it as a duplicate before the projector
/// sees it).
async fn redeliver(app: &TestApp, org: &Uuid, aggregate_type: &str, id: &str, body: Vec<u8>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", Uuid::new_v4().to_string().as_str());
    app.state
        .bus
        .jetstream
        .publish_with_headers(
            app.settings.nats.subject(org, aggregate_type, id),
            headers,
            Bytes::from(body),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Waits until the read models' consumer has nothing pending or unacknowledged.
async fn consumer_drained(app: &TestApp) {
    let drained = eventually(Duration::from_secs(10), || async {
        let mut c: async_nats::jetstream::consumer::PullConsumer = app
            .state
            .bus
            .stream
            .get_consumer(&all_read_models_consumer())
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "the read models' consumer did not drain");
}

/// The consumer of the worker that `crm serve` runs: every read model's name, sorted,
/// joined by `+`.
fn all_read_models_consumer() -> String {
    let mut names: Vec<&str> = read_models::all().iter().map(|p| p.name()).collect();
    names.sort();
    names.join("+")
}

/// An AI action run at once commits its three steps on its own stream and the contact's
/// change on the contact's, in one transaction, written by one request: JetStream
/// carries the four as one message (an array, in commit order, under the action's
/// subject). Read models apply every event of it once, also when the whole message is
/// delivered again.
#[tokio::test]
async fn an_ai_action_run_at_once_travels_as_one_message_applied_once() {
    let app = TestApp::spawn().await;
    let (contact, _) = app
        .create_contact(&json!({"given_name": "Ada", "company": "Old"}))
        .await;
    let r = app
        .post(
            "/v1/ai/actions",
            &json!({"type": "update_contact", "contact_id": contact,
                    "arguments": {"company": "Analytical Engines"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let action: Value = r.json().await.unwrap();
    assert_eq!(action["status"], "executed", "{action}");
    let action_id = action["id"].as_str().unwrap().to_owned();

    // Its steps and the contact's change between them are one message, in commit order.
    let messages = eventually(Duration::from_secs(20), || async {
        let with_action: Vec<(Vec<u8>, Vec<_>)> = app
            .stream_payloads()
            .await
            .into_iter()
            .filter_map(|body| {
                let events = crm_infra::feed::bus::events_of(&body).unwrap();
                events
                    .iter()
                    .any(|e| e.aggregate_id == action_id)
                    .then_some((body, events))
            })
            .collect();
        (!with_action.is_empty()).then_some(with_action)
    })
    .await
    .expect("the action's steps reached JetStream");
    let carried: Vec<Vec<(&str, i64, &str)>> = messages
        .iter()
        .map(|(_, events)| {
            events
                .iter()
                .map(|e| {
                    let stream = if e.aggregate_id == action_id {
                        "action"
                    } else {
                        assert_eq!(e.aggregate_id, contact.to_string());
                        "contact"
                    };
                    (stream, e.sequence, e.event_type.as_str())
                })
                .collect()
        })
        .collect();
    assert_eq!(
        carried,
        vec![vec![
            ("action", 1, "AiActionProposed"),
            ("action", 2, "AiActionAutoApproved"),
            ("contact", 2, "ContactUpdated"),
            ("action", 3, "AiActionExecuted"),
        ]]
    );
    let (body, events) = messages[0].clone();
    assert_eq!(body.first(), Some(&b'['), "a group is a JSON array");
    // Every event of the store is carried exactly once.
    let carried = published(&app).await;
    assert_eq!(
        carried.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        store_order(&app).await
    );
    assert!(
        app.stream_payloads().await.len() < carried.len(),
        "no message carried more than one event"
    );

    // The read models have the action whole, once.
    let applied = eventually(Duration::from_secs(20), || async {
        let (status, activity) = audit(&app, &action_id).await;
        (status.as_deref() == Some("executed") && activity == 3).then_some(())
    })
    .await;
    assert!(applied.is_some(), "{:?}", audit(&app, &action_id).await);

    // The message delivered again (a new message id, as a redelivery), then a later
    // event: nothing of it is applied twice.
    let first = &events[0];
    redeliver(
        &app,
        &first.org_id,
        &first.aggregate_type,
        &first.aggregate_id,
        body,
    )
    .await;
    let r = app
        .patch(
            &format!("/v1/contacts/{contact}"),
            &json!({"title": "Countess"}),
        )
        .await;
    let pos: i64 = r.json::<Value>().await.unwrap()["positions"][0]
        .as_i64()
        .unwrap();
    let got: Value = app
        .get(&format!("/v1/contacts/{contact}?min_position={pos}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["company"], "Analytical Engines");
    assert_eq!(got["title"], "Countess");
    assert_eq!(
        got["version"], 3,
        "created, changed by the action, patched: {got}"
    );
    consumer_drained(&app).await;
    assert_eq!(
        audit(&app, &action_id).await,
        (Some("executed".to_owned()), 3),
        "one activity entry per step despite the message's redelivery"
    );
    let contact_entries = count(
        &app,
        &format!("SELECT count(*) FROM activity WHERE entity_id = '{contact}'"),
    )
    .await;
    assert_eq!(contact_entries, 3, "one activity entry per contact event");
    app.stop().await;
}

/// An AI action as the read models have it: its status in the AI audit log, and its
/// activity entries.
async fn audit(app: &TestApp, action_id: &str) -> (Option<String>, i64) {
    let db = app.db().await;
    let status: Option<String> = db
        .query_opt(
            "SELECT status FROM ai_audit WHERE action_id = $1::text::uuid",
            &[&action_id],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    let activity: i64 = db
        .query_one(
            "SELECT count(*) FROM activity WHERE entity_id = $1",
            &[&action_id],
        )
        .await
        .unwrap()
        .get(0);
    (status, activity)
}
