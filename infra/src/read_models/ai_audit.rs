//! The `ai_audit` table: persistence of the AI audit log
//! (`crm_projections::ai_audit`), one row per AI action, and its queries: the filtered
//! list, one entry, the approval queue and the pending actions past their time.
//!
//! The projection reads no personal data: events reach it undecrypted, so the sealed
//! members it copies (arguments, summaries, reasons) are stored sealed.

use std::sync::Arc;

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use crm_projections::ai_audit::{update, AiAuditEntry, Update, AI_ACTION_STREAM};
use deadpool_postgres::{GenericClient, Transaction};
use uuid::Uuid;

use super::{envelope, ListQuery};
use crate::feed::projector::{Projection, ProjectionError, Rebuilder};
use crate::store::decode::DecodedEvent;

pub struct AiAuditProjection;

/// A row as one JSON object whose members are the columns (first), with the columns a
/// page is ordered and windowed by.
const ROW: &str = "to_jsonb(ai_audit) AS entry, action_id, proposed_at";

fn from_json(v: serde_json::Value) -> Result<AiAuditEntry, ProjectionError> {
    serde_json::from_value(v)
        .map_err(|e| ProjectionError::OutOfOrder(format!("stored AI audit entry unreadable: {e}")))
}

fn rows_to_entries(rows: &[tokio_postgres::Row]) -> Result<Vec<AiAuditEntry>, ProjectionError> {
    rows.iter().map(|r| from_json(r.get(0))).collect()
}

/// The action an event is about, if it is an AI action event.
fn action_id(e: &DecodedEvent) -> Option<Uuid> {
    (e.stored.aggregate_type == AI_ACTION_STREAM)
        .then(|| e.stored.aggregate_id.parse().ok())
        .flatten()
}

/// Folds one event into `entries`; returns the key of the entry it changed.
fn fold_into(
    entries: &mut HashMap<(Uuid, Uuid), AiAuditEntry>,
    event: &DecodedEvent,
) -> Result<Option<(Uuid, Uuid)>, ProjectionError> {
    let Some(id) = action_id(event) else {
        return Ok(None);
    };
    let typed: crm_domain::ai::AiActionEvent = event.typed()?;
    let key = (event.stored.org_id, id);
    let principal = &event.metadata.principal;
    let by = format!(
        "{}:{}",
        serde_json::to_value(principal.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        principal.id
    );
    match update(entries.get(&key), &envelope(event), by, &typed) {
        Update::Changed(v) => {
            entries.insert(key, *v);
            Ok(Some(key))
        }
        Update::AlreadyApplied => Ok(None),
        Update::OutOfOrder { have, got } => Err(ProjectionError::OutOfOrder(format!(
            "AI action {id}: have version {have}, got event {got}"
        ))),
    }
}

/// The statement that writes entries, and its one parameter: the entries as a JSON
/// array of objects whose members are the columns. `replace`: an entry already there
/// is replaced (live); else every entry is new (a rebuild's shadow table, whose keys
/// are built after the load).
fn upsert(
    table: &str,
    entries: &[&AiAuditEntry],
    replace: bool,
) -> Result<(String, serde_json::Value), ProjectionError> {
    let json = serde_json::to_value(entries)
        .map_err(|e| ProjectionError::OutOfOrder(format!("AI audit entry: {e}")))?;
    let insert =
        format!("INSERT INTO {table} SELECT * FROM jsonb_populate_recordset(NULL::{table}, $1)");
    if !replace {
        return Ok((insert, json));
    }
    let sql = format!(
        "{insert} ON CONFLICT (org_id, action_id) DO UPDATE SET \
         kind = EXCLUDED.kind, status = EXCLUDED.status, risk = EXCLUDED.risk, \
         rule = EXCLUDED.rule, contacts = EXCLUDED.contacts, user_id = EXCLUDED.user_id, \
         arguments_sha256 = EXCLUDED.arguments_sha256, content = EXCLUDED.content, \
         steps = EXCLUDED.steps, result_events = EXCLUDED.result_events, \
         failure_reason = EXCLUDED.failure_reason, expires_at = EXCLUDED.expires_at, \
         updated_at = EXCLUDED.updated_at, version = EXCLUDED.version, \
         last_position = EXCLUDED.last_position"
    );
    Ok((sql, json))
}

#[async_trait]
impl Projection for AiAuditProjection {
    fn name(&self) -> &'static str {
        "ai_audit"
    }

    fn table(&self) -> &'static str {
        "ai_audit"
    }

    fn reads_type(&self, aggregate_type: &str) -> bool {
        aggregate_type == AI_ACTION_STREAM
    }

    /// The sealed members are copied as they are: never decrypted here.
    fn needs_personal_data(&self) -> bool {
        false
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        table: &str,
        events: &[Arc<DecodedEvent>],
    ) -> Result<(), ProjectionError> {
        let Some((orgs, ids)) = super::row_keys(events, action_id) else {
            return Ok(());
        };
        // By primary key. No FOR UPDATE: every writer holds the projection's lock.
        let sql = format!(
            "SELECT to_jsonb(t) FROM {table} t \
             WHERE (org_id, action_id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))"
        );
        let stmt = tx.prepare_cached(&sql).await?;
        let mut entries = HashMap::new();
        for row in tx.query(&stmt, &[&orgs, &ids]).await? {
            let e = from_json(row.get(0))?;
            entries.insert((e.org_id, e.action_id), e);
        }
        let mut changed = Vec::new();
        for e in events {
            if let Some(key) = fold_into(&mut entries, e)? {
                if !changed.contains(&key) {
                    changed.push(key);
                }
            }
        }
        let rows: Vec<&AiAuditEntry> = changed.iter().filter_map(|k| entries.get(k)).collect();
        if !rows.is_empty() {
            let (sql, json) = upsert(table, &rows, true)?;
            let stmt = tx.prepare_cached(&sql).await?;
            tx.execute(&stmt, &[&json]).await?;
        }
        Ok(())
    }

    fn rebuilder(&self) -> Box<dyn Rebuilder> {
        Box::new(AiAuditRebuilder::default())
    }
}

