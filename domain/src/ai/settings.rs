//! An organisation's AI oversight (one stream per organisation, type `ai_settings`, id
//! the organisation's): how much human approval agent actions need, and the stop
//! switch that holds every autonomous action. Each change is an event with who (the
//! event's principal), when and why.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use super::risk::Oversight;
use crate::PersonalData;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AiSettingsCommand {
    SetOversight {
        oversight: Oversight,
        /// How long a proposal waits for a decision (`None`: the default, 72 hours).
        approval_ttl_secs: Option<u32>,
        reason: String,
    },
    Stop {
        reason: String,
    },
    Resume {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AiSettingsEvent {
    AiOversightSet {
        oversight: Oversight,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        approval_ttl_secs: Option<u32>,
        reason: String,
    },
    AiStopped {
        reason: String,
    },
    AiResumed {
        reason: String,
    },
}

impl DomainEvent for AiSettingsEvent {
    fn event_type(&self) -> String {
        match self {
            Self::AiOversightSet { .. } => "AiOversightSet",
            Self::AiStopped { .. } => "AiStopped",
            Self::AiResumed { .. } => "AiResumed",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for AiSettingsEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        // A reason is free text a person wrote: it may name someone.
        &["reason"]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AiSettingsError {
    #[error("a reason is required")]
    ReasonRequired,
    #[error("the approval time must be between 1 second and 30 days")]
    TtlOutOfRange,
}

/// The longest a proposal may wait for a decision.
pub const MAX_APPROVAL_TTL_SECS: u32 = 30 * 24 * 3600;
/// How long a proposal waits when the organisation has not said.
pub const DEFAULT_APPROVAL_TTL_SECS: u32 = 72 * 3600;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiSettings {
    pub oversight: Oversight,
    pub stopped: bool,
    pub approval_ttl_secs: Option<u32>,
}

impl AiSettings {
    /// How long a new proposal waits for a decision.
    pub fn approval_ttl_secs(&self) -> u32 {
        self.approval_ttl_secs.unwrap_or(DEFAULT_APPROVAL_TTL_SECS)
    }
}

impl Aggregate for AiSettings {
    const TYPE: &'static str = "ai_settings";
    type Command = AiSettingsCommand;
    type Event = AiSettingsEvent;
    type Error = AiSettingsError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AiSettingsCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AiSettingsError> {
        let reason = match &command {
            AiSettingsCommand::SetOversight { reason, .. }
            | AiSettingsCommand::Stop { reason }
            | AiSettingsCommand::Resume { reason } => reason.trim().to_owned(),
        };
        if reason.is_empty() {
            return Err(AiSettingsError::ReasonRequired);
        }
        let event = match command {
            AiSettingsCommand::SetOversight {
                approval_ttl_secs: Some(t),
                ..
            } if t == 0 || t > MAX_APPROVAL_TTL_SECS => return Err(AiSettingsError::TtlOutOfRange),
            AiSettingsCommand::SetOversight {
                oversight,
                approval_ttl_secs,
                ..
            } if oversight != self.oversight || approval_ttl_secs != self.approval_ttl_secs => {
                AiSettingsEvent::AiOversightSet {
                    oversight,
                    approval_ttl_secs,
                    reason,
                }
            }
            AiSettingsCommand::Stop { .. } if !self.stopped => {
                AiSettingsEvent::AiStopped { reason }
            }
            AiSettingsCommand::Resume { .. } if self.stopped => {
                AiSettingsEvent::AiResumed { reason }
            }
            // Already so: nothing to record.
            _ => return Ok(()),
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: AiSettingsEvent) {
        match event {
            AiSettingsEvent::AiOversightSet {
                oversight,
                approval_ttl_secs,
                ..
            } => {
                self.oversight = oversight;
                self.approval_ttl_secs = approval_ttl_secs;
            }
            AiSettingsEvent::AiStopped { .. } => self.stopped = true,
            AiSettingsEvent::AiResumed { .. } => self.stopped = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    #[test]
    fn the_stop_switch_needs_a_reason_and_records_each_change_once() {
        TestFramework::<AiSettings>::with(())
            .given_no_previous_events()
            .when(AiSettingsCommand::Stop { reason: " ".into() })
            .then_expect_error(AiSettingsError::ReasonRequired);
        TestFramework::<AiSettings>::with(())
            .given_no_previous_events()
            .when(AiSettingsCommand::Stop {
                reason: "odd sends".into(),
            })
            .then_expect_events(vec![AiSettingsEvent::AiStopped {
                reason: "odd sends".into(),
            }]);
        TestFramework::<AiSettings>::with(())
            .given(vec![AiSettingsEvent::AiStopped {
                reason: "odd sends".into(),
            }])
            .when(AiSettingsCommand::Stop {
                reason: "again".into(),
            })
            .then_expect_events(vec![]);
        TestFramework::<AiSettings>::with(())
            .given_no_previous_events()
            .when(AiSettingsCommand::Resume {
                reason: "was not stopped".into(),
            })
            .then_expect_events(vec![]);
        TestFramework::<AiSettings>::with(())
            .given_no_previous_events()
            .when(AiSettingsCommand::SetOversight {
                oversight: Oversight::ApproveAll,
                approval_ttl_secs: None,
                reason: "pilot".into(),
            })
            .then_expect_events(vec![AiSettingsEvent::AiOversightSet {
                oversight: Oversight::ApproveAll,
                approval_ttl_secs: None,
                reason: "pilot".into(),
            }]);
        TestFramework::<AiSettings>::with(())
            .given_no_previous_events()
            .when(AiSettingsCommand::SetOversight {
                oversight: Oversight::Standard,
                approval_ttl_secs: Some(MAX_APPROVAL_TTL_SECS + 1),
                reason: "forever".into(),
            })
            .then_expect_error(AiSettingsError::TtlOutOfRange);
    }
}
