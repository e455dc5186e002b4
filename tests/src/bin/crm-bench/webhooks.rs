//! The webhook phases of `scripts/bench --webhooks` (issue 15; figures:
//! docs/benchmarks.md). Both run against a `crm serve` with its delivery worker and
//! `CRM_WEBHOOK_ALLOW_NETS=127.0.0.0/8`, and deliver to a receiver inside this process.
//!
//! **The receiver** is a bare hyper HTTP/1.1 server on 127.0.0.1 (an ephemeral port).
//! Endpoint `k` is the path `/e/{k}`. Each delivery's Standard Webhooks signature is
//! verified here, independently of the service's signer (HMAC-SHA256 of
//! `{webhook-id}.{webhook-timestamp}.{body}` with the key of the secret that endpoint
//! creation answered; any one of the space-separated `v1,` signatures; a timestamp
//! within five minutes of now). A verified delivery is answered 200 at once and its
//! arrival time, `webhook-id` and `data.contact_id` are kept; anything else is answered
//! 400 and counted as an error (`unverified`).
//!
//! - `webhooks-throughput` (W1): `--endpoints` endpoints (32) of the bench
//!   organisation, each subscribed to `contact.created` with the role `admin`; then
//!   `--contacts` contacts posted by `--connections` connections (32) as fast as the
//!   API takes them, each fanning out to one delivery per endpoint. It waits until
//!   every (endpoint, contact) pair arrived (or nothing arrived for `--timeout` s).
//!   Prints the POST /v1/contacts rate, the deliveries per second over the whole run
//!   (first POST to last delivery) and over the delivery window (first to last
//!   delivery), the best 1 s, the duplicates (a `webhook-id` arriving again at its
//!   endpoint), what is missing, and, from the database, when the fan-out queued the
//!   messages (so the bound shows: fan-out or delivery).
//! - `webhooks-latency` (W2): `--endpoints` endpoints (1), then contacts at a paced
//!   `--rate` (500/s, open loop) for `--warmup` + `--seconds` s. A contact's
//!   commit-to-delivery latency is its delivery's arrival at the receiver minus the
//!   time the API answered its 201 (both on this process's monotonic clock); p50, p99,
//!   max of those answered after the warm-up. The split into hops comes from the
//!   database afterwards: the event's `recorded_at` to its message's `created_at` (the
//!   fan-out), to its first attempt's `started_at` (the claim), to that attempt's
//!   `finished_at` (the POST).
//!
//! Both poll the fan-out consumer (`webhooks`) every 200 ms for its backlog
//! (`num_pending` + `num_ack_pending`: events not yet queued as messages) and delete
//! their endpoints at the end, so that a later phase's contacts fan out to its own
//! endpoints only. Each prints one line of `key=value` fields ending with `cpu_s`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{contact, cpu_seconds, histogram, ms, run_tag, Conn, Target};

/// How far a `webhook-timestamp` may be from now (the Standard Webhooks libraries'
/// tolerance).
const TOLERANCE_S: i64 = 300;

/// One verified delivery.
struct Arrival {
    endpoint: usize,
    webhook_id: String,
    contact_id: Option<Uuid>,
    /// µs since the run's origin.
    at: u64,
}

/// What the receiver saw.
struct Inbox {
    origin: Instant,
    /// The key bytes of each endpoint's secret, by index (the path `/e/{index}`).
    keys: Vec<Vec<u8>>,
    arrivals: StdMutex<Vec<Arrival>>,
    unverified: AtomicU64,
    last_error: StdMutex<Option<String>>,
}

impl Inbox {
    fn count(&self) -> usize {
        self.arrivals.lock().map(|a| a.len()).unwrap_or(0)
    }

    fn refuse(&self, why: String) -> hyper::Response<Full<Bytes>> {
        self.unverified.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(why);
        }
        hyper::Response::builder()
            .status(hyper::StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::new()))
            .expect("a plain response")
    }
}

