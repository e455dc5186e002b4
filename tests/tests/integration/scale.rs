//! Reads that stay fast as the data grows (issue 11) must still answer exactly what they
//! answered before: the `q=` search and every activity filter against a model computed
//! here, history pages over a long stream, `as_of` from snapshots against a replay from
//! the first event, and a rebuild that reads data keys chunk by chunk against the live
//! read model. (How fast they are is measured by `scripts/bench --scale`, not here.)

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use crm_domain::access::{Role, RoleRef};
use crm_infra::read_models;
use crm_infra::read_models::activity::{self as activity_rm, ActivityFilter};
use crm_tests::harness::{eventually, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

/// Asserts `status` and returns the JSON body (shown when the status differs).
async fn expect(r: reqwest::Response, status: u16) -> Value {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Form-encodes a query parameter's value (as the service decodes it).
fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn time(t: DateTime<Utc>) -> String {
    enc(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// A tiny deterministic generator (the data must be the same on every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.next() % from.len()]
    }
}

/// Creates contacts from `bodies`, `concurrency` at a time; returns their ids in order.
async fn create_all(app: &TestApp, bodies: Vec<Value>, concurrency: usize) -> Vec<Uuid> {
    let bodies = std::sync::Arc::new(bodies);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, url, token) = (app.http.clone(), app.url("/v1/contacts"), app.token.clone());
        let (bodies, next) = (bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(body)
                    .send()
                    .await
                    .unwrap();
                let v = expect(r, 201).await;
                made.push((i, v["id"].as_str().unwrap().parse::<Uuid>().unwrap()));
            }
            made
        }));
    }
    let mut ids = vec![Uuid::nil(); bodies.len()];
    for t in tasks {
        for (i, id) in t.await.unwrap() {
            ids[i] = id;
        }
    }
    ids
}

/// Waits until the read model `name` has applied every committed event.
async fn caught_up(app: &TestApp, name: &str) {
    let pool = app.admin_pool();
    let ok = eventually(Duration::from_secs(30), || async {
        let c = pool.get().await.unwrap();
        let ck = crm_infra::feed::projector::checkpoint(&c, name)
            .await
            .unwrap();
        (crm_infra::store::event_store::count_after(&c, ck, 1_000_000)
            .await
            .unwrap()
            == 0)
            .then_some(())
    })
    .await;
    assert!(ok.is_some(), "{name} did not catch up");
}

/// Every contact id a list query answers, walking its pages (`next_after`).
async fn list_all(app: &TestApp, query: &str, limit: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10_000 {
        let mut path = format!("/v1/contacts?{query}&limit={limit}");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let page = expect(app.get(&path).await, 200).await;
        for item in page["items"].as_array().unwrap() {
            ids.push(item["id"].as_str().unwrap().parse().unwrap());
        }
        match page["next_after"].as_str() {
            Some(a) => after = Some(a.to_owned()),
            None => return ids,
        }
    }
    panic!("{query}: more pages than rows");
}

