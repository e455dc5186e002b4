//! Load generator for `scripts/bench`.
//!
//! - `load`: N connections post contacts as fast as they can for S seconds (after a
//!   warm-up); prints commands/s and latency percentiles.
//! - `lag`: posts contacts at a fixed rate and measures, for each, the time from the
//!   command's response to the moment the `contacts` projection's checkpoint (read from
//!   PostgreSQL every `--poll-ms`, 2 ms by default) covers its event.
//!
//! Each prints one line of `key=value` fields for `scripts/bench`, ending with `cpu_s`,
//! the CPU time this process used (Linux; `na` elsewhere). The token is never printed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    url: String,
    /// A staff JWT (read from the environment to keep it out of `ps`).
    #[arg(long, env = "CRM_BENCH_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Load {
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        warmup: u64,
    },
    Lag {
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// How often to read the checkpoint. Finer polls load the database too: at 1 ms
        /// the poller issues as many queries as the commands do.
        #[arg(long, default_value_t = 2)]
        poll_ms: u64,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

fn contact(n: u64) -> Value {
    json!({
        "given_name": format!("Bench{n}"),
        "family_name": "Loadtest",
        "email": format!("bench{n}@example.com"),
        "phone": "+441632960961",
        "company": "Bench Ltd",
        "custom": {"run": n}
    })
}

async fn post(http: &reqwest::Client, url: &str, token: &str, n: u64) -> Result<Value, String> {
    let r = http
        .post(format!("{url}/v1/contacts"))
        .bearer_auth(token)
        .json(&contact(n))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 201 {
        return Err(format!("status {}", r.status()));
    }
    r.json().await.map_err(|e| e.to_string())
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
fn cpu_seconds() -> String {
    let ticks = || -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after "pid (comm) ": state is the 1st, utime the 12th, stime the 13th.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    // USER_HZ is 100 on every Linux platform Rust targets.
    ticks().map_or_else(|| "na".into(), |t| format!("{:.2}", t as f64 / 100.0))
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn load(cli: &Cli, connections: usize, seconds: u64, warmup: u64) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(warmup);
    let end = measure_from + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (http, url, token) = (http.clone(), cli.url.clone(), cli.token.clone());
        let (counter, errors, hist) = (counter.clone(), errors.clone(), hist.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new(3).unwrap();
            let mut done = 0u64;
            while Instant::now() < end {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                let ok = post(&http, &url, &token, n).await.is_ok();
                if t0 >= measure_from && Instant::now() <= end {
                    if ok {
                        local.record(t0.elapsed().as_micros() as u64).unwrap();
                        done += 1;
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            hist.lock().await.add(local).unwrap();
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    let h = hist.lock().await;
    println!(
        "load connections={connections} seconds={seconds} commands={done} errors={} cmd_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} cpu_s={}",
        errors.load(Ordering::Relaxed),
        done as f64 / seconds as f64,
        ms(&h, 0.5),
        ms(&h, 0.99),
        h.max() as f64 / 1000.0,
        cpu_seconds()
    );
}

async fn lag(cli: &Cli, rate: u64, seconds: u64, poll_ms: u64, database_url: &str) {
    let (db, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let db = Arc::new(db);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let origin = Instant::now();
    // Poller: (µs since origin, tx, position) of the checkpoint, every `poll_ms`.
    let samples = Arc::new(Mutex::new(Vec::<(u64, i64, i64)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (db, samples, stop) = (db.clone(), samples.clone(), stop.clone());
        tokio::spawn(async move {
            let stmt = db
                .prepare("SELECT tx_id::text::bigint, global_position FROM projection_checkpoints WHERE name = 'contacts'")
                .await
                .unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(poll_ms.max(1)));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Ok(Some(r)) = db.query_opt(&stmt, &[]).await {
                    samples.lock().await.push((
                        origin.elapsed().as_micros() as u64,
                        r.get(0),
                        r.get(1),
                    ));
                }
            }
        })
    };
    let limit = Arc::new(Semaphore::new(512));
    let results = Arc::new(Mutex::new(Vec::<(u64, i64)>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let total = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        tick.tick().await;
        let permit = limit.clone().acquire_owned().await.unwrap();
        let (http, url, token, results, errors) = (
            http.clone(),
            cli.url.clone(),
            cli.token.clone(),
            results.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            match post(&http, &url, &token, 10_000_000 + n).await {
                Ok(v) => {
                    let at = origin.elapsed().as_micros() as u64;
                    if let Some(p) = v["positions"][0].as_i64() {
                        results.lock().await.push((at, p));
                    }
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    // Let the projection finish, then stop polling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    poller.await.unwrap();

    let results = results.lock().await.clone();
    let positions: Vec<i64> = results.iter().map(|r| r.1).collect();
    let rows = db
        .query(
            "SELECT global_position, tx_id::text::bigint FROM events WHERE global_position = ANY($1)",
            &[&positions],
        )
        .await
        .unwrap();
    let tx_of: std::collections::HashMap<i64, i64> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let samples = samples.lock().await.clone();
    if std::env::var_os("CRM_BENCH_DEBUG").is_some() {
        eprintln!(
            "samples={} first={:?} last={:?} results={} first_key={:?}",
            samples.len(),
            samples.first(),
            samples.last(),
            results.len(),
            results.first().map(|r| (tx_of.get(&r.1), r.1))
        );
    }
    let mut h = Histogram::<u64>::new(3).unwrap();
    let mut unseen = 0;
    for (at, pos) in results {
        let key = (tx_of[&pos], pos);
        // Samples are in time order and checkpoints only move forward.
        let first = samples.partition_point(|s| (s.1, s.2) < key);
        match samples.get(first) {
            Some(s) => h.record(s.0.saturating_sub(at)).unwrap(),
            None => unseen += 1,
        }
    }
    println!(
        "lag target_rate={rate} achieved_rate={achieved:.0} poll_ms={poll_ms} commands={} errors={} unseen={unseen} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} cpu_s={}",
        h.len(),
        errors.load(Ordering::Relaxed),
        ms(&h, 0.5),
        ms(&h, 0.99),
        h.max() as f64 / 1000.0,
        cpu_seconds()
    );
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match &cli.command {
        Command::Load {
            connections,
            seconds,
            warmup,
        } => load(&cli, *connections, *seconds, *warmup).await,
        Command::Lag {
            rate,
            seconds,
            poll_ms,
            database_url,
        } => lag(&cli, *rate, *seconds, *poll_ms, database_url).await,
    }
}
