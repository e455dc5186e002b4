//! Group commit: single-event appends of concurrent commands share one statement.
//!
//! Every command that writes one event (the usual case) hands its row to the
//! [`GroupCommitter`] instead of running its own INSERT. A few flusher tasks each take
//! whatever rows are waiting (up to [`MAX_BATCH`]) and write them with one
//! `INSERT ... SELECT FROM unnest(...)`, which is one statement, one transaction and one
//! commit for the whole batch. Under load that turns N commits into one; with a single
//! client the batch is that one row, and the cost is one channel hop.
//!
//! Each row keeps its own optimistic-concurrency check: the insert skips rows whose
//! (type, id, sequence) is taken (`ON CONFLICT ... DO NOTHING`), and those commands get
//! [`StoreError::Conflict`], exactly as if they had run alone. A row that brings a new
//! data key is inserted only if its key was (a subject that already has a key goes back
//! to the caller as [`StoreError::KeyExists`]). Should the statement fail as a whole, the
//! rows of that batch are retried one by one so that only the faulty one fails.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::event_store::{self, Appended, PendingEvent, StoreError, StreamHead, StreamId};

/// Most rows in one statement.
pub const MAX_BATCH: usize = 512;
/// Statements in flight at once (each on its own pooled connection).
pub const FLUSHERS: usize = 3;

/// One event to append, owned, with its hash-chain link already computed.
struct Row {
    event_id: Uuid,
    org_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: Value,
    metadata: Value,
    prev_hash: Option<Vec<u8>>,
    hash: Vec<u8>,
    /// (kek id, wrapped data key) of a new subject, inserted with the event.
    new_key: Option<(String, Vec<u8>)>,
}

struct Job {
    row: Row,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// Hands single-event appends to the flusher tasks; cheap to clone. The tasks end when
/// the last handle is dropped.
#[derive(Clone)]
pub struct GroupCommitter {
    jobs: mpsc::Sender<Job>,
}

impl GroupCommitter {
    /// Starts the flushers on `pool` (must be called inside a tokio runtime).
    pub fn spawn(pool: Pool) -> Self {
        let jobs = crate::batch::spawn(FLUSHERS, MAX_BATCH, move |batch: Vec<Job>| {
            let pool = pool.clone();
            async move { flush(&pool, batch).await }
        });
        Self { jobs }
    }

    /// Appends one event to `stream` after `head`, with the subject's new data key if
    /// `new_key` is given; resolves once committed.
    pub async fn append(
        &self,
        stream: &StreamId<'_>,
        head: &StreamHead,
        event: PendingEvent,
        new_key: Option<(&str, &[u8])>,
    ) -> Result<Appended, StoreError> {
        let event_id = Uuid::now_v7();
        let sequence = head.version + 1;
        let hash = event.hash(stream, &event_id, sequence, head.last_hash.as_deref());
        let row = Row {
            event_id,
            org_id: stream.org_id,
            aggregate_type: stream.aggregate_type.to_owned(),
            aggregate_id: stream.aggregate_id.to_owned(),
            sequence,
            event_type: event.event_type,
            event_version: event.event_version,
            payload: event.payload,
            metadata: event.metadata,
            prev_hash: head.last_hash.clone(),
            hash: hash.to_vec(),
            new_key: new_key.map(|(k, w)| (k.to_owned(), w.to_vec())),
        };
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { row, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the appender has stopped"))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the appender has stopped"))?
    }
}

const INSERT: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                         $6::text[], $7::text[], $8::jsonb[], $9::jsonb[], $10::bytea[],
                         $11::bytea[], $12::text[], $13::bytea[])
        WITH ORDINALITY AS t(event_id, org_id, aggregate_type, aggregate_id, sequence,
                             event_type, event_version, payload, metadata, prev_hash,
                             hash, kek_id, wrapped_key, ord)
), new_keys AS (
    INSERT INTO data_keys (org_id, subject_id, kek_id, wrapped_key)
    SELECT org_id, aggregate_id, kek_id, wrapped_key FROM input
    WHERE wrapped_key IS NOT NULL
    ORDER BY ord
    ON CONFLICT (org_id, subject_id) DO NOTHING
    RETURNING wrapped_key
)
INSERT INTO events (event_id, org_id, aggregate_type, aggregate_id, sequence, event_type,
                    event_version, payload, metadata, prev_hash, hash)
