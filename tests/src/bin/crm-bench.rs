//! Load generator for `scripts/bench` (figures: docs/benchmarks.md).
//!
//! - `load`: N connections post contacts as fast as they can for S seconds (after a
//!   warm-up); prints commands/s and latency percentiles.
//! - `lag`: posts contacts at a fixed rate (open loop) and measures, for each, the time
//!   from the command's response to the moment the `contacts` projection's checkpoint
//!   (read from PostgreSQL every `--poll-ms`) covers its event; the relay's checkpoint is
//!   read by the same query, which splits the lag into its two hops.
//!   With `--kind consent` it records consent withdrawals instead (`POST
//!   /v1/contacts/{id}/consent`, one contact each) and follows the `consent_log`
//!   projection: commit-to-ConsentLog lag.
//! - `messages`, `consent-check`: the send gate and the bulk check (`consent.rs`).
//! - `ai-actions`, `ai-approvals`: AI actions run at once beside plain commands, and
//!   approval-to-execution latency (`ai.rs`).
//! - `rights-seed`, `rights-erase`, `rights-read`, `rights-links`, `rights-page`:
//!   erasure of contacts with 20 events each, reads of erased contacts beside live
//!   ones, and the preference center page beside `GET /healthz` (`scripts/bench
//!   --rights`, see `rights.rs`).
//! - `webhooks-throughput`, `webhooks-latency`: deliveries per second to a local
//!   receiver (inside this process, verifying every signature) at 32 endpoints, and
//!   commit-to-delivery latency at a paced rate (`scripts/bench --webhooks`, see
//!   `webhooks.rs`).
//! - `live`: SSE clients on `GET /v1/events/stream`: memory per connection and
//!   commit-to-client latency (`scripts/bench --live`, see `live.rs`).
//! - `drop-stream`: deletes the JetStream stream a run used.
//! - `scale-seed`, `scale-grow`, `read`: the scale phase (`scripts/bench --scale`, see
//!   `scale.rs`).
//!
//! `load`, `lag` and the scale phase's commands print one line of `key=value` fields, ending with `cpu_s`, the CPU
//! time this process used (Linux; `na` elsewhere). The JWT comes from CRM_BENCH_TOKEN
//! (out of `ps`) and is never printed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{Mutex, Semaphore};

#[path = "crm-bench/ai.rs"]
mod ai;
#[path = "crm-bench/consent.rs"]
mod consent;
#[path = "crm-bench/live.rs"]
mod live;
#[path = "crm-bench/rights.rs"]
mod rights;
#[path = "crm-bench/scale.rs"]
mod scale;
#[path = "crm-bench/webhooks.rs"]
mod webhooks;

#[derive(Parser)]
#[command(name = "crm-bench", about = "Load generator for scripts/bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Target {
    /// Base URL of `crm serve`, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// A staff JWT; prefer the environment variable, which `ps` does not show.
    #[arg(long, env = "CRM_BENCH_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Subcommand)]
enum Command {
    /// Closed loop: every connection posts its next contact as soon as the last returns.
    Load {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Seconds of load before measuring.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
    },
    /// Open loop at a fixed rate; commit-to-read-model lag of every command.
    Lag(LagArgs),
    /// Delete a JetStream stream (the run's own, at the end of scripts/bench).
    DropStream {
        #[arg(long, env = "NATS_URL")]
        nats_url: String,
        #[arg(long, env = "CRM_NATS_STREAM")]
        stream: String,
    },
    /// Closed loop: every connection sends its next message through the send gate
    /// (`POST /v1/contacts/{id}/messages`) as soon as the last returns.
    Messages(consent::MessagesArgs),
    /// `POST /v1/consent/check` of 10,000 ids beside a plain SELECT of their rows.
    ConsentCheck(consent::CheckArgs),
    /// AI actions run at once (user-initiated, low risk) beside `POST /v1/contacts`,
    /// alternating in 1 s slices.
    AiActions(ai::ActionsArgs),
    /// Approvals of pending AI actions at a fixed rate: approval-to-execution latency.
    AiApprovals(ai::ApprovalsArgs),
    /// SSE clients on the live event stream: memory per connection, then
    /// commit-to-client latency at a fixed rate of contacts (`scripts/bench --live`).
    Live(live::LiveArgs),
    /// Contacts with 20 events each (half to erase), their ids into --ids.
    RightsSeed(rights::SeedArgs),
    /// `POST /v1/contacts/{id}/erase` of the seeded contacts to erase: erasures/s.
    RightsErase(rights::EraseArgs),
    /// `GET /v1/contacts/{id}` of erased contacts beside live ones, alternating in 1 s
    /// slices.
    RightsRead(rights::ReadArgs),
    /// A preference-center link for each of the first --links live contacts, their
    /// tokens into --out.
    RightsLinks(rights::LinksArgs),
    /// The preference center page (`GET /preferences?token=`) beside `GET /healthz`,
    /// alternating in 1 s slices.
    RightsPage(rights::PageArgs),
    /// Endpoints at a receiver in this process, then contacts as fast as the API takes
    /// them: deliveries per second (every signature verified).
    WebhooksThroughput(webhooks::ThroughputArgs),
    /// Contacts at a paced rate to an endpoint in this process: commit-to-delivery
    /// latency.
    WebhooksLatency(webhooks::LatencyArgs),
    /// Scale phase, before the first step: long contacts and a second staff user.
    ScaleSeed(scale::SeedArgs),
    /// Scale phase: grow the organisation by contacts --from..--to, then a few markers
    /// and archives.
    ScaleGrow(scale::GrowArgs),
    /// Scale phase: one GET, sequentially, warm-up then measured; p50 and p95.
    Read(scale::ReadArgs),
}

