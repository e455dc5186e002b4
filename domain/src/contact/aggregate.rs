use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::commands::ContactCommand;
use super::events::{ContactChanges, ContactEvent, ContactField, ContactProfile, HoldReason};

/// Why a contact command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContactError {
    #[error("contact already exists")]
    AlreadyExists,
    #[error("contact not found")]
    NotFound,
    #[error("contact is archived")]
    Archived,
    #[error("a contact needs at least one field")]
    EmptyProfile,
    #[error("the contact was erased")]
    Erased,
    #[error("the contact is under a legal hold: it cannot be erased until the hold is lifted")]
    OnLegalHold,
    #[error("the contact is already under a legal hold")]
    AlreadyOnHold,
    #[error("the contact is not under a legal hold")]
    NoLegalHold,
    #[error("the contact's processing is already restricted")]
    AlreadyRestricted,
    #[error("the contact's processing is not restricted")]
    NotRestricted,
    #[error("a retention period is 1 to 36,500 days")]
    BadRetention,
}

/// Current state of one contact, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    pub id: Option<Uuid>,
    pub org_id: Option<Uuid>,
    pub profile: ContactProfile,
    pub archived: bool,
    #[serde(default)]
    pub legal_hold: bool,
    #[serde(default)]
    pub erased: bool,
    #[serde(default)]
    pub restricted: bool,
    /// Its own retention period in days (`None`: the organisation's).
    #[serde(default)]
    pub retention_days: Option<u32>,
}

impl Contact {
    pub fn exists(&self) -> bool {
        self.id.is_some()
    }

    /// The part of `requested` that differs from the current profile.
    fn effective_changes(&self, requested: ContactChanges) -> ContactChanges {
        let cur = &self.profile;
        let mut out = ContactChanges::default();
        let set = requested.set;
        macro_rules! diff {
            ($($field:ident),*) => {$(
                if set.$field.is_some() && set.$field != cur.$field {
                    out.set.$field = set.$field;
                }
            )*};
        }
        diff!(
            given_name,
            family_name,
            email,
            phone,
            address,
            company,
            title,
            time_zone
        );
        for (key, value) in set.custom {
            if cur.custom.get(&key) != Some(&value) {
                out.set.custom.insert(key, value);
            }
        }
        for field in requested.cleared {
            let present = match field {
                ContactField::GivenName => cur.given_name.is_some(),
                ContactField::FamilyName => cur.family_name.is_some(),
                ContactField::Email => cur.email.is_some(),
                ContactField::Phone => cur.phone.is_some(),
                ContactField::Address => cur.address.is_some(),
                ContactField::Company => cur.company.is_some(),
                ContactField::Title => cur.title.is_some(),
                ContactField::TimeZone => cur.time_zone.is_some(),
            };
            if present && !out.cleared.contains(&field) {
                out.cleared.push(field);
            }
        }
        for key in requested.cleared_custom {
            if cur.custom.contains_key(&key) && !out.cleared_custom.contains(&key) {
                out.cleared_custom.push(key);
            }
        }
        out
    }
}

/// Applies an update to a profile; shared by the aggregate and the read models.
pub fn apply_changes(profile: &mut ContactProfile, changes: &ContactChanges) {
    let set = &changes.set;
    macro_rules! set {
        ($($field:ident),*) => {$(
            if set.$field.is_some() {
                profile.$field = set.$field.clone();
            }
        )*};
    }
    set!(
        given_name,
        family_name,
        email,
        phone,
        address,
        company,
        title,
        time_zone
    );
    for (k, v) in &set.custom {
        profile.custom.insert(k.clone(), v.clone());
    }
    for field in &changes.cleared {
        match field {
            ContactField::GivenName => profile.given_name = None,
            ContactField::FamilyName => profile.family_name = None,
            ContactField::Email => profile.email = None,
            ContactField::Phone => profile.phone = None,
            ContactField::Address => profile.address = None,
            ContactField::Company => profile.company = None,
            ContactField::Title => profile.title = None,
            ContactField::TimeZone => profile.time_zone = None,
        }
    }
    for key in &changes.cleared_custom {
        profile.custom.remove(key);
    }
}