SELECT event_id, org_id, aggregate_type, aggregate_id, sequence, event_type,
       event_version, payload, metadata, prev_hash, hash
FROM input
WHERE wrapped_key IS NULL OR wrapped_key IN (SELECT wrapped_key FROM new_keys)
ORDER BY ord
ON CONFLICT ON CONSTRAINT events_stream_sequence DO NOTHING
RETURNING event_id, global_position, recorded_at";

/// Where and when an inserted row was written.
type Written = HashMap<Uuid, (i64, DateTime<Utc>)>;

/// What a job's row came to, given the position and time it was written at (if it was).
fn outcome(row: &Row, written: Option<(i64, DateTime<Utc>)>) -> Result<Appended, StoreError> {
    match written {
        Some((global_position, recorded_at)) => Ok(Appended {
            event_id: row.event_id,
            sequence: row.sequence,
            global_position,
            hash: hex::encode(&row.hash),
            recorded_at,
        }),
        // Its key was not inserted: the subject has one already (or its stream moved
        // on too); the caller takes the general path.
        None if row.new_key.is_some() => Err(StoreError::KeyExists),
        None => Err(StoreError::Conflict),
    }
}

async fn flush(pool: &Pool, jobs: Vec<Job>) {
    match insert_batch(pool, &jobs).await {
        Ok(written) => {
            for job in jobs {
                let result = outcome(&job.row, written.get(&job.row.event_id).copied());
                let _ = job.reply.send(result);
            }
        }
        Err(e) if jobs.len() == 1 => {
            let job = jobs.into_iter().next().expect("one job");
            let _ = job.reply.send(Err(e));
        }
        Err(e) => {
            tracing::warn!(error = %e, rows = jobs.len(), "batched append failed; retrying row by row");
            for job in jobs {
                let result = insert_batch(pool, std::slice::from_ref(&job))
                    .await
                    .and_then(|w| outcome(&job.row, w.get(&job.row.event_id).copied()));
                let _ = job.reply.send(result);
            }
        }
    }
}

/// Writes the rows in one statement; the global positions and times of those written,
/// by event id.
async fn insert_batch(pool: &Pool, jobs: &[Job]) -> Result<Written, StoreError> {
    let n = jobs.len();
    let mut event_id = Vec::with_capacity(n);
    let mut org_id = Vec::with_capacity(n);
    let mut aggregate_type = Vec::with_capacity(n);
    let mut aggregate_id = Vec::with_capacity(n);
    let mut sequence = Vec::with_capacity(n);
    let mut event_type = Vec::with_capacity(n);
    let mut event_version = Vec::with_capacity(n);
    let mut payload = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut prev_hash = Vec::with_capacity(n);
    let mut hash = Vec::with_capacity(n);
    let mut kek_id = Vec::with_capacity(n);
    let mut wrapped_key = Vec::with_capacity(n);
    for Job { row: r, .. } in jobs {
        event_id.push(r.event_id);
        org_id.push(r.org_id);
        aggregate_type.push(r.aggregate_type.as_str());
        aggregate_id.push(r.aggregate_id.as_str());
        sequence.push(r.sequence);
        event_type.push(r.event_type.as_str());
        event_version.push(r.event_version.as_str());
        payload.push(&r.payload);
        metadata.push(&r.metadata);
        prev_hash.push(r.prev_hash.as_deref());
        hash.push(r.hash.as_slice());
        kek_id.push(r.new_key.as_ref().map(|(k, _)| k.as_str()));
        wrapped_key.push(r.new_key.as_ref().map(|(_, w)| w.as_slice()));
    }
    let client = pool.get().await?;
    let stmt = client.prepare_cached(INSERT).await?;
    let rows = client
        .query(
            &stmt,
            &[
                &event_id,
                &org_id,
                &aggregate_type,
                &aggregate_id,
                &sequence,
                &event_type,
                &event_version,
                &payload,
                &metadata,
                &prev_hash,
                &hash,
                &kek_id,
                &wrapped_key,
            ],
        )
        .await
        .map_err(event_store::conflict_or_db)?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}
