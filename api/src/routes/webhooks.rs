//! `/v1/webhooks`: an organisation's webhook endpoints (docs/webhooks.md). Create one
//! (its signing secret is answered once, then only its last four characters), list,
//! read, change, rotate the secret (the old one stays valid for a grace period),
//! disable, enable, replay, delete; and the delivery log: an endpoint's messages and a
//! message's attempts. `GET /v1/events/types` is the catalogue of public event types.
//! Everything is scoped by organisation: another organisation's endpoint reads as
//! absent (404).

use chrono::{DateTime, Utc};
use crm_domain::access::{Permission, Policy, RoleRef};
use crm_domain::public_events;
use crm_domain::webhook::{self, EndpointSettings, EndpointUrl, Replay, WebhookError};
use crm_infra::commands::executor::CommandError;
use crm_infra::webhooks::endpoints::{self, EndpointRow, WebhookAdminError};
use crm_infra::webhooks::log::{self, AttemptRow, MessageFilter, MessageRow};
use crm_infra::webhooks::{net, signer};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{parse_limit, query_error, Authed};
use crate::edge::extract::{Id, Json, Query, SecondId};
use crate::edge::reply::{Accepted, Created, NoContent, Ok200};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// `POST /v1/webhooks`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"url": "https://hooks.example.com/crm", "event_types": ["contact.created", "consent.changed"], "role": "viewer"}))]
pub(crate) struct WebhookInput {
    /// Where deliveries go: `http(s)`, with a host, without user, password or
    /// fragment. Addresses of the service's own networks are refused.
    #[schema(min_length = 1, max_length = 2048, pattern = "@line")]
    url: String,
    /// Public event types (`GET /v1/events/types`); the role must be allowed to read
    /// each.
    #[schema(min_items = 1, max_items = 64)]
    event_types: Vec<String>,
    /// The role whose permissions and field visibility shape the payloads: a built-in
    /// role's name or a custom role's id.
    #[schema(min_length = 1, max_length = 64, pattern = "@line")]
    role: String,
    #[schema(max_length = 200, pattern = "@line")]
    description: Option<String>,
    /// One delivery at a time, in event order (default false).
    ordered: Option<bool>,
}

/// `PATCH /v1/webhooks/{id}`: what is given replaces what is there.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"event_types": ["contact.created"]}))]
pub(crate) struct WebhookPatch {
    #[schema(min_length = 1, max_length = 2048, pattern = "@line")]
    url: Option<String>,
    #[schema(min_items = 1, max_items = 64)]
    event_types: Option<Vec<String>>,
    #[schema(min_length = 1, max_length = 64, pattern = "@line")]
    role: Option<String>,
    #[schema(max_length = 200, pattern = "@line")]
    description: Option<String>,
    ordered: Option<bool>,
}

/// `POST /v1/webhooks/{id}/rotate`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"grace_hours": 24}))]
pub(crate) struct RotateInput {
    /// How long the previous secret stays valid (deliveries are signed with both), in
    /// hours: 0 to 168 (default 24).
    #[schema(minimum = 0, maximum = 168)]
    #[serde(default, deserialize_with = "crate::edge::extract::whole_number")]
    grace_hours: Option<i64>,
}

/// `POST /v1/webhooks/{id}/replay`: one message, or every message since a time that
/// was not delivered.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"since": "2026-12-06T00:00:00Z"}))]
pub(crate) struct ReplayInput {
    message_id: Option<Uuid>,
    since: Option<DateTime<Utc>>,
}

/// An endpoint (never its secret).
#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookDoc {
    id: Uuid,
    url: String,
    event_types: Vec<String>,
    role: String,
    description: Option<String>,
    ordered: bool,
    /// `enabled`, `disabled` or `auto_disabled` (after a run of failures).
    status: String,
    /// The signing secret's last four characters.
    secret_last4: Option<String>,
    secret_version: u32,
    /// Until when the previous secret is valid too (after a rotation).
    previous_secret_valid_until: Option<DateTime<Utc>>,
    /// Failed attempts in a row (0 after any delivery).
    consecutive_failures: i32,
    failing_since: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    disabled_at: Option<DateTime<Utc>>,
}