/// What the `lag` phase writes and which read model it follows.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LagKind {
    /// `POST /v1/contacts`, followed in the `contacts` projection.
    Contacts,
    /// `POST /v1/contacts/{id}/consent` (a withdrawal, one contact each), followed in
    /// the `consent_log` projection.
    Consent,
}

#[derive(Args)]
struct LagArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, value_enum, default_value_t = LagKind::Contacts)]
    kind: LagKind,
    /// `--kind consent`: skip this many of the newest contacts (those an earlier run
    /// of this phase changed), so that every change is a contact's first.
    #[arg(long, default_value_t = 0)]
    skip_contacts: i64,
    /// Commands per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Most requests in flight at once (the schedule stalls beyond it, which shows
    /// as an achieved rate below --rate).
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
    /// How often to read the checkpoints. Finer polls load the database too: at 1 ms
    /// the poller issues as many queries as 1,000 commands/s do.
    #[arg(long, default_value_t = 2)]
    poll_ms: u64,
    /// Commands answered in the first this many seconds are sent and waited for but
    /// left out of the percentiles (their p50 is reported as warmup_p50_ms).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Also print, on stderr, the lag second by second.
    #[arg(long)]
    series: bool,
    /// The database `crm serve` writes to (read directly, as its owner).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

/// A tag that keeps contacts of different runs and phases distinct.
fn run_tag() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64 % 1_000_000_000)
}

/// A contact with data of its own: names, e-mail, phone, company and a custom field.
fn contact(tag: u64, n: u64) -> Value {
    json!({
        "given_name": format!("Bench{n}"),
        "family_name": format!("Load{tag}"),
        "email": format!("bench{n}.{tag}@example.com"),
        "phone": format!("+4416329{:05}", n % 100_000),
        "company": format!("Bench {} Ltd", n % 1000),
        "custom": {"run": tag, "n": n}
    })
}

async fn post(http: &reqwest::Client, t: &Target, body: &Value) -> Result<Value, String> {
    post_to(http, t, "/v1/contacts", body).await
}

/// Posts `body` to `path`; the response status must be 201.
async fn post_to(
    http: &reqwest::Client,
    t: &Target,
    path: &str,
    body: &Value,
) -> Result<Value, String> {
    let r = http
        .post(format!("{}{path}", t.url))
        .bearer_auth(&t.token)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != reqwest::StatusCode::CREATED {
        return Err(format!("status {}", r.status()));
    }
    r.json().await.map_err(|e| e.to_string())
}

