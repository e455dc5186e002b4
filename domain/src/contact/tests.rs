//! Given/when/then tests of every contact command, rejections included, plus replay
//! (`apply`) and the serialized shape of the events.

use std::collections::BTreeMap;

use cqrs_es::test::TestFramework;
use cqrs_es::{Aggregate, DomainEvent};
use uuid::Uuid;

use super::*;
use crate::values::{
    Address, CountryCode, CustomFieldKey, CustomFieldValue, Email, Line, Name, Phone,
};
use crate::PersonalData;

const CONTACT_ID: Uuid = Uuid::from_u128(0xC0);
const ORG_ID: Uuid = Uuid::from_u128(0x01);

fn contact() -> TestFramework<Contact> {
    TestFramework::<Contact>::with(())
}

fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

fn line(s: &str) -> Line {
    Line::parse(s).unwrap()
}

fn email(s: &str) -> Email {
    Email::parse(s).unwrap()
}

fn phone(s: &str) -> Phone {
    Phone::parse(s).unwrap()
}

fn key(s: &str) -> CustomFieldKey {
    CustomFieldKey::parse(s).unwrap()
}

fn text(s: &str) -> CustomFieldValue {
    CustomFieldValue::Text(s.to_owned())
}

fn address(city: &str) -> Address {
    Address {
        line1: Some(line("12 St James's Square")),
        city: Some(line(city)),
        country: Some(CountryCode::parse("gb").unwrap()),
        ..Default::default()
    }
}

/// The profile the contact is created with: some fields present, some absent
/// (phone, company), two custom fields.
fn profile() -> ContactProfile {
    ContactProfile {
        given_name: Some(name("Ada")),
        family_name: Some(name("Lovelace")),
        email: Some(email("ada@example.com")),
        address: Some(address("London")),
        title: Some(line("Countess")),
        time_zone: None,
        custom: BTreeMap::from([
            (key("tier"), text("gold")),
            (key("newsletter"), CustomFieldValue::Bool(true)),
        ]),
        ..Default::default()
    }
}

fn create(profile: ContactProfile) -> ContactCommand {
    ContactCommand::Create {
        contact_id: CONTACT_ID,
        org_id: ORG_ID,
        profile,
    }
}

fn created() -> ContactEvent {
    ContactEvent::ContactCreated {
        contact_id: CONTACT_ID,
        org_id: ORG_ID,
        profile: profile(),
    }
}

fn archived() -> ContactEvent {
    ContactEvent::ContactArchived {}
}

fn update(changes: ContactChanges) -> ContactCommand {
    ContactCommand::Update { changes }
}

fn updated(changes: ContactChanges) -> ContactEvent {
    ContactEvent::ContactUpdated { changes }
}

fn set(profile: ContactProfile) -> ContactChanges {
    ContactChanges {
        set: profile,
        ..Default::default()
    }
}

fn clear(fields: &[ContactField], custom: &[&str]) -> ContactChanges {
    ContactChanges {
        cleared: fields.to_vec(),
        cleared_custom: custom.iter().map(|k| key(k)).collect(),
        ..Default::default()
    }
}

// ---- create ----------------------------------------------------------------------

#[test]
fn create_records_id_org_and_profile() {
    contact()
        .given_no_previous_events()
        .when(create(profile()))
        .then_expect_events(vec![created()]);
}

#[test]
fn create_with_a_single_custom_field_is_enough() {
    let only_custom = ContactProfile {
        time_zone: None,
        custom: BTreeMap::from([(key("tier"), text("gold"))]),
        ..Default::default()
    };
    contact()
        .given_no_previous_events()
        .when(create(only_custom.clone()))
        .then_expect_events(vec![ContactEvent::ContactCreated {
            contact_id: CONTACT_ID,
            org_id: ORG_ID,
            profile: only_custom,
        }]);
}

#[test]
fn create_on_an_existing_contact_is_refused() {
    contact()
        .given(vec![created()])
        .when(create(profile()))
        .then_expect_error(ContactError::AlreadyExists);
}

