use chrono::{Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;

use super::*;
use crate::consent::proof::{Notice, NoticeHash};
use crate::values::Line;

type Given = TestFramework<ConsentLedger>;

fn contact() -> Uuid {
    Uuid::from_u128(7)
}

fn marketing() -> PurposeKey {
    PurposeKey::parse("marketing").unwrap()
}

fn proof(source: CaptureSource, notice: bool) -> ConsentProof {
    ConsentProof {
        lawful_basis: crate::consent::LawfulBasis::Consent,
        source,
        notice: notice.then(|| Notice {
            id: Line::parse("privacy-policy").unwrap(),
            version: Line::parse("3").unwrap(),
            sha256: NoticeHash::parse(&"ab".repeat(32)).unwrap(),
        }),
        language: None,
        jurisdiction: None,
        expires_at: None,
        import_id: None,
    }
}

const GDPR_DOI: Rules = Rules {
    mode: PrivacyMode::Gdpr,
    double_opt_in_for_marketing: true,
};
const GDPR: Rules = Rules {
    mode: PrivacyMode::Gdpr,
    double_opt_in_for_marketing: false,
};
const CCPA: Rules = Rules {
    mode: PrivacyMode::Ccpa,
    double_opt_in_for_marketing: false,
};

fn record(choice: Choice, source: CaptureSource, notice: bool, rules: Rules) -> ConsentCommand {
    ConsentCommand::Record {
        contact_id: contact(),
        channel: Channel::Email,
        purpose: marketing(),
        contact_point: Some("ada@example.com".into()),
        choice,
        proof: proof(source, notice),
        rules,
    }
}

#[test]
fn gdpr_needs_a_notice_ccpa_does_not() {
    Given::with(())
        .given_no_previous_events()
        .when(record(Choice::Granted, CaptureSource::Form, false, GDPR))
        .then_expect_error(ConsentError::NoticeRequired);
    Given::with(())
        .given_no_previous_events()
        .when(record(Choice::Withdrawn, CaptureSource::Form, false, CCPA))
        .then_expect_events(vec![ConsentEvent::ConsentRecorded {
            contact_id: contact(),
            channel: Channel::Email,
            purpose: marketing(),
            status: ConsentStatus::Withdrawn,
            proof: proof(CaptureSource::Form, false),
            point: Point {
                contact_point: Some("ada@example.com".into()),
            },
        }]);
}

#[test]
fn withdrawing_needs_no_notice_even_in_gdpr_mode() {
    assert!(Given::with(())
        .given_no_previous_events()
        .when(record(Choice::Withdrawn, CaptureSource::Form, false, GDPR))
        .inspect_result()
        .is_ok());
}

#[test]
fn double_opt_in_cannot_be_skipped_for_marketing_but_withdrawal_is_always_allowed() {
    Given::with(())
        .given_no_previous_events()
        .when(record(Choice::Granted, CaptureSource::Form, true, GDPR_DOI))
        .then_expect_error(ConsentError::DoubleOptInRequired);
    let ok = Given::with(())
        .given_no_previous_events()
        .when(record(
            Choice::Withdrawn,
            CaptureSource::Form,
            true,
            GDPR_DOI,
        ))
        .inspect_result();
    assert!(ok.is_ok());
    let imported = Given::with(())
        .given_no_previous_events()
        .when(record(
            Choice::Granted,
            CaptureSource::Import,
            true,
            GDPR_DOI,
        ))
        .inspect_result();
    assert!(imported.is_ok());
}

fn requested(expires_at: DateTime<Utc>) -> ConsentEvent {
    ConsentEvent::ConfirmationRequested {
        contact_id: contact(),
        request_id: Uuid::from_u128(1),
        channel: Channel::Email,
        purpose: marketing(),
        proof: proof(CaptureSource::Form, true),
        token_sha256: "t1".into(),
        expires_at,
        message_id: Uuid::from_u128(2),
        point: Point::default(),
    }
}

#[test]
fn a_confirmation_token_is_single_use_and_expires() {
    let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
    let confirmed = ConsentEvent::ConsentConfirmed {
        contact_id: contact(),
        request_id: Uuid::from_u128(1),
        channel: Channel::Email,
        purpose: marketing(),
        proof: proof(CaptureSource::DoubleOptIn, true),
        point: Point::default(),
    };
    Given::with(())
        .given(vec![requested(now + Duration::hours(1))])
        .when(ConsentCommand::Confirm {
            token_sha256: "t1".into(),
            now,
        })
        .then_expect_events(vec![confirmed.clone()]);
    Given::with(())
        .given(vec![requested(now + Duration::hours(1)), confirmed])
        .when(ConsentCommand::Confirm {
            token_sha256: "t1".into(),
            now,
        })
        .then_expect_error(ConsentError::UnknownToken);
    Given::with(())
        .given(vec![requested(now - Duration::seconds(1))])
        .when(ConsentCommand::Confirm {
            token_sha256: "t1".into(),
            now,
        })
        .then_expect_error(ConsentError::UnknownToken);
    Given::with(())
        .given(vec![requested(now + Duration::hours(1))])
        .when(ConsentCommand::Confirm {
            token_sha256: "other".into(),
            now,
        })
        .then_expect_error(ConsentError::UnknownToken);
}

#[test]
fn a_confirmation_link_lives_at_most_72_hours() {
    let now = Utc::now();
    let cmd = |hours| ConsentCommand::RequestConfirmation {
        contact_id: contact(),
        request_id: Uuid::from_u128(1),
        channel: Channel::Email,
        purpose: marketing(),
        contact_point: None,
        proof: proof(CaptureSource::Form, true),
        token_sha256: "t".into(),
        expires_at: now + Duration::hours(hours),
        message_id: Uuid::from_u128(2),
        now,
        rules: GDPR_DOI,
    };
    Given::with(())
        .given_no_previous_events()
        .when(cmd(73))
        .then_expect_error(ConsentError::ExpiryTooLong);
    assert!(Given::with(())
        .given_no_previous_events()
        .when(cmd(72))
        .inspect_result()
        .is_ok());
}

#[test]
fn do_not_contact_is_set_once_and_lifted_only_when_set() {
    let set = ConsentEvent::DoNotContactSet {
        contact_id: contact(),
        why: Why {
            reason: Some("asked by phone".into()),
        },
    };
    Given::with(())
        .given_no_previous_events()
        .when(ConsentCommand::SetDoNotContact {
            contact_id: contact(),
            reason: Some("asked by phone".into()),
        })
        .then_expect_events(vec![set.clone()]);
    Given::with(())
        .given(vec![set.clone()])
        .when(ConsentCommand::SetDoNotContact {
            contact_id: contact(),
            reason: None,
        })
        .then_expect_events(vec![]);
    Given::with(())
        .given_no_previous_events()
        .when(ConsentCommand::LiftDoNotContact { reason: None })
        .then_expect_error(ConsentError::NotMarked);
    Given::with(())
        .given(vec![set])
        .when(ConsentCommand::LiftDoNotContact { reason: None })
        .then_expect_events(vec![ConsentEvent::DoNotContactLifted {
            contact_id: contact(),
            why: Why { reason: None },
        }]);
}

#[test]
fn fold_keeps_the_latest_change_per_record_with_its_event() {
    let mut state = ConsentState::default();
    let (e1, e2, e3) = (
        Uuid::from_u128(11),
        Uuid::from_u128(12),
        Uuid::from_u128(13),
    );
    let granted = ConsentEvent::ConsentRecorded {
        contact_id: contact(),
        channel: Channel::Email,
        purpose: marketing(),
        status: ConsentStatus::Granted,
        proof: proof(CaptureSource::Import, true),
        point: Point::default(),
    };
    fold(&mut state, e1, &granted);
    let mut withdrawn = granted.clone();
    if let ConsentEvent::ConsentRecorded { status, .. } = &mut withdrawn {
        *status = ConsentStatus::Withdrawn;
    }
    fold(&mut state, e2, &withdrawn);
    assert_eq!(state.records.len(), 1);
    assert_eq!(
        (state.records[0].event_id, state.records[0].status),
        (e2, ConsentStatus::Withdrawn)
    );
    fold(
        &mut state,
        e3,
        &ConsentEvent::DoNotContactSet {
            contact_id: contact(),
            why: Why::default(),
        },
    );
    assert_eq!(state.do_not_contact, Some(e3));
}

#[test]
fn the_contact_point_and_the_reason_are_personal() {
    let e = requested(Utc::now());
    assert_eq!(e.personal_sections(), &["point"]);
    let d = ConsentEvent::DoNotContactSet {
        contact_id: contact(),
        why: Why::default(),
    };
    assert_eq!(d.personal_sections(), &["why"]);
}
