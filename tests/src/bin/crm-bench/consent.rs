//! The consent phases of `scripts/bench` (issue 12; figures: docs/benchmarks.md).
//!
//! - `messages`: N connections send messages through the send gate (`POST
//!   /v1/contacts/{id}/messages`, e-mail for `service`, whose lawful basis is the
//!   contract: allowed without any consent record) to the run's contacts, as fast as
//!   they go; prints messages/s, latency percentiles and how many the gate queued or
//!   blocked.
//! - `consent-check`: `POST /v1/consent/check` of 10,000 of the run's contacts beside a
//!   plain indexed `SELECT` of the same rows of `consent_state` (the columns the check
//!   reads, by `org_id` and `contact_id = ANY($1)`, through tokio-postgres as the
//!   table's owner), one request at a time each, alternating in 1 s slices; prints both
//!   rates and their ratio.
//!
//! The commit-to-ConsentLog lag is `lag --kind consent` (in `crm-bench.rs`), with
//! [`withdrawal`] as the body and [`contact_ids`] as the contacts.
//!
//! Each prints one line of `key=value` fields ending with `cpu_s`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{cpu_seconds, histogram, ms, Conn, Target};

/// The body of each consent change of the lag phase: a withdrawal, which needs no
/// notice in GDPR mode.
pub(crate) fn withdrawal() -> Value {
    json!({"channel": "email", "purpose": "marketing", "status": "withdrawn", "source": "api"})
}

