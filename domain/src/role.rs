//! A custom role of an organisation: a named [`Policy`], defined, changed and retired
//! by command. Whoever defines or changes one may not give it more than they hold.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::access::Policy;
use crate::user::Grantor;
use crate::values::Name;
use crate::PersonalData;

#[derive(Debug, Clone, PartialEq)]
pub enum RoleCommand {
    Define {
        role_id: Uuid,
        org_id: Uuid,
        name: Name,
        policy: Policy,
        by: Grantor,
    },
    Change {
        name: Option<Name>,
        policy: Option<Policy>,
        by: Grantor,
    },
    Retire,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RoleEvent {
    RoleDefined {
        role_id: Uuid,
        org_id: Uuid,
        name: Name,
        policy: Policy,
    },
    RoleChanged {
        name: Name,
        policy: Policy,
    },
    RoleRetired {},
}

impl DomainEvent for RoleEvent {
    fn event_type(&self) -> String {
        match self {
            Self::RoleDefined { .. } => "RoleDefined",
            Self::RoleChanged { .. } => "RoleChanged",
            Self::RoleRetired { .. } => "RoleRetired",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for RoleEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        &[]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("role already exists")]
    AlreadyExists,
    #[error("role not found")]
    NotFound,
    #[error("the role is retired")]
    Retired,
    #[error("the role grants more than your own: {}", .0.join(", "))]
    ExceedsOwnGrant(Vec<String>),
    /// Checked by the store: a role someone holds is not retired under them.
    #[error("the role is still held by {0} user(s) or API key(s)")]
    InUse(i64),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CustomRole {
    pub id: Option<Uuid>,
    pub name: Option<Name>,
    pub policy: Policy,
    pub retired: bool,
}

fn within(policy: &Policy, by: &Grantor) -> Result<(), RoleError> {
    if policy.is_within(&by.policy) {
        Ok(())
    } else {
        Err(RoleError::ExceedsOwnGrant(policy.excess_over(&by.policy)))
    }
}

impl Aggregate for CustomRole {
    const TYPE: &'static str = "role";
    type Command = RoleCommand;
    type Event = RoleEvent;
    type Error = RoleError;
    type Services = ();

    async fn handle(
        &mut self,
        command: RoleCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), RoleError> {
        let event = match command {
            RoleCommand::Define {
                role_id,
                org_id,
                name,
                policy,
                by,
            } => {
                if self.id.is_some() {
                    return Err(RoleError::AlreadyExists);
                }
                within(&policy, &by)?;
                RoleEvent::RoleDefined {
                    role_id,
                    org_id,
                    name,
                    policy,
                }
            }
            RoleCommand::Change { name, policy, by } => {
                let current = self.name.clone().ok_or(RoleError::NotFound)?;
                if self.retired {
                    return Err(RoleError::Retired);
                }
                // Changing a role is granting it anew to everyone who holds it: the
                // changer must hold all of the old and the new policy.
                within(&self.policy, &by)?;
                let policy = policy.unwrap_or_else(|| self.policy.clone());
                within(&policy, &by)?;
                let name = name.unwrap_or(current);
                if Some(&name) == self.name.as_ref() && policy == self.policy {
                    return Ok(());
                }
                RoleEvent::RoleChanged { name, policy }
            }
            RoleCommand::Retire => {
                if self.id.is_none() {
                    return Err(RoleError::NotFound);
                }
                if self.retired {
                    return Ok(());
                }
                RoleEvent::RoleRetired {}
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: RoleEvent) {
        match event {
            RoleEvent::RoleDefined {
                role_id,
                name,
                policy,
                ..
            } => {
                self.id = Some(role_id);
                self.name = Some(name);
                self.policy = policy;
            }
            RoleEvent::RoleChanged { name, policy } => {
                self.name = Some(name);
                self.policy = policy;
            }
            RoleEvent::RoleRetired {} => self.retired = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{builtin_policy, Role};
    use cqrs_es::test::TestFramework;

    fn by(role: Role) -> Grantor {
        Grantor {
            is_owner: role == Role::Owner,
            policy: builtin_policy(role),
        }
    }

    fn defined(id: Uuid, o: Uuid, policy: Policy) -> RoleEvent {
        RoleEvent::RoleDefined {
            role_id: id,
            org_id: o,
            name: Name::parse("Auditor").unwrap(),
            policy,
        }
    }

    #[test]
    fn a_role_wider_than_its_creator_is_refused() {
        let (id, o) = (Uuid::now_v7(), Uuid::now_v7());
        let result = TestFramework::<CustomRole>::with(())
            .given_no_previous_events()
            .when(RoleCommand::Define {
                role_id: id,
                org_id: o,
                name: Name::parse("Auditor").unwrap(),
                policy: builtin_policy(Role::Director),
                by: by(Role::Team),
            })
            .inspect_result();
        assert!(
            matches!(result, Err(RoleError::ExceedsOwnGrant(ref e)) if e.contains(&"contacts.export".to_owned())),
            "{result:?}"
        );
        TestFramework::<CustomRole>::with(())
            .given_no_previous_events()
            .when(RoleCommand::Define {
                role_id: id,
                org_id: o,
                name: Name::parse("Auditor").unwrap(),
                policy: builtin_policy(Role::Viewer),
                by: by(Role::Team),
            })
            .then_expect_events(vec![defined(id, o, builtin_policy(Role::Viewer))]);
    }

    #[test]
    fn a_retired_role_cannot_change() {
        let (id, o) = (Uuid::now_v7(), Uuid::now_v7());
        TestFramework::<CustomRole>::with(())
            .given(vec![
                defined(id, o, builtin_policy(Role::Viewer)),
                RoleEvent::RoleRetired {},
            ])
            .when(RoleCommand::Change {
                name: None,
                policy: Some(builtin_policy(Role::Team)),
                by: by(Role::Owner),
            })
            .then_expect_error(RoleError::Retired);
    }

    #[test]
    fn changing_a_role_needs_the_old_and_the_new_grant() {
        let (id, o) = (Uuid::now_v7(), Uuid::now_v7());
        // Team cannot narrow a Director-wide role: it would be acting on grants it lacks.
        TestFramework::<CustomRole>::with(())
            .given(vec![defined(id, o, builtin_policy(Role::Director))])
            .when(RoleCommand::Change {
                name: None,
                policy: Some(builtin_policy(Role::Viewer)),
                by: by(Role::Team),
            })
            .then_expect_error(RoleError::ExceedsOwnGrant(
                builtin_policy(Role::Director).excess_over(&builtin_policy(Role::Team)),
            ));
    }
}