impl Aggregate for Contact {
    const TYPE: &'static str = "contact";
    type Command = ContactCommand;
    type Event = ContactEvent;
    type Error = ContactError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ContactCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), ContactError> {
        match command {
            ContactCommand::Create {
                contact_id,
                org_id,
                profile,
            } => {
                if self.exists() {
                    return Err(ContactError::AlreadyExists);
                }
                if profile.is_empty() {
                    return Err(ContactError::EmptyProfile);
                }
                let event = ContactEvent::ContactCreated {
                    contact_id,
                    org_id,
                    profile,
                };
                sink.write(event, self).await;
            }
            ContactCommand::Update { changes } => {
                self.must_be_active()?;
                let changes = self.effective_changes(changes);
                if !changes.is_empty() {
                    sink.write(ContactEvent::ContactUpdated { changes }, self)
                        .await;
                }
            }
            ContactCommand::Archive => {
                self.must_be_active()?;
                sink.write(ContactEvent::ContactArchived {}, self).await;
            }
            ContactCommand::PlaceLegalHold { reason } => {
                self.must_exist()?;
                if self.legal_hold {
                    return Err(ContactError::AlreadyOnHold);
                }
                let why = HoldReason { reason };
                sink.write(ContactEvent::LegalHoldPlaced { why }, self)
                    .await;
            }
            ContactCommand::LiftLegalHold { reason } => {
                self.must_exist()?;
                if !self.legal_hold {
                    return Err(ContactError::NoLegalHold);
                }
                let why = HoldReason { reason };
                sink.write(ContactEvent::LegalHoldLifted { why }, self)
                    .await;
            }
            ContactCommand::RestrictProcessing { reason } => {
                self.must_exist()?;
                if self.restricted {
                    return Err(ContactError::AlreadyRestricted);
                }
                let why = HoldReason { reason };
                sink.write(ContactEvent::ProcessingRestricted { why }, self)
                    .await;
            }
            ContactCommand::LiftRestriction { reason } => {
                self.must_exist()?;
                if !self.restricted {
                    return Err(ContactError::NotRestricted);
                }
                let why = HoldReason { reason };
                sink.write(ContactEvent::ProcessingRestrictionLifted { why }, self)
                    .await;
            }
            ContactCommand::SetRetention { days, reason } => {
                self.must_exist()?;
                let max = crate::consent::privacy::MAX_RETENTION_DAYS;
                if days.is_some_and(|d| !(1..=max).contains(&d)) {
                    return Err(ContactError::BadRetention);
                }
                if self.retention_days != days {
                    let why = HoldReason { reason };
                    sink.write(ContactEvent::RetentionPeriodSet { days, why }, self)
                        .await;
                }
            }
            ContactCommand::RecordExport { export_id, source } => {
                // An erased contact may still be exported: what is left has no
                // personal data, and the auditor may ask.
                if !self.exists() {
                    return Err(ContactError::NotFound);
                }
                let event = ContactEvent::ContactExported { export_id, source };
                sink.write(event, self).await;
            }
            ContactCommand::Erase {
                request_id,
                source,
                keys_destroyed,
                suppressed,
            } => {
                self.must_exist()?;
                if self.legal_hold {
                    return Err(ContactError::OnLegalHold);
                }
                let event = ContactEvent::ContactErased {
                    request_id,
                    source,
                    keys_destroyed,
                    suppressed,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: ContactEvent) {
        match event {
            ContactEvent::ContactCreated {
                contact_id,
                org_id,
                profile,
            } => {
                self.id = Some(contact_id);
                self.org_id = Some(org_id);
                self.profile = profile;
            }
            ContactEvent::ContactUpdated { changes } => apply_changes(&mut self.profile, &changes),
            ContactEvent::ContactArchived {} => self.archived = true,
            ContactEvent::LegalHoldPlaced { .. } => self.legal_hold = true,
            ContactEvent::LegalHoldLifted { .. } => self.legal_hold = false,
            ContactEvent::ContactExported { .. } => {}
            ContactEvent::ProcessingRestricted { .. } => self.restricted = true,
            ContactEvent::ProcessingRestrictionLifted { .. } => self.restricted = false,
            ContactEvent::RetentionPeriodSet { days, .. } => self.retention_days = days,
            ContactEvent::ContactErased { .. } => {
                self.erased = true;
                self.profile = ContactProfile::default();
            }
        }
    }
}

impl Contact {
    /// Exists and was not erased (archived or not).
    fn must_exist(&self) -> Result<(), ContactError> {
        if !self.exists() {
            Err(ContactError::NotFound)
        } else if self.erased {
            Err(ContactError::Erased)
        } else {
            Ok(())
        }
    }

    fn must_be_active(&self) -> Result<(), ContactError> {
        self.must_exist()?;
        if self.archived {
            Err(ContactError::Archived)
        } else {
            Ok(())
        }
    }
}
