//! Consent commands (`/v1/contacts/{id}/consent…`, Do Not Contact, the CCPA opt-out),
//! the organisation's privacy settings and purposes (`/v1/privacy…`), receipts, and the
//! public endpoints a contact reaches from a message (double opt-in confirmation,
//! one-click unsubscribe). Every change is an event with its proof; every request that
//! identifies a contact and carries `Sec-GPC: 1` also records an opt-out of sale and
//! sharing for that contact, in the same request.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use crm_domain::consent::gate::Request;
use crm_domain::consent::ledger::{Choice, ConsentCommand, ConsentEvent, ConsentLedger, Rules};
use crm_domain::consent::privacy::{PrivacyCommand, PrivacySettings, PurposeDefinition};
use crm_domain::consent::proof::{CaptureSource, ConsentProof, Jurisdiction, LanguageTag, Notice};
use crm_domain::consent::{Channel, LawfulBasis, PrivacyMode, Purpose, PurposeKey};
use crm_domain::message::Content;
use crm_domain::metadata::{EventMetadata, Principal, PrincipalKind};
use crm_domain::values::{InvalidValue, Line, TimeZone};
use crm_infra::commands::executor::CommandOutcome;
use crm_infra::consent::state::Presence;
use crm_infra::consent::{ledger, privacy, state};
use crm_infra::store::decode::decode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::schemas::{
    CaptureSourceName, ChannelName, LawfulBasisName, Outcome, PrivacyModeName, TimeZoneName,
};
use super::Authed;
use crate::edge::context::RequestContext;
use crate::edge::extract::{Id, Json, Query};
use crate::edge::reply::{Created, Ok200};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

// ---- bodies ------------------------------------------------------------------------

/// The notice shown when the choice was made.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoticeInput {
    /// The notice's (privacy policy's, consent text's) identifier.
    #[schema(max_length = 300, pattern = "@line")]
    id: String,
    #[schema(max_length = 300, pattern = "@line")]
    version: String,
    /// SHA-256 of the text shown, 64 hexadecimal digits.
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    sha256: String,
}

/// `POST /v1/contacts/{id}/consent`: one consent change with its proof.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "channel": "email", "purpose": "marketing", "status": "granted", "source": "form",
    "notice": {"id": "privacy-policy", "version": "2026-01", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"},
    "language": "en", "jurisdiction": "EU"
}))]
pub(crate) struct ConsentInput {
    #[schema(value_type = ChannelName)]
    channel: Channel,
    #[schema(value_type = String, pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    purpose: String,
    /// `granted`, `withdrawn` or `denied`.
    #[schema(value_type = String, pattern = "^(granted|withdrawn|denied)$")]
    status: Choice,
    /// One address or number; absent: the whole channel.
    #[serde(default)]
    #[schema(max_length = 300, pattern = "@line")]
    contact_point: Option<String>,
    /// Default: the purpose's lawful basis.
    #[serde(default)]
    #[schema(value_type = Option<LawfulBasisName>)]
    lawful_basis: Option<LawfulBasis>,
    /// Default `api`.
    #[serde(default)]
    #[schema(value_type = Option<CaptureSourceName>)]
    source: Option<CaptureSource>,
    /// Required for a grant in GDPR mode.
    #[serde(default)]
    notice: Option<NoticeInput>,
    /// BCP 47 (`en`, `de-CH`).
    #[serde(default)]
    #[schema(max_length = 35, pattern = "^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")]
    language: Option<String>,
    /// `DE`, `US-CA`, `EU`.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z]{2}(-[A-Za-z0-9]{1,3})?$")]
    jurisdiction: Option<String>,
    /// A grant that holds until then.
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

/// A receipt: a compact JWS (EdDSA) over the record and its event's hash; verify it
/// with a key of `/.well-known/jwks.json`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReceiptDoc {
    /// The consent event it is for.
    event_id: Uuid,
    /// The signing key's id (`kid` of the JWKS).
    kid: String,
    jws: String,
}

/// A recorded consent change.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConsentChange {
    /// The consent event's id.
    event_id: Uuid,
    /// Its global position (pass as `min_position` to read your write).
    position: i64,
    /// The contact's consent stream version after the change.
    version: i64,
    receipt: ReceiptDoc,
}

/// `POST /v1/contacts/{id}/consent/double-opt-in`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DoubleOptInInput {
    #[schema(value_type = ChannelName)]
    channel: Channel,
    #[schema(value_type = String, pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    purpose: String,
    #[serde(default)]
    #[schema(value_type = Option<LawfulBasisName>)]
    lawful_basis: Option<LawfulBasis>,
    /// Default `form`.
    #[serde(default)]
    #[schema(value_type = Option<CaptureSourceName>)]
    source: Option<CaptureSource>,
    #[serde(default)]
    notice: Option<NoticeInput>,
    #[serde(default)]
    #[schema(max_length = 35, pattern = "^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")]
    language: Option<String>,
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z]{2}(-[A-Za-z0-9]{1,3})?$")]
    jurisdiction: Option<String>,
    /// How long the link works: 1 to 72 hours (default 72).
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(minimum = 1, maximum = 72)]
    expires_in_hours: Option<i64>,
}

