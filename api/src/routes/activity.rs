//! `GET /v1/activity`: the organisation's activity log, newest first.

use crm_infra::read_models::activity::{self as activity_rm, ActivityFilter};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::schemas::Time;
use super::{consistency, parse_limit, Authed};
use crate::edge::extract::Query;
use crate::edge::reply::Ok200;
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /v1/activity` parameters; every filter is exact.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ActivityQuery {
    /// The principal's id (a user's or API key's id).
    #[param(pattern = "@no_nul")]
    actor_id: Option<String>,
    /// The event type, e.g. `ContactUpdated`; `credentials.decrypt` for every
    /// decryption of a stored secret (docs/vault.md).
    #[param(pattern = "@no_nul")]
    action: Option<String>,
    /// e.g. `contact`, `user`, `role`.
    #[param(pattern = "@no_nul")]
    entity_type: Option<String>,
    #[param(pattern = "@no_nul")]
    entity_id: Option<String>,
    /// At or after this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    since: Option<Time>,
    /// Before this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    until: Option<Time>,
    /// Entries before this position (`next_before` of the previous page).
    before: Option<i64>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Wait (bounded) until the activity log has applied this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (capped by the server).
    #[param(minimum = 0, maximum = 600000)]
    wait_ms: Option<i64>,
}

/// Who did it.
#[derive(Serialize, ToSchema)]
pub(crate) struct Actor {
    /// `user`, `api_key`, `portal`, `ai_agent` or `system`.
    kind: String,
    id: String,
}

/// What it was done to.
#[derive(Serialize, ToSchema)]
pub(crate) struct Entity {
    #[serde(rename = "type")]
    entity_type: String,
    id: String,
}

/// One entry: one event, without personal data.
#[derive(Serialize, ToSchema)]
pub(crate) struct ActivityItem {
    event_id: Uuid,
    position: i64,
    occurred_at: chrono::DateTime<chrono::Utc>,
    recorded_at: chrono::DateTime<chrono::Utc>,
    actor: Actor,
    action: String,
    entity: Entity,
    request_id: Option<String>,
    correlation_id: Option<String>,
}

/// A page of the activity log, newest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct ActivityPage {
    items: Vec<ActivityItem>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<i64>,
}

pub(crate) async fn list(
    s: AppState,
    a: Authed,
    Query(q): Query<ActivityQuery>,
) -> Result<Ok200<ActivityPage>, ApiError> {
    let (pos, wait) = consistency(q.min_position, q.wait_ms)?;
    let limit = parse_limit(q.limit)?;
    let filter = ActivityFilter {
        actor_id: q.actor_id,
        action: q.action,
        entity_type: q.entity_type,
        entity_id: q.entity_id,
        since: q.since.map(|t| t.0),
        until: q.until.map(|t| t.0),
        before: q.before,
        limit,
        time_window_cap: None,
    };
    s.await_projection("activity", pos, wait).await?;
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let entries = activity_rm::list(&tx, a.caller.org_id, &filter).await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.global_position))
        .flatten();
    let items = entries.into_iter().map(item).collect();
    Ok(Ok200(ActivityPage { items, next_before }))
}

/// An entry as the API shows it.
pub(crate) fn item(e: crm_projections::activity::ActivityEntry) -> ActivityItem {
    ActivityItem {
        event_id: e.event_id,
        position: e.global_position,
        occurred_at: e.occurred_at,
        recorded_at: e.recorded_at,
        actor: Actor {
            kind: e.actor_kind,
            id: e.actor_id,
        },
        action: e.action,
        entity: Entity {
            entity_type: e.entity_type,
            id: e.entity_id,
        },
        request_id: e.request_id,
        correlation_id: e.correlation_id,
    }
}
