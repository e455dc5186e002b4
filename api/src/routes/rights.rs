//! Data-subject rights over the API: legal holds, erasure (with its receipt) and the
//! auditors' list of receipts. See docs/rights.md.

use std::time::Duration;

use chrono::{DateTime, Utc};
use crm_domain::contact::{Contact, ContactCommand, ErasureSource};
use crm_infra::feed::projector;
use crm_infra::read_models::erasure_receipts as receipts_rm;
use crm_infra::rights::erasure::{self, Erase};
use crm_projections::erasure::{ErasureReceipt, PURGING_READ_MODELS, SHREDDED};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::consent::ReasonInput;
use super::schemas::Outcome;
use super::{consistency, parse_limit, Authed};
use crate::edge::extract::{Id, Json, Query};
use crate::edge::reply::Ok200;
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// How long an erasure waits for the read models to purge before it answers (it
/// answers `purging` after that; the receipt shows them done later).
const PURGE_WAIT: Duration = Duration::from_secs(5);

fn reason(r: Option<String>) -> Result<Option<String>, ApiError> {
    match r {
        Some(r) if r.chars().count() > 300 => Err(ApiError::Validation(vec![FieldError::new(
            "reason",
            "must be at most 300 characters",
        )])),
        Some(r) if r.chars().any(char::is_control) => {
            Err(ApiError::Validation(vec![FieldError::new(
                "reason",
                "must be one line of text",
            )]))
        }
        Some(r) if r.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

async fn hold_command(
    s: &AppState,
    a: &Authed,
    id: Uuid,
    command: ContactCommand,
) -> Result<Ok200<Outcome>, ApiError> {
    let outcome = s
        .executor
        .execute::<Contact>(
            a.caller.org_id,
            &id.to_string(),
            command,
            &a.metadata(),
            None,
        )
        .await?;
    Ok(super::outcome(&outcome))
}

pub(crate) async fn place_legal_hold(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<ReasonInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let reason = reason(input.reason)?;
    hold_command(&s, &a, id, ContactCommand::PlaceLegalHold { reason }).await
}

pub(crate) async fn lift_legal_hold(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<ReasonInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let reason = reason(input.reason)?;
    hold_command(&s, &a, id, ContactCommand::LiftLegalHold { reason }).await
}

/// Who asked for an erasure.
#[derive(Serialize, ToSchema)]
pub(crate) struct Requester {
    /// `user`, `api_key`, `portal`, `ai_agent` or `system`.
    kind: String,
    id: String,
}

/// The erasure's tombstone event, in the contact's stream.
#[derive(Serialize, ToSchema)]
pub(crate) struct Tombstone {
    event_id: Uuid,
    position: i64,
    /// Hex SHA-256 of the stored event, chained in the contact's stream: `crm audit
    /// verify` checks it.
    hash: String,
}

/// The receipt of an erasure: no personal data.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErasureReceiptDoc {
    request_id: Uuid,
    /// The contact's id: a pseudonym once its keys are gone.
    subject_id: Uuid,
    /// `staff`, `ai_action`, `preference_center`, `portal` or `retention`.
    source: String,
    requested_by: Requester,
    requested_at: DateTime<Utc>,
    /// When the keys were destroyed and the tombstone committed.
    erased_at: DateTime<Utc>,
    /// The subjects whose data keys were destroyed: the contact's own, then its
    /// messages' and the AI actions' that touched it.
    keys_destroyed: Vec<String>,
    /// The channels whose contact point went onto the suppression list (as a keyed
    /// hash).
    suppressed: Vec<String>,
    tombstone: Tombstone,
    /// Read models that held the contact's data in clear and have purged it.
    read_models_purged: Vec<String>,
    /// Those still to apply the tombstone (empty once `status` is `complete`).
    read_models_pending: Vec<String>,
    /// Where the data also was, stored only under the destroyed keys: unreadable.
    shredded: Vec<String>,
    /// `complete`, or `purging` while a read model has still to apply the tombstone.
    status: String,
}

/// Which purging read models have applied the event at `position`.
async fn purged(s: &AppState, position: i64) -> Result<(Vec<String>, Vec<String>), ApiError> {
    let client = s.pool.get().await?;
    let (mut done, mut pending) = (vec![], vec![]);
    for name in PURGING_READ_MODELS {
        match projector::progress(&client, name, position).await? {
            Some((true, _)) => done.push(name.to_owned()),
            _ => pending.push(name.to_owned()),
        }
    }
    Ok((done, pending))
}

async fn doc(s: &AppState, r: ErasureReceipt) -> Result<ErasureReceiptDoc, ApiError> {
    let (read_models_purged, read_models_pending) = purged(s, r.tombstone_position).await?;
    Ok(ErasureReceiptDoc {
        request_id: r.request_id,
        subject_id: r.subject_id,
        source: r.source,
        requested_by: Requester {
            kind: r.requested_by_kind,
            id: r.requested_by,
        },
        requested_at: r.requested_at,
        erased_at: r.erased_at,
        keys_destroyed: r.keys_destroyed,
        suppressed: r.suppressed,
        tombstone: Tombstone {
            event_id: r.tombstone_event_id,
            position: r.tombstone_position,
            hash: r.tombstone_hash,
        },
        status: if read_models_pending.is_empty() {
            "complete"
        } else {
            "purging"
        }
        .to_owned(),
        read_models_purged,
        read_models_pending,
        shredded: SHREDDED.iter().map(|s| (*s).to_owned()).collect(),
    })
}

/// Erases contact `id` for `source` and answers its receipt once the read models have
/// purged (or after [`PURGE_WAIT`], `purging`). Shared by the staff route, AI actions,
/// the preference center and the retention sweep.
pub(crate) async fn erase_contact(
    s: &AppState,
    org_id: Uuid,
    id: Uuid,
    source: ErasureSource,
    metadata: &crm_domain::metadata::EventMetadata,
) -> Result<ErasureReceiptDoc, ApiError> {
    let request = Erase {
        org_id,
        contact_id: id,
        request_id: Uuid::now_v7(),
        source,
    };
    let erased = erasure::erase(&s.executor, &request, metadata).await?;
    let tombstone = erased
        .outcome
        .appended
        .first()
        .ok_or_else(|| ApiError::internal("an erasure wrote no tombstone"))?;
    let receipt = ErasureReceipt {
        org_id,
        request_id: request.request_id,
        subject_id: id,
        source: source.name().to_owned(),
        requested_by_kind: serde_json::to_value(metadata.principal.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        requested_by: metadata.principal.id.clone(),
        requested_at: metadata.occurred_at,
        erased_at: tombstone.recorded_at,
        keys_destroyed: erased.keys_destroyed,
        suppressed: erased.suppressed,
        tombstone_event_id: tombstone.event_id,
        tombstone_position: tombstone.global_position,
        tombstone_hash: tombstone.hash.clone(),
    };
    let deadline = tokio::time::Instant::now() + PURGE_WAIT;
    loop {
        let (_, pending) = purged(s, tombstone.global_position).await?;
        if pending.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doc(s, receipt).await
}

pub(crate) async fn erase(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<ErasureReceiptDoc>, ApiError> {
    let receipt =
        erase_contact(&s, a.caller.org_id, id, ErasureSource::Staff, &a.metadata()).await?;
    Ok(Ok200(receipt))
}

/// `GET /v1/erasures` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ErasureQuery {
    /// Only the erasure of this contact.
    contact_id: Option<Uuid>,
    /// Receipts before this tombstone position (`next_before` of the previous page).
    before: Option<i64>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Wait (bounded) until the receipts have applied this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (capped by the server).
    #[param(minimum = 0, maximum = 600000)]
    wait_ms: Option<i64>,
}

/// A page of erasure receipts, newest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErasurePage {
    items: Vec<ErasureReceiptDoc>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<i64>,
}

pub(crate) async fn list(
    s: AppState,
    a: Authed,
    Query(q): Query<ErasureQuery>,
) -> Result<Ok200<ErasurePage>, ApiError> {
    let (pos, wait) = consistency(q.min_position, q.wait_ms)?;
    let limit = parse_limit(q.limit)?;
    s.await_projection("erasure_receipts", pos, wait).await?;
    let found = {
        let mut client = s.pool.get().await?;
        let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
        receipts_rm::list(&tx, a.caller.org_id, q.contact_id, q.before, limit).await?
    };
    let next_before = (found.len() as i64 == limit)
        .then(|| found.last().map(|r| r.tombstone_position))
        .flatten();
    let mut items = Vec::with_capacity(found.len());
    for r in found {
        items.push(doc(&s, r).await?);
    }
    Ok(Ok200(ErasurePage { items, next_before }))
}

pub(crate) async fn get_one(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<ErasureReceiptDoc>, ApiError> {
    let found = {
        let mut client = s.pool.get().await?;
        let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
        receipts_rm::get(&tx, a.caller.org_id, id).await?
    };
    let r = found.ok_or(ApiError::NotFound("erasure receipt not found"))?;
    Ok(Ok200(doc(&s, r).await?))
}
