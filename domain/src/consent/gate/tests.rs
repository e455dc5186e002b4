//! The gate's table, row by row, and by property: for random consent histories,
//! settings, clocks and time zones, a message is allowed only when every rule allows
//! it, and a refusal names the first rule (in table order) that refuses.

use chrono::{Duration, TimeZone};
use proptest::prelude::*;

use super::*;

fn key(s: &str) -> PurposeKey {
    PurposeKey::parse(s).unwrap()
}

fn purpose(k: &str, basis: LawfulBasis, channels: &[Channel]) -> Purpose {
    Purpose {
        key: key(k),
        default_basis: basis,
        channels: channels.to_vec(),
        retired: false,
        sells_or_shares: false,
        allowed_when_restricted: false,
    }
}

fn settings(mode: PrivacyMode) -> Settings {
    Settings {
        mode,
        purposes: vec![
            purpose("marketing", LawfulBasis::Consent, &Channel::ALL),
            purpose(
                "service",
                LawfulBasis::Contract,
                &[Channel::Email, Channel::Sms],
            ),
        ],
        time_zone: chrono_tz::Europe::Berlin,
    }
}

fn request(channel: Channel, p: &str) -> Request {
    Request {
        channel,
        purpose: key(p),
        contact_point: "ada@example.com".into(),
    }
}

fn record(status: ConsentStatus, channel: Channel, p: &str, point: Option<&str>) -> ConsentRecord {
    ConsentRecord {
        event_id: Uuid::now_v7(),
        channel,
        purpose: key(p),
        contact_point: point.map(str::to_owned),
        status,
        expires_at: None,
    }
}

/// Noon in Berlin on a working day.
fn noon() -> DateTime<Utc> {
    chrono_tz::Europe::Berlin
        .with_ymd_and_hms(2026, 6, 3, 12, 0, 0)
        .unwrap()
        .with_timezone(&Utc)
}

fn granted_marketing_email() -> (ConsentState, Uuid) {
    let r = record(ConsentStatus::Granted, Channel::Email, "marketing", None);
    let id = r.event_id;
    (
        ConsentState {
            records: vec![r],
            ..Default::default()
        },
        id,
    )
}

#[test]
fn a_granted_record_allows_and_is_relied_on() {
    let (state, id) = granted_marketing_email();
    let d = decide(
        &state,
        &settings(PrivacyMode::Gdpr),
        &request(Channel::Email, "marketing"),
        noon(),
    );
    assert_eq!(d, Decision::allow(Reason::Consent, vec![id]));
}

#[test]
fn rules_1_to_3_the_purpose_and_its_channels() {
    let (state, _) = granted_marketing_email();
    let mut s = settings(PrivacyMode::Gdpr);
    let d = decide(&state, &s, &request(Channel::Email, "research"), noon());
    assert_eq!(d.reason, Reason::PurposeUnknown);
    let d = decide(&state, &s, &request(Channel::Postal, "service"), noon());
    assert_eq!(d.reason, Reason::ChannelNotCovered);
    s.purposes[0].retired = true;
    let d = decide(&state, &s, &request(Channel::Email, "marketing"), noon());
    assert_eq!(d.reason, Reason::PurposeRetired);
    assert!(!d.allowed);
}

#[test]
fn rules_4_and_5_suppression_and_do_not_contact_block_everything() {
    let (mut state, _) = granted_marketing_email();
    let dnc = Uuid::now_v7();
    state.do_not_contact = Some(dnc);
    for (p, mode) in [
        ("marketing", PrivacyMode::Gdpr),
        ("service", PrivacyMode::Ccpa),
    ] {
        let d = decide(&state, &settings(mode), &request(Channel::Email, p), noon());
        assert_eq!(d, Decision::refuse(Reason::DoNotContact, vec![dnc]));
    }
    let sup = Uuid::now_v7();
    state.suppressed_by = Some(sup);
    let d = decide(
        &state,
        &settings(PrivacyMode::Gdpr),
        &request(Channel::Email, "marketing"),
        noon(),
    );
    assert_eq!(d, Decision::refuse(Reason::Suppressed, vec![sup]));
}

