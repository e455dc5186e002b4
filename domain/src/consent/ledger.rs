//! One contact's consent: every change is an event carrying its proof. The stream's
//! type is `consent` and its id the contact's id, so its personal data (the contact
//! point a record is for, the free text of a Do Not Contact mark) is encrypted under
//! the contact's own data key, and erasing the contact shreds it too.
//!
//! The aggregate decides whether a change may be recorded (GDPR mode needs a notice;
//! double opt-in, when required, cannot be skipped; a confirmation token is single-use
//! and expires). [`fold`] turns the same events into the [`ConsentState`] the send gate
//! reads, with the id of the event behind each record: the one read path for consent
//! state, used by the API, the dispatcher and the read model alike.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::gate::{ConsentRecord, ConsentState};
use super::proof::{CaptureSource, ConsentProof};
use super::{Channel, ConsentStatus, PrivacyMode, PurposeKey};
use crate::PersonalData;

/// The longest a double opt-in confirmation link may live.
pub const MAX_CONFIRMATION_HOURS: i64 = 72;

/// A choice a contact makes (or an import or a staff member records for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    Granted,
    Withdrawn,
    Denied,
}

impl Choice {
    pub fn status(self) -> ConsentStatus {
        match self {
            Self::Granted => ConsentStatus::Granted,
            Self::Withdrawn => ConsentStatus::Withdrawn,
            Self::Denied => ConsentStatus::Denied,
        }
    }
}

/// The personal part of a consent event: the address or number it is for (none: the
/// whole channel).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Point {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_point: Option<String>,
}

/// The personal part of a Do Not Contact mark: why (free text).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Why {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What is asked of the ledger. Values are parsed at the edge.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsentCommand {
    /// Records a choice for a channel and purpose (and optionally one contact point).
    Record {
        contact_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        contact_point: Option<String>,
        choice: Choice,
        proof: ConsentProof,
        /// The organisation's rules at the time.
        rules: Rules,
    },
    /// Starts a double opt-in: the record is pending until the token is confirmed.
    RequestConfirmation {
        contact_id: Uuid,
        request_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        contact_point: Option<String>,
        proof: ConsentProof,
        /// SHA-256 (hex) of the single-use token mailed to the contact.
        token_sha256: String,
        expires_at: DateTime<Utc>,
        /// The confirmation message queued through the send gate.
        message_id: Uuid,
        now: DateTime<Utc>,
        rules: Rules,
    },
    /// The contact followed the link: `token_sha256` must match an open request.
    Confirm {
        token_sha256: String,
        now: DateTime<Utc>,
    },
    SetDoNotContact {
        contact_id: Uuid,
        reason: Option<String>,
    },
    LiftDoNotContact {
        reason: Option<String>,
    },
    /// CCPA: do not sell or share (from a request, or a `Sec-GPC: 1` signal).
    OptOutOfSaleOrSharing {
        contact_id: Uuid,
        source: CaptureSource,
        global_privacy_control: bool,
    },
    LiftSaleOrSharingOptOut {
        source: CaptureSource,
    },
}

/// The organisation's settings a change is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub mode: PrivacyMode,
    /// Marketing consent only through double opt-in (or an import of records that were
    /// confirmed elsewhere).
    pub double_opt_in_for_marketing: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ConsentEvent {
    ConsentRecorded {
        contact_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        status: ConsentStatus,
        proof: ConsentProof,
        point: Point,
    },
    ConfirmationRequested {
        contact_id: Uuid,
        request_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        proof: ConsentProof,
        token_sha256: String,
        expires_at: DateTime<Utc>,
        message_id: Uuid,
        point: Point,
    },
    /// The double opt-in's confirmation: a grant whose proof is the request's, with
    /// source `double_opt_in` (who, when, from where: this event's metadata).
    ConsentConfirmed {
        contact_id: Uuid,
        request_id: Uuid,
        channel: Channel,
        purpose: PurposeKey,
        proof: ConsentProof,
        point: Point,
    },
    DoNotContactSet {
        contact_id: Uuid,
        why: Why,
    },
    DoNotContactLifted {
        contact_id: Uuid,
        why: Why,
    },
    SaleOrSharingOptedOut {
        contact_id: Uuid,
        source: CaptureSource,
        global_privacy_control: bool,
    },
    SaleOrSharingOptOutLifted {
        contact_id: Uuid,
        source: CaptureSource,
    },
}

impl ConsentEvent {
    pub fn contact_id(&self) -> Uuid {
        match self {
            Self::ConsentRecorded { contact_id, .. }
            | Self::ConfirmationRequested { contact_id, .. }
            | Self::ConsentConfirmed { contact_id, .. }
            | Self::DoNotContactSet { contact_id, .. }
            | Self::DoNotContactLifted { contact_id, .. }
            | Self::SaleOrSharingOptedOut { contact_id, .. }
            | Self::SaleOrSharingOptOutLifted { contact_id, .. } => *contact_id,
        }
    }

