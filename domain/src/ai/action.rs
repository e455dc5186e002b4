//! An AI action: one stream per action (type `ai_action`), from its proposal to its
//! outcome. Every step is an event (proposed, auto-approved, approval requested,
//! approved, rejected, edited, expired, held, executed, failed), so the AI audit log is
//! a projection of these streams, as the ConsentLog is of consent.
//!
//! The action's arguments and the summaries it acted on may hold personal data: they
//! are encrypted under the action's own data key, which erasing a contact the action
//! touched shreds (as for messages).

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::risk::{self, ActionKind, InitiatorKind, Oversight, Risk, RiskInput};
use crate::PersonalData;

/// The model behind a proposal, named after the OpenTelemetry GenAI semantic
/// conventions where one exists (`gen_ai.system`, `gen_ai.request.model`,
/// `gen_ai.response.model`, `gen_ai.usage.*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `gen_ai.system`: the provider (e.g. `openai`, `anthropic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// `gen_ai.request.model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `gen_ai.response.model`: the exact version that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The prompt's or the agent policy's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
    /// `gen_ai.usage.input_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// `gen_ai.usage.output_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
}

/// Who started the action: a user through an assistant (the action runs on their
/// behalf, and they may not approve it), or the agent on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Initiator {
    pub kind: InitiatorKind,
    /// The user on whose behalf (`kind` = user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<Uuid>,
}

/// What the action would run (without its arguments, which are personal: see
/// [`Content`]) and the digest of the exact arguments: an approval names the digest, so
/// it holds for these arguments only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub kind: ActionKind,
    /// SHA-256 of the canonical JSON of what would run (kind, contacts, arguments), hex.
    pub arguments_sha256: String,
    /// The contacts the action touches.
    pub contacts: Vec<Uuid>,
    /// The user the action is about (a role change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
}

/// The personal part of a proposal or an edit: the command's arguments and what the
/// agent acted on. Every member is encrypted under the action's data key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Content {
    /// The command's arguments, as its API route takes its body.
    pub arguments: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_summary: Option<String>,
}

/// Free text a person (or a refusal) wrote about a step: it may name someone, so it is
/// encrypted under the action's data key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Note {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Note {
    pub fn of(text: Option<String>) -> Self {
        Self { text }
    }
}

/// Where an action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// Waiting for a human decision.
    PendingApproval,
    /// Approved (by a human or the policy), not executed yet.
    Approved,
    Rejected,
    Expired,
    Executed,
    Failed,
}

// One command value lives for one request: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum AiActionCommand {
    Propose {
        action_id: Uuid,
        org_id: Uuid,
        agent_id: Uuid,
        initiator: Initiator,
        request: Request,
        content: Content,
        /// The facts of the arguments the risk policy reads.
        risk_input: RiskInput,
        oversight: Oversight,
        /// Whether the organisation's stop switch is on: autonomous actions then wait
        /// whatever their risk.
        stopped: bool,
        model: ModelInfo,
        /// When a pending approval runs out.
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    Approve {
        by: Uuid,
        /// The digest the approver saw: it must be the action's current one.
        arguments_sha256: String,
        reason: Option<String>,
        /// Whether the organisation's stop switch is on: an autonomous action cannot
        /// be approved then.
        stopped: bool,
        now: DateTime<Utc>,
    },
    Reject {
        by: Uuid,
        reason: String,
    },
    /// A human with `ai.approve` changes the arguments: the action needs a fresh
    /// decision on the new digest.
    Edit {
        by: Uuid,
        request: Request,
        content: Content,
        risk_input: RiskInput,
        expires_at: DateTime<Utc>,
    },
    Expire {
        now: DateTime<Utc>,
    },
    /// The stop switch holds an approved, unexecuted autonomous action: it needs a
    /// fresh decision.
    Hold {
        expires_at: DateTime<Utc>,
    },
    RecordExecuted {
        /// The events the domain command produced.
        event_ids: Vec<Uuid>,
    },
    RecordFailed {
        /// A reason code: the send gate's, or the refusal's (`permission_denied`, ...).
        reason: String,
        detail: String,
        /// The events the refusal itself produced (a message blocked by the gate).
        event_ids: Vec<Uuid>,
    },
}