#[test]
fn rule_6_the_most_restrictive_applicable_record_wins() {
    let (mut state, _) = granted_marketing_email();
    // A withdrawal for this one address beats the grant for the whole channel.
    let w = record(
        ConsentStatus::Withdrawn,
        Channel::Email,
        "marketing",
        Some("ada@example.com"),
    );
    let wid = w.event_id;
    state.records.push(w);
    // A denial for another address does not apply.
    state.records.push(record(
        ConsentStatus::Denied,
        Channel::Email,
        "marketing",
        Some("other@example.com"),
    ));
    let d = decide(
        &state,
        &settings(PrivacyMode::Gdpr),
        &request(Channel::Email, "marketing"),
        noon(),
    );
    assert_eq!(d, Decision::refuse(Reason::ConsentWithdrawn, vec![wid]));
    // An objection is honoured whatever the basis and the mode.
    let mut state = ConsentState::default();
    let denied = record(ConsentStatus::Denied, Channel::Email, "service", None);
    let did = denied.event_id;
    state.records.push(denied);
    for mode in [PrivacyMode::Gdpr, PrivacyMode::Ccpa] {
        let d = decide(
            &state,
            &settings(mode),
            &request(Channel::Email, "service"),
            noon(),
        );
        assert_eq!(d, Decision::refuse(Reason::ConsentDenied, vec![did]));
    }
}

#[test]
fn rule_7_pending_double_opt_in_gets_no_marketing() {
    let pending = record(
        ConsentStatus::PendingConfirmation,
        Channel::Email,
        "marketing",
        None,
    );
    let id = pending.event_id;
    let state = ConsentState {
        records: vec![pending],
        ..Default::default()
    };
    for mode in [PrivacyMode::Gdpr, PrivacyMode::Ccpa] {
        let d = decide(
            &state,
            &settings(mode),
            &request(Channel::Email, "marketing"),
            noon(),
        );
        assert_eq!(
            d,
            Decision::refuse(Reason::ConsentPendingConfirmation, vec![id])
        );
    }
}

#[test]
fn rule_8_gdpr_implies_nothing_and_expiry_ends_a_grant() {
    let empty = ConsentState::default();
    let gdpr = settings(PrivacyMode::Gdpr);
    let d = decide(&empty, &gdpr, &request(Channel::Email, "marketing"), noon());
    assert_eq!(d, Decision::refuse(Reason::NoConsent, vec![]));
    // A purpose with another lawful basis needs no consent record.
    let d = decide(&empty, &gdpr, &request(Channel::Email, "service"), noon());
    assert_eq!(d, Decision::allow(Reason::LawfulBasis, vec![]));
    // CCPA: opt-out model.
    let d = decide(
        &empty,
        &settings(PrivacyMode::Ccpa),
        &request(Channel::Email, "marketing"),
        noon(),
    );
    assert_eq!(d, Decision::allow(Reason::OptOutModel, vec![]));
    // A grant that expired at (or before) now.
    let (mut state, id) = granted_marketing_email();
    state.records[0].expires_at = Some(noon());
    let d = decide(&state, &gdpr, &request(Channel::Email, "marketing"), noon());
    assert_eq!(d, Decision::refuse(Reason::ConsentExpired, vec![id]));
    let d = decide(
        &state,
        &gdpr,
        &request(Channel::Email, "marketing"),
        noon() - Duration::seconds(1),
    );
    assert_eq!(d, Decision::allow(Reason::Consent, vec![id]));
}

#[test]
fn rule_9_a_do_not_sell_or_share_opt_out() {
    let mut s = settings(PrivacyMode::Ccpa);
    s.purposes[0].sells_or_shares = true;
    let opt_out = Uuid::now_v7();
    let state = ConsentState {
        sale_or_sharing_opt_out: Some(opt_out),
        ..Default::default()
    };
    let d = decide(&state, &s, &request(Channel::Email, "marketing"), noon());
    assert_eq!(
        d,
        Decision::refuse(Reason::SaleOrSharingOptedOut, vec![opt_out])
    );
    // Not for a purpose that neither sells nor shares.
    let d = decide(&state, &s, &request(Channel::Email, "service"), noon());
    assert!(d.allowed);
}

