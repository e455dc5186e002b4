//! The relay: publishes committed events to JetStream in commit order.
//!
//! It reads below the visibility horizon (see `event_store::read_committed`), publishes
//! each event, or a run of them in one message: a commit's events of one stream, or one
//! request's unit across streams (`bus::message_runs`, `bus::message_body`), with `Nats-Msg-Id` naming them (`bus::message_id`), awaits
//! every ack, then checkpoints (at most
//! every 100 ms while busy: a checkpoint that lags only republishes duplicates after a
//! restart). It wakes on LISTEN/NOTIFY, directly on appends made in its own process, and
//! polls as a fallback; under load it reads at most every 2 ms. Running two relays is safe: a session-level
//! advisory lock makes one active and the other a standby; and should both ever publish,
//! JetStream's duplicate window drops the repeats.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::GenericClient;
use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::feed::bus::{self, Bus};
use crate::metrics::METRICS;
use crate::store::event_store::{self, CommitKey, RawEvent, NOTIFY_CHANNEL};

const BATCH: i64 = 1000;
const POLL_EVERY: Duration = Duration::from_millis(100);
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Least time between two reads of the store when the last one was not a full batch:
/// under load, one query per couple of milliseconds rather than one per commit.
const READ_EVERY: Duration = Duration::from_millis(2);
/// Most time between two checkpoint writes while publishing. A checkpoint that lags
/// only makes a restarted relay publish again what JetStream drops as duplicates.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] event_store::StoreError),
    #[error("publish to JetStream: {0}")]
    Publish(String),
}

pub struct Relay {
    pub name: String,
    pub pg: tokio_postgres::Config,
    pub pool: Pool,
    pub bus: Bus,
    /// Woken by appends in this process (besides LISTEN/NOTIFY, which covers the
    /// others).
    pub local_wake: Option<Arc<Notify>>,
}

/// The relay's checkpoint.
pub async fn checkpoint(
    client: &impl GenericClient,
    name: &str,
) -> Result<CommitKey, tokio_postgres::Error> {
    crate::feed::checkpoint::read(client, crate::feed::checkpoint::Owner::Relay, name).await
}

impl Relay {
    /// Runs until `shutdown`; reconnects after errors.
    pub async fn run(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.session(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "relay session ended; retrying in 1s");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        tracing::info!("relay stopped");
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let (client, mut connection) = self.pg.connect(NoTls).await?;
        let wake = Arc::new(Notify::new());
        let wake_tx = wake.clone();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(msg) = messages.next().await {
                match msg {
                    Ok(AsyncMessage::Notification(_)) => wake_tx.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "relay connection lost");
                        break;
                    }
                }
            }
        });
        let _guard = AbortOnDrop(driver);
        client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .await?;

        // Leadership: one active relay per name, the others wait.
        let lock_key = format!("crm-relay:{}", self.name);
        loop {
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&lock_key])
                .await?
                .get(0);
            if got {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!(relay = %self.name, "relay active");

        // Reads and checkpoints go through a pooled connection; the dedicated one above
        // holds the lock and the LISTEN.
        let db = self
            .pool
            .get()
            .await
            .map_err(|e| RelayError::Publish(format!("pool: {e}")))?;
        let mut ck = checkpoint(&db, &self.name).await?;
        let mut written = ck;
        let mut last_write = Instant::now();
        let mut last_lag = Instant::now() - LAG_EVERY;
        let local = self.local_wake.clone().unwrap_or_default();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let read_at = Instant::now();
            let batch = event_store::read_committed_raw(&db, ck, BATCH).await?;
            if !batch.is_empty() {
                self.publish(&batch).await?;
                ck = batch.last().expect("non-empty").commit_key();
                METRICS.relay_published.inc_by(batch.len() as u64);
            }
            let full = batch.len() as i64 >= BATCH;
            if ck != written && last_write.elapsed() >= CHECKPOINT_EVERY {
                crate::feed::checkpoint::write_relay_async(&db, &self.name, ck).await?;
                written = ck;
                last_write = Instant::now();
            }
            if last_lag.elapsed() >= LAG_EVERY {
                METRICS
                    .relay_lag_events
                    .set(event_store::count_after(&db, ck, 1_000_000).await?);
                last_lag = Instant::now();
            }
            if !full {
                // Sleep until woken, or until the pending checkpoint is due.
                let timeout = if ck != written {
                    CHECKPOINT_EVERY.saturating_sub(last_write.elapsed())
                } else {
                    POLL_EVERY
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = wake.notified() => {}
                    _ = local.notified() => {}
                    _ = tokio::time::sleep(timeout) => {}
                }
                // Pace the reads: gather what commits in the next moment too.
                let since = read_at.elapsed();
                if since < READ_EVERY {
                    tokio::time::sleep(READ_EVERY - since).await;
                }
            }
        }
        if ck != written {
            crate::feed::checkpoint::write_relay_async(&db, &self.name, ck).await?;
        }
        Ok(())
    }

    /// Publishes a batch in order, a run of events in one message (`bus::message_runs`:
    /// a commit's events of one stream, or one request's unit) under its first event's
    /// subject, and waits for every ack.
    async fn publish(&self, batch: &[RawEvent]) -> Result<(), RelayError> {
        let runs = bus::message_runs(batch);
        let mut acks = Vec::with_capacity(runs.len());
        let mut rest = batch;
        for n in runs {
            let (events, after) = rest.split_at(n);
            rest = after;
            let first = &events[0];
            let subject = self.bus.settings.subject(
                &first.org_id,
                &first.aggregate_type,
                &first.aggregate_id,
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                bus::message_id(events).as_str(),
            );
            let body = bus::message_body(events).map_err(|e| RelayError::Publish(e.to_string()))?;
            let ack = self
                .bus
                .jetstream
                .publish_with_headers(subject, headers, Bytes::from(body))
                .await
                .map_err(|e| RelayError::Publish(e.to_string()))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| RelayError::Publish(e.to_string()))?;
        }
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
