//! SQL of the read models: how each projection persists, and the queries the API runs.

pub mod activity;
pub mod ai_audit;
pub mod consent_log;
pub mod consent_state;
pub mod contacts;
pub mod erasure_receipts;

use std::sync::Arc;

use crm_projections::Envelope;
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::feed::projector::Projection;
use crate::store::decode::DecodedEvent;

/// Every projection this service runs, by name.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(contacts::ContactsProjection),
        Arc::new(activity::ActivityProjection),
        Arc::new(consent_state::ConsentStateProjection),
        Arc::new(consent_log::ConsentLogProjection),
        Arc::new(ai_audit::AiAuditProjection),
        Arc::new(erasure_receipts::ErasureReceiptsProjection),
    ]
}

/// The projection called `name`.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
}

/// A list query built from the filters a request gives: only those appear in the
/// statement, each with its own numbered parameter. A statement that names every
/// possible filter as `($n IS NULL OR column = $n)` is one plan for all of them, and
/// that plan can use no filter's index.
pub(crate) struct ListQuery<'a> {
    sql: String,
    params: Vec<&'a (dyn ToSql + Sync)>,
}

impl<'a> ListQuery<'a> {
    /// `SELECT {columns} FROM {table} WHERE org_id = $1`.
    pub(crate) fn new(columns: &str, table: &str, org_id: &'a uuid::Uuid) -> Self {
        Self {
            sql: format!("SELECT {columns} FROM {table} WHERE org_id = $1"),
            params: vec![org_id],
        }
    }

    /// Adds `AND {column} {op} $n` when `value` is given.
    pub(crate) fn and<T: ToSql + Sync>(&mut self, column: &str, op: &str, value: &'a Option<T>) {
        if let Some(v) = value {
            self.params.push(v);
            self.sql
                .push_str(&format!(" AND {column} {op} ${}", self.params.len()));
        }
    }

    /// Like [`Self::page`], for a filter on a range (`window`: an indexed column) whose
    /// rows the index of `order` cannot find: the rows of the range are read in
    /// `window` order up to `cap`, then sorted. That costs at most `cap` rows however
    /// large the table, where walking the `order` index past every row outside the
    /// range grows with it (the planner cannot know where in that order the range's
    /// rows lie). A range of more than `cap` rows runs the plain query: the walk finds
    /// a page soon when the range reaches the newest rows, and reads past every newer
    /// row when it ends far behind them (the one case whose cost still grows with the
    /// table). Exact either way.
    pub(crate) async fn window_page(
        self,
        client: &impl GenericClient,
        window: &str,
        cap: i64,
        order: &str,
        limit: &'a i64,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let n = self.params.len();
        let sql = format!(
            "WITH w AS MATERIALIZED ({} ORDER BY {window} LIMIT {}) \
             SELECT *, (SELECT count(*) FROM w) FROM w ORDER BY {order} LIMIT ${}",
            self.sql,
            cap + 1,
            n + 1
        );
        let mut params = self.params.clone();
        params.push(limit);
        let rows = client.query(&sql, &params).await?;
        let in_window: i64 = rows.first().map_or(0, |r| r.get(r.len() - 1));
        if in_window <= cap {
            return Ok(rows);
        }
        self.page(client, order, limit).await
    }

    /// Ends the statement with `ORDER BY {order} LIMIT $n` and runs it.
    pub(crate) async fn page(
        mut self,
        client: &impl GenericClient,
        order: &str,
        limit: &'a i64,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        self.params.push(limit);
        self.sql
            .push_str(&format!(" ORDER BY {order} LIMIT ${}", self.params.len()));
        client.query(&self.sql, &self.params).await
    }
}

/// The rows a batch of events touches, by primary key (organisation, `row_of` the
/// event), each once, as two arrays for `unnest`; `None` when it touches none. A
/// projection reads these rows, folds the events into them and writes them back.
pub(crate) fn row_keys(
    events: &[Arc<DecodedEvent>],
    row_of: impl Fn(&DecodedEvent) -> Option<uuid::Uuid>,
) -> Option<(Vec<uuid::Uuid>, Vec<uuid::Uuid>)> {
    let mut keys: Vec<(uuid::Uuid, uuid::Uuid)> = events
        .iter()
        .filter_map(|e| row_of(e.as_ref()).map(|id| (e.stored.org_id, id)))
        .collect();
    keys.sort();
    keys.dedup();
    (!keys.is_empty()).then(|| keys.into_iter().unzip())
}