#[test]
fn rule_10_quiet_hours_in_the_contacts_time_zone_for_sms_and_phone() {
    let s = settings(PrivacyMode::Ccpa);
    let berlin = |h, m| {
        chrono_tz::Europe::Berlin
            .with_ymd_and_hms(2026, 6, 3, h, m, 0)
            .unwrap()
            .with_timezone(&Utc)
    };
    let empty = ConsentState::default();
    for (h, m, allowed) in [
        (7, 59, false),
        (8, 0, true),
        (20, 59, true),
        (21, 0, false),
        (23, 30, false),
    ] {
        for channel in [Channel::Sms, Channel::Phone] {
            let d = decide(&empty, &s, &request(channel, "marketing"), berlin(h, m));
            assert_eq!(d.allowed, allowed, "{channel:?} at {h}:{m:02} Berlin");
            if !allowed {
                assert_eq!(d.reason, Reason::QuietHours);
            }
        }
        // Email and post have no quiet hours.
        assert!(
            decide(
                &empty,
                &s,
                &request(Channel::Email, "marketing"),
                berlin(h, m)
            )
            .allowed
        );
    }
    // The contact's own zone wins over the organisation's: 12:00 in Berlin is 03:00 in
    // Los Angeles.
    let la = ConsentState {
        time_zone: Some(chrono_tz::America::Los_Angeles),
        ..Default::default()
    };
    let d = decide(&la, &s, &request(Channel::Sms, "marketing"), berlin(12, 0));
    assert_eq!(d.reason, Reason::QuietHours);
}

#[test]
fn rule_5_a_restriction_of_processing_blocks_all_but_what_passes_under_it() {
    let (mut state, _) = granted_marketing_email();
    let restriction = Uuid::now_v7();
    state.restricted = Some(restriction);
    let mut s = settings(PrivacyMode::Gdpr);
    let d = decide(&state, &s, &request(Channel::Email, "marketing"), noon());
    assert_eq!(
        (d.reason, d.relied_on),
        (Reason::Restricted, vec![restriction])
    );
    let d = decide(&state, &s, &request(Channel::Email, "service"), noon());
    assert_eq!(d.reason, Reason::Restricted);
    // The organisation lets service messages pass under restriction.
    s.purposes[1].allowed_when_restricted = true;
    let d = decide(&state, &s, &request(Channel::Email, "service"), noon());
    assert_eq!(d.reason, Reason::LawfulBasis);
    // Suppression comes first; lifting the restriction restores the consent.
    state.suppressed_by = Some(Uuid::now_v7());
    let d = decide(&state, &s, &request(Channel::Email, "marketing"), noon());
    assert_eq!(d.reason, Reason::Suppressed);
    state.suppressed_by = None;
    let lifted = crate::contact::ContactEvent::ProcessingRestrictionLifted {
        why: Default::default(),
    };
    fold_contact(&mut state, Uuid::now_v7(), &lifted);
    let d = decide(&state, &s, &request(Channel::Email, "marketing"), noon());
    assert_eq!(d.reason, Reason::Consent);
}

#[test]
fn reason_codes_are_stable_snake_case() {
    assert_eq!(
        serde_json::to_value(Reason::ConsentPendingConfirmation).unwrap(),
        "consent_pending_confirmation"
    );
    assert_eq!(
        serde_json::to_value(Reason::SaleOrSharingOptedOut).unwrap(),
        "sale_or_sharing_opted_out"
    );
    assert!(Reason::OptOutModel.allows() && !Reason::QuietHours.allows());
}

// ---- By property ---------------------------------------------------------------

