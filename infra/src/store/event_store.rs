//! The event store on PostgreSQL: append with optimistic concurrency, read by stream,
//! read in commit order.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::store::hash_chain::{event_hash, HashedFields};

/// Channel the store notifies on after appends; only a wake-up, never the data.
///
/// The NOTIFY is not sent inside the appending transaction: PostgreSQL serializes the
/// commits of notifying transactions on one lock held across the commit's WAL flush,
/// which would defeat group commit. [`Notifier`] sends it right after, coalescing
/// bursts into one notification.
pub const NOTIFY_CHANNEL: &str = "crm_events";

/// How long the notifier waits to gather appends into one NOTIFY. Under load this
/// turns one NOTIFY (a statement and a commit) per command into one per few
/// milliseconds. A relay in the same process does not wait for it: it is woken at once
/// through [`Notifier::local`].
const NOTIFY_COALESCE: std::time::Duration = std::time::Duration::from_millis(5);

/// Sends `NOTIFY crm_events` after appends, at most one pending per process, and wakes
/// an in-process relay directly; the task ends when the last handle is dropped.
#[derive(Clone)]
pub struct Notifier {
    wake: tokio::sync::mpsc::Sender<()>,
    local: std::sync::Arc<tokio::sync::Notify>,
}

impl Notifier {
    /// Starts the notifying task on `pool`.
    pub fn spawn(pool: deadpool_postgres::Pool) -> Self {
        let (wake, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Appends that land in the next moment share this notification.
                tokio::time::sleep(NOTIFY_COALESCE).await;
                let _ = rx.try_recv();
                match pool.get().await {
                    Ok(c) => {
                        if let Err(e) = c.batch_execute(&format!("NOTIFY {NOTIFY_CHANNEL}")).await {
                            tracing::debug!(error = %e, "notify failed; the relay's poll covers it");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "notify skipped"),
                }
            }
        });
        Self {
            wake,
            local: Default::default(),
        }
    }

    /// Asks for a notification (coalesced with any pending one) and wakes the local
    /// listener at once.
    pub fn poke(&self) {
        self.local.notify_one();
        let _ = self.wake.try_send(());
    }

    /// Woken on every append in this process (for a relay running in-process).
    pub fn local(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.local.clone()
    }
}

/// An event as stored: personal members are ciphertext. This is also the body of the
/// JetStream message the relay publishes. `P` is how payload and metadata are held:
/// parsed JSON values, or (for [`RawEvent`]) the JSON text, passed through unparsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent<P = Value> {
    pub global_position: i64,
    pub tx_id: i64,
    pub event_id: Uuid,
    pub org_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: P,
    pub metadata: P,
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: Option<String>,
    pub hash: String,
}

/// An event with payload and metadata as JSON text: what the relay publishes straight
/// from PostgreSQL, and what projectors receive before they know they will apply it.
pub type RawEvent = StoredEvent<Box<serde_json::value::RawValue>>;

impl<P> StoredEvent<P> {
    /// Position in commit order: the relay's and the projectors' checkpoint key.
    pub fn commit_key(&self) -> CommitKey {
        CommitKey {
            tx_id: self.tx_id,
            position: self.global_position,
        }
    }

