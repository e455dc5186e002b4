//! Data-subject rights over the API: legal holds, erasure (with its receipt) and the
//! auditors' list of receipts. See docs/rights.md.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use crm_domain::access::Policy;
use crm_domain::consent::ledger::ConsentLedger;
use crm_domain::contact::{Contact, ContactCommand, RequestSource};
use crm_infra::feed::projector;
use crm_infra::read_models::activity as activity_rm;
use crm_infra::read_models::consent_log::{self as log_rm, ConsentLogFilter};
use crm_infra::read_models::consent_state as consent_rm;
use crm_infra::read_models::contacts as contacts_rm;
use crm_infra::read_models::erasure_receipts as receipts_rm;
use crm_infra::rights::erasure::{self, Erase};
use crm_infra::rights::export;
use crm_infra::store::decode::decode;
use crm_infra::store::event_store::{self, StreamId};
use crm_projections::erasure::{
    receipt as erasure_receipt, ErasureReceipt, PURGING_READ_MODELS, SHREDDED,
};
use crm_projections::Envelope;
use futures::SinkExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use warp::Reply;

use super::activity::ActivityItem;
use super::ai_audit::{self, AiAuditItem};
use super::consent::ReasonInput;
use super::consent_log::{log_item, ConsentLogItem, ContactConsent};
use super::contacts::{history_event, HistoryEvent};
use super::messages::{message_doc, MessageDoc};
use super::schemas::Outcome;
use super::{consistency, parse_limit, Authed};
use crate::auth::visibility;
use crate::edge::extract::{Id, Json, Query};
use crate::edge::reply::{Ok200, RawAs, RawDoc};
use crate::edge::route::OpDoc;
use crate::error::ApiError;
use crate::state::AppState;

/// How long an erasure waits for the read models to purge before it answers (it
/// answers `purging` after that; the receipt shows them done later).
const PURGE_WAIT: Duration = Duration::from_secs(5);