impl From<EndpointRow> for WebhookDoc {
    fn from(r: EndpointRow) -> Self {
        Self {
            id: r.id,
            url: r.url,
            event_types: r.event_types,
            role: r.role.to_string(),
            description: r.description,
            ordered: r.ordered,
            status: r.status,
            secret_last4: r.secret_last4,
            secret_version: r.secret_version,
            previous_secret_valid_until: r.previous_valid_until,
            consecutive_failures: r.consecutive_failures,
            failing_since: r.failing_since,
            created_at: r.created_at,
            updated_at: r.updated_at,
            disabled_at: r.disabled_at,
        }
    }
}

/// A new endpoint with its signing secret, answered this once.
#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookCreated {
    #[serde(flatten)]
    endpoint: WebhookDoc,
    /// `whsec_` + base64 of 32 random bytes: keep it, it is not shown again.
    secret: String,
}

/// A new signing secret, answered this once.
#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookSecret {
    secret: String,
    secret_version: u32,
    /// Until when the previous secret is valid too.
    previous_secret_valid_until: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookList {
    items: Vec<WebhookDoc>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ReplayQueued {
    /// Messages queued again.
    queued: u64,
}

/// One public event type.
#[derive(Serialize, ToSchema)]
pub(crate) struct EventTypeDoc {
    /// e.g. `contact.updated`.
    r#type: String,
    /// The permission a subscriber's role needs.
    needs: String,
    /// Part of the security stream.
    security: bool,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct EventTypeList {
    /// The catalogue's version.
    version: String,
    items: Vec<EventTypeDoc>,
}

/// A message of the delivery log.
#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookMessageDoc {
    /// The `webhook-id` of every attempt is `msg_` + this id's hex.
    id: Uuid,
    webhook_id: String,
    event_id: Uuid,
    /// The event's global position.
    position: i64,
    event_type: String,
    /// `pending`, `sending`, `delivered`, `failed`, `missed` or `dropped`.
    status: String,
    attempts: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    /// The last answer's HTTP status.
    last_status: Option<i32>,
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    attempt_log: Option<Vec<WebhookAttemptDoc>>,
}

impl From<MessageRow> for WebhookMessageDoc {
    fn from(m: MessageRow) -> Self {
        Self {
            id: m.id,
            webhook_id: signer::message_id(m.id),
            event_id: m.event_id,
            position: m.position,
            event_type: m.event_type,
            status: m.status,
            attempts: m.attempts,
            next_attempt_at: m.next_attempt_at,
            created_at: m.created_at,
            finished_at: m.finished_at,
            last_status: m.last_status,
            last_error: m.last_error,
            attempt_log: None,
        }
    }
}

/// One attempt: a row without `finished_at` is one whose worker stopped mid-way.
#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookAttemptDoc {
    attempt: i32,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    status_code: Option<i32>,
    latency_ms: Option<i32>,
    error: Option<String>,
    /// The first 1,024 bytes of the answer's body.
    response_excerpt: Option<String>,
    next_attempt_at: Option<DateTime<Utc>>,
}

impl From<AttemptRow> for WebhookAttemptDoc {
    fn from(a: AttemptRow) -> Self {
        Self {
            attempt: a.attempt,
            started_at: a.started_at,
            finished_at: a.finished_at,
            status_code: a.status_code,
            latency_ms: a.latency_ms,
            error: a.error,
            response_excerpt: a.response_excerpt,
            next_attempt_at: a.next_attempt_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookMessagePage {
    items: Vec<WebhookMessageDoc>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<i64>,
}

/// Where a message of the delivery log stands.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MessageStatus {
    /// Due at `next_attempt_at`.
    Pending,
    /// An attempt is under way.
    Sending,
    Delivered,
    /// Every attempt of the schedule failed.
    Failed,
    /// The endpoint was disabled (a replay sends it).
    Missed,
    /// The endpoint's role may not receive it, or the endpoint was deleted.
    Dropped,
}

impl MessageStatus {
    fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sending => "sending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Missed => "missed",
            Self::Dropped => "dropped",
        }
    }
}