/// The aggregate type a rebuild of `ai_audit` reads (the other events change nothing).
pub(crate) const REBUILD_AGGREGATE_TYPE: &str = AI_ACTION_STREAM;

/// The rebuild's fold: handed the action streams one after the other, each whole and in
/// sequence order (`rebuild::Order::Stream`), flushed only between two streams, so
/// every entry it writes is final (as the contacts' rebuild).
#[derive(Default)]
struct AiAuditRebuilder {
    entries: HashMap<(Uuid, Uuid), AiAuditEntry>,
}

#[async_trait]
impl Rebuilder for AiAuditRebuilder {
    fn fold(&mut self, event: &DecodedEvent) -> Result<(), ProjectionError> {
        fold_into(&mut self.entries, event).map(|_| ())
    }

    fn wants_flush(&self) -> bool {
        self.entries.len() >= 1024
    }

    async fn flush(
        &mut self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> Result<u64, ProjectionError> {
        if self.entries.is_empty() {
            return Ok(0);
        }
        let entries: Vec<AiAuditEntry> = self.entries.drain().map(|(_, e)| e).collect();
        let rows: Vec<&AiAuditEntry> = entries.iter().collect();
        let (sql, json) = upsert(table, &rows, false)?;
        Ok(client.execute(&sql, &[&json]).await?)
    }
}

/// Filters of the AI audit log; every one is exact but the time window.
#[derive(Debug, Clone, Default)]
pub struct AiAuditFilter {
    pub agent_id: Option<Uuid>,
    pub risk: Option<String>,
    pub status: Option<String>,
    pub kind: Option<String>,
    /// Actions touching this contact.
    pub contact_id: Option<Uuid>,
    /// Proposed at or after.
    pub since: Option<DateTime<Utc>>,
    /// Proposed before.
    pub until: Option<DateTime<Utc>>,
    /// Keyset pagination: actions before this one (newest first).
    pub before: Option<Uuid>,
    pub limit: i64,
}

/// A `since`/`until` window of at most this many actions is read whole (by the
/// `proposed_at` index) and sorted; a larger one is found by walking newest first.
pub const TIME_WINDOW_CAP: i64 = 5_000;

/// A page of an organisation's AI audit log, newest first.
pub async fn list(
    client: &impl GenericClient,
    org_id: Uuid,
    f: &AiAuditFilter,
) -> Result<Vec<AiAuditEntry>, ProjectionError> {
    let contacts = f.contact_id.map(|c| vec![c]);
    let mut query = ListQuery::new(ROW, "ai_audit", &org_id);
    query.and("agent_id", "=", &f.agent_id);
    query.and("risk", "=", &f.risk);
    query.and("status", "=", &f.status);
    query.and("kind", "=", &f.kind);
    query.and("contacts", "@>", &contacts);
    query.and("proposed_at", ">=", &f.since);
    query.and("proposed_at", "<", &f.until);
    query.and("action_id", "<", &f.before);
    let rows = if f.since.is_some() || f.until.is_some() {
        query
            .window_page(
                client,
                "proposed_at",
                TIME_WINDOW_CAP,
                "action_id DESC",
                &f.limit,
            )
            .await?
    } else {
        query.page(client, "action_id DESC", &f.limit).await?
    };
    rows_to_entries(&rows)
}

/// One entry of an organisation's AI audit log.
pub async fn get(
    client: &impl GenericClient,
    org_id: Uuid,
    action_id: Uuid,
) -> Result<Option<AiAuditEntry>, ProjectionError> {
    let row = client
        .query_opt(
            "SELECT to_jsonb(ai_audit) FROM ai_audit WHERE org_id = $1 AND action_id = $2",
            &[&org_id, &action_id],
        )
        .await?;
    row.map(|r| from_json(r.get(0))).transpose()
}

/// Pending actions of every organisation whose approval time ran out before `now`
/// (organisation, action), oldest first, at most `limit`: what the expiry sweep
/// records. Run with the projection scope (`crm.scope = all`): it crosses
/// organisations.
pub async fn past_their_time(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid)>, ProjectionError> {
    let rows = client
        .query(
            "SELECT org_id, action_id FROM ai_audit \
             WHERE status = 'pending_approval' AND expires_at <= $1 \
             ORDER BY expires_at LIMIT $2",
            &[&now, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Approved actions of every organisation that were not run (`status = approved`)
/// since before `before`: a process stopped between the approval and the run. What
/// the recovery sweep finishes. Run with the projection scope.
pub async fn approved_not_run(
    client: &impl GenericClient,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid)>, ProjectionError> {
    let rows = client
        .query(
            "SELECT org_id, action_id FROM ai_audit \
             WHERE status = 'approved' AND updated_at < $1 \
             ORDER BY updated_at LIMIT $2",
            &[&before, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