/// Up to `limit` contacts of the run that have an e-mail address, as (org, contact), in
/// the order of their ids (UUIDv7: creation order), newest first if `newest_first`,
/// after the first `skip`.
/// Read from `consent_state` as its owner: these are contacts the gate knows.
pub(crate) async fn contact_ids(
    db: &tokio_postgres::Client,
    limit: i64,
    skip: i64,
    newest_first: bool,
) -> anyhow::Result<Vec<(Uuid, Uuid)>> {
    let order = if newest_first { "DESC" } else { "ASC" };
    let rows = db
        .query(
            &format!(
                "SELECT org_id, contact_id FROM consent_state WHERE email IS NOT NULL \
                 ORDER BY contact_id {order} LIMIT $1 OFFSET $2"
            ),
            &[&limit, &skip],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn connect(database_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (db, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(db)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[derive(Args)]
pub(crate) struct MessagesArgs {
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
    /// How many of the run's contacts to send to, in turn.
    #[arg(long, default_value_t = 20_000)]
    contacts: i64,
    /// The database `crm serve` writes to (read directly, as its owner).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

pub(crate) async fn messages(args: MessagesArgs) -> anyhow::Result<()> {
    let MessagesArgs {
        target: t,
        connections,
        seconds,
        warmup,
        contacts,
        database_url,
    } = args;
    let db = connect(&database_url).await?;
    let ids: Arc<Vec<Uuid>> = Arc::new(
        contact_ids(&db, contacts, 0, false)
            .await?
            .into_iter()
            .map(|(_, id)| id)
            .collect(),
    );
    drop(db);
    anyhow::ensure!(!ids.is_empty(), "no contacts to send messages to");
    let body = bytes::Bytes::from(serde_json::to_vec(&json!({
        "channel": "email", "purpose": "service", "subject": "Hi", "body": "Hello"
    }))?);
    let counter = Arc::new(AtomicU64::new(0));
    let (errors, queued, blocked) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let last_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(warmup);
    let end = measure_from + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = Conn::new(&t)?;
        let (ids, body, counter) = (ids.clone(), body.clone(), counter.clone());
        let (errors, queued, blocked, last_error) = (
            errors.clone(),
            queued.clone(),
            blocked.clone(),
            last_error.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            while Instant::now() < end {
                let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
                let path = format!("/v1/contacts/{}/messages", ids[n % ids.len()]);
                let t0 = Instant::now();
                let result = conn
                    .send(hyper::Method::POST, &path, Some(body.clone()))
                    .await;
                // Only requests sent and answered inside the measured window count.
                if t0 >= measure_from && Instant::now() <= end {
                    match result {
                        Ok((status, answer)) if status == hyper::StatusCode::CREATED => {
                            local.record(t0.elapsed().as_micros() as u64).unwrap();
                            if contains(&answer, b"\"status\":\"queued\"") {
                                queued.fetch_add(1, Ordering::Relaxed);
                            } else {
                                blocked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok((status, answer)) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            *last_error.lock().await = Some(format!(
                                "status {status}: {}",
                                String::from_utf8_lossy(&answer[..answer.len().min(300)])
                            ));
                        }
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
        eprintln!("crm-bench messages: last error: {e}");
    }
    println!(
        "messages connections={connections} seconds={seconds} contacts={} messages={} errors={} \
         msg_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} queued={} blocked={} cpu_s={}",
        ids.len(),
        h.len(),
        errors.load(Ordering::Relaxed),
        h.len() as f64 / seconds as f64,
        ms(&h, 0.5),
        ms(&h, 0.99),
        h.max() as f64 / 1000.0,
        queued.load(Ordering::Relaxed),
        blocked.load(Ordering::Relaxed),
        cpu_seconds()
    );
    Ok(())
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    target: Target,
    /// Contacts per check (the API's maximum is 10,000).
    #[arg(long, default_value_t = 10_000)]
    ids: i64,
    /// Measured seconds of each of the two (alternating in 1 s slices).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The database `crm serve` writes to (read directly, as its owner).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

pub(crate) async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let CheckArgs {
        target: t,
        ids: want,
        seconds,
        database_url,
    } = args;
    let db = connect(&database_url).await?;
    // The consent_state projection may still be applying the run's last contacts.
    let deadline = Instant::now() + Duration::from_secs(120);
    let picked = loop {
        let picked = contact_ids(&db, want, 0, false).await?;
        if picked.len() as i64 >= want || Instant::now() >= deadline {
            break picked;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    anyhow::ensure!(
        picked.len() as i64 == want,
        "only {} contacts with an e-mail address in consent_state, not {want}",
        picked.len()
    );
    let org_id = picked[0].0;
    anyhow::ensure!(
        picked.iter().all(|(o, _)| *o == org_id),
        "the contacts belong to more than one organisation"
    );
    let ids: Vec<Uuid> = picked.iter().map(|(_, id)| *id).collect();
    let body = bytes::Bytes::from(serde_json::to_vec(&json!({
        "channel": "email", "purpose": "service", "contact_ids": ids
    }))?);
    // The same columns and rows the check reads (infra::read_models::consent_state).
    let select = db
        .prepare(
            "SELECT contact_id, state, email FROM consent_state \
             WHERE org_id = $1 AND contact_id = ANY($2)",
        )
        .await?;
    let mut conn = Conn::new(&t)?;

    // One of each first (connections, plans, caches), and the answer looked at.
    let (status, answer) = conn
        .send(hyper::Method::POST, "/v1/consent/check", Some(body.clone()))
        .await
        .map_err(|e| anyhow::anyhow!("POST /v1/consent/check: {e}"))?;
    anyhow::ensure!(
        status == hyper::StatusCode::OK,
        "POST /v1/consent/check: status {status}: {}",
        String::from_utf8_lossy(&answer[..answer.len().min(500)])
    );
    let v: Value = serde_json::from_slice(&answer)?;
    let results = v["results"].as_array().map_or(&[][..], |r| &r[..]);
    anyhow::ensure!(
        results.len() == ids.len(),
        "the check answered {} of {} contacts",
        results.len(),
        ids.len()
    );
    let allowed = results.iter().filter(|r| r["allowed"] == true).count();
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for r in results {
        let reason = r["reason"].as_str().unwrap_or("?").to_owned();
        match reasons.iter_mut().find(|(n, _)| *n == reason) {
            Some((_, c)) => *c += 1,
            None => reasons.push((reason, 1)),
        }
    }
    let reasons = reasons
        .iter()
        .map(|(n, c)| format!("{n}:{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let rows = db.query(&select, &[&org_id, &ids]).await?;
    anyhow::ensure!(
        rows.len() == ids.len(),
        "the SELECT found {} rows",
        rows.len()
    );

    let (mut http_h, mut sql_h) = (histogram(), histogram());
    let (mut http_time, mut sql_time) = (Duration::ZERO, Duration::ZERO);
    let mut errors = 0u64;
    let slice = Duration::from_secs(1);
    for _ in 0..seconds {
        let t0 = Instant::now();
        while t0.elapsed() < slice {
            let r0 = Instant::now();
            match conn
                .send(hyper::Method::POST, "/v1/consent/check", Some(body.clone()))
                .await
            {
                Ok((s, _)) if s == hyper::StatusCode::OK => {
                    http_h.record(r0.elapsed().as_micros() as u64)?;
                }
                _ => errors += 1,
            }
        }
        http_time += t0.elapsed();
        let t0 = Instant::now();
        while t0.elapsed() < slice {
            let r0 = Instant::now();
            let rows = db.query(&select, &[&org_id, &ids]).await?;
            anyhow::ensure!(
                rows.len() == ids.len(),
                "the SELECT found {} rows",
                rows.len()
            );
            sql_h.record(r0.elapsed().as_micros() as u64)?;
        }
        sql_time += t0.elapsed();
    }
    let http_rate = http_h.len() as f64 / http_time.as_secs_f64();
    let sql_rate = sql_h.len() as f64 / sql_time.as_secs_f64();
    println!(
        "consent_check ids={} seconds={seconds} checks={} errors={errors} check_per_s={http_rate:.2} \
         check_ids_per_s={:.0} check_p50_ms={:.2} check_p99_ms={:.2} selects={} \
         select_per_s={sql_rate:.2} select_ids_per_s={:.0} select_p50_ms={:.2} \
         select_p99_ms={:.2} ratio={:.2} allowed={allowed} reasons={reasons} response_kb={} \
         cpu_s={}",
        ids.len(),
        http_h.len(),
        http_rate * ids.len() as f64,
        ms(&http_h, 0.5),
        ms(&http_h, 0.99),
        sql_h.len(),
        sql_rate * ids.len() as f64,
        ms(&sql_h, 0.5),
        ms(&sql_h, 0.99),
        http_rate / sql_rate,
        answer.len() / 1024,
        cpu_seconds()
    );
    Ok(())
}