/// `GET /v1/webhooks/{id}/messages` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct MessageQuery {
    #[param(inline)]
    status: Option<MessageStatus>,
    event_type: Option<String>,
    /// Created at or after.
    since: Option<DateTime<Utc>>,
    /// Created before.
    until: Option<DateTime<Utc>>,
    /// `next_before` of the previous page.
    before: Option<i64>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

const NOT_FOUND: &str = "no such webhook endpoint";

fn answer(e: WebhookAdminError) -> ApiError {
    match e {
        WebhookAdminError::Command(CommandError::Domain(WebhookError::NotFound)) => {
            ApiError::NotFound(NOT_FOUND)
        }
        WebhookAdminError::Command(CommandError::Domain(WebhookError::AlreadyEnabled)) => {
            ApiError::StateConflict {
                code: "already_enabled",
                message: "the endpoint is already enabled",
            }
        }
        WebhookAdminError::Command(CommandError::Domain(WebhookError::AlreadyDisabled)) => {
            ApiError::StateConflict {
                code: "already_disabled",
                message: "the endpoint is already disabled",
            }
        }
        WebhookAdminError::Command(CommandError::Domain(WebhookError::NotEnabled)) => {
            ApiError::StateConflict {
                code: "endpoint_disabled",
                message: "the endpoint is disabled: enable it before replaying",
            }
        }
        WebhookAdminError::Command(CommandError::Domain(
            e @ (WebhookError::AlreadyExists
            | WebhookError::BadPurpose
            | WebhookError::NoSuchSecret),
        )) => ApiError::internal(e),
        WebhookAdminError::Command(
            CommandError::Conflict | CommandError::VersionMismatch { .. },
        ) => ApiError::Conflict(
            "another command changed this endpoint first; reload and retry".into(),
        ),
        WebhookAdminError::Command(CommandError::Store(e)) => e.into(),
        WebhookAdminError::Db(e) => e.into(),
        WebhookAdminError::Pool(e) => e.into(),
        other @ (WebhookAdminError::Vault(_) | WebhookAdminError::Corrupt(_)) => {
            ApiError::internal(other)
        }
    }
}

/// The settings an input asks for, every bad field named; the URL checked against the
/// network policy, the role against the event types.
async fn settings_of(
    s: &AppState,
    org_id: Uuid,
    url: &str,
    event_types: &[String],
    role: &str,
    description: Option<&str>,
    ordered: bool,
) -> Result<(EndpointSettings, Policy), ApiError> {
    let mut errors = Vec::new();
    let url = match EndpointUrl::parse(url) {
        Ok(u) => match net::check_url(&s.settings.webhooks.allow_nets, u.as_str()).await {
            Ok(()) => Some(u),
            Err(why) => {
                errors.push(FieldError::new("url", why));
                None
            }
        },
        Err(m) => {
            errors.push(FieldError::new("url", m));
            None
        }
    };
    let types = webhook::parse_event_types(event_types)
        .map_err(|m| errors.push(FieldError::new("event_types", m)))
        .ok();
    let description = webhook::parse_description(description)
        .map_err(|m| errors.push(FieldError::new("description", m)))
        .ok();
    let role = match RoleRef::parse(role) {
        None => {
            errors.push(FieldError::new(
                "role",
                "must be a built-in role's name or a custom role's id",
            ));
            None
        }
        Some(r) => {
            let client = s.pool.get().await?;
            match crm_infra::access::accounts::policy_of(&client, org_id, r).await? {
                None => {
                    errors.push(FieldError::new("role", "no such role in this organisation"));
                    None
                }
                Some(policy) => {
                    if let Some(types) = &types {
                        if let Some((t, needs)) = types.iter().find_map(|t| {
                            public_events::public_entry(t)
                                .filter(|e| !policy.allows(e.needs))
                                .map(|e| (t, e.needs))
                        }) {
                            errors.push(FieldError::new(
                                "event_types",
                                format!(
                                    "the role may not receive `{t}`: it needs `{}`",
                                    needs.name()
                                ),
                            ));
                        }
                    }
                    Some((r, policy))
                }
            }
        }
    };
    match (url, types, description, role) {
        (Some(url), Some(event_types), Some(description), Some((role, policy)))
            if errors.is_empty() =>
        {
            Ok((
                EndpointSettings {
                    url,
                    event_types,
                    description,
                    role,
                    ordered,
                },
                policy,
            ))
        }
        _ => Err(ApiError::Validation(errors)),
    }
}

