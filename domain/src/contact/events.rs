use std::collections::BTreeMap;

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::personal::erased_or_default;
use crate::values::{
    Address, CustomFieldKey, CustomFieldValue, Email, Line, Name, Phone, TimeZone,
};
use crate::PersonalData;

/// The standard and custom fields of a contact. Every member is personal data.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactProfile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<Email>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<Phone>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<Line>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<Line>,
    /// Where the contact lives, for quiet hours (sms, phone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<TimeZone>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "erased_or_default"
    )]
    pub custom: BTreeMap<CustomFieldKey, CustomFieldValue>,
}

impl ContactProfile {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// A standard field of a contact, named for clearing and for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactField {
    GivenName,
    FamilyName,
    Email,
    Phone,
    Address,
    Company,
    Title,
    TimeZone,
}

impl ContactField {
    pub const ALL: [ContactField; 8] = [
        Self::GivenName,
        Self::FamilyName,
        Self::Email,
        Self::Phone,
        Self::Address,
        Self::Company,
        Self::Title,
        Self::TimeZone,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::GivenName => "given_name",
            Self::FamilyName => "family_name",
            Self::Email => "email",
            Self::Phone => "phone",
            Self::Address => "address",
            Self::Company => "company",
            Self::Title => "title",
            Self::TimeZone => "time_zone",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// What an update changes: fields set to new values, fields and custom fields cleared.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ContactChanges {
    #[serde(default)]
    pub set: ContactProfile,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cleared: Vec<ContactField>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cleared_custom: Vec<CustomFieldKey>,
}

impl ContactChanges {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.cleared.is_empty() && self.cleared_custom.is_empty()
    }
}

/// Why a legal hold was placed or lifted: free text that may name someone, so personal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HoldReason {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Who asked for a data-subject right to be exercised (an erasure, an export).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestSource {
    /// A staff member holding `contacts.erase`.
    Staff,
    /// An AI action approved under the risk policy.
    AiAction,
    /// The contact, through the preference center (confirmed by a link).
    PreferenceCenter,
    /// The contact, signed in to the portal.
    Portal,
    /// The retention sweep: the contact's retention period ran out (erasure only).
    Retention,
}

impl RequestSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Staff => "staff",
            Self::AiAction => "ai_action",
            Self::PreferenceCenter => "preference_center",
            Self::Portal => "portal",
            Self::Retention => "retention",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ContactEvent {
    ContactCreated {
        contact_id: Uuid,
        org_id: Uuid,
        profile: ContactProfile,
    },
    ContactUpdated {
        #[serde(flatten)]
        changes: ContactChanges,
    },
    ContactArchived {},
    /// Erasure is refused while a hold is in place (litigation, an investigation).
    LegalHoldPlaced {
        why: HoldReason,
    },
    LegalHoldLifted {
        why: HoldReason,
    },
    /// GDPR Art. 18: nothing is sent to the contact but what its purpose allows under
    /// restriction (`Purpose::allowed_when_restricted`), until it is lifted.
    ProcessingRestricted {
        why: HoldReason,
    },
    ProcessingRestrictionLifted {
        why: HoldReason,
    },
    /// The contact's own retention period, in days after its last change (`None`: the
    /// organisation's again).
    RetentionPeriodSet {
        days: Option<u32>,
        why: HoldReason,
    },
    /// The tombstone of an erasure: the data keys named here were destroyed in the same
    /// commit, so every earlier event's personal data (this stream's, its consent
    /// stream's, its messages' and the AI actions' that touched it) is unreadable from
    /// now on. It carries no personal data itself.
    /// A copy of everything held about the contact was handed out (GDPR Art. 15/20):
    /// who exported whom is in the metadata, when in the event's times.
    ContactExported {
        export_id: Uuid,
        source: RequestSource,
    },
    ContactErased {
        /// The erasure request this fulfils (its receipt's id).
        request_id: Uuid,
        source: RequestSource,
        /// The subjects whose data keys were destroyed: the contact's own, then its
        /// messages' and AI actions'.
        keys_destroyed: Vec<String>,
        /// The channels whose contact point went onto the suppression list.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        suppressed: Vec<String>,
    },
}

impl DomainEvent for ContactEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ContactCreated { .. } => "ContactCreated",
            Self::ContactUpdated { .. } => "ContactUpdated",
            Self::ContactArchived { .. } => "ContactArchived",
            Self::LegalHoldPlaced { .. } => "LegalHoldPlaced",
            Self::LegalHoldLifted { .. } => "LegalHoldLifted",
            Self::ProcessingRestricted { .. } => "ProcessingRestricted",
            Self::ProcessingRestrictionLifted { .. } => "ProcessingRestrictionLifted",
            Self::RetentionPeriodSet { .. } => "RetentionPeriodSet",
            Self::ContactErased { .. } => "ContactErased",
            Self::ContactExported { .. } => "ContactExported",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for ContactEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        match self {
            Self::ContactCreated { .. } => &["profile"],
            Self::ContactUpdated { .. } => &["set"],
            Self::LegalHoldPlaced { .. }
            | Self::LegalHoldLifted { .. }
            | Self::ProcessingRestricted { .. }
            | Self::ProcessingRestrictionLifted { .. }
            | Self::RetentionPeriodSet { .. } => &["why"],
            Self::ContactArchived { .. }
            | Self::ContactErased { .. }
            | Self::ContactExported { .. } => &[],
        }
    }
}