    /// The same event with another payload and metadata.
    pub fn with_body<Q>(self, payload: Q, metadata: Q) -> StoredEvent<Q> {
        StoredEvent {
            global_position: self.global_position,
            tx_id: self.tx_id,
            event_id: self.event_id,
            org_id: self.org_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            event_type: self.event_type,
            event_version: self.event_version,
            payload,
            metadata,
            recorded_at: self.recorded_at,
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

/// A point in commit order: (transaction id, global position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct CommitKey {
    pub tx_id: i64,
    pub position: i64,
}

pub(crate) const COLUMNS: &str = "global_position, tx_id::text::bigint, event_id, org_id, \
    aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
    recorded_at, prev_hash, hash";

pub(crate) fn from_row(row: &Row) -> StoredEvent {
    with_row_envelope(row, row.get(9), row.get(10))
}

/// The event of a row selected with [`COLUMNS`], with the given payload and metadata.
fn with_row_envelope<P>(row: &Row, payload: P, metadata: P) -> StoredEvent<P> {
    StoredEvent {
        global_position: row.get(0),
        tx_id: row.get(1),
        event_id: row.get(2),
        org_id: row.get(3),
        aggregate_type: row.get(4),
        aggregate_id: row.get(5),
        sequence: row.get(6),
        event_type: row.get(7),
        event_version: row.get(8),
        payload,
        metadata,
        recorded_at: row.get(11),
        prev_hash: row.get::<_, Option<Vec<u8>>>(12).map(hex::encode),
        hash: hex::encode(row.get::<_, Vec<u8>>(13)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("stream version conflict: another command changed this stream first")]
    Conflict,
    #[error("the subject already has a data key")]
    KeyExists,
    #[error("stored event {0} could not be decoded: {1}")]
    Corrupt(i64, String),
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
    #[error("{0}")]
    Unavailable(&'static str),
}

/// Identifies one stream.
#[derive(Debug, Clone)]
pub struct StreamId<'a> {
    pub org_id: Uuid,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
}

/// The version and last hash of a stream, as loaded before a command.
#[derive(Debug, Clone, Default)]
pub struct StreamHead {
    pub version: i64,
    pub last_hash: Option<Vec<u8>>,
}

/// An event ready to append: payload and metadata already encrypted.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
}

impl PendingEvent {
    /// Its link in the stream's hash chain once stored as `event_id` at `sequence`.
    pub(crate) fn hash(
        &self,
        stream: &StreamId<'_>,
        event_id: &Uuid,
        sequence: i64,
        prev: Option<&[u8]>,
    ) -> [u8; 32] {
        event_hash(
            prev,
            &HashedFields {
                event_id,
                org_id: &stream.org_id,
                aggregate_type: stream.aggregate_type,
                aggregate_id: stream.aggregate_id,
                sequence,
                event_type: &self.event_type,
                event_version: &self.event_version,
                payload: &self.payload,
                metadata: &self.metadata,
            },
        )
    }
}

/// What an append wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Appended {
    pub event_id: Uuid,
    pub sequence: i64,
    pub global_position: i64,
    /// The event's hash-chain hash (hex), as stored.
    pub hash: String,
    /// When the store recorded it (the row's `recorded_at`).
    pub recorded_at: DateTime<Utc>,
}

/// Appends events to one stream inside the caller's transaction (the caller commits,
/// mapping errors with [`conflict_or_db`]). Fails with `Conflict` when the stream moved
/// past `head.version` meanwhile (unique (type, id, sequence)); takes no lock wider
/// than that one stream.
pub async fn append(
    tx: &deadpool_postgres::Transaction<'_>,
    stream: &StreamId<'_>,
    head: &StreamHead,
    events: Vec<PendingEvent>,
) -> Result<Vec<Appended>, StoreError> {
    let insert = tx
        .prepare_cached(
            "INSERT INTO events (event_id, org_id, aggregate_type, aggregate_id, sequence, \
             event_type, event_version, payload, metadata, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             RETURNING global_position, recorded_at",
        )
        .await?;
    let mut prev = head.last_hash.clone();
    let mut out = Vec::with_capacity(events.len());
    for (i, e) in events.into_iter().enumerate() {
        let event_id = Uuid::now_v7();
        let sequence = head.version + 1 + i as i64;
        let hash = e.hash(stream, &event_id, sequence, prev.as_deref());
        let row = tx
            .query_one(
                &insert,
                &[
                    &event_id,
                    &stream.org_id,
                    &stream.aggregate_type,
                    &stream.aggregate_id,
                    &sequence,
                    &e.event_type,
                    &e.event_version,
                    &e.payload,
                    &e.metadata,
                    &prev,
                    &hash.as_slice(),
                ],
            )
            .await
            .map_err(conflict_or_db)?;
        out.push(Appended {
            event_id,
            sequence,
            global_position: row.get(0),
            hash: hex::encode(hash),
            recorded_at: row.get(1),
        });
        prev = Some(hash.to_vec());
    }
    Ok(out)
}

/// A unique violation on a stream's sequence is a concurrency conflict.
pub fn conflict_or_db(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        StoreError::Conflict
    } else {
        StoreError::Db(e)
    }
}

