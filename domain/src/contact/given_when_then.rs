//! Given/when/then tests of every contact command, rejections included.

use std::collections::BTreeMap;

use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::values::{CustomFieldKey, CustomFieldValue, Email, Line, Name, Phone};
use crate::PersonalData;

fn ids() -> (Uuid, Uuid) {
    (Uuid::from_u128(1), Uuid::from_u128(2))
}

fn profile() -> ContactProfile {
    ContactProfile {
        given_name: Some(Name::parse("Ada").unwrap()),
        email: Some(Email::parse("ada@example.com").unwrap()),
        custom: BTreeMap::from([(
            CustomFieldKey::parse("tier").unwrap(),
            CustomFieldValue::Text("gold".into()),
        )]),
        ..Default::default()
    }
}

fn created() -> ContactEvent {
    let (contact_id, org_id) = ids();
    ContactEvent::ContactCreated {
        contact_id,
        org_id,
        profile: profile(),
    }
}

fn contact() -> TestFramework<Contact> {
    TestFramework::with(())
}

fn set(p: ContactProfile) -> ContactChanges {
    ContactChanges {
        set: p,
        ..Default::default()
    }
}

#[test]
fn create_records_the_profile() {
    let (contact_id, org_id) = ids();
    contact()
        .given_no_previous_events()
        .when(ContactCommand::Create {
            contact_id,
            org_id,
            profile: profile(),
        })
        .then_expect_events(vec![created()]);
}

#[test]
fn create_twice_is_refused() {
    let (contact_id, org_id) = ids();
    contact()
        .given(vec![created()])
        .when(ContactCommand::Create {
            contact_id,
            org_id,
            profile: profile(),
        })
        .then_expect_error(ContactError::AlreadyExists);
}

#[test]
fn create_without_any_field_is_refused() {
    let (contact_id, org_id) = ids();
    contact()
        .given_no_previous_events()
        .when(ContactCommand::Create {
            contact_id,
            org_id,
            profile: ContactProfile::default(),
        })
        .then_expect_error(ContactError::EmptyProfile);
}

#[test]
fn update_records_only_what_differs() {
    let requested = ContactProfile {
        given_name: Some(Name::parse("Ada").unwrap()), // unchanged
        phone: Some(Phone::parse("+441632960961").unwrap()),
        custom: BTreeMap::from([
            (
                CustomFieldKey::parse("tier").unwrap(),
                CustomFieldValue::Text("gold".into()),
            ), // unchanged
            (
                CustomFieldKey::parse("visits").unwrap(),
                CustomFieldValue::Bool(true),
            ),
        ]),
        ..Default::default()
    };
    let expected = ContactProfile {
        phone: Some(Phone::parse("+441632960961").unwrap()),
        custom: BTreeMap::from([(
            CustomFieldKey::parse("visits").unwrap(),
            CustomFieldValue::Bool(true),
        )]),
        ..Default::default()
    };
    contact()
        .given(vec![created()])
        .when(ContactCommand::Update {
            changes: set(requested),
        })
        .then_expect_events(vec![ContactEvent::ContactUpdated {
            changes: set(expected),
        }]);
}

#[test]
fn update_clears_present_fields_only() {
    let changes = ContactChanges {
        cleared: vec![ContactField::Email, ContactField::Phone],
        cleared_custom: vec![
            CustomFieldKey::parse("tier").unwrap(),
            CustomFieldKey::parse("absent").unwrap(),
        ],
        ..Default::default()
    };
    let expected = ContactChanges {
        cleared: vec![ContactField::Email],
        cleared_custom: vec![CustomFieldKey::parse("tier").unwrap()],
        ..Default::default()
    };
    contact()
        .given(vec![created()])
        .when(ContactCommand::Update { changes })
        .then_expect_events(vec![ContactEvent::ContactUpdated { changes: expected }]);
}

#[test]
fn an_update_that_changes_nothing_records_nothing() {
    contact()
        .given(vec![created()])
        .when(ContactCommand::Update {
            changes: set(profile()),
        })
        .then_expect_events(vec![]);
}

#[test]
fn updating_a_missing_contact_is_refused() {
    contact()
        .given_no_previous_events()
        .when(ContactCommand::Update {
            changes: set(profile()),
        })
        .then_expect_error(ContactError::NotFound);
}

#[test]
fn updating_an_archived_contact_is_refused() {
    contact()
        .given(vec![created(), ContactEvent::ContactArchived {}])
        .when(ContactCommand::Update {
            changes: set(ContactProfile {
                title: Some(Line::parse("Countess").unwrap()),
                ..Default::default()
            }),
        })
        .then_expect_error(ContactError::Archived);
}

#[test]
fn archive_then_archive_again() {
    contact()
        .given(vec![created()])
        .when(ContactCommand::Archive)
        .then_expect_events(vec![ContactEvent::ContactArchived {}]);
    contact()
        .given(vec![created(), ContactEvent::ContactArchived {}])
        .when(ContactCommand::Archive)
        .then_expect_error(ContactError::Archived);
    contact()
        .given_no_previous_events()
        .when(ContactCommand::Archive)
        .then_expect_error(ContactError::NotFound);
}

#[test]
fn replaying_events_rebuilds_the_state() {
    let mut c = Contact::default();
    c.apply(created());
    c.apply(ContactEvent::ContactUpdated {
        changes: ContactChanges {
            set: ContactProfile {
                title: Some(Line::parse("Countess").unwrap()),
                ..Default::default()
            },
            cleared: vec![ContactField::Email],
            cleared_custom: vec![CustomFieldKey::parse("tier").unwrap()],
        },
    });
    c.apply(ContactEvent::ContactArchived {});
    assert_eq!(c.id, Some(ids().0));
    assert_eq!(c.profile.title.as_ref().map(Line::as_str), Some("Countess"));
    assert_eq!(c.profile.email, None);
    assert!(c.profile.custom.is_empty());
    assert!(c.archived);
}

#[test]
fn events_round_trip_and_name_their_personal_sections() {
    let events = vec![
        created(),
        ContactEvent::ContactUpdated {
            changes: set(profile()),
        },
        ContactEvent::ContactArchived {},
    ];
    for e in events {
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            serde_json::from_value::<ContactEvent>(json.clone()).unwrap(),
            e
        );
        let body = json
            .get(cqrs_es::DomainEvent::event_type(&e))
            .expect("externally tagged by type");
        for section in e.personal_sections() {
            assert!(
                body.get(*section).is_some_and(|v| v.is_object()),
                "{section} in {json}"
            );
        }
    }
}
