//! Reading consent: the ConsentLog (`GET /v1/consent/log`), a contact's current consent
//! or its consent at a past moment (`GET /v1/contacts/{id}/consent`), and the bulk
//! check of the send gate (`POST /v1/consent/check`).
//!
//! What the caller sees of personal data follows its role: a contact point only when
//! the role may read the field it belongs to (e-mail → `email`; sms, whatsapp, phone →
//! `phone`; postal → `address`), the IP address and user agent of a change only with
//! `consent.proof.view`. Either is then absent from the JSON, never null.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use crm_domain::access::{Permission, Policy};
use crm_domain::consent::gate::{ConsentState, Reason};
use crm_domain::consent::proof::CaptureSource;
use crm_domain::consent::{Channel, ConsentStatus, PurposeKey};
use crm_infra::consent::{privacy, state};
use crm_infra::crypto::org_secrets::SUPPRESSION;
use crm_infra::read_models::consent_log::{self as log_rm, ConsentLogFilter};
use crm_infra::read_models::consent_state::{self as state_rm, Checked, MAX_CHECK};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::schemas::{CaptureSourceName, ChannelName, ConsentStatusName, LawfulBasisName, Time};
use super::{consistency, parse_limit, query_error, Authed};
use crate::auth::visibility;
use crate::edge::extract::{Id, Json, Query};
use crate::edge::reply::Ok200;
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

// ---- GET /v1/consent/log -------------------------------------------------------------

/// `GET /v1/consent/log` parameters; every filter is exact but the time window.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConsentLogQuery {
    /// One contact's changes.
    contact_id: Option<Uuid>,
    #[param(value_type = Option<ChannelName>)]
    channel: Option<Channel>,
    /// A purpose key, e.g. `marketing`.
    #[param(pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    purpose: Option<String>,
    /// How the changes were captured.
    #[param(value_type = Option<CaptureSourceName>)]
    source: Option<CaptureSource>,
    /// Changes made at or after this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    since: Option<Time>,
    /// Changes made before this time.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    until: Option<Time>,
    /// Entries before this position (`next_before` of the previous page).
    before: Option<i64>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Wait (bounded) until the ConsentLog has applied this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (capped by the server).
    #[param(minimum = 0, maximum = 600000)]
    wait_ms: Option<i64>,
}

/// The notice shown when the choice was made.
#[derive(Serialize, ToSchema)]
pub(crate) struct NoticeDoc {
    id: String,
    version: String,
    /// SHA-256 of the notice text, 64 lowercase hexadecimal digits.
    sha256: String,
}

/// Who made a change.
#[derive(Serialize, ToSchema)]
pub(crate) struct ConsentActor {
    /// `user`, `api_key`, `portal`, `ai_agent` or `system`.
    kind: String,
    id: String,
}

/// One ConsentLog entry: one consent event with its proof.
#[derive(Serialize, ToSchema)]
pub(crate) struct ConsentLogItem {
    event_id: Uuid,
    position: i64,
    contact_id: Uuid,
    /// The event type: `ConsentRecorded`, `ConfirmationRequested`, `ConsentConfirmed`,
    /// `DoNotContactSet`, `DoNotContactLifted`, `SaleOrSharingOptedOut` or
    /// `SaleOrSharingOptOutLifted`.
    action: String,
    /// Channel, purpose and status: for the events that change a consent record, else
    /// null.
    #[schema(value_type = Option<ChannelName>)]
    channel: Option<String>,
    purpose: Option<String>,
    #[schema(value_type = Option<ConsentStatusName>)]
    status: Option<String>,
    /// The address or number the record is for (null: the whole channel). Absent when
    /// the caller's role may not read the contact field it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    contact_point: Option<Option<String>>,
    #[schema(value_type = Option<LawfulBasisName>)]
    lawful_basis: Option<String>,
    /// How the change was captured (record changes and the sale/sharing opt-out).
    #[schema(value_type = Option<CaptureSourceName>)]
    source: Option<String>,
    notice: Option<NoticeDoc>,
    /// BCP 47.
    language: Option<String>,
    jurisdiction: Option<String>,
    /// A grant that holds until then.
    expires_at: Option<DateTime<Utc>>,
    /// The bulk import the change came from.
    import_id: Option<Uuid>,
    actor: ConsentActor,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    /// Where the change came from: only for roles with `consent.proof.view` (else
    /// absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    ip: Option<Option<String>>,
    /// Only for roles with `consent.proof.view` (else absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    user_agent: Option<Option<String>>,
    /// The event's hash in its stream's chain (what a receipt is checked against).
    event_hash: String,
}

