//! `GET /v1/activity`: the organisation's activity log, newest first.

use crm_infra::read_models::activity::{self as activity_rm, ActivityFilter};
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

use super::{
    allowed, consistency, parse_limit, parse_query, parse_time, raw_query, with_state, Authed,
};
use crate::error::{finish, json_response, ApiError};
use crate::state::AppState;

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    warp::path!("v1" / "activity")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state, crm_domain::access::Permission::ActivityRead))
        .and(raw_query())
        .and_then(|s: AppState, a: Authed, q: String| async move {
            let rid = a.ctx.request_id.clone();
            finish(list(s, a, q).await, &rid)
        })
        .boxed()
}

async fn list(s: AppState, a: Authed, raw: String) -> Result<Response, ApiError> {
    let q = parse_query(
        &raw,
        &[
            "actor_id",
            "action",
            "entity_type",
            "entity_id",
            "since",
            "until",
            "before",
            "limit",
            "min_position",
            "wait_ms",
        ],
    )?;
    let (pos, wait) = consistency(&q)?;
    let limit = parse_limit(&q)?;
    let filter = ActivityFilter {
        actor_id: q.get("actor_id").cloned(),
        action: q.get("action").cloned(),
        entity_type: q.get("entity_type").cloned(),
        entity_id: q.get("entity_id").cloned(),
        since: q.get("since").map(|v| parse_time("since", v)).transpose()?,
        until: q.get("until").map(|v| parse_time("until", v)).transpose()?,
        before: q
            .get("before")
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request("invalid_query", "`before` must be a position")
                })
            })
            .transpose()?,
        limit,
    };
    s.await_projection("activity", pos, wait).await?;
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let items = activity_rm::list(&tx, a.caller.org_id, &filter).await?;
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|e| e.global_position))
        .flatten();
    let items: Vec<_> = items
        .iter()
        .map(|e| {
            json!({
                "event_id": e.event_id,
                "position": e.global_position,
                "occurred_at": e.occurred_at,
                "recorded_at": e.recorded_at,
                "actor": { "kind": e.actor_kind, "id": e.actor_id },
                "action": e.action,
                "entity": { "type": e.entity_type, "id": e.entity_id },
                "request_id": e.request_id,
                "correlation_id": e.correlation_id,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "items": items, "next_before": next }),
        &a.ctx.request_id,
    ))
}
