//! Consent: its vocabulary, and the one send gate every outbound message passes
//! ([`gate::decide`]).
//!
//! Issue 12 builds on this: the consent commands and events (per contact × channel ×
//! purpose, optionally one contact point, each with its ISO/IEC TS 27560-shaped proof),
//! the purposes registry, the organisation's privacy settings, and the read models that
//! load a [`gate::ConsentState`]. The gate itself is pure: the caller loads the state,
//! the gate decides, and the decision (with its reason code and the events it relied
//! on) becomes an event.

/// Serde for a string value object that is parsed, never trusted: it deserialises
/// through `$t::parse` (`#[serde(try_from = "String", into = "String")]` on the type)
/// and serialises as its string.
macro_rules! parsed_string {
    ($t:ident) => {
        impl TryFrom<String> for $t {
            type Error = $crate::values::InvalidValue;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(&s)
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> Self {
                v.0
            }
        }
    };
}

pub mod gate;
pub mod ledger;
pub mod privacy;
pub mod proof;

use serde::{Deserialize, Serialize};

use crate::values::InvalidValue;

/// A way of reaching a contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Sms,
    Whatsapp,
    Phone,
    Postal,
}

impl Channel {
    pub const ALL: [Channel; 5] = [
        Channel::Email,
        Channel::Sms,
        Channel::Whatsapp,
        Channel::Phone,
        Channel::Postal,
    ];

    /// Its name on the wire, in stream ids and in tables (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
            Channel::Phone => "phone",
            Channel::Postal => "postal",
        }
    }

    /// The channel named `name` (as [`Channel::name`] spells it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The contact field whose value the channel reaches (field-level permissions of
    /// a contact point follow it).
    pub fn contact_field(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms | Channel::Whatsapp | Channel::Phone => "phone",
            Channel::Postal => "address",
        }
    }

    /// Channels that reach a person at a moment of the day (quiet hours apply).
    pub fn is_real_time(self) -> bool {
        matches!(self, Channel::Sms | Channel::Phone)
    }
}

/// The lawful basis of a processing purpose (GDPR Art. 6(1) (a)–(f)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LawfulBasis {
    Consent,
    Contract,
    LegalObligation,
    VitalInterests,
    PublicTask,
    LegitimateInterests,
}

/// Where a consent record's state stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentStatus {
    Granted,
    PendingConfirmation,
    Withdrawn,
    Denied,
    Expired,
}

/// An organisation's purpose key: `marketing`, `service`, `research`, … (lowercase
/// ASCII letters, digits, `_` and `-`, 1 to 64 characters, starting with a letter).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PurposeKey(String);

impl PurposeKey {
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        let ok = (1..=64).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidValue(
                "a purpose key is 1 to 64 lowercase letters, digits, `_` or `-`, starting with a letter"
                    .into(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

parsed_string!(PurposeKey);

impl std::fmt::Display for PurposeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the organisation's privacy law works for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// Opt-in: a purpose whose basis is consent needs a granted record; nothing implied.
    Gdpr,
    /// Opt-out: allowed unless the contact opted out.
    Ccpa,
}

/// A processing purpose of the organisation's registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purpose {
    pub key: PurposeKey,
    pub default_basis: LawfulBasis,
    /// The channels messages for this purpose may use.
    pub channels: Vec<Channel>,
    /// Retired purposes keep their history and send nothing.
    pub retired: bool,
    /// Whether it sells or shares personal data (CCPA): a do-not-sell/share opt-out
    /// refuses it.
    pub sells_or_shares: bool,
    /// Whether its messages may still go to a contact whose processing is restricted
    /// (GDPR Art. 18 allows what the law requires, say a contract's notices).
    #[serde(default)]
    pub allowed_when_restricted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_their_serde_names_and_parse_back() {
        for c in Channel::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
            assert_eq!(Channel::parse(c.name()), Some(c));
        }
        assert_eq!(Channel::parse("fax"), None);
    }
}
