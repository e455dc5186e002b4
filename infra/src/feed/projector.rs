//! The projector runtime: durable JetStream pull consumers feeding read models.
//!
//! A worker feeds one or more projections from one durable consumer (one
//! `filter_subject`: nats-server 2.9 ignores `filter_subjects`) with explicit acks. A
//! batch of messages is applied in one PostgreSQL transaction together with each
//! projection's checkpoint, a commit key (tx_id, global_position) in the relay's
//! publishing order. For each projection, an event is applied only if it is the next one
//! after its checkpoint: at or below it, it is a redelivery; if events between the
//! checkpoint and it are missing from the batch (another worker holds them, or a killed
//! worker's or a failed batch's messages wait for their redelivery), they are read from
//! the store, which is the source of truth, and applied first, in the same transaction:
//! recovery never waits for JetStream's ack wait. A worker also catches up from the
//! store when its session starts (a restarted process, PostgreSQL back after an
//! outage), before it takes messages. With each projection's advisory lock held for the
//! transaction, several processes of one projection share the work without applying
//! anything twice or out of order.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Pool, Transaction};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::crypto::Crypto;
use crate::feed::bus::{self, Bus};
use crate::feed::checkpoint::{self, Owner};
use crate::metrics::METRICS;
use crate::store::decode::{decode, DecodedEvent};
use crate::store::event_store::{self, CommitKey, RawEvent, StoreError};

const BATCH: usize = 500;
/// How long a small batch waits for more messages before it is applied.
const LINGER: Duration = Duration::from_millis(5);
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// How long a failed session waits before it tries again (PostgreSQL or NATS away):
/// short, so that a worker is current within about this long of their return.
const SESSION_RETRY: Duration = Duration::from_millis(250);
/// Events read from the store at a time while catching up.
const CATCH_UP_BATCH: i64 = 1000;
/// How long a delivered message may stay unacknowledged before JetStream hands it to
/// another worker: the time a killed worker's batch takes to come back.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("read model out of order: {0}")]
    OutOfOrder(String),
    #[error("JetStream: {0}")]
    Bus(String),
}

/// A read model fed by events.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Name of the projection: consumer name, checkpoint name, `crm project NAME`.
    fn name(&self) -> &'static str;
    /// The read-model table it owns (rebuilds shadow and swap it).
    fn table(&self) -> &'static str;
    /// Applies events, in order, to `table` inside `tx` (a few statements per batch,
    /// not per event).
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        table: &str,
        events: &[Arc<DecodedEvent>],
    ) -> Result<(), ProjectionError>;
    /// An in-memory fold for rebuilds.
    fn rebuilder(&self) -> Box<dyn Rebuilder>;
    /// Whether it reads personal data (else events are handed over undecrypted, and
    /// their personal members stay ciphertext).
    fn needs_personal_data(&self) -> bool {
        true
    }
    /// Whether it reads event payloads at all (else `DecodedEvent::payload` is `null`
    /// and the payload is never parsed).
    fn reads_payload(&self) -> bool {
        true
    }
    /// Whether events of streams of `aggregate_type` can change its read model. Those
    /// that cannot are never parsed, decrypted or handed to [`Self::apply`]; its
    /// checkpoint moves past them all the same.
    fn reads_type(&self, _aggregate_type: &str) -> bool {
        true
    }
}

/// Parses what `projection` reads of an event as it arrives from JetStream (payload
/// and metadata still JSON text), and decrypts it if the projection reads personal data.
async fn decode_for(
    event: RawEvent,
    projection: &dyn Projection,
    crypto: &Crypto,
    client: &impl GenericClient,
) -> Result<DecodedEvent, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(event.global_position, e.to_string());
    let payload = if projection.reads_payload() {
        serde_json::from_str(event.payload.get()).map_err(corrupt)?
    } else {
        serde_json::Value::Null
    };
    if projection.needs_personal_data() {
        let metadata = serde_json::from_str(event.metadata.get()).map_err(corrupt)?;
        decode(crypto, client, event.with_body(payload, metadata)).await
    } else {
        // Personal members of the metadata stay ciphertext.
        let metadata = serde_json::from_str(event.metadata.get()).map_err(corrupt)?;
        Ok(DecodedEvent {
            stored: event.with_body(serde_json::Value::Null, serde_json::Value::Null),
            payload,
            metadata,
        })
    }
}

