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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiSettings {
    pub oversight: Oversight,
    pub stopped: bool,
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
            AiSettingsCommand::SetOversight { oversight, .. } if oversight != self.oversight => {
                AiSettingsEvent::AiOversightSet { oversight, reason }
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
            AiSettingsEvent::AiOversightSet { oversight, .. } => self.oversight = oversight,
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
                reason: "pilot".into(),
            })
            .then_expect_events(vec![AiSettingsEvent::AiOversightSet {
                oversight: Oversight::ApproveAll,
                reason: "pilot".into(),
            }]);
    }
}