/// A double opt-in request: pending until the contact confirms.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DoubleOptInStarted {
    event_id: Uuid,
    position: i64,
    /// The confirmation message, queued through the send gate.
    message_id: Uuid,
    expires_at: DateTime<Utc>,
}

/// Why (free text, optional).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReasonInput {
    #[serde(default)]
    #[schema(max_length = 300, pattern = "@line")]
    pub(crate) reason: Option<String>,
}

/// `POST /v1/public/consent/confirm`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfirmInput {
    /// The token of the confirmation link.
    #[schema(max_length = 200)]
    token: String,
}

/// A public endpoint's answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Done {
    /// What happened, for a person.
    message: String,
}

/// `POST /v1/public/unsubscribe` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct UnsubscribeQuery {
    /// The token of the message's `List-Unsubscribe` link.
    #[param(max_length = 2000)]
    token: String,
}

/// The organisation's privacy settings and purposes.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PrivacyDoc {
    #[schema(value_type = PrivacyModeName)]
    mode: PrivacyMode,
    double_opt_in_for_marketing: bool,
    /// IANA time zone for contacts without one (quiet hours).
    #[schema(value_type = TimeZoneName)]
    time_zone: String,
    purposes: Vec<PurposeDoc>,
    /// Days a contact is kept after its last change before the retention sweep erases
    /// it (null: kept until erased); a contact's own period wins (docs/rights.md).
    retention_days: Option<u32>,
    /// The preference center's colour (`#rrggbb`) and logo (a data URL), if set.
    branding_colour: Option<String>,
    branding_logo: Option<String>,
}

/// A purpose of the registry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct PurposeDoc {
    key: String,
    name: String,
    description: String,
    #[schema(value_type = LawfulBasisName)]
    default_basis: LawfulBasis,
    #[schema(value_type = Vec<ChannelName>)]
    channels: Vec<Channel>,
    /// Sells or shares personal data (a CCPA opt-out refuses it).
    sells_or_shares: bool,
    /// Its messages still go to a contact whose processing is restricted (GDPR Art.
    /// 18), as the law may require of, say, a contract's notices.
    allowed_when_restricted: bool,
    retired: bool,
}

/// `PUT /v1/privacy/settings`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrivacySettingsInput {
    #[schema(value_type = PrivacyModeName)]
    mode: PrivacyMode,
    double_opt_in_for_marketing: bool,
    /// An IANA time zone.
    #[schema(value_type = TimeZoneName)]
    time_zone: String,
    /// Why (kept with the change).
    #[schema(max_length = 300, pattern = "@line")]
    reason: String,
}

/// `PUT /v1/privacy/purposes`: defines a purpose or changes one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PurposeInput {
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    key: String,
    #[schema(max_length = 300, pattern = "@line")]
    name: String,
    #[serde(default)]
    #[schema(max_length = 2000)]
    description: Option<String>,
    #[schema(value_type = LawfulBasisName)]
    default_basis: LawfulBasis,
    #[schema(value_type = Vec<ChannelName>, min_items = 1)]
    channels: Vec<Channel>,
    #[serde(default)]
    sells_or_shares: bool,
    /// Whether its messages still go to a contact whose processing is restricted
    /// (default false).
    #[serde(default)]
    allowed_when_restricted: bool,
    #[schema(max_length = 300, pattern = "@line")]
    reason: String,
}

/// `POST /v1/privacy/purposes/retire`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetirePurposeInput {
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    key: String,
    #[schema(max_length = 300, pattern = "@line")]
    reason: String,
}

// ---- parsing -----------------------------------------------------------------------

fn purpose_key(errors: &mut Vec<FieldError>, raw: &str) -> Option<PurposeKey> {
    PurposeKey::parse(raw)
        .map_err(|e| errors.push(FieldError::new("purpose", e.0)))
        .ok()
}

fn opt<T>(
    errors: &mut Vec<FieldError>,
    name: &str,
    raw: Option<&str>,
    parse: impl Fn(&str) -> Result<T, InvalidValue>,
) -> Option<T> {
    raw.and_then(|v| {
        parse(v)
            .map_err(|e| errors.push(FieldError::new(name, e.0)))
            .ok()
    })
}