const PURPOSES: [&str; 3] = ["marketing", "service", "research"];
const POINTS: [&str; 2] = ["ada@example.com", "+441632960961"];
const ZONES: [Tz; 4] = [
    chrono_tz::Europe::Berlin,
    chrono_tz::America::Los_Angeles,
    chrono_tz::Asia::Kolkata,
    chrono_tz::Pacific::Chatham,
];

fn channel() -> impl Strategy<Value = Channel> {
    prop::sample::select(Channel::ALL.to_vec())
}

fn status() -> impl Strategy<Value = ConsentStatus> {
    prop::sample::select(vec![
        ConsentStatus::Granted,
        ConsentStatus::Granted,
        ConsentStatus::PendingConfirmation,
        ConsentStatus::Withdrawn,
        ConsentStatus::Denied,
        ConsentStatus::Expired,
    ])
}

fn a_record() -> impl Strategy<Value = ConsentRecord> {
    (
        channel(),
        0..PURPOSES.len(),
        prop::option::of(0..POINTS.len()),
        status(),
        prop::option::of(-100_000i64..100_000),
    )
        .prop_map(|(channel, p, point, status, expiry)| ConsentRecord {
            event_id: Uuid::now_v7(),
            channel,
            purpose: key(PURPOSES[p]),
            contact_point: point.map(|i| POINTS[i].to_owned()),
            status,
            expires_at: expiry.map(|s| noon() + Duration::seconds(s)),
        })
}

fn a_purpose() -> impl Strategy<Value = Purpose> {
    (
        0..PURPOSES.len(),
        prop::sample::select(vec![
            LawfulBasis::Consent,
            LawfulBasis::Contract,
            LawfulBasis::LegitimateInterests,
        ]),
        prop::sample::subsequence(Channel::ALL.to_vec(), 0..=5),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(p, basis, channels, retired, sells, restricted_ok)| Purpose {
                key: key(PURPOSES[p]),
                default_basis: basis,
                channels,
                retired,
                sells_or_shares: sells,
                allowed_when_restricted: restricted_ok,
            },
        )
}

fn an_id() -> impl Strategy<Value = Option<Uuid>> {
    prop::option::weighted(0.15, Just(()).prop_map(|_| Uuid::now_v7()))
}

fn a_case() -> impl Strategy<Value = (ConsentState, Settings, Request, DateTime<Utc>)> {
    (
        prop::collection::vec(a_record(), 0..6),
        (
            an_id(),
            an_id(),
            an_id(),
            prop::option::of(0..ZONES.len()),
            an_id(),
        ),
        (
            prop::bool::ANY,
            prop::collection::vec(a_purpose(), 0..3),
            0..ZONES.len(),
        ),
        (channel(), 0..PURPOSES.len(), 0..POINTS.len()),
        (
            -200_000i64..200_000,
            prop::collection::vec(prop::bool::ANY, 6),
        ),
    )
        .prop_map(
            |(
                mut records,
                (dnc, opt_out, sup, zone, restricted),
                (gdpr, purposes, org_zone),
                (ch, p, point),
                (t, aim),
            )| {
                // About half the records are about the request's channel and purpose,
                // so that several apply at once (and their order matters) in many cases.
                for (r, aimed) in records.iter_mut().zip(aim) {
                    if aimed {
                        r.channel = ch;
                        r.purpose = key(PURPOSES[p]);
                    }
                }
                (
                    ConsentState {
                        records,
                        do_not_contact: dnc,
                        sale_or_sharing_opt_out: opt_out,
                        suppressed_by: sup,
                        restricted,
                        time_zone: zone.map(|z| ZONES[z]),
                    },
                    Settings {
                        mode: if gdpr {
                            PrivacyMode::Gdpr
                        } else {
                            PrivacyMode::Ccpa
                        },
                        purposes,
                        time_zone: ZONES[org_zone],
                    },
                    Request {
                        channel: ch,
                        purpose: key(PURPOSES[p]),
                        contact_point: POINTS[point].to_owned(),
                    },
                    noon() + Duration::seconds(t),
                )
            },
        )
}