/// A page of the ConsentLog, newest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct ConsentLogPage {
    items: Vec<ConsentLogItem>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<i64>,
}

pub(crate) async fn log(
    s: AppState,
    a: Authed,
    Query(q): Query<ConsentLogQuery>,
) -> Result<Ok200<ConsentLogPage>, ApiError> {
    let (pos, wait) = consistency(q.min_position, q.wait_ms)?;
    let limit = parse_limit(q.limit)?;
    if let Some(p) = &q.purpose {
        PurposeKey::parse(p).map_err(|e| query_error("purpose", &e.0))?;
    }
    let filter = ConsentLogFilter {
        contact_id: q.contact_id,
        channel: q.channel.map(|c| c.name().to_owned()),
        purpose: q.purpose,
        source: q.source.map(|c| super::schemas::wire_name(&c)),
        since: q.since.map(|t| t.0),
        until: q.until.map(|t| t.0),
        before: q.before,
        limit,
    };
    s.await_projection("consent_log", pos, wait).await?;
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, a.caller.org_id).await?;
    let entries = log_rm::list(&tx, a.caller.org_id, &filter).await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.global_position))
        .flatten();
    let items = entries
        .into_iter()
        .map(|e| log_item(e, &a.access.policy))
        .collect();
    Ok(Ok200(ConsentLogPage { items, next_before }))
}

/// An entry as a reader with `policy` sees it: the contact point only with read access
/// to its contact field, the proof (IP, user agent) only with `consent.proof.view`.
pub(crate) fn log_item(
    e: crm_projections::consent::ConsentLogEntry,
    policy: &Policy,
) -> ConsentLogItem {
    let proof = policy.allows(Permission::ConsentProofView);
    let visible = e
        .channel
        .as_deref()
        .and_then(Channel::parse)
        .is_some_and(|c| visibility::sees_contact_point(policy, c));
    let notice = match (e.notice_id, e.notice_version, e.notice_sha256) {
        (Some(id), Some(version), Some(sha256)) => Some(NoticeDoc {
            id,
            version,
            sha256,
        }),
        _ => None,
    };
    ConsentLogItem {
        event_id: e.event_id,
        position: e.global_position,
        contact_id: e.contact_id,
        action: e.action,
        channel: e.channel,
        purpose: e.purpose,
        status: e.status,
        contact_point: visible.then_some(e.contact_point),
        lawful_basis: e.lawful_basis,
        source: e.source,
        notice,
        language: e.language,
        jurisdiction: e.jurisdiction,
        expires_at: e.expires_at,
        import_id: e.import_id,
        actor: ConsentActor {
            kind: e.actor_kind,
            id: e.actor_id,
        },
        occurred_at: e.occurred_at,
        recorded_at: e.recorded_at,
        ip: proof.then_some(e.ip),
        user_agent: proof.then_some(e.user_agent),
        event_hash: e.event_hash,
    }
}

// ---- GET /v1/contacts/{id}/consent ---------------------------------------------------

/// `GET /v1/contacts/{id}/consent` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ContactConsentQuery {
    /// The consent as it stood at this time, folded from the events recorded by then
    /// (not the read model).
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    as_of: Option<Time>,
    /// Wait (bounded) until the consent state has applied this position.
    #[param(minimum = 1)]
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (capped by the server).
    #[param(minimum = 0, maximum = 600000)]
    wait_ms: Option<i64>,
}