/// The events of one stream after `after_sequence`, optionally only those recorded up to
/// `as_of`. Scoped by organisation: another organisation's stream reads as empty.
pub async fn read_stream(
    client: &impl GenericClient,
    stream: &StreamId<'_>,
    after_sequence: i64,
    as_of: Option<DateTime<Utc>>,
) -> Result<Vec<StoredEvent>, StoreError> {
    read_stream_part(client, stream, after_sequence, as_of, None).await
}

/// At most `limit` events of one stream after `after_sequence`, in sequence order: a
/// page of its history. Scoped by organisation like [`read_stream`].
pub async fn read_stream_page(
    client: &impl GenericClient,
    stream: &StreamId<'_>,
    after_sequence: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    read_stream_part(client, stream, after_sequence, None, Some(limit)).await
}

/// One statement for both: `LIMIT NULL` is no limit.
async fn read_stream_part(
    client: &impl GenericClient,
    stream: &StreamId<'_>,
    after_sequence: i64,
    as_of: Option<DateTime<Utc>>,
    limit: Option<i64>,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
         AND org_id = $3 AND sequence > $4 AND ($5::timestamptz IS NULL OR recorded_at <= $5) \
         ORDER BY sequence LIMIT $6"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client
        .query(
            &stmt,
            &[
                &stream.aggregate_type,
                &stream.aggregate_id,
                &stream.org_id,
                &after_sequence,
                &as_of,
                &limit,
            ],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// Every event of the streams of `aggregate_types` that share the id `aggregate_id` (a
/// contact's `contact` and `consent` streams), recorded by `as_of` if given, in one
/// statement: ordered by type, then sequence. Scoped by organisation like
/// [`read_stream`].
///
/// The types are bound one parameter each (`IN ($4, $5)`), not as one array: with an
/// array PostgreSQL cannot size the list in a generic plan, estimates it as costlier
/// than a plan for the values at hand, and so plans the statement again on every
/// execution (measured: planning took 2.5 times as long as executing it).
pub async fn read_sibling_streams(
    client: &impl GenericClient,
    org_id: Uuid,
    aggregate_types: &[&str],
    aggregate_id: &str,
    as_of: Option<DateTime<Utc>>,
) -> Result<Vec<StoredEvent>, StoreError> {
    if aggregate_types.is_empty() {
        return Ok(Vec::new());
    }
    let types = (0..aggregate_types.len())
        .map(|i| format!("${}", i + 4))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE aggregate_id = $1 AND org_id = $2 \
         AND ($3::timestamptz IS NULL OR recorded_at <= $3) \
         AND aggregate_type IN ({types}) ORDER BY aggregate_type, sequence"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&aggregate_id, &org_id, &as_of];
    params.extend(
        aggregate_types
            .iter()
            .map(|t| t as &(dyn tokio_postgres::types::ToSql + Sync)),
    );
    let rows = client.query(&stmt, &params).await?;
    Ok(rows.iter().map(from_row).collect())
}

/// The event at global `position`, if it is `org_id`'s.
pub async fn read_by_position(
    client: &impl GenericClient,
    org_id: Uuid,
    position: i64,
) -> Result<Option<StoredEvent>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM events WHERE global_position = $1 AND org_id = $2");
    let stmt = client.prepare_cached(&sql).await?;
    let row = client.query_opt(&stmt, &[&position, &org_id]).await?;
    Ok(row.as_ref().map(from_row))
}

/// The event with id `event_id`, if it is `org_id`'s.
pub async fn read_by_id(
    client: &impl GenericClient,
    org_id: Uuid,
    event_id: Uuid,
) -> Result<Option<StoredEvent>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM events WHERE event_id = $1 AND org_id = $2");
    let stmt = client.prepare_cached(&sql).await?;
    let row = client.query_opt(&stmt, &[&event_id, &org_id]).await?;
    Ok(row.as_ref().map(from_row))
}

/// Whether the stream has any event (in its organisation).
pub async fn stream_exists(
    client: &impl GenericClient,
    stream: &StreamId<'_>,
) -> Result<bool, StoreError> {
    let stmt = client
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = $1 \
             AND aggregate_id = $2 AND org_id = $3)",
        )
        .await?;
    let row = client
        .query_one(
            &stmt,
            &[&stream.aggregate_type, &stream.aggregate_id, &stream.org_id],
        )
        .await?;
    Ok(row.get(0))
}

