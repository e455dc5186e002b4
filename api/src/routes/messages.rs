//! Messages: `POST /v1/contacts/{id}/messages` asks the one send gate, and the answer
//! is an event either way (queued, or blocked with its reason code and the consent
//! events it relied on); `GET /v1/messages/{id}` reads the message's stream, so why a
//! message was sent or not is answered from its events for as long as they are kept.
//! The dispatcher (`crm dispatch`, or in `crm serve`) sends what is queued and asks
//! the gate again at that moment.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use crm_domain::consent::gate::{Decision, Reason, Request};
use crm_domain::consent::{Channel, PurposeKey};
use crm_domain::message::{Content, Message, MessageCommand, MessageEvent};
use crm_domain::metadata::EventMetadata;
use crm_infra::consent::state::{self, GateInput};
use crm_infra::store::decode::decode;
use crm_infra::store::event_store::{self, StreamId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::schemas::{ChannelName, ReasonName};
use super::Authed;
use crate::auth::visibility;
use crate::edge::extract::{Id, Json};
use crate::edge::reply::{Created, Ok200};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// `POST /v1/contacts/{id}/messages`: what to send, to the contact's address or number
/// for the channel. `{{name}}` in the subject or body is replaced by `variables.name`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "channel": "email", "purpose": "marketing", "subject": "Hello {{first}}",
    "body": "Our spring offers, {{first}}.", "variables": {"first": "Ada"}
}))]
pub(crate) struct MessageInput {
    #[schema(value_type = ChannelName)]
    channel: Channel,
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    purpose: String,
    /// E-mail only.
    #[serde(default)]
    #[schema(max_length = 300)]
    subject: Option<String>,
    #[schema(max_length = 20000)]
    body: String,
    /// Values for the `{{name}}` placeholders.
    #[serde(default)]
    variables: BTreeMap<String, String>,
}

/// The gate's decision on a message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DecisionDoc {
    pub(crate) allowed: bool,
    #[schema(value_type = ReasonName)]
    pub(crate) reason: Reason,
    /// The consent events the decision rests on.
    relied_on: Vec<Uuid>,
}

impl From<&Decision> for DecisionDoc {
    fn from(d: &Decision) -> Self {
        Self {
            allowed: d.allowed,
            reason: d.reason,
            relied_on: d.relied_on.clone(),
        }
    }
}

/// A submitted message: queued (the dispatcher sends it) or blocked.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Submitted {
    pub(crate) id: Uuid,
    /// `queued` or `blocked`.
    pub(crate) status: String,
    pub(crate) decision: DecisionDoc,
    /// The position of the decision's event.
    pub(crate) position: i64,
}

/// One step of a message's life.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageStep {
    event_id: Uuid,
    /// `MessageQueued`, `MessageBlocked`, `MessageBlockedAtDispatch`, `MessageSent`,
    /// `MessageAttemptFailed`, `MessageFailed`.
    #[serde(rename = "type")]
    event_type: String,
    recorded_at: DateTime<Utc>,
    /// The gate's decision (queued, blocked, blocked at dispatch).
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<DecisionDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    carrier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<DateTime<Utc>>,
}

/// A message and why it was sent or not.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageDoc {
    id: Uuid,
    contact_id: Uuid,
    #[schema(value_type = ChannelName)]
    channel: Channel,
    purpose: String,
    /// `queued`, `blocked`, `sent` or `failed`.
    status: String,
    /// The address or number (absent when the caller's role hides that field).
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    /// Every decision and attempt, oldest first.
    steps: Vec<MessageStep>,
}

/// Replaces `{{name}}` placeholders; every placeholder needs a value.
fn render(
    errors: &mut Vec<FieldError>,
    field: &str,
    template: &str,
    vars: &BTreeMap<String, String>,
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            errors.push(FieldError::new(field, "an unclosed `{{` placeholder"));
            return out;
        };
        let name = after[..end].trim();
        match vars.get(name) {
            Some(v) => out.push_str(v),
            None => errors.push(FieldError::new(
                format!("variables.{name}"),
                format!("`{field}` uses `{{{{{name}}}}}`: give it a value"),
            )),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Asks the gate for `request` and records its decision as the message's first event.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn submit(
    s: &AppState,
    gate: &mut GateInput,
    org_id: Uuid,
    contact_id: Uuid,
    message_id: Uuid,
    request: Request,
    content: Content,
    meta: &EventMetadata,
) -> Result<(Decision, i64), ApiError> {
    let crypto = s.executor.crypto();
    let decision = gate
        .decide(&s.pool, crypto, org_id, &request, Utc::now())
        .await?;
    let outcome = s
        .executor
        .execute::<Message>(
            org_id,
            &message_id.to_string(),
            MessageCommand::Submit {
                message_id,
                contact_id,
                channel: request.channel,
                purpose: request.purpose,
                content,
                decision: decision.clone(),
            },
            meta,
            Some(0),
        )
        .await?;
    Ok((decision, outcome.positions.last().copied().unwrap_or(0)))
}

pub(crate) async fn send(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
    Json(input): Json<MessageInput>,
) -> Result<Created<Submitted>, ApiError> {
    send_with_id(&s, &a, contact_id, input, Uuid::now_v7()).await
}

