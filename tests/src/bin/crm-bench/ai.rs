//! The AI phases of `scripts/bench` (issue 13; figures: docs/benchmarks.md).
//!
//! - `ai-actions`: 32 connections propose AI actions that the policy runs at once (the
//!   bench user's own, so user-initiated, changing `company`, so low risk: proposed,
//!   auto-approved, run as `PATCH /v1/contacts/{id}` and recorded, all in the one
//!   request), beside plain `POST /v1/contacts`, alternating in 1 s slices so that both
//!   see the same machine; prints both rates and their ratio.
//! - `ai-approvals`: an agent (registered by the bench user) proposes changes of a
//!   personal field, which wait for a person; then the bench user approves them at a
//!   fixed rate (open loop). An approval answers once the action ran and its outcome
//!   is recorded, so the answer's latency is the approval-to-execution time; prints its
//!   percentiles.
//!
//! Each prints one line of `key=value` fields ending with `cpu_s`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::consent::contact_ids;
use super::{contact, cpu_seconds, histogram, ms, run_tag, Conn, Target};

async fn connect(database_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (db, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(db)
}

/// The run's contacts (those with an e-mail address the gate knows), by id.
async fn contacts(database_url: &str, limit: i64) -> anyhow::Result<Arc<Vec<Uuid>>> {
    let db = connect(database_url).await?;
    let ids: Vec<Uuid> = contact_ids(&db, limit, 0, false)
        .await?
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    anyhow::ensure!(!ids.is_empty(), "no contacts to act on");
    Ok(Arc::new(ids))
}

#[derive(Args)]
pub(crate) struct ActionsArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measured seconds of each of the two (alternating in slices of `--slice-ms`).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The length of a slice, in milliseconds (a diagnostic: how much the requests cut
    /// off at each change of side weigh, `BENCH_AI_SLICE_MS`).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
    slice_ms: u64,
    /// End each slice drained: its last answers in, and the relay and every read model
    /// caught up with what it wrote, that time counted in the slice: each side pays
    /// for its own read models (phase 8's second alternation).
    #[arg(long)]
    drain: bool,
    /// The database `crm serve` writes to (read directly, as its owner).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Only one of the two, in every slice (a diagnostic: the CPU one operation of that
    /// side costs, `BENCH_AI_SPLIT=1 scripts/bench --ai`); the other side reads 0.
    /// `update`: instead of either, the plain command an AI action runs
    /// (`PATCH /v1/contacts/{id}` of `company` on the same contacts), reported on the
    /// AI side.
    #[arg(long, value_enum)]
    only: Option<OnlySide>,
}

/// The side `--only` keeps.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OnlySide {
    Contacts,
    Ai,
    Update,
}

/// What one side of the alternation measured.
struct Side {
    latency: Mutex<Histogram<u64>>,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Side {
    fn new() -> Self {
        Self {
            latency: Mutex::new(histogram()),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Counts one request sent at `t0`: answered as it must be, or its error.
    async fn record(&self, t0: Instant, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => self
                .latency
                .lock()
                .await
                .record(t0.elapsed().as_micros() as u64)
                .unwrap(),
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().await = Some(e);
            }
        }
    }
}

/// What every connection shares: the contacts acted on, the run's tag and the request
/// counter (each request changes another contact, with another value).
#[derive(Clone)]
struct Work {
    ids: Arc<Vec<Uuid>>,
    tag: u64,
    counter: Arc<AtomicU64>,
    only: Option<OnlySide>,
}

impl Work {
    /// Sends one request of `side` (0: `POST /v1/contacts`; 1: an AI action, or with
    /// `--only update` the plain `PATCH`) and checks its answer.
    async fn send(&self, conn: &mut Conn, side: usize) -> Result<(), String> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = self.ids[n as usize % self.ids.len()];
        let company = format!("Company {n}");
        let (method, path, body, created, want) = if side == 0 {
            let path = "/v1/contacts".to_owned();
            (
                hyper::Method::POST,
                path,
                contact(self.tag, n),
                true,
                "\"id\"",
            )
        } else if self.only == Some(OnlySide::Update) {
            let path = format!("/v1/contacts/{id}");
            let body = json!({ "company": company });
            (hyper::Method::PATCH, path, body, false, "\"version\"")
        } else {
            let path = "/v1/ai/actions".to_owned();
            let body = json!({"type": "update_contact", "contact_id": id,
                              "arguments": {"company": company}});
            (
                hyper::Method::POST,
                path,
                body,
                true,
                "\"status\":\"executed\"",
            )
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&body).expect("json"));
        let ok = if created {
            hyper::StatusCode::CREATED
        } else {
            hyper::StatusCode::OK
        };
        match conn.send(method, &path, Some(body)).await {
            Ok((status, answer))
                if status == ok && answer.windows(want.len()).any(|w| w == want.as_bytes()) =>
            {
                Ok(())
            }
            Ok((status, answer)) => Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(300)])
            )),
            Err(e) => Err(e),
        }
    }

    /// The side slice `slice` runs (slice k is contacts when k is even, AI actions when
    /// odd, unless `--only` keeps one).
    fn side(&self, slice: u64) -> usize {
        match self.only {
            Some(OnlySide::Contacts) => 0,
            Some(OnlySide::Ai | OnlySide::Update) => 1,
            None => (slice % 2) as usize,
        }
    }
}