#[test]
fn create_on_an_archived_contact_is_refused_as_existing() {
    contact()
        .given(vec![created(), archived()])
        .when(create(profile()))
        .then_expect_error(ContactError::AlreadyExists);
}

#[test]
fn create_with_an_empty_profile_is_refused() {
    contact()
        .given_no_previous_events()
        .when(create(ContactProfile::default()))
        .then_expect_error(ContactError::EmptyProfile);
}

// ---- update ----------------------------------------------------------------------

#[test]
fn update_sets_absent_and_changed_fields() {
    let changes = ContactProfile {
        given_name: Some(name("Augusta Ada")),
        family_name: Some(name("King")),
        email: Some(email("ada@analytical.example")),
        phone: Some(phone("+441632960961")),
        address: Some(address("Ockham")),
        company: Some(line("Analytical Engine Ltd")),
        title: Some(line("Countess of Lovelace")),
        time_zone: None,
        custom: BTreeMap::from([
            (key("tier"), text("platinum")),
            (key("visits"), CustomFieldValue::Number(3.into())),
        ]),
    };
    contact()
        .given(vec![created()])
        .when(update(set(changes.clone())))
        .then_expect_events(vec![updated(set(changes))]);
}

#[test]
fn update_emits_only_what_differs() {
    let requested = ContactProfile {
        given_name: Some(name("Ada")),             // unchanged
        family_name: Some(name("Lovelace")),       // unchanged
        email: Some(email("ada@EXAMPLE.com")),     // unchanged once normalised
        phone: Some(phone("+441632960961")),       // new
        address: Some(address("London")),          // unchanged
        company: None,                             // not mentioned
        title: Some(line("Countess of Lovelace")), // changed
        time_zone: None,
        custom: BTreeMap::from([
            (key("tier"), text("gold")),                         // unchanged
            (key("newsletter"), CustomFieldValue::Bool(false)),  // changed
            (key("visits"), CustomFieldValue::Number(1.into())), // new
        ]),
    };
    let expected = ContactProfile {
        phone: Some(phone("+441632960961")),
        title: Some(line("Countess of Lovelace")),
        time_zone: None,
        custom: BTreeMap::from([
            (key("newsletter"), CustomFieldValue::Bool(false)),
            (key("visits"), CustomFieldValue::Number(1.into())),
        ]),
        ..Default::default()
    };
    contact()
        .given(vec![created()])
        .when(update(set(requested)))
        .then_expect_events(vec![updated(set(expected))]);
}

#[test]
fn update_setting_a_custom_field_to_its_value_is_not_recorded() {
    let requested = ContactProfile {
        time_zone: None,
        custom: BTreeMap::from([(key("tier"), text("gold")), (key("seen"), text("yes"))]),
        ..Default::default()
    };
    let expected = ContactProfile {
        time_zone: None,
        custom: BTreeMap::from([(key("seen"), text("yes"))]),
        ..Default::default()
    };
    contact()
        .given(vec![created()])
        .when(update(set(requested)))
        .then_expect_events(vec![updated(set(expected))]);
}

#[test]
fn update_clearing_present_fields_records_them_in_cleared() {
    contact()
        .given(vec![created()])
        .when(update(clear(
            &[
                ContactField::Email,
                ContactField::Title,
                ContactField::Email,
            ],
            &["tier", "tier"],
        )))
        .then_expect_events(vec![updated(clear(
            &[ContactField::Email, ContactField::Title],
            &["tier"],
        ))]);
}

#[test]
fn update_clearing_absent_fields_records_nothing() {
    contact()
        .given(vec![created()])
        .when(update(clear(
            &[ContactField::Phone, ContactField::Company],
            &["absent"],
        )))
        .then_expect_events(vec![]);
}

#[test]
fn update_clearing_present_and_absent_fields_records_only_the_present() {
    contact()
        .given(vec![created()])
        .when(update(clear(
            &[ContactField::Phone, ContactField::GivenName],
            &["absent", "newsletter"],
        )))
        .then_expect_events(vec![updated(clear(
            &[ContactField::GivenName],
            &["newsletter"],
        ))]);
}