    /// The record this event sets, if it sets one: channel, purpose, point, status,
    /// proof.
    pub fn record(&self) -> Option<RecordChange<'_>> {
        match self {
            Self::ConsentRecorded {
                channel,
                purpose,
                status,
                proof,
                point,
                ..
            } => Some(RecordChange {
                channel: *channel,
                purpose,
                contact_point: point.contact_point.as_deref(),
                status: *status,
                proof,
            }),
            Self::ConfirmationRequested {
                channel,
                purpose,
                proof,
                point,
                ..
            } => Some(RecordChange {
                channel: *channel,
                purpose,
                contact_point: point.contact_point.as_deref(),
                status: ConsentStatus::PendingConfirmation,
                proof,
            }),
            Self::ConsentConfirmed {
                channel,
                purpose,
                proof,
                point,
                ..
            } => Some(RecordChange {
                channel: *channel,
                purpose,
                contact_point: point.contact_point.as_deref(),
                status: ConsentStatus::Granted,
                proof,
            }),
            _ => None,
        }
    }
}

/// A change of one consent record, as an event states it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordChange<'a> {
    pub channel: Channel,
    pub purpose: &'a PurposeKey,
    pub contact_point: Option<&'a str>,
    pub status: ConsentStatus,
    pub proof: &'a ConsentProof,
}

impl DomainEvent for ConsentEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ConsentRecorded { .. } => "ConsentRecorded",
            Self::ConfirmationRequested { .. } => "ConfirmationRequested",
            Self::ConsentConfirmed { .. } => "ConsentConfirmed",
            Self::DoNotContactSet { .. } => "DoNotContactSet",
            Self::DoNotContactLifted { .. } => "DoNotContactLifted",
            Self::SaleOrSharingOptedOut { .. } => "SaleOrSharingOptedOut",
            Self::SaleOrSharingOptOutLifted { .. } => "SaleOrSharingOptOutLifted",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for ConsentEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        match self {
            Self::ConsentRecorded { .. }
            | Self::ConfirmationRequested { .. }
            | Self::ConsentConfirmed { .. } => &["point"],
            Self::DoNotContactSet { .. } | Self::DoNotContactLifted { .. } => &["why"],
            Self::SaleOrSharingOptedOut { .. } | Self::SaleOrSharingOptOutLifted { .. } => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    #[error(
        "GDPR mode: a consent change needs the notice shown (id, version and SHA-256 of its text)"
    )]
    NoticeRequired,
    #[error(
        "this organisation requires double opt-in for marketing: request a confirmation instead"
    )]
    DoubleOptInRequired,
    #[error("a confirmation link lives at most 72 hours")]
    ExpiryTooLong,
    #[error("the confirmation link is unknown, used or expired")]
    UnknownToken,
    #[error("the contact is not marked Do Not Contact")]
    NotMarked,
    #[error("the contact has not opted out of sale or sharing")]
    NotOptedOut,
}

/// A confirmation request still open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenRequest {
    request_id: Uuid,
    contact_id: Uuid,
    channel: Channel,
    purpose: PurposeKey,
    proof: ConsentProof,
    token_sha256: String,
    expires_at: DateTime<Utc>,
    contact_point: Option<String>,
}

/// The ledger's state: what the rules need (open confirmation requests, the marks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsentLedger {
    contact_id: Option<Uuid>,
    open: Vec<OpenRequest>,
    do_not_contact: bool,
    sale_or_sharing_opt_out: bool,
}

fn check_rules(
    rules: &Rules,
    purpose: &PurposeKey,
    choice: Choice,
    proof: &ConsentProof,
) -> Result<(), ConsentError> {
    // Withdrawing is as easy as granting: only a grant needs the notice shown.
    if rules.mode == PrivacyMode::Gdpr && choice == Choice::Granted && proof.notice.is_none() {
        return Err(ConsentError::NoticeRequired);
    }
    let marketing = purpose.as_str() == "marketing";
    // A preference-center link is the contact's own (sent to it, bound to it): a yes
    // given there is the contact's, as a confirmed double opt-in is.
    let confirmed_elsewhere = matches!(
        proof.source,
        CaptureSource::DoubleOptIn | CaptureSource::Import | CaptureSource::PreferenceCenter
    );
    if rules.double_opt_in_for_marketing
        && marketing
        && choice == Choice::Granted
        && !confirmed_elsewhere
    {
        return Err(ConsentError::DoubleOptInRequired);
    }
    Ok(())
}