/// One consent record as it stands: the latest change for its channel, purpose and
/// contact point.
#[derive(Serialize, ToSchema)]
pub(crate) struct ConsentRecordDoc {
    /// The event that made it so.
    event_id: Uuid,
    #[schema(value_type = ChannelName)]
    channel: Channel,
    purpose: String,
    /// The address or number it is for (null: the whole channel). Absent when the
    /// caller's role may not read the contact field it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    contact_point: Option<Option<String>>,
    /// At the time of the answer (`expired`: a grant past its `expires_at`).
    #[schema(value_type = ConsentStatusName)]
    status: ConsentStatus,
    expires_at: Option<DateTime<Utc>>,
}

/// A contact's consent: its records, the Do Not Contact mark, the sale/sharing opt-out.
#[derive(Serialize, ToSchema)]
pub(crate) struct ContactConsent {
    contact_id: Uuid,
    records: Vec<ConsentRecordDoc>,
    do_not_contact: bool,
    /// The event that set the mark, while it stands.
    do_not_contact_event_id: Option<Uuid>,
    sale_or_sharing_opted_out: bool,
    /// The event of the opt-out, while it stands.
    sale_or_sharing_opt_out_event_id: Option<Uuid>,
    /// Whether the contact's processing is restricted (GDPR Art. 18); with `?as_of=`,
    /// whether it was then.
    processing_restricted: bool,
    /// The event that restricted it, while it stands.
    restriction_event_id: Option<Uuid>,
    /// The time asked for (`?as_of=` reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    as_of: Option<DateTime<Utc>>,
    /// The global position of the last event the read model reflects for this contact
    /// (current reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<i64>,
}

impl ContactConsent {
    pub(crate) fn new(
        contact_id: Uuid,
        state: &ConsentState,
        policy: &Policy,
        at: DateTime<Utc>,
    ) -> Self {
        let records = state
            .records
            .iter()
            .map(|r| ConsentRecordDoc {
                event_id: r.event_id,
                channel: r.channel,
                purpose: r.purpose.as_str().to_owned(),
                contact_point: visibility::sees_contact_point(policy, r.channel)
                    .then(|| r.contact_point.clone()),
                status: match (r.status, r.expires_at) {
                    (ConsentStatus::Granted, Some(until)) if until <= at => ConsentStatus::Expired,
                    (status, _) => status,
                },
                expires_at: r.expires_at,
            })
            .collect();
        Self {
            contact_id,
            records,
            do_not_contact: state.do_not_contact.is_some(),
            do_not_contact_event_id: state.do_not_contact,
            sale_or_sharing_opted_out: state.sale_or_sharing_opt_out.is_some(),
            sale_or_sharing_opt_out_event_id: state.sale_or_sharing_opt_out,
            processing_restricted: state.restricted.is_some(),
            restriction_event_id: state.restricted,
            as_of: None,
            position: None,
        }
    }
}

pub(crate) async fn contact_consent(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Query(q): Query<ContactConsentQuery>,
) -> Result<Ok200<ContactConsent>, ApiError> {
    let org = a.caller.org_id;
    // Checked also when `as_of` makes them moot: a bad parameter is refused, never
    // ignored.
    let (pos, wait) = consistency(q.min_position, q.wait_ms)?;
    if let Some(Time(as_of)) = q.as_of {
        let client = s.pool.get().await?;
        if !state::contact_exists(&s.executor, &client, org, id).await? {
            return Err(ApiError::NotFound("contact not found"));
        }
        let past = state::consent_state(&s.executor, &client, org, id, Some(as_of)).await?;
        let mut body = ContactConsent::new(id, &past, &a.access.policy, as_of);
        body.as_of = Some(as_of);
        return Ok(Ok200(body));
    }
    s.await_projection("consent_state", pos, wait).await?;
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, org).await?;
    let view = state_rm::get(&tx, org, id)
        .await?
        .ok_or(ApiError::NotFound("contact not found"))?;
    let mut body = ContactConsent::new(id, &view.state, &a.access.policy, Utc::now());
    body.position = Some(view.last_position);
    Ok(Ok200(body))
}

// ---- POST /v1/consent/check ----------------------------------------------------------