#[tokio::test]
async fn contact_search_returns_exactly_the_rows_whose_text_contains_the_term() {
    let app = TestApp::spawn().await;
    // Edge cases: case, accents, LIKE's wildcards and escape character in the data and
    // in the term, and a term found in the email only.
    let special: Vec<Value> = vec![
        json!({"given_name": "Élodie", "family_name": "DURAND", "email": "elodie@example.com", "company": "Café Crème"}),
        json!({"given_name": "élodie", "family_name": "Durand-Ngô"}),
        json!({"given_name": "José", "family_name": "Muñoz", "company": "100% Pure_Co"}),
        json!({"given_name": "Zoë", "family_name": "Ångström", "company": "Percent%Less"}),
        json!({"given_name": "under_score", "family_name": "back\\slash", "email": "u_s@example.org"}),
        json!({"given_name": "Underscore", "family_name": "Backslash", "company": "Pure Co"}),
        json!({"family_name": "Only-Family"}),
        json!({"company": "ACME GmbH"}),
    ];
    let words = [
        "Anna", "Bernd", "Clara", "Dieter", "Emma", "Felix", "Greta", "Hanna", "Ivan", "Jonas",
        "Karin", "Lukas", "Marta", "Nils", "Olga", "Paul", "Quirin", "Rosa", "Sven", "Tilda",
    ];
    let families = [
        "Schmidt",
        "Meyer",
        "Weber",
        "Wagner",
        "Becker",
        "Hoffmann",
        "Koch",
        "Richter",
        "Klein",
        "Wolf",
        "Neumann",
        "Schwarz",
        "Zimmermann",
        "Braun",
        "Hartmann",
    ];
    let companies = [
        "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark",
    ];
    let mut rng = Lcg(11);
    let mut bodies = special.clone();
    for n in 0..1200 {
        let (g, f, c) = (rng.pick(&words), rng.pick(&families), rng.pick(&companies));
        let mut body = json!({"given_name": g, "family_name": f,
                              "email": format!("{}.{}{n}@example.net", g.to_lowercase(), f.to_lowercase())});
        if n % 3 != 0 {
            body["company"] = json!(c);
        }
        bodies.push(body);
    }
    let ids = create_all(&app, bodies.clone(), 16).await;
    caught_up(&app, "contacts").await;
    app.db()
        .await
        .batch_execute("ANALYZE contacts")
        .await
        .unwrap();

    // The model: the documented semantics, computed here from what was sent.
    let text: Vec<String> = bodies
        .iter()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap_or("").to_owned();
            format!(
                "{} {} {} {}",
                s("given_name"),
                s("family_name"),
                s("email"),
                s("company")
            )
            .to_lowercase()
        })
        .collect();
    let terms = [
        "élo",
        "ÉLODIE",
        "elo",
        "ngô",
        "café crème",
        "CRÈME",
        "ngstr",
        "100%",
        "%",
        "%less",
        "_",
        "pure_co",
        "pure co",
        "u_s@",
        "\\",
        "back\\s",
        "e_s",
        "only-family",
        "gmbh",
        "a",
        "an",
        "schmidt",
        "mann",
        "globex",
        "ivan.k",
        "@example.net",
        "zz-nothing",
        "hartmann initech",
        "karin wolf",
    ];
    for term in terms {
        let want_q = term.to_lowercase();
        let mut expected: Vec<Uuid> = ids
            .iter()
            .zip(&text)
            .filter(|(_, t)| t.contains(&want_q))
            .map(|(id, _)| *id)
            .collect();
        expected.sort();
        let limit = if expected.len() > 200 { 500 } else { 7 };
        let got = list_all(&app, &format!("q={}", enc(term)), limit).await;
        assert_eq!(
            got.len(),
            expected.len(),
            "q={term:?}: {} rows, expected {}",
            got.len(),
            expected.len()
        );
        assert_eq!(got, expected, "q={term:?}: other rows than its model");
    }
    // archived=true: the few archived ones, in id order.
    let archived: Vec<Uuid> = ids.iter().step_by(101).copied().collect();
    for id in &archived {
        let r = app
            .post_without_body(&format!("/v1/contacts/{id}/archive"))
            .await;
        expect(r, 200).await;
    }
    caught_up(&app, "contacts").await;
    let mut expected = archived.clone();
    expected.sort();
    assert_eq!(list_all(&app, "archived=true", 4).await, expected);
    // updated_since: those changed since then (the archived ones), read whole or by
    // walking the id order, the same pages either way.
    let since: DateTime<Utc> = expect(app.get(&format!("/v1/contacts/{}", archived[0])).await, 200)
        .await["updated_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pool = app.admin_pool();
    let db = pool.get().await.unwrap();
    for cap in [Some(2), None] {
        let mut got = Vec::new();
        let mut after = None;
        loop {
            let f = read_models::contacts::ContactFilter {
                updated_since: Some(since),
                archived: None,
                after,
                limit: 3,
                updated_since_cap: cap,
                ..Default::default()
            };
            let page = read_models::contacts::list(&db, app.org_id, &f)
                .await
                .unwrap();
            after = page.last().map(|v| v.id);
            let full = page.len() == 3;
            got.extend(page.into_iter().map(|v| v.id));
            if !full {
                break;
            }
        }
        assert_eq!(got, expected, "updated_since, cap {cap:?}");
    }
    assert_eq!(
        list_all(
            &app,
            &format!("updated_since={}&archived=any", time(since)),
            5
        )
        .await,
        expected
    );

    // Combined with another filter, and an empty result.
    let mut expected: Vec<Uuid> = ids
        .iter()
        .zip(&bodies)
        .zip(&text)
        .filter(|((_, b), t)| b["company"] == "Hooli" && t.contains("anna"))
        .map(|((id, _), _)| *id)
        .collect();
    expected.sort();
    assert_eq!(list_all(&app, "q=anna&company=Hooli", 3).await, expected);
    assert!(list_all(&app, "q=qqqqq", 50).await.is_empty());
    app.stop().await;
}

