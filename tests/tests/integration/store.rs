//! The event store's guarantees: append-only, tamper-evident, and no personal data in
//! clear in the events table or on the bus.

use std::sync::Arc;
use std::time::Duration;

use crm_infra::store::verify::verify_chains;
use crm_tests::harness::{eventually, TestApp};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn events_cannot_be_updated_deleted_or_truncated() {
    let app = TestApp::spawn().await;
    app.create_contact(&json!({"given_name": "Ada"})).await;
    let db = app.db().await;
    // As the application role: no privilege. As the superuser: the trigger refuses.
    for role in ["SET ROLE crm_app", "RESET ROLE"] {
        db.batch_execute(role).await.unwrap();
        for sql in [
            "UPDATE events SET event_type = 'Forged'",
            "DELETE FROM events",
            "TRUNCATE events",
            "DELETE FROM events WHERE false",
        ] {
            let err = db.batch_execute(sql).await.expect_err(sql);
            let msg = err
                .as_db_error()
                .map(|e| e.message().to_owned())
                .unwrap_or_default();
            assert!(
                msg.contains("permission denied") || msg.contains("append-only"),
                "{role}: {sql}: {msg}"
            );
        }
    }
    let n: i64 = db
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 3, "events are still there");
    app.stop().await;
}

#[tokio::test]
async fn verify_reports_a_tampered_event() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let r = app
        .patch(&format!("/v1/contacts/{id}"), &json!({"title": "Countess"}))
        .await;
    assert_eq!(r.status(), 200);
    let pool = app.admin_pool();
    let db = pool.get().await.unwrap();
    let clean = verify_chains(&db, None).await.unwrap();
    assert!(clean.ok(), "{:?}", clean.breaks);
    assert!(clean.events >= 4);

    db.batch_execute(&format!(
        "ALTER TABLE events DISABLE TRIGGER events_append_only; \
         UPDATE events SET payload = jsonb_set(payload, '{{ContactUpdated,cleared}}', '[\"title\"]') \
           WHERE aggregate_id = '{id}' AND sequence = 2; \
         ALTER TABLE events ENABLE TRIGGER events_append_only;"
    ))
    .await
    .unwrap();
    let report = verify_chains(&db, None).await.unwrap();
    assert_eq!(report.breaks.len(), 1, "{:?}", report.breaks);
    let b = &report.breaks[0];
    assert_eq!(
        (b.aggregate_id.as_str(), b.sequence),
        (id.to_string().as_str(), 2)
    );
    assert!(b.reason.contains("altered"), "{}", b.reason);

    // Removing an event from the middle of a chain is reported too.
    let (id2, _) = app.create_contact(&json!({"given_name": "Bob"})).await;
    for t in ["Dr", "Prof"] {
        app.patch(&format!("/v1/contacts/{id2}"), &json!({"title": t}))
            .await;
    }
    db.batch_execute(&format!(
        "ALTER TABLE events DISABLE TRIGGER events_append_only; \
         DELETE FROM events WHERE aggregate_id = '{id2}' AND sequence = 2; \
         ALTER TABLE events ENABLE TRIGGER events_append_only;"
    ))
    .await
    .unwrap();
    let report = verify_chains(&db, None).await.unwrap();
    assert!(report
        .breaks
        .iter()
        .any(|b| b.aggregate_id == id2.to_string() && b.sequence == 3));
    app.stop().await;
}