/// `POST /v1/consent/check`: may a message on `channel` for `purpose` go to each of
/// these contacts now?
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "channel": "email", "purpose": "marketing",
    "contact_ids": ["0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a11"]
}))]
pub(crate) struct CheckInput {
    #[schema(value_type = ChannelName)]
    channel: Channel,
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    purpose: String,
    /// At most 10,000.
    #[schema(max_items = 10000)]
    contact_ids: Vec<Uuid>,
}

/// Why a contact may or may not be messaged: the send gate's reason code
/// (docs/consent.md), `contact_unknown` (no such contact) or `no_contact_point` (the
/// contact has no address or number for the channel).
pub(crate) struct CheckReason;

impl utoipa::PartialSchema for CheckReason {
    fn schema() -> RefOr<Schema> {
        let names = Reason::ALL
            .iter()
            .map(super::schemas::wire_name)
            .chain(["contact_unknown".to_owned(), "no_contact_point".to_owned()]);
        RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(names))
                .build(),
        ))
    }
}

impl ToSchema for CheckReason {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CheckReason")
    }
}

/// The answer for one contact.
#[derive(Serialize, ToSchema)]
pub(crate) struct CheckResult {
    contact_id: Uuid,
    allowed: bool,
    #[schema(value_type = CheckReason)]
    reason: String,
    /// The events the decision rests on.
    relied_on: Vec<Uuid>,
}

/// One answer per asked contact, in the order asked.
#[derive(Serialize, ToSchema)]
pub(crate) struct CheckResults {
    /// The moment the gate decided for (quiet hours, expiries).
    checked_at: DateTime<Utc>,
    results: Vec<CheckResult>,
}

pub(crate) async fn check(
    s: AppState,
    a: Authed,
    Json(input): Json<CheckInput>,
) -> Result<Ok200<CheckResults>, ApiError> {
    let mut errors = Vec::new();
    let purpose = PurposeKey::parse(&input.purpose)
        .map_err(|e| errors.push(FieldError::new("purpose", e.0)))
        .ok();
    if input.contact_ids.len() > MAX_CHECK {
        errors.push(FieldError::new(
            "contact_ids",
            format!("at most {MAX_CHECK} contacts per check"),
        ));
    }
    let Some(purpose) = purpose.filter(|_| errors.is_empty()) else {
        return Err(ApiError::Validation(errors));
    };
    let org = a.caller.org_id;
    let now = Utc::now();
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, org).await?;
    let (settings, has_suppressions) = privacy::load_with_suppressions(&tx, org).await?;
    // The suppression list's key, only when it has entries to compare: from this
    // process's memory, else on a connection of its own (the read is read-only, and a
    // first use creates the key).
    let crypto = s.executor.crypto();
    let key = match (
        has_suppressions,
        crypto.cached_org_secret(&org, SUPPRESSION),
    ) {
        (false, _) => None,
        (true, Some(key)) => Some(key),
        (true, None) => {
            let keys = s.pool.get().await?;
            let key = crypto.org_secret(&keys, &org, SUPPRESSION).await;
            Some(key.map_err(crm_infra::store::event_store::StoreError::from)?)
        }
    };
    let checked = state_rm::check(
        &tx,
        org,
        (&settings.gate_settings(), key.as_deref()),
        state_rm::CheckFor {
            channel: input.channel,
            purpose: &purpose,
            contact_ids: &input.contact_ids,
        },
        now,
    )
    .await?;
    let results = input
        .contact_ids
        .iter()
        .zip(checked)
        .map(|(id, c)| match c {
            Checked::Unknown => CheckResult {
                contact_id: *id,
                allowed: false,
                reason: "contact_unknown".into(),
                relied_on: vec![],
            },
            Checked::NoContactPoint => CheckResult {
                contact_id: *id,
                allowed: false,
                reason: "no_contact_point".into(),
                relied_on: vec![],
            },
            Checked::Decided(d) => CheckResult {
                contact_id: *id,
                allowed: d.allowed,
                reason: super::schemas::wire_name(&d.reason),
                relied_on: d.relied_on,
            },
        })
        .collect();
    Ok(Ok200(CheckResults {
        checked_at: now,
        results,
    }))
}