/// Slices not counted at the start of `ai-actions`.
const WARM_UP_SLICES: u64 = 2;

pub(crate) async fn actions(args: ActionsArgs) -> anyhow::Result<()> {
    let ActionsArgs {
        target: t,
        connections,
        seconds,
        slice_ms,
        drain,
        database_url,
        only,
    } = args;
    let work = Work {
        ids: contacts(&database_url, 20_000).await?,
        tag: run_tag(),
        counter: Arc::new(AtomicU64::new(0)),
        only,
    };
    let sides = Arc::new([Side::new(), Side::new()]);
    // The warm-up slices (one of each side, or two of the one `--only` keeps), then
    // `seconds` of each side.
    let per_side = (seconds * 1000).div_ceil(slice_ms);
    let slices = WARM_UP_SLICES
        + match only {
            Some(_) => per_side,
            None => 2 * per_side,
        };
    let slice = Duration::from_millis(slice_ms);
    let conns = (0..connections)
        .map(|_| Conn::new(&t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let measured = if drain {
        drained(&work, &sides, conns, slices, slice, &database_url).await?
    } else {
        timed(&work, &sides, conns, slices, slice).await?
    };
    for (name, s) in ["contacts", "ai actions"].iter().zip(sides.iter()) {
        if let Some(e) = s.last_error.lock().await.as_ref() {
            eprintln!("crm-bench ai-actions: {name}: last error: {e}");
        }
    }
    let (c, a) = (
        sides[0].latency.lock().await.clone(),
        sides[1].latency.lock().await.clone(),
    );
    let rate = |n: u64, d: Duration| {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };
    let (c_rate, a_rate) = (rate(c.len(), measured[0]), rate(a.len(), measured[1]));
    let behind = backlog(&database_url).await?;
    println!(
        "ai-actions connections={connections} seconds={seconds} slice_ms={slice_ms} \
         drained={drain} contacts_s={:.2} ai_s={:.2} contacts_per_s={c_rate:.0} \
         contacts_p50_ms={:.2} contacts_p99_ms={:.2} contacts_errors={} ai_per_s={a_rate:.0} \
         ai_p50_ms={:.2} ai_p99_ms={:.2} ai_errors={} ratio={:.2} backlog_events={behind} cpu_s={}",
        measured[0].as_secs_f64(),
        measured[1].as_secs_f64(),
        ms(&c, 0.5),
        ms(&c, 0.99),
        sides[0].errors.load(Ordering::Relaxed),
        ms(&a, 0.5),
        ms(&a, 0.99),
        sides[1].errors.load(Ordering::Relaxed),
        if c_rate > 0.0 { a_rate / c_rate } else { 0.0 },
        cpu_seconds()
    );
    Ok(())
}

/// Slices by the clock: each connection sends the side of the slice it is in; only
/// requests sent and answered inside one measured slice count, over the slices' time.
async fn timed(
    work: &Work,
    sides: &Arc<[Side; 2]>,
    conns: Vec<Conn>,
    slices: u64,
    slice: Duration,
) -> anyhow::Result<[Duration; 2]> {
    let start = Instant::now();
    let slice_of = move |at: Instant| ((at - start).as_millis() / slice.as_millis()) as u64;
    let mut tasks = Vec::new();
    for mut conn in conns {
        let (work, sides) = (work.clone(), sides.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let t0 = Instant::now();
                let k = slice_of(t0);
                if k >= slices {
                    break;
                }
                let side = work.side(k);
                let outcome = work.send(&mut conn, side).await;
                if k >= WARM_UP_SLICES && slice_of(Instant::now()) == k {
                    sides[side].record(t0, outcome).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let mut measured = [Duration::ZERO; 2];
    for k in WARM_UP_SLICES..slices {
        measured[work.side(k)] += slice;
    }
    Ok(measured)
}

/// Slices that each end drained (`--drain`): the connections send the slice's side
/// until its time is up; then the slice waits for their last answers and for the
/// relay and every read model to catch up with what it wrote. Every request of a
/// measured slice counts, over the slice's whole time, the catching up included: each
/// side pays for its own read models.
async fn drained(
    work: &Work,
    sides: &Arc<[Side; 2]>,
    mut conns: Vec<Conn>,
    slices: u64,
    slice: Duration,
    database_url: &str,
) -> anyhow::Result<[Duration; 2]> {
    let db = connect(database_url).await?;
    let mut measured = [Duration::ZERO; 2];
    for k in 0..slices {
        let side = work.side(k);
        let started = Instant::now();
        let until = started + slice;
        let mut tasks = Vec::with_capacity(conns.len());
        for mut conn in conns.drain(..) {
            let (work, sides) = (work.clone(), sides.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let t0 = Instant::now();
                    let outcome = work.send(&mut conn, side).await;
                    if k >= WARM_UP_SLICES {
                        sides[side].record(t0, outcome).await;
                    }
                }
                conn
            }));
        }
        for task in tasks {
            conns.push(task.await?);
        }
        let caught_up = Instant::now() + Duration::from_secs(120);
        let key = newest_key(&db).await?;
        while short_of(&db, key).await? {
            anyhow::ensure!(
                Instant::now() < caught_up,
                "the read models did not catch up within 2 minutes (are the relay and \
                 the projectors running?)"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if k >= WARM_UP_SLICES {
            measured[side] += started.elapsed();
        }
    }
    Ok(measured)
}

/// How many events the slowest read model has still to apply: what a phase left for
/// the relay and the projectors to do after it.
async fn backlog(database_url: &str) -> anyhow::Result<i64> {
    behind(&connect(database_url).await?).await
}

/// The newest event's commit key (`(tx_id, global_position)`, the relay's order), once
/// every answer of a slice is in: what the read models must reach for the slice to end
/// drained. `None`: no event yet.
async fn newest_key(db: &tokio_postgres::Client) -> anyhow::Result<Option<(i64, i64)>> {
    Ok(db
        .query_opt(
            // (ordered by the columns, not by the cast the output names `tx_id`: that
            // would sort every row instead of reading the index's last entry)
            "SELECT e.tx_id::text::bigint, e.global_position FROM events e \
             ORDER BY e.tx_id DESC, e.global_position DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Whether some read model's checkpoint is still short of `key`: a read of the few
/// checkpoint rows. (Counting the events after the lowest checkpoint on every poll, as
/// before, read each event still to apply and its heap page, taking PostgreSQL tens of
/// milliseconds of CPU a poll from the projectors being waited for.)
async fn short_of(db: &tokio_postgres::Client, key: Option<(i64, i64)>) -> anyhow::Result<bool> {
    let Some((tx, position)) = key else {
        return Ok(false);
    };
    Ok(db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM projection_checkpoints \
             WHERE (tx_id, global_position) < ($1::bigint::text::xid8, $2))",
            &[&tx, &position],
        )
        .await?
        .get(0))
}

/// The events after the lowest projection checkpoint in commit order
/// (`(tx_id, global_position)`, the order the relay publishes in): not the difference
/// of positions, as a transaction that committed later may hold lower positions than
/// the checkpoint's.
async fn behind(db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM events \
             WHERE (tx_id, global_position) > (SELECT tx_id, global_position \
                 FROM projection_checkpoints ORDER BY tx_id, global_position LIMIT 1)",
            &[],
        )
        .await?
        .get(0))
}

#[derive(Args)]
pub(crate) struct ApprovalsArgs {
    #[command(flatten)]
    target: Target,
    /// Approvals per second.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of approvals before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Connections proposing the pending actions first.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// The database `crm serve` writes to (read directly, as its owner).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

/// POST `body` to `path` as `conn`: the JSON answer of a 2xx, else an error.
async fn post_json(conn: &mut Conn, path: &str, body: &Value) -> anyhow::Result<Value> {
    let bytes = bytes::Bytes::from(serde_json::to_vec(body)?);
    let (status, answer) = conn
        .send(hyper::Method::POST, path, Some(bytes))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(
        status.is_success(),
        "{path}: status {status}: {}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
    Ok(serde_json::from_slice(&answer)?)
}

pub(crate) async fn approvals(args: ApprovalsArgs) -> anyhow::Result<()> {
    let ApprovalsArgs {
        target: t,
        rate,
        seconds,
        warmup,
        connections,
        database_url,
    } = args;
    let ids = contacts(&database_url, 20_000).await?;
    let total = (rate * (warmup + seconds)) as usize;
    anyhow::ensure!(
        total <= ids.len(),
        "{total} approvals need as many contacts"
    );
    // An agent of the bench user's, whose own proposals of a personal field wait.
    let mut owner = Conn::new(&t)?;
    let agent = post_json(
        &mut owner,
        "/v1/api-keys",
        &json!({"name": format!("bench agent {}", run_tag()), "role": "admin", "kind": "agent"}),
    )
    .await?;
    let key = agent["key"].as_str().unwrap_or_default().to_owned();
    let next = Arc::new(AtomicU64::new(0));
    let pending = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Conn::with_token(&t.url, &key)?;
        let (ids, next, pending) = (ids.clone(), next.clone(), pending.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let action = post_json(
                    &mut conn,
                    "/v1/ai/actions",
                    &json!({"type": "update_contact", "contact_id": ids[n],
                            "arguments": {"given_name": format!("Name {n}")}}),
                )
                .await?;
                anyhow::ensure!(
                    action["status"] == "pending_approval",
                    "a proposal did not wait: {action}"
                );
                pending.lock().await.push((
                    action["id"].as_str().unwrap_or_default().to_owned(),
                    action["arguments_sha256"].clone(),
                ));
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let pending = Arc::new(std::mem::take(&mut *pending.lock().await));
    // Open loop: approval k is sent at start + k / rate, whatever the earlier ones do.
    let start = Instant::now();
    let measure_from = Duration::from_secs(warmup);
    let latency = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let last_error = Arc::new(Mutex::new(None::<String>));
    let mut in_flight = Vec::with_capacity(pending.len());
    let conns = Arc::new(Mutex::new(Vec::<Conn>::new()));
    for k in 0..pending.len() {
        let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (pending, latency, errors, last_error, conns, t) = (
            pending.clone(),
            latency.clone(),
            errors.clone(),
            last_error.clone(),
            conns.clone(),
            Target {
                url: t.url.clone(),
                token: t.token.clone(),
            },
        );
        in_flight.push(tokio::spawn(async move {
            let mut conn = match conns.lock().await.pop() {
                Some(c) => c,
                None => Conn::new(&t).expect("a connection"),
            };
            let (id, sha) = &pending[k];
            let sent = Instant::now();
            let answer = post_json(
                &mut conn,
                &format!("/v1/ai/actions/{id}/approve"),
                &json!({"arguments_sha256": sha}),
            )
            .await;
            let took = sent.elapsed();
            match answer {
                Ok(v) if v["status"] == "executed" => {
                    if sent - start >= measure_from {
                        latency
                            .lock()
                            .await
                            .record(took.as_micros() as u64)
                            .unwrap();
                    }
                }
                Ok(v) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    *last_error.lock().await = Some(format!("not executed: {v}"));
                }
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    *last_error.lock().await = Some(e.to_string());
                }
            }
            conns.lock().await.push(conn);
        }));
    }
    for task in in_flight {
        task.await?;
    }
    let achieved = pending.len() as f64 / start.elapsed().as_secs_f64();
    if let Some(e) = last_error.lock().await.as_ref() {
        eprintln!("crm-bench ai-approvals: last error: {e}");
    }
    let h = latency.lock().await.clone();
    println!(
        "ai-approvals target_rate={rate} achieved_rate={achieved:.0} seconds={seconds} \
         approvals={} errors={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} cpu_s={}",
        h.len(),
        errors.load(Ordering::Relaxed),
        ms(&h, 0.5),
        ms(&h, 0.99),
        h.max() as f64 / 1000.0,
        cpu_seconds()
    );
    Ok(())
}
