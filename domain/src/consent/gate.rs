//! The send gate: one pure function decides whether a message may go out, for every
//! caller (staff, API keys, AI agents, the dispatcher at the moment of sending).
//!
//! The rules, in the order they are tried; the first that refuses gives the reason
//! (the same table, with what each term means, is in docs/consent.md):
//!
//! | # | rule | refuses with |
//! |---|---|---|
//! | 1 | the purpose is in the organisation's registry | `purpose_unknown` |
//! | 2 | the purpose is not retired | `purpose_retired` |
//! | 3 | the purpose covers the channel | `channel_not_covered` |
//! | 4 | the contact point is not on the suppression list | `suppressed` |
//! | 5 | the contact's processing is not restricted (GDPR Art. 18), unless the purpose passes under restriction | `restricted` |
//! | 6 | the contact is not marked Do Not Contact | `do_not_contact` |
//! | 7 | no applicable record is withdrawn or denied (any mode, any basis: an objection is honoured) | `consent_withdrawn`, `consent_denied` |
//! | 8 | no applicable record is pending confirmation (double opt-in) | `consent_pending_confirmation` |
//! | 9 | GDPR mode and a purpose based on consent: an applicable record is granted and not expired | `consent_expired` (one had expired), `no_consent` |
//! | 10 | a purpose that sells or shares data: no do-not-sell/share opt-out | `sale_or_sharing_opted_out` |
//! | 11 | sms and phone: 08:00 to 21:00 in the contact's time zone (else the organisation's) | `quiet_hours` |
//!
//! A record applies when it is for the request's channel and purpose, and for the
//! request's contact point or for the whole channel. Allowed decisions say why:
//! `consent` (rule 8 found granted records), `lawful_basis` (GDPR, a purpose with another
//! basis) or `opt_out_model` (CCPA, nobody opted out). Every decision names the events it
//! relied on: the granted records it was allowed by, or the record, mark or opt-out that
//! refused it.

use chrono::{DateTime, NaiveTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Channel, ConsentStatus, LawfulBasis, PrivacyMode, Purpose, PurposeKey};

/// Why a message was allowed or refused: stable codes, part of the API and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    // Allowed.
    Consent,
    LawfulBasis,
    OptOutModel,
    // Refused, in rule order.
    PurposeUnknown,
    PurposeRetired,
    ChannelNotCovered,
    Suppressed,
    Restricted,
    DoNotContact,
    ConsentWithdrawn,
    ConsentDenied,
    ConsentPendingConfirmation,
    ConsentExpired,
    NoConsent,
    SaleOrSharingOptedOut,
    QuietHours,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Self::Consent,
        Self::LawfulBasis,
        Self::OptOutModel,
        Self::PurposeUnknown,
        Self::PurposeRetired,
        Self::ChannelNotCovered,
        Self::Suppressed,
        Self::Restricted,
        Self::DoNotContact,
        Self::ConsentWithdrawn,
        Self::ConsentDenied,
        Self::ConsentPendingConfirmation,
        Self::ConsentExpired,
        Self::NoConsent,
        Self::SaleOrSharingOptedOut,
        Self::QuietHours,
    ];

    pub fn allows(self) -> bool {
        matches!(
            self,
            Reason::Consent | Reason::LawfulBasis | Reason::OptOutModel
        )
    }
}

/// One consent record as it stands now (the latest change for its channel, purpose and
/// contact point), with the event that made it so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentRecord {
    pub event_id: Uuid,
    pub channel: Channel,
    pub purpose: PurposeKey,
    /// `None`: the whole channel; else one address or number.
    pub contact_point: Option<String>,
    pub status: ConsentStatus,
    pub expires_at: Option<DateTime<Utc>>,
}

/// What the gate needs to know of one contact, loaded by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentState {
    pub records: Vec<ConsentRecord>,
    /// The event that marked the contact Do Not Contact, while it is marked.
    pub do_not_contact: Option<Uuid>,
    /// The event of the contact's do-not-sell/share opt-out, while it stands.
    pub sale_or_sharing_opt_out: Option<Uuid>,
    /// The event that put the request's contact point on the suppression list.
    pub suppressed_by: Option<Uuid>,
    /// The event that restricted the contact's processing (GDPR Art. 18), while it
    /// stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restricted: Option<Uuid>,
    /// The contact's IANA time zone, when known.
    pub time_zone: Option<Tz>,
}

/// The organisation's side of the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: PrivacyMode,
    pub purposes: Vec<Purpose>,
    /// For contacts without one of their own.
    pub time_zone: Tz,
}

/// A message someone wants to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub channel: Channel,
    pub purpose: PurposeKey,
    /// The address or number it goes to.
    pub contact_point: String,
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The events the decision rests on.
    pub relied_on: Vec<Uuid>,
}

impl Decision {
    fn refuse(reason: Reason, relied_on: Vec<Uuid>) -> Self {
        Self {
            allowed: false,
            reason,
            relied_on,
        }
    }

