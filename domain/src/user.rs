//! The user aggregate: a member of staff who logs in to an organisation.
//!
//! Credentials (password hashes) are never part of an event: they live in a mutable,
//! erasable table next to the store. Events only say that a password was changed.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::{Email, Name};
use crate::PersonalData;

/// The built-in roles every organisation has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Board,
    Executive,
    Director,
    Team,
    Support,
    Partner,
    Viewer,
    Client,
}

impl Role {
    pub fn parse(input: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(input.to_ascii_lowercase())).ok()
    }
}

/// Personal data of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Person {
    pub email: Email,
    pub display_name: Name,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    Register {
        user_id: Uuid,
        org_id: Uuid,
        person: Person,
        role: Role,
    },
    ChangePassword,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    UserRegistered {
        user_id: Uuid,
        org_id: Uuid,
        role: Role,
        person: Person,
    },
    PasswordChanged {},
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            Self::UserRegistered { .. } => "UserRegistered",
            Self::PasswordChanged { .. } => "PasswordChanged",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for UserEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        match self {
            Self::UserRegistered { .. } => &["person"],
            Self::PasswordChanged { .. } => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user already exists")]
    AlreadyExists,
    #[error("user not found")]
    NotFound,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct User {
    pub id: Option<Uuid>,
    pub org_id: Option<Uuid>,
    pub role: Option<Role>,
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
    type Services = ();

    async fn handle(
        &mut self,
        command: UserCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), UserError> {
        match command {
            UserCommand::Register {
                user_id,
                org_id,
                person,
                role,
            } => {
                if self.id.is_some() {
                    return Err(UserError::AlreadyExists);
                }
                let event = UserEvent::UserRegistered {
                    user_id,
                    org_id,
                    role,
                    person,
                };
                sink.write(event, self).await;
            }
            UserCommand::ChangePassword => {
                if self.id.is_none() {
                    return Err(UserError::NotFound);
                }
                sink.write(UserEvent::PasswordChanged {}, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: UserEvent) {
        match event {
            UserEvent::UserRegistered {
                user_id,
                org_id,
                role,
                ..
            } => {
                self.id = Some(user_id);
                self.org_id = Some(org_id);
                self.role = Some(role);
            }
            UserEvent::PasswordChanged {} => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn registered(user_id: Uuid, org_id: Uuid) -> UserEvent {
        UserEvent::UserRegistered {
            user_id,
            org_id,
            role: Role::Owner,
            person: Person {
                email: Email::parse("owner@example.com").unwrap(),
                display_name: Name::parse("Owner").unwrap(),
            },
        }
    }

    #[test]
    fn register_then_refuse_a_second_registration() {
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        let UserEvent::UserRegistered { person, .. } = registered(u, o) else {
            unreachable!()
        };
        TestFramework::<User>::with(())
            .given_no_previous_events()
            .when(UserCommand::Register {
                user_id: u,
                org_id: o,
                person: person.clone(),
                role: Role::Owner,
            })
            .then_expect_events(vec![registered(u, o)]);
        TestFramework::<User>::with(())
            .given(vec![registered(u, o)])
            .when(UserCommand::Register {
                user_id: u,
                org_id: o,
                person,
                role: Role::Owner,
            })
            .then_expect_error(UserError::AlreadyExists);
    }

    #[test]
    fn password_change_needs_a_user() {
        TestFramework::<User>::with(())
            .given_no_previous_events()
            .when(UserCommand::ChangePassword)
            .then_expect_error(UserError::NotFound);
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        TestFramework::<User>::with(())
            .given(vec![registered(u, o)])
            .when(UserCommand::ChangePassword)
            .then_expect_events(vec![UserEvent::PasswordChanged {}]);
    }

    #[test]
    fn roles_parse_case_insensitively() {
        assert_eq!(Role::parse("Owner"), Some(Role::Owner));
        assert_eq!(Role::parse("nobody"), None);
    }
}