/// Committed events after `after` in commit order, only below the visibility horizon:
/// no transaction that could still commit an earlier event is running, so nothing read
/// here can later be overtaken by an event that sorts before it.
pub async fn read_committed(
    client: &impl GenericClient,
    after: CommitKey,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    Ok(committed_rows(client, after, limit)
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// The rows behind [`read_committed`] and [`read_committed_raw`].
///
/// `ORDER BY events.tx_id`, qualified: the select list's `tx_id::text::bigint` is also
/// named `tx_id`, and an unqualified name would sort by that expression (every row in
/// range read and sorted) instead of walking the commit-order index up to the LIMIT.
async fn committed_rows(
    client: &impl GenericClient,
    after: CommitKey,
    limit: i64,
) -> Result<Vec<Row>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events \
         WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
           AND (tx_id, global_position) > ($1::bigint::text::xid8, $2) \
         ORDER BY events.tx_id, events.global_position LIMIT $3"
    );
    let stmt = client.prepare_cached(&sql).await?;
    Ok(client
        .query(&stmt, &[&after.tx_id, &after.position, &limit])
        .await?)
}

/// [`read_committed`] for publishing: the same events, payloads left as JSON text.
pub async fn read_committed_raw(
    client: &impl GenericClient,
    after: CommitKey,
    limit: i64,
) -> Result<Vec<RawEvent>, StoreError> {
    committed_rows(client, after, limit)
        .await?
        .iter()
        .map(raw_of)
        .collect()
}

/// A row of [`COLUMNS`] as a [`RawEvent`] (payload and metadata as their JSON text).
fn raw_of(row: &Row) -> Result<RawEvent, StoreError> {
    use tokio_postgres::types::Json;
    let Json(payload) = row.try_get(9)?;
    let Json(metadata) = row.try_get(10)?;
    Ok(with_row_envelope(row, payload, metadata))
}

/// [`read_committed_raw`] for one organisation and some event types: its events of
/// those types after `after` in commit order, below the visibility horizon (so the
/// answer is a prefix of commit order: nothing can later commit before its last
/// event). For the live stream's catch-up (`crate::live`).
pub async fn read_committed_raw_in_org(
    client: &impl GenericClient,
    org_id: Uuid,
    after: CommitKey,
    event_types: &[&str],
    limit: i64,
) -> Result<Vec<RawEvent>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events \
         WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
           AND (tx_id, global_position) > ($1::bigint::text::xid8, $2) \
           AND org_id = $3 AND event_type = ANY($4) \
         ORDER BY events.tx_id, events.global_position LIMIT $5"
    );
    let stmt = client.prepare_cached(&sql).await?;
    client
        .query(
            &stmt,
            &[&after.tx_id, &after.position, &org_id, &event_types, &limit],
        )
        .await?
        .iter()
        .map(raw_of)
        .collect()
}

/// Number of committed events after `after` in commit order (capped at `cap`).
pub async fn count_after(
    client: &impl GenericClient,
    after: CommitKey,
    cap: i64,
) -> Result<i64, StoreError> {
    let stmt = client
        .prepare_cached(
            // ORDER BY: walk the commit-order index (a generic plan would scan the table).
            "SELECT count(*) FROM (SELECT 1 FROM events \
             WHERE (tx_id, global_position) > ($1::bigint::text::xid8, $2) \
             ORDER BY tx_id, global_position LIMIT $3) t",
        )
        .await?;
    let row = client
        .query_one(&stmt, &[&after.tx_id, &after.position, &cap])
        .await?;
    Ok(row.get(0))
}

/// The commit key of the event at `position`, if it exists.
pub async fn commit_key_of(
    client: &impl GenericClient,
    position: i64,
) -> Result<Option<CommitKey>, StoreError> {
    let stmt = client
        .prepare_cached("SELECT tx_id::text::bigint FROM events WHERE global_position = $1")
        .await?;
    Ok(client
        .query_opt(&stmt, &[&position])
        .await?
        .map(|r| CommitKey {
            tx_id: r.get(0),
            position,
        }))
}