#[test]
fn update_that_sets_and_clears_records_both() {
    let changes = ContactChanges {
        set: ContactProfile {
            company: Some(line("Analytical Engine Ltd")),
            given_name: Some(name("Ada")), // unchanged
            ..Default::default()
        },
        cleared: vec![ContactField::Address, ContactField::Phone],
        cleared_custom: vec![key("tier")],
    };
    let expected = ContactChanges {
        set: ContactProfile {
            company: Some(line("Analytical Engine Ltd")),
            ..Default::default()
        },
        cleared: vec![ContactField::Address],
        cleared_custom: vec![key("tier")],
    };
    contact()
        .given(vec![created()])
        .when(update(changes))
        .then_expect_events(vec![updated(expected)]);
}

#[test]
fn update_that_changes_nothing_records_nothing() {
    contact()
        .given(vec![created()])
        .when(update(set(profile())))
        .then_expect_events(vec![]);
    contact()
        .given(vec![created()])
        .when(update(ContactChanges::default()))
        .then_expect_events(vec![]);
}

#[test]
fn update_compares_with_the_state_after_earlier_updates() {
    let earlier = ContactChanges {
        set: ContactProfile {
            phone: Some(phone("+441632960961")),
            ..Default::default()
        },
        cleared: vec![ContactField::Email],
        ..Default::default()
    };
    // The phone is now current and the email gone: setting the one and clearing the
    // other again changes nothing.
    contact()
        .given(vec![created(), updated(earlier)])
        .when(update(ContactChanges {
            set: ContactProfile {
                phone: Some(phone("+441632960961")),
                ..Default::default()
            },
            cleared: vec![ContactField::Email],
            ..Default::default()
        }))
        .then_expect_events(vec![]);
}

#[test]
fn update_of_a_missing_contact_is_refused() {
    contact()
        .given_no_previous_events()
        .when(update(set(profile())))
        .then_expect_error(ContactError::NotFound);
    contact()
        .given_no_previous_events()
        .when(update(ContactChanges::default()))
        .then_expect_error(ContactError::NotFound);
}

#[test]
fn update_of_an_archived_contact_is_refused() {
    contact()
        .given(vec![created(), archived()])
        .when(update(set(ContactProfile {
            company: Some(line("Analytical Engine Ltd")),
            ..Default::default()
        })))
        .then_expect_error(ContactError::Archived);
    contact()
        .given(vec![created(), archived()])
        .when(update(ContactChanges::default()))
        .then_expect_error(ContactError::Archived);
}

// ---- archive ---------------------------------------------------------------------

#[test]
fn archive_records_contact_archived() {
    contact()
        .given(vec![created()])
        .when(ContactCommand::Archive)
        .then_expect_events(vec![archived()]);
}

#[test]
fn archive_after_an_update_records_contact_archived() {
    contact()
        .given(vec![created(), updated(clear(&[ContactField::Email], &[]))])
        .when(ContactCommand::Archive)
        .then_expect_events(vec![archived()]);
}

#[test]
fn archive_twice_is_refused() {
    contact()
        .given(vec![created(), archived()])
        .when(ContactCommand::Archive)
        .then_expect_error(ContactError::Archived);
}

#[test]
fn archive_of_a_missing_contact_is_refused() {
    contact()
        .given_no_previous_events()
        .when(ContactCommand::Archive)
        .then_expect_error(ContactError::NotFound);
}

// ---- apply -----------------------------------------------------------------------