/// One keep-alive HTTP/1.1 connection: a bare hyper client, so that the load generator
/// spends as little of the machine's CPU as it can.
struct Conn {
    addr: String,
    authorization: hyper::header::HeaderValue,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl Conn {
    fn new(t: &Target) -> anyhow::Result<Self> {
        Self::with_token(&t.url, &t.token)
    }

    fn with_token(url: &str, token: &str) -> anyhow::Result<Self> {
        let addr = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("--url must be http://host:port"))?
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            addr,
            authorization: format!("Bearer {token}").parse()?,
            sender: None,
        })
    }

    /// Sends one request (a JSON body if any) and reads the whole response. An error is
    /// a failure to connect, send or read; any status is an answer.
    async fn send(
        &mut self,
        method: hyper::Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<(hyper::StatusCode, bytes::Bytes), String> {
        use http_body_util::BodyExt;
        // The connection takes the next request only once it has finished with the last
        // (sending on it before is a "connection was not ready" error); a closed one is
        // replaced.
        if let Some(sender) = self.sender.as_mut() {
            if sender.ready().await.is_err() {
                self.sender = None;
            }
        }
        if self.sender.is_none() {
            let stream = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(hyper::header::AUTHORIZATION, self.authorization.clone());
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(http_body_util::Full::new(body.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        if result.is_err() {
            // Start afresh on the next request.
            self.sender = None;
        }
        result
    }

    /// Posts one contact; the response status must be 201.
    async fn post(&mut self, body: bytes::Bytes) -> Result<(), String> {
        let (status, _) = self
            .send(hyper::Method::POST, "/v1/contacts", Some(body))
            .await?;
        if status != hyper::StatusCode::CREATED {
            // Start afresh on the next request.
            self.sender = None;
            return Err(format!("status {status}"));
        }
        Ok(())
    }
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
fn cpu_seconds() -> String {
    let ticks = || -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after "pid (comm)": state is the 1st, utime the 12th, stime the 13th.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    // USER_HZ is 100 on every Linux platform Rust targets.
    ticks().map_or_else(|| "na".into(), |t| format!("{:.2}", t as f64 / 100.0))
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is valid")
}

/// Quantile q of a histogram of microseconds, in milliseconds.
fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn load(t: Target, connections: usize, seconds: u64, warmup: u64) -> anyhow::Result<()> {
    let tag = run_tag();
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let last_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(warmup);
    let end = measure_from + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Conn::new(&t)?;
        let (counter, errors, last_error) = (counter.clone(), errors.clone(), last_error.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            while Instant::now() < end {
                let body = contact(tag, counter.fetch_add(1, Ordering::Relaxed));
                let body = bytes::Bytes::from(serde_json::to_vec(&body).expect("JSON"));
                let t0 = Instant::now();
                let result = conn.post(body).await;
                // Only requests sent and answered inside the measured window count.
                if t0 >= measure_from && Instant::now() <= end {
                    match result {
                        Ok(_) => local.record(t0.elapsed().as_micros() as u64).unwrap(),
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            *last_error.lock().await = Some(e);
                        }
                    }
                }
            }
            local
        }));
    }
    let mut h = histogram();
    for task in tasks {
        h.add(task.await?)?;
    }
    if let Some(e) = last_error.lock().await.as_ref() {
        eprintln!("crm-bench load: last error: {e}");
    }
    println!(
        "load connections={connections} seconds={seconds} commands={} errors={} cmd_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} cpu_s={}",
        h.len(),
        errors.load(Ordering::Relaxed),
        h.len() as f64 / seconds as f64,
        ms(&h, 0.5),
        ms(&h, 0.99),
        h.max() as f64 / 1000.0,
        cpu_seconds()
    );
    Ok(())
}

/// A commit key `(tx_id, global_position)`: the order the relay and projectors follow.
type Key = (i64, i64);

/// Checkpoint samples in time order: (µs since the origin, checkpoint key). Checkpoints
/// only move forward, so the keys are sorted too.
#[derive(Default)]
struct Samples {
    projection: Vec<(u64, Key)>,
    relay: Vec<(u64, Key)>,
}

/// Microseconds from `at` to the first sample whose key covers `key`, if any.
fn covered_after(samples: &[(u64, Key)], key: Key, at: u64) -> Option<u64> {
    let first = samples.partition_point(|s| s.1 < key);
    samples.get(first).map(|s| s.0.saturating_sub(at))
}

