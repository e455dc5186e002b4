//! `scripts/bench --live` (issue 15): `--clients` SSE clients on `GET
//! /v1/events/stream`, the RSS of `crm serve` before and after they connect (memory per
//! connection), then contacts created at a fixed rate (open loop) and, for every event
//! every client receives, the time from the command's response (the commit
//! acknowledged) to its arrival at that client.
//!
//! Clients are plain TCP connections that read the stream and look only at `id:` lines
//! (the event's position, which the command's answer also names), so the load generator
//! spends its CPU on the socket, not on JSON.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{cpu_seconds, histogram, ms, Target};

#[derive(Args)]
pub(crate) struct LiveArgs {
    #[command(flatten)]
    target: Target,
    /// SSE clients to connect.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Contacts created per second while measuring.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The pid of `crm serve` (its RSS is read from /proc).
    #[arg(long)]
    pid: u32,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// When each position's command was answered (filled by the writers).
type Sent = Arc<StdMutex<HashMap<i64, Instant>>>;

pub(crate) async fn live(args: LiveArgs) -> anyhow::Result<()> {
    let base = args.target.url.trim_end_matches('/').to_owned();
    let addr = base.trim_start_matches("http://").to_owned();
    let token = args.target.token.clone();
    // Settle, then the RSS before any client.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kib(args.pid);
    let sent: Sent = Arc::default();
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let latencies = Arc::new(StdMutex::new(histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..args.clients {
        let (addr, token, sent, measuring, latencies, received, connected) = (
            addr.clone(),
            token.clone(),
            sent.clone(),
            measuring.clone(),
            latencies.clone(),
            received.clone(),
            connected.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await?;
            s.write_all(
                format!(
                    "GET /v1/events/stream?types=contact.created HTTP/1.1\r\nHost: {addr}\r\n\
                     Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
            let mut buf = vec![0u8; 16 * 1024];
            let mut carry = String::new();
            let mut local = histogram();
            let mut first = true;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                carry.push_str(&String::from_utf8_lossy(&buf[..n]));
                if first {
                    if !carry.starts_with("HTTP/1.1 200") {
                        anyhow::bail!("stream refused: {}", carry.lines().next().unwrap_or(""));
                    }
                    first = false;
                    connected.fetch_add(1, Ordering::Relaxed);
                }
                // Whole lines only; the rest waits for the next read.
                let cut = carry.rfind('\n').map_or(0, |i| i + 1);
                for line in carry[..cut].lines() {
                    if let Some(id) = line.strip_prefix("id: ") {
                        let Ok(pos) = id.trim().parse::<i64>() else {
                            continue;
                        };
                        received.fetch_add(1, Ordering::Relaxed);
                        if !measuring.load(Ordering::Relaxed) {
                            continue;
                        }
                        let at = sent.lock().unwrap().get(&pos).copied();
                        if let Some(at) = at {
                            // The event may arrive before the answer does: 0.
                            let us = now.saturating_duration_since(at).as_micros() as u64;
                            let _ = local.record(us.max(1));
                        }
                    }
                }
                carry.drain(..cut);
                if local.len() >= 1_000 {
                    latencies.lock().unwrap().add(&local).ok();
                    local.reset();
                }
            }
            latencies.lock().unwrap().add(&local).ok();
            anyhow::Ok(())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected.load(Ordering::Relaxed) < args.clients as u64 {
        if Instant::now() > deadline {
            anyhow::bail!(
                "only {} of {} clients connected",
                connected.load(Ordering::Relaxed),
                args.clients
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(args.pid);

    // The writers: contacts at a fixed rate (open loop), each answer's position noted.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let errors = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let total = args.rate * (args.warmup + args.seconds);
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = tokio::time::Instant::now();
    let cpu_start = cpu_seconds();
    let mut writers = Vec::new();
    for i in 0..total {
        let at = start + every * i as u32;
        tokio::time::sleep_until(at).await;
        if i == args.rate * args.warmup {
            measuring.store(true, Ordering::Relaxed);
        }
        let (http, url, token, sent, errors, created) = (
            http.clone(),
            format!("{base}/v1/contacts"),
            token.clone(),
            sent.clone(),
            errors.clone(),
            created.clone(),
        );
        writers.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"given_name": format!("Live {i}")}))
                .send()
                .await;
            let answered = Instant::now();
            match r {
                Ok(r) if r.status() == 201 => {
                    let v: serde_json::Value = r.json().await.unwrap_or_default();
                    if let Some(p) = v["positions"][0].as_i64() {
                        sent.lock().unwrap().insert(p, answered);
                        created.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in writers {
        let _ = w.await;
    }
    let write_secs = start.elapsed().as_secs_f64();
    // Let the last events reach every client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let h = latencies.lock().unwrap().clone();
    let expected = created.load(Ordering::Relaxed) * args.clients as u64;
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 / args.clients as f64;
    let _ = cpu_start;
    println!(
        "live clients={} rate={} seconds={} created={} write_s={:.1} errors={} received={} expected={} samples={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} rss_before_kib={} rss_after_kib={} kib_per_connection={:.1} cpu_s={}",
        args.clients,
        args.rate,
        args.seconds,
        created.load(Ordering::Relaxed),
        write_secs,
        errors.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        expected,
        h.len(),
        ms(&h, 0.5),
        ms(&h, 0.99),
        h.max() as f64 / 1000.0,
        rss_before,
        rss_after,
        per_conn,
        cpu_seconds(),
    );
    for r in readers {
        r.abort();
    }
    Ok(())
}
