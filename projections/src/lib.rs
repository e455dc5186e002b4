//! Read-model views and their pure update functions.
//!
//! Each module owns one read model: the view type and `update`, a pure function from the
//! current view and one event to the next view. Persistence (SQL, checkpoints,
//! idempotence) lives in `crm-infra`; nothing here does I/O.

pub mod activity;
pub mod ai_audit;
pub mod consent;
pub mod contacts;
pub mod erasure;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Where an event sits, as a projection needs to know it.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    pub event_id: Uuid,
    pub org_id: Uuid,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub event_type: &'a str,
    pub sequence: i64,
    pub global_position: i64,
    pub recorded_at: DateTime<Utc>,
}