#[tokio::test]
async fn personal_data_is_not_in_the_events_table_nor_on_the_bus() {
    let app = TestApp::spawn().await;
    let canary = format!("canary{}", Uuid::new_v4().simple());
    let email = format!("{canary}@example.com");
    let agent = format!("agent-{canary}");
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .bearer_auth(&app.token)
        .header("user-agent", &agent)
        .json(&json!({
            "given_name": format!("Name{canary}"),
            "email": email,
            "phone": "+14155550123",
            "address": {"line1": format!("1 {canary} Street"), "country": "GB"},
            "custom": {"note": format!("note {canary}")}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let pos = v["positions"][0].as_i64().unwrap();

    // The service itself can read it back.
    let r = app
        .get(&format!("/v1/contacts/{id}?min_position={pos}"))
        .await;
    let got: serde_json::Value = r.json().await.unwrap();
    assert_eq!(got["email"], email.as_str());

    let db = app.db().await;
    for table in ["events", "snapshots", "data_keys"] {
        let n: i64 = db
            .query_one(
                &format!("SELECT count(*) FROM {table} t WHERE t::text ILIKE '%' || $1 || '%'"),
                &[&canary],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "plaintext found in {table}");
    }
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM events t WHERE t::text LIKE '%14155550123%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "phone in clear");

    let messages = eventually(Duration::from_secs(20), || async {
        let m = app.stream_payloads().await;
        let has_contact = m.iter().any(|b| {
            crm_infra::feed::bus::events_of(b).is_ok_and(|g| g.iter().any(|e| e.aggregate_id == id))
        });
        has_contact.then_some(m)
    })
    .await
    .expect("the contact's event reached JetStream");
    for body in &messages {
        let text = String::from_utf8_lossy(body);
        assert!(
            !text.to_lowercase().contains(&canary),
            "plaintext in a JetStream message"
        );
        assert!(!text.contains("14155550123"));
    }
    app.stop().await;
}

#[tokio::test]
async fn long_streams_load_from_an_encrypted_snapshot() {
    let app = TestApp::spawn().await;
    let canary = format!("snap{}", Uuid::new_v4().simple());
    let (id, _) = app.create_contact(&json!({"given_name": canary})).await;
    let path = format!("/v1/contacts/{id}");
    for i in 0..55 {
        let r = app.patch(&path, &json!({"custom": {"n": i}})).await;
        assert_eq!(r.status(), 200);
    }
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT last_sequence, s::text LIKE '%' || $2 || '%' FROM snapshots s WHERE aggregate_id = $1",
            &[&id.to_string(), &canary],
        )
        .await
        .expect("a snapshot was taken");
    assert_eq!(row.get::<_, i64>(0), 50);
    assert!(!row.get::<_, bool>(1), "snapshot holds plaintext");
    // Commands after the snapshot see the right version and state.
    let r = app
        .patch(&path, &json!({"title": "Dr", "expected_version": 56}))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["version"], 57);
    let pos = v["positions"][0].as_i64().unwrap();
    let got: serde_json::Value = app
        .get(&format!("{path}?min_position={pos}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (got["given_name"].as_str(), got["custom"]["n"].as_i64()),
        (Some(canary.as_str()), Some(54))
    );
    app.stop().await;
}

/// After a burst has opened several connections, steady one-at-a-time work stays on
/// the most recently used one instead of cycling through them all (round-robin over
/// every connection a burst opened cost ~15 % more PostgreSQL CPU per command:
/// docs/benchmarks.md).
#[tokio::test]
async fn the_pool_reuses_its_most_recently_used_connection() {
    let app = TestApp::spawn().await;
    let pool = app.admin_pool();
    async fn pid(c: &deadpool_postgres::Object) -> i32 {
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    }
    // A burst: three connections at once, given back oldest first.
    let burst = [
        pool.get().await.unwrap(),
        pool.get().await.unwrap(),
        pool.get().await.unwrap(),
    ];
    let mut pids = Vec::new();
    for c in &burst {
        pids.push(pid(c).await);
    }
    drop(burst);
    // Steady work, one checkout at a time: always the last one given back.
    for _ in 0..5 {
        let c = pool.get().await.unwrap();
        assert_eq!(pid(&c).await, pids[2], "burst opened {pids:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_cold_key_cache_is_filled_for_a_whole_batch_in_one_query() {
    let app = TestApp::spawn().await;
    let mut subjects = Vec::new();
    for i in 0..5 {
        let (id, _) = app
            .create_contact(&json!({"given_name": "Ada", "email": format!("ada{i}@example.com")}))
            .await;
        subjects.push((app.org_id, id.to_string()));
    }
    // Another process's view: the same key-encryption key, nothing cached.
    let cold = crm_infra::crypto::Crypto::new(&app.settings.keys).unwrap();
    let unknown = Uuid::now_v7().to_string();
    let mut asked: Vec<(Uuid, &str)> = subjects.iter().map(|(o, s)| (*o, s.as_str())).collect();
    asked.push((app.org_id, unknown.as_str()));
    // Another organisation's id for a subject that exists: not its key.
    let other_org = Uuid::now_v7();
    asked.push((other_org, subjects[0].1.as_str()));
    let client = app.state.pool.get().await.unwrap();
    cold.prefetch_keys(&client, &asked).await.unwrap();
    for (i, (org, subject)) in subjects.iter().enumerate() {
        assert!(
            cold.cached_key(org, subject).is_some(),
            "fetched and cached"
        );
        // The key that decrypts the subject's events.
        let stream = crm_infra::store::event_store::StreamId {
            org_id: *org,
            aggregate_type: "contact",
            aggregate_id: subject,
        };
        let stored = crm_infra::store::event_store::read_stream(&client, &stream, 0, None)
            .await
            .unwrap();
        let first = stored.into_iter().next().unwrap();
        let decoded = crm_infra::store::decode::decode(&cold, &client, first)
            .await
            .unwrap();
        assert!(
            decoded
                .payload
                .to_string()
                .contains(&format!("ada{i}@example.com")),
            "{}",
            decoded.payload
        );
    }
    assert!(cold.cached_key(&app.org_id, &unknown).is_none());
    assert!(cold.cached_key(&other_org, &subjects[0].1).is_none());
    app.stop().await;
}

/// A profile as the API would parse it.
fn profile(v: serde_json::Value) -> crm_domain::contact::ContactProfile {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn a_unit_commits_all_its_streams_together_or_nothing_when_one_moved_on() {
    use crm_domain::contact::{Contact, ContactChanges, ContactCommand};
    use crm_domain::metadata::EventMetadata;
    use crm_infra::commands::executor::Loaded;
    use crm_infra::commands::unit::Unit;
    use crm_infra::store::event_store::StoreError;

    let app = TestApp::spawn().await;
    let ex = app.state.executor.clone();
    let org = app.org_id;
    let meta = EventMetadata::system(org, "test");
    let (existing, _) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let existing_id = existing.to_string();
    // A unit: a change of the existing contact, and a new contact.
    let stage = |fresh: Uuid| {
        let (ex, meta, existing_id) = (ex.clone(), meta.clone(), existing_id.clone());
        async move {
            let client = ex.pool().get().await.unwrap();
            let mut loaded = ex
                .load::<Contact>(&client, org, &existing_id)
                .await
                .unwrap();
            let mut unit = Unit::new();
            let changes = ContactChanges {
                set: profile(json!({"title": "Countess"})),
                ..ContactChanges::default()
            };
            ex.stage::<Contact>(
                &mut unit,
                org,
                &existing_id,
                &mut loaded,
                ContactCommand::Update { changes },
                &meta,
            )
            .await
            .unwrap();
            let mut new = Loaded {
                aggregate: Contact::default(),
                head: Default::default(),
            };
            let create = ContactCommand::Create {
                contact_id: fresh,
                org_id: org,
                profile: profile(json!({"given_name": "Eve", "email": "eve@example.com"})),
            };
            ex.stage::<Contact>(&mut unit, org, &fresh.to_string(), &mut new, create, &meta)
                .await
                .unwrap();
            unit
        }
    };
    let db = app.db().await;
    let count = |id: Uuid| {
        let db = &db;
        async move {
            let n: i64 = db
                .query_one(
                    "SELECT count(*) FROM events WHERE aggregate_id = $1",
                    &[&id.to_string()],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };

    // The existing contact moves on between staging and commit: nothing of the unit is
    // stored, although the new contact's stream had nothing to conflict with; the single
    // appends committed beside it (often in the same statement) are all stored.
    let lost = Uuid::now_v7();
    let unit = stage(lost).await;
    let r = app
        .patch(&format!("/v1/contacts/{existing}"), &json!({"title": "Dr"}))
        .await;
    assert_eq!(r.status(), 200);
    let singles: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
    let creates = singles.iter().map(|id| {
        let command = ContactCommand::Create {
            contact_id: *id,
            org_id: org,
            profile: profile(json!({"given_name": "Bob"})),
        };
        let (ex, meta) = (&ex, &meta);
        async move {
            ex.execute::<Contact>(org, &id.to_string(), command, meta, Some(0))
                .await
        }
    });
    let (committed, created) = tokio::join!(ex.commit(unit), futures::future::join_all(creates));
    assert!(
        matches!(committed, Err(StoreError::Conflict)),
        "{committed:?}"
    );
    assert_eq!(count(lost).await, 0, "no half of the unit is stored");
    assert_eq!(
        count(existing).await,
        2,
        "the contact has its create and the PATCH"
    );
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    for id in &singles {
        assert_eq!(count(*id).await, 1);
    }

    // Staged on the contact as it is now: both streams are written, in one transaction,
    // in staging order, chained, and readable like any command's events.
    let fresh = Uuid::now_v7();
    let appended = ex.commit(stage(fresh).await).await.unwrap();
    assert_eq!(appended.len(), 2);
    assert!(appended[0].global_position < appended[1].global_position);
    assert_eq!(appended[0].sequence, 3, "after the create and the PATCH");
    assert_eq!(appended[1].sequence, 1);
    let txs: i64 = db
        .query_one(
            "SELECT count(DISTINCT tx_id) FROM events WHERE event_id = ANY($1)",
            &[&appended.iter().map(|a| a.event_id).collect::<Vec<_>>()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(txs, 1, "one commit");
    let report = verify_chains(&app.admin_pool().get().await.unwrap(), None)
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.breaks);
    let r = app.get(&format!("/v1/contacts/{existing}/history")).await;
    assert_eq!(r.status(), 200);
    let history = r.text().await.unwrap();
    assert!(history.contains("Countess"), "{history}");
    let client = app.state.pool.get().await.unwrap();
    let eve = ex
        .load::<Contact>(&client, org, &fresh.to_string())
        .await
        .unwrap();
    assert_eq!(eve.head.version, 1);
    assert!(format!("{:?}", eve.aggregate).contains("eve@example.com"));
    // Personal data is sealed at rest as for any append.
    let raw: String = db
        .query_one(
            "SELECT payload::text FROM events WHERE event_id = $1",
            &[&appended[1].event_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!raw.contains("eve@example.com"), "{raw}");
    app.stop().await;
}

#[tokio::test]
async fn a_rewound_unit_commits_only_what_was_staged_before_the_mark() {
    use crm_domain::contact::{Contact, ContactCommand};
    use crm_domain::metadata::EventMetadata;
    use crm_infra::commands::executor::Loaded;
    use crm_infra::commands::unit::Unit;

    let app = TestApp::spawn().await;
    let ex = app.state.executor.clone();
    let org = app.org_id;
    let meta = EventMetadata::system(org, "test");
    let create = |id: Uuid, name: &str| ContactCommand::Create {
        contact_id: id,
        org_id: org,
        profile: profile(json!({"given_name": name, "email": format!("{name}@example.com")})),
    };
    let fresh = || Loaded {
        aggregate: Contact::default(),
        head: Default::default(),
    };
    let (kept, dropped) = (Uuid::now_v7(), Uuid::now_v7());
    let mut unit = Unit::new();
    let mut a = fresh();
    ex.stage::<Contact>(
        &mut unit,
        org,
        &kept.to_string(),
        &mut a,
        create(kept, "ada"),
        &meta,
    )
    .await
    .unwrap();
    let mark = unit.mark();
    let mut b = fresh();
    ex.stage::<Contact>(
        &mut unit,
        org,
        &dropped.to_string(),
        &mut b,
        create(dropped, "bob"),
        &meta,
    )
    .await
    .unwrap();
    unit.rewind(mark);
    let appended = ex.commit(unit).await.unwrap();
    assert_eq!(appended.len(), 1);
    let db = app.db().await;
    for (id, events, keys) in [(kept, 1, 1), (dropped, 0, 0)] {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM events WHERE aggregate_id = $1), \
                        (SELECT count(*) FROM data_keys WHERE subject_id = $1)",
                &[&id.to_string()],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (events, keys),
            "{id}"
        );
    }
    // The dropped contact can still be created later, with a key of its own.
    ex.execute::<Contact>(
        org,
        &dropped.to_string(),
        create(dropped, "bob"),
        &meta,
        Some(0),
    )
    .await
    .unwrap();
    app.stop().await;
}

/// The reads before commands are batched (`crm_infra::store::stream_reader`): loads
/// made at once each get their own streams, in their order, scoped by organisation,
/// decrypted with the subject's key read in the same statement (here a process with
/// nothing cached), and an erased subject's personal data reads as gone.
#[tokio::test]
async fn batched_loads_get_their_own_streams_decrypted_and_scoped_by_organisation() {
    use crm_domain::contact::Contact;
    use crm_domain::organization::Organization;
    use crm_infra::commands::executor::Executor;

    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let (id, _) = app
            .create_contact(&json!({"given_name": "Ada", "email": format!("ada{i}@example.com")}))
            .await;
        ids.push(id);
    }
    let r = app
        .patch(
            &format!("/v1/contacts/{}", ids[1]),
            &json!({"company": "Acme"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .post(&format!("/v1/contacts/{}/erase", ids[5]), &json!({}))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // Another process: the same key-encryption key, no key cached.
    let cold = Arc::new(crm_infra::crypto::Crypto::new(&app.settings.keys).unwrap());
    let executor = Executor::new(app.state.pool.clone(), cold);
    let org = app.org_id;
    let names: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let other_org = Uuid::now_v7();
    let org_stream = org.to_string();
    // All at once: one load of several, single loads, a pair of two types, and a
    // load under another organisation.
    let (many, single, pair, foreign) = tokio::join!(
        executor.load_many::<Contact>(org, &names[..3]),
        futures::future::join_all(
            names[3..]
                .iter()
                .map(|id| executor.load_batched::<Contact>(org, id))
        ),
        executor.load_two::<Organization, Contact>(org, &org_stream, &names[2]),
        executor.load_batched::<Contact>(other_org, &names[0]),
    );
    let many = many.unwrap();
    let single: Vec<_> = single.into_iter().map(Result::unwrap).collect();
    let (organisation, pair_contact) = pair.unwrap();
    let email = |c: &Contact| c.profile.email.as_ref().map(|e| e.as_str().to_owned());
    for (i, loaded) in many.iter().chain(&single).enumerate() {
        assert_eq!(loaded.aggregate.id, Some(ids[i]), "stream {i} in its place");
        if i == 5 {
            assert!(loaded.aggregate.erased);
            assert_eq!(email(&loaded.aggregate), None, "erased: the key is gone");
        } else {
            assert_eq!(
                email(&loaded.aggregate),
                Some(format!("ada{i}@example.com"))
            );
        }
    }
    assert_eq!(many[1].head.version, 2, "created, then updated");
    let company = many[1]
        .aggregate
        .profile
        .company
        .as_ref()
        .map(|c| c.as_str());
    assert_eq!(company, Some("Acme"));
    assert!(
        organisation.head.version > 0,
        "the organisation's own stream"
    );
    assert_eq!(pair_contact.aggregate.id, Some(ids[2]));
    let foreign = foreign.unwrap();
    assert_eq!(
        (foreign.head.version, foreign.aggregate.id),
        (0, None),
        "another organisation's stream reads as empty"
    );
    app.stop().await;
}