/// Folds events in memory during a rebuild and writes them out in bulk.
#[async_trait]
pub trait Rebuilder: Send {
    fn fold(&mut self, event: &DecodedEvent) -> Result<(), ProjectionError>;
    /// Whether enough has piled up to flush before the end.
    fn wants_flush(&self) -> bool;
    async fn flush(
        &mut self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> Result<u64, ProjectionError>;
}

/// The checkpoint of a projection (zero when it has none yet).
pub async fn checkpoint(
    client: &impl GenericClient,
    name: &str,
) -> Result<CommitKey, tokio_postgres::Error> {
    checkpoint::read(client, Owner::Projection, name).await
}

/// Sets a projection's checkpoint (inside the caller's transaction).
pub async fn set_checkpoint(
    client: &impl GenericClient,
    name: &str,
    key: CommitKey,
) -> Result<(), tokio_postgres::Error> {
    checkpoint::write(client, Owner::Projection, name, key).await
}

/// Whether projection `name` has applied the event at global `position`, and if not,
/// how many events it is behind.
pub async fn progress(
    client: &impl GenericClient,
    name: &str,
    position: i64,
) -> Result<Option<(bool, i64)>, StoreError> {
    let Some(target) = event_store::commit_key_of(client, position).await? else {
        return Ok(None);
    };
    let ck = checkpoint(client, name).await?;
    if ck >= target {
        return Ok(Some((true, 0)));
    }
    let behind = event_store::count_after(client, ck, 1_000_000).await?;
    Ok(Some((false, behind)))
}

/// A worker of one or more projections. Several are fed by one durable consumer (named
/// after them all, `activity+contacts`) and applied in one transaction per batch: one
/// delivery and one ack per message (an event, or a run of one commit's events: `bus::message_runs`), and
/// one commit per batch, for all of them.
pub struct ProjectorWorker {
    pub pool: Pool,
    pub crypto: Arc<Crypto>,
    pub bus: Bus,
    /// In name order (the order their locks are taken in).
    projections: Vec<Arc<dyn Projection>>,
    name: String,
    /// The statement that takes the projections' locks (`checkpoint::lock_projections_sql`).
    lock_sql: String,
}

/// One projection's progress through a batch.
struct Progress {
    ck: CommitKey,
    start: CommitKey,
    expected: std::iter::Peekable<std::vec::IntoIter<CommitKey>>,
    blocked: bool,
    ready: Vec<Arc<DecodedEvent>>,
}

/// What becomes of a message's event: applied or recognised as applied already (its
/// message may be acknowledged), or deferred (its message comes back).
enum Verdict {
    Done,
    Deferred,
}

impl ProjectorWorker {
    /// A worker of `projections` (at least one).
    pub fn new(
        pool: Pool,
        crypto: Arc<Crypto>,
        bus: Bus,
        mut projections: Vec<Arc<dyn Projection>>,
    ) -> Self {
        projections.sort_by_key(|p| p.name());
        projections.dedup_by_key(|p| p.name());
        assert!(!projections.is_empty(), "a projector needs a projection");
        let name = projections
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join("+");
        let lock_sql = checkpoint::lock_projections_sql(projections.len());
        Self {
            pool,
            crypto,
            bus,
            projections,
            name,
            lock_sql,
        }
    }

    /// The durable consumer's name: the projections' names joined by `+`.
    pub fn consumer_name(&self) -> &str {
        &self.name
    }