/// The rules again, each a yes/no on its own, written from the table (not from
/// `decide`): the first that says no is the reason.
fn oracle(state: &ConsentState, s: &Settings, r: &Request, now: DateTime<Utc>) -> Option<Reason> {
    let purpose = s.purposes.iter().find(|p| p.key == r.purpose);
    let applicable: Vec<ConsentStatus> = state
        .records
        .iter()
        .filter(|c| {
            c.channel == r.channel
                && c.purpose == r.purpose
                && (c.contact_point.is_none()
                    || c.contact_point.as_deref() == Some(r.contact_point.as_str()))
        })
        .map(|c| match c.expires_at {
            Some(e) if c.status == ConsentStatus::Granted && e <= now => ConsentStatus::Expired,
            _ => c.status,
        })
        .collect();
    let has = |s: ConsentStatus| applicable.contains(&s);
    let needs_consent = s.mode == PrivacyMode::Gdpr
        && purpose.is_some_and(|p| p.default_basis == LawfulBasis::Consent);
    let local = now
        .with_timezone(&state.time_zone.unwrap_or(s.time_zone))
        .time();
    let rules: [(bool, Reason); 13] = [
        (purpose.is_some(), Reason::PurposeUnknown),
        (purpose.is_some_and(|p| !p.retired), Reason::PurposeRetired),
        (
            purpose.is_some_and(|p| p.channels.contains(&r.channel)),
            Reason::ChannelNotCovered,
        ),
        (state.suppressed_by.is_none(), Reason::Suppressed),
        (
            state.restricted.is_none() || purpose.is_some_and(|p| p.allowed_when_restricted),
            Reason::Restricted,
        ),
        (state.do_not_contact.is_none(), Reason::DoNotContact),
        (!has(ConsentStatus::Withdrawn), Reason::ConsentWithdrawn),
        (!has(ConsentStatus::Denied), Reason::ConsentDenied),
        (
            !has(ConsentStatus::PendingConfirmation),
            Reason::ConsentPendingConfirmation,
        ),
        (
            !needs_consent || has(ConsentStatus::Granted) || !has(ConsentStatus::Expired),
            Reason::ConsentExpired,
        ),
        (
            !needs_consent || has(ConsentStatus::Granted),
            Reason::NoConsent,
        ),
        (
            !(purpose.is_some_and(|p| p.sells_or_shares)
                && state.sale_or_sharing_opt_out.is_some()),
            Reason::SaleOrSharingOptedOut,
        ),
        (
            !matches!(r.channel, Channel::Sms | Channel::Phone)
                || (local >= NaiveTime::from_hms_opt(8, 0, 0).unwrap()
                    && local < NaiveTime::from_hms_opt(21, 0, 0).unwrap()),
            Reason::QuietHours,
        ),
    ];
    rules.iter().find(|(ok, _)| !ok).map(|(_, reason)| *reason)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn allowed_only_when_every_rule_allows_and_a_refusal_names_the_first(
        (state, settings, request, now) in a_case()
    ) {
        let d = decide(&state, &settings, &request, now);
        let expected = oracle(&state, &settings, &request, now);
        prop_assert_eq!(d.allowed, expected.is_none(), "{:?} vs oracle {:?}", d, expected);
        prop_assert_eq!(d.allowed, d.reason.allows());
        if let Some(reason) = expected {
            prop_assert_eq!(d.reason, reason);
        } else {
            // An allowed message rests on exactly the applicable granted records.
            prop_assert_eq!(d.reason == Reason::Consent, !d.relied_on.is_empty());
        }
        // Whatever it relied on is one of the events it was given.
        let known: Vec<Uuid> = state.records.iter().map(|r| r.event_id)
            .chain(state.do_not_contact).chain(state.sale_or_sharing_opt_out).chain(state.suppressed_by)
            .chain(state.restricted)
            .collect();
        prop_assert!(d.relied_on.iter().all(|id| known.contains(id)));
    }
}