/// Whether `signatures` (the `webhook-signature` header) holds a `v1,` signature of
/// `{id}.{timestamp}.{body}` with `key`. Written from the specification, not from the
/// service's signer.
fn verified(key: &[u8], id: &str, timestamp: &str, body: &[u8], signatures: &str) -> bool {
    signatures.split(' ').any(|s| {
        let Some(sig) = s.strip_prefix("v1,").and_then(|b| B64.decode(b).ok()) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            return false;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn receive(
    inbox: Arc<Inbox>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let endpoint = request
        .uri()
        .path()
        .strip_prefix("/e/")
        .and_then(|k| k.parse::<usize>().ok())
        .filter(|k| *k < inbox.keys.len());
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let body = match request.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(inbox.refuse(format!("reading the body: {e}"))),
    };
    let at = inbox.origin.elapsed().as_micros() as u64;
    let (Some(endpoint), Some(id), Some(timestamp), Some(signature)) =
        (endpoint, id, timestamp, signature)
    else {
        return Ok(inbox.refuse("an unknown path or a webhook header missing".into()));
    };
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|t| (unix_now() - t).abs() <= TOLERANCE_S);
    if !fresh {
        return Ok(inbox.refuse(format!("webhook-timestamp {timestamp} is not within 5 min")));
    }
    if !verified(&inbox.keys[endpoint], &id, &timestamp, &body, &signature) {
        return Ok(inbox.refuse(format!("the signature of {id} does not verify")));
    }
    let contact_id = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v["data"]["contact_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
    });
    if let Ok(mut a) = inbox.arrivals.lock() {
        a.push(Arrival {
            endpoint,
            webhook_id: id,
            contact_id,
            at,
        });
    }
    Ok(hyper::Response::builder()
        .status(hyper::StatusCode::OK)
        .body(Full::new(Bytes::new()))
        .expect("a plain response"))
}