    /// Runs until `shutdown`; reconnects after errors.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = self.name.as_str();
        while !shutdown.is_cancelled() {
            match self.session(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(projection = name, error = %e, "projector session ended; retrying in 250 ms");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(SESSION_RETRY) => {}
                    }
                }
            }
        }
        tracing::info!(projection = name, "projector stopped");
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), ProjectionError> {
        let name = self.name.as_str();
        let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = self
            .bus
            .stream
            .get_or_create_consumer(
                name,
                pull::Config {
                    durable_name: Some(name.to_owned()),
                    filter_subject: self.bus.settings.all_subjects(),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| ProjectionError::Bus(e.to_string()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ProjectionError::Bus(e.to_string()))?;
        // What committed while this worker was away (a restart, an outage) is read from
        // the store now, not when its messages' ack wait runs out.
        self.catch_up(shutdown).await?;
        let mut batches = messages.ready_chunks(BATCH);
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                b = batches.next() => b,
            };
            let Some(mut batch) = batch else {
                return Err(ProjectionError::Bus("message stream ended".into()));
            };
            // A small batch waits a moment for the messages right behind it: one
            // transaction for a few events rather than one each (each costs a handful
            // of statements and a WAL flush), for at most LINGER of extra lag.
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < BATCH / 4 {
                match tokio::time::timeout_at(deadline, batches.next()).await {
                    Ok(Some(more)) => batch.extend(more),
                    Ok(None) => return Err(ProjectionError::Bus("message stream ended".into())),
                    Err(_) => break,
                }
            }
            let mut msgs = Vec::with_capacity(batch.len());
            for m in batch {
                msgs.push(m.map_err(|e| ProjectionError::Bus(e.to_string()))?);
            }
            self.handle_batch(msgs).await?;
        }
    }

    async fn handle_batch(
        &self,
        msgs: Vec<async_nats::jetstream::Message>,
    ) -> Result<(), ProjectionError> {
        // A message carries one event, or a run of one commit's events
        // (`bus::events_of`): each event keeps the index of its message.
        let mut parsed: Vec<(RawEvent, usize)> = Vec::with_capacity(msgs.len());
        let mut kept = Vec::with_capacity(msgs.len());
        for m in msgs {
            match bus::events_of(&m.payload) {
                Ok(events) => {
                    parsed.extend(events.into_iter().map(|e| (e, kept.len())));
                    kept.push(m);
                }
                Err(e) => {
                    tracing::error!(subject = %m.subject, error = %e, "not an event; terminated");
                    let _ = m.ack_with(AckKind::Term).await;
                }
            }
        }
        let msgs = kept;
        parsed.sort_by_key(|(e, _)| e.commit_key());
        let (events, of_message): (Vec<RawEvent>, Vec<usize>) = parsed.into_iter().unzip();
        let (n, started) = (events.len(), std::time::Instant::now());
        let result = self.apply_batch(events).await;
        tracing::debug!(
            projection = self.name.as_str(),
            events = n,
            elapsed_us = started.elapsed().as_micros() as u64,
            ok = result.is_ok(),
            "batch applied"
        );
        match result {
            Ok(verdicts) => {
                // A message comes back if any of its events could not be applied yet;
                // those that were then read as redeliveries.
                let mut deferred = vec![false; msgs.len()];
                for (i, v) in of_message.into_iter().zip(verdicts) {
                    deferred[i] |= matches!(v, Verdict::Deferred);
                }
                for (m, deferred) in msgs.iter().zip(deferred) {
                    let r = if deferred {
                        m.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await
                    } else {
                        m.ack().await
                    };
                    if let Err(e) = r {
                        // Not acked: it will be redelivered and recognised as applied.
                        tracing::warn!(error = %e, "ack failed");
                    }
                }
                Ok(())
            }
            Err(e) => {
                for m in &msgs {
                    let _ = m.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
                }
                Err(e)
            }
        }
    }

    /// Applies what the store holds after the lowest checkpoint, up to its horizon,
    /// in batches, until nothing is left.
    async fn catch_up(&self, shutdown: &CancellationToken) -> Result<(), ProjectionError> {
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let from = {
                let client = self.pool.get().await?;
                let mut lowest: Option<CommitKey> = None;
                for p in &self.projections {
                    let ck = checkpoint(&client, p.name()).await?;
                    lowest = Some(lowest.map_or(ck, |l| l.min(ck)));
                }
                let Some(from) = lowest else { return Ok(()) };
                let batch = event_store::read_committed_raw(&client, from, CATCH_UP_BATCH).await?;
                if batch.is_empty() {
                    return Ok(());
                }
                batch
            };
            let n = from.len();
            self.apply_batch(from).await?;
            METRICS.projector_caught_up.inc_by(n as u64);
        }
    }

    async fn apply_batch(&self, batch: Vec<RawEvent>) -> Result<Vec<Verdict>, ProjectionError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let upto = batch.last().map(RawEvent::commit_key).unwrap_or_default();
        let cap = (batch.len() as i64) * 4 + 16;
        let messages = batch.len();
        let tx_ref = &tx;
        // One round trip before the events are applied: the projections' locks, then
        // (a statement of its own, so its snapshot sees what a lock's holder committed)
        // their checkpoints and the commit keys that must come next for each, in order
        // (a message is applied only if it is the next of these), and the data keys of
        // the events some projection will decrypt (those not cached already): the
        // statements are prepared first and then sent together, pipelined on the
        // transaction's connection and executed in this order.
        let names: Vec<&str> = self.projections.iter().map(|p| p.name()).collect();
        let lock = tx.prepare_cached(&self.lock_sql).await?;
        let progress_stmt = tx.prepare_cached(checkpoint::PROGRESS_SQL).await?;
        let subjects: Vec<(Uuid, &str)> = batch
            .iter()
            .filter(|e| {
                self.projections
                    .iter()
                    .any(|p| p.needs_personal_data() && p.reads_type(&e.aggregate_type))
            })
            .map(|e| (e.org_id, e.aggregate_id.as_str()))
            .collect();
        let lock_params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = names
            .iter()
            .map(|n| n as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let (_, rows, ()) = futures::try_join!(
            async {
                tx_ref
                    .execute(&lock, &lock_params)
                    .await
                    .map_err(ProjectionError::from)
            },
            async {
                tx_ref
                    .query(&progress_stmt, &[&names, &upto.tx_id, &upto.position, &cap])
                    .await
                    .map_err(ProjectionError::from)
            },
            async {
                self.crypto
                    .prefetch_keys(tx_ref, &subjects)
                    .await
                    .map_err(|e| ProjectionError::from(StoreError::from(e)))
            },
        )?;
        // The keys after each distinct checkpoint (rows with index 0, first), then each
        // projection's checkpoint.
        let mut after: Vec<(CommitKey, Vec<CommitKey>)> = Vec::with_capacity(1);
        let mut read: Vec<(CommitKey, Vec<CommitKey>)> = Vec::with_capacity(names.len());
        for row in rows {
            let ck = CommitKey {
                tx_id: row.get(1),
                position: row.get(2),
            };
            match row.get::<_, i32>(0) {
                0 => {
                    let key = CommitKey {
                        tx_id: row.get(3),
                        position: row.get(4),
                    };
                    match after.last_mut() {
                        Some((at, keys)) if *at == ck => keys.push(key),
                        _ => after.push((ck, vec![key])),
                    }
                }
                i if i as usize == read.len() + 1 => {
                    let keys = after
                        .iter()
                        .find(|(at, _)| *at == ck)
                        .map(|(_, keys)| keys.clone())
                        .unwrap_or_default();
                    read.push((ck, keys));
                }
                i => {
                    return Err(ProjectionError::OutOfOrder(format!(
                        "checkpoint row {i} after {} of {}",
                        read.len(),
                        names.len()
                    )))
                }
            }
        }
        if read.len() != names.len() {
            return Err(ProjectionError::OutOfOrder(format!(
                "checkpoints read for {} of {} projections",
                read.len(),
                names.len()
            )));
        }
        let mut progress: Vec<Progress> = read
            .into_iter()
            .map(|(ck, expected)| Progress {
                ck,
                start: ck,
                expected: expected.into_iter().peekable(),
                blocked: false,
                ready: Vec::with_capacity(messages),
            })
            .collect();
        // Events some projection needs before the batch's own but that are not in it
        // (with another worker, or in a killed worker's or failed batch's messages):
        // read from the store and applied in order, in this transaction.
        let batch = fill_gaps(&tx, batch, &progress, cap).await?;
        let mut verdicts = Vec::with_capacity(batch.len());
        let mut takes = vec![false; self.projections.len()];
        for (event, from_message) in batch {
            let key = event.commit_key();
            let mut deferred = false;
            for (take, st) in takes.iter_mut().zip(progress.iter_mut()) {
                *take = false;
                if key <= st.ck {
                    continue; // applied already: a redelivery
                }
                if st.blocked || st.expected.peek() != Some(&key) {
                    // An earlier event is still with another worker (or not yet here).
                    st.blocked = true;
                    deferred = true;
                    continue;
                }
                st.expected.next();
                st.ck = key;
                *take = true;
            }
            // Projections that read the event the same way (payload or not, decrypted or
            // not) share one decoding: parsed, and decrypted, once per way.
            // Those that read the payload first (pass one): one that reads none may
            // then take their decoding without it (pass two).
            // Shared, not copied: each projection holds the same decoding.
            let mut decoded: Vec<((bool, bool), Arc<DecodedEvent>)> = Vec::with_capacity(2);
            for payload_pass in [true, false] {
                let takers = takes.iter().zip(progress.iter_mut()).zip(&self.projections);
                for ((take, st), p) in takers {
                    if !*take
                        || p.reads_payload() != payload_pass
                        || !p.reads_type(&event.aggregate_type)
                    {
                        continue; // another pass's, or applied by moving the checkpoint
                    }
                    let way = (p.reads_payload(), p.needs_personal_data());
                    let found = decoded
                        .iter()
                        .find(|(w, _)| *w == way)
                        .or_else(|| decoded.iter().find(|(w, _)| !way.0 && w.1 == way.1));
                    let d = match found {
                        Some((w, d)) if *w == way => d.clone(),
                        Some((_, d)) => {
                            let d = Arc::new(DecodedEvent {
                                stored: d.stored.clone(),
                                payload: serde_json::Value::Null,
                                metadata: d.metadata.clone(),
                            });
                            decoded.push((way, d.clone()));
                            d
                        }
                        None => {
                            let d = Arc::new(
                                decode_for(event.clone(), p.as_ref(), &self.crypto, &tx).await?,
                            );
                            decoded.push((way, d.clone()));
                            d
                        }
                    };
                    st.ready.push(d);
                }
            }
            if !from_message {
                continue; // read from the store: no message to answer
            }
            // A message some projection could not apply yet comes back; those that did
            // apply it will then see a redelivery.
            verdicts.push(if deferred {
                Verdict::Deferred
            } else {
                Verdict::Done
            });
        }
        // The projections write different tables: their statements are pipelined too,
        // and the checkpoints that moved are set in one statement behind them.
        let moved: Vec<(&str, CommitKey)> = progress
            .iter()
            .zip(&self.projections)
            .filter(|(st, _)| st.ck != st.start)
            .map(|(st, p)| (p.name(), st.ck))
            .collect();
        let applies = futures::future::try_join_all(
            progress
                .iter()
                .zip(&self.projections)
                .filter(|(st, _)| !st.ready.is_empty())
                .map(|(st, p)| async move {
                    p.apply(tx_ref, p.table(), &st.ready).await?;
                    Ok::<_, ProjectionError>(())
                }),
        );
        futures::try_join!(applies, async {
            checkpoint::write_projections(tx_ref, &moved)
                .await
                .map_err(ProjectionError::from)
        })?;
        tx.commit().await?;
        debug_assert_eq!(verdicts.len(), messages);
        for (st, p) in progress.iter().zip(&self.projections) {
            METRICS
                .projector_applied
                .with_label_values(&[p.name()])
                .inc_by(st.ready.len() as u64);
        }
        Ok(verdicts)
    }
}

