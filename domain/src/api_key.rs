//! An API key: a credential for integrations and agents, acting with a role (optionally
//! narrowed to some of its permissions) until it expires or is revoked. The secret is
//! never in an event: only the key's id, its last four characters and its grant.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use uuid::Uuid;

use crate::access::{Permission, RoleRef};
use crate::user::{Grant, Grantor};
use crate::values::Name;
use crate::PersonalData;

// One command value lives for one request: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ApiKeyCommand {
    Issue {
        key_id: Uuid,
        org_id: Uuid,
        name: Name,
        grant: Grant,
        /// Narrows the role to these permissions (`None`: all of the role's).
        only: Option<BTreeSet<Permission>>,
        last4: String,
        expires_at: Option<DateTime<Utc>>,
        by: Grantor,
        /// An AI agent's key: the user registering the agent, whose rights cap the
        /// agent's at every request (`None`: an integration's key).
        agent_of: Option<Uuid>,
    },
    Revoke,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApiKeyEvent {
    ApiKeyIssued {
        key_id: Uuid,
        org_id: Uuid,
        name: Name,
        role: RoleRef,
        only: Option<BTreeSet<Permission>>,
        last4: String,
        expires_at: Option<DateTime<Utc>>,
        /// An AI agent's key: the user who registered the agent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_of: Option<Uuid>,
    },
    ApiKeyRevoked {},
}

impl DomainEvent for ApiKeyEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ApiKeyIssued { .. } => "ApiKeyIssued",
            Self::ApiKeyRevoked { .. } => "ApiKeyRevoked",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for ApiKeyEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        &[]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    #[error("API key already exists")]
    AlreadyExists,
    #[error("API key not found")]
    NotFound,
    #[error("only an Owner may issue a key with the Owner role")]
    OnlyOwnerGrantsOwner,
    #[error("the key would grant more than your own: {}", .0.join(", "))]
    ExceedsOwnGrant(Vec<String>),
    #[error("the role does not grant {0}, so the key cannot be narrowed to it")]
    NotInRole(String),
    #[error("the expiry must lie in the future")]
    ExpiryInPast,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: Option<Uuid>,
    pub revoked: bool,
}

impl Aggregate for ApiKey {
    const TYPE: &'static str = "api_key";
    type Command = ApiKeyCommand;
    type Event = ApiKeyEvent;
    type Error = ApiKeyError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ApiKeyCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), ApiKeyError> {
        let event = match command {
            ApiKeyCommand::Issue {
                key_id,
                org_id,
                name,
                grant,
                only,
                last4,
                expires_at,
                by,
                agent_of,
            } => {
                if self.id.is_some() {
                    return Err(ApiKeyError::AlreadyExists);
                }
                if expires_at.is_some_and(|t| t <= Utc::now()) {
                    return Err(ApiKeyError::ExpiryInPast);
                }
                if grant.role.is_owner() && !by.is_owner {
                    return Err(ApiKeyError::OnlyOwnerGrantsOwner);
                }
                let mut policy = grant.policy;
                if let Some(only) = &only {
                    if let Some(p) = only.iter().find(|p| !policy.allows(**p)) {
                        return Err(ApiKeyError::NotInRole(p.name().to_owned()));
                    }
                    policy.permissions = only.clone();
                }
                if !policy.is_within(&by.policy) {
                    return Err(ApiKeyError::ExceedsOwnGrant(policy.excess_over(&by.policy)));
                }
                ApiKeyEvent::ApiKeyIssued {
                    key_id,
                    org_id,
                    name,
                    role: grant.role,
                    only,
                    last4,
                    expires_at,
                    agent_of,
                }
            }
            ApiKeyCommand::Revoke => {
                if self.id.is_none() {
                    return Err(ApiKeyError::NotFound);
                }
                if self.revoked {
                    return Ok(());
                }
                ApiKeyEvent::ApiKeyRevoked {}
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: ApiKeyEvent) {
        match event {
            ApiKeyEvent::ApiKeyIssued { key_id, .. } => self.id = Some(key_id),
            ApiKeyEvent::ApiKeyRevoked {} => self.revoked = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{builtin_policy, Role};
    use cqrs_es::test::TestFramework;

    fn issue(role: Role, by: Role, only: Option<BTreeSet<Permission>>) -> ApiKeyCommand {
        ApiKeyCommand::Issue {
            key_id: Uuid::nil(),
            org_id: Uuid::nil(),
            name: Name::parse("CI").unwrap(),
            grant: Grant {
                role: RoleRef::Builtin(role),
                policy: builtin_policy(role),
            },
            only,
            last4: "abcd".into(),
            expires_at: None,
            by: Grantor {
                is_owner: by == Role::Owner,
                policy: builtin_policy(by),
            },
            agent_of: None,
        }
    }

    #[test]
    fn a_key_never_exceeds_its_issuer() {
        TestFramework::<ApiKey>::with(())
            .given_no_previous_events()
            .when(issue(Role::Owner, Role::Admin, None))
            .then_expect_error(ApiKeyError::OnlyOwnerGrantsOwner);
        let r = TestFramework::<ApiKey>::with(())
            .given_no_previous_events()
            .when(issue(Role::Director, Role::Team, None))
            .inspect_result();
        assert!(matches!(r, Err(ApiKeyError::ExceedsOwnGrant(_))), "{r:?}");
        // Narrowed to what the issuer holds, the same role is fine.
        let only: BTreeSet<_> = [Permission::ContactsRead].into_iter().collect();
        TestFramework::<ApiKey>::with(())
            .given_no_previous_events()
            .when(issue(Role::Director, Role::Team, Some(only.clone())))
            .then_expect_events(vec![ApiKeyEvent::ApiKeyIssued {
                key_id: Uuid::nil(),
                org_id: Uuid::nil(),
                name: Name::parse("CI").unwrap(),
                role: RoleRef::Builtin(Role::Director),
                only: Some(only),
                last4: "abcd".into(),
                expires_at: None,
                agent_of: None,
            }]);
        TestFramework::<ApiKey>::with(())
            .given_no_previous_events()
            .when(issue(
                Role::Viewer,
                Role::Owner,
                Some([Permission::ContactsErase].into_iter().collect()),
            ))
            .then_expect_error(ApiKeyError::NotInRole("contacts.erase".into()));
    }

    #[test]
    fn revoking_twice_records_once() {
        TestFramework::<ApiKey>::with(())
            .given(vec![
                ApiKeyEvent::ApiKeyIssued {
                    key_id: Uuid::nil(),
                    org_id: Uuid::nil(),
                    name: Name::parse("CI").unwrap(),
                    role: RoleRef::Builtin(Role::Viewer),
                    only: None,
                    last4: "abcd".into(),
                    expires_at: None,
                    agent_of: None,
                },
                ApiKeyEvent::ApiKeyRevoked {},
            ])
            .when(ApiKeyCommand::Revoke)
            .then_expect_events(vec![]);
    }
}
