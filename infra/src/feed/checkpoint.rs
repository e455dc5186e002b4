//! Checkpoints: how far the relay and each projection have got, as commit keys.

use deadpool_postgres::GenericClient;

use crate::store::event_store::CommitKey;

/// Which process a checkpoint belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Owner {
    Relay,
    Projection,
}

impl Owner {
    fn table(self) -> &'static str {
        match self {
            Self::Relay => "relay_checkpoints",
            Self::Projection => "projection_checkpoints",
        }
    }
}

/// The checkpoint called `name` (zero when there is none yet).
pub async fn read(
    client: &impl GenericClient,
    owner: Owner,
    name: &str,
) -> Result<CommitKey, tokio_postgres::Error> {
    let sql = format!(
        "SELECT tx_id::text::bigint, global_position FROM {} WHERE name = $1",
        owner.table()
    );
    let stmt = client.prepare_cached(&sql).await?;
    let row = client.query_opt(&stmt, &[&name]).await?;
    Ok(row.map_or(CommitKey::default(), |r| CommitKey {
        tx_id: r.get(0),
        position: r.get(1),
    }))
}

/// Sets the checkpoint called `name` (inside the caller's transaction, if any).
pub async fn write(
    client: &impl GenericClient,
    owner: Owner,
    name: &str,
    key: CommitKey,
) -> Result<(), tokio_postgres::Error> {
    let sql = format!(
        "INSERT INTO {} (name, tx_id, global_position) VALUES ($1, $2::bigint::text::xid8, $3) \
         ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, \
         global_position = EXCLUDED.global_position, updated_at = now()",
        owner.table()
    );
    let stmt = client.prepare_cached(&sql).await?;
    client
        .execute(&stmt, &[&name, &key.tx_id, &key.position])
        .await?;
    Ok(())
}

/// Sets the relay's checkpoint without waiting for the WAL flush (one round trip).
///
/// Safe because a lost checkpoint only makes the relay publish again what JetStream
/// then drops as duplicates (`Nats-Msg-Id` = event id); and the relay does not wait on
/// a disk flush between batches.
pub async fn write_relay_async(
    client: &impl GenericClient,
    name: &str,
    key: CommitKey,
) -> Result<(), tokio_postgres::Error> {
    // One simple query: PostgreSQL runs its statements as one implicit transaction
    // (rolled back whole on error, leaving the session clean), in one round trip. The
    // values are integers and an escaped name, so formatting them in is safe.
    let name = name.replace('\'', "''");
    client
        .batch_execute(&format!(
            "SET LOCAL synchronous_commit = off; \
             INSERT INTO relay_checkpoints (name, tx_id, global_position) \
             VALUES ('{name}', '{}'::xid8, {}) \
             ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, \
             global_position = EXCLUDED.global_position, updated_at = now()",
            key.tx_id, key.position
        ))
        .await
}

/// The statement that takes the locks of projections `names` (in name order) for the
/// rest of the caller's transaction, as [`lock_projection`] does for one: the same lock
/// keys, taken left to right in one target list; with the same settings.
///
/// A statement of its own: the checkpoints must be read by a later statement, whose
/// snapshot is taken once the locks are held (one taken by the same statement would
/// read a snapshot from before a lock wait, and miss what the holder committed).
pub fn lock_projections_sql(names: usize) -> String {
    let locks: Vec<String> = (1..=names)
        .map(|i| format!("pg_advisory_xact_lock(hashtext('crm-projection:' || ${i}))"))
        .collect();
    format!(
        "SELECT {}, set_config('crm.scope', 'all', true), \
         set_config('synchronous_commit', 'off', true)",
        locks.join(", ")
    )
}