// An event value lives while it is written or applied: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AiActionEvent {
    AiActionProposed {
        action_id: Uuid,
        org_id: Uuid,
        agent_id: Uuid,
        initiator: Initiator,
        request: Request,
        /// Personal: encrypted.
        content: Content,
        risk: Risk,
        /// The id of the policy rule that set the risk.
        rule: String,
        model: ModelInfo,
    },
    AiActionAutoApproved {
        rule: String,
    },
    AiActionApprovalRequested {
        expires_at: DateTime<Utc>,
        /// Why it waits: `risk`, `oversight` or `stop_switch`.
        because: String,
    },
    AiActionApproved {
        by: Uuid,
        arguments_sha256: String,
        /// Why (optional; personal: encrypted).
        #[serde(default)]
        note: Note,
    },
    AiActionRejected {
        by: Uuid,
        /// Why (personal: encrypted).
        note: Note,
    },
    AiActionEdited {
        by: Uuid,
        request: Request,
        /// The new arguments (personal: encrypted).
        content: Content,
        risk: Risk,
        rule: String,
    },
    AiActionExpired {},
    AiActionHeld {
        expires_at: DateTime<Utc>,
    },
    AiActionExecuted {
        event_ids: Vec<Uuid>,
    },
    AiActionFailed {
        /// A reason code (the send gate's, or the refusal's).
        reason: String,
        /// The refusal's message (personal: encrypted).
        #[serde(default)]
        note: Note,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        event_ids: Vec<Uuid>,
    },
}

