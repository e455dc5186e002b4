//! The organisation aggregate: the tenant every other stream belongs to, with the
//! modules it has switched on and whether its Owners and Admins must use 2FA.

use std::collections::BTreeSet;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::access::Module;
use crate::values::Name;
use crate::PersonalData;

#[derive(Debug, Clone, PartialEq)]
pub enum OrganizationCommand {
    Create {
        org_id: Uuid,
        name: Name,
    },
    /// Switches on exactly these modules (`core` is always on).
    SetModules {
        modules: BTreeSet<Module>,
    },
    RequireTwoFactor {
        required: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrganizationEvent {
    /// A new organisation has [`Module::DEFAULT`] switched on.
    OrganizationCreated {
        org_id: Uuid,
        name: Name,
    },
    ModulesChanged {
        modules: BTreeSet<Module>,
    },
    TwoFactorRequirementChanged {
        required: bool,
    },
}

impl DomainEvent for OrganizationEvent {
    fn event_type(&self) -> String {
        match self {
            Self::OrganizationCreated { .. } => "OrganizationCreated",
            Self::ModulesChanged { .. } => "ModulesChanged",
            Self::TwoFactorRequirementChanged { .. } => "TwoFactorRequirementChanged",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for OrganizationEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        &[]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrganizationError {
    #[error("organisation already exists")]
    AlreadyExists,
    #[error("organisation not found")]
    NotFound,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Organization {
    pub id: Option<Uuid>,
    pub name: Option<Name>,
    pub modules: BTreeSet<Module>,
    pub two_factor_required: bool,
}

impl Aggregate for Organization {
    const TYPE: &'static str = "organization";
    type Command = OrganizationCommand;
    type Event = OrganizationEvent;
    type Error = OrganizationError;
    type Services = ();

    async fn handle(
        &mut self,
        command: OrganizationCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), OrganizationError> {
        match command {
            OrganizationCommand::Create { org_id, name } => {
                if self.id.is_some() {
                    return Err(OrganizationError::AlreadyExists);
                }
                sink.write(
                    OrganizationEvent::OrganizationCreated { org_id, name },
                    self,
                )
                .await;
            }
            OrganizationCommand::SetModules { mut modules } => {
                if self.id.is_none() {
                    return Err(OrganizationError::NotFound);
                }
                modules.insert(Module::Core);
                if modules != self.modules {
                    sink.write(OrganizationEvent::ModulesChanged { modules }, self)
                        .await;
                }
            }
            OrganizationCommand::RequireTwoFactor { required } => {
                if self.id.is_none() {
                    return Err(OrganizationError::NotFound);
                }
                if required != self.two_factor_required {
                    sink.write(
                        OrganizationEvent::TwoFactorRequirementChanged { required },
                        self,
                    )
                    .await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: OrganizationEvent) {
        match event {
            OrganizationEvent::OrganizationCreated { org_id, name } => {
                self.id = Some(org_id);
                self.name = Some(name);
                self.modules = Module::DEFAULT.into_iter().collect();
            }
            OrganizationEvent::ModulesChanged { modules } => self.modules = modules,
            OrganizationEvent::TwoFactorRequirementChanged { required } => {
                self.two_factor_required = required;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn created(id: Uuid) -> OrganizationEvent {
        OrganizationEvent::OrganizationCreated {
            org_id: id,
            name: Name::parse("Acme").unwrap(),
        }
    }

    #[test]
    fn create_an_organization() {
        let id = Uuid::now_v7();
        TestFramework::<Organization>::with(())
            .given_no_previous_events()
            .when(OrganizationCommand::Create {
                org_id: id,
                name: Name::parse("Acme").unwrap(),
            })
            .then_expect_events(vec![created(id)]);
    }

    #[test]
    fn core_stays_on_and_unchanged_modules_write_nothing() {
        let id = Uuid::now_v7();
        TestFramework::<Organization>::with(())
            .given(vec![created(id)])
            .when(OrganizationCommand::SetModules {
                modules: [Module::Contacts].into_iter().collect(),
            })
            .then_expect_events(vec![OrganizationEvent::ModulesChanged {
                modules: [Module::Core, Module::Contacts].into_iter().collect(),
            }]);
        TestFramework::<Organization>::with(())
            .given(vec![created(id)])
            .when(OrganizationCommand::SetModules {
                modules: Module::DEFAULT.into_iter().collect(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn an_organization_is_created_once() {
        let id = Uuid::now_v7();
        TestFramework::<Organization>::with(())
            .given(vec![created(id)])
            .when(OrganizationCommand::Create {
                org_id: id,
                name: Name::parse("Acme").unwrap(),
            })
            .then_expect_error(OrganizationError::AlreadyExists);
    }
}
