//! The `activity` table: persistence of `crm_projections::activity`.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use crm_projections::activity::{entry, ActivityEntry};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Transaction;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{envelope, ListQuery};
use crate::feed::projector::{Projection, ProjectionError, Rebuilder};
use crate::store::decode::DecodedEvent;

pub struct ActivityProjection;

const COLUMNS: &str = "org_id, event_id, global_position, occurred_at, recorded_at, actor_kind, \
    actor_id, action, entity_type, entity_id, request_id, correlation_id";

fn from_row(r: &Row) -> ActivityEntry {
    ActivityEntry {
        org_id: r.get(0),
        event_id: r.get(1),
        global_position: r.get(2),
        occurred_at: r.get(3),
        recorded_at: r.get(4),
        actor_kind: r.get(5),
        actor_id: r.get(6),
        action: r.get(7),
        entity_type: r.get(8),
        entity_id: r.get(9),
        request_id: r.get(10),
        correlation_id: r.get(11),
    }
}

#[async_trait]
impl Projection for ActivityProjection {
    fn name(&self) -> &'static str {
        "activity"
    }

    fn table(&self) -> &'static str {
        "activity"
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        table: &str,
        events: &[Arc<DecodedEvent>],
    ) -> Result<(), ProjectionError> {
        let entries: Vec<ActivityEntry> = events
            .iter()
            .map(|e| entry(&envelope(e), &e.metadata))
            .collect();
        let col = |f: fn(&ActivityEntry) -> String| entries.iter().map(f).collect::<Vec<_>>();
        let opt =
            |f: fn(&ActivityEntry) -> Option<String>| entries.iter().map(f).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO {table} ({COLUMNS}) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::timestamptz[], \
               $5::timestamptz[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
               $11::text[], $12::text[]) \
             ON CONFLICT DO NOTHING"
        );
        let stmt = tx.prepare_cached(&sql).await?;
        tx.execute(
            &stmt,
            &[
                &entries.iter().map(|e| e.org_id).collect::<Vec<_>>(),
                &entries.iter().map(|e| e.event_id).collect::<Vec<_>>(),
                &entries
                    .iter()
                    .map(|e| e.global_position)
                    .collect::<Vec<_>>(),
                &entries.iter().map(|e| e.occurred_at).collect::<Vec<_>>(),
                &entries.iter().map(|e| e.recorded_at).collect::<Vec<_>>(),
                &col(|e| e.actor_kind.clone()),
                &col(|e| e.actor_id.clone()),
                &col(|e| e.action.clone()),
                &col(|e| e.entity_type.clone()),
                &col(|e| e.entity_id.clone()),
                &opt(|e| e.request_id.clone()),
                &opt(|e| e.correlation_id.clone()),
            ],
        )
        .await?;
        Ok(())
    }

    fn rebuilder(&self) -> Box<dyn Rebuilder> {
        Box::new(ActivityRebuilder::default())
    }

    fn needs_personal_data(&self) -> bool {
        false
    }

    fn reads_payload(&self) -> bool {
        false
    }
}

/// The rebuild's fold: one entry per event, final at once, so the events may come in
/// any order and are written in batches while the scan goes on.
#[derive(Default)]
struct ActivityRebuilder {
    pending: Vec<ActivityEntry>,
}

#[async_trait]
impl Rebuilder for ActivityRebuilder {
    fn fold(&mut self, event: &DecodedEvent) -> Result<(), ProjectionError> {
        self.pending.push(entry(&envelope(event), &event.metadata));
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
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::UUID,
                Type::UUID,
                Type::INT8,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
            ],
        );
        pin_mut!(writer);
        for e in self.pending.drain(..) {
            writer
                .as_mut()
                .write(&[
                    &e.org_id,
                    &e.event_id,
                    &e.global_position,
                    &e.occurred_at,
                    &e.recorded_at,
                    &e.actor_kind,
                    &e.actor_id,
                    &e.action,
                    &e.entity_type,
                    &e.entity_id,
                    &e.request_id,
                    &e.correlation_id,
                ])
                .await?;
        }
        Ok(writer.finish().await?)
    }
}

/// Filters of the activity log.
#[derive(Debug, Clone, Default)]
pub struct ActivityFilter {
    pub actor_id: Option<String>,
    pub action: Option<String>,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Keyset pagination: entries before this global position (newest first).
    pub before: Option<i64>,
    pub limit: i64,
    /// The most entries of a `since`/`until` window read whole (default
    /// [`TIME_WINDOW_CAP`]); tests set it low to compare both ways of answering.
    pub time_window_cap: Option<i64>,
}

/// A `since`/`until` window of at most this many entries is read whole (by the
/// `occurred_at` index) and sorted; a larger one is found by walking the log newest
/// first (see [`ListQuery::window_page`]).
pub const TIME_WINDOW_CAP: i64 = 5_000;

/// A page of an organisation's activity, newest first. The statement names only the
/// filters given; each documented filter has an index in this order (migration V5).
pub async fn list(
    client: &impl GenericClient,
    org_id: Uuid,
    f: &ActivityFilter,
) -> Result<Vec<ActivityEntry>, ProjectionError> {
    let mut query = ListQuery::new(COLUMNS, "activity", &org_id);
    query.and("actor_id", "=", &f.actor_id);
    query.and("action", "=", &f.action);
    query.and("entity_type", "=", &f.entity_type);
    query.and("entity_id", "=", &f.entity_id);
    query.and("occurred_at", ">=", &f.since);
    query.and("occurred_at", "<", &f.until);
    query.and("global_position", "<", &f.before);
    let rows = if f.since.is_some() || f.until.is_some() {
        query
            .window_page(
                client,
                "occurred_at",
                f.time_window_cap.unwrap_or(TIME_WINDOW_CAP),
                "global_position DESC",
                &f.limit,
            )
            .await?
    } else {
        query.page(client, "global_position DESC", &f.limit).await?
    };
    Ok(rows.iter().map(from_row).collect())
}

/// A page of the entries about any of `entity_ids` (a contact, its messages, the AI
/// actions that touched it), newest first: one probe of the entity index per id.
pub async fn of_entities(
    client: &impl GenericClient,
    org_id: Uuid,
    entity_ids: &[String],
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<ActivityEntry>, ProjectionError> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM activity WHERE org_id = $1 AND entity_id = ANY($2) \
                 AND ($3::int8 IS NULL OR global_position < $3) \
                 ORDER BY global_position DESC LIMIT $4"
            ),
            &[&org_id, &entity_ids, &before, &limit],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}
