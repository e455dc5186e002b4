//! The user aggregate: a member of staff who logs in to an organisation.
//!
//! Credentials (password hashes, TOTP seeds) are never part of an event: they live in
//! a mutable, erasable table next to the store. Events say that a password was changed,
//! a role granted, a user deactivated, and who did it (the event's metadata).
//!
//! Rules kept here: nobody grants what they do not hold themselves, and only an Owner
//! grants the Owner role or changes, deactivates or reactivates an Owner. "The last
//! Owner cannot be removed" is a rule over every user of the organisation; the store
//! checks it in the transaction that appends the event (`infra::access`).

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::access::Policy;
pub use crate::access::{Role, RoleRef};
use crate::values::{Email, Name};
use crate::PersonalData;

/// Personal data of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Person {
    pub email: Email,
    pub display_name: Name,
}

/// Who is granting: whether they are an Owner, and what their own role allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Grantor {
    pub is_owner: bool,
    pub policy: Policy,
}

impl Grantor {
    /// The operator at the command line (bootstrap, `crm create-user`): may grant anything.
    pub fn operator() -> Self {
        Self {
            is_owner: true,
            policy: crate::access::builtin_policy(Role::Owner),
        }
    }
}

/// A role to grant, with what it allows (looked up by the caller: a custom role's
/// policy lives in its own stream).
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub role: RoleRef,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    Register {
        user_id: Uuid,
        org_id: Uuid,
        person: Person,
        grant: Grant,
        by: Grantor,
    },
    /// `holds`, here and below: what the user's current role allows (looked up by the
    /// caller, like a grant's policy). Nobody changes a user who holds more than they do.
    ChangeRole {
        grant: Grant,
        by: Grantor,
        holds: Policy,
    },
    Deactivate {
        by: Grantor,
        holds: Policy,
    },
    Reactivate {
        by: Grantor,
        holds: Policy,
    },
    ChangePassword,
    /// Ends every session of the user (logout).
    SignOut,
    /// Turns on TOTP two-factor authentication (after the user proved a code).
    EnableTwoFactor,
    /// The user turns their own 2FA off (after proving their password and a code).
    /// Refused by the store where the organisation requires 2FA of the user's role.
    DisableTwoFactor,
    /// Someone else removes the user's 2FA (a lost authenticator and no backup code
    /// left); the user sets it up again, and must where the organisation requires it.
    ResetTwoFactor {
        by: Grantor,
        holds: Policy,
    },
    /// Too many failed logins: the account's logins are refused until `until` (the
    /// lockout itself is the edge's; this puts it on the record).
    RecordLockout {
        until: chrono::DateTime<chrono::Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    UserRegistered {
        user_id: Uuid,
        org_id: Uuid,
        role: RoleRef,
        person: Person,
    },
    UserRoleChanged {
        from: RoleRef,
        to: RoleRef,
    },
    UserDeactivated {},
    UserReactivated {},
    PasswordChanged {},
    UserSignedOut {},
    TwoFactorEnabled {},
    /// By the user, on their own account.
    TwoFactorDisabled {},
    /// By another user (the actor is in the metadata).
    TwoFactorReset {},
    /// Logins refused until `until` after too many failures.
    UserLockedOut {
        until: chrono::DateTime<chrono::Utc>,
    },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            Self::UserRegistered { .. } => "UserRegistered",
            Self::UserRoleChanged { .. } => "UserRoleChanged",
            Self::UserDeactivated { .. } => "UserDeactivated",
            Self::UserReactivated { .. } => "UserReactivated",
            Self::PasswordChanged { .. } => "PasswordChanged",
            Self::UserSignedOut { .. } => "UserSignedOut",
            Self::TwoFactorEnabled { .. } => "TwoFactorEnabled",
            Self::TwoFactorDisabled { .. } => "TwoFactorDisabled",
            Self::TwoFactorReset { .. } => "TwoFactorReset",
            Self::UserLockedOut { .. } => "UserLockedOut",
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
            _ => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user already exists")]
    AlreadyExists,
    #[error("user not found")]
    NotFound,
    #[error("only an Owner may grant the Owner role")]
    OnlyOwnerGrantsOwner,
    #[error("only an Owner may change, deactivate or reactivate an Owner")]
    OnlyOwnerChangesOwner,
    #[error("the role grants more than your own: {}", .0.join(", "))]
    ExceedsOwnGrant(Vec<String>),
    #[error("the user's role holds more than your own: {}", .0.join(", "))]
    HoldsMoreThanYou(Vec<String>),
    /// Checked by the store against every user of the organisation.
    #[error("the organisation's last active Owner cannot be demoted or deactivated")]
    LastOwner,
    /// Checked by the store: an email address belongs to one account.
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("the role does not exist in this organisation or is retired")]
    UnknownRole,
    #[error("two-factor authentication is already on")]
    TwoFactorAlreadyOn,
    #[error("two-factor authentication is not on")]
    TwoFactorNotOn,
    /// Checked by the store: the organisation requires 2FA of Owners and Admins.
    #[error("the organisation requires two-factor authentication of this user's role")]
    TwoFactorRequired,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct User {
    pub id: Option<Uuid>,
    pub org_id: Option<Uuid>,
    pub role: Option<RoleRef>,
    #[serde(default)]
    pub deactivated: bool,
    #[serde(default)]
    pub two_factor: bool,
}

