//! Consent: the organisation's privacy settings, the consent ledger's commands, and the
//! one read path the send gate takes (`state::gate_input`).
//!
//! - [`privacy`]: runs privacy commands; the `privacy_settings` row moves with the
//!   events in their transaction, and the gate reads it in one query;
//! - [`ledger`]: runs consent commands; open double opt-in confirmations are indexed by
//!   their token's hash in the same transaction (single use: the row goes with the
//!   confirmation);
//! - [`import`]: bulk imports (CSV, JSON lines), a `ConsentRecorded` per row;
//! - [`state`]: a contact's consent state folded from its `consent` stream (with the
//!   id of every event it rests on), its contact points and time zone from its
//!   `contact` stream, and the suppression list: exact at the moment of the decision,
//!   for the API and the dispatcher alike.

pub mod import;
pub mod ledger;
pub mod privacy;
pub mod state;

use crm_domain::consent::Channel;
use crm_domain::values::{Email, InvalidValue, Line, Phone};

/// Parses a contact point for its channel (an e-mail address, an E.164 number, a
/// postal line) and normalises it ([`normalize_point`]).
pub fn parse_point(channel: Channel, raw: &str) -> Result<String, InvalidValue> {
    let parsed = match channel {
        Channel::Email => Email::parse(raw).map(|e| e.to_string()),
        Channel::Sms | Channel::Whatsapp | Channel::Phone => {
            Phone::parse(raw).map(|p| p.as_str().to_owned())
        }
        Channel::Postal => Line::parse(raw).map(|l| l.to_string()),
    }?;
    Ok(normalize_point(channel, &parsed))
}

/// A contact point as records and the suppression list compare it: e-mail addresses in
/// lower case, numbers and postal lines as given (already parsed).
pub fn normalize_point(channel: Channel, point: &str) -> String {
    match channel {
        Channel::Email => point.trim().to_lowercase(),
        _ => point.trim().to_owned(),
    }
}
