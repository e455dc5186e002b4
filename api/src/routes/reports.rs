//! `GET /v1/reports/contacts`: aggregates over the organisation's contacts, with no
//! personal data in them (what the Board role sees).

use crm_domain::access::Permission;
use crm_infra::read_models::contacts as contacts_rm;
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

use super::{allowed, with_state, Authed};
use crate::error::{finish, json_response, ApiError};
use crate::state::AppState;

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    warp::path!("v1" / "reports" / "contacts")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state, Permission::ReportsRead))
        .and_then(|s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(contacts(s, a).await, &rid)
        })
        .boxed()
}

async fn contacts(s: AppState, a: Authed) -> Result<Response, ApiError> {
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let (total, archived) = contacts_rm::counts(&tx, a.caller.org_id).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "total": total, "archived": archived, "active": total - archived }),
        &a.ctx.request_id,
    ))
}
