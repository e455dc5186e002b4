//! Rebuilding a read model from the event store (never from NATS).
//!
//! The projection is folded in memory from every committed event, in commit order, and
//! written in bulk into a shadow table. Then, in one transaction that holds the
//! projection's checkpoint row (so live workers pause), the shadow catches up with
//! whatever committed meanwhile, is swapped in by rename, and the checkpoint is moved
//! to the last event it reflects. Queries keep reading the old table until the swap.

use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::Pool;
use futures::{pin_mut, TryStreamExt};

use crate::commands::{decode, decode_cached, CachedDecode};
use crate::crypto::Crypto;
use crate::event_store::{self, from_row, CommitKey, COLUMNS};
use crate::projector::{set_checkpoint, Projection, ProjectionError};

/// Rows parsed and decrypted together, on every core.
const CHUNK: usize = 4096;

/// Parses and decrypts rows in parallel (cached keys only), keeping their order.
fn decode_chunk(crypto: &Crypto, rows: Vec<tokio_postgres::Row>) -> Vec<CachedDecode> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let per = rows.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|row| decode_cached(crypto, from_row(row)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("decoding does not panic"))
            .collect()
    })
}

#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub events: u64,
    pub seconds: f64,
}

/// Rebuilds `projection`; `progress(done, total)` is called as events are folded.
pub async fn rebuild(
    admin: &Pool,
    crypto: &Crypto,
    projection: Arc<dyn Projection>,
    app_role: &str,
    progress: impl Fn(u64, u64),
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let table = projection.table();
    let shadow = format!("{table}_rebuild");
    let reader = admin.get().await?;
    let writer = admin.get().await?;
    writer
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {shadow}; CREATE TABLE {shadow} (LIKE {table} INCLUDING ALL)"
        ))
        .await?;
    crypto
        .preload(&writer)
        .await
        .map_err(event_store::StoreError::from)?;

    let total: i64 = reader
        .query_one(
            "SELECT count(*) FROM events WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())",
            &[],
        )
        .await?
        .get(0);
    // One snapshot for the whole scan: the horizon is taken once, at its start.
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY tx_id, global_position"
    );
    let rows = reader.query_raw(&sql, Vec::<i64>::new()).await?;
    pin_mut!(rows);
    let mut fold = projection.rebuilder();
    let mut last = CommitKey::default();
    let mut done = 0u64;
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        let row = rows.try_next().await?;
        let end = row.is_none();
        if let Some(row) = row {
            chunk.push(row);
        }
        if chunk.len() < CHUNK && !end {
            continue;
        }
        for decoded in decode_chunk(crypto, std::mem::take(&mut chunk)) {
            let decoded = match decoded {
                CachedDecode::Decoded(d) => d?,
                // A key created after the preload, or destroyed: the full path knows.
                CachedDecode::NeedsKey(stored) => decode(crypto, &writer, *stored).await?,
            };
            last = decoded.stored.commit_key();
            fold.fold(&decoded)?;
            done += 1;
            if fold.wants_flush() {
                fold.flush(&writer, &shadow).await?;
            }
        }
        progress(done, total.max(done as i64) as u64);
        if end {
            break;
        }
    }
    reader.batch_execute("COMMIT").await?;
    let scanned = started.elapsed();
    fold.flush(&writer, &shadow).await?;
    let flushed = started.elapsed();
    progress(done, done.max(total as u64));

    // Catch up and swap, holding the checkpoint so live workers wait.
    let mut client = admin.get().await?;
    let tx = client.transaction().await?;
    let name = projection.name();
    crate::checkpoint::lock_projection(&tx, name).await?;
    loop {
        let batch = event_store::read_committed(&tx, last, 1000).await?;
        if batch.is_empty() {
            break;
        }
        let mut decoded = Vec::with_capacity(batch.len());
        for stored in batch {
            last = stored.commit_key();
            decoded.push(decode(crypto, &tx, stored).await?);
        }
        done += decoded.len() as u64;
        projection.apply(&tx, &shadow, &decoded).await?;
    }
    let mut swap = format!(
        "ALTER TABLE {table} RENAME TO {table}_old; \
         ALTER TABLE {shadow} RENAME TO {table}; \
         DROP TABLE {table}_old;"
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
        scan_ms = scanned.as_millis() as u64,
        write_ms = (flushed - scanned).as_millis() as u64,
        swap_ms = (started.elapsed() - flushed).as_millis() as u64,
        "rebuilt"
    );
    Ok(RebuildReport {
        events: done,
        seconds: started.elapsed().as_secs_f64(),
    })
}