impl Aggregate for ConsentLedger {
    const TYPE: &'static str = "consent";
    type Command = ConsentCommand;
    type Event = ConsentEvent;
    type Error = ConsentError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ConsentCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), ConsentError> {
        let event = match command {
            ConsentCommand::Record {
                contact_id,
                channel,
                purpose,
                contact_point,
                choice,
                proof,
                rules,
            } => {
                check_rules(&rules, &purpose, choice, &proof)?;
                ConsentEvent::ConsentRecorded {
                    contact_id,
                    channel,
                    purpose,
                    status: choice.status(),
                    proof,
                    point: Point { contact_point },
                }
            }
            ConsentCommand::RequestConfirmation {
                contact_id,
                request_id,
                channel,
                purpose,
                contact_point,
                proof,
                token_sha256,
                expires_at,
                message_id,
                now,
                rules,
            } => {
                if rules.mode == PrivacyMode::Gdpr && proof.notice.is_none() {
                    return Err(ConsentError::NoticeRequired);
                }
                if expires_at > now + chrono::Duration::hours(MAX_CONFIRMATION_HOURS) {
                    return Err(ConsentError::ExpiryTooLong);
                }
                ConsentEvent::ConfirmationRequested {
                    contact_id,
                    request_id,
                    channel,
                    purpose,
                    proof,
                    token_sha256,
                    expires_at,
                    message_id,
                    point: Point { contact_point },
                }
            }
            ConsentCommand::Confirm { token_sha256, now } => {
                let open = self
                    .open
                    .iter()
                    .find(|r| r.token_sha256 == token_sha256 && r.expires_at > now)
                    .ok_or(ConsentError::UnknownToken)?;
                let mut proof = open.proof.clone();
                proof.source = CaptureSource::DoubleOptIn;
                ConsentEvent::ConsentConfirmed {
                    contact_id: open.contact_id,
                    request_id: open.request_id,
                    channel: open.channel,
                    purpose: open.purpose.clone(),
                    proof,
                    point: Point {
                        contact_point: open.contact_point.clone(),
                    },
                }
            }
            ConsentCommand::SetDoNotContact { contact_id, reason } => {
                if self.do_not_contact {
                    return Ok(());
                }
                ConsentEvent::DoNotContactSet {
                    contact_id,
                    why: Why { reason },
                }
            }
            ConsentCommand::LiftDoNotContact { reason } => {
                let Some(contact_id) = self.contact_id.filter(|_| self.do_not_contact) else {
                    return Err(ConsentError::NotMarked);
                };
                ConsentEvent::DoNotContactLifted {
                    contact_id,
                    why: Why { reason },
                }
            }
            ConsentCommand::OptOutOfSaleOrSharing {
                contact_id,
                source,
                global_privacy_control,
            } => {
                if self.sale_or_sharing_opt_out {
                    return Ok(());
                }
                ConsentEvent::SaleOrSharingOptedOut {
                    contact_id,
                    source,
                    global_privacy_control,
                }
            }
            ConsentCommand::LiftSaleOrSharingOptOut { source } => {
                let Some(contact_id) = self.contact_id.filter(|_| self.sale_or_sharing_opt_out)
                else {
                    return Err(ConsentError::NotOptedOut);
                };
                ConsentEvent::SaleOrSharingOptOutLifted { contact_id, source }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: ConsentEvent) {
        self.contact_id = Some(event.contact_id());
        match event {
            ConsentEvent::ConfirmationRequested {
                contact_id,
                request_id,
                channel,
                purpose,
                proof,
                token_sha256,
                expires_at,
                point,
                ..
            } => self.open.push(OpenRequest {
                request_id,
                contact_id,
                channel,
                purpose,
                proof,
                token_sha256,
                expires_at,
                contact_point: point.contact_point,
            }),
            ConsentEvent::ConsentConfirmed { request_id, .. } => {
                self.open.retain(|r| r.request_id != request_id)
            }
            ConsentEvent::ConsentRecorded { .. } => {}
            ConsentEvent::DoNotContactSet { .. } => self.do_not_contact = true,
            ConsentEvent::DoNotContactLifted { .. } => self.do_not_contact = false,
            ConsentEvent::SaleOrSharingOptedOut { .. } => self.sale_or_sharing_opt_out = true,
            ConsentEvent::SaleOrSharingOptOutLifted { .. } => self.sale_or_sharing_opt_out = false,
        }
    }
}

/// Applies one event (with its id) to the state the send gate reads: the latest
/// change for a channel, purpose and contact point replaces the one before.
pub fn fold(state: &mut ConsentState, event_id: Uuid, event: &ConsentEvent) {
    if let Some(change) = event.record() {
        let record = ConsentRecord {
            event_id,
            channel: change.channel,
            purpose: change.purpose.clone(),
            contact_point: change.contact_point.map(str::to_owned),
            status: change.status,
            expires_at: if change.status == ConsentStatus::Granted {
                change.proof.expires_at
            } else {
                None
            },
        };
        match state.records.iter_mut().find(|r| {
            r.channel == record.channel
                && r.purpose == record.purpose
                && r.contact_point == record.contact_point
        }) {
            Some(r) => *r = record,
            None => state.records.push(record),
        }
        return;
    }
    match event {
        ConsentEvent::DoNotContactSet { .. } => state.do_not_contact = Some(event_id),
        ConsentEvent::DoNotContactLifted { .. } => state.do_not_contact = None,
        ConsentEvent::SaleOrSharingOptedOut { .. } => {
            state.sale_or_sharing_opt_out = Some(event_id)
        }
        ConsentEvent::SaleOrSharingOptOutLifted { .. } => state.sale_or_sharing_opt_out = None,
        _ => {}
    }
}

#[cfg(test)]
mod tests;
