//! Rebuilding a read model from the event store (never from NATS).
//!
//! The projection is folded from every committed event below the visibility horizon,
//! read in one REPEATABLE READ snapshot, and written in bulk (`COPY`) into a shadow
//! table. The stages overlap: a reader task streams rows from PostgreSQL in chunks,
//! the chunks are parsed and decrypted on blocking threads, and the fold takes them in
//! order and writes whatever it has finished while the scan goes on. The shadow's
//! indexes are built once the rows are in. Then, in one transaction that holds the
//! projection's lock (so live workers pause), the shadow catches up with whatever
//! committed meanwhile, is swapped in by rename, and the checkpoint is moved to the last
//! event it reflects. Queries keep reading the old table until the swap.
//!
//! How the events are read depends on the projection ([`Scan::of`]): the contacts fold
//! needs only contact streams, each in its own order, so it reads them stream by stream
//! and a contact is final (written with the next batch) once its stream ends; the
//! activity log is one row per event, read in any order; any other projection reads
//! everything in commit order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::{Object, Pool};
use futures::{pin_mut, TryStreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::crypto::Crypto;
use crate::feed::projector::{set_checkpoint, Projection, ProjectionError, Rebuilder};
use crate::store::decode::{decode, decode_without_personal_data, DecodedEvent};
use crate::store::event_store::{self, from_row, CommitKey, StoreError, COLUMNS};

/// Rows parsed and decrypted together on one blocking thread.
const CHUNK: usize = 1024;

/// The order a rebuild reads events in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Commit order `(tx_id, global_position)`: what a projection that folds across
    /// streams needs.
    Commit,
    /// Stream by stream, each in sequence order (the `events_stream_sequence` index):
    /// enough for a projection whose rows each depend on one stream only. The fold
    /// flushes only between two streams, so every row it writes is complete.
    Stream,
    /// Any order (a plain sequential scan): for a projection with one independent row
    /// per event.
    Any,
}

/// What a rebuild reads from `events`.
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// Only events of this aggregate type (the others do not change the read model).
    aggregate_type: Option<&'static str>,
    order: Order,
}

impl Scan {
    /// The scan for a projection. The `Rebuilder`s of `contacts`, `ai_audit` and `activity` rely on
    /// the order given here (see their docs); any other projection gets every event in
    /// commit order.
    fn of(projection: &dyn Projection) -> Self {
        match projection.name() {
            "contacts" => Scan {
                aggregate_type: Some(crate::read_models::contacts::REBUILD_AGGREGATE_TYPE),
                order: Order::Stream,
            },
            "ai_audit" => Scan {
                aggregate_type: Some(crate::read_models::ai_audit::REBUILD_AGGREGATE_TYPE),
                order: Order::Stream,
            },
            "activity" => Scan {
                aggregate_type: None,
                order: Order::Any,
            },
            _ => Scan {
                aggregate_type: None,
                order: Order::Commit,
            },
        }
    }

    /// The query: `$1` is the aggregate type, when there is one.
    fn sql(&self) -> String {
        let mut sql = format!(
            "SELECT {COLUMNS} FROM events WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())"
        );
        if self.aggregate_type.is_some() {
            sql.push_str(" AND aggregate_type = $1");
        }
        sql.push_str(match self.order {
            Order::Commit => " ORDER BY events.tx_id, events.global_position",
            Order::Stream => " ORDER BY aggregate_type, aggregate_id, sequence",
            Order::Any => "",
        });
        sql
    }
}

/// The wrapped data keys of the subjects of one chunk, by organisation and subject.
type Keys = HashMap<(Uuid, String), Vec<u8>>;

