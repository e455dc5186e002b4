//! The `erasure_receipts` table: persistence of `crm_projections::erasure`, and the
//! auditors' list.

use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::Aggregate;
use crm_domain::contact::{Contact, ContactEvent};
use crm_projections::erasure::{receipt, ErasureReceipt};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{envelope, ListQuery};
use crate::feed::projector::{Projection, ProjectionError, Rebuilder};
use crate::store::decode::DecodedEvent;

pub struct ErasureReceiptsProjection;

const COLUMNS: &str = "org_id, request_id, subject_id, source, requested_by_kind, requested_by, \
    requested_at, erased_at, keys_destroyed, suppressed, tombstone_event_id, \
    tombstone_position, tombstone_hash";

fn from_row(r: &Row) -> ErasureReceipt {
    ErasureReceipt {
        org_id: r.get(0),
        request_id: r.get(1),
        subject_id: r.get(2),
        source: r.get(3),
        requested_by_kind: r.get(4),
        requested_by: r.get(5),
        requested_at: r.get(6),
        erased_at: r.get(7),
        keys_destroyed: r.get(8),
        suppressed: r.get(9),
        tombstone_event_id: r.get(10),
        tombstone_position: r.get(11),
        tombstone_hash: r.get(12),
    }
}

/// The receipt of a tombstone (`None` for every other event).
fn receipt_of(e: &DecodedEvent) -> Result<Option<ErasureReceipt>, ProjectionError> {
    if e.stored.aggregate_type != Contact::TYPE || e.stored.event_type != "ContactErased" {
        return Ok(None);
    }
    let typed: ContactEvent = e.typed()?;
    Ok(receipt(&envelope(e), &typed, &e.metadata, &e.stored.hash))
}

async fn insert(
    client: &impl tokio_postgres::GenericClient,
    table: &str,
    receipts: &[ErasureReceipt],
) -> Result<u64, ProjectionError> {
    let mut written = 0;
    let sql = format!(
        "INSERT INTO {table} ({COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT DO NOTHING"
    );
    let stmt = client.prepare(&sql).await?;
    for r in receipts {
        let values: [&(dyn ToSql + Sync); 13] = [
            &r.org_id,
            &r.request_id,
            &r.subject_id,
            &r.source,
            &r.requested_by_kind,
            &r.requested_by,
            &r.requested_at,
            &r.erased_at,
            &r.keys_destroyed,
            &r.suppressed,
            &r.tombstone_event_id,
            &r.tombstone_position,
            &r.tombstone_hash,
        ];
        written += client.execute(&stmt, &values).await?;
    }
    Ok(written)
}

#[async_trait]
impl Projection for ErasureReceiptsProjection {
    fn name(&self) -> &'static str {
        "erasure_receipts"
    }

    fn table(&self) -> &'static str {
        "erasure_receipts"
    }

    fn reads_type(&self, aggregate_type: &str) -> bool {
        aggregate_type == Contact::TYPE
    }

    fn needs_personal_data(&self) -> bool {
        false
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        table: &str,
        events: &[Arc<DecodedEvent>],
    ) -> Result<(), ProjectionError> {
        let mut receipts = Vec::new();
        for e in events {
            receipts.extend(receipt_of(e)?);
        }
        if !receipts.is_empty() {
            insert(&**tx, table, &receipts).await?;
        }
        Ok(())
    }

    fn rebuilder(&self) -> Box<dyn Rebuilder> {
        Box::new(ReceiptsRebuilder::default())
    }
}

/// The rebuild's fold: a receipt per tombstone, final at once.
#[derive(Default)]
struct ReceiptsRebuilder {
    pending: Vec<ErasureReceipt>,
}

#[async_trait]
impl Rebuilder for ReceiptsRebuilder {
    fn fold(&mut self, event: &DecodedEvent) -> Result<(), ProjectionError> {
        self.pending.extend(receipt_of(event)?);
        Ok(())
    }

    fn wants_flush(&self) -> bool {
        self.pending.len() >= 1024
    }

    async fn flush(
        &mut self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> Result<u64, ProjectionError> {
        let receipts = std::mem::take(&mut self.pending);
        insert(client, table, &receipts).await
    }
}

/// One receipt of an organisation.
pub async fn get(
    client: &impl GenericClient,
    org_id: Uuid,
    request_id: Uuid,
) -> Result<Option<ErasureReceipt>, ProjectionError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM erasure_receipts WHERE org_id = $1 AND request_id = $2"
            ),
            &[&org_id, &request_id],
        )
        .await?;
    Ok(row.as_ref().map(from_row))
}

/// A page of an organisation's receipts, newest first, optionally of one contact.
pub async fn list(
    client: &impl GenericClient,
    org_id: Uuid,
    subject_id: Option<Uuid>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<ErasureReceipt>, ProjectionError> {
    let mut query = ListQuery::new(COLUMNS, "erasure_receipts", &org_id);
    query.and("subject_id", "=", &subject_id);
    query.and("tombstone_position", "<", &before);
    let rows = query
        .page(client, "tombstone_position DESC", &limit)
        .await?;
    Ok(rows.iter().map(from_row).collect())
}
