//! Faults in time: stalled clients, a bounded shutdown, and recovery that does not wait
//! for JetStream's redelivery timer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crm_api::config::HttpTimeouts;
use crm_api::startup;
use crm_infra::feed::projector;
use crm_infra::read_models;
use crm_infra::store::event_store;
use crm_tests::harness::{eventually, Options, TestApp};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// The `crm` binary next to this test binary (`scripts/test` builds every target first).
pub(crate) fn crm_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("crm");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --workspace --all-targets, as scripts/test does)",
        bin.display()
    );
    bin
}

/// A `crm <command>` process on the test's database, stream and keys.
pub(crate) fn crm(app: &TestApp, command: &str) -> std::process::Command {
    let s = &app.settings;
    let mut c = std::process::Command::new(crm_binary());
    c.arg(command)
        .env("DATABASE_URL", s.database.url.expose_secret())
        .env("CRM_DB_APP_ROLE", &s.database.app_role)
        .env("NATS_URL", &s.nats.url)
        .env("CRM_NATS_STREAM", &s.nats.stream)
        .env("CRM_NATS_SUBJECT_PREFIX", &s.nats.subject_prefix)
        .env("CRM_KEK", s.keys.kek.expose_secret())
        .env("CRM_KEK_ID", &s.keys.kek_id)
        .env("CRM_JWT_SECRET", s.jwt.secret.expose_secret());
    c
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `bytes` on a new connection and leaves it open.
fn stalled(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(bytes).unwrap();
    s.flush().unwrap();
    s
}

#[tokio::test]
async fn sigterm_with_stalled_clients_exits_within_the_grace_period() {
    // The harness's process makes the database, the organisation and a token; a `crm
    // serve` process of its own serves the same database.
    let app = TestApp::spawn_with(Options {
        run_relay: false,
        run_projectors: false,
        ..Default::default()
    })
    .await;
    let port = free_port();
    let grace = Duration::from_millis(2000);
    let mut child = crm(&app, "serve")
        .env("CRM_BIND", format!("127.0.0.1:{port}"))
        .env("CRM_SHUTDOWN_GRACE_MS", grace.as_millis().to_string())
        .env("CRM_RATE_LIMIT_API", "0")
        .env("CRM_RATE_LIMIT_AUTH", "0")
        .env("CRM_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(30), || async {
        app.http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    assert!(up.is_some(), "crm serve did not come up");

    // Commands it acknowledged.
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let r = app
            .http
            .post(format!("{base}/v1/contacts"))
            .bearer_auth(&app.token)
            .json(&json!({"given_name": format!("Acked {i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        acknowledged.push(v["id"].as_str().unwrap().to_owned());
    }
    // One client stalled in its headers, one in its body.
    let _in_head = stalled(port, b"POST /v1/contacts HTTP/1.1\r\nHost: x\r\nContent-Ty");
    let auth = format!(
        "POST /v1/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"given_name\": \"half",
        app.token
    );
    let _in_body = stalled(port, auth.as_bytes());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sent = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < grace + Duration::from_secs(5),
            "crm serve still running {:?} after SIGTERM",
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = sent.elapsed();
    println!("exited {took:?} after SIGTERM (grace {grace:?}) with {status}");
    assert!(status.success(), "exit status {status}");
    assert!(
        took <= grace + Duration::from_secs(1),
        "took {took:?}, grace {grace:?}"
    );

    // Everything it acknowledged is in the store.
    let db = app.db().await;
    for id in &acknowledged {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM events WHERE aggregate_type = 'contact' AND aggregate_id = $1",
                &[id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "acknowledged contact {id} is not in the store");
    }
    app.stop().await;
}

fn timeouts_counted(app_metrics: &str, stage: &str) -> u64 {
    app_metrics
        .lines()
        .find(|l| l.starts_with(&format!("crm_http_timeouts_total{{stage=\"{stage}\"}}")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_client_trickling_its_head_is_cut_off_by_the_head_timeout() {
    let app = TestApp::spawn_with(Options {
        run_relay: false,
        run_projectors: false,
        timeouts: HttpTimeouts {
            head: Duration::from_millis(1500),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let before = timeouts_counted(&crm_infra::metrics::render(), "head");
    let addr = app.base.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    let closed_after = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut buf = [0u8; 256];
        for b in head.iter() {
            // One byte a second would do; a byte every 250 ms keeps the test short.
            if s.write_all(&[*b]).is_err() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(250));
            match s.read(&mut buf) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => return None, // answered: the server waited for the head
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return Some(started.elapsed()),
            }
        }
        None
    })
    .await
    .unwrap();
    let closed_after = closed_after.expect("the server kept waiting for a trickled head");
    println!("closed after {closed_after:?} (head timeout 1.5 s)");
    assert!(
        closed_after >= Duration::from_millis(1400),
        "{closed_after:?}"
    );
    assert!(closed_after < Duration::from_secs(6), "{closed_after:?}");
    let after = timeouts_counted(&crm_infra::metrics::render(), "head");
    assert!(
        after > before,
        "crm_http_timeouts_total{{stage=\"head\"}} did not count it"
    );
    // An idle kept-alive connection is closed after the same time.
    let addr = app.base.trim_start_matches("http://").to_owned();
    let idle_closed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let idle = Instant::now();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return idle.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap();
    println!("idle keep-alive closed after {idle_closed:?}");
    assert!(idle_closed < Duration::from_secs(6), "{idle_closed:?}");
    // The server still answers everyone else.
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_408_and_the_connection_closed() {
    let app = TestApp::spawn_with(Options {
        run_relay: false,
        run_projectors: false,
        timeouts: HttpTimeouts {
            body_read: Duration::from_millis(700),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let token = app.token.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!(
            "POST /v1/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"given_name\""
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains("request_timeout"), "{answer}");
    app.stop().await;
}

/// How long until `name` has applied every committed event.
async fn time_to_lag_zero(app: &TestApp, name: &str, limit: Duration) -> Duration {
    let pool = app.admin_pool();
    let started = Instant::now();
    let done = eventually(limit, || async {
        let c = pool.get().await.unwrap();
        let ck = projector::checkpoint(&c, name).await.unwrap();
        (event_store::count_after(&c, ck, 1_000_000).await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(done.is_some(), "{name} did not catch up within {limit:?}");
    started.elapsed()
}

#[tokio::test]
async fn a_killed_projector_restarted_is_current_at_once_not_after_the_ack_wait() {
    let app = TestApp::spawn_with(Options {
        run_projectors: false,
        ..Default::default()
    })
    .await;
    let contacts = read_models::by_name("contacts").unwrap();
    let worker = tokio::spawn(
        startup::projector(&app.state, contacts.clone()).run(CancellationToken::new()),
    );
    // Under load, kill the worker (no graceful stop: its delivered messages stay
    // unacknowledged until JetStream's ack wait runs out).
    let writer = {
        let (http, base, token) = (app.http.clone(), app.base.clone(), app.token.clone());
        tokio::spawn(async move {
            for i in 0..150 {
                let r = http
                    .post(format!("{base}/v1/contacts"))
                    .bearer_auth(&token)
                    .json(&json!({"given_name": format!("Load {i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    worker.abort();
    let _ = worker.await;
    writer.await.unwrap();

    let token = CancellationToken::new();
    let restarted =
        tokio::spawn(startup::projector(&app.state, contacts.clone()).run(token.clone()));
    let took = time_to_lag_zero(&app, "contacts", projector::ACK_WAIT * 3).await;
    println!(
        "contacts lag 0 {took:?} after the restart (ack wait {:?})",
        projector::ACK_WAIT
    );
    assert!(
        took < projector::ACK_WAIT / 2,
        "took {took:?}: the restart waited for redelivery"
    );
    token.cancel();
    restarted.await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_postgres_restart_under_load_answers_503_and_recovers_at_once() {
    let pg = crm_tests::harness::PrivatePostgres::start();
    let app = TestApp::spawn_with(Options {
        admin_url: Some(pg.url()),
        ..Default::default()
    })
    .await;
    // Load: contacts created without pause; every answer is kept.
    let stop = CancellationToken::new();
    let writer = {
        let (http, base, token, stop) = (
            app.http.clone(),
            app.base.clone(),
            app.token.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut answers: Vec<(u16, Option<String>, String)> = Vec::new();
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let r = http
                    .post(format!("{base}/v1/contacts"))
                    .bearer_auth(&token)
                    .json(&json!({"given_name": format!("Outage {i}")}))
                    .send()
                    .await
                    .unwrap();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                let status = r.status().as_u16();
                answers.push((status, retry, r.text().await.unwrap()));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.stop_server();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_server();
    let back = Instant::now();
    // Keep writing a moment after the return, then stop and look.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let answers = writer.await.unwrap();
    time_to_lag_zero(&app, "contacts", Duration::from_secs(30)).await;
    // From PostgreSQL answering again (writes went on for 0.5 s of it) to lag 0.
    let took = back.elapsed();
    let during: Vec<_> = answers.iter().filter(|(s, _, _)| *s != 201).collect();
    println!(
        "{} answers, {} not 201; contacts lag 0 {took:?} after PostgreSQL answered again",
        answers.len(),
        during.len()
    );
    assert!(!during.is_empty(), "the outage was not seen");
    for (status, retry, body) in &during {
        assert_eq!(*status, 503, "{body}");
        assert!(retry.is_some(), "a 503 without Retry-After: {body}");
    }
    assert!(
        took < Duration::from_secs(5),
        "lag 0 only {took:?} after PostgreSQL returned"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_projector_process_killed_under_load_is_current_at_once_after_its_restart() {
    let app = TestApp::spawn_with(Options {
        run_projectors: false,
        ..Default::default()
    })
    .await;
    let project = |app: &TestApp| {
        crm(app, "project")
            .arg("contacts")
            .env("CRM_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut worker = project(&app);
    let writer = {
        let (http, base, token) = (app.http.clone(), app.base.clone(), app.token.clone());
        tokio::spawn(async move {
            for i in 0..300 {
                let r = http
                    .post(format!("{base}/v1/contacts"))
                    .bearer_auth(&token)
                    .json(&json!({"given_name": format!("Load {i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    // Once it has applied some of the load, kill -9 it.
    let pool = app.admin_pool();
    let started = eventually(Duration::from_secs(30), || async {
        let c = pool.get().await.unwrap();
        let ck = projector::checkpoint(&c, "contacts").await.unwrap();
        (ck.position > 0).then_some(())
    })
    .await;
    assert!(started.is_some(), "the projector process applied nothing");
    worker.kill().unwrap(); // SIGKILL
    let _ = worker.wait();
    writer.await.unwrap();

    let mut restarted = project(&app);
    let restart = Instant::now();
    time_to_lag_zero(&app, "contacts", projector::ACK_WAIT * 3).await;
    let took = restart.elapsed();
    println!(
        "contacts lag 0 {took:?} after restarting the killed process (ack wait {:?}; includes the process start)",
        projector::ACK_WAIT
    );
    assert!(
        took < projector::ACK_WAIT / 2,
        "took {took:?}: the restart waited for redelivery"
    );
    restarted.kill().unwrap();
    let _ = restarted.wait();
    app.stop().await;
}

#[tokio::test]
async fn a_nats_restart_under_load_loses_nothing_and_recovers_at_once() {
    let mut nats = crm_tests::harness::PrivateNats::start();
    let app = TestApp::spawn_with(Options {
        nats_url: Some(nats.url()),
        ..Default::default()
    })
    .await;
    let stop = CancellationToken::new();
    let writer = {
        let (http, base, token, stop) = (
            app.http.clone(),
            app.base.clone(),
            app.token.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let r = http
                    .post(format!("{base}/v1/contacts"))
                    .bearer_auth(&token)
                    .json(&json!({"given_name": format!("Bus {i}")}))
                    .send()
                    .await
                    .unwrap();
                statuses.push(r.status().as_u16());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.kill_server();
    tokio::time::sleep(Duration::from_secs(3)).await;
    nats.start_server();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let statuses = writer.await.unwrap();
    time_to_lag_zero(&app, "contacts", Duration::from_secs(60)).await;
    let took = back.elapsed();
    println!(
        "{} commands ({} not 201) with nats-server killed for 3 s; contacts lag 0 {took:?} after it was back",
        statuses.len(),
        statuses.iter().filter(|s| **s != 201).count()
    );
    // Commands need only PostgreSQL: the bus being away costs nothing but lag.
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    assert!(
        took < Duration::from_secs(5),
        "lag 0 only {took:?} after nats-server returned"
    );
    app.stop().await;
}