/// One activity entry as the API answers it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    position: i64,
    action: String,
    actor: String,
    entity_type: String,
    entity_id: String,
    occurred_at: DateTime<Utc>,
}

async fn activity_all(app: &TestApp, token: &str, query: &str, limit: usize) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut before: Option<i64> = None;
    for _ in 0..10_000 {
        let mut path = format!("/v1/activity?{query}&limit={limit}");
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        let r = app
            .http
            .get(app.url(&path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let page = expect(r, 200).await;
        for i in page["items"].as_array().unwrap() {
            out.push(Entry {
                position: i["position"].as_i64().unwrap(),
                action: i["action"].as_str().unwrap().into(),
                actor: i["actor"]["id"].as_str().unwrap().into(),
                entity_type: i["entity"]["type"].as_str().unwrap().into(),
                entity_id: i["entity"]["id"].as_str().unwrap().into(),
                occurred_at: i["occurred_at"].as_str().unwrap().parse().unwrap(),
            });
        }
        match page["next_before"].as_i64() {
            Some(b) => before = Some(b),
            None => return out,
        }
    }
    panic!("{query}: more pages than rows");
}

#[tokio::test]
async fn activity_filters_return_exactly_the_matching_entries_newest_first() {
    let app = TestApp::spawn().await;
    let (admin_id, admin) = app.user_with_role(RoleRef::Builtin(Role::Admin)).await;
    let owner = app.token.clone();
    // Traffic by two principals over contacts and users: many creates and updates, few
    // archives, a few by the second user.
    let bodies: Vec<Value> = (0..150)
        .map(|n| json!({"given_name": format!("P{n}")}))
        .collect();
    let ids = create_all(&app, bodies, 8).await;
    for (n, id) in ids.iter().enumerate() {
        let token = if n % 10 == 0 { &admin } else { &owner };
        if n % 3 == 0 {
            let r = app
                .http
                .patch(app.url(&format!("/v1/contacts/{id}")))
                .bearer_auth(token)
                .json(&json!({"title": "T"}))
                .send()
                .await
                .unwrap();
            expect(r, 200).await;
        }
        if n % 40 == 10 {
            let r = app
                .http
                .post(app.url(&format!("/v1/contacts/{id}/archive")))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            expect(r, 200).await;
        }
    }
    caught_up(&app, "activity").await;
    app.db()
        .await
        .batch_execute("ANALYZE activity")
        .await
        .unwrap();

    // The model: every event of the organisation, from the store itself.
    let db = app.db().await;
    let rows = db
        .query(
            "SELECT global_position, event_type, metadata->'principal'->>'id', aggregate_type, \
                    aggregate_id FROM events WHERE org_id = $1 ORDER BY global_position DESC",
            &[&app.org_id],
        )
        .await
        .unwrap();
    let all = activity_all(&app, &owner, "", 11).await;
    assert_eq!(
        all.len(),
        rows.len(),
        "the unfiltered log lists every event"
    );
    for (e, r) in all.iter().zip(&rows) {
        let model: (i64, String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        assert_eq!(
            (
                e.position,
                e.action.clone(),
                e.actor.clone(),
                e.entity_type.clone(),
                e.entity_id.clone()
            ),
            model
        );
    }
    // A time in the middle of the log, and a window around it.
    let mid = all[all.len() / 2].occurred_at;
    let early = all[all.len() * 3 / 4].occurred_at;
    let owner_id = app.user_id.to_string();
    let admin_id = admin_id.to_string();
    let contact = ids[75].to_string();
    type Pred = Box<dyn Fn(&Entry) -> bool>;
    let cases: Vec<(String, Pred)> = vec![
        (
            "action=ContactUpdated".into(),
            Box::new(|e: &Entry| e.action == "ContactUpdated"),
        ),
        (
            "action=ContactArchived".into(),
            Box::new(|e: &Entry| e.action == "ContactArchived"),
        ),
        ("action=NothingLikeThis".into(), Box::new(|_: &Entry| false)),
        (format!("actor_id={owner_id}"), {
            let o = owner_id.clone();
            Box::new(move |e: &Entry| e.actor == o)
        }),
        (format!("actor_id={admin_id}"), {
            let a = admin_id.clone();
            Box::new(move |e: &Entry| e.actor == a)
        }),
        (
            "entity_type=contact".into(),
            Box::new(|e: &Entry| e.entity_type == "contact"),
        ),
        (
            "entity_type=user".into(),
            Box::new(|e: &Entry| e.entity_type == "user"),
        ),
        (format!("entity_id={contact}"), {
            let c = contact.clone();
            Box::new(move |e: &Entry| e.entity_id == c)
        }),
        (
            format!("since={}", time(mid)),
            Box::new(move |e: &Entry| e.occurred_at >= mid),
        ),
        (
            format!("until={}", time(mid)),
            Box::new(move |e: &Entry| e.occurred_at < mid),
        ),
        (
            format!("since={}&until={}", time(early), time(mid)),
            Box::new(move |e: &Entry| e.occurred_at >= early && e.occurred_at < mid),
        ),
        (format!("action=ContactUpdated&actor_id={admin_id}"), {
            let a = admin_id.clone();
            Box::new(move |e: &Entry| e.action == "ContactUpdated" && e.actor == a)
        }),
        (
            format!("action=ContactCreated&since={}", time(mid)),
            Box::new(move |e: &Entry| e.action == "ContactCreated" && e.occurred_at >= mid),
        ),
    ];
    for (query, pred) in &cases {
        let expected: Vec<Entry> = all.iter().filter(|e| pred(e)).cloned().collect();
        for limit in [4, 500] {
            let got = activity_all(&app, &owner, query, limit).await;
            assert_eq!(
                got.iter().map(|e| e.position).collect::<Vec<_>>(),
                expected.iter().map(|e| e.position).collect::<Vec<_>>(),
                "{query} (limit {limit}): other entries than its model"
            );
        }
    }
    // A window larger than the service reads whole is found by walking the log: both
    // ways give the same pages. (A superuser connection: row-level security lets it see.)
    let pool = app.admin_pool();
    let db = pool.get().await.unwrap();
    for (since, until) in [
        (None, Some(mid)),
        (Some(mid), None),
        (Some(early), Some(mid)),
        (Some(early), Some(early)),
    ] {
        let mut answers = Vec::new();
        for cap in [Some(3), None] {
            let mut pages = Vec::new();
            let mut before = None;
            loop {
                let f = ActivityFilter {
                    since,
                    until,
                    before,
                    limit: 9,
                    time_window_cap: cap,
                    ..Default::default()
                };
                let page = activity_rm::list(&db, app.org_id, &f).await.unwrap();
                let full = page.len() == 9;
                before = page.last().map(|e| e.global_position);
                pages.extend(page.into_iter().map(|e| e.global_position));
                if !full {
                    break;
                }
            }
            answers.push(pages);
        }
        let expected: Vec<i64> = all
            .iter()
            .filter(|e| {
                since.is_none_or(|s| e.occurred_at >= s) && until.is_none_or(|u| e.occurred_at < u)
            })
            .map(|e| e.position)
            .collect();
        assert_eq!(
            answers[0], expected,
            "{since:?}..{until:?}, walking the log"
        );
        assert_eq!(
            answers[1], expected,
            "{since:?}..{until:?}, reading the window"
        );
    }
    // The rare cases are not empty by accident.
    assert!(all.iter().filter(|e| e.action == "ContactArchived").count() >= 3);
    assert!(all.iter().filter(|e| e.actor == admin_id).count() >= 6);
    app.stop().await;
}

/// The state the test set at each version of the long contact: title and company.
fn expected_at(version: i64) -> (String, Option<String>) {
    let title = format!("v{version}");
    // The company was last set at the latest multiple of 7 (at or below `version`),
    // and cleared at each multiple of 100 after it.
    let set = version - version % 7;
    let cleared = version - version % 100;
    let company = (set >= 7 && set > cleared).then(|| format!("Co{set}"));
    (title, company)
}

#[tokio::test]
async fn history_pages_and_as_of_reads_over_a_2000_event_stream() {
    const EVENTS: i64 = 2000;
    let app = TestApp::spawn().await;
    let (id, _) = app
        .create_contact(&json!({"given_name": "Long", "title": "v1"}))
        .await;
    let path = format!("/v1/contacts/{id}");
    for v in 2..=EVENTS {
        let mut body = json!({"title": format!("v{v}")});
        if v % 100 == 0 {
            body["company"] = Value::Null;
        } else if v % 7 == 0 {
            body["company"] = json!(format!("Co{v}"));
        }
        let out = expect(app.patch(&path, &body).await, 200).await;
        assert_eq!(out["version"], v);
    }

    // Pages of several sizes: every sequence once, in order, and the cursor ends.
    let mut recorded: BTreeMap<i64, DateTime<Utc>> = BTreeMap::new();
    for limit in [500, 137] {
        let mut seen = Vec::new();
        let mut after: Option<i64> = None;
        let mut pages = 0;
        loop {
            let q = after.map_or(String::new(), |a| format!("&after={a}"));
            let page = expect(
                app.get(&format!("{path}/history?limit={limit}{q}")).await,
                200,
            )
            .await;
            pages += 1;
            let events = page["events"].as_array().unwrap();
            assert!(events.len() <= limit);
            for e in events {
                let seq = e["sequence"].as_i64().unwrap();
                seen.push(seq);
                recorded.insert(seq, e["recorded_at"].as_str().unwrap().parse().unwrap());
            }
            match page["next_after"].as_i64() {
                Some(n) => {
                    assert_eq!(Some(n), events.last().and_then(|e| e["sequence"].as_i64()));
                    after = Some(n);
                }
                None => break,
            }
            assert!(pages < 100, "the cursor never ends");
        }
        assert_eq!(seen, (1..=EVENTS).collect::<Vec<_>>(), "limit {limit}");
    }
    // The default page, and pages past the end or of no contact.
    let first = expect(app.get(&format!("{path}/history")).await, 200).await;
    assert_eq!(first["events"].as_array().unwrap().len(), 50);
    assert_eq!(first["next_after"], 50);
    let past = expect(
        app.get(&format!("{path}/history?after={EVENTS}")).await,
        200,
    )
    .await;
    assert_eq!(past["events"], json!([]));
    assert_eq!(past["next_after"], Value::Null);
    let ghost = Uuid::now_v7();
    for q in ["", "?after=5"] {
        let r = app.get(&format!("/v1/contacts/{ghost}/history{q}")).await;
        assert_eq!(r.status(), 404, "{q}");
    }
    for q in ["limit=0", "limit=501", "after=-1", "after=x"] {
        let r = app.get(&format!("{path}/history?{q}")).await;
        assert_eq!(r.status(), 400, "{q}");
    }

    // Snapshots are kept every 50 events, so as_of starts from one.
    let db = app.db().await;
    let snapshots: i64 = db
        .query_one(
            "SELECT count(*) FROM snapshots WHERE aggregate_id = $1",
            &[&id.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(snapshots >= EVENTS / 50 - 1, "{snapshots} snapshots kept");

    // Times before, at, between and after snapshots' versions.
    let mut times: Vec<(DateTime<Utc>, Option<i64>)> = vec![
        (recorded[&1] - chrono::Duration::seconds(1), None),
        (Utc::now() + chrono::Duration::days(1), Some(EVENTS)),
    ];
    for v in [1, 2, 49, 50, 51, 99, 100, 101, 700, 777, 1234, 1999, 2000] {
        times.push((recorded[&v], Some(v)));
        if let Some(next) = recorded.get(&(v + 1)) {
            let between = recorded[&v] + (*next - recorded[&v]) / 2;
            if between > recorded[&v] && between < *next {
                times.push((between, Some(v)));
            }
        }
    }
    let read = |t: DateTime<Utc>| {
        let url = app.url(&format!("{path}?as_of={}", time(t)));
        let (http, token) = (app.http.clone(), app.token.clone());
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            let mut body = r.json::<Value>().await.unwrap();
            // Each answer names its own request.
            if let Some(o) = body.as_object_mut() {
                o.remove("request_id");
            }
            (status, body)
        }
    };
    let mut from_snapshots = Vec::new();
    for (t, version) in &times {
        let (status, body) = read(*t).await;
        match version {
            None => assert_eq!(status, 404, "as_of {t}: {body}"),
            Some(v) => {
                assert_eq!(status, 200, "as_of {t}: {body}");
                let (title, company) = expected_at(*v);
                assert_eq!(body["version"], *v, "as_of {t}");
                assert_eq!(body["title"], title, "as_of {t}");
                assert_eq!(
                    body["company"].as_str().map(str::to_owned),
                    company,
                    "as_of {t}"
                );
                assert_eq!(
                    body["updated_at"]
                        .as_str()
                        .unwrap()
                        .parse::<DateTime<Utc>>()
                        .unwrap(),
                    recorded[v],
                    "as_of {t}"
                );
            }
        }
        from_snapshots.push((status, body));
    }
    // The same reads with no snapshot at all: a replay from the first event.
    db.execute(
        "DELETE FROM snapshots WHERE aggregate_id = $1",
        &[&id.to_string()],
    )
    .await
    .unwrap();
    for ((t, _), snap) in times.iter().zip(&from_snapshots) {
        assert_eq!(
            &read(*t).await,
            snap,
            "as_of {t}: snapshot and replay differ"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_rebuild_reading_keys_chunk_by_chunk_reproduces_the_read_model() {
    let app = TestApp::spawn().await;
    // More events than one chunk of the rebuild's reader (1,024), from more subjects
    // than one chunk holds, each with its own data key; streams interleaved in commit
    // order by updates made after all creates.
    let bodies: Vec<Value> = (0..1600)
        .map(|n| {
            json!({"given_name": format!("R{n}"), "email": format!("r{n}@example.com"),
                   "phone": "+441632960961", "custom": {"n": n}})
        })
        .collect();
    let ids = create_all(&app, bodies, 16).await;
    let mut rng = Lcg(5);
    for k in 0..300 {
        let id = ids[rng.next() % ids.len()];
        let body = if k % 10 == 0 {
            json!({"company": null, "title": format!("K{k}")})
        } else {
            json!({"company": format!("C{k}")})
        };
        expect(app.patch(&format!("/v1/contacts/{id}"), &body).await, 200).await;
    }
    for id in ids.iter().step_by(97) {
        let r = app
            .post_without_body(&format!("/v1/contacts/{id}/archive"))
            .await;
        expect(r, 200).await;
    }
    caught_up(&app, "contacts").await;
    let table = |db: tokio_postgres::Client| async move {
        db.query(
            "SELECT org_id, id, version, profile, archived, created_at, updated_at, \
                    last_position FROM contacts ORDER BY org_id, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let row: (
                Uuid,
                Uuid,
                i64,
                Value,
                bool,
                DateTime<Utc>,
                DateTime<Utc>,
                i64,
            ) = (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            );
            row
        })
        .collect::<Vec<_>>()
    };
    let live = table(app.db().await).await;
    assert_eq!(live.len(), 1600);
    let indexes = |db: tokio_postgres::Client| async move {
        let mut names: Vec<(String, String)> = db
            .query(
                "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index \
                 WHERE indrelid = 'contacts'::regclass",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        names.sort();
        names
    };
    let indexes_before = indexes(app.db().await).await;
    let report = app.rebuild("contacts").await;
    assert!(report.events >= 1600 + 300, "{} events", report.events);
    let rebuilt = table(app.db().await).await;
    assert_eq!(live.len(), rebuilt.len());
    // The same indexes, under the same names (migrations and operators name them).
    assert_eq!(indexes(app.db().await).await, indexes_before);
    for (a, b) in live.iter().zip(&rebuilt) {
        assert_eq!(a, b, "the rebuild changed a contact");
    }
    // The decrypted profiles are there (the keys were found), not ciphertext.
    assert!(rebuilt.iter().all(|r| r.3["email"]
        .as_str()
        .is_some_and(|e| e.ends_with("@example.com"))));
    app.stop().await;
}
