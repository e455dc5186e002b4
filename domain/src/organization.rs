//! The organisation aggregate: the tenant every other stream belongs to.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::Name;
use crate::PersonalData;

#[derive(Debug, Clone, PartialEq)]
pub enum OrganizationCommand {
    Create { org_id: Uuid, name: Name },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrganizationEvent {
    OrganizationCreated { org_id: Uuid, name: Name },
}

impl DomainEvent for OrganizationEvent {
    fn event_type(&self) -> String {
        "OrganizationCreated".to_owned()
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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Organization {
    pub id: Option<Uuid>,
    pub name: Option<Name>,
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
        }
        Ok(())
    }

    fn apply(&mut self, event: OrganizationEvent) {
        match event {
            OrganizationEvent::OrganizationCreated { org_id, name } => {
                self.id = Some(org_id);
                self.name = Some(name);
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
