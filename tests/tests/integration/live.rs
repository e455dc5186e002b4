//! The live event stream (`GET /v1/events/stream`, docs/live.md): resume without gaps
//! or duplicates, field visibility per role, the security stream, slow consumers, the
//! per-organisation limit, tenancy and a bounded shutdown.

use std::time::Duration;

use crm_domain::user::{Role, RoleRef};
use crm_infra::live::LiveSettings;
use crm_tests::harness::{Options, TestApp};
use crm_tests::sse::{Frame, SseClient};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const PATH: &str = "/v1/events/stream";
const WAIT: Duration = Duration::from_secs(10);

async fn open(app: &TestApp, query: &str, token: &str, last: Option<&str>) -> SseClient {
    match SseClient::open(&app.http, &app.url(&format!("{PATH}{query}")), token, last).await {
        Ok(c) => c,
        Err(r) => panic!("stream refused: {} {}", r.status(), r.text().await.unwrap()),
    }
}

async fn refused(app: &TestApp, query: &str, token: &str, last: Option<&str>) -> (u16, Value) {
    match SseClient::open(&app.http, &app.url(&format!("{PATH}{query}")), token, last).await {
        Ok(_) => panic!("stream {query} was opened"),
        Err(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
    }
}

/// Waits for the stream's first line (`: connected`): the connection is in place.
async fn connected(c: &mut SseClient) {
    let f = c.next(WAIT).await.expect("the stream's first line");
    assert_eq!(f.comment.as_deref(), Some("connected"), "{f:?}");
}

async fn contact(app: &TestApp, token: &str, n: usize) -> Uuid {
    let (status, v) = app
        .call_as(
            token,
            Method::POST,
            "/v1/contacts",
            Some(
                json!({"given_name": format!("Ada {n}"), "family_name": "Lovelace",
                        "email": format!("ada{n}@example.com"), "phone": "+441632960961"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().parse().unwrap()
}

/// The positions of the organisation's `ContactCreated` events, in commit order.
async fn created_in_commit_order(app: &TestApp, org: Uuid) -> Vec<i64> {
    app.db()
        .await
        .query(
            "SELECT global_position FROM events WHERE org_id = $1 \
             AND event_type = 'ContactCreated' ORDER BY tx_id, global_position",
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn positions(frames: &[Frame]) -> Vec<i64> {
    frames.iter().map(|f| f.position().unwrap()).collect()
}

fn small_ring() -> Options {
    Options {
        live: LiveSettings {
            ring_events: 5,
            ..LiveSettings::default()
        },
        ..Options::default()
    }
}

#[tokio::test]
async fn a_client_that_resumes_with_last_event_id_sees_every_event_once_in_order() {
    let app = TestApp::spawn_with(small_ring()).await;
    let t = app.token.clone();
    let q = "?types=contact.created";

    let mut first = open(&app, q, &t, None).await;
    connected(&mut first).await;
    for n in 0..3 {
        contact(&app, &t, n).await;
    }
    let seen = first.events(3, WAIT).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen
        .iter()
        .all(|f| f.event.as_deref() == Some("contact.created")));
    let mut all = positions(&seen);
    drop(first);

    // Twelve events while away: more than the ring's five, so the gap is read from the
    // store, then the ring and the live tail take over.
    for n in 3..15 {
        contact(&app, &t, n).await;
    }
    let last = all.last().unwrap().to_string();
    let mut second = open(&app, q, &t, Some(&last)).await;
    let caught_up = second.events(12, WAIT).await;
    assert_eq!(caught_up.len(), 12, "{caught_up:?}");
    all.extend(positions(&caught_up));
    for n in 15..17 {
        contact(&app, &t, n).await;
    }
    let live = second.events(2, WAIT).await;
    all.extend(positions(&live));
    drop(second);

    // A short gap is served from the ring.
    for n in 17..19 {
        contact(&app, &t, n).await;
    }
    let last = all.last().unwrap().to_string();
    let mut third = open(&app, q, &t, Some(&last)).await;
    let from_ring = third.events(2, WAIT).await;
    all.extend(positions(&from_ring));
    // …and nothing else follows.
    assert!(third.next_event(Duration::from_millis(500)).await.is_none());

    assert_eq!(all, created_in_commit_order(&app, app.org_id).await);
    // `after` does the same as the header; 0 is from the very first event.
    let mut from_start = open(&app, &format!("{q}&after=0"), &t, None).await;
    let again = from_start.events(19, WAIT).await;
    assert_eq!(positions(&again), all);
    app.stop().await;
}

#[tokio::test]
async fn a_viewers_stream_has_no_field_a_viewer_may_not_read() {
    let app = TestApp::spawn().await;
    let (_, viewer) = app.user_with_role(RoleRef::Builtin(Role::Viewer)).await;
    let (_, admin) = app.user_with_role(RoleRef::Builtin(Role::Admin)).await;
    let mut v = open(&app, "", &viewer, None).await;
    let mut a = open(&app, "", &admin, None).await;
    connected(&mut v).await;
    connected(&mut a).await;
    let id = contact(&app, &app.token, 1).await;
    let (status, _) = app
        .call_as(
            &app.token,
            Method::POST,
            &format!("/v1/contacts/{id}/do-not-contact"),
            Some(json!({"reason": "asked by phone"})),
        )
        .await;
    assert!(status < 300, "do-not-contact: {status}");
    let (status, _) = app
        .call_as(
            &app.token,
            Method::POST,
            &format!("/v1/contacts/{id}/archive"),
            None,
        )
        .await;
    assert_eq!(status, 200);

    let admins = a.events(3, WAIT).await;
    let types: Vec<_> = admins.iter().map(|f| f.event.clone().unwrap()).collect();
    assert_eq!(
        types,
        ["contact.created", "consent.changed", "contact.archived"]
    );
    let created = admins[0].json();
    assert_eq!(created["type"], "contact.created");
    assert_eq!(created["data"]["fields"]["email"], "ada1@example.com");
    assert_eq!(created["data"]["fields"]["phone"], "+441632960961");

    // The Viewer: the same contact events, without the fields it may not read, and no
    // consent event at all (it lacks consent.read).
    let viewers = v.events(2, WAIT).await;
    let types: Vec<_> = viewers.iter().map(|f| f.event.clone().unwrap()).collect();
    assert_eq!(types, ["contact.created", "contact.archived"]);
    assert_eq!(viewers[0].id, admins[0].id);
    let fields = viewers[0].json()["data"]["fields"].clone();
    assert_eq!(fields["given_name"], "Ada 1");
    for (name, _) in fields.as_object().unwrap() {
        assert!(
            ["given_name", "family_name", "company", "title"].contains(&name.as_str()),
            "a Viewer received {name}"
        );
    }
    let raw: String = viewers.iter().map(|f| f.data.clone()).collect();
    assert!(!raw.contains("ada1@example.com") && !raw.contains("+441632960961"));
    assert!(v.next_event(Duration::from_millis(500)).await.is_none());

    // Asking for a type it may not read is refused, naming the permission.
    let (status, body) = refused(&app, "?types=consent.changed", &viewer, None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("consent.read"));
    app.stop().await;
}

#[tokio::test]
async fn the_security_stream_needs_security_read_and_carries_key_and_role_changes() {
    let app = TestApp::spawn().await;
    let (_, viewer) = app.user_with_role(RoleRef::Builtin(Role::Viewer)).await;
    let (status, body) = refused(&app, "?stream=security", &viewer, None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("security.read"));

    let mut security = open(&app, "?stream=security", &app.token, None).await;
    let mut default = open(&app, "", &app.token, None).await;
    connected(&mut security).await;
    connected(&mut default).await;
    let (status, key) = app
        .call_as(
            &app.token,
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "Import job", "role": "team"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let key_id = key["id"].as_str().unwrap();
    let (status, _) = app
        .call_as(
            &app.token,
            Method::POST,
            &format!("/v1/api-keys/{key_id}/revoke"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (user, _) = app.user_with_role(RoleRef::Builtin(Role::Team)).await;
    let (status, _) = app
        .call_as(
            &app.token,
            Method::POST,
            &format!("/v1/users/{user}/role"),
            Some(json!({"role": "support"})),
        )
        .await;
    assert_eq!(status, 200);

    let got = security.events(3, WAIT).await;
    let types: Vec<_> = got.iter().map(|f| f.event.clone().unwrap()).collect();
    assert_eq!(
        types,
        ["api_key.issued", "api_key.revoked", "user.role_changed"]
    );
    assert_eq!(got[1].json()["data"]["api_key_id"], key_id);
    assert_eq!(got[2].json()["data"]["to"], "support");
    // The default stream carries none of them.
    assert!(default
        .next_event(Duration::from_millis(500))
        .await
        .is_none());
    // A security type on the default stream is a mistake worth naming.
    let (status, body) = refused(&app, "?types=api_key.revoked", &app.token, None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["fields"][0]["field"], "types");
    app.stop().await;
}

#[tokio::test]
async fn bad_stream_requests_are_400_naming_the_problem() {
    let app = TestApp::spawn().await;
    let t = app.token.clone();
    let (status, body) = refused(&app, "?types=contact.created,contact.exploded", &t, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("contact.exploded"));
    for bad in ["abc", "-1", "1e3", "99999999999999999999"] {
        let (status, body) = refused(&app, "", &t, Some(bad)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "invalid_last_event_id");
    }
    // A position that is not one of the organisation's events.
    let (status, body) = refused(&app, "", &t, Some("987654")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_last_event_id"))
    );
    let (status, body) = refused(&app, "?after=-3", &t, None).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = refused(&app, "?stream=everything", &t, None).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = refused(&app, "?entity_type=Contact%20X", &t, None).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = refused(&app, "", "not-a-token", None).await;
    assert_eq!(status, 401);
    app.stop().await;
}

#[tokio::test]
async fn another_organisations_events_never_appear() {
    let app = TestApp::spawn().await;
    let (_, _, other) = app.another_org("Other Org").await;
    let mut theirs = open(&app, "", &other, None).await;
    let mut ours = open(&app, "", &app.token, None).await;
    connected(&mut theirs).await;
    connected(&mut ours).await;
    let mine = contact(&app, &app.token, 1).await;
    let their_contact = contact(&app, &other, 2).await;
    let got = ours.events(1, WAIT).await;
    assert_eq!(got[0].json()["data"]["contact_id"], mine.to_string());
    let got = theirs.events(1, WAIT).await;
    assert_eq!(
        got[0].json()["data"]["contact_id"],
        their_contact.to_string()
    );
    assert!(theirs
        .next_event(Duration::from_millis(500))
        .await
        .is_none());
    assert!(ours.next_event(Duration::from_millis(100)).await.is_none());
    // Nor through a resume: our event's id is not theirs to resume from.
    let ours_id = got[0].id.clone().unwrap();
    let (status, body) = refused(&app, "", &app.token, Some(&ours_id)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_last_event_id"))
    );
    // A resume from the first event of theirs reads only theirs from the store.
    let mut from_start = open(&app, "?after=0&follow=false", &other, None).await;
    let all = from_start.events(10, WAIT).await;
    let last = all.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("caught_up"), "{all:?}");
    for f in &all[..all.len() - 1] {
        assert_eq!(f.json()["data"]["contact_id"], their_contact.to_string());
    }
    app.stop().await;
}

#[tokio::test]
async fn the_organisations_connection_limit_answers_429() {
    let app = TestApp::spawn_with(Options {
        live: LiveSettings {
            max_per_org: 2,
            ..LiveSettings::default()
        },
        ..Options::default()
    })
    .await;
    let mut a = open(&app, "", &app.token, None).await;
    let b = open(&app, "", &app.token, None).await;
    connected(&mut a).await;
    let (status, body) = refused(&app, "", &app.token, None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_streams");
    // Another organisation has a limit of its own.
    let (_, _, other) = app.another_org("Other Org").await;
    let _theirs = open(&app, "", &other, None).await;
    // A closed stream frees its place.
    drop(b);
    let reopened = crm_tests::harness::eventually(WAIT, || async {
        SseClient::open(&app.http, &app.url(PATH), &app.token, None)
            .await
            .ok()
    })
    .await;
    assert!(reopened.is_some(), "a place was freed");
    app.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_while_another_client_keeps_receiving() {
    let app = TestApp::spawn_with(Options {
        live: LiveSettings {
            buffer_events: 64,
            ..LiveSettings::default()
        },
        ..Options::default()
    })
    .await;
    let t = app.token.clone();
    // The slow client: it asks, then reads nothing while events pile up; its socket
    // buffers are small so the server soon cannot write to it.
    let addr: std::net::SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    slow.write_all(
        format!(
            "GET {PATH}?types=contact.created HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {t}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 512];
    let n = slow.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));

    let mut fast = open(&app, "?types=contact.created", &t, None).await;
    connected(&mut fast).await;
    // Large events (50 KB of custom fields each) fill the socket buffers quickly.
    let custom: serde_json::Map<String, Value> = (0..25)
        .map(|i| (format!("note_{i}"), json!("x".repeat(2000))))
        .collect();
    let total = 200;
    let reader = tokio::spawn(async move {
        let got = fast.events(total, Duration::from_secs(60)).await;
        got.len()
    });
    for n in 0..total {
        let (status, v) = app
            .call_as(
                &t,
                Method::POST,
                "/v1/contacts",
                Some(json!({"given_name": format!("Big {n}"), "custom": custom})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
    assert_eq!(
        reader.await.unwrap(),
        total,
        "the fast client got every event"
    );

    // Now the slow client reads what it was sent: some events, then the cutoff naming
    // the last one it was given.
    let mut text = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut text)).await;
    let text = String::from_utf8_lossy(&text);
    let frames: Vec<Frame> = text.split("\n\n").map(crm_tests::sse::parse).collect();
    let cutoff = frames
        .iter()
        .find(|f| f.event.as_deref() == Some("cutoff"))
        .expect("a cutoff event");
    let events: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.event.as_deref() == Some("contact.created"))
        .collect();
    assert!(events.len() < total, "the slow client was cut off early");
    let body = cutoff.json();
    assert_eq!(body["reason"], "slow_consumer");
    assert_eq!(
        body["last_event_id"].as_i64(),
        events.last().and_then(|f| f.position())
    );
    app.stop().await;
}

#[tokio::test]
async fn streams_end_with_a_cutoff_when_the_server_shuts_down() {
    let app = TestApp::spawn().await;
    let mut s = open(&app, "", &app.token, None).await;
    connected(&mut s).await;
    contact(&app, &app.token, 1).await;
    let first = s.events(1, WAIT).await;
    let reader = tokio::spawn(async move { s.next_event(Duration::from_secs(30)).await });
    let started = std::time::Instant::now();
    app.stop().await;
    let f = reader.await.unwrap().expect("a final event");
    assert_eq!(f.event.as_deref(), Some("cutoff"));
    assert_eq!(f.json()["reason"], "server_shutdown");
    assert_eq!(f.json()["last_event_id"].as_i64(), first[0].position());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Waits up to `WAIT` for `cond`.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let hit = crm_tests::harness::eventually(WAIT, || {
        let v = cond().then_some(());
        async move { v }
    })
    .await;
    assert!(hit.is_some(), "timed out: {what}");
}

#[tokio::test]
async fn the_hub_reads_the_feed_only_while_a_stream_follows_it_and_loses_nothing_starting() {
    let app = TestApp::spawn_with(Options {
        live: LiveSettings {
            idle_stop: Duration::from_millis(200),
            ..LiveSettings::default()
        },
        ..Options::default()
    })
    .await;
    let t = app.token.clone();
    let q = "?types=contact.created";
    let hub = app.state.live.clone();

    // Nobody listens: no consumer, whatever is written.
    contact(&app, &t, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !hub.is_running(),
        "the hub consumes the feed with no stream open"
    );
    // A stream that reads stored events and ends does not start it either.
    let mut bounded = open(&app, &format!("{q}&follow=false"), &t, None).await;
    connected(&mut bounded).await;
    assert_eq!(bounded.events(1, WAIT).await.len(), 1);
    drop(bounded);
    assert!(
        !hub.is_running(),
        "a follow=false stream started the consumer"
    );

    // A new client while the hub is idle: everything committed after it connected,
    // nothing twice, in commit order, while the consumer starts under it. It starts at
    // the store's visibility horizon, which another transaction of the server (another
    // test's) may hold before the moment it connected: the one contact created before
    // may come first (docs/live.md), nothing older.
    let mut client = open(&app, q, &t, None).await;
    connected(&mut client).await;
    let mut written = Vec::new();
    for n in 1..6 {
        written.push(contact(&app, &t, n).await);
    }
    let all = created_in_commit_order(&app, app.org_id).await;
    let mut seen = positions(&client.events(5, WAIT).await);
    if seen.first() == all.first() {
        seen.remove(0);
        seen.extend(positions(&client.events(1, WAIT).await));
    }
    assert_eq!(seen, all[1..].to_vec());
    assert!(client
        .next_event(Duration::from_millis(300))
        .await
        .is_none());
    until("the consumer runs while a stream follows", || {
        hub.is_running()
    })
    .await;
    // More events arrive live.
    contact(&app, &t, 6).await;
    let live = client.events(1, WAIT).await;
    let last = live[0].position().unwrap();
    drop(client);

    // Nobody follows any more: after the idle time the consumer stops.
    until("the consumer stops when nobody follows", || {
        !hub.is_running()
    })
    .await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("crm_live_feed_consuming 0"),
        "the gauge says the hub still consumes"
    );

    // A resume while idle reads the gap from the store and follows on.
    contact(&app, &t, 7).await;
    let mut again = open(&app, q, &t, Some(&last.to_string())).await;
    let gap = again.events(1, WAIT).await;
    contact(&app, &t, 8).await;
    let after = again.events(1, WAIT).await;
    let all = created_in_commit_order(&app, app.org_id).await;
    assert_eq!(
        positions(&gap)
            .into_iter()
            .chain(positions(&after))
            .collect::<Vec<_>>(),
        all[7..].to_vec()
    );
    assert!(again.next_event(Duration::from_millis(300)).await.is_none());
    app.stop().await;
}

/// Reads `s` up to its `cutoff`, which must be for `reason` and end the stream. Events
/// before it must be older than `before`: a stream that opens on an idle hub starts at
/// the store's visibility horizon, which other transactions of the server (other tests)
/// may hold a little before the moment it connected. The cutoff names the last of
/// them, or `last` if none came.
async fn cut_off(s: &mut SseClient, reason: &str, before: i64, last: Option<i64>) {
    let mut last = last;
    let f = loop {
        let f = s.next_event(WAIT).await.expect("a cutoff");
        if f.event.as_deref() == Some("cutoff") {
            break f;
        }
        let p = f.position().expect("an event's id");
        assert!(p < before, "an event after the change: {f:?}");
        last = Some(p);
    };
    assert_eq!(f.json()["reason"], reason, "{f:?}");
    assert_eq!(f.json()["last_event_id"].as_i64(), last, "{f:?}");
    assert!(
        s.next(Duration::from_millis(300)).await.is_none(),
        "the stream went on"
    );
}

#[tokio::test]
async fn a_stream_follows_its_callers_access_revoked_demoted_or_deactivated() {
    let app = TestApp::spawn_with(Options {
        live: LiveSettings {
            heartbeat: Duration::from_secs(1),
            ..LiveSettings::default()
        },
        ..Options::default()
    })
    .await;
    let admin = RoleRef::Builtin(Role::Admin);
    let (demoted, demoted_token) = app.user_with_role(admin).await;
    let (idle, idle_token) = app.user_with_role(admin).await;
    let (auditor, auditor_token) = app.user_with_role(admin).await;
    let (status, issued) = app
        .call_as(
            &app.token,
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "Dashboard", "role": "team"})),
        )
        .await;
    assert_eq!(status, 201, "{issued}");
    let key = issued["key"].as_str().unwrap().to_owned();
    let key_id = issued["id"].as_str().unwrap().to_owned();

    let mut by_demoted = open(&app, "", &demoted_token, None).await;
    let mut by_idle = open(&app, "", &idle_token, None).await;
    let mut by_key = open(&app, "", &key, None).await;
    let mut security = open(&app, "?stream=security", &auditor_token, None).await;
    for s in [&mut by_demoted, &mut by_idle, &mut by_key, &mut security] {
        connected(s).await;
    }
    contact(&app, &app.token, 1).await;
    let first = by_demoted.events(1, WAIT).await;
    assert_eq!(
        first[0].json()["data"]["fields"]["email"],
        "ada1@example.com"
    );
    let first_id = first[0].position();
    assert_eq!(
        positions(&by_idle.events(1, WAIT).await),
        [first_id.unwrap()]
    );
    assert_eq!(
        positions(&by_key.events(1, WAIT).await),
        [first_id.unwrap()]
    );

    let post = |path: String, body: Value| {
        let app = &app;
        async move {
            let (status, v) = app
                .call_as(&app.token, Method::POST, &path, Some(body))
                .await;
            assert!(status < 300, "{path}: {status} {v}");
        }
    };
    // Without security.read, the security stream is over, before the event of the very
    // change that took it away.
    post(
        format!("/v1/users/{auditor}/role"),
        json!({"role": "viewer"}),
    )
    .await;
    cut_off(&mut security, "forbidden", first_id.unwrap(), None).await;
    // A deactivated user's idle stream ends at its next heartbeat.
    post(format!("/v1/users/{idle}/deactivate"), json!({})).await;
    cut_off(&mut by_idle, "unauthorized", 0, first_id).await;

    post(
        format!("/v1/users/{demoted}/role"),
        json!({"role": "viewer"}),
    )
    .await;
    post(format!("/v1/api-keys/{key_id}/revoke"), json!({})).await;
    contact(&app, &app.token, 2).await;
    // The demoted user goes on receiving contact events, shaped for a Viewer now.
    let next = by_demoted.events(1, WAIT).await;
    assert_eq!(next[0].json()["data"]["fields"]["given_name"], "Ada 2");
    assert!(
        !next[0].data.contains("ada2@example.com"),
        "a Viewer received an e-mail address: {}",
        next[0].data
    );
    // The revoked key's stream gets nothing more.
    cut_off(&mut by_key, "unauthorized", 0, first_id).await;
    app.stop().await;
}