#[test]
fn replaying_created_updated_archived_rebuilds_the_state() {
    let mut state = Contact::default();
    assert!(!state.exists());
    state.apply(created());
    assert!(state.exists());
    assert_eq!(state.profile, profile());
    state.apply(updated(ContactChanges {
        set: ContactProfile {
            given_name: Some(name("Augusta Ada")),
            phone: Some(phone("+441632960961")),
            time_zone: None,
            custom: BTreeMap::from([
                (key("tier"), text("platinum")),
                (key("visits"), CustomFieldValue::Number(2.into())),
            ]),
            ..Default::default()
        },
        cleared: vec![ContactField::Email, ContactField::Title],
        cleared_custom: vec![key("newsletter")],
    }));
    assert!(!state.archived);
    state.apply(archived());

    assert_eq!(
        state,
        Contact {
            id: Some(CONTACT_ID),
            org_id: Some(ORG_ID),
            profile: ContactProfile {
                given_name: Some(name("Augusta Ada")),
                family_name: Some(name("Lovelace")),
                email: None,
                phone: Some(phone("+441632960961")),
                address: Some(address("London")),
                company: None,
                title: None,
                time_zone: None,
                custom: BTreeMap::from([
                    (key("tier"), text("platinum")),
                    (key("visits"), CustomFieldValue::Number(2.into())),
                ]),
            },
            archived: true,
            legal_hold: false,
            erased: false,
            restricted: false,
            retention_days: None,
        }
    );
}

// ---- serialized shape ------------------------------------------------------------

fn every_event() -> Vec<ContactEvent> {
    vec![
        created(),
        updated(ContactChanges {
            set: ContactProfile {
                phone: Some(phone("+441632960961")),
                time_zone: None,
                custom: BTreeMap::from([
                    (key("visits"), CustomFieldValue::Number(2.into())),
                    (
                        key("ratio"),
                        CustomFieldValue::Number(serde_json::Number::from_f64(0.5).unwrap()),
                    ),
                ]),
                ..Default::default()
            },
            cleared: vec![ContactField::Email],
            cleared_custom: vec![key("tier")],
        }),
        // An update that only clears still has its (empty) personal section.
        updated(clear(&[ContactField::Title], &[])),
        archived(),
    ]
}

#[test]
fn events_round_trip_through_json() {
    for event in every_event() {
        let json = serde_json::to_string(&event).unwrap();
        let back: ContactEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event, "{json}");
    }
}

#[test]
fn personal_sections_name_objects_of_the_serialized_body() {
    for event in every_event() {
        let json = serde_json::to_value(&event).unwrap();
        let outer = json.as_object().expect("an event serializes to an object");
        assert_eq!(outer.len(), 1, "externally tagged: {json}");
        let body = outer
            .get(&event.event_type())
            .expect("tagged by its event type")
            .as_object()
            .expect("the variant body is an object");
        for section in event.personal_sections() {
            assert!(
                body.get(*section).is_some_and(|v| v.is_object()),
                "{section} should be an object in {json}"
            );
        }
    }
}

#[test]
fn personal_sections_hold_the_personal_data() {
    let json = serde_json::to_value(created()).unwrap();
    assert_eq!(created().personal_sections(), ["profile"]);
    let profile = &json["ContactCreated"]["profile"];
    assert_eq!(profile["given_name"], "Ada");
    assert_eq!(profile["email"], "ada@example.com");
    assert_eq!(profile["custom"]["tier"], "gold");
    // Outside the personal section: only ids.
    let body = json["ContactCreated"].as_object().unwrap();
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["contact_id", "org_id", "profile"]);

    let event = updated(ContactChanges {
        set: ContactProfile {
            phone: Some(phone("+441632960961")),
            ..Default::default()
        },
        cleared: vec![ContactField::Email],
        cleared_custom: vec![key("tier")],
    });
    assert_eq!(event.personal_sections(), ["set"]);
    let json = serde_json::to_value(&event).unwrap();
    let body = &json["ContactUpdated"];
    assert_eq!(body["set"]["phone"], "+441632960961");
    // Flattened: the changes sit directly in the variant body; what is cleared is
    // named, not valued.
    assert_eq!(body["cleared"], serde_json::json!(["email"]));
    assert_eq!(body["cleared_custom"], serde_json::json!(["tier"]));

    assert!(archived().personal_sections().is_empty());
    assert_eq!(
        serde_json::to_value(archived()).unwrap(),
        serde_json::json!({ "ContactArchived": {} })
    );
}