/// The batch in commit order with what the projections need before its events but it
/// lacks, read from the store; each event marked whether it came in a message.
async fn fill_gaps(
    tx: &Transaction<'_>,
    batch: Vec<RawEvent>,
    progress: &[Progress],
    cap: i64,
) -> Result<Vec<(RawEvent, bool)>, ProjectionError> {
    let have: std::collections::BTreeSet<CommitKey> =
        batch.iter().map(RawEvent::commit_key).collect();
    let missing: std::collections::BTreeSet<CommitKey> = progress
        .iter()
        .flat_map(|st| st.expected.clone())
        .filter(|k| !have.contains(k))
        .collect();
    let mut out: Vec<(RawEvent, bool)> = batch.into_iter().map(|e| (e, true)).collect();
    if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
        // Everything from just before the first missing event up to the last one, in
        // commit order (the batch's own events among them are dropped here).
        let before = progress
            .iter()
            .map(|st| st.ck)
            .filter(|ck| ck < first)
            .max()
            .unwrap_or_default();
        // At most `cap` events lie between a checkpoint and the batch's last event
        // (each projection's expected keys were read with the same cap).
        let read = event_store::read_committed_raw(tx, before, cap).await?;
        out.extend(
            read.into_iter()
                .filter(|e| e.commit_key() <= *last && missing.contains(&e.commit_key()))
                .map(|e| (e, false)),
        );
        out.sort_by_key(|(e, _)| e.commit_key());
        METRICS.projector_gap_filled.inc_by(missing.len() as u64);
    }
    Ok(out)
}