/// Reads the wrapped data keys of the subjects of `rows` (in the scan's snapshot, which
/// `keys` imported: exactly the keys of the events read, the destroyed ones left out).
/// One query per chunk, so memory holds the keys of one chunk at a time, however many
/// subjects the store has.
async fn chunk_keys(
    keys: &KeyReader,
    rows: &[tokio_postgres::Row],
) -> Result<Keys, ProjectionError> {
    let mut subjects: Vec<(Uuid, &str)> = rows.iter().map(|r| (r.get(3), r.get(5))).collect();
    subjects.sort_unstable();
    subjects.dedup();
    let (orgs, ids): (Vec<Uuid>, Vec<&str>) = subjects.into_iter().unzip();
    Ok(keys
        .client
        .query(&keys.statement, &[&orgs, &ids])
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// A connection in the scan's snapshot and its statement for [`chunk_keys`].
struct KeyReader {
    client: deadpool_postgres::ClientWrapper,
    statement: tokio_postgres::Statement,
}

/// Parses a row and decrypts its personal members with `keys` (as [`decode`] does with
/// the key store), or none of them without `keys`.
fn decode_row(
    crypto: &Crypto,
    keys: Option<&Keys>,
    row: &tokio_postgres::Row,
) -> Result<DecodedEvent, StoreError> {
    let mut stored = from_row(row);
    let Some(keys) = keys else {
        return decode_without_personal_data(stored);
    };
    let mut payload = std::mem::take(&mut stored.payload);
    let mut metadata = std::mem::take(&mut stored.metadata);
    let wrapped = keys.get(&(stored.org_id, stored.aggregate_id.clone()));
    crypto.decrypt_event_with_wrapped(
        &stored.org_id,
        &stored.aggregate_id,
        wrapped.map(Vec::as_slice),
        &mut payload,
        &mut metadata,
    )?;
    DecodedEvent::new(stored, payload, metadata)
}

/// A chunk being decoded (its keys read, then its rows parsed and decrypted), in scan
/// order.
type Decoding = JoinHandle<Result<Vec<Result<DecodedEvent, StoreError>>, ProjectionError>>;

/// Streams the scan's rows to decoders, CHUNK rows at a time, and their results (in
/// order) into `out`. Runs in its own task on a connection of its own, in one
/// REPEATABLE READ snapshot; with `keys` (for a projection that reads personal data),
/// that connection imports the snapshot and serves each chunk's data keys. Returns the
/// last commit key below the snapshot's horizon (the rebuild reflects every event up
/// to it) and the events read.
async fn read(
    reader: Object,
    keys: Option<Object>,
    crypto: Arc<Crypto>,
    scan: Scan,
    out: mpsc::Sender<Decoding>,
) -> Result<(CommitKey, u64), ProjectionError> {
    // Not returned to the pool: if this fails half-way, the connection (and the open
    // transaction) go away with it.
    let reader = Object::take(reader);
    reader
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET LOCAL enable_sort = off",
        )
        .await?;
    // The first statement takes the snapshot: the horizon is fixed from here on.
    let snapshot: String = reader
        .query_one("SELECT pg_export_snapshot()", &[])
        .await?
        .get(0);
    let keys = match keys {
        Some(keys) => {
            let client = Object::take(keys);
            client
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                     SET TRANSACTION SNAPSHOT '{}'",
                    snapshot.replace('\'', "''")
                ))
                .await?;
            let statement = client
                .prepare(
                    "SELECT d.org_id, d.subject_id, d.wrapped_key \
                     FROM unnest($1::uuid[], $2::text[]) AS s (org_id, subject_id) \
                     JOIN data_keys d ON d.org_id = s.org_id AND d.subject_id = s.subject_id \
                     WHERE d.wrapped_key IS NOT NULL",
                )
                .await?;
            Some(Arc::new(KeyReader { client, statement }))
        }
        None => None,
    };
    let last = reader
        .query_opt(
            "SELECT tx_id::text::bigint, global_position FROM events \
             WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY events.tx_id DESC, events.global_position DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| CommitKey {
            tx_id: r.get(0),
            position: r.get(1),
        })
        .unwrap_or_default();
    let params: Vec<&str> = scan.aggregate_type.into_iter().collect();
    let rows = reader.query_raw(&scan.sql(), params).await?;
    pin_mut!(rows);
    let mut read = 0u64;
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        let row = rows.try_next().await?;
        let end = row.is_none();
        if let Some(row) = row {
            chunk.push(row);
        }
        if chunk.len() == CHUNK || (end && !chunk.is_empty()) {
            read += chunk.len() as u64;
            let rows = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
            let (crypto, keys) = (crypto.clone(), keys.clone());
            let job = tokio::spawn(async move {
                let keys = match &keys {
                    Some(client) => Some(chunk_keys(client, &rows).await?),
                    None => None,
                };
                let decoded = tokio::task::spawn_blocking(move || {
                    rows.iter()
                        .map(|row| decode_row(&crypto, keys.as_ref(), row))
                        .collect()
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                Ok(decoded)
            });
            if out.send(job).await.is_err() {
                // The fold stopped (it reports why).
                break;
            }
        }
        if end {
            break;
        }
    }
    reader.batch_execute("COMMIT").await?;
    Ok((last, read))
}