impl DomainEvent for AiActionEvent {
    fn event_type(&self) -> String {
        match self {
            Self::AiActionProposed { .. } => "AiActionProposed",
            Self::AiActionAutoApproved { .. } => "AiActionAutoApproved",
            Self::AiActionApprovalRequested { .. } => "AiActionApprovalRequested",
            Self::AiActionApproved { .. } => "AiActionApproved",
            Self::AiActionRejected { .. } => "AiActionRejected",
            Self::AiActionEdited { .. } => "AiActionEdited",
            Self::AiActionExpired { .. } => "AiActionExpired",
            Self::AiActionHeld { .. } => "AiActionHeld",
            Self::AiActionExecuted { .. } => "AiActionExecuted",
            Self::AiActionFailed { .. } => "AiActionFailed",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for AiActionEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        match self {
            Self::AiActionProposed { .. } | Self::AiActionEdited { .. } => &["content"],
            // Free text a person or a refusal wrote may name someone.
            Self::AiActionRejected { .. }
            | Self::AiActionApproved { .. }
            | Self::AiActionFailed { .. } => &["note"],
            _ => &[],
        }
    }

    /// An action's data key (its arguments, summaries and notes) goes with the erasure
    /// of any contact it touches.
    fn key_owners(&self) -> Vec<Uuid> {
        match self {
            Self::AiActionProposed { request, .. } | Self::AiActionEdited { request, .. } => {
                request.contacts.clone()
            }
            _ => vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AiActionError {
    #[error("AI action already exists")]
    AlreadyExists,
    #[error("AI action not found")]
    NotFound,
    #[error("the action is {0:?}: it cannot be {1}")]
    NotAllowedNow(ActionStatus, &'static str),
    #[error("the action was proposed on your behalf: another person must decide it")]
    OwnAction,
    #[error("the arguments changed since this approval was given: decide on the current ones")]
    StaleApproval,
    #[error("the action's approval ran out")]
    ExpiredApproval,
    #[error("a rejection needs a reason")]
    ReasonRequired,
    #[error("the expiry must lie after the proposal")]
    ExpiryInPast,
    #[error("the organisation's AI stop switch is on: autonomous actions wait until it is lifted")]
    Stopped,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AiAction {
    pub id: Option<Uuid>,
    pub status: Option<ActionStatus>,
    pub agent_id: Option<Uuid>,
    pub initiator: Option<Initiator>,
    pub arguments_sha256: String,
    pub risk: Option<Risk>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl AiAction {
    fn status(&self) -> Result<ActionStatus, AiActionError> {
        self.status.ok_or(AiActionError::NotFound)
    }

    fn pending(&self, what: &'static str) -> Result<(), AiActionError> {
        match self.status()? {
            ActionStatus::PendingApproval => Ok(()),
            s => Err(AiActionError::NotAllowedNow(s, what)),
        }
    }

    /// A human deciding this action: never the user it was proposed for.
    fn decider(&self, by: Uuid) -> Result<(), AiActionError> {
        if self.initiator.and_then(|i| i.on_behalf_of) == Some(by) {
            return Err(AiActionError::OwnAction);
        }
        Ok(())
    }
}

impl Aggregate for AiAction {
    const TYPE: &'static str = "ai_action";
    type Command = AiActionCommand;
    type Event = AiActionEvent;
    type Error = AiActionError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AiActionCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AiActionError> {
        let events = match command {
            AiActionCommand::Propose {
                action_id,
                org_id,
                agent_id,
                initiator,
                request,
                content,
                risk_input,
                oversight,
                stopped,
                model,
                expires_at,
                now,
            } => {
                if self.id.is_some() {
                    return Err(AiActionError::AlreadyExists);
                }
                if expires_at <= now {
                    return Err(AiActionError::ExpiryInPast);
                }
                let rule = risk::assess(&risk_input);
                let waits = if stopped && initiator.kind == InitiatorKind::Autonomous {
                    Some("stop_switch")
                } else if risk::needs_approval(rule.risk, initiator.kind, oversight) {
                    Some(if rule.risk > Risk::Low {
                        "risk"
                    } else {
                        "oversight"
                    })
                } else {
                    None
                };
                let proposed = AiActionEvent::AiActionProposed {
                    action_id,
                    org_id,
                    agent_id,
                    initiator,
                    request,
                    content,
                    risk: rule.risk,
                    rule: rule.id.to_owned(),
                    model,
                };
                let next = match waits {
                    Some(because) => AiActionEvent::AiActionApprovalRequested {
                        expires_at,
                        because: because.to_owned(),
                    },
                    None => AiActionEvent::AiActionAutoApproved {
                        rule: rule.id.to_owned(),
                    },
                };
                vec![proposed, next]
            }
            AiActionCommand::Approve {
                by,
                arguments_sha256,
                reason,
                stopped,
                now,
            } => {
                self.pending("approved")?;
                self.decider(by)?;
                if stopped && self.initiator.map(|i| i.kind) == Some(InitiatorKind::Autonomous) {
                    return Err(AiActionError::Stopped);
                }
                if arguments_sha256 != self.arguments_sha256 {
                    return Err(AiActionError::StaleApproval);
                }
                if self.expires_at.is_some_and(|t| t <= now) {
                    return Err(AiActionError::ExpiredApproval);
                }
                vec![AiActionEvent::AiActionApproved {
                    by,
                    arguments_sha256,
                    note: Note::of(reason),
                }]
            }
            AiActionCommand::Reject { by, reason } => {
                self.pending("rejected")?;
                self.decider(by)?;
                if reason.trim().is_empty() {
                    return Err(AiActionError::ReasonRequired);
                }
                vec![AiActionEvent::AiActionRejected {
                    by,
                    note: Note::of(Some(reason)),
                }]
            }
            AiActionCommand::Edit {
                by,
                request,
                content,
                risk_input,
                expires_at,
            } => {
                self.pending("edited")?;
                self.decider(by)?;
                let rule = risk::assess(&risk_input);
                vec![
                    AiActionEvent::AiActionEdited {
                        by,
                        request,
                        content,
                        risk: rule.risk,
                        rule: rule.id.to_owned(),
                    },
                    AiActionEvent::AiActionApprovalRequested {
                        expires_at,
                        because: "edited".to_owned(),
                    },
                ]
            }
            AiActionCommand::Expire { now } => {
                self.pending("expired")?;
                if self.expires_at.is_none_or(|t| t > now) {
                    return Err(AiActionError::NotAllowedNow(
                        ActionStatus::PendingApproval,
                        "expired before its time",
                    ));
                }
                vec![AiActionEvent::AiActionExpired {}]
            }
            AiActionCommand::Hold { expires_at } => match self.status()? {
                ActionStatus::Approved => vec![AiActionEvent::AiActionHeld { expires_at }],
                s => return Err(AiActionError::NotAllowedNow(s, "held")),
            },
            AiActionCommand::RecordExecuted { event_ids } => match self.status()? {
                ActionStatus::Approved => vec![AiActionEvent::AiActionExecuted { event_ids }],
                s => return Err(AiActionError::NotAllowedNow(s, "executed")),
            },
            AiActionCommand::RecordFailed {
                reason,
                detail,
                event_ids,
            } => match self.status()? {
                ActionStatus::Approved => vec![AiActionEvent::AiActionFailed {
                    reason,
                    note: Note::of(Some(detail)),
                    event_ids,
                }],
                s => return Err(AiActionError::NotAllowedNow(s, "failed")),
            },
        };
        for event in events {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: AiActionEvent) {
        match event {
            AiActionEvent::AiActionProposed {
                action_id,
                agent_id,
                initiator,
                request,
                risk,
                ..
            } => {
                self.id = Some(action_id);
                self.agent_id = Some(agent_id);
                self.initiator = Some(initiator);
                self.arguments_sha256 = request.arguments_sha256;
                self.risk = Some(risk);
            }
            AiActionEvent::AiActionAutoApproved { .. } | AiActionEvent::AiActionApproved { .. } => {
                self.status = Some(ActionStatus::Approved);
                self.expires_at = None;
            }
            AiActionEvent::AiActionApprovalRequested { expires_at, .. }
            | AiActionEvent::AiActionHeld { expires_at } => {
                self.status = Some(ActionStatus::PendingApproval);
                self.expires_at = Some(expires_at);
            }
            AiActionEvent::AiActionEdited { request, risk, .. } => {
                self.arguments_sha256 = request.arguments_sha256;
                self.risk = Some(risk);
            }
            AiActionEvent::AiActionRejected { .. } => self.status = Some(ActionStatus::Rejected),
            AiActionEvent::AiActionExpired {} => self.status = Some(ActionStatus::Expired),
            AiActionEvent::AiActionExecuted { .. } => self.status = Some(ActionStatus::Executed),
            AiActionEvent::AiActionFailed { .. } => self.status = Some(ActionStatus::Failed),
        }
    }
}