    fn allow(reason: Reason, relied_on: Vec<Uuid>) -> Self {
        Self {
            allowed: true,
            reason,
            relied_on,
        }
    }
}

/// The local day for sms and phone: from 08:00 (inclusive) to 21:00 (exclusive).
pub const DAY_STARTS: NaiveTime = NaiveTime::from_hms_opt(8, 0, 0).unwrap();
pub const DAY_ENDS: NaiveTime = NaiveTime::from_hms_opt(21, 0, 0).unwrap();

/// Whether `record` applies to `request`.
fn applies(record: &ConsentRecord, request: &Request) -> bool {
    record.channel == request.channel
        && record.purpose == request.purpose
        && record
            .contact_point
            .as_ref()
            .is_none_or(|p| *p == request.contact_point)
}

/// The status a record has at `now` (a granted one past its expiry has expired).
fn status_at(record: &ConsentRecord, now: DateTime<Utc>) -> ConsentStatus {
    match (record.status, record.expires_at) {
        (ConsentStatus::Granted, Some(until)) if until <= now => ConsentStatus::Expired,
        (status, _) => status,
    }
}

/// Decides whether `request` may be sent to the contact whose state is `state`, now.
pub fn decide(
    state: &ConsentState,
    settings: &Settings,
    request: &Request,
    now: DateTime<Utc>,
) -> Decision {
    use ConsentStatus as S;
    let Some(purpose) = settings.purposes.iter().find(|p| p.key == request.purpose) else {
        return Decision::refuse(Reason::PurposeUnknown, vec![]);
    };
    if purpose.retired {
        return Decision::refuse(Reason::PurposeRetired, vec![]);
    }
    if !purpose.channels.contains(&request.channel) {
        return Decision::refuse(Reason::ChannelNotCovered, vec![]);
    }
    if let Some(id) = state.suppressed_by {
        return Decision::refuse(Reason::Suppressed, vec![id]);
    }
    if let Some(id) = state
        .restricted
        .filter(|_| !purpose.allowed_when_restricted)
    {
        return Decision::refuse(Reason::Restricted, vec![id]);
    }
    if let Some(id) = state.do_not_contact {
        return Decision::refuse(Reason::DoNotContact, vec![id]);
    }
    let applicable: Vec<(&ConsentRecord, S)> = state
        .records
        .iter()
        .filter(|r| applies(r, request))
        .map(|r| (r, status_at(r, now)))
        .collect();
    let with = |wanted: S| -> Vec<Uuid> {
        applicable
            .iter()
            .filter(|(_, s)| *s == wanted)
            .map(|(r, _)| r.event_id)
            .collect()
    };
    for (status, reason) in [
        (S::Withdrawn, Reason::ConsentWithdrawn),
        (S::Denied, Reason::ConsentDenied),
        (S::PendingConfirmation, Reason::ConsentPendingConfirmation),
    ] {
        let ids = with(status);
        if !ids.is_empty() {
            return Decision::refuse(reason, ids);
        }
    }
    let granted = with(S::Granted);
    let allowed_by = match (settings.mode, purpose.default_basis) {
        (PrivacyMode::Gdpr, LawfulBasis::Consent) => {
            if granted.is_empty() {
                let expired = with(S::Expired);
                return if expired.is_empty() {
                    Decision::refuse(Reason::NoConsent, vec![])
                } else {
                    Decision::refuse(Reason::ConsentExpired, expired)
                };
            }
            Reason::Consent
        }
        (PrivacyMode::Gdpr, _) if granted.is_empty() => Reason::LawfulBasis,
        (PrivacyMode::Ccpa, _) if granted.is_empty() => Reason::OptOutModel,
        _ => Reason::Consent,
    };
    if purpose.sells_or_shares {
        if let Some(id) = state.sale_or_sharing_opt_out {
            return Decision::refuse(Reason::SaleOrSharingOptedOut, vec![id]);
        }
    }
    if request.channel.is_real_time() {
        let zone = state.time_zone.unwrap_or(settings.time_zone);
        let local = now.with_timezone(&zone).time();
        if local < DAY_STARTS || local >= DAY_ENDS {
            return Decision::refuse(Reason::QuietHours, vec![]);
        }
    }
    Decision::allow(allowed_by, granted)
}

/// What a contact event changes of the gate's state (the contact points and time zone
/// are the caller's to keep): a restriction of processing and its lift, and an
/// erasure, after which nothing is left to decide on. One function for every reader
/// (the read model, the gate's fallback read, a read of the past).
pub fn fold_contact(
    state: &mut ConsentState,
    event_id: Uuid,
    event: &crate::contact::ContactEvent,
) {
    use crate::contact::ContactEvent as E;
    match event {
        E::ProcessingRestricted { .. } => state.restricted = Some(event_id),
        E::ProcessingRestrictionLifted { .. } => state.restricted = None,
        E::ContactErased { .. } => *state = ConsentState::default(),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
