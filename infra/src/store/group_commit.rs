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
//!
//! A *unit* ([`GroupCommitter::append_unit`]) is several events, on one or several
//! streams, that commit together or not at all (an AI action's proposal, the contact
//! change it ran and its outcome). It shares a batch like a single row; a batch that
//! holds one runs in an explicit transaction, and should any unit come out of the
//! statement only partly written (one of its rows conflicted), the transaction is rolled
//! back and run again without it, so that the unit gets its conflict and nothing of it
//! is stored.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::event_store::{self, Appended, PendingEvent, StoreError, StreamHead, StreamId};

/// Most rows in one statement.
pub const MAX_BATCH: usize = 512;
/// Statements in flight at once (each on its own pooled connection).
pub const FLUSHERS: usize = 3;

/// One event to append, owned, with its id and hash-chain link already computed.
pub(crate) struct Row {
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
    /// (kek id, wrapped data key, owners as an array literal) of a new subject,
    /// inserted with the event.
    new_key: Option<(String, Vec<u8>, String)>,
}

/// A new subject's data key as it is stored with the event that first uses it.
#[derive(Debug, Clone, Copy)]
pub struct KeyRow<'a> {
    pub kek_id: &'a str,
    pub wrapped: &'a [u8],
    /// The contacts whose erasure also destroys it ([`crm_domain::PersonalData::key_owners`]).
    pub owners: &'a [Uuid],
}

/// `owners` as a PostgreSQL array literal (`{a,b}`), for one element of a `text[]`.
fn owners_literal(owners: &[Uuid]) -> String {
    let ids: Vec<String> = owners.iter().map(Uuid::to_string).collect();
    format!("{{{}}}", ids.join(","))
}

impl Row {
    /// `event` as the event after `head` on `stream`, with id `event_id`; `new_key`:
    /// the stream's new subject's key, stored with it.
    pub(crate) fn new(
        stream: &StreamId<'_>,
        head: &StreamHead,
        event_id: Uuid,
        event: PendingEvent,
        new_key: Option<KeyRow<'_>>,
    ) -> Self {
        let sequence = head.version + 1;
        let hash = event.hash(stream, &event_id, sequence, head.last_hash.as_deref());
        Self {
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
            new_key: new_key.map(|k| {
                (
                    k.kek_id.to_owned(),
                    k.wrapped.to_vec(),
                    owners_literal(k.owners),
                )
            }),
        }
    }

    /// Its hash-chain hash: the next row's previous hash.
    pub(crate) fn hash(&self) -> &[u8] {
        &self.hash
    }
}

/// One append: a single row, or a unit of rows that commit together.
struct Job {
    rows: Vec<Row>,
    reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
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
        new_key: Option<KeyRow<'_>>,
    ) -> Result<Appended, StoreError> {
        let row = Row::new(stream, head, Uuid::now_v7(), event, new_key);
        let mut appended = self.send(vec![row]).await?;
        appended.pop().ok_or(StoreError::Conflict)
    }

    /// Appends `rows` (in this order; each stream's rows in sequence, chained) all in
    /// one commit or none: [`StoreError::Conflict`] if any stream moved on meanwhile,
    /// [`StoreError::KeyExists`] if a new subject's key was there already.
    pub(crate) async fn append_unit(&self, rows: Vec<Row>) -> Result<Vec<Appended>, StoreError> {
        if rows.is_empty() {
            return Ok(vec![]);
        }
        self.send(rows).await
    }

    async fn send(&self, rows: Vec<Row>) -> Result<Vec<Appended>, StoreError> {
        crate::batch::ask(&self.jobs, |reply| Job { rows, reply })
            .await
            .ok_or(StoreError::Unavailable("the appender has stopped"))?
    }
}