fn notice(errors: &mut Vec<FieldError>, n: Option<&NoticeInput>) -> Option<Notice> {
    let n = n?;
    let before = errors.len();
    let id = opt(errors, "notice.id", Some(&n.id), Line::parse);
    let version = opt(errors, "notice.version", Some(&n.version), Line::parse);
    let sha256 = opt(
        errors,
        "notice.sha256",
        Some(&n.sha256),
        crm_domain::consent::proof::NoticeHash::parse,
    );
    if errors.len() > before {
        return None;
    }
    Some(Notice {
        id: id?,
        version: version?,
        sha256: sha256?,
    })
}

/// Checks a contact point for its channel (an e-mail address, an E.164 number).
fn contact_point(
    errors: &mut Vec<FieldError>,
    channel: Channel,
    raw: Option<&str>,
) -> Option<String> {
    crm_infra::consent::parse_point(channel, raw?)
        .map_err(|e| errors.push(FieldError::new("contact_point", e.0)))
        .ok()
}

fn validation(errors: Vec<FieldError>) -> Result<(), ApiError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(errors))
    }
}

pub(crate) fn rules(settings: &PrivacySettings) -> Rules {
    Rules {
        mode: settings.mode,
        double_opt_in_for_marketing: settings.double_opt_in_for_marketing,
    }
}

/// The purpose must be in the registry and not retired, for recording a change.
fn registered<'s>(
    settings: &'s PrivacySettings,
    key: &PurposeKey,
) -> Result<&'s PurposeDefinition, ApiError> {
    match settings.purpose(key) {
        Some(p) if !p.purpose.retired => Ok(p),
        Some(_) => Err(ApiError::Conflict(format!(
            "purpose `{key}` is retired: no new consent is recorded for it"
        ))),
        None => Err(ApiError::Validation(vec![FieldError::new(
            "purpose",
            format!("no purpose `{key}` in this organisation's registry"),
        )])),
    }
}

/// The contact exists and was not erased (409 `erased`: nothing more is recorded about
/// an erased contact).
async fn require_contact(s: &AppState, org_id: Uuid, contact_id: Uuid) -> Result<(), ApiError> {
    let client = s.pool.get().await?;
    match state::contact_presence(&s.executor, &client, org_id, contact_id).await? {
        Presence::Live => Ok(()),
        Presence::Missing => Err(ApiError::NotFound("contact not found")),
        Presence::Erased => Err(ApiError::erased()),
    }
}

// ---- receipts ----------------------------------------------------------------------

/// The claims a receipt signs: the record's fields (the contact point only as its
/// SHA-256: a receipt is kept in clear, and erasure must not depend on it), the event
/// and its hash.
fn receipt_claims(
    org_id: Uuid,
    event_id: Uuid,
    event_hash: &str,
    recorded_at: DateTime<Utc>,
    event: &ConsentEvent,
) -> Value {
    let consent = match event.record() {
        Some(r) => json!({
            "action": event.event_type(),
            "channel": r.channel,
            "purpose": r.purpose,
            "status": r.status,
            "contact_point_sha256": r.contact_point.map(|p| state::point_sha256(r.channel, p)),
            "lawful_basis": r.proof.lawful_basis,
            "source": r.proof.source,
            "notice": r.proof.notice,
            "language": r.proof.language,
            "jurisdiction": r.proof.jurisdiction,
            "expires_at": r.proof.expires_at,
            "import_id": r.proof.import_id,
        }),
        None => json!({ "action": event.event_type() }),
    };
    json!({
        "iss": "crm-consent",
        "sub": event.contact_id(),
        "jti": event_id,
        "org": org_id,
        "iat": recorded_at.timestamp(),
        "consent": consent,
        "event_hash": event_hash,
    })
}

/// The consent event this request just wrote (the last of `events`, as `outcome`
/// wrote it), its receipt signed and stored.
async fn change_with_receipt(
    s: &AppState,
    org_id: Uuid,
    outcome: &CommandOutcome,
    events: &[ConsentEvent],
) -> Result<ConsentChange, ApiError> {
    let (Some(written), Some(event)) = (outcome.appended.last(), events.last()) else {
        return Err(ApiError::Conflict("nothing changed".into()));
    };
    let claims = receipt_claims(
        org_id,
        written.event_id,
        &written.hash,
        written.recorded_at,
        event,
    );
    // A new event has no receipt yet: sign and store (a racing GET stores the same).
    let signed = s.receipts.sign(&claims).await.map_err(ApiError::internal)?;
    let client = s.pool.get().await?;
    let receipt = crm_infra::receipts::store(&client, org_id, written.event_id, &signed)
        .await
        .map_err(ApiError::internal)?;
    Ok(ConsentChange {
        event_id: written.event_id,
        position: written.global_position,
        version: outcome.version,
        receipt: ReceiptDoc {
            event_id: written.event_id,
            kid: receipt.kid,
            jws: receipt.jws,
        },
    })
}

