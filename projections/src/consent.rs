//! The consent read models.
//!
//! - [`ConsentStateView`]: each contact's current consent, the send gate's
//!   [`ConsentState`] folded by [`fold`] (the one way events become gate state) with
//!   the contact's points (e-mail, phone, postal address) and time zone from its
//!   `contact` stream. The view follows both streams of one contact and tracks the
//!   last sequence applied of each, so a redelivery is [`Update::AlreadyApplied`] and a
//!   gap [`Update::OutOfOrder`], never papered over.
//! - [`ConsentLogEntry`]: the ConsentLog, one entry per consent event with its proof,
//!   who made the change and from where (IP, user agent), and the event's hash (what a
//!   receipt is checked against).

use chrono::{DateTime, Utc};
use crm_domain::consent::gate::{fold_contact, ConsentState};
use crm_domain::consent::ledger::{fold, ConsentEvent};
use crm_domain::contact::{apply_changes, ContactEvent, ContactProfile};
use crm_domain::metadata::EventMetadata;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Envelope;

/// Aggregate type of the consent streams (`crm_domain::consent::ledger::ConsentLedger`).
pub const CONSENT_STREAM: &str = "consent";
/// Aggregate type of the contact streams (`crm_domain::contact::Contact`).
pub const CONTACT_STREAM: &str = "contact";

/// One contact's consent as the gate reads it, with where the contact is reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentStateView {
    pub org_id: Uuid,
    pub contact_id: Uuid,
    /// Records with the event behind each, Do Not Contact, the sale/sharing opt-out,
    /// and the contact's time zone (`suppressed_by` is never set here: the suppression
    /// list is per contact point, looked up at the decision).
    pub state: ConsentState,
    /// The contact's e-mail, phone, address and time zone (nothing else of its
    /// profile).
    pub points: ContactProfile,
    /// The last sequence applied of the contact's `contact` stream (0: none yet).
    pub contact_version: i64,
    /// The last sequence applied of the contact's `consent` stream (0: none yet).
    pub consent_version: i64,
    pub last_position: i64,
    pub updated_at: DateTime<Utc>,
}

impl ConsentStateView {
    fn empty(env: &Envelope<'_>, contact_id: Uuid) -> Self {
        Self {
            org_id: env.org_id,
            contact_id,
            state: ConsentState::default(),
            points: ContactProfile::default(),
            contact_version: 0,
            consent_version: 0,
            last_position: env.global_position,
            updated_at: env.recorded_at,
        }
    }
}

/// The event a consent-state view is offered.
#[derive(Debug, Clone, Copy)]
pub enum StateEvent<'a> {
    Contact(&'a ContactEvent),
    Consent(&'a ConsentEvent),
}

/// Outcome of offering an event to a view.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The view changed (or was created).
    Changed(Box<ConsentStateView>),
    /// The event was already reflected (its sequence is not above the stream's).
    AlreadyApplied,
    /// The event does not follow its stream's last sequence: an earlier one is missing.
    OutOfOrder { have: i64, got: i64 },
}

/// Keeps only what the view holds of a profile: the contact points and the time zone.
fn points_of(profile: &ContactProfile) -> ContactProfile {
    ContactProfile {
        email: profile.email.clone(),
        phone: profile.phone.clone(),
        address: profile.address.clone(),
        time_zone: profile.time_zone,
        ..ContactProfile::default()
    }
}

/// The next view of contact `contact_id` after `event` (of its contact or consent
/// stream, at `env.sequence`). Idempotent per stream; a gap is reported.
pub fn update(
    view: Option<&ConsentStateView>,
    env: &Envelope<'_>,
    contact_id: Uuid,
    event: StateEvent<'_>,
) -> Update {
    let have = match (view, event) {
        (None, _) => 0,
        (Some(v), StateEvent::Contact(_)) => v.contact_version,
        (Some(v), StateEvent::Consent(_)) => v.consent_version,
    };
    if env.sequence <= have {
        return Update::AlreadyApplied;
    }
    if env.sequence != have + 1 {
        return Update::OutOfOrder {
            have,
            got: env.sequence,
        };
    }
    let mut next = view
        .cloned()
        .unwrap_or_else(|| ConsentStateView::empty(env, contact_id));
    match event {
        StateEvent::Contact(e) => {
            match e {
                ContactEvent::ContactCreated { profile, .. } => next.points = points_of(profile),
                ContactEvent::ContactUpdated { changes } => {
                    apply_changes(&mut next.points, changes);
                    next.points = points_of(&next.points);
                }
                // Erasure purges the view: no contact point, no record (their points
                // are personal). The gate then has nothing to send to; the suppression
                // list keeps a later record of the same address from being marketed to.
                ContactEvent::ContactErased { .. } => next.points = ContactProfile::default(),
                _ => {}
            }
            // Restriction of processing and erasure, as every reader of the gate's
            // state folds them.
            fold_contact(&mut next.state, env.event_id, e);
            next.state.time_zone = next.points.time_zone.map(|tz| tz.0);
            next.contact_version = env.sequence;
        }
        StateEvent::Consent(e) => {
            fold(&mut next.state, env.event_id, e);
            next.consent_version = env.sequence;
        }
    }
    next.last_position = env.global_position;
    next.updated_at = env.recorded_at;
    Update::Changed(Box::new(next))
}