const INSERT: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                         $6::text[], $7::text[], $8::jsonb[], $9::jsonb[], $10::bytea[],
                         $11::bytea[], $12::text[], $13::bytea[], $14::text[])
        WITH ORDINALITY AS t(event_id, org_id, aggregate_type, aggregate_id, sequence,
                             event_type, event_version, payload, metadata, prev_hash,
                             hash, kek_id, wrapped_key, owners, ord)
), new_keys AS (
    INSERT INTO data_keys (org_id, subject_id, kek_id, wrapped_key, owners)
    SELECT org_id, aggregate_id, kek_id, wrapped_key, owners::uuid[] FROM input
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

/// What a job came to, given where and when its rows were written (those that were):
/// every row, or its error. A job not wholly written failed: with `KeyExists` if it
/// brought a new subject's key that was not stored (the subject has one already; the
/// caller takes the general path), else with `Conflict` (a stream moved on).
fn outcome(job: &Job, written: &Written) -> Result<Vec<Appended>, StoreError> {
    let mut appended = Vec::with_capacity(job.rows.len());
    for row in &job.rows {
        let Some(&(global_position, recorded_at)) = written.get(&row.event_id) else {
            let key_refused = job
                .rows
                .iter()
                .any(|r| r.new_key.is_some() && !written.contains_key(&r.event_id));
            return Err(if key_refused {
                StoreError::KeyExists
            } else {
                StoreError::Conflict
            });
        };
        appended.push(Appended {
            event_id: row.event_id,
            sequence: row.sequence,
            global_position,
            hash: hex::encode(&row.hash),
            recorded_at,
        });
    }
    Ok(appended)
}

async fn flush(pool: &Pool, jobs: Vec<Job>) {
    match write(pool, &jobs).await {
        Ok((written, mut left_out)) => {
            for (n, job) in jobs.into_iter().enumerate() {
                let result = match left_out.remove(&n) {
                    Some(e) => Err(e),
                    None => outcome(&job, &written),
                };
                let _ = job.reply.send(result);
            }
        }
        Err(e) if jobs.len() == 1 => {
            let job = jobs.into_iter().next().expect("one job");
            let _ = job.reply.send(Err(e));
        }
        Err(e) => {
            tracing::warn!(error = %e, jobs = jobs.len(), "batched append failed; retrying job by job");
            for job in jobs {
                let result =
                    write(pool, std::slice::from_ref(&job))
                        .await
                        .and_then(|(w, left_out)| match left_out.into_values().next() {
                            Some(e) => Err(e),
                            None => outcome(&job, &w),
                        });
                let _ = job.reply.send(result);
            }
        }
    }
}

/// Writes the jobs' rows in one statement: single rows on their own, units all or
/// nothing (see the module's documentation). The global positions and times of the
/// rows written, by event id; the units left out, by index, with their error.
async fn write(
    pool: &Pool,
    jobs: &[Job],
) -> Result<(Written, HashMap<usize, StoreError>), StoreError> {
    let mut client = pool.get().await?;
    if jobs.iter().all(|j| j.rows.len() == 1) {
        return Ok((insert(&client, jobs.iter()).await?, HashMap::new()));
    }
    let mut left_out = HashMap::new();
    loop {
        let tx = client.transaction().await?;
        let live = jobs
            .iter()
            .enumerate()
            .filter(|(n, _)| !left_out.contains_key(n));
        let written = insert(&tx, live.clone().map(|(_, j)| j)).await?;
        let partial: Vec<(usize, StoreError)> = live
            .filter(|(_, j)| {
                let n = j
                    .rows
                    .iter()
                    .filter(|r| written.contains_key(&r.event_id))
                    .count();
                n > 0 && n < j.rows.len()
            })
            .filter_map(|(n, j)| outcome(j, &written).err().map(|e| (n, e)))
            .collect();
        if partial.is_empty() {
            tx.commit().await.map_err(event_store::conflict_or_db)?;
            return Ok((written, left_out));
        }
        // Undo the whole statement, and run it again without the units it cut in two:
        // they get the error of the row of theirs that was not written.
        tx.rollback().await?;
        left_out.extend(partial);
    }
}

/// The rows of `jobs`, inserted with one statement on `client`.
async fn insert<'j>(
    client: &impl GenericClient,
    jobs: impl Iterator<Item = &'j Job>,
) -> Result<Written, StoreError> {
    let rows: Vec<&Row> = jobs.flat_map(|j| j.rows.iter()).collect();
    let n = rows.len();
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
    let mut owners = Vec::with_capacity(n);
    for r in rows {
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
        kek_id.push(r.new_key.as_ref().map(|(k, _, _)| k.as_str()));
        wrapped_key.push(r.new_key.as_ref().map(|(_, w, _)| w.as_slice()));
        owners.push(r.new_key.as_ref().map(|(_, _, o)| o.as_str()));
    }
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
                &owners,
            ],
        )
        .await
        .map_err(event_store::conflict_or_db)?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}
