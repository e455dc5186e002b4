//! SQL of the read models: how each projection persists, and the queries the API runs.

pub mod activity;
pub mod contacts;

use std::sync::Arc;

use crm_projections::Envelope;

use crate::feed::projector::Projection;
use crate::store::decode::DecodedEvent;

/// Every projection this service runs, by name.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(contacts::ContactsProjection),
        Arc::new(activity::ActivityProjection),
    ]
}

/// The projection called `name`.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
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
