//! The `consent_log` table: persistence of the ConsentLog
//! (`crm_projections::consent::log_entry`), one row per consent event, and its list.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use crm_domain::consent::ledger::ConsentEvent;
use crm_projections::consent::{log_entry, ConsentLogEntry, CONSENT_STREAM, CONTACT_STREAM};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Transaction;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;
use uuid::Uuid;

use super::{envelope, ListQuery};
use crate::feed::projector::{Projection, ProjectionError, Rebuilder};
use crate::store::decode::DecodedEvent;

pub struct ConsentLogProjection;

const COLUMNS: &str = "org_id, event_id, global_position, contact_id, action, channel, purpose, \
    status, contact_point, lawful_basis, source, notice_id, notice_version, notice_sha256, \
    language, jurisdiction, expires_at, import_id, actor_kind, actor_id, occurred_at, \
    recorded_at, ip, user_agent, event_hash";

/// The column types of [`COLUMNS`], in order (for `COPY … (FORMAT binary)`).
const TYPES: [Type; 25] = [
    Type::UUID,
    Type::UUID,
    Type::INT8,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

fn from_row(r: &Row) -> ConsentLogEntry {
    ConsentLogEntry {
        org_id: r.get(0),
        event_id: r.get(1),
        global_position: r.get(2),
        contact_id: r.get(3),
        action: r.get(4),
        channel: r.get(5),
        purpose: r.get(6),
        status: r.get(7),
        contact_point: r.get(8),
        lawful_basis: r.get(9),
        source: r.get(10),
        notice_id: r.get(11),
        notice_version: r.get(12),
        notice_sha256: r.get(13),
        language: r.get(14),
        jurisdiction: r.get(15),
        expires_at: r.get(16),
        import_id: r.get(17),
        actor_kind: r.get(18),
        actor_id: r.get(19),
        occurred_at: r.get(20),
        recorded_at: r.get(21),
        ip: r.get(22),
        user_agent: r.get(23),
        event_hash: r.get(24),
    }
}

/// The values of one entry, in [`COLUMNS`] order.
fn values(e: &ConsentLogEntry) -> [&(dyn ToSql + Sync); 25] {
    [
        &e.org_id,
        &e.event_id,
        &e.global_position,
        &e.contact_id,
        &e.action,
        &e.channel,
        &e.purpose,
        &e.status,
        &e.contact_point,
        &e.lawful_basis,
        &e.source,
        &e.notice_id,
        &e.notice_version,
        &e.notice_sha256,
        &e.language,
        &e.jurisdiction,
        &e.expires_at,
        &e.import_id,
        &e.actor_kind,
        &e.actor_id,
        &e.occurred_at,
        &e.recorded_at,
        &e.ip,
        &e.user_agent,
        &e.event_hash,
    ]
}

/// The entry of a consent event (`None` for events of other streams).
fn entry_of(e: &DecodedEvent) -> Result<Option<ConsentLogEntry>, ProjectionError> {
    if e.stored.aggregate_type != CONSENT_STREAM {
        return Ok(None);
    }
    let typed: ConsentEvent = e.typed()?;
    Ok(Some(log_entry(
        &envelope(e),
        &typed,
        &e.metadata,
        &e.stored.hash,
    )))
}

#[async_trait]
impl Projection for ConsentLogProjection {
    fn name(&self) -> &'static str {
        "consent_log"
    }

    fn table(&self) -> &'static str {
        "consent_log"
    }

    fn reads_type(&self, aggregate_type: &str) -> bool {
        // Contact streams for their erasures' tombstones only.
        aggregate_type == CONSENT_STREAM || aggregate_type == CONTACT_STREAM
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        table: &str,
        events: &[Arc<DecodedEvent>],
    ) -> Result<(), ProjectionError> {
        let mut entries = Vec::new();
        for e in events {
            entries.extend(entry_of(e)?);
        }
        insert(tx, table, &entries).await?;
        // An erasure purges the contact's entries of what was personal in them (a
        // rebuild reads them as null already: their key is gone).
        let erased: Vec<(Uuid, Uuid)> = events
            .iter()
            .filter(|e| {
                e.stored.aggregate_type == CONTACT_STREAM && e.stored.event_type == "ContactErased"
            })
            .filter_map(|e| Some((e.stored.org_id, e.stored.aggregate_id.parse().ok()?)))
            .collect();
        if !erased.is_empty() {
            let (orgs, ids): (Vec<Uuid>, Vec<Uuid>) = erased.into_iter().unzip();
            let sql = format!(
                "UPDATE {table} SET contact_point = NULL, ip = NULL, user_agent = NULL \
                 WHERE (org_id, contact_id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))"
            );
            tx.execute(&sql, &[&orgs, &ids]).await?;
        }
        Ok(())
    }

    fn rebuilder(&self) -> Box<dyn Rebuilder> {
        Box::new(ConsentLogRebuilder::default())
    }
}

