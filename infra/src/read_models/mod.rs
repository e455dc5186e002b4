//! SQL of the read models: how each projection persists, and the queries the API runs.

pub mod activity;
pub mod contacts;

use std::sync::Arc;

use crm_projections::Envelope;

use crate::commands::DecodedEvent;
use crate::projector::Projection;

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
