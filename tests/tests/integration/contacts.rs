//! Contacts as a staff user sees them: commands, reads, lists, history, as_of, the
//! activity log, and isolation between organisations.

use std::collections::HashSet;
use std::time::Duration;

use crm_tests::harness::TestApp;
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test]
async fn create_then_read_your_write() {
    let app = TestApp::spawn().await;
    let (id, pos) = app
        .create_contact(&json!({"given_name": "Ada", "email": "ada@example.com"}))
        .await;
    let r = app
        .get(&format!("/v1/contacts/{id}?min_position={pos}"))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["given_name"], "Ada");
    assert_eq!(v["version"], 1);
    app.stop().await;
}

/// Asserts `status` and returns the JSON body (the body is shown when the status differs).
async fn expect(r: reqwest::Response, status: u16) -> Value {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The single position of a command that wrote one event.
fn one_position(outcome: &Value) -> i64 {
    let positions = outcome["positions"].as_array().expect("positions array");
    assert_eq!(positions.len(), 1, "one event written: {outcome}");
    positions[0].as_i64().expect("positions are integers")
}

/// Percent-encodes what an RFC 3339 time needs in a query string.
fn enc(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace(':', "%3A")
        .replace('+', "%2B")
}

#[tokio::test]
async fn create_and_get_round_trips_every_field() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/contacts",
            &json!({
                "given_name": "  Grace ",
                "family_name": "Hopper",
                "email": "Grace.Hopper@Navy.MIL",
                "phone": "+12025550143",
                "address": {
                    "line1": "1 Compiler Way",
                    "line2": "Suite 7",
                    "city": "Arlington",
                    "region": "VA",
                    "postal_code": "22201",
                    "country": "us"
                },
                "company": "US Navy",
                "title": "Rear Admiral",
                "custom": {"rank": "RADM", "bugs_found": 1, "ratio": 0.5, "retired": true}
            }),
        )
        .await;
    let location = r
        .headers()
        .get("location")
        .expect("a Location header")
        .to_str()
        .unwrap()
        .to_owned();
    let created = expect(r, 201).await;
    let id: Uuid = created["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(location, format!("/v1/contacts/{id}"));
    assert_eq!(created["version"], 1);
    let pos = one_position(&created);
    assert!(pos > 0);

    let v = expect(
        app.get(&format!("/v1/contacts/{id}?min_position={pos}"))
            .await,
        200,
    )
    .await;
    assert_eq!(v["id"], id.to_string());
    assert_eq!(v["version"], 1);
    assert_eq!(v["archived"], false);
    assert_eq!(v["given_name"], "Grace", "trimmed");
    assert_eq!(v["family_name"], "Hopper");
    assert_eq!(v["email"], "Grace.Hopper@navy.mil", "domain lower-cased");
    assert_eq!(v["phone"], "+12025550143");
    assert_eq!(
        v["address"],
        json!({
            "line1": "1 Compiler Way", "line2": "Suite 7", "city": "Arlington",
            "region": "VA", "postal_code": "22201", "country": "US"
        })
    );
    assert_eq!(v["company"], "US Navy");
    assert_eq!(v["title"], "Rear Admiral");
    assert_eq!(
        v["custom"],
        json!({"rank": "RADM", "bugs_found": 1, "ratio": 0.5, "retired": true})
    );
    for ts in ["created_at", "updated_at"] {
        let s = v[ts]
            .as_str()
            .unwrap_or_else(|| panic!("{ts} missing: {v}"));
        chrono::DateTime::parse_from_rfc3339(s).expect("RFC 3339 timestamps");
    }
    app.stop().await;
}