/// Inserts entries with one statement.
async fn insert(
    tx: &Transaction<'_>,
    table: &str,
    entries: &[ConsentLogEntry],
) -> Result<(), ProjectionError> {
    {
        if entries.is_empty() {
            return Ok(());
        }
        let uuids = |f: fn(&ConsentLogEntry) -> Uuid| entries.iter().map(f).collect::<Vec<_>>();
        let text = |f: fn(&ConsentLogEntry) -> &str| entries.iter().map(f).collect::<Vec<_>>();
        let opt =
            |f: fn(&ConsentLogEntry) -> Option<&str>| entries.iter().map(f).collect::<Vec<_>>();
        let times =
            |f: fn(&ConsentLogEntry) -> DateTime<Utc>| entries.iter().map(f).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO {table} ({COLUMNS}) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::uuid[], $5::text[], \
               $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
               $12::text[], $13::text[], $14::text[], $15::text[], $16::text[], \
               $17::timestamptz[], $18::uuid[], $19::text[], $20::text[], $21::timestamptz[], \
               $22::timestamptz[], $23::text[], $24::text[], $25::text[]) \
             ON CONFLICT DO NOTHING"
        );
        let stmt = tx.prepare_cached(&sql).await?;
        tx.execute(
            &stmt,
            &[
                &uuids(|e| e.org_id),
                &uuids(|e| e.event_id),
                &entries
                    .iter()
                    .map(|e| e.global_position)
                    .collect::<Vec<_>>(),
                &uuids(|e| e.contact_id),
                &text(|e| &e.action),
                &opt(|e| e.channel.as_deref()),
                &opt(|e| e.purpose.as_deref()),
                &opt(|e| e.status.as_deref()),
                &opt(|e| e.contact_point.as_deref()),
                &opt(|e| e.lawful_basis.as_deref()),
                &opt(|e| e.source.as_deref()),
                &opt(|e| e.notice_id.as_deref()),
                &opt(|e| e.notice_version.as_deref()),
                &opt(|e| e.notice_sha256.as_deref()),
                &opt(|e| e.language.as_deref()),
                &opt(|e| e.jurisdiction.as_deref()),
                &entries.iter().map(|e| e.expires_at).collect::<Vec<_>>(),
                &entries.iter().map(|e| e.import_id).collect::<Vec<_>>(),
                &text(|e| &e.actor_kind),
                &text(|e| &e.actor_id),
                &times(|e| e.occurred_at),
                &times(|e| e.recorded_at),
                &opt(|e| e.ip.as_deref()),
                &opt(|e| e.user_agent.as_deref()),
                &text(|e| &e.event_hash),
            ],
        )
        .await?;
        Ok(())
    }
}

/// The rebuild's fold: one entry per consent event, final at once, written in batches
/// while the scan goes on.
#[derive(Default)]
struct ConsentLogRebuilder {
    pending: Vec<ConsentLogEntry>,
}

#[async_trait]
impl Rebuilder for ConsentLogRebuilder {
    fn fold(&mut self, event: &DecodedEvent) -> Result<(), ProjectionError> {
        self.pending.extend(entry_of(event)?);
        Ok(())
    }

    fn wants_flush(&self) -> bool {
        self.pending.len() >= 8192
    }

    async fn flush(
        &mut self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> Result<u64, ProjectionError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let sink = client
            .copy_in(&format!(
                "COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &TYPES);
        pin_mut!(writer);
        for e in self.pending.drain(..) {
            writer.as_mut().write(&values(&e)).await?;
        }
        Ok(writer.finish().await?)
    }
}

/// Filters of the ConsentLog; every one is exact but the time window.
#[derive(Debug, Clone, Default)]
pub struct ConsentLogFilter {
    pub contact_id: Option<Uuid>,
    pub channel: Option<String>,
    pub purpose: Option<String>,
    pub source: Option<String>,
    /// `occurred_at` at or after.
    pub since: Option<DateTime<Utc>>,
    /// `occurred_at` before.
    pub until: Option<DateTime<Utc>>,
    /// Keyset pagination: entries before this global position (newest first).
    pub before: Option<i64>,
    pub limit: i64,
}

/// A `since`/`until` window of at most this many entries is read whole (by the
/// `occurred_at` index) and sorted; a larger one is found by walking the log newest
/// first (see [`ListQuery::window_page`]).
pub const TIME_WINDOW_CAP: i64 = 5_000;

/// A page of an organisation's ConsentLog, newest first. The statement names only the
/// filters given; each has an index in this order (migration V9).
pub async fn list(
    client: &impl GenericClient,
    org_id: Uuid,
    f: &ConsentLogFilter,
) -> Result<Vec<ConsentLogEntry>, ProjectionError> {
    let mut query = ListQuery::new(COLUMNS, "consent_log", &org_id);
    query.and("contact_id", "=", &f.contact_id);
    query.and("channel", "=", &f.channel);
    query.and("purpose", "=", &f.purpose);
    query.and("source", "=", &f.source);
    query.and("occurred_at", ">=", &f.since);
    query.and("occurred_at", "<", &f.until);
    query.and("global_position", "<", &f.before);
    let rows = if f.since.is_some() || f.until.is_some() {
        query
            .window_page(
                client,
                "occurred_at",
                TIME_WINDOW_CAP,
                "global_position DESC",
                &f.limit,
            )
            .await?
    } else {
        query.page(client, "global_position DESC", &f.limit).await?
    };
    Ok(rows.iter().map(from_row).collect())
}