async fn lag(args: LagArgs) -> anyhow::Result<()> {
    let LagArgs {
        target: t,
        kind,
        skip_contacts,
        rate,
        seconds,
        max_in_flight,
        poll_ms,
        warmup,
        series,
        database_url,
    } = args;
    anyhow::ensure!(
        rate > 0 && seconds > 0,
        "--rate and --seconds must be positive"
    );
    let (db, conn) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let db = Arc::new(db);
    let total = rate * (warmup + seconds);
    let projection = match kind {
        LagKind::Contacts => "contacts",
        LagKind::Consent => "consent_log",
    };
    // Consent: one contact per change (of the run's contacts, newest ids first; reused
    // in turn when there are fewer).
    let consent_ids: Arc<Vec<uuid::Uuid>> = Arc::new(match kind {
        LagKind::Contacts => Vec::new(),
        LagKind::Consent => {
            let ids = consent::contact_ids(&db, total as i64, skip_contacts, true).await?;
            anyhow::ensure!(!ids.is_empty(), "no contacts to record consent for");
            ids.into_iter().map(|(_, id)| id).collect()
        }
    });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(max_in_flight)
        .build()?;
    let t = Arc::new(t);
    let tag = run_tag();
    let origin = Instant::now();

    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (db, samples, stop) = (db.clone(), samples.clone(), stop.clone());
        let stmt = db
            .prepare(
                "SELECT p.tx_id::text::bigint, p.global_position, \
                        r.tx_id::text::bigint, r.global_position \
                 FROM projection_checkpoints p \
                 LEFT JOIN LATERAL (SELECT tx_id, global_position FROM relay_checkpoints \
                                    ORDER BY tx_id DESC, global_position DESC LIMIT 1) r ON true \
                 WHERE p.name = $1",
            )
            .await?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(poll_ms.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Ok(Some(r)) = db.query_opt(&stmt, &[&projection]).await {
                    let at = origin.elapsed().as_micros() as u64;
                    let mut s = samples.lock().await;
                    s.projection.push((at, (r.get(0), r.get(1))));
                    if let (Some(tx), Some(pos)) = (r.get(2), r.get(3)) {
                        s.relay.push((at, (tx, pos)));
                    }
                }
            }
        })
    };

    let limit = Arc::new(Semaphore::new(max_in_flight));
    // (µs since the origin at which the response arrived, global position of its event)
    let results = Arc::new(Mutex::new(Vec::<(u64, i64)>::new()));
    // The consent events written (checked against the `consent_log` table at the end).
    let event_ids = Arc::new(Mutex::new(Vec::<uuid::Uuid>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        tick.tick().await;
        let permit = limit.clone().acquire_owned().await?;
        let (http, t, results, errors) = (http.clone(), t.clone(), results.clone(), errors.clone());
        let (consent_ids, event_ids) = (consent_ids.clone(), event_ids.clone());
        tasks.push(tokio::spawn(async move {
            let answer = match kind {
                LagKind::Contacts => post(&http, &t, &contact(tag, n)).await,
                LagKind::Consent => {
                    let id = consent_ids[n as usize % consent_ids.len()];
                    post_to(
                        &http,
                        &t,
                        &format!("/v1/contacts/{id}/consent"),
                        &consent::withdrawal(),
                    )
                    .await
                }
            };
            match answer {
                Ok(v) => {
                    let at = origin.elapsed().as_micros() as u64;
                    let position = match kind {
                        LagKind::Contacts => v["positions"][0].as_i64(),
                        LagKind::Consent => v["position"].as_i64(),
                    };
                    if kind == LagKind::Consent {
                        if let Some(id) = v["event_id"].as_str().and_then(|s| s.parse().ok()) {
                            event_ids.lock().await.push(id);
                        }
                    }
                    match position {
                        Some(p) => results.lock().await.push((at, p)),
                        None => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(_) => {
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
    // Give the read model 2 s to catch up, then stop polling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    poller.await?;

    let results = std::mem::take(&mut *results.lock().await);
    let positions: Vec<i64> = results.iter().map(|r| r.1).collect();
    let rows = db
        .query(
            "SELECT global_position, tx_id::text::bigint FROM events WHERE global_position = ANY($1)",
            &[&positions],
        )
        .await?;
    let tx_of: HashMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let samples = std::mem::take(&mut *samples.lock().await);
    // Consent: how many of the events written are rows of the ConsentLog by now.
    let in_log = match kind {
        LagKind::Contacts => String::new(),
        LagKind::Consent => {
            let ids = std::mem::take(&mut *event_ids.lock().await);
            let n: i64 = db
                .query_one(
                    "SELECT count(*) FROM consent_log WHERE event_id = ANY($1)",
                    &[&ids],
                )
                .await?
                .get(0);
            format!(
                " kind=consent contacts={} events={} in_log={n}",
                consent_ids.len(),
                ids.len()
            )
        }
    };

    let mut total_lag = histogram();
    let mut relay_lag = histogram();
    let mut warmup_lag = histogram();
    // The lag of measured commands answered in the first and in the last 2 s: a pipeline
    // that keeps up shows the same figure; one that does not, a growing one.
    let (mut early, mut late) = (histogram(), histogram());
    // Second by second (from the start of the schedule): (lag, relay hop).
    let mut by_second: Vec<(Histogram<u64>, Histogram<u64>)> = Vec::new();
    let sched_start = started.duration_since(origin).as_micros() as u64;
    let measure_from = sched_start + warmup * 1_000_000;
    let sched_end = measure_from + seconds * 1_000_000;
    let mut unseen = 0;
    for (at, pos) in results {
        let key = (tx_of[&pos], pos);
        let second = (at.saturating_sub(sched_start) / 1_000_000) as usize;
        if by_second.len() <= second {
            by_second.resize_with(second + 1, || (histogram(), histogram()));
        }
        let relay = covered_after(&samples.relay, key, at);
        if let Some(lag) = relay {
            by_second[second].1.record(lag)?;
        }
        let Some(lag) = covered_after(&samples.projection, key, at) else {
            unseen += 1;
            continue;
        };
        by_second[second].0.record(lag)?;
        if at < measure_from {
            warmup_lag.record(lag)?;
            continue;
        }
        total_lag.record(lag)?;
        if let Some(r) = relay {
            relay_lag.record(r)?;
        }
        if at < measure_from + 2_000_000 {
            early.record(lag)?;
        } else if at + 2_000_000 >= sched_end {
            late.record(lag)?;
        }
    }
    if series {
        for (s, (lag, relay)) in by_second.iter().enumerate() {
            eprintln!(
                "crm-bench lag: second {s:>2}: {:>5} commands, lag p50 {:>7.1} ms p99 {:>7.1} ms; relay hop p50 {:>6.1} ms p99 {:>6.1} ms",
                lag.len(),
                ms(lag, 0.5),
                ms(lag, 0.99),
                ms(relay, 0.5),
                ms(relay, 0.99)
            );
        }
    }
    println!(
        "lag target_rate={rate} achieved_rate={achieved:.0} poll_ms={poll_ms} warmup_s={warmup} \
         warmup_p50_ms={:.2} warmup_p99_ms={:.2} commands={} errors={} unseen={unseen} \
         p50_ms={:.2} p99_ms={:.2} max_ms={:.2} first2s_p50_ms={:.2} last2s_p50_ms={:.2} \
         relay_p50_ms={:.2} relay_p99_ms={:.2}{in_log} cpu_s={}",
        ms(&warmup_lag, 0.5),
        ms(&warmup_lag, 0.99),
        total_lag.len(),
        errors.load(Ordering::Relaxed),
        ms(&total_lag, 0.5),
        ms(&total_lag, 0.99),
        total_lag.max() as f64 / 1000.0,
        ms(&early, 0.5),
        ms(&late, 0.5),
        ms(&relay_lag, 0.5),
        ms(&relay_lag, 0.99),
        cpu_seconds()
    );
    Ok(())
}

async fn drop_stream(nats_url: &str, stream: &str) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    js.delete_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("deleting stream {stream}: {e}"))?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Load {
            target,
            connections,
            seconds,
            warmup,
        } => load(target, connections, seconds, warmup).await,
        Command::Lag(args) => lag(args).await,
        Command::Messages(args) => consent::messages(args).await,
        Command::ConsentCheck(args) => consent::check(args).await,
        Command::AiActions(args) => ai::actions(args).await,
        Command::AiApprovals(args) => ai::approvals(args).await,
        Command::Live(args) => live::live(args).await,
        Command::RightsSeed(args) => rights::seed(args).await,
        Command::RightsErase(args) => rights::erase(args).await,
        Command::RightsRead(args) => rights::read(args).await,
        Command::RightsLinks(args) => rights::links(args).await,
        Command::RightsPage(args) => rights::page(args).await,
        Command::WebhooksThroughput(args) => webhooks::throughput(args).await,
        Command::WebhooksLatency(args) => webhooks::latency(args).await,
        Command::DropStream { nats_url, stream } => drop_stream(&nats_url, &stream).await,
        Command::ScaleSeed(args) => scale::seed(args).await,
        Command::ScaleGrow(args) => scale::grow(args).await,
        Command::Read(args) => scale::read(args).await,
    }
}
