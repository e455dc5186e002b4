//! An outbound message: one stream per message (type `message`), from the send gate's
//! first decision to its delivery. Every decision is an event: queued (with the
//! consent it relied on) or blocked (with the reason code), blocked again at dispatch
//! when consent changed in between, sent, a failed attempt (retried with backoff), or
//! failed for good. `GET /v1/messages/{id}` reads this stream, so "why was this sent,
//! or not" is answered from the events forever.
//!
//! The message's content (address, subject, body) is personal data, encrypted under
//! the message's own data key; erasing a contact shreds the keys of its messages too.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::consent::gate::Decision;
use crate::consent::{Channel, PurposeKey};
use crate::PersonalData;

/// How many times a message is handed to its carrier before it fails for good.
pub const MAX_ATTEMPTS: u32 = 6;

/// What the message says and where it goes: personal data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    /// Empty once the contact was erased (its key destroyed).
    #[serde(deserialize_with = "crate::personal::erased_or_default")]
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(deserialize_with = "crate::personal::erased_or_default")]
    pub body: String,
}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    Queued,
    Blocked,
    Sent,
    Failed,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MessageCommand {
    /// The send gate decided; the message is queued or blocked accordingly.
    Submit {
        message_id: Uuid,
        contact_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        content: Content,
        decision: Decision,
    },
    /// The dispatcher asked the gate again just before sending.
    Recheck { decision: Decision, attempt: u32 },
    RecordSent {
        attempt: u32,
        carrier: String,
        carrier_message_id: Option<String>,
    },
    RecordFailure {
        attempt: u32,
        error: String,
        retryable: bool,
        now: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MessageEvent {
    MessageQueued {
        message_id: Uuid,
        contact_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        decision: Decision,
        content: Content,
    },
    MessageBlocked {
        message_id: Uuid,
        contact_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        decision: Decision,
        content: Content,
    },
    /// The gate refused when the dispatcher was about to send.
    MessageBlockedAtDispatch {
        decision: Decision,
        attempt: u32,
    },
    MessageSent {
        attempt: u32,
        carrier: String,
        carrier_message_id: Option<String>,
    },
    MessageAttemptFailed {
        attempt: u32,
        error: String,
        next_attempt_at: DateTime<Utc>,
    },
    MessageFailed {
        attempt: u32,
        error: String,
    },
}

impl DomainEvent for MessageEvent {
    fn event_type(&self) -> String {
        match self {
            Self::MessageQueued { .. } => "MessageQueued",
            Self::MessageBlocked { .. } => "MessageBlocked",
            Self::MessageBlockedAtDispatch { .. } => "MessageBlockedAtDispatch",
            Self::MessageSent { .. } => "MessageSent",
            Self::MessageAttemptFailed { .. } => "MessageAttemptFailed",
            Self::MessageFailed { .. } => "MessageFailed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for MessageEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        match self {
            Self::MessageQueued { .. } | Self::MessageBlocked { .. } => &["content"],
            _ => &[],
        }
    }

    /// A message's data key goes with its recipient's erasure.
    fn key_owners(&self) -> Vec<Uuid> {
        match self {
            Self::MessageQueued { contact_id, .. } | Self::MessageBlocked { contact_id, .. } => {
                vec![*contact_id]
            }
            _ => vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message already exists")]
    AlreadyExists,
    #[error("message not found")]
    NotFound,
    #[error("the message is no longer queued")]
    NotQueued,
}

/// The delay before attempt `attempt + 1` after attempt `attempt` failed: 2 s, 4 s,
/// 8 s … capped at 5 minutes.
pub fn backoff(attempt: u32) -> chrono::Duration {
    let secs = 2i64.saturating_pow(attempt.clamp(1, 16)).min(300);
    chrono::Duration::seconds(secs)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: Option<Uuid>,
    pub contact_id: Option<Uuid>,
    pub channel: Option<Channel>,
    pub purpose: Option<PurposeKey>,
    pub content: Option<Content>,
    pub status: Option<MessageStatus>,
    /// Attempts made so far.
    pub attempts: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

impl Message {
    fn queued(&self) -> Result<(), MessageError> {
        match self.status {
            None => Err(MessageError::NotFound),
            Some(MessageStatus::Queued) => Ok(()),
            Some(_) => Err(MessageError::NotQueued),
        }
    }
}

impl Aggregate for Message {
    const TYPE: &'static str = "message";
    type Command = MessageCommand;
    type Event = MessageEvent;
    type Error = MessageError;
    type Services = ();

    async fn handle(
        &mut self,
        command: MessageCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), MessageError> {
        let event = match command {
            MessageCommand::Submit {
                message_id,
                contact_id,
                channel,
                purpose,
                content,
                decision,
            } => {
                if self.id.is_some() {
                    return Err(MessageError::AlreadyExists);
                }
                if decision.allowed {
                    MessageEvent::MessageQueued {
                        message_id,
                        contact_id,
                        channel,
                        purpose,
                        decision,
                        content,
                    }
                } else {
                    MessageEvent::MessageBlocked {
                        message_id,
                        contact_id,
                        channel,
                        purpose,
                        decision,
                        content,
                    }
                }
            }
            MessageCommand::Recheck { decision, attempt } => {
                self.queued()?;
                if decision.allowed {
                    return Ok(());
                }
                MessageEvent::MessageBlockedAtDispatch { decision, attempt }
            }
            MessageCommand::RecordSent {
                attempt,
                carrier,
                carrier_message_id,
            } => {
                self.queued()?;
                MessageEvent::MessageSent {
                    attempt,
                    carrier,
                    carrier_message_id,
                }
            }
            MessageCommand::RecordFailure {
                attempt,
                error,
                retryable,
                now,
            } => {
                self.queued()?;
                if retryable && attempt < MAX_ATTEMPTS {
                    MessageEvent::MessageAttemptFailed {
                        attempt,
                        error,
                        next_attempt_at: now + backoff(attempt),
                    }
                } else {
                    MessageEvent::MessageFailed { attempt, error }
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: MessageEvent) {
        match event {
            MessageEvent::MessageQueued {
                message_id,
                contact_id,
                channel,
                purpose,
                content,
                ..
            } => self.start(
                message_id,
                contact_id,
                channel,
                purpose,
                content,
                MessageStatus::Queued,
            ),
            MessageEvent::MessageBlocked {
                message_id,
                contact_id,
                channel,
                purpose,
                content,
                ..
            } => self.start(
                message_id,
                contact_id,
                channel,
                purpose,
                content,
                MessageStatus::Blocked,
            ),
            MessageEvent::MessageBlockedAtDispatch { attempt, .. } => {
                self.status = Some(MessageStatus::Blocked);
                self.attempts = self.attempts.max(attempt);
            }
            MessageEvent::MessageSent { attempt, .. } => {
                self.status = Some(MessageStatus::Sent);
                self.attempts = self.attempts.max(attempt);
                self.next_attempt_at = None;
            }
            MessageEvent::MessageAttemptFailed {
                attempt,
                next_attempt_at,
                ..
            } => {
                self.attempts = self.attempts.max(attempt);
                self.next_attempt_at = Some(next_attempt_at);
            }
            MessageEvent::MessageFailed { attempt, .. } => {
                self.status = Some(MessageStatus::Failed);
                self.attempts = self.attempts.max(attempt);
                self.next_attempt_at = None;
            }
        }
    }
}

impl Message {
    fn start(
        &mut self,
        id: Uuid,
        contact_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        content: Content,
        status: MessageStatus,
    ) {
        *self = Message {
            id: Some(id),
            contact_id: Some(contact_id),
            channel: Some(channel),
            purpose: Some(purpose),
            content: Some(content),
            status: Some(status),
            attempts: 0,
            next_attempt_at: None,
        };
    }
}

#[cfg(test)]
mod tests;