#[tokio::test]
async fn updates_set_and_clear_fields_and_bump_the_version() {
    let app = TestApp::spawn().await;
    let (id, p1) = app
        .create_contact(&json!({
            "given_name": "Alan",
            "email": "alan@example.com",
            "phone": "+441632960001",
            "address": {"city": "Manchester", "country": "GB"},
            "company": "NPL",
            "custom": {"tier": "gold", "score": 7}
        }))
        .await;
    let path = format!("/v1/contacts/{id}");

    let r = expect(
        app.patch(
            &path,
            &json!({
                "family_name": "Turing",
                "email": null,
                "address": null,
                "company": "University of Manchester",
                "custom": {"tier": null, "score": 8, "active": false}
            }),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(r["id"], id.to_string());
    assert_eq!(r["version"], 2);
    let p2 = one_position(&r);
    assert!(p2 > p1, "positions grow: {p1} then {p2}");

    let v = expect(app.get(&format!("{path}?min_position={p2}")).await, 200).await;
    assert_eq!(v["version"], 2);
    assert_eq!(v["given_name"], "Alan", "untouched field kept");
    assert_eq!(v["phone"], "+441632960001", "untouched field kept");
    assert_eq!(v["family_name"], "Turing");
    assert_eq!(v["company"], "University of Manchester");
    assert!(v.get("email").is_none_or(Value::is_null), "cleared: {v}");
    assert!(v.get("address").is_none_or(Value::is_null), "cleared: {v}");
    assert_eq!(v["custom"], json!({"score": 8, "active": false}));

    // With the right expected_version it applies; with a stale one it is refused.
    let r = expect(
        app.patch(&path, &json!({"title": "Dr", "expected_version": 2}))
            .await,
        200,
    )
    .await;
    assert_eq!(r["version"], 3);
    let p3 = one_position(&r);
    assert!(p3 > p2);
    let r = expect(
        app.patch(&path, &json!({"title": "Prof", "expected_version": 2}))
            .await,
        409,
    )
    .await;
    assert_eq!(r["code"], "version_conflict");
    let v = expect(app.get(&format!("{path}?min_position={p3}")).await, 200).await;
    assert_eq!(
        (v["title"].as_str(), v["version"].as_i64()),
        (Some("Dr"), Some(3)),
        "the stale update changed nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_update_that_changes_nothing_keeps_the_version_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let (id, pos) = app
        .create_contact(&json!({"given_name": "Ada", "company": "Engines", "custom": {"k": 1}}))
        .await;
    let path = format!("/v1/contacts/{id}");
    for same in [
        json!({"given_name": "Ada"}),
        json!({"given_name": " Ada ", "company": "Engines"}),
        json!({"custom": {"k": 1}}),
        json!({"title": null}),
        json!({"custom": {"absent": null}}),
    ] {
        let r = expect(app.patch(&path, &same).await, 200).await;
        assert_eq!(r["version"], 1, "no change for {same}");
        assert_eq!(r["positions"], json!([]), "nothing written for {same}");
    }
    let h = expect(app.get(&format!("{path}/history")).await, 200).await;
    assert_eq!(
        h["events"].as_array().unwrap().len(),
        1,
        "only the creation"
    );
    let v = expect(app.get(&format!("{path}?min_position={pos}")).await, 200).await;
    assert_eq!(v["version"], 1);
    app.stop().await;
}

#[tokio::test]
async fn an_archived_contact_refuses_updates() {
    let app = TestApp::spawn().await;
    let (id, _) = app
        .create_contact(&json!({"given_name": "Ada", "title": "Miss"}))
        .await;
    let r = expect(
        app.post(&format!("/v1/contacts/{id}/archive"), &json!({}))
            .await,
        200,
    )
    .await;
    assert_eq!(r["version"], 2);
    let pos = one_position(&r);

    let r = expect(
        app.patch(&format!("/v1/contacts/{id}"), &json!({"title": "Countess"}))
            .await,
        409,
    )
    .await;
    assert_eq!(r["code"], "version_conflict");
    assert!(r["message"].as_str().unwrap().contains("archived"), "{r}");
    let r = expect(
        app.post(&format!("/v1/contacts/{id}/archive"), &json!({}))
            .await,
        409,
    )
    .await;
    assert_eq!(r["code"], "version_conflict");

    let v = expect(
        app.get(&format!("/v1/contacts/{id}?min_position={pos}"))
            .await,
        200,
    )
    .await;
    assert_eq!(
        (
            v["archived"].as_bool(),
            v["title"].as_str(),
            v["version"].as_i64()
        ),
        (Some(true), Some("Miss"), Some(2))
    );
    // Archiving or updating a contact that never existed is a 404.
    let ghost = Uuid::now_v7();
    expect(
        app.post(&format!("/v1/contacts/{ghost}/archive"), &json!({}))
            .await,
        404,
    )
    .await;
    expect(
        app.patch(&format!("/v1/contacts/{ghost}"), &json!({"title": "x"}))
            .await,
        404,
    )
    .await;
    app.stop().await;
}

/// The ids of a list response.
fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items array")
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn lists_paginate_in_order_and_filter() {
    let app = TestApp::spawn().await;
    let people = [
        ("Ada", "Lovelace", "Analytical"),
        ("Charles", "Babbage", "Analytical"),
        ("Grace", "Hopper", "Navy"),
        ("Alan", "Turing", "NPL"),
        ("Edsger", "Dijkstra", "Mathematisch Centrum"),
        ("Barbara", "Liskov", "MIT"),
        ("Donald", "Knuth", "Stanford"),
    ];
    let mut created = Vec::new();
    let mut last = 0;
    for (given, family, company) in people {
        let (id, pos) = app
            .create_contact(&json!({
                "given_name": given, "family_name": family, "company": company,
                "email": format!("{}@Example.com", given.to_lowercase())
            }))
            .await;
        created.push(id.to_string());
        last = pos;
    }

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/contacts?limit=3&after={a}&min_position={last}"),
            None => format!("/v1/contacts?limit=3&min_position={last}"),
        };
        let page = expect(app.get(&path).await, 200).await;
        pages += 1;
        let page_ids = ids(&page);
        assert!(page_ids.len() <= 3, "limit respected");
        seen.extend(page_ids);
        match page["next_after"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3, "7 contacts at 3 per page");
    assert_eq!(
        seen, created,
        "every contact exactly once, in creation order"
    );

    let r = expect(
        app.post(&format!("/v1/contacts/{}/archive", created[2]), &json!({}))
            .await,
        200,
    )
    .await;
    let last = one_position(&r);
    let app_ref = &app;
    let list = |q: &str| {
        let path = format!("/v1/contacts?{q}&min_position={last}");
        async move { ids(&expect(app_ref.get(&path).await, 200).await) }
    };
    assert_eq!(
        list("email=GRACE%40example.COM&archived=any").await,
        [created[2].clone()]
    );
    assert_eq!(list("email=ada%40example.com").await, [created[0].clone()]);
    assert!(list("email=nobody%40example.com").await.is_empty());
    assert_eq!(
        list("company=Analytical").await,
        [created[0].clone(), created[1].clone()]
    );
    assert!(
        list("company=analytical").await.is_empty(),
        "company is exact"
    );
    assert_eq!(
        list("q=TURING").await,
        [created[3].clone()],
        "q by family name"
    );
    assert_eq!(
        list("q=stan").await,
        [created[6].clone()],
        "q by company substring"
    );
    assert_eq!(
        list("q=barbara%40").await,
        [created[5].clone()],
        "q by email"
    );
    let active: Vec<String> = created
        .iter()
        .filter(|c| **c != created[2])
        .cloned()
        .collect();
    assert_eq!(list("").await, active, "archived hidden by default");
    assert_eq!(list("archived=false").await, active);
    assert_eq!(list("archived=true").await, [created[2].clone()]);
    assert_eq!(list("archived=any").await, created);
    assert!(
        list("company=Navy").await.is_empty(),
        "filters combine with the archived default"
    );
    app.stop().await;
}

#[tokio::test]
async fn history_records_who_did_what_from_where() {
    let app = TestApp::spawn().await;
    let send = |rb: reqwest::RequestBuilder, ua: &'static str| {
        rb.bearer_auth(&app.token).header("user-agent", ua).send()
    };
    let r = send(
        app.http
            .post(app.url("/v1/contacts"))
            .json(&json!({"given_name": "Ada", "title": "Miss"})),
        "history-create/1.0",
    )
    .await
    .unwrap();
    let rid_create = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let created = expect(r, 201).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let r = send(
        app.http
            .patch(app.url(&format!("/v1/contacts/{id}")))
            .json(&json!({"title": "Countess", "company": null})),
        "history-update/2.0",
    )
    .await
    .unwrap();
    let rid_update = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    expect(r, 200).await;
    let r = send(
        app.http
            .post(app.url(&format!("/v1/contacts/{id}/archive"))),
        "history-archive/3.0",
    )
    .await
    .unwrap();
    let rid_archive = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let archived = expect(r, 200).await;
    assert_ne!(rid_create, rid_update, "each request has its own id");

    let h = expect(app.get(&format!("/v1/contacts/{id}/history")).await, 200).await;
    assert_eq!(h["id"], id.as_str());
    let events = h["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["ContactCreated", "ContactUpdated", "ContactArchived"]
    );
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    let positions: Vec<i64> = events
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(positions[0], created["positions"][0].as_i64().unwrap());
    assert_eq!(positions[2], archived["positions"][0].as_i64().unwrap());
    let event_ids: HashSet<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(event_ids.len(), 3, "distinct event ids");
    assert_eq!(events[0]["data"]["profile"]["given_name"], "Ada");
    assert_eq!(events[1]["data"]["set"]["title"], "Countess");

    for (event, rid, ua) in [
        (&events[0], &rid_create, "history-create/1.0"),
        (&events[1], &rid_update, "history-update/2.0"),
        (&events[2], &rid_archive, "history-archive/3.0"),
    ] {
        let m = &event["metadata"];
        assert_eq!(m["principal"]["kind"], "user", "{m}");
        assert_eq!(m["principal"]["id"], app.user_id.to_string(), "{m}");
        assert_eq!(m["request_id"], rid.as_str(), "{m}");
        assert_eq!(m["user_agent"], ua, "{m}");
        let ip = m["ip"].as_str().expect("ip recorded");
        assert!(
            ip.parse::<std::net::IpAddr>().unwrap().is_loopback(),
            "{ip}"
        );
        chrono::DateTime::parse_from_rfc3339(m["occurred_at"].as_str().unwrap()).unwrap();
        chrono::DateTime::parse_from_rfc3339(event["recorded_at"].as_str().unwrap()).unwrap();
        assert!(
            event["hash"].as_str().is_some_and(|h| !h.is_empty()),
            "hash: {event}"
        );
    }
    let hashes: HashSet<&str> = events.iter().map(|e| e["hash"].as_str().unwrap()).collect();
    assert_eq!(hashes.len(), 3, "each event has its own hash");

    expect(
        app.get(&format!("/v1/contacts/{}/history", Uuid::now_v7()))
            .await,
        404,
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn as_of_shows_the_contact_as_it_was() {
    let app = TestApp::spawn().await;
    let pause = || tokio::time::sleep(Duration::from_millis(60));
    let before_creation = chrono::Utc::now();
    pause().await;
    let (id, _) = app
        .create_contact(&json!({"given_name": "Ada", "title": "Miss", "company": "Home"}))
        .await;
    pause().await;
    let after_create = chrono::Utc::now();
    pause().await;
    expect(
        app.patch(
            &format!("/v1/contacts/{id}"),
            &json!({"title": "Countess", "company": null}),
        )
        .await,
        200,
    )
    .await;
    pause().await;
    let after_update = chrono::Utc::now();
    pause().await;
    expect(
        app.patch(&format!("/v1/contacts/{id}"), &json!({"title": "Lady"}))
            .await,
        200,
    )
    .await;

    let app_ref = &app;
    let at = |t: chrono::DateTime<chrono::Utc>| {
        let path = format!("/v1/contacts/{id}?as_of={}", enc(t));
        async move { app_ref.get(&path).await }
    };
    let v = expect(at(after_create).await, 200).await;
    assert_eq!(
        (
            v["title"].as_str(),
            v["company"].as_str(),
            v["version"].as_i64()
        ),
        (Some("Miss"), Some("Home"), Some(1)),
        "{v}"
    );
    let v = expect(at(after_update).await, 200).await;
    assert_eq!(
        (v["title"].as_str(), v["version"].as_i64()),
        (Some("Countess"), Some(2)),
        "{v}"
    );
    assert!(v.get("company").is_none_or(Value::is_null), "cleared: {v}");
    let v = expect(
        at(chrono::Utc::now() + chrono::Duration::seconds(1)).await,
        200,
    )
    .await;
    assert_eq!(
        (v["title"].as_str(), v["version"].as_i64()),
        (Some("Lady"), Some(3))
    );
    let v = expect(at(before_creation).await, 404).await;
    assert_eq!(v["code"], "not_found");
    // An offset time means the same instant as its UTC form.
    let offset = after_create
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339()
        .replace(':', "%3A")
        .replace('+', "%2B");
    let v = expect(
        app.get(&format!("/v1/contacts/{id}?as_of={offset}")).await,
        200,
    )
    .await;
    assert_eq!(v["title"], "Miss");
    // A bad consistency parameter is refused also beside `as_of` (which makes it moot),
    // on the contact and on its consent state.
    for path in [
        format!("/v1/contacts/{id}?as_of={offset}&min_position=-5"),
        format!("/v1/contacts/{id}?as_of={offset}&wait_ms=600001"),
        format!("/v1/contacts/{id}/consent?as_of={offset}&min_position=0"),
    ] {
        let v = expect(app.get(&path).await, 400).await;
        assert_eq!(v["code"], "invalid_query", "{path}: {v}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_activity_log_names_actor_action_and_entity() {
    let app = TestApp::spawn().await;
    let (a, _) = app.create_contact(&json!({"given_name": "Ada"})).await;
    let (b, _) = app.create_contact(&json!({"given_name": "Bob"})).await;
    let r = app
        .patch(&format!("/v1/contacts/{a}"), &json!({"title": "Countess"}))
        .await;
    let update_rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    expect(r, 200).await;
    let r = expect(
        app.post(&format!("/v1/contacts/{b}/archive"), &json!({}))
            .await,
        200,
    )
    .await;
    let last = one_position(&r);

    let all = expect(
        app.get(&format!(
            "/v1/activity?entity_type=contact&min_position={last}"
        ))
        .await,
        200,
    )
    .await;
    let items = all["items"].as_array().unwrap();
    let summary: Vec<(String, String)> = items
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["entity"]["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let s = |action: &str, id: Uuid| (action.to_owned(), id.to_string());
    assert_eq!(
        summary,
        [
            s("ContactArchived", b),
            s("ContactUpdated", a),
            s("ContactCreated", b),
            s("ContactCreated", a)
        ],
        "newest first"
    );
    for e in items {
        assert_eq!(
            e["actor"],
            json!({"kind": "user", "id": app.user_id.to_string()})
        );
        assert_eq!(e["entity"]["type"], "contact");
        assert!(e["event_id"].is_string() && e["position"].is_i64(), "{e}");
        assert!(e["occurred_at"].is_string() && e["recorded_at"].is_string());
    }
    assert_eq!(items[0]["position"].as_i64(), Some(last));
    assert_eq!(items[1]["request_id"], update_rid.as_str());

    let by_entity = expect(app.get(&format!("/v1/activity?entity_id={a}")).await, 200).await;
    let actions: Vec<&str> = by_entity["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["ContactUpdated", "ContactCreated"]);
    let created = expect(app.get("/v1/activity?action=ContactCreated").await, 200).await;
    let created_ids: Vec<&str> = created["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entity"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(created_ids, [b.to_string(), a.to_string()]);
    let by_actor = expect(
        app.get(&format!(
            "/v1/activity?actor_id={}&entity_type=contact",
            app.user_id
        ))
        .await,
        200,
    )
    .await;
    assert_eq!(by_actor["items"].as_array().unwrap().len(), 4);
    let nobody = expect(
        app.get(&format!("/v1/activity?actor_id={}", Uuid::now_v7()))
            .await,
        200,
    )
    .await;
    assert_eq!(nobody["items"], json!([]));

    // Pages of one, following next_before, give the same entries in the same order.
    let mut paged = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/v1/activity?entity_type=contact&limit=1&before={b}"),
            None => "/v1/activity?entity_type=contact&limit=1".to_owned(),
        };
        let page = expect(app.get(&path).await, 200).await;
        let page_items = page["items"].as_array().unwrap();
        assert!(page_items.len() <= 1);
        paged.extend(page_items.iter().cloned());
        match page["next_before"].as_i64() {
            Some(n) => before = Some(n),
            None => break,
        }
        assert!(paged.len() <= 10, "pagination does not end");
    }
    assert_eq!(&paged, items, "paging with before sees every entry once");
    app.stop().await;
}

#[tokio::test]
async fn another_organisation_cannot_see_or_touch_a_contact() {
    let app = TestApp::spawn().await;
    let (id, pos) = app
        .create_contact(
            &json!({"given_name": "Secretive", "email": "secret@example.com", "company": "Hidden"}),
        )
        .await;
    expect(
        app.get(&format!("/v1/contacts/{id}?min_position={pos}"))
            .await,
        200,
    )
    .await;
    let (_, _, other) = app.another_org("Rival").await;
    // The rival has a contact of its own, so its lists are not trivially empty.
    let r = app
        .http
        .post(app.url("/v1/contacts"))
        .bearer_auth(&other)
        .json(&json!({"given_name": "Own"}))
        .send()
        .await
        .unwrap();
    let own = expect(r, 201).await;
    let own_pos = one_position(&own);
    let own_id = own["id"].as_str().unwrap().to_owned();

    let as_other = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut rb = app.http.request(method, app.url(&path)).bearer_auth(&other);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send()
    };
    let future = enc(chrono::Utc::now() + chrono::Duration::days(1));
    for (m, p, b) in [
        (reqwest::Method::GET, format!("/v1/contacts/{id}"), None),
        (
            reqwest::Method::GET,
            format!("/v1/contacts/{id}?as_of={future}"),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("/v1/contacts/{id}/history"),
            None,
        ),
        (
            reqwest::Method::PATCH,
            format!("/v1/contacts/{id}"),
            Some(json!({"title": "Spy"})),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/contacts/{id}/archive"),
            None,
        ),
    ] {
        let r = as_other(m.clone(), p.clone(), b).await.unwrap();
        let v = expect(r, 404).await;
        assert_eq!(v["code"], "not_found", "{m} {p}");
        let text = v.to_string();
        assert!(
            !text.contains("Secretive") && !text.contains("secret@"),
            "{text}"
        );
    }

    let list = expect(
        as_other(
            reqwest::Method::GET,
            format!("/v1/contacts?archived=any&min_position={own_pos}"),
            None,
        )
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(ids(&list), vec![own_id.clone()], "only its own contact");
    for q in [
        "email=secret%40example.com",
        "company=Hidden",
        "q=secretive",
    ] {
        let r = as_other(reqwest::Method::GET, format!("/v1/contacts?{q}"), None)
            .await
            .unwrap();
        assert!(ids(&expect(r, 200).await).is_empty(), "{q}");
    }
    let activity = expect(
        as_other(
            reqwest::Method::GET,
            format!("/v1/activity?min_position={own_pos}"),
            None,
        )
        .await
        .unwrap(),
        200,
    )
    .await;
    let entities: HashSet<&str> = activity["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entity"]["id"].as_str().unwrap())
        .collect();
    assert!(entities.contains(own_id.as_str()), "sees its own activity");
    assert!(!entities.contains(id.to_string().as_str()));
    let by_id = expect(
        as_other(
            reqwest::Method::GET,
            format!("/v1/activity?entity_id={id}"),
            None,
        )
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(by_id["items"], json!([]));

    // The owner's contact is untouched, and the owner does not see the rival's.
    let v = expect(app.get(&format!("/v1/contacts/{id}")).await, 200).await;
    assert_eq!(
        (v["version"].as_i64(), v["archived"].as_bool()),
        (Some(1), Some(false))
    );
    expect(app.get(&format!("/v1/contacts/{own_id}")).await, 404).await;
    app.stop().await;
}