/// A caller may only give an endpoint a role that grants nothing the caller lacks: an
/// endpoint would otherwise receive what its creator may not read.
fn check_role_within(a: &Authed, role: RoleRef, policy: &Policy) -> Result<(), ApiError> {
    if policy.is_within(&a.access.policy) {
        return Ok(());
    }
    Err(ApiError::Forbidden {
        code: "role_exceeds_yours",
        message: format!("the role `{role}` may do more than yours"),
    })
}

async fn load(s: &AppState, org: Uuid, id: Uuid) -> Result<EndpointRow, ApiError> {
    endpoints::get(&s.pool, org, id)
        .await
        .map_err(answer)?
        .ok_or(ApiError::NotFound(NOT_FOUND))
}

pub(crate) async fn create(
    s: AppState,
    a: Authed,
    Json(input): Json<WebhookInput>,
) -> Result<Created<WebhookCreated>, ApiError> {
    let org = a.caller.org_id;
    let (settings, policy) = settings_of(
        &s,
        org,
        &input.url,
        &input.event_types,
        &input.role,
        input.description.as_deref(),
        input.ordered.unwrap_or(false),
    )
    .await?;
    check_role_within(&a, settings.role, &policy)?;
    let id = Uuid::now_v7();
    let (_, secret) = endpoints::create(&s.executor, org, id, settings, &a.metadata())
        .await
        .map_err(answer)?;
    let row = load(&s, org, id).await?;
    Ok(Created {
        location: format!("/v1/webhooks/{id}"),
        body: WebhookCreated {
            endpoint: row.into(),
            secret: secret.expose_secret().to_owned(),
        },
    })
}

pub(crate) async fn list(s: AppState, a: Authed) -> Result<Ok200<WebhookList>, ApiError> {
    let items = endpoints::list(&s.pool, a.caller.org_id)
        .await
        .map_err(answer)?
        .into_iter()
        .map(WebhookDoc::from)
        .collect();
    Ok(Ok200(WebhookList { items }))
}

pub(crate) async fn get_one(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<WebhookDoc>, ApiError> {
    Ok(Ok200(load(&s, a.caller.org_id, id).await?.into()))
}

pub(crate) async fn update(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(patch): Json<WebhookPatch>,
) -> Result<Ok200<WebhookDoc>, ApiError> {
    let org = a.caller.org_id;
    let row = load(&s, org, id).await?;
    let role = patch.role.unwrap_or_else(|| row.role.to_string());
    let (settings, policy) = settings_of(
        &s,
        org,
        patch.url.as_deref().unwrap_or(&row.url),
        patch.event_types.as_deref().unwrap_or(&row.event_types),
        &role,
        patch.description.as_deref().or(row.description.as_deref()),
        patch.ordered.unwrap_or(row.ordered),
    )
    .await?;
    check_role_within(&a, settings.role, &policy)?;
    endpoints::update(&s.executor, org, id, settings, &a.metadata())
        .await
        .map_err(answer)?;
    get_one(s, a, Id(id)).await
}

pub(crate) async fn delete(s: AppState, a: Authed, Id(id): Id) -> Result<NoContent, ApiError> {
    endpoints::delete(&s.executor, a.caller.org_id, id, &a.metadata())
        .await
        .map_err(answer)?;
    Ok(NoContent)
}

pub(crate) async fn rotate(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<RotateInput>,
) -> Result<Ok200<WebhookSecret>, ApiError> {
    let hours = input.grace_hours.unwrap_or(24);
    if !(0..=168).contains(&hours) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "grace_hours",
            "must be between 0 and 168",
        )]));
    }
    let org = a.caller.org_id;
    let (_, secret) = endpoints::rotate(
        &s.executor,
        org,
        id,
        chrono::Duration::hours(hours),
        &a.metadata(),
    )
    .await
    .map_err(answer)?;
    let row = load(&s, org, id).await?;
    Ok(Ok200(WebhookSecret {
        secret: secret.expose_secret().to_owned(),
        secret_version: row.secret_version,
        previous_secret_valid_until: row.previous_valid_until,
    }))
}

