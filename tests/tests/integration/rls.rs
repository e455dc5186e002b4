//! Row-level security on the read models: a query that forgets its org filter, run as
//! the service's database role, still sees one organisation only, before and after a
//! rebuild swaps the table.

use crm_infra::read_models;
use crm_tests::harness::TestApp;
use serde_json::{json, Value};
use uuid::Uuid;

/// (org ids, contact count, activity count) seen by an unfiltered query.
async fn unfiltered(app: &TestApp, scope: Option<Uuid>) -> (Vec<Uuid>, i64, i64) {
    let mut client = app.state.pool.get().await.unwrap();
    let tx = match scope {
        Some(org) => read_models::org_scope(&mut client, org).await.unwrap(),
        None => client.transaction().await.unwrap(),
    };
    // No `WHERE org_id = …`: the bug this wall is for.
    let orgs: Vec<Uuid> = tx
        .query("SELECT DISTINCT org_id FROM contacts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let contacts: i64 = tx
        .query_one("SELECT count(*) FROM contacts", &[])
        .await
        .unwrap()
        .get(0);
    let activity: i64 = tx
        .query_one("SELECT count(*) FROM activity", &[])
        .await
        .unwrap()
        .get(0);
    // The `q` search runs as the tables' owner (row-level security would keep its
    // index out) and applies the same wall itself: asked for every row, it answers
    // exactly the rows the policy lets this transaction see.
    let matching: Vec<Uuid> = tx
        .query(
            "SELECT org_id FROM contacts_matching('%', NULL, NULL, NULL, NULL, NULL, 1000)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        matching.len() as i64,
        contacts,
        "contacts_matching: {matching:?}"
    );
    assert!(
        matching.iter().all(|o| orgs.contains(o)),
        "contacts_matching: {matching:?}"
    );
    (orgs, contacts, activity)
}

#[tokio::test]
async fn a_query_without_its_org_filter_sees_one_organisation() {
    let app = TestApp::spawn().await;
    let (_, a_pos) = app.create_contact(&json!({"given_name": "Ada"})).await;
    app.create_contact(&json!({"given_name": "Alan"})).await;
    let (b_org, _, b_token) = app.another_org("Other").await;
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .bearer_auth(&b_token)
        .json(&json!({"given_name": "Bea"}))
        .send()
        .await
        .unwrap();
    let b_pos = r.json::<Value>().await.unwrap()["positions"][0]
        .as_i64()
        .unwrap();
    // Wait until both are projected.
    for (token, pos) in [(&app.token, a_pos), (&b_token, b_pos)] {
        let r = app
            .http
            .get(app.url(&format!("/v1/contacts?min_position={pos}&wait_ms=5000")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let total: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM contacts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 3, "as superuser, all rows are there");

    for round in ["before a rebuild", "after a rebuild"] {
        let (orgs, contacts, activity) = unfiltered(&app, Some(app.org_id)).await;
        assert_eq!(orgs, [app.org_id], "{round}");
        assert_eq!(contacts, 2, "{round}");
        assert!(activity >= 2, "{round}");
        let (orgs, contacts, _) = unfiltered(&app, Some(b_org)).await;
        assert_eq!((orgs, contacts), (vec![b_org], 1), "{round}");
        let nothing = unfiltered(&app, None).await;
        assert_eq!(
            nothing,
            (vec![], 0, 0),
            "{round}: no organisation named, nothing seen"
        );
        app.rebuild("contacts").await;
        app.rebuild("activity").await;
    }
    // The projectors (every organisation) still write after the swap.
    let (_, pos) = app.create_contact(&json!({"given_name": "Ana"})).await;
    let r = app
        .get(&format!("/v1/contacts?min_position={pos}&wait_ms=5000"))
        .await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    app.stop().await;
}
