//! Batched stream reads: what group commit does for appends, for the reads before a
//! command.
//!
//! A command reads its stream first (the contact a `PATCH` changes; the contact and the
//! AI settings an AI action acts on). Read alone, each such read is a statement of its
//! own: one round trip, one snapshot, one executor start-up, most of its cost for a
//! stream of a few events. The [`StreamReader`] hands concurrent reads to a few worker
//! tasks; each takes whatever reads are waiting and answers them with one statement.
//! Under load that turns N statements into one; a single caller pays one channel hop.
//!
//! A job asks for one or more streams of one organisation (read together, so they are
//! as of one moment, as a command that needs two of them wants) and gets, for each, its
//! first `limit` events in sequence order with the wrapped data key of its subject,
//! read in the same snapshot: decrypting them needs no further query, and a key
//! destroyed before that snapshot reads as gone, as it would one by one.

use std::sync::{Arc, Mutex};

use deadpool_postgres::{Object, Pool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use serde_json::Value;

use crate::store::event_store::StoreError;

/// Most streams in one statement.
pub const MAX_STREAMS: usize = 256;
/// Statements in flight at once (each on its own pooled connection).
pub const WORKERS: usize = 2;

/// One stream's first page, as read: its events in sequence order and its subject's
/// wrapped data key (`None`: never created, or destroyed).
#[derive(Debug, Default)]
pub struct Page {
    pub events: Vec<PageEvent>,
    pub wrapped_key: Option<Vec<u8>>,
}

/// An event as a load folds it: its place, its hash (the next event's link) and its
/// payload (personal members still encrypted). Not its envelope nor its metadata: an
/// aggregate reads neither, so they are neither sent nor parsed nor decrypted.
#[derive(Debug)]
pub struct PageEvent {
    pub global_position: i64,
    pub sequence: i64,
    pub hash: Vec<u8>,
    pub payload: Value,
}

/// One read: streams (type, id) of one organisation.
struct Job {
    org_id: Uuid,
    streams: Vec<(&'static str, String)>,
    reply: oneshot::Sender<Result<Vec<Page>, StoreError>>,
}

/// Hands stream reads to the worker tasks; cheap to clone. The tasks end when the last
/// handle is dropped.
#[derive(Clone)]
pub struct StreamReader {
    jobs: mpsc::Sender<Job>,
}

impl StreamReader {
    /// Starts the workers on `pool` (inside a tokio runtime); each stream is read up to
    /// `limit` events (a full page: the stream may go on).
    pub fn spawn(pool: Pool, limit: i64) -> Self {
        let connections = Connections {
            pool,
            kept: Arc::new(Mutex::new(Vec::new())),
        };
        let jobs = crate::batch::spawn(WORKERS, MAX_STREAMS, move |batch: Vec<Job>| {
            let connections = connections.clone();
            async move { answer(&connections, limit, batch).await }
        });
        Self { jobs }
    }

    /// The first pages of `streams` (type, id) of `org_id`, in their order, all as of
    /// one snapshot. Another organisation's stream reads as empty.
    pub async fn first_pages(
        &self,
        org_id: Uuid,
        streams: Vec<(&'static str, String)>,
    ) -> Result<Vec<Page>, StoreError> {
        let job = |reply| Job {
            org_id,
            streams,
            reply,
        };
        crate::batch::ask(&self.jobs, job)
            .await
            .ok_or(StoreError::Unavailable("the stream reader has stopped"))?
    }
}

/// The workers' connections: taken from the pool once and kept between batches (one
/// per worker), so that the reader never waits for the shared pool in steady state. A
/// command's caller may hold a pooled connection while it waits for its load: were the
/// reader to need one of the pool's for every batch, enough such callers at once would
/// leave it none.
#[derive(Clone)]
struct Connections {
    pool: Pool,
    kept: Arc<Mutex<Vec<Object>>>,
}

impl Connections {
    async fn take(&self) -> Result<Object, StoreError> {
        let kept = self.kept.lock().expect("reader connections poisoned").pop();
        match kept {
            Some(client) => Ok(client),
            None => Ok(self.pool.get().await?),
        }
    }

    /// Keeps a connection that served a batch well (one that failed is dropped: the
    /// pool checks it before it is used again).
    fn keep(&self, client: Object) {
        let mut kept = self.kept.lock().expect("reader connections poisoned");
        if kept.len() < WORKERS {
            kept.push(client);
        }
    }
}

/// Each stream's first `$4` events with its subject's wrapped key: one index scan per
/// stream (`events_stream_sequence`), in one statement. Column 0 numbers the streams
/// of the batch (from 1), column 1 is the key, the event's columns follow.
const READ: &str = "\
    SELECT s.n::int, k.wrapped_key, e.global_position, e.sequence, e.hash, e.payload \
    FROM unnest($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY \
         AS s (org_id, aggregate_type, aggregate_id, n) \
    LEFT JOIN data_keys k ON k.org_id = s.org_id AND k.subject_id = s.aggregate_id \
    CROSS JOIN LATERAL (SELECT global_position, sequence, hash, payload FROM events \
        WHERE aggregate_type = s.aggregate_type AND aggregate_id = s.aggregate_id \
          AND org_id = s.org_id \
        ORDER BY sequence LIMIT $4) e";

/// Answers a batch with one statement; should it fail, each job alone (so that each
/// gets its own error).
async fn answer(connections: &Connections, limit: i64, jobs: Vec<Job>) {
    if jobs.len() > 1 {
        if let Ok(pages) = read(connections, limit, &jobs).await {
            let mut pages = pages.into_iter();
            for job in jobs {
                let mine: Vec<Page> = pages.by_ref().take(job.streams.len()).collect();
                let _ = job.reply.send(Ok(mine));
            }
            return;
        }
    }
    for job in jobs {
        let result = read(connections, limit, std::slice::from_ref(&job)).await;
        let _ = job.reply.send(result);
    }
}

async fn read(
    connections: &Connections,
    limit: i64,
    jobs: &[Job],
) -> Result<Vec<Page>, StoreError> {
    let n: usize = jobs.iter().map(|j| j.streams.len()).sum();
    let mut orgs = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for job in jobs {
        for (t, id) in &job.streams {
            orgs.push(job.org_id);
            types.push(*t);
            ids.push(id.as_str());
        }
    }
    let client = connections.take().await?;
    let stmt = client.prepare_cached(READ).await?;
    let rows = client.query(&stmt, &[&orgs, &types, &ids, &limit]).await?;
    connections.keep(client);
    let mut pages: Vec<Page> = (0..n).map(|_| Page::default()).collect();
    for row in &rows {
        let i = usize::try_from(row.get::<_, i32>(0) - 1).unwrap_or(usize::MAX);
        let Some(page) = pages.get_mut(i) else {
            continue;
        };
        if page.events.is_empty() {
            page.wrapped_key = row.get(1);
        }
        page.events.push(PageEvent {
            global_position: row.get(2),
            sequence: row.get(3),
            hash: row.get(4),
            payload: row.get(5),
        });
    }
    for page in &mut pages {
        page.events.sort_by_key(|e| e.sequence);
    }
    Ok(pages)
}