/// Indexes of the shadow table, dropped before the bulk load and built after it (one
/// index build is much cheaper than as many index insertions as rows).
#[derive(Default)]
struct DeferredIndexes {
    /// `CREATE [UNIQUE] INDEX` statements, as the catalog gives them.
    create: Vec<String>,
    /// `ALTER TABLE … ADD CONSTRAINT … USING INDEX` for the primary key and unique
    /// constraints, once their indexes exist.
    constraints: Vec<String>,
}

impl DeferredIndexes {
    /// Records the indexes of `shadow` (as `CREATE TABLE … LIKE … INCLUDING ALL` made
    /// them) and drops them. Leaves them in place if one of them cannot be recreated
    /// this way (an exclusion or deferrable constraint).
    async fn take(client: &tokio_postgres::Client, shadow: &str) -> Result<Self, ProjectionError> {
        let rows = client
            .query(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(i.relname), \
                        quote_ident(i.relname), pg_get_indexdef(x.indexrelid), \
                        quote_ident(c.conname), \
                        c.contype::text, coalesce(c.condeferrable, false) \
                 FROM pg_index x \
                 JOIN pg_class i ON i.oid = x.indexrelid \
                 JOIN pg_namespace n ON n.oid = i.relnamespace \
                 LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid \
                 WHERE x.indrelid = $1::text::regclass",
                &[&shadow],
            )
            .await?;
        let mut deferred = Self::default();
        let mut drop = String::new();
        for r in &rows {
            let (qualified, index, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let constraint: Option<String> = r.get(3);
            let kind: Option<String> = r.get(4);
            let deferrable: bool = r.get(5);
            match (constraint, kind.as_deref()) {
                (None, _) => drop.push_str(&format!("DROP INDEX {qualified};")),
                (Some(name), Some(kind @ ("p" | "u"))) if !deferrable => {
                    drop.push_str(&format!("ALTER TABLE {shadow} DROP CONSTRAINT {name};"));
                    let what = if kind == "p" { "PRIMARY KEY" } else { "UNIQUE" };
                    deferred.constraints.push(format!(
                        "ALTER TABLE {shadow} ADD CONSTRAINT {name} {what} USING INDEX {index}"
                    ));
                }
                _ => return Ok(Self::default()),
            }
            deferred.create.push(def);
        }
        if !drop.is_empty() {
            client.batch_execute(&drop).await?;
        }
        Ok(deferred)
    }

    /// Builds the indexes, each on a connection of its own (they run in parallel), then
    /// turns the constraint ones back into constraints.
    async fn build(self, admin: &Pool) -> Result<(), ProjectionError> {
        futures::future::try_join_all(self.create.iter().map(|sql| async move {
            admin.get().await?.batch_execute(sql).await?;
            Ok::<_, ProjectionError>(())
        }))
        .await?;
        if !self.constraints.is_empty() {
            admin
                .get()
                .await?
                .batch_execute(&self.constraints.join(";"))
                .await?;
        }
        Ok(())
    }
}

/// The statements that give the shadow's indexes (and the constraints they back) the
/// names the live table's had, once the live table is gone: a rebuilt read model keeps
/// the names that migrations and operators refer to. Indexes are matched by what they
/// index (method, columns, predicate, uniqueness); one whose definition is not unique
/// on either side keeps its generated name.
async fn index_renames(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    shadow: &str,
) -> Result<String, ProjectionError> {
    let rows = tx
        .query(
            "SELECT x.indrelid = $1::text::regclass, quote_ident(i.relname), \
                    quote_ident(c.conname), \
                    x.indisunique::text || x.indisprimary::text || \
                    regexp_replace(pg_get_indexdef(x.indexrelid), '^.*? USING ', '') \
             FROM pg_index x \
             JOIN pg_class i ON i.oid = x.indexrelid \
             LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid \
             WHERE x.indrelid IN ($1::text::regclass, $2::text::regclass)",
            &[&table, &shadow],
        )
        .await?;
    type Named = (String, Option<String>);
    let mut by_def: HashMap<String, (Vec<Named>, Vec<Named>)> = HashMap::new();
    for r in &rows {
        let (live, name, constraint, def): (bool, String, Option<String>, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let sides = by_def.entry(def).or_default();
        if live { &mut sides.0 } else { &mut sides.1 }.push((name, constraint));
    }
    let mut sql = String::new();
    for (live, rebuilt) in by_def.values() {
        let ([(name, constraint)], [(new_name, new_constraint)]) = (&live[..], &rebuilt[..]) else {
            continue;
        };
        match (constraint, new_constraint) {
            (Some(c), Some(nc)) => sql.push_str(&format!(
                "ALTER TABLE {table} RENAME CONSTRAINT {nc} TO {c};"
            )),
            _ => sql.push_str(&format!("ALTER INDEX {new_name} RENAME TO {name};")),
        }
    }
    Ok(sql)
}

/// A rebuilder and the connection it writes with.
type Writer = (Box<dyn Rebuilder>, Object);

/// Batches written into the shadow table at once, besides the one being folded.
const WRITES_IN_FLIGHT: usize = 2;

/// The fold stage. Where batches are independent of each other (`Order::Stream`, whose
/// flushes fall between streams, and `Order::Any`), several rebuilders on their own
/// connections take turns: a full one writes its batch with `COPY` in a task of its
/// own (up to [`WRITES_IN_FLIGHT`] at once, so that PostgreSQL parses on every core)
/// while the next folds. Otherwise (`Order::Commit`) one rebuilder folds everything and
/// writes in between.
struct Fold {
    active: Writer,
    idle: Vec<Writer>,
    writing: std::collections::VecDeque<JoinHandle<(Writer, Result<u64, ProjectionError>)>>,
    /// Whether batches may be written in the background (more than one rebuilder).
    background: bool,
    shadow: String,
}

impl Fold {
    fn new(first: Writer, others: Vec<Writer>, shadow: &str) -> Self {
        Self {
            active: first,
            background: !others.is_empty(),
            idle: others,
            writing: Default::default(),
            shadow: shadow.to_owned(),
        }
    }

    /// Waits for the oldest write under way; its rebuilder becomes idle.
    async fn settle_one(&mut self) -> Result<(), ProjectionError> {
        if let Some(job) = self.writing.pop_front() {
            let (writer, written) = job
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            self.idle.push(writer);
            written?;
        }
        Ok(())
    }

    /// Writes what the active rebuilder holds: in the background when another
    /// rebuilder is (or, once a write ends, becomes) free to fold into meanwhile.
    async fn flush(&mut self) -> Result<(), ProjectionError> {
        if !self.background {
            let (rebuilder, client) = &mut self.active;
            rebuilder.flush(client, &self.shadow).await?;
            return Ok(());
        }
        while self.idle.is_empty() {
            self.settle_one().await?;
        }
        let next = self.idle.pop().expect("an idle rebuilder");
        let (mut rebuilder, client) = std::mem::replace(&mut self.active, next);
        let shadow = self.shadow.clone();
        self.writing.push_back(tokio::spawn(async move {
            let written = rebuilder.flush(&client, &shadow).await;
            ((rebuilder, client), written)
        }));
        Ok(())
    }

    /// Writes everything still held; the connections go back to the pool.
    async fn finish(mut self) -> Result<(), ProjectionError> {
        while !self.writing.is_empty() {
            self.settle_one().await?;
        }
        let (rebuilder, client) = &mut self.active;
        rebuilder.flush(client, &self.shadow).await?;
        for (mut rebuilder, client) in self.idle {
            rebuilder.flush(&client, &self.shadow).await?;
        }
        Ok(())
    }

    /// Stops the writes under way (after an error).
    fn abort(&self) {
        for job in &self.writing {
            job.abort();
        }
    }
}

#[derive(Debug, Clone)]
pub struct RebuildReport {
    /// Events read: those of the snapshot the projection reads (for `contacts`, only
    /// contact events), then those committed meanwhile that the catch-up applied.
    pub events: u64,
    pub seconds: f64,
}

/// Rebuilds `projection`; `progress(done, total)` is called as events are folded
/// (`total` is the planner's estimate of the events table's size until the end).
pub async fn rebuild(
    admin: &Pool,
    crypto: &Arc<Crypto>,
    projection: Arc<dyn Projection>,
    app_role: &str,
    progress: impl Fn(u64, u64),
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let table = projection.table();
    let shadow = format!("{table}_rebuild");
    let scan = Scan::of(&*projection);
    let personal = projection.needs_personal_data();
    let reader = admin.get().await?;
    let keys = if personal {
        Some(admin.get().await?)
    } else {
        None
    };
    let writer = admin.get().await?;
    writer
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {shadow}; CREATE TABLE {shadow} (LIKE {table} INCLUDING ALL)"
        ))
        .await?;
    let indexes = DeferredIndexes::take(&writer, &shadow).await?;
    // For the progress bar only: an exact count would be a second scan.
    let estimate: f64 = writer
        .query_one(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = 'events'::regclass",
            &[],
        )
        .await?
        .get(0);
    let estimate = estimate.max(0.0) as u64;
    let prepared = started.elapsed();

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (chunks, mut decoded) = mpsc::channel::<Decoding>(2 * threads + 2);
    let mut reading = tokio::spawn(read(reader, keys, crypto.clone(), scan, chunks));
    let mut others = Vec::new();
    if matches!(scan.order, Order::Stream | Order::Any) {
        for _ in 0..WRITES_IN_FLIGHT {
            others.push((projection.rebuilder(), admin.get().await?));
        }
    }
    let mut fold = Fold::new((projection.rebuilder(), writer), others, &shadow);
    let mut done = 0u64;
    // The stream of the event folded last (for `Order::Stream`).
    let mut stream: Option<(String, String)> = None;
    let folded: Result<(), ProjectionError> = async {
        while let Some(job) = decoded.recv().await {
            let events = job
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
            for event in events {
                let event = event?;
                let boundary = match scan.order {
                    Order::Stream => {
                        let s = &event.stored;
                        let same = stream
                            .as_ref()
                            .is_some_and(|(t, id)| *t == s.aggregate_type && *id == s.aggregate_id);
                        if !same {
                            stream = Some((s.aggregate_type.clone(), s.aggregate_id.clone()));
                        }
                        !same
                    }
                    Order::Commit | Order::Any => true,
                };
                if boundary && fold.active.0.wants_flush() {
                    fold.flush().await?;
                }
                fold.active.0.fold(&event)?;
                done += 1;
            }
            progress(done, estimate.max(done));
        }
        Ok(())
    }
    .await;
    if let Err(e) = folded {
        reading.abort();
        fold.abort();
        return Err(e);
    }
    let (mut last, read) = (&mut reading)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    debug_assert_eq!(read, done);
    fold.finish().await?;
    let scanned = started.elapsed();
    progress(done, done);
    indexes.build(admin).await?;
    let indexed = started.elapsed();