pub(crate) fn envelope(e: &DecodedEvent) -> Envelope<'_> {
    Envelope {
        event_id: e.stored.event_id,
        org_id: e.stored.org_id,
        aggregate_type: &e.stored.aggregate_type,
        aggregate_id: &e.stored.aggregate_id,
        event_type: &e.stored.event_type,
        sequence: e.stored.sequence,
        global_position: e.stored.global_position,
        recorded_at: e.stored.recorded_at,
    }
}

/// The row-level security policy every read-model table carries (migration V4 and
/// every rebuild's swap): a row is visible only inside a transaction that named its
/// organisation ([`org_scope`]) or to projection work (`checkpoint::lock_projection`
/// sets `crm.scope = all` for its transaction). Nothing set: nothing visible.
pub const RLS_POLICY: &str = "USING ((SELECT current_setting('crm.scope', true)) = 'all' \
     OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid))";

/// A read-only transaction that sees `org_id`'s read-model rows and no other's: the
/// second wall behind every query's own `org_id = $1`.
pub async fn org_scope(
    client: &mut deadpool_postgres::Object,
    org_id: uuid::Uuid,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    let tx = client.build_transaction().read_only(true).start().await?;
    // One round trip of the simple protocol (a Uuid prints as hex digits and dashes).
    tx.batch_execute(&format!(
        "SELECT set_config('crm.org_id', '{org_id}', true)"
    ))
    .await?;
    Ok(tx)
}

/// How a transaction of [`pipelined_in_org`] begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read only, as [`org_scope`].
    Read,
    /// Writes whose commit does not wait for its WAL flush (`synchronous_commit = off`
    /// for this transaction only): for rows that can always be derived again.
    UnflushedWrite,
}

/// A transaction that sees every organisation's rows through row-level security
/// (`crm.scope = all`): for the service's own sweeps and fan-out, never for a caller's
/// request. `read_only` for those that only read.
pub async fn all_orgs_scope(
    client: &mut deadpool_postgres::Object,
    read_only: bool,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    let tx = client
        .build_transaction()
        .read_only(read_only)
        .start()
        .await?;
    tx.batch_execute("SELECT set_config('crm.scope', 'all', true)")
        .await?;
    Ok(tx)
}

/// The `BEGIN` and naming of `org_id` that [`pipelined_in_org`] sends first (simple
/// protocol: a Uuid prints as hex digits and dashes, nothing to quote).
pub fn begin_in_org(org_id: uuid::Uuid, scope: Scope) -> String {
    match scope {
        Scope::Read => {
            format!("BEGIN READ ONLY; SELECT set_config('crm.org_id', '{org_id}', true)")
        }
        Scope::UnflushedWrite => format!(
            "BEGIN; SELECT set_config('crm.org_id', '{org_id}', true), \
             set_config('synchronous_commit', 'off', true)"
        ),
    }
}

/// One statement in a transaction of its own that names `org_id` (as [`org_scope`]),
/// in one round trip instead of four: the start, the statement and the commit are sent
/// together (pipelined) and answered together. Takes a pooled connection, never a
/// transaction: its own `BEGIN` and `COMMIT` must not land in a caller's. All three are
/// queued on the connection before any answer is awaited, so a caller that stops
/// waiting still leaves the connection outside a transaction (after a failed statement
/// the `COMMIT` rolls back).
pub async fn pipelined_in_org(
    client: &deadpool_postgres::Object,
    org_id: uuid::Uuid,
    scope: Scope,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let begin = begin_in_org(org_id, scope);
    let (_, rows, _) = futures::try_join!(
        client.batch_execute(&begin),
        client.query(statement, params),
        client.batch_execute("COMMIT"),
    )?;
    Ok(rows)
}