#[test]
fn event_types_and_versions() {
    let types: Vec<String> = every_event().iter().map(DomainEvent::event_type).collect();
    assert_eq!(
        types,
        [
            "ContactCreated",
            "ContactUpdated",
            "ContactUpdated",
            "ContactArchived"
        ]
    );
    for event in every_event() {
        assert_eq!(event.event_version(), "1");
    }
}

fn erase() -> ContactCommand {
    ContactCommand::Erase {
        request_id: Uuid::from_u128(0xE1),
        source: RequestSource::Staff,
        keys_destroyed: vec![CONTACT_ID.to_string()],
        suppressed: vec!["email".into()],
    }
}

fn erased() -> ContactEvent {
    ContactEvent::ContactErased {
        request_id: Uuid::from_u128(0xE1),
        source: RequestSource::Staff,
        keys_destroyed: vec![CONTACT_ID.to_string()],
        suppressed: vec!["email".into()],
    }
}

fn hold(reason: &str) -> ContactEvent {
    ContactEvent::LegalHoldPlaced {
        why: HoldReason {
            reason: Some(reason.into()),
        },
    }
}

#[test]
fn erasure_writes_a_tombstone_and_empties_the_profile() {
    contact()
        .given(vec![created(), archived()])
        .when(erase())
        .then_expect_events(vec![erased()]);
    let mut c = Contact::default();
    c.apply(created());
    c.apply(erased());
    assert!(c.erased && c.profile.is_empty());
    assert!(erased().personal_sections().is_empty());
}

#[test]
fn an_erased_contact_takes_no_further_command() {
    for cmd in [
        erase(),
        update(set(ContactProfile {
            title: Some(line("CEO")),
            ..Default::default()
        })),
        ContactCommand::Archive,
        ContactCommand::PlaceLegalHold { reason: None },
    ] {
        contact()
            .given(vec![created(), erased()])
            .when(cmd)
            .then_expect_error(ContactError::Erased);
    }
}

#[test]
fn a_legal_hold_blocks_erasure_until_it_is_lifted() {
    contact()
        .given_no_previous_events()
        .when(ContactCommand::PlaceLegalHold { reason: None })
        .then_expect_error(ContactError::NotFound);
    contact()
        .given(vec![created()])
        .when(ContactCommand::PlaceLegalHold {
            reason: Some("litigation 2026-17".into()),
        })
        .then_expect_events(vec![hold("litigation 2026-17")]);
    contact()
        .given(vec![created(), hold("x")])
        .when(ContactCommand::PlaceLegalHold { reason: None })
        .then_expect_error(ContactError::AlreadyOnHold);
    contact()
        .given(vec![created(), hold("x")])
        .when(erase())
        .then_expect_error(ContactError::OnLegalHold);
    let lifted = ContactEvent::LegalHoldLifted {
        why: HoldReason {
            reason: Some("settled".into()),
        },
    };
    contact()
        .given(vec![created(), hold("x")])
        .when(ContactCommand::LiftLegalHold {
            reason: Some("settled".into()),
        })
        .then_expect_events(vec![lifted.clone()]);
    contact()
        .given(vec![created()])
        .when(ContactCommand::LiftLegalHold { reason: None })
        .then_expect_error(ContactError::NoLegalHold);
    contact()
        .given(vec![created(), hold("x"), lifted])
        .when(erase())
        .then_expect_events(vec![erased()]);
    assert_eq!(hold("x").personal_sections(), &["why"]);
}

#[test]
fn an_event_read_after_its_key_was_destroyed_still_deserializes() {
    // What the store hands back once the key is gone: every personal member null.
    let v = serde_json::json!({"ContactCreated": {
        "contact_id": CONTACT_ID, "org_id": ORG_ID,
        "profile": {"given_name": null, "email": null, "address": null, "custom": null}
    }});
    let e: ContactEvent = serde_json::from_value(v).unwrap();
    let ContactEvent::ContactCreated { profile, .. } = e else {
        panic!("not a creation")
    };
    assert!(profile.is_empty());
}
