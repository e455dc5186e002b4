//! The contacts read model: the current state of every contact, for lists and lookups.

use chrono::{DateTime, Utc};
use crm_domain::contact::{apply_changes, ContactEvent, ContactProfile};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Envelope;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactView {
    pub id: Uuid,
    pub org_id: Uuid,
    /// The contact stream's version this view reflects.
    pub version: i64,
    pub profile: ContactProfile,
    pub archived: bool,
    /// Set by the erasure's tombstone; the profile is empty from then on.
    #[serde(default)]
    pub erased_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub legal_hold: bool,
    /// GDPR Art. 18: restricted until lifted (the send gate refuses what its purpose
    /// does not allow under restriction).
    #[serde(default)]
    pub processing_restricted: bool,
    /// The contact's own retention period in days (`None`: the organisation's).
    #[serde(default)]
    pub retention_days: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_position: i64,
}

/// Outcome of offering an event to a view.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The view changed (or was created).
    Changed(Box<ContactView>),
    /// The event was already reflected (its sequence is not above the view's version).
    AlreadyApplied,
    /// The event does not follow the view's version: an earlier one is missing.
    OutOfOrder { have: i64, got: i64 },
}

/// The next view after `event`. Idempotent: an event at or below the view's version is
/// reported as already applied; a gap is reported, never papered over.
pub fn update(view: Option<&ContactView>, env: &Envelope<'_>, event: &ContactEvent) -> Update {
    let have = view.map_or(0, |v| v.version);
    if env.sequence <= have {
        return Update::AlreadyApplied;
    }
    if env.sequence != have + 1 {
        return Update::OutOfOrder {
            have,
            got: env.sequence,
        };
    }
    let next = match (view, event) {
        (
            None,
            ContactEvent::ContactCreated {
                contact_id,
                org_id,
                profile,
            },
        ) => ContactView {
            id: *contact_id,
            org_id: *org_id,
            version: env.sequence,
            profile: profile.clone(),
            archived: false,
            erased_at: None,
            legal_hold: false,
            processing_restricted: false,
            retention_days: None,
            created_at: env.recorded_at,
            updated_at: env.recorded_at,
            last_position: env.global_position,
        },
        (Some(v), ContactEvent::ContactUpdated { changes }) => {
            let mut next = v.clone();
            apply_changes(&mut next.profile, changes);
            next
        }
        (Some(v), ContactEvent::ContactArchived {}) => ContactView {
            archived: true,
            ..v.clone()
        },
        // Events the profile view does not show (the consent view does).
        (Some(v), ContactEvent::ContactExported { .. }) => v.clone(),
        (Some(v), ContactEvent::ProcessingRestricted { .. }) => ContactView {
            processing_restricted: true,
            ..v.clone()
        },
        (Some(v), ContactEvent::ProcessingRestrictionLifted { .. }) => ContactView {
            processing_restricted: false,
            ..v.clone()
        },
        (Some(v), ContactEvent::RetentionPeriodSet { days, .. }) => ContactView {
            retention_days: *days,
            ..v.clone()
        },
        (Some(v), ContactEvent::LegalHoldPlaced { .. }) => ContactView {
            legal_hold: true,
            ..v.clone()
        },
        (Some(v), ContactEvent::LegalHoldLifted { .. }) => ContactView {
            legal_hold: false,
            ..v.clone()
        },
        // Nothing is left to process or keep: the restriction and the period go too.
        (Some(v), ContactEvent::ContactErased { .. }) => ContactView {
            profile: ContactProfile::default(),
            erased_at: Some(env.recorded_at),
            processing_restricted: false,
            retention_days: None,
            ..v.clone()
        },
        // A stream can only start with ContactCreated and never repeat it; anything else
        // is out of order by construction.
        (v, _) => {
            return Update::OutOfOrder {
                have: v.map_or(0, |v| v.version),
                got: env.sequence,
            }
        }
    };
    Update::Changed(Box::new(ContactView {
        version: env.sequence,
        updated_at: env.recorded_at,
        last_position: env.global_position,
        ..next
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_domain::contact::ContactChanges;
    use crm_domain::values::{Email, Name};

    fn env(seq: i64) -> Envelope<'static> {
        Envelope {
            event_id: Uuid::now_v7(),
            org_id: Uuid::nil(),
            aggregate_type: "contact",
            aggregate_id: "c",
            event_type: "x",
            sequence: seq,
            global_position: seq * 10,
            recorded_at: Utc::now(),
        }
    }

    fn created() -> ContactEvent {
        ContactEvent::ContactCreated {
            contact_id: Uuid::nil(),
            org_id: Uuid::nil(),
            profile: ContactProfile {
                given_name: Some(Name::parse("Ada").unwrap()),
                ..Default::default()
            },
        }
    }

    #[test]
    fn create_update_archive_and_redelivery() {
        let Update::Changed(v1) = update(None, &env(1), &created()) else {
            panic!()
        };
        assert_eq!(v1.version, 1);
        let changes = ContactChanges {
            set: ContactProfile {
                email: Some(Email::parse("ada@example.com").unwrap()),
                ..Default::default()
            },
            ..Default::default()
        };
        let upd = ContactEvent::ContactUpdated { changes };
        let Update::Changed(v2) = update(Some(&v1), &env(2), &upd) else {
            panic!()
        };
        assert_eq!(
            v2.profile.email.as_ref().unwrap().as_str(),
            "ada@example.com"
        );
        assert_eq!(v2.profile.given_name, v1.profile.given_name);
        assert_eq!(update(Some(&v2), &env(2), &upd), Update::AlreadyApplied);
        let Update::Changed(v3) = update(Some(&v2), &env(3), &ContactEvent::ContactArchived {})
        else {
            panic!()
        };
        assert!(v3.archived);
        assert_eq!(v3.last_position, 30);
    }

    #[test]
    fn a_gap_is_reported() {
        let Update::Changed(v1) = update(None, &env(1), &created()) else {
            panic!()
        };
        assert_eq!(
            update(Some(&v1), &env(3), &ContactEvent::ContactArchived {}),
            Update::OutOfOrder { have: 1, got: 3 }
        );
    }
}
