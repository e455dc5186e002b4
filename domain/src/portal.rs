//! A contact's portal account: staff grant a contact access to the client portal,
//! where it logs in (password or magic link) and sees only its own record. The login
//! email is personal data (encrypted in the event); the password hash is never in an
//! event.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::Email;
use crate::PersonalData;

/// The personal part of a portal login.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortalLogin {
    pub email: Email,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PortalCommand {
    Grant {
        contact_id: Uuid,
        org_id: Uuid,
        login: PortalLogin,
    },
    Revoke,
    /// The contact set a new password (through a reset link).
    SetPassword,
    SignOut,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PortalEvent {
    PortalAccessGranted {
        contact_id: Uuid,
        org_id: Uuid,
        login: PortalLogin,
    },
    PortalAccessRevoked {},
    PortalPasswordSet {},
    PortalSignedOut {},
}

impl DomainEvent for PortalEvent {
    fn event_type(&self) -> String {
        match self {
            Self::PortalAccessGranted { .. } => "PortalAccessGranted",
            Self::PortalAccessRevoked { .. } => "PortalAccessRevoked",
            Self::PortalPasswordSet { .. } => "PortalPasswordSet",
            Self::PortalSignedOut { .. } => "PortalSignedOut",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for PortalEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        match self {
            Self::PortalAccessGranted { .. } => &["login"],
            _ => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortalError {
    #[error("this contact has no portal access")]
    NoAccess,
    /// Checked by the store: one portal login per email in an organisation.
    #[error("another contact of this organisation already logs in with this email")]
    EmailTaken,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PortalAccount {
    pub contact_id: Option<Uuid>,
    pub active: bool,
}

impl Aggregate for PortalAccount {
    const TYPE: &'static str = "portal_account";
    type Command = PortalCommand;
    type Event = PortalEvent;
    type Error = PortalError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PortalCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PortalError> {
        let event = match command {
            PortalCommand::Grant {
                contact_id,
                org_id,
                login,
            } => {
                if self.active {
                    return Ok(());
                }
                PortalEvent::PortalAccessGranted {
                    contact_id,
                    org_id,
                    login,
                }
            }
            PortalCommand::Revoke => {
                if !self.active {
                    return Ok(());
                }
                PortalEvent::PortalAccessRevoked {}
            }
            PortalCommand::SetPassword | PortalCommand::SignOut if !self.active => {
                return Err(PortalError::NoAccess)
            }
            PortalCommand::SetPassword => PortalEvent::PortalPasswordSet {},
            PortalCommand::SignOut => PortalEvent::PortalSignedOut {},
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: PortalEvent) {
        match event {
            PortalEvent::PortalAccessGranted { contact_id, .. } => {
                self.contact_id = Some(contact_id);
                self.active = true;
            }
            PortalEvent::PortalAccessRevoked {} => self.active = false,
            PortalEvent::PortalPasswordSet {} | PortalEvent::PortalSignedOut {} => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn granted() -> PortalEvent {
        PortalEvent::PortalAccessGranted {
            contact_id: Uuid::nil(),
            org_id: Uuid::nil(),
            login: PortalLogin {
                email: Email::parse("c@example.com").unwrap(),
            },
        }
    }

    #[test]
    fn grant_revoke_and_what_needs_access() {
        TestFramework::<PortalAccount>::with(())
            .given_no_previous_events()
            .when(PortalCommand::SetPassword)
            .then_expect_error(PortalError::NoAccess);
        TestFramework::<PortalAccount>::with(())
            .given(vec![granted()])
            .when(PortalCommand::Revoke)
            .then_expect_events(vec![PortalEvent::PortalAccessRevoked {}]);
        TestFramework::<PortalAccount>::with(())
            .given(vec![granted(), PortalEvent::PortalAccessRevoked {}])
            .when(PortalCommand::SignOut)
            .then_expect_error(PortalError::NoAccess);
        TestFramework::<PortalAccount>::with(())
            .given(vec![granted()])
            .when(PortalCommand::Grant {
                contact_id: Uuid::nil(),
                org_id: Uuid::nil(),
                login: PortalLogin {
                    email: Email::parse("c@example.com").unwrap(),
                },
            })
            .then_expect_events(vec![]);
    }
}