/// Each of projections `names`' checkpoint (zero when there is none yet), and the commit
/// keys after each distinct checkpoint up to `($2, $3)`, at most `$4` of them.
///
/// Rows `(i, tx, pos, NULL, NULL)`: projection `i` (the 1-based index into `$1`) stands
/// at `(tx, pos)`. Rows `(0, tx, pos, key_tx, key_pos)`: a key that follows checkpoint
/// `(tx, pos)`. Projections that stand at the same checkpoint (in steady state all of
/// them: their checkpoints move together) share its keys, read from the events' commit
/// order index once, not once each. Ordered by `i`, then checkpoint, then key: every
/// checkpoint's keys come first, in commit order.
pub const PROGRESS_SQL: &str = "\
    WITH c AS ( \
        SELECT u.i::int AS i, coalesce(c.tx_id, '0'::xid8) AS tx, \
               coalesce(c.global_position, 0) AS pos \
        FROM unnest($1::text[]) WITH ORDINALITY AS u (name, i) \
        LEFT JOIN projection_checkpoints c ON c.name = u.name) \
    SELECT c.i, c.tx::text::bigint, c.pos, NULL::bigint, NULL::bigint FROM c \
    UNION ALL \
    SELECT 0, d.tx::text::bigint, d.pos, k.tx, k.pos \
    FROM (SELECT DISTINCT tx, pos FROM c) d \
    CROSS JOIN LATERAL ( \
        SELECT e.tx_id::text::bigint AS tx, e.global_position AS pos FROM events e \
        WHERE (e.tx_id, e.global_position) > (d.tx, d.pos) \
          AND (e.tx_id, e.global_position) <= ($2::bigint::text::xid8, $3) \
        ORDER BY e.tx_id, e.global_position LIMIT $4) k \
    ORDER BY 1, 2, 3, 4, 5";

/// Sets the checkpoints of several projections in one statement (inside the caller's
/// transaction).
pub async fn write_projections(
    client: &impl GenericClient,
    checkpoints: &[(&str, CommitKey)],
) -> Result<(), tokio_postgres::Error> {
    if checkpoints.is_empty() {
        return Ok(());
    }
    let stmt = client
        .prepare_cached(
            "INSERT INTO projection_checkpoints (name, tx_id, global_position) \
             SELECT n, t::text::xid8, p FROM unnest($1::text[], $2::bigint[], $3::bigint[]) \
                 AS u (n, t, p) \
             ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, \
             global_position = EXCLUDED.global_position, updated_at = now()",
        )
        .await?;
    let names: Vec<&str> = checkpoints.iter().map(|(n, _)| *n).collect();
    let txs: Vec<i64> = checkpoints.iter().map(|(_, k)| k.tx_id).collect();
    let positions: Vec<i64> = checkpoints.iter().map(|(_, k)| k.position).collect();
    client.execute(&stmt, &[&names, &txs, &positions]).await?;
    Ok(())
}

/// Takes the projection's lock for the rest of the caller's transaction and reads its
/// checkpoint: other workers of the projection (and a rebuild's swap) wait for it.
///
/// The lock is a transaction-level advisory lock, not a row lock: it takes no
/// transaction id, so a worker's transaction only gets one when it writes, at its very
/// end. A transaction id held for the whole batch would hold back the relay's
/// visibility horizon, and with it every event committed meanwhile.
pub async fn lock_projection(
    tx: &deadpool_postgres::Transaction<'_>,
    name: &str,
) -> Result<CommitKey, tokio_postgres::Error> {
    let key = format!("crm-projection:{name}");
    // Projection work spans organisations: the same statement lets this transaction
    // see every organisation's read-model rows (row-level security, see
    // `read_models::RLS_POLICY`), without a round trip of its own.
    // Its commit does not wait for the WAL flush (`synchronous_commit = off`, this
    // transaction only): a read model and its checkpoint commit together and are
    // derived from the events, so a commit lost in a database crash is applied again
    // from the store (catch-up, or the gap check of the next batch). Not waiting keeps
    // the transaction, whose id holds back the relay's visibility horizon, short.
    let stmt = tx
        .prepare_cached(
            "SELECT pg_advisory_xact_lock(hashtext($1)), set_config('crm.scope', 'all', true), \
             set_config('synchronous_commit', 'off', true)",
        )
        .await?;
    tx.execute(&stmt, &[&key]).await?;
    read(tx, Owner::Projection, name).await
}