/// Runs a contact command that takes only a reason (holds, restrictions), checked as
/// every reason is.
async fn with_reason(
    s: AppState,
    a: Authed,
    id: Uuid,
    input: ReasonInput,
    command: fn(Option<String>) -> ContactCommand,
) -> Result<Ok200<Outcome>, ApiError> {
    let reason = super::consent::reason(input.reason)?;
    let outcome = s
        .executor
        .execute::<Contact>(
            a.caller.org_id,
            &id.to_string(),
            command(reason),
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
    with_reason(s, a, id, input, |reason| ContactCommand::PlaceLegalHold {
        reason,
    })
    .await
}

pub(crate) async fn lift_legal_hold(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<ReasonInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    with_reason(s, a, id, input, |reason| ContactCommand::LiftLegalHold {
        reason,
    })
    .await
}

pub(crate) async fn restrict(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<ReasonInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    with_reason(s, a, id, input, |reason| {
        ContactCommand::RestrictProcessing { reason }
    })
    .await
}

pub(crate) async fn lift_restriction(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<ReasonInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    with_reason(s, a, id, input, |reason| ContactCommand::LiftRestriction {
        reason,
    })
    .await
}

pub(crate) async fn set_retention(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<super::consent::RetentionInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let (days, reason) = input.parse()?;
    let outcome = crm_infra::rights::retention::set_contact_period(
        &s.executor,
        a.caller.org_id,
        id,
        days,
        reason,
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&outcome))
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

impl ErasureReceiptDoc {
    pub(crate) fn request_id(&self) -> Uuid {
        self.request_id
    }
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
    source: RequestSource,
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
    // The receipt as the projection `erasure_receipts` will keep it.
    let sid = id.to_string();
    let envelope = Envelope {
        event_id: tombstone.event_id,
        org_id,
        aggregate_type: Contact::TYPE,
        aggregate_id: &sid,
        event_type: "ContactErased",
        sequence: tombstone.sequence,
        global_position: tombstone.global_position,
        recorded_at: tombstone.recorded_at,
    };
    let receipt = erasure_receipt(&envelope, &erased.tombstone, metadata, &tombstone.hash)
        .ok_or_else(|| ApiError::internal("an erasure wrote no tombstone"))?;
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
        erase_contact(&s, a.caller.org_id, id, RequestSource::Staff, &a.metadata()).await?;
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

// ---- GET /v1/contacts/{id}/export ------------------------------------------------------

/// The version of the export document's shape (docs/rights.md): a field is only ever
/// added within a version.
pub(crate) const EXPORT_SCHEMA: &str = "crm.contact-export.v1";

/// One event of the contact's streams in an export.
#[derive(Serialize, ToSchema)]
pub(crate) struct ExportedEvent {
    /// `contact` or `consent`.
    stream: String,
    #[serde(flatten)]
    event: HistoryEvent,
}

/// Everything held about one contact (GDPR Art. 15 and 20), as the exporter's role may
/// read it, streamed in this order of members.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // documents the JSON that `export_contact` streams
pub(crate) struct ContactExport {
    /// `crm.contact-export.v1`.
    schema: String,
    export_id: Uuid,
    exported_at: DateTime<Utc>,
    organization_id: Uuid,
    /// The profile now (empty once erased).
    #[schema(value_type = super::contacts::ContactDoc)]
    contact: serde_json::Value,
    /// Consent now: records, Do Not Contact, the sale/sharing opt-out.
    consent: ContactConsent,
    /// Every consent change with its proof, newest first.
    consent_log: Vec<ConsentLogItem>,
    /// Every message sent or refused to the contact, with each gate decision, oldest
    /// first.
    messages: Vec<MessageDoc>,
    /// Every AI action that touched the contact, newest first.
    ai_actions: Vec<AiAuditItem>,
    /// Who did what to the contact, its messages and those actions, newest first.
    activity: Vec<ActivityItem>,
    /// The events of the contact's streams, oldest first, decrypted.
    history: Vec<ExportedEvent>,
}

/// The export's answer in the document: `ContactExport`, streamed.
pub(crate) struct ExportDocument;

impl RawDoc for ExportDocument {
    fn document(doc: &mut OpDoc) {
        let schema = doc.schema::<ContactExport>();
        doc.success(
            200,
            "The export, streamed (`content-disposition: attachment`)",
            Some(("application/json", schema)),
        );
    }
}

pub(crate) async fn export(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<RawAs<ExportDocument>, ApiError> {
    let org = a.caller.org_id;
    let response = export_contact(
        &s,
        org,
        id,
        RequestSource::Staff,
        &a.metadata(),
        &a.access.policy,
    )
    .await?;
    Ok(RawAs::new(response))
}

/// The read models an export reads, caught up to the export's own event first.
const EXPORT_READS: [&str; 5] = [
    "contacts",
    "consent_state",
    "consent_log",
    "ai_audit",
    "activity",
];

/// Records the export (`ContactExported`) and streams the document. Shared by the
/// staff route and the preference center.
pub(crate) async fn export_contact(
    s: &AppState,
    org: Uuid,
    id: Uuid,
    source: RequestSource,
    metadata: &crm_domain::metadata::EventMetadata,
    policy: &Policy,
) -> Result<warp::reply::Response, ApiError> {
    let recorded = record_export(s, org, id, source, metadata).await?;
    stream_export_of(s, org, id, recorded, policy).await
}

/// Records an export of contact `id` (404 if there is none): its id and the event's
/// position.
pub(crate) async fn record_export(
    s: &AppState,
    org: Uuid,
    id: Uuid,
    source: RequestSource,
    metadata: &crm_domain::metadata::EventMetadata,
) -> Result<(Uuid, i64), ApiError> {
    let export_id = Uuid::now_v7();
    let outcome = s
        .executor
        .execute::<Contact>(
            org,
            &id.to_string(),
            ContactCommand::RecordExport { export_id, source },
            metadata,
            None,
        )
        .await?;
    let position = outcome.positions.last().copied().unwrap_or_default();
    Ok((export_id, position))
}

/// Streams the document of export `export_id` of contact `id` (recorded at
/// `position`) as a reader with `policy` sees it, once the read models it reads have
/// applied the export's event.
pub(crate) async fn stream_export_of(
    s: &AppState,
    org: Uuid,
    id: Uuid,
    (export_id, position): (Uuid, i64),
    policy: &Policy,
) -> Result<warp::reply::Response, ApiError> {
    for name in EXPORT_READS {
        s.await_projection(name, Some(position), None).await?;
    }
    // What is read before the first byte goes out: a failure here is still an error
    // answer, not a cut stream.
    let (contact, consent) = {
        let mut client = s.pool.get().await?;
        let tx = crm_infra::read_models::org_scope(&mut client, org).await?;
        let view = contacts_rm::get(&tx, org, id)
            .await?
            .ok_or(ApiError::NotFound("contact not found"))?;
        let state = consent_rm::get(&tx, org, id).await?;
        let mut contact = super::contacts::view_json(&view);
        visibility::contact(policy, &mut contact);
        let consent = ContactConsent::new(
            id,
            &state.map(|v| v.state).unwrap_or_default(),
            policy,
            Utc::now(),
        );
        (contact, consent)
    };
    let head = json!({
        "schema": EXPORT_SCHEMA,
        "export_id": export_id,
        "exported_at": Utc::now(),
        "organization_id": org,
        "contact": contact,
        "consent": consent,
    });
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let (s, policy) = (s.clone(), policy.clone());
    tokio::spawn(async move {
        if let Err(e) = stream_export(&s, org, id, &policy, head, &mut tx).await {
            // The answer has begun: the stream is cut, so the client sees it incomplete.
            tracing::warn!(export = %export_id, error = %e, "export cut short");
            let _ = tx
                .send(Err(std::io::Error::other("export cut short")))
                .await;
        }
    });
    let mut response = warp::reply::stream(rx).into_response();
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = warp::http::HeaderValue::from_str(&format!(
        "attachment; filename=\"contact-{id}-export.json\""
    )) {
        headers.insert("content-disposition", v);
    }
    Ok(response)
}

type Chunks = futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>;

async fn send(tx: &mut Chunks, text: String) -> Result<(), ApiError> {
    tx.send(Ok(Bytes::from(text)))
        .await
        .map_err(|_| ApiError::internal("the client went away"))
}

/// Streams `items` as the members of a JSON array named `name` (after a comma).
async fn array<T: Serialize>(tx: &mut Chunks, name: &str, items: &[T]) -> Result<(), ApiError> {
    send(tx, format!(",\"{name}\":[")).await?;
    for (n, item) in items.iter().enumerate() {
        let json = serde_json::to_string(item).map_err(ApiError::internal)?;
        send(tx, if n == 0 { json } else { format!(",{json}") }).await?;
    }
    send(tx, "]".into()).await
}

async fn stream_export(
    s: &AppState,
    org: Uuid,
    id: Uuid,
    policy: &Policy,
    head: serde_json::Value,
    tx: &mut Chunks,
) -> Result<(), ApiError> {
    let head = head.to_string();
    // `head` is an object: everything but its closing brace, then the arrays.
    send(tx, head[..head.len() - 1].to_owned()).await?;

    let mut client = s.pool.get().await?;
    let log = {
        let t = crm_infra::read_models::org_scope(&mut client, org).await?;
        let mut entries = Vec::new();
        let mut before = None;
        loop {
            let filter = ConsentLogFilter {
                contact_id: Some(id),
                channel: None,
                purpose: None,
                source: None,
                since: None,
                until: None,
                before,
                limit: 500,
            };
            let page = log_rm::list(&t, org, &filter).await?;
            let full = page.len() == 500;
            before = page.last().map(|e| e.global_position);
            entries.extend(page.into_iter().map(|e| log_item(e, policy)));
            if !full {
                break entries;
            }
        }
    };
    array(tx, "consent_log", &log).await?;
    drop(log);

    let message_ids = export::messages_of(&client, org, id).await?;
    let mut messages = Vec::with_capacity(message_ids.len());
    for m in &message_ids {
        messages.extend(message_doc(s, &client, org, *m, policy).await?);
    }
    array(tx, "messages", &messages).await?;
    drop(messages);

    let actions = ai_audit::touching(s, org, id, policy).await?;
    let mut entities: Vec<String> = vec![id.to_string()];
    entities.extend(message_ids.iter().map(Uuid::to_string));
    entities.extend(actions.iter().map(|a| a.id().to_string()));
    array(tx, "ai_actions", &actions).await?;
    drop(actions);

    let activity = {
        let t = crm_infra::read_models::org_scope(&mut client, org).await?;
        let mut out = Vec::new();
        let mut before = None;
        loop {
            let page = activity_rm::of_entities(&t, org, &entities, before, 500).await?;
            let full = page.len() == 500;
            before = page.last().map(|e| e.global_position);
            out.extend(page.into_iter().map(super::activity::item));
            if !full {
                break out;
            }
        }
    };
    array(tx, "activity", &activity).await?;
    drop(activity);

    // The history, a page of events at a time.
    send(tx, ",\"history\":[".into()).await?;
    let sid = id.to_string();
    let mut first = true;
    for stream_type in [Contact::TYPE, ConsentLedger::TYPE] {
        let stream = StreamId {
            org_id: org,
            aggregate_type: stream_type,
            aggregate_id: &sid,
        };
        let mut after = 0;
        loop {
            let page = event_store::read_stream_page(&client, &stream, after, 500).await?;
            let full = page.len() == 500;
            for stored in page {
                after = stored.sequence;
                let d = decode(s.executor.crypto(), &client, stored).await?;
                let event = ExportedEvent {
                    stream: stream_type.to_owned(),
                    event: history_event(d, policy),
                };
                let json = serde_json::to_string(&event).map_err(ApiError::internal)?;
                send(tx, if first { json } else { format!(",{json}") }).await?;
                first = false;
            }
            if !full {
                break;
            }
        }
    }
    send(tx, "]}".into()).await
}