    // Catch up and swap, holding the checkpoint so live workers wait.
    let mut client = admin.get().await?;
    let tx = client.transaction().await?;
    let name = projection.name();
    crate::feed::checkpoint::lock_projection(&tx, name).await?;
    loop {
        let batch = event_store::read_committed(&tx, last, 1000).await?;
        if batch.is_empty() {
            break;
        }
        let mut decoded = Vec::with_capacity(batch.len());
        for stored in batch {
            last = stored.commit_key();
            decoded.push(std::sync::Arc::new(if personal {
                decode(crypto, &tx, stored).await?
            } else {
                decode_without_personal_data(stored)?
            }));
        }
        done += decoded.len() as u64;
        projection.apply(&tx, &shadow, &decoded).await?;
    }
    let renames = index_renames(&tx, table, &shadow).await?;
    let mut swap = format!(
        "ALTER TABLE {table} RENAME TO {table}_old; \
         ALTER TABLE {shadow} RENAME TO {table}; \
         DROP TABLE {table}_old; \
         {renames} \
         ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY org_isolation ON {table} {policy};",
        policy = crate::read_models::RLS_POLICY
    );
    if !app_role.is_empty() {
        swap.push_str(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {app_role};"
        ));
    }
    tx.batch_execute(&swap).await?;
    set_checkpoint(&tx, name, last).await?;
    tx.commit().await?;
    tracing::info!(
        projection = name,
        events = done,
        prepare_ms = prepared.as_millis() as u64,
        scan_ms = (scanned - prepared).as_millis() as u64,
        index_ms = (indexed - scanned).as_millis() as u64,
        swap_ms = (started.elapsed() - indexed).as_millis() as u64,
        "rebuilt"
    );
    Ok(RebuildReport {
        events: done,
        seconds: started.elapsed().as_secs_f64(),
    })
}
