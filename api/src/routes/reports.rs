//! `GET /v1/reports/contacts`: aggregates over the organisation's contacts, with no
//! personal data in them (what the Board role sees).

use crm_infra::read_models::contacts as contacts_rm;
use serde::Serialize;
use utoipa::ToSchema;

use super::Authed;
use crate::edge::reply::Ok200;
use crate::error::ApiError;
use crate::state::AppState;

/// Contact counts.
#[derive(Serialize, ToSchema)]
pub(crate) struct ContactCounts {
    total: i64,
    archived: i64,
    active: i64,
}

pub(crate) async fn contacts(s: AppState, a: Authed) -> Result<Ok200<ContactCounts>, ApiError> {
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let (total, archived) = contacts_rm::counts(&tx, a.caller.org_id).await?;
    Ok(Ok200(ContactCounts {
        total,
        archived,
        active: total - archived,
    }))
}