/// One entry of the ConsentLog: one consent event, its proof, who and from where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentLogEntry {
    pub event_id: Uuid,
    pub org_id: Uuid,
    pub global_position: i64,
    pub contact_id: Uuid,
    /// The event type, e.g. `ConsentRecorded`.
    pub action: String,
    /// Channel, purpose, status and contact point: for the events that set a record.
    pub channel: Option<String>,
    pub purpose: Option<String>,
    pub status: Option<String>,
    pub contact_point: Option<String>,
    pub lawful_basis: Option<String>,
    /// How it was captured (record changes and the sale/sharing opt-out and its lift).
    pub source: Option<String>,
    pub notice_id: Option<String>,
    pub notice_version: Option<String>,
    pub notice_sha256: Option<String>,
    pub language: Option<String>,
    pub jurisdiction: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub import_id: Option<Uuid>,
    pub actor_kind: String,
    pub actor_id: String,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The event's hash in its stream's chain (what a receipt names).
    pub event_hash: String,
}

/// The string a unit enum serialises to (`sms`, `preference_center`, …).
fn name_of<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
}

/// The ConsentLog entry of a consent event (`hash`: its stored hash).
pub fn log_entry(
    env: &Envelope<'_>,
    event: &ConsentEvent,
    meta: &EventMetadata,
    hash: &str,
) -> ConsentLogEntry {
    let mut e = ConsentLogEntry {
        event_id: env.event_id,
        org_id: env.org_id,
        global_position: env.global_position,
        contact_id: event.contact_id(),
        action: env.event_type.to_owned(),
        channel: None,
        purpose: None,
        status: None,
        contact_point: None,
        lawful_basis: None,
        source: None,
        notice_id: None,
        notice_version: None,
        notice_sha256: None,
        language: None,
        jurisdiction: None,
        expires_at: None,
        import_id: None,
        actor_kind: name_of(&meta.principal.kind).unwrap_or_else(|| "unknown".to_owned()),
        actor_id: meta.principal.id.clone(),
        occurred_at: meta.occurred_at,
        recorded_at: env.recorded_at,
        ip: meta.ip.clone(),
        user_agent: meta.user_agent.clone(),
        event_hash: hash.to_owned(),
    };
    if let Some(change) = event.record() {
        let proof = change.proof;
        e.channel = name_of(&change.channel);
        e.purpose = Some(change.purpose.as_str().to_owned());
        e.status = name_of(&change.status);
        e.contact_point = change.contact_point.map(str::to_owned);
        e.lawful_basis = name_of(&proof.lawful_basis);
        e.source = name_of(&proof.source);
        if let Some(n) = &proof.notice {
            e.notice_id = Some(n.id.to_string());
            e.notice_version = Some(n.version.to_string());
            e.notice_sha256 = Some(n.sha256.as_str().to_owned());
        }
        e.language = proof.language.clone().map(String::from);
        e.jurisdiction = proof.jurisdiction.clone().map(String::from);
        e.expires_at = proof.expires_at;
        e.import_id = proof.import_id;
    }
    match event {
        ConsentEvent::SaleOrSharingOptedOut { source, .. }
        | ConsentEvent::SaleOrSharingOptOutLifted { source, .. } => e.source = name_of(source),
        _ => {}
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_domain::consent::ledger::Point;
    use crm_domain::consent::proof::{CaptureSource, ConsentProof};
    use crm_domain::consent::{Channel, ConsentStatus, LawfulBasis, PurposeKey};
    use crm_domain::contact::ContactChanges;
    use crm_domain::values::{Email, TimeZone};

    fn env(aggregate_type: &'static str, seq: i64, pos: i64) -> Envelope<'static> {
        Envelope {
            event_id: Uuid::now_v7(),
            org_id: Uuid::nil(),
            aggregate_type,
            aggregate_id: "c",
            event_type: "x",
            sequence: seq,
            global_position: pos,
            recorded_at: Utc::now(),
        }
    }

    fn recorded(status: ConsentStatus) -> ConsentEvent {
        ConsentEvent::ConsentRecorded {
            contact_id: Uuid::nil(),
            channel: Channel::Email,
            purpose: PurposeKey::parse("marketing").unwrap(),
            status,
            proof: ConsentProof {
                lawful_basis: LawfulBasis::Consent,
                source: CaptureSource::Form,
                notice: None,
                language: None,
                jurisdiction: None,
                expires_at: None,
                import_id: None,
            },
            point: Point {
                contact_point: Some("ada@example.com".into()),
            },
        }
    }

    fn changed(u: Update) -> ConsentStateView {
        match u {
            Update::Changed(v) => *v,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn follows_both_streams_and_each_sequence() {
        let id = Uuid::nil();
        let created = ContactEvent::ContactCreated {
            contact_id: id,
            org_id: Uuid::nil(),
            profile: ContactProfile {
                email: Some(Email::parse("ada@example.com").unwrap()),
                company: None,
                ..Default::default()
            },
        };
        let grant = recorded(ConsentStatus::Granted);
        let e1 = env(CONSENT_STREAM, 1, 5);
        let v1 = changed(update(None, &e1, id, StateEvent::Consent(&grant)));
        assert_eq!((v1.consent_version, v1.contact_version), (1, 0));
        assert_eq!(v1.state.records[0].event_id, e1.event_id);
        let v2 = changed(update(
            Some(&v1),
            &env(CONTACT_STREAM, 1, 6),
            id,
            StateEvent::Contact(&created),
        ));
        assert_eq!(
            v2.points.email.as_ref().unwrap().as_str(),
            "ada@example.com"
        );
        assert_eq!(v2.state.records.len(), 1);
        // Redelivery of either stream; a gap in one.
        assert_eq!(
            update(
                Some(&v2),
                &env(CONSENT_STREAM, 1, 5),
                id,
                StateEvent::Consent(&grant)
            ),
            Update::AlreadyApplied
        );
        assert_eq!(
            update(
                Some(&v2),
                &env(CONTACT_STREAM, 3, 9),
                id,
                StateEvent::Contact(&ContactEvent::ContactArchived {})
            ),
            Update::OutOfOrder { have: 1, got: 3 }
        );
        let tz = ContactEvent::ContactUpdated {
            changes: ContactChanges {
                set: ContactProfile {
                    time_zone: Some(TimeZone::parse("Europe/Berlin").unwrap()),
                    ..Default::default()
                },
                ..Default::default()
            },
        };
        let v3 = changed(update(
            Some(&v2),
            &env(CONTACT_STREAM, 2, 7),
            id,
            StateEvent::Contact(&tz),
        ));
        assert_eq!(
            v3.state.time_zone,
            Some(TimeZone::parse("Europe/Berlin").unwrap().0)
        );
        let e4 = env(CONSENT_STREAM, 2, 8);
        let v4 = changed(update(
            Some(&v3),
            &e4,
            id,
            StateEvent::Consent(&recorded(ConsentStatus::Withdrawn)),
        ));
        assert_eq!(v4.state.records.len(), 1);
        assert_eq!(v4.state.records[0].status, ConsentStatus::Withdrawn);
        assert_eq!(v4.state.records[0].event_id, e4.event_id);
        assert_eq!(v4.last_position, 8);
    }

    #[test]
    fn a_log_entry_carries_the_proof_and_where_from() {
        let mut meta = EventMetadata::system(Uuid::nil(), "cli");
        meta.ip = Some("203.0.113.9".into());
        let e = log_entry(
            &env(CONSENT_STREAM, 1, 3),
            &recorded(ConsentStatus::Granted),
            &meta,
            "abc",
        );
        assert_eq!(e.channel.as_deref(), Some("email"));
        assert_eq!(e.status.as_deref(), Some("granted"));
        assert_eq!(e.source.as_deref(), Some("form"));
        assert_eq!(e.lawful_basis.as_deref(), Some("consent"));
        assert_eq!(e.contact_point.as_deref(), Some("ada@example.com"));
        assert_eq!(e.ip.as_deref(), Some("203.0.113.9"));
        assert_eq!(
            (e.actor_kind.as_str(), e.event_hash.as_str()),
            ("system", "abc")
        );
        let opt_out = ConsentEvent::SaleOrSharingOptedOut {
            contact_id: Uuid::nil(),
            source: CaptureSource::Portal,
            global_privacy_control: true,
        };
        let e = log_entry(&env(CONSENT_STREAM, 2, 4), &opt_out, &meta, "def");
        assert_eq!((e.channel, e.source.as_deref()), (None, Some("portal")));
    }
}