/// `GET /v1/consent/receipts/{id}`: the receipt of a consent event (issued now if the
/// request that recorded the change ended before it could).
pub(crate) async fn receipt(
    s: AppState,
    a: Authed,
    Id(event_id): Id,
) -> Result<Ok200<ReceiptDoc>, ApiError> {
    let org_id = a.caller.org_id;
    let client = s.pool.get().await?;
    let stored = crm_infra::store::event_store::read_by_id(&client, org_id, event_id)
        .await?
        .filter(|e| e.aggregate_type == "consent")
        .ok_or(ApiError::NotFound("no consent event with this id"))?;
    let (hash, recorded_at) = (stored.hash.clone(), stored.recorded_at);
    let decoded = decode(s.executor.crypto(), &client, stored).await?;
    let event: ConsentEvent = decoded.typed()?;
    let claims = receipt_claims(org_id, event_id, &hash, recorded_at, &event);
    let r = s
        .receipts
        .issue(&client, org_id, event_id, &claims)
        .await
        .map_err(ApiError::internal)?;
    Ok(Ok200(ReceiptDoc {
        event_id,
        kid: r.kid,
        jws: r.jws,
    }))
}

// ---- consent commands --------------------------------------------------------------

/// What a consent change's body says, checked without reading anything.
pub(crate) struct Checked {
    purpose: PurposeKey,
    point: Option<String>,
    notice: Option<Notice>,
    language: Option<LanguageTag>,
    jurisdiction: Option<Jurisdiction>,
}

/// The checks of a consent change that need its body only: [`record`]'s first, and an
/// AI action's when it proposes one.
pub(crate) fn check_consent_input(input: &ConsentInput) -> Result<Checked, ApiError> {
    let mut errors = Vec::new();
    let purpose = purpose_key(&mut errors, &input.purpose);
    let point = contact_point(&mut errors, input.channel, input.contact_point.as_deref());
    let notice = notice(&mut errors, input.notice.as_ref());
    let language = opt(
        &mut errors,
        "language",
        input.language.as_deref(),
        LanguageTag::parse,
    );
    let jurisdiction = opt(
        &mut errors,
        "jurisdiction",
        input.jurisdiction.as_deref(),
        Jurisdiction::parse,
    );
    validation(errors)?;
    Ok(Checked {
        purpose: purpose.expect("parsed"),
        point,
        notice,
        language,
        jurisdiction,
    })
}

pub(crate) async fn record(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
    Json(input): Json<ConsentInput>,
) -> Result<Created<ConsentChange>, ApiError> {
    let org_id = a.caller.org_id;
    let Checked {
        purpose,
        point,
        notice,
        language,
        jurisdiction,
    } = check_consent_input(&input)?;
    // The settings, whether the contact exists and its consent stream: one round trip.
    let (settings, exists, loaded) = {
        let client = s.pool.get().await?;
        let id = contact_id.to_string();
        futures::try_join!(
            privacy::load(&client, org_id),
            state::contact_presence(&s.executor, &client, org_id, contact_id),
            s.executor.load::<ConsentLedger>(&client, org_id, &id),
        )?
    };
    let def = registered(&settings, &purpose)?;
    if !def.purpose.channels.contains(&input.channel) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "channel",
            format!("purpose `{purpose}` does not cover this channel"),
        )]));
    }
    match exists {
        Presence::Live => {}
        Presence::Missing => return Err(ApiError::NotFound("contact not found")),
        Presence::Erased => return Err(ApiError::erased()),
    }
    let proof = ConsentProof {
        lawful_basis: input.lawful_basis.unwrap_or(def.purpose.default_basis),
        source: input.source.unwrap_or(CaptureSource::Api),
        notice,
        language,
        jurisdiction,
        expires_at: input.expires_at,
        import_id: None,
    };
    let command = ConsentCommand::Record {
        contact_id,
        channel: input.channel,
        purpose,
        contact_point: point,
        choice: input.status,
        proof,
        rules: rules(&settings),
    };
    let (outcome, events) = ledger::execute_returning(
        &s.executor,
        org_id,
        contact_id,
        command,
        &a.metadata(),
        Some(loaded),
    )
    .await?;
    let change = change_with_receipt(&s, org_id, &outcome, &events).await?;
    Ok(Created {
        location: format!("/v1/consent/receipts/{}", change.event_id),
        body: change,
    })
}