impl User {
    fn check_grant(grant: &Grant, by: &Grantor) -> Result<(), UserError> {
        if grant.role.is_owner() && !by.is_owner {
            return Err(UserError::OnlyOwnerGrantsOwner);
        }
        if !grant.policy.is_within(&by.policy) {
            return Err(UserError::ExceedsOwnGrant(
                grant.policy.excess_over(&by.policy),
            ));
        }
        Ok(())
    }

    fn existing(&self) -> Result<RoleRef, UserError> {
        self.role
            .filter(|_| self.id.is_some())
            .ok_or(UserError::NotFound)
    }

    fn check_may_change(&self, by: &Grantor, holds: &Policy) -> Result<RoleRef, UserError> {
        let current = self.existing()?;
        if current.is_owner() && !by.is_owner {
            return Err(UserError::OnlyOwnerChangesOwner);
        }
        if !holds.is_within(&by.policy) {
            return Err(UserError::HoldsMoreThanYou(holds.excess_over(&by.policy)));
        }
        Ok(current)
    }
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
        let event = match command {
            UserCommand::Register {
                user_id,
                org_id,
                person,
                grant,
                by,
            } => {
                if self.id.is_some() {
                    return Err(UserError::AlreadyExists);
                }
                Self::check_grant(&grant, &by)?;
                UserEvent::UserRegistered {
                    user_id,
                    org_id,
                    role: grant.role,
                    person,
                }
            }
            UserCommand::ChangeRole { grant, by, holds } => {
                let current = self.check_may_change(&by, &holds)?;
                Self::check_grant(&grant, &by)?;
                if current == grant.role {
                    return Ok(());
                }
                UserEvent::UserRoleChanged {
                    from: current,
                    to: grant.role,
                }
            }
            UserCommand::Deactivate { by, holds } => {
                self.check_may_change(&by, &holds)?;
                if self.deactivated {
                    return Ok(());
                }
                UserEvent::UserDeactivated {}
            }
            UserCommand::Reactivate { by, holds } => {
                self.check_may_change(&by, &holds)?;
                if !self.deactivated {
                    return Ok(());
                }
                UserEvent::UserReactivated {}
            }
            UserCommand::ChangePassword => {
                self.existing()?;
                UserEvent::PasswordChanged {}
            }
            UserCommand::SignOut => {
                self.existing()?;
                UserEvent::UserSignedOut {}
            }
            UserCommand::RecordLockout { until } => {
                self.existing()?;
                UserEvent::UserLockedOut { until }
            }
            UserCommand::EnableTwoFactor => {
                self.existing()?;
                if self.two_factor {
                    return Err(UserError::TwoFactorAlreadyOn);
                }
                UserEvent::TwoFactorEnabled {}
            }
            UserCommand::DisableTwoFactor => {
                self.existing()?;
                if !self.two_factor {
                    return Err(UserError::TwoFactorNotOn);
                }
                UserEvent::TwoFactorDisabled {}
            }
            UserCommand::ResetTwoFactor { by, holds } => {
                self.check_may_change(&by, &holds)?;
                if !self.two_factor {
                    return Err(UserError::TwoFactorNotOn);
                }
                UserEvent::TwoFactorReset {}
            }
        };
        sink.write(event, self).await;
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
            UserEvent::UserRoleChanged { to, .. } => self.role = Some(to),
            UserEvent::UserDeactivated {} => self.deactivated = true,
            UserEvent::UserReactivated {} => self.deactivated = false,
            UserEvent::TwoFactorEnabled {} => self.two_factor = true,
            UserEvent::TwoFactorDisabled {} | UserEvent::TwoFactorReset {} => {
                self.two_factor = false
            }
            UserEvent::PasswordChanged {}
            | UserEvent::UserSignedOut {}
            | UserEvent::UserLockedOut { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::builtin_policy;
    use cqrs_es::test::TestFramework;

    fn registered(user_id: Uuid, org_id: Uuid, role: Role) -> UserEvent {
        UserEvent::UserRegistered {
            user_id,
            org_id,
            role: RoleRef::Builtin(role),
            person: person(),
        }
    }

    fn person() -> Person {
        Person {
            email: Email::parse("owner@example.com").unwrap(),
            display_name: Name::parse("Owner").unwrap(),
        }
    }

    fn grant(role: Role) -> Grant {
        Grant {
            role: RoleRef::Builtin(role),
            policy: builtin_policy(role),
        }
    }

    fn by(role: Role) -> Grantor {
        Grantor {
            is_owner: role == Role::Owner,
            policy: builtin_policy(role),
        }
    }

    fn register(u: Uuid, o: Uuid, role: Role, actor: Role) -> UserCommand {
        UserCommand::Register {
            user_id: u,
            org_id: o,
            person: person(),
            grant: grant(role),
            by: by(actor),
        }
    }

    #[test]
    fn register_then_refuse_a_second_registration() {
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        TestFramework::<User>::with(())
            .given_no_previous_events()
            .when(register(u, o, Role::Owner, Role::Owner))
            .then_expect_events(vec![registered(u, o, Role::Owner)]);
        TestFramework::<User>::with(())
            .given(vec![registered(u, o, Role::Owner)])
            .when(register(u, o, Role::Owner, Role::Owner))
            .then_expect_error(UserError::AlreadyExists);
    }

    #[test]
    fn nobody_grants_more_than_they_hold() {
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        TestFramework::<User>::with(())
            .given_no_previous_events()
            .when(register(u, o, Role::Owner, Role::Admin))
            .then_expect_error(UserError::OnlyOwnerGrantsOwner);
        let result = TestFramework::<User>::with(())
            .given_no_previous_events()
            .when(register(u, o, Role::Team, Role::Support))
            .inspect_result();
        let Err(UserError::ExceedsOwnGrant(excess)) = result else {
            panic!("{result:?}")
        };
        assert!(excess.contains(&"contacts.create".to_owned()), "{excess:?}");
        TestFramework::<User>::with(())
            .given_no_previous_events()
            .when(register(u, o, Role::Viewer, Role::Admin))
            .then_expect_events(vec![registered(u, o, Role::Viewer)]);
    }

    #[test]
    fn only_an_owner_changes_an_owner() {
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        TestFramework::<User>::with(())
            .given(vec![registered(u, o, Role::Owner)])
            .when(UserCommand::ChangeRole {
                grant: grant(Role::Viewer),
                by: by(Role::Admin),
                holds: builtin_policy(Role::Owner),
            })
            .then_expect_error(UserError::OnlyOwnerChangesOwner);
        TestFramework::<User>::with(())
            .given(vec![registered(u, o, Role::Owner)])
            .when(UserCommand::Deactivate {
                by: by(Role::Admin),
                holds: builtin_policy(Role::Owner),
            })
            .then_expect_error(UserError::OnlyOwnerChangesOwner);
        TestFramework::<User>::with(())
            .given(vec![registered(u, o, Role::Owner)])
            .when(UserCommand::ChangeRole {
                grant: grant(Role::Admin),
                by: by(Role::Owner),
                holds: builtin_policy(Role::Owner),
            })
            .then_expect_events(vec![UserEvent::UserRoleChanged {
                from: RoleRef::Builtin(Role::Owner),
                to: RoleRef::Builtin(Role::Admin),
            }]);
    }

    #[test]
    fn nobody_changes_a_user_who_holds_more_than_they_do() {
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        let admin = vec![
            registered(u, o, Role::Admin),
            UserEvent::TwoFactorEnabled {},
        ];
        let commands = [
            UserCommand::ChangeRole {
                grant: grant(Role::Viewer),
                by: by(Role::Support),
                holds: builtin_policy(Role::Admin),
            },
            UserCommand::Deactivate {
                by: by(Role::Support),
                holds: builtin_policy(Role::Admin),
            },
            UserCommand::ResetTwoFactor {
                by: by(Role::Support),
                holds: builtin_policy(Role::Admin),
            },
        ];
        for command in commands {
            let result = TestFramework::<User>::with(())
                .given(admin.clone())
                .when(command)
                .inspect_result();
            let Err(UserError::HoldsMoreThanYou(excess)) = result else {
                panic!("{result:?}")
            };
            assert!(excess.contains(&"users.manage".to_owned()), "{excess:?}");
        }
    }

    #[test]
    fn deactivate_and_reactivate_are_idempotent() {
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        TestFramework::<User>::with(())
            .given(vec![registered(u, o, Role::Team)])
            .when(UserCommand::Deactivate {
                by: by(Role::Admin),
                holds: builtin_policy(Role::Team),
            })
            .then_expect_events(vec![UserEvent::UserDeactivated {}]);
        TestFramework::<User>::with(())
            .given(vec![
                registered(u, o, Role::Team),
                UserEvent::UserDeactivated {},
            ])
            .when(UserCommand::Deactivate {
                by: by(Role::Admin),
                holds: builtin_policy(Role::Team),
            })
            .then_expect_events(vec![]);
        TestFramework::<User>::with(())
            .given(vec![
                registered(u, o, Role::Team),
                UserEvent::UserDeactivated {},
            ])
            .when(UserCommand::Reactivate {
                by: by(Role::Admin),
                holds: builtin_policy(Role::Team),
            })
            .then_expect_events(vec![UserEvent::UserReactivated {}]);
    }

    #[test]
    fn two_factor_is_turned_off_only_when_on_and_only_an_owner_resets_an_owners() {
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        let on = |role| vec![registered(u, o, role), UserEvent::TwoFactorEnabled {}];
        TestFramework::<User>::with(())
            .given(vec![registered(u, o, Role::Team)])
            .when(UserCommand::DisableTwoFactor)
            .then_expect_error(UserError::TwoFactorNotOn);
        TestFramework::<User>::with(())
            .given(on(Role::Team))
            .when(UserCommand::DisableTwoFactor)
            .then_expect_events(vec![UserEvent::TwoFactorDisabled {}]);
        TestFramework::<User>::with(())
            .given(vec![registered(u, o, Role::Team)])
            .when(UserCommand::ResetTwoFactor {
                by: by(Role::Admin),
                holds: builtin_policy(Role::Team),
            })
            .then_expect_error(UserError::TwoFactorNotOn);
        TestFramework::<User>::with(())
            .given(on(Role::Team))
            .when(UserCommand::ResetTwoFactor {
                by: by(Role::Admin),
                holds: builtin_policy(Role::Team),
            })
            .then_expect_events(vec![UserEvent::TwoFactorReset {}]);
        TestFramework::<User>::with(())
            .given(on(Role::Owner))
            .when(UserCommand::ResetTwoFactor {
                by: by(Role::Admin),
                holds: builtin_policy(Role::Owner),
            })
            .then_expect_error(UserError::OnlyOwnerChangesOwner);
        TestFramework::<User>::with(())
            .given(on(Role::Owner))
            .when(UserCommand::ResetTwoFactor {
                by: by(Role::Owner),
                holds: builtin_policy(Role::Owner),
            })
            .then_expect_events(vec![UserEvent::TwoFactorReset {}]);
        // Off again, it can be turned on again.
        TestFramework::<User>::with(())
            .given(vec![
                registered(u, o, Role::Team),
                UserEvent::TwoFactorEnabled {},
                UserEvent::TwoFactorReset {},
            ])
            .when(UserCommand::EnableTwoFactor)
            .then_expect_events(vec![UserEvent::TwoFactorEnabled {}]);
    }

    #[test]
    fn password_change_and_sign_out_need_a_user() {
        for cmd in [UserCommand::ChangePassword, UserCommand::SignOut] {
            TestFramework::<User>::with(())
                .given_no_previous_events()
                .when(cmd)
                .then_expect_error(UserError::NotFound);
        }
        let (u, o) = (Uuid::now_v7(), Uuid::now_v7());
        TestFramework::<User>::with(())
            .given(vec![registered(u, o, Role::Team)])
            .when(UserCommand::ChangePassword)
            .then_expect_events(vec![UserEvent::PasswordChanged {}]);
    }

    #[test]
    fn roles_parse_case_insensitively() {
        assert_eq!(Role::parse("Owner"), Some(Role::Owner));
        assert_eq!(Role::parse("nobody"), None);
    }
}