pub(crate) async fn disable(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<WebhookDoc>, ApiError> {
    endpoints::disable(&s.executor, a.caller.org_id, id, None, &a.metadata())
        .await
        .map_err(answer)?;
    get_one(s, a, Id(id)).await
}

pub(crate) async fn enable(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<WebhookDoc>, ApiError> {
    endpoints::enable(&s.executor, a.caller.org_id, id, &a.metadata())
        .await
        .map_err(answer)?;
    get_one(s, a, Id(id)).await
}

pub(crate) async fn replay(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<ReplayInput>,
) -> Result<Accepted<ReplayQueued>, ApiError> {
    let replay = match (input.message_id, input.since) {
        (Some(message_id), None) => Replay::Message { message_id },
        (None, Some(since)) => Replay::Since { since },
        _ => {
            return Err(ApiError::Validation(vec![FieldError::new(
                "message_id",
                "give exactly one of `message_id` and `since`",
            )]))
        }
    };
    let (_, queued) = endpoints::replay(&s.executor, a.caller.org_id, id, replay, &a.metadata())
        .await
        .map_err(answer)?;
    Ok(Accepted(ReplayQueued { queued }))
}

pub(crate) async fn messages(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Query(q): Query<MessageQuery>,
) -> Result<Ok200<WebhookMessagePage>, ApiError> {
    let org = a.caller.org_id;
    if let Some(t) = &q.event_type {
        if public_events::public_entry(t).is_none() {
            return Err(query_error(
                "event_type",
                "is not an event type of the catalogue",
            ));
        }
    }
    let limit = parse_limit(q.limit)?;
    load(&s, org, id).await?;
    let filter = MessageFilter {
        status: q.status.map(|s| s.name().to_owned()),
        event_type: q.event_type,
        since: q.since,
        until: q.until,
        before_seq: q.before,
        limit,
    };
    let rows = log::messages(&s.pool, org, id, &filter)
        .await
        .map_err(answer)?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|m| m.seq))
        .flatten();
    Ok(Ok200(WebhookMessagePage {
        items: rows.into_iter().map(WebhookMessageDoc::from).collect(),
        next_before,
    }))
}

pub(crate) async fn message(
    s: AppState,
    a: Authed,
    Id(id): Id,
    SecondId(message_id): SecondId,
) -> Result<Ok200<WebhookMessageDoc>, ApiError> {
    let (m, attempts) = log::message_with_attempts(&s.pool, a.caller.org_id, id, message_id)
        .await
        .map_err(answer)?
        .ok_or(ApiError::NotFound("no such message of this endpoint"))?;
    let mut doc = WebhookMessageDoc::from(m);
    doc.attempt_log = Some(attempts.into_iter().map(WebhookAttemptDoc::from).collect());
    Ok(Ok200(doc))
}

/// The public event types.
pub(crate) async fn event_types(
    _s: AppState,
    _a: Authed,
) -> Result<Ok200<EventTypeList>, ApiError> {
    let items = public_events::public_types()
        .into_iter()
        .map(
            |(t, needs, security): (&str, Permission, bool)| EventTypeDoc {
                r#type: t.to_owned(),
                needs: needs.name().to_owned(),
                security,
            },
        )
        .collect();
    Ok(Ok200(EventTypeList {
        version: public_events::VERSION.to_owned(),
        items,
    }))
}