pub(crate) async fn set_do_not_contact(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
    Json(input): Json<ReasonInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let reason = reason(input.reason)?;
    require_contact(&s, a.caller.org_id, contact_id).await?;
    let o = ledger::execute(
        &s.executor,
        a.caller.org_id,
        contact_id,
        ConsentCommand::SetDoNotContact { contact_id, reason },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) async fn lift_do_not_contact(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
    Json(input): Json<ReasonInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let reason = reason(input.reason)?;
    require_contact(&s, a.caller.org_id, contact_id).await?;
    let o = ledger::execute(
        &s.executor,
        a.caller.org_id,
        contact_id,
        ConsentCommand::LiftDoNotContact { reason },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) async fn opt_out_of_sale(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
    require_contact(&s, a.caller.org_id, contact_id).await?;
    let o = ledger::execute(
        &s.executor,
        a.caller.org_id,
        contact_id,
        ConsentCommand::OptOutOfSaleOrSharing {
            contact_id,
            source: CaptureSource::Api,
            global_privacy_control: a.ctx.global_privacy_control,
        },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) async fn lift_sale_opt_out(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
    require_contact(&s, a.caller.org_id, contact_id).await?;
    let o = ledger::execute(
        &s.executor,
        a.caller.org_id,
        contact_id,
        ConsentCommand::LiftSaleOrSharingOptOut {
            source: CaptureSource::Api,
        },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) fn reason(raw: Option<String>) -> Result<Option<String>, ApiError> {
    let mut errors = Vec::new();
    let r = opt(&mut errors, "reason", raw.as_deref(), Line::parse);
    validation(errors)?;
    Ok(r.map(|l| l.to_string()))
}

/// A random single-use token (base64url, 256 bits) and its SHA-256 (hex).
fn new_token() -> (String, String) {
    use base64::Engine;
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    (token, digest)
}

fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

pub(crate) async fn request_double_opt_in(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
    Json(input): Json<DoubleOptInInput>,
) -> Result<Created<DoubleOptInStarted>, ApiError> {
    let org_id = a.caller.org_id;
    let mut errors = Vec::new();
    let purpose = purpose_key(&mut errors, &input.purpose);
    let notice = notice(&mut errors, input.notice.as_ref());
    let language = opt(
        &mut errors,
        "language",
        input.language.as_deref(),
        LanguageTag::parse,
    );
    let jurisdiction = opt(
        &mut errors,
        "jurisdiction",
        input.jurisdiction.as_deref(),
        Jurisdiction::parse,
    );
    let hours = input.expires_in_hours.unwrap_or(72);
    if !(1..=72).contains(&hours) {
        errors.push(FieldError::new(
            "expires_in_hours",
            "must be between 1 and 72",
        ));
    }
    if input.channel != Channel::Email {
        errors.push(FieldError::new(
            "channel",
            "double opt-in confirms by e-mail: only `email` is supported",
        ));
    }
    validation(errors)?;
    let purpose = purpose.expect("parsed");
    let mut gate = s
        .gate
        .load(org_id, contact_id)
        .await?
        .ok_or(ApiError::NotFound("contact not found"))?;
    let settings = gate.settings.clone();
    let def = registered(&settings, &purpose)?;
    let Some(to) = state::contact_point(&gate.points, Channel::Email) else {
        return Err(ApiError::Validation(vec![FieldError::new(
            "channel",
            "the contact has no e-mail address",
        )]));
    };
    let now = Utc::now();
    let expires_at = now + chrono::Duration::hours(hours);
    let (token, digest) = new_token();
    let message_id = Uuid::now_v7();
    let request_id = Uuid::now_v7();
    let proof = ConsentProof {
        lawful_basis: input.lawful_basis.unwrap_or(def.purpose.default_basis),
        source: input.source.unwrap_or(CaptureSource::Form),
        notice,
        language,
        jurisdiction,
        expires_at: None,
        import_id: None,
    };
    let meta = a.metadata();
    let outcome = ledger::execute(
        &s.executor,
        org_id,
        contact_id,
        ConsentCommand::RequestConfirmation {
            contact_id,
            request_id,
            channel: Channel::Email,
            purpose: purpose.clone(),
            contact_point: Some(crm_infra::consent::normalize_point(Channel::Email, &to)),
            proof,
            token_sha256: digest,
            expires_at,
            message_id,
            now,
            rules: rules(&settings),
        },
        &meta,
    )
    .await?;
    let written = outcome
        .appended
        .last()
        .ok_or_else(|| ApiError::internal("the confirmation request wrote no event"))?;
    let (event_id, position) = (written.event_id, written.global_position);
    // The confirmation is a message like any other: it passes the send gate (as a
    // `service` message: Do Not Contact and the suppression list still stop it).
    let base = s.settings.mail.link_base.trim_end_matches('/');
    let content = Content {
        to: to.clone(),
        subject: Some(format!("Please confirm: {}", def.name)),
        body: format!(
            "Please confirm that you want to receive {}.\n\nConfirm within {hours} hours (the link works once):\n{base}/consent/confirm#token={token}\n\nIf you did not ask for this, ignore this message: nothing will be sent.",
            def.name.to_lowercase()
        ),
    };
    let request = Request {
        channel: Channel::Email,
        purpose: PurposeKey::parse("service").expect("valid key"),
        contact_point: to,
    };
    super::messages::submit(
        &s, &mut gate, org_id, contact_id, message_id, request, content, &meta,
    )
    .await?;
    Ok(Created {
        location: format!("/v1/messages/{message_id}"),
        body: DoubleOptInStarted {
            event_id,
            position,
            message_id,
            expires_at,
        },
    })
}

/// The one way a contact opts out (the RFC 8058 link, the preference center): a
/// withdrawal of each (channel, purpose) of `targets` for the whole channel, each an
/// event with `source` and the request's IP and user agent, then the CCPA opt-out when
/// the request carries `Sec-GPC: 1`.
pub(crate) async fn opt_out(
    s: &AppState,
    ctx: &RequestContext,
    (org_id, contact_id): (Uuid, Uuid),
    targets: &[(Channel, PurposeKey)],
    source: CaptureSource,
    meta: &EventMetadata,
) -> Result<(), ApiError> {
    let settings = {
        let client = s.pool.get().await?;
        privacy::load(&client, org_id).await?
    };
    for (channel, purpose) in targets {
        let basis = settings
            .purpose(purpose)
            .map(|p| p.purpose.default_basis)
            .unwrap_or(LawfulBasis::Consent);
        ledger::execute(
            &s.executor,
            org_id,
            contact_id,
            ConsentCommand::Record {
                contact_id,
                channel: *channel,
                purpose: purpose.clone(),
                contact_point: None,
                choice: Choice::Withdrawn,
                proof: ConsentProof {
                    lawful_basis: basis,
                    source,
                    notice: None,
                    language: None,
                    jurisdiction: None,
                    expires_at: None,
                    import_id: None,
                },
                rules: rules(&settings),
            },
            meta,
        )
        .await?;
    }
    honour_gpc(s, ctx, org_id, contact_id, source, meta).await
}

/// Records an opt-out of sale and sharing when the request carries `Sec-GPC: 1` and the
/// contact has not opted out yet (a no-op otherwise).
pub(crate) async fn honour_gpc(
    s: &AppState,
    ctx: &RequestContext,
    org_id: Uuid,
    contact_id: Uuid,
    source: CaptureSource,
    meta: &EventMetadata,
) -> Result<(), ApiError> {
    if !ctx.global_privacy_control {
        return Ok(());
    }
    ledger::execute(
        &s.executor,
        org_id,
        contact_id,
        ConsentCommand::OptOutOfSaleOrSharing {
            contact_id,
            source,
            global_privacy_control: true,
        },
        meta,
    )
    .await?;
    Ok(())
}

pub(crate) fn contact_metadata(
    ctx: &RequestContext,
    org_id: Uuid,
    contact_id: Uuid,
) -> EventMetadata {
    super::event_metadata(
        ctx,
        org_id,
        Principal {
            kind: PrincipalKind::Portal,
            id: contact_id.to_string(),
        },
    )
}

/// `POST /v1/public/consent/confirm`: the contact confirms a double opt-in.
pub(crate) async fn confirm(
    s: AppState,
    ctx: RequestContext,
    Json(input): Json<ConfirmInput>,
) -> Result<Ok200<Done>, ApiError> {
    let unknown = ApiError::NotFound("the confirmation link is unknown, used or expired");
    let digest = token_sha256(&input.token);
    let found = {
        let client = s.pool.get().await?;
        ledger::find_confirmation(&client, &digest).await?
    };
    let Some((org_id, contact_id)) = found else {
        return Err(unknown);
    };
    let meta = contact_metadata(&ctx, org_id, contact_id);
    ledger::execute(
        &s.executor,
        org_id,
        contact_id,
        ConsentCommand::Confirm {
            token_sha256: digest,
            now: Utc::now(),
        },
        &meta,
    )
    .await?;
    honour_gpc(
        &s,
        &ctx,
        org_id,
        contact_id,
        CaptureSource::DoubleOptIn,
        &meta,
    )
    .await?;
    Ok(Ok200(Done {
        message: "Thank you: your consent is confirmed.".into(),
    }))
}

/// `POST /v1/public/unsubscribe?token=…`: RFC 8058 one-click unsubscribe. Takes effect
/// at once: the withdrawal is an event before the answer.
pub(crate) async fn unsubscribe(
    s: AppState,
    ctx: RequestContext,
    Query(q): Query<UnsubscribeQuery>,
) -> Result<Ok200<Done>, ApiError> {
    let Some(link) = s.tokens.verify_unsubscribe(&q.token) else {
        return Err(ApiError::NotFound("the unsubscribe link is unknown"));
    };
    let meta = contact_metadata(&ctx, link.org_id, link.contact_id);
    opt_out(
        &s,
        &ctx,
        (link.org_id, link.contact_id),
        &[(link.channel, link.purpose.clone())],
        CaptureSource::UnsubscribeLink,
        &meta,
    )
    .await?;
    Ok(Ok200(Done {
        message: "You are unsubscribed.".into(),
    }))
}

// ---- privacy settings --------------------------------------------------------------

fn privacy_doc(p: &PrivacySettings) -> PrivacyDoc {
    PrivacyDoc {
        mode: p.mode,
        double_opt_in_for_marketing: p.double_opt_in_for_marketing,
        time_zone: p.time_zone.name().to_owned(),
        retention_days: p.retention_days,
        branding_colour: p.branding.colour.clone(),
        branding_logo: p.branding.logo.clone(),
        purposes: p
            .purposes
            .iter()
            .map(|d| PurposeDoc {
                key: d.purpose.key.to_string(),
                name: d.name.clone(),
                description: d.description.clone(),
                default_basis: d.purpose.default_basis,
                channels: d.purpose.channels.clone(),
                sells_or_shares: d.purpose.sells_or_shares,
                allowed_when_restricted: d.purpose.allowed_when_restricted,
                retired: d.purpose.retired,
            })
            .collect(),
    }
}

pub(crate) async fn get_privacy(s: AppState, a: Authed) -> Result<Ok200<PrivacyDoc>, ApiError> {
    let client = s.pool.get().await?;
    let p = privacy::load(&client, a.caller.org_id).await?;
    Ok(Ok200(privacy_doc(&p)))
}

fn required_line(errors: &mut Vec<FieldError>, name: &str, raw: &str) -> String {
    opt(errors, name, Some(raw), Line::parse)
        .map(|l| l.to_string())
        .unwrap_or_default()
}

pub(crate) async fn configure_privacy(
    s: AppState,
    a: Authed,
    Json(input): Json<PrivacySettingsInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let mut errors = Vec::new();
    let tz = opt(
        &mut errors,
        "time_zone",
        Some(&input.time_zone),
        TimeZone::parse,
    );
    let reason = required_line(&mut errors, "reason", &input.reason);
    validation(errors)?;
    let o = privacy::execute(
        &s.executor,
        a.caller.org_id,
        PrivacyCommand::Configure {
            mode: input.mode,
            double_opt_in_for_marketing: input.double_opt_in_for_marketing,
            time_zone: tz.expect("parsed").0,
            reason,
        },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

/// `PUT /v1/privacy/retention`, and `PUT /v1/contacts/{id}/retention`: a period in
/// days (1 to 36,500), or null for none (the organisation's) again.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetentionInput {
    /// Days (null: none, or the organisation's again).
    #[serde(deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(value_type = Option<i64>, required = true, minimum = 1, maximum = 36500)]
    days: Option<i64>,
    /// Why (kept with the change).
    #[serde(default)]
    #[schema(max_length = 300, pattern = "@line")]
    reason: Option<String>,
}

/// `PUT /v1/privacy/retention`: the organisation's period in days (1 to 36,500), or
/// null for none, and why.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrgRetentionInput {
    #[serde(deserialize_with = "crate::edge::extract::whole_number")]
    #[schema(value_type = Option<i64>, required = true, minimum = 1, maximum = 36500)]
    days: Option<i64>,
    #[schema(max_length = 300, pattern = "@line")]
    reason: String,
}

impl RetentionInput {
    /// The period, checked: (days, reason).
    pub(crate) fn parse(self) -> Result<(Option<u32>, Option<String>), ApiError> {
        let days = match self.days {
            None => None,
            Some(d) if (1..=36_500).contains(&d) => Some(d as u32),
            Some(_) => {
                return Err(ApiError::Validation(vec![FieldError::new(
                    "days",
                    "1 to 36,500 days, or null",
                )]))
            }
        };
        let mut errors = Vec::new();
        let reason = self
            .reason
            .map(|r| required_line(&mut errors, "reason", &r));
        validation(errors)?;
        Ok((days, reason))
    }
}

pub(crate) async fn set_retention(
    s: AppState,
    a: Authed,
    Json(input): Json<OrgRetentionInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let (days, reason) = RetentionInput {
        days: input.days,
        reason: Some(input.reason),
    }
    .parse()?;
    let reason = reason.unwrap_or_default();
    let o = privacy::execute(
        &s.executor,
        a.caller.org_id,
        PrivacyCommand::SetRetention { days, reason },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

/// `PUT /v1/privacy/branding`: how the preference center looks (null: the service's).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BrandingInput {
    /// `#rrggbb`: the pages' accent (their text is black or white, whichever reads).
    #[serde(default)]
    #[schema(pattern = "^#[0-9a-fA-F]{6}$")]
    colour: Option<String>,
    /// A `data:image/png|jpeg|webp;base64,…` URL, at most 64 KiB.
    #[serde(default)]
    #[schema(
        max_length = 65536,
        pattern = "^data:image/(png|jpeg|webp);base64,[A-Za-z0-9+/=]+$"
    )]
    logo: Option<String>,
    #[schema(max_length = 300, pattern = "@line")]
    reason: String,
}

pub(crate) async fn set_branding(
    s: AppState,
    a: Authed,
    Json(input): Json<BrandingInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let mut errors = Vec::new();
    let reason = required_line(&mut errors, "reason", &input.reason);
    validation(errors)?;
    let branding = crm_domain::consent::privacy::Branding {
        colour: input.colour.map(|c| c.to_ascii_lowercase()),
        logo: input.logo,
    };
    let o = privacy::execute(
        &s.executor,
        a.caller.org_id,
        PrivacyCommand::SetBranding { branding, reason },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) async fn define_purpose(
    s: AppState,
    a: Authed,
    Json(input): Json<PurposeInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let mut errors = Vec::new();
    let key = PurposeKey::parse(&input.key)
        .map_err(|e| errors.push(FieldError::new("key", e.0)))
        .ok();
    let name = required_line(&mut errors, "name", &input.name);
    let reason = required_line(&mut errors, "reason", &input.reason);
    let description = input.description.unwrap_or_default();
    if description.chars().count() > 2000 || description.contains('\0') {
        errors.push(FieldError::new(
            "description",
            "at most 2,000 characters, no NUL",
        ));
    }
    if input.channels.is_empty() {
        errors.push(FieldError::new("channels", "needs at least one channel"));
    }
    validation(errors)?;
    let definition = PurposeDefinition {
        purpose: Purpose {
            key: key.expect("parsed"),
            default_basis: input.default_basis,
            channels: input.channels,
            retired: false,
            sells_or_shares: input.sells_or_shares,
            allowed_when_restricted: input.allowed_when_restricted,
        },
        name,
        description,
    };
    let o = privacy::execute(
        &s.executor,
        a.caller.org_id,
        PrivacyCommand::DefinePurpose { definition, reason },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) async fn retire_purpose(
    s: AppState,
    a: Authed,
    Json(input): Json<RetirePurposeInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let mut errors = Vec::new();
    let key = PurposeKey::parse(&input.key)
        .map_err(|e| errors.push(FieldError::new("key", e.0)))
        .ok();
    let reason = required_line(&mut errors, "reason", &input.reason);
    validation(errors)?;
    let o = privacy::execute(
        &s.executor,
        a.caller.org_id,
        PrivacyCommand::RetirePurpose {
            key: key.expect("parsed"),
            reason,
        },
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

// ---- imports -----------------------------------------------------------------------

/// The format of an import's rows.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ImportFormat {
    /// A header row naming the columns, then one row per change.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// `POST /v1/consent/imports`: many consent changes at once, each recorded with source
/// `import` and the import's id. Columns: `contact_id`, `channel`, `purpose`, `status`,
/// and optionally `contact_point`, `lawful_basis`, `notice_id`, `notice_version`,
/// `notice_sha256`, `language`, `jurisdiction`, `expires_at`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "format": "csv",
    "data": "contact_id,channel,purpose,status,notice_id,notice_version,notice_sha256\n0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a11,email,marketing,granted,pp,3,9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
}))]
pub(crate) struct ImportInput {
    format: ImportFormat,
    /// The file's text (at most 100,000 rows; the body at most 4 MiB).
    data: String,
}

/// A row that was not recorded.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ImportRowError {
    /// The row's line in the file (the CSV header is line 1).
    line: usize,
    /// The column at fault, when there is one.
    field: Option<String>,
    message: String,
}

/// What an import did: every valid row recorded, every other named.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ImportReport {
    import_id: Uuid,
    rows: usize,
    recorded: usize,
    errors: Vec<ImportRowError>,
}

pub(crate) fn import_report(r: crm_infra::consent::import::Report) -> ImportReport {
    ImportReport {
        import_id: r.import_id,
        rows: r.rows,
        recorded: r.recorded,
        errors: r
            .errors
            .into_iter()
            .map(|e| ImportRowError {
                line: e.line,
                field: e.field,
                message: e.message,
            })
            .collect(),
    }
}

pub(crate) async fn import(
    s: AppState,
    a: Authed,
    Json(input): Json<ImportInput>,
) -> Result<Ok200<ImportReport>, ApiError> {
    use crm_infra::consent::import::{self as imports, Format, ImportError};
    let format = match input.format {
        ImportFormat::Csv => Format::Csv,
        ImportFormat::Jsonl => Format::JsonLines,
    };
    let file_error =
        |e: ImportError| ApiError::Validation(vec![FieldError::new("data", e.to_string())]);
    let rows = imports::read(format, &input.data).map_err(file_error)?;
    let import_id = Uuid::now_v7();
    let report = imports::run(
        &s.executor,
        a.caller.org_id,
        import_id,
        rows,
        &a.metadata(),
        &|_| {},
    )
    .await
    .map_err(|e| match e {
        ImportError::Store(e) => ApiError::from(e),
        other => file_error(other),
    })?;
    Ok(Ok200(import_report(report)))
}