/// Serves `inbox` on `listener` until the process ends.
fn serve(listener: tokio::net::TcpListener, inbox: Arc<Inbox>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| receive(inbox.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// Sends one request as `conn`; the status must be `want`. The answer, as JSON (or
/// null when empty).
async fn call(
    conn: &mut Conn,
    method: hyper::Method,
    path: &str,
    body: Option<&Value>,
    want: hyper::StatusCode,
) -> anyhow::Result<Value> {
    let body = body
        .map(|b| serde_json::to_vec(b).map(Bytes::from))
        .transpose()?;
    let (status, answer) = conn
        .send(method.clone(), path, body)
        .await
        .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
    anyhow::ensure!(
        status == want,
        "{method} {path}: status {status}: {}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    if answer.is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_slice(&answer)?)
}

/// The receiver with `n` endpoints registered at it: their ids, and the inbox (served
/// from here on).
async fn receiver(
    t: &Target,
    n: usize,
    origin: Instant,
) -> anyhow::Result<(Vec<Uuid>, Arc<Inbox>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let mut conn = Conn::new(t)?;
    let tag = run_tag();
    let mut ids = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for k in 0..n {
        let created = call(
            &mut conn,
            hyper::Method::POST,
            "/v1/webhooks",
            Some(&json!({
                "url": format!("http://{addr}/e/{k}"),
                "event_types": ["contact.created"],
                "role": "admin",
                "description": format!("bench {tag} endpoint {k}"),
            })),
            hyper::StatusCode::CREATED,
        )
        .await?;
        let id: Uuid = created["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("POST /v1/webhooks: no id in the answer"))?;
        let key = created["secret"]
            .as_str()
            .and_then(|s| s.strip_prefix("whsec_"))
            .and_then(|s| B64.decode(s).ok())
            .ok_or_else(|| anyhow::anyhow!("POST /v1/webhooks: no whsec_ secret in the answer"))?;
        ids.push(id);
        keys.push(key);
    }
    let inbox = Arc::new(Inbox {
        origin,
        keys,
        arrivals: StdMutex::new(Vec::new()),
        unverified: AtomicU64::new(0),
        last_error: StdMutex::new(None),
    });
    serve(listener, inbox.clone());
    Ok((ids, inbox))
}

/// Deletes the phase's endpoints (their queue goes with them; the log stays).
async fn delete_endpoints(t: &Target, ids: &[Uuid]) -> anyhow::Result<()> {
    let mut conn = Conn::new(t)?;
    for id in ids {
        call(
            &mut conn,
            hyper::Method::DELETE,
            &format!("/v1/webhooks/{id}"),
            None,
            hyper::StatusCode::NO_CONTENT,
        )
        .await?;
    }
    Ok(())
}

/// Waits until `want` deliveries arrived, or none arrived for `quiet`.
async fn wait_for(inbox: &Inbox, want: usize, quiet: Duration) {
    let mut last = (inbox.count(), Instant::now());
    loop {
        let n = inbox.count();
        if n >= want {
            return;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fan-out consumer's backlog, sampled every 200 ms while the phase runs.
struct Backlog {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl Backlog {
    /// `None` (and a note on stderr) when the consumer cannot be read.
    async fn start(nats_url: &str, stream: &str) -> Option<Self> {
        let consumer = async {
            let client = async_nats::connect(nats_url).await?;
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream(stream).await?;
            let consumer: async_nats::jetstream::consumer::Consumer<
                async_nats::jetstream::consumer::pull::Config,
            > = stream
                .get_consumer("webhooks")
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            Ok::<_, anyhow::Error>(consumer)
        }
        .await;
        let consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                eprintln!("crm-bench webhooks: the fan-out consumer cannot be read: {e}");
                return None;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(info) = consumer.get_info().await {
                        samples.push(info.num_pending + info.num_ack_pending as u64);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                samples
            })
        };
        Some(Self { stop, task })
    }

    /// `backlog_p50=… backlog_max=…` (events), or `na` for both.
    async fn finish(this: Option<Self>) -> String {
        let Some(this) = this else {
            return "backlog_p50=na backlog_max=na".into();
        };
        this.stop.store(true, Ordering::Relaxed);
        let mut samples = this.task.await.unwrap_or_default();
        if samples.is_empty() {
            return "backlog_p50=na backlog_max=na".into();
        }
        samples.sort_unstable();
        format!(
            "backlog_p50={} backlog_max={}",
            samples[samples.len() / 2],
            samples[samples.len() - 1]
        )
    }
}

async fn connect(database_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (db, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(db)
}

/// Deliveries, de-duplicated: (arrivals, distinct per endpoint, duplicates, the first
/// arrival of each (endpoint, contact) pair).
fn tally(arrivals: &[Arrival]) -> (usize, usize, usize, HashMap<(usize, Uuid), u64>) {
    let mut seen = HashSet::with_capacity(arrivals.len());
    let mut first = HashMap::with_capacity(arrivals.len());
    for a in arrivals {
        seen.insert((a.endpoint, a.webhook_id.as_str()));
        if let Some(c) = a.contact_id {
            let at = first.entry((a.endpoint, c)).or_insert(a.at);
            *at = (*at).min(a.at);
        }
    }
    (
        arrivals.len(),
        seen.len(),
        arrivals.len() - seen.len(),
        first,
    )
}

#[derive(Args)]
pub(crate) struct ThroughputArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 32)]
    endpoints: usize,
    /// Contacts to create (each fans out to one delivery per endpoint).
    #[arg(long, default_value_t = 1000)]
    contacts: u64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Give up when no delivery arrived for this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// The database `crm serve` writes to (read directly, as its owner).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, env = "NATS_URL")]
    nats_url: String,
    #[arg(long, env = "CRM_NATS_STREAM")]
    stream: String,
}

pub(crate) async fn throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    let ThroughputArgs {
        target: t,
        endpoints,
        contacts,
        connections,
        timeout,
        database_url,
        nats_url,
        stream,
    } = args;
    let origin = Instant::now();
    let (ids, inbox) = receiver(&t, endpoints, origin).await?;
    let backlog = Backlog::start(&nats_url, &stream).await;
    let tag = run_tag();
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let created = Arc::new(StdMutex::new(Vec::<Uuid>::with_capacity(contacts as usize)));
    let latency = Arc::new(StdMutex::new(histogram()));
    let post_start = origin.elapsed().as_micros() as u64;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Conn::new(&t)?;
        let (next, errors, created, latency) = (
            next.clone(),
            errors.clone(),
            created.clone(),
            latency.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= contacts {
                    return;
                }
                let body = Bytes::from(serde_json::to_vec(&contact(tag, n)).expect("JSON"));
                let t0 = Instant::now();
                let answer = conn
                    .send(hyper::Method::POST, "/v1/contacts", Some(body))
                    .await;
                let id = match answer {
                    Ok((hyper::StatusCode::CREATED, b)) => serde_json::from_slice::<Value>(&b)
                        .ok()
                        .and_then(|v| v["id"].as_str().and_then(|s| s.parse::<Uuid>().ok())),
                    _ => None,
                };
                match id {
                    Some(id) => {
                        if let Ok(mut h) = latency.lock() {
                            let _ = h.record(t0.elapsed().as_micros() as u64);
                        }
                        if let Ok(mut c) = created.lock() {
                            c.push(id);
                        }
                    }
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let post_end = origin.elapsed().as_micros() as u64;
    let created = std::mem::take(&mut *created.lock().expect("not poisoned"));
    let want = created.len() * endpoints;
    wait_for(&inbox, want, Duration::from_secs(timeout)).await;
    let backlog = Backlog::finish(backlog).await;
    let arrivals = std::mem::take(&mut *inbox.arrivals.lock().expect("not poisoned"));
    let (received, distinct, duplicates, first) = tally(&arrivals);
    let ours: HashSet<Uuid> = created.iter().copied().collect();
    let delivered = first.keys().filter(|(_, c)| ours.contains(c)).count();
    let missing = want - delivered;
    let (first_at, last_at) = arrivals
        .iter()
        .fold((u64::MAX, 0), |(a, b), x| (a.min(x.at), b.max(x.at)));
    // Deliveries second by second from the first POST: the best second.
    let mut per_second = Vec::<u64>::new();
    for a in &arrivals {
        let s = (a.at.saturating_sub(post_start) / 1_000_000) as usize;
        if per_second.len() <= s {
            per_second.resize(s + 1, 0);
        }
        per_second[s] += 1;
    }
    let best = per_second.iter().copied().max().unwrap_or(0);
    let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e6;
    let (post_s, whole_s, window_s) = (
        secs(post_start, post_end),
        secs(post_start, last_at),
        secs(first_at, last_at),
    );
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    // The fan-out's and the worker's pace, from the database: when the messages were
    // queued (first to last), how many attempts were made, and how many delivered.
    let db = connect(&database_url).await?;
    let row = db
        .query_one(
            "SELECT count(*), \
                    count(*) FILTER (WHERE status = 'delivered'), \
                    coalesce(sum(attempts), 0)::bigint, \
                    coalesce(extract(epoch FROM max(created_at) - min(created_at)), 0)::float8, \
                    coalesce(extract(epoch FROM max(finished_at) - min(created_at)), 0)::float8 \
             FROM webhook_messages WHERE endpoint_id = ANY($1)",
            &[&ids],
        )
        .await?;
    let (messages, db_delivered, attempts, fanout_s, queued_to_done_s): (i64, i64, i64, f64, f64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    delete_endpoints(&t, &ids).await?;
    if let Some(e) = inbox.last_error.lock().ok().and_then(|e| e.clone()) {
        eprintln!("crm-bench webhooks-throughput: last refused delivery: {e}");
    }
    let h = latency.lock().expect("not poisoned").clone();
    println!(
        "webhooks-throughput endpoints={endpoints} connections={connections} contacts={} \
         post_errors={} post_s={post_s:.2} contacts_per_s={:.0} post_p50_ms={:.2} post_p99_ms={:.2} \
         expected={want} received={received} distinct={distinct} duplicates={duplicates} \
         missing={missing} unverified={} whole_s={whole_s:.2} deliveries_per_s={:.0} \
         window_s={window_s:.2} window_per_s={:.0} best_1s={best} \
         messages={messages} messages_delivered={db_delivered} attempts={attempts} \
         fanout_s={fanout_s:.2} fanout_events_per_s={:.0} queued_to_done_s={queued_to_done_s:.2} \
         {backlog} cpu_s={}",
        created.len(),
        errors.load(Ordering::Relaxed),
        rate(created.len(), post_s),
        ms(&h, 0.5),
        ms(&h, 0.99),
        inbox.unverified.load(Ordering::Relaxed),
        rate(distinct, whole_s),
        rate(distinct, window_s),
        rate(messages as usize / endpoints.max(1), fanout_s),
        cpu_seconds()
    );
    Ok(())
}

#[derive(Args)]
pub(crate) struct LatencyArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 1)]
    endpoints: usize,
    /// Contacts per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds of contacts before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Most requests in flight at once (the schedule stalls beyond it, which shows as
    /// an achieved rate below --rate).
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
    /// Give up when no delivery arrived for this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// The database `crm serve` writes to (read directly, as its owner).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, env = "NATS_URL")]
    nats_url: String,
    #[arg(long, env = "CRM_NATS_STREAM")]
    stream: String,
}

pub(crate) async fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    let LatencyArgs {
        target: t,
        endpoints,
        rate,
        seconds,
        warmup,
        max_in_flight,
        timeout,
        database_url,
        nats_url,
        stream,
    } = args;
    anyhow::ensure!(
        rate > 0 && seconds > 0,
        "--rate and --seconds must be positive"
    );
    let origin = Instant::now();
    let (ids, inbox) = receiver(&t, endpoints, origin).await?;
    let backlog = Backlog::start(&nats_url, &stream).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(max_in_flight)
        .build()?;
    let t = Arc::new(t);
    let tag = run_tag();
    let total = rate * (warmup + seconds);
    let limit = Arc::new(Semaphore::new(max_in_flight));
    // (contact, µs since the origin at which its 201 arrived)
    let answered = Arc::new(StdMutex::new(Vec::<(Uuid, u64)>::with_capacity(
        total as usize,
    )));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let sched_start = started.duration_since(origin).as_micros() as u64;
    let measure_from = sched_start + warmup * 1_000_000;
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        tick.tick().await;
        let permit = limit.clone().acquire_owned().await?;
        let (http, t, answered, errors) =
            (http.clone(), t.clone(), answered.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let answer = super::post(&http, &t, &contact(tag, n)).await;
            let at = origin.elapsed().as_micros() as u64;
            match answer
                .ok()
                .and_then(|v| v["id"].as_str().and_then(|s| s.parse::<Uuid>().ok()))
            {
                Some(id) => {
                    if let Ok(mut a) = answered.lock() {
                        a.push((id, at));
                    }
                }
                None => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        }));
    }
    for task in tasks {
        task.await?;
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let answered = std::mem::take(&mut *answered.lock().expect("not poisoned"));
    wait_for(
        &inbox,
        answered.len() * endpoints,
        Duration::from_secs(timeout),
    )
    .await;
    let backlog = Backlog::finish(backlog).await;
    let arrivals = std::mem::take(&mut *inbox.arrivals.lock().expect("not poisoned"));
    let (received, _, duplicates, first) = tally(&arrivals);
    let mut latency = histogram();
    let mut warm = histogram();
    // A delivery that arrived before this process had read its 201 (the worker can be
    // that quick): counted as 0 and reported.
    let (mut missing, mut before_answer) = (0, 0);
    for (id, at) in &answered {
        for k in 0..endpoints {
            let Some(arrived) = first.get(&(k, *id)) else {
                missing += 1;
                continue;
            };
            if arrived < at {
                before_answer += 1;
            }
            let lag = arrived.saturating_sub(*at);
            if *at < measure_from {
                warm.record(lag)?;
            } else {
                latency.record(lag)?;
            }
        }
    }
    // The hops, from the database: commit (recorded_at) -> queued by the fan-out
    // (the message's created_at) -> claimed (first attempt started) -> answered (first
    // attempt finished). Measured contacts only.
    let measured: Vec<Uuid> = answered
        .iter()
        .filter(|(_, at)| *at >= measure_from)
        .map(|(id, _)| *id)
        .collect();
    let db = connect(&database_url).await?;
    let hops = db
        .query_one(
            "WITH h AS ( \
               SELECT extract(epoch FROM m.created_at - e.recorded_at) * 1000 AS fanout, \
                      extract(epoch FROM a.started_at - m.created_at) * 1000 AS claim, \
                      extract(epoch FROM a.finished_at - a.started_at) * 1000 AS post \
               FROM webhook_messages m \
               JOIN events e ON e.event_id = m.event_id \
               JOIN webhook_attempts a ON a.message_id = m.id AND a.attempt = 1 \
               WHERE m.endpoint_id = ANY($1) \
                 AND e.aggregate_type = 'contact' AND e.aggregate_id = ANY($2)) \
             SELECT count(*), \
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY fanout), 0)::float8, \
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY fanout), 0)::float8, \
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY claim), 0)::float8, \
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY claim), 0)::float8, \
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY post), 0)::float8, \
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY post), 0)::float8 \
             FROM h",
            &[
                &ids,
                &measured.iter().map(Uuid::to_string).collect::<Vec<_>>(),
            ],
        )
        .await?;
    let attempts: i64 = db
        .query_one(
            "SELECT coalesce(sum(attempts), 0)::bigint FROM webhook_messages WHERE endpoint_id = ANY($1)",
            &[&ids],
        )
        .await?
        .get(0);
    delete_endpoints(&t, &ids).await?;
    if let Some(e) = inbox.last_error.lock().ok().and_then(|e| e.clone()) {
        eprintln!("crm-bench webhooks-latency: last refused delivery: {e}");
    }
    println!(
        "webhooks-latency endpoints={endpoints} target_rate={rate} achieved_rate={achieved:.0} \
         warmup_s={warmup} seconds={seconds} contacts={} post_errors={} received={received} \
         duplicates={duplicates} missing={missing} unverified={} attempts={attempts} \
         before_answer={before_answer} warmup_p50_ms={:.2} deliveries={} p50_ms={:.2} \
         p99_ms={:.2} max_ms={:.2} hops={} fanout_p50_ms={:.2} fanout_p99_ms={:.2} \
         claim_p50_ms={:.2} claim_p99_ms={:.2} send_p50_ms={:.2} send_p99_ms={:.2} \
         {backlog} cpu_s={}",
        answered.len(),
        errors.load(Ordering::Relaxed),
        inbox.unverified.load(Ordering::Relaxed),
        ms(&warm, 0.5),
        latency.len(),
        ms(&latency, 0.5),
        ms(&latency, 0.99),
        latency.max() as f64 / 1000.0,
        hops.get::<_, i64>(0),
        hops.get::<_, f64>(1),
        hops.get::<_, f64>(2),
        hops.get::<_, f64>(3),
        hops.get::<_, f64>(4),
        hops.get::<_, f64>(5),
        hops.get::<_, f64>(6),
        cpu_seconds()
    );
    Ok(())
}