/// [`send`] with the message's id chosen by the caller (an AI action's execution uses
/// the action's id, so that a retry finds the message it already submitted).
pub(crate) async fn send_with_id(
    s: &AppState,
    a: &Authed,
    contact_id: Uuid,
    input: MessageInput,
    message_id: Uuid,
) -> Result<Created<Submitted>, ApiError> {
    let org_id = a.caller.org_id;
    let mut errors = Vec::new();
    let purpose = PurposeKey::parse(&input.purpose)
        .map_err(|e| errors.push(FieldError::new("purpose", e.0)))
        .ok();
    let subject = input
        .subject
        .as_deref()
        .map(|t| render(&mut errors, "subject", t, &input.variables));
    let body = render(&mut errors, "body", &input.body, &input.variables);
    if body.trim().is_empty() {
        errors.push(FieldError::new("body", "must not be empty"));
    }
    if body.chars().count() > 20_000 || body.contains('\0') {
        errors.push(FieldError::new("body", "at most 20,000 characters, no NUL"));
    }
    if let Some(sub) = &subject {
        if crm_domain::values::Line::parse(sub).is_err() {
            errors.push(FieldError::new(
                "subject",
                "one line of at most 300 characters",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let mut gate = s
        .gate
        .load(org_id, contact_id)
        .await?
        .ok_or(ApiError::NotFound("contact not found"))?;
    let Some(to) = state::contact_point(&gate.points, input.channel) else {
        return Err(ApiError::Validation(vec![FieldError::new(
            "channel",
            "the contact has no address or number for this channel",
        )]));
    };
    let request = Request {
        channel: input.channel,
        purpose: purpose.expect("parsed"),
        contact_point: crm_infra::consent::normalize_point(input.channel, &to),
    };
    let content = Content { to, subject, body };
    let (decision, position) = submit(
        s,
        &mut gate,
        org_id,
        contact_id,
        message_id,
        request,
        content,
        &a.metadata(),
    )
    .await?;
    Ok(Created {
        location: format!("/v1/messages/{message_id}"),
        body: Submitted {
            id: message_id,
            status: if decision.allowed {
                "queued"
            } else {
                "blocked"
            }
            .into(),
            decision: DecisionDoc::from(&decision),
            position,
        },
    })
}

pub(crate) async fn get_one(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<MessageDoc>, ApiError> {
    let client = s.pool.get().await?;
    message_doc(&s, &client, a.caller.org_id, id, &a.access.policy)
        .await?
        .map(Ok200)
        .ok_or(ApiError::NotFound("message not found"))
}

/// A message of `org_id` as a reader with `policy` sees it, from its events (`None`:
/// no such message).
pub(crate) async fn message_doc(
    s: &AppState,
    client: &deadpool_postgres::Object,
    org_id: Uuid,
    id: Uuid,
    policy: &crm_domain::access::Policy,
) -> Result<Option<MessageDoc>, ApiError> {
    let sid = id.to_string();
    let stream = StreamId {
        org_id,
        aggregate_type: Message::TYPE,
        aggregate_id: &sid,
    };
    let mut message = Message::default();
    let mut steps = Vec::new();
    for stored in event_store::read_stream(client, &stream, 0, None).await? {
        let decoded = decode(s.executor.crypto(), client, stored).await?;
        let event: MessageEvent = decoded.typed()?;
        let mut step = MessageStep {
            event_id: decoded.stored.event_id,
            event_type: decoded.stored.event_type.clone(),
            recorded_at: decoded.stored.recorded_at,
            decision: None,
            attempt: None,
            carrier: None,
            error: None,
            next_attempt_at: None,
        };
        match &event {
            MessageEvent::MessageQueued { decision, .. }
            | MessageEvent::MessageBlocked { decision, .. } => {
                step.decision = Some(decision.into())
            }
            MessageEvent::MessageBlockedAtDispatch { decision, attempt } => {
                step.decision = Some(decision.into());
                step.attempt = Some(*attempt);
            }
            MessageEvent::MessageSent {
                attempt, carrier, ..
            } => {
                step.attempt = Some(*attempt);
                step.carrier = Some(carrier.clone());
            }
            MessageEvent::MessageAttemptFailed {
                attempt,
                error,
                next_attempt_at,
            } => {
                step.attempt = Some(*attempt);
                step.error = Some(error.clone());
                step.next_attempt_at = Some(*next_attempt_at);
            }
            MessageEvent::MessageFailed { attempt, error } => {
                step.attempt = Some(*attempt);
                step.error = Some(error.clone());
            }
        }
        message.apply(event);
        steps.push(step);
    }
    let (Some(contact_id), Some(channel), Some(purpose)) =
        (message.contact_id, message.channel, message.purpose.clone())
    else {
        return Ok(None);
    };
    let visible = visibility::sees_contact_point(policy, channel);
    // Empty once the recipient was erased.
    let content = message
        .content
        .clone()
        .filter(|c| visible && !c.to.is_empty());
    Ok(Some(MessageDoc {
        id,
        contact_id,
        channel,
        purpose: purpose.to_string(),
        status: super::schemas::wire_name(&message.status),
        to: content.as_ref().map(|c| c.to.clone()),
        subject: content.and_then(|c| c.subject),
        steps,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_need_values() {
        let vars = BTreeMap::from([("first".to_owned(), "Ada".to_owned())]);
        let mut errors = Vec::new();
        assert_eq!(
            render(&mut errors, "body", "Hi {{first}}, {{ first }}!", &vars),
            "Hi Ada, Ada!"
        );
        assert!(errors.is_empty());
        render(&mut errors, "body", "Hi {{last}}", &vars);
        assert_eq!(errors[0].field, "variables.last");
        let mut errors = Vec::new();
        render(&mut errors, "subject", "Hi {{first", &vars);
        assert_eq!(errors[0].field, "subject");
    }
}
