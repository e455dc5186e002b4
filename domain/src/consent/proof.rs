//! What a consent change carries as its proof, shaped after ISO/IEC TS 27560 consent
//! records: the lawful basis, how and where it was captured, which notice was shown
//! (identifier, version, SHA-256 of the text), in which language and under which
//! jurisdiction, and until when it holds. Who, from where (IP, user agent) and when
//! are the event's metadata, as for every event.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::LawfulBasis;
use crate::values::{InvalidValue, Line};

/// How a consent change was captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureSource {
    Form,
    Import,
    Api,
    PreferenceCenter,
    Portal,
    Agent,
    DoubleOptIn,
    /// A one-click unsubscribe link (RFC 8058) in a message.
    UnsubscribeLink,
}

impl CaptureSource {
    pub const ALL: [CaptureSource; 8] = [
        Self::Form,
        Self::Import,
        Self::Api,
        Self::PreferenceCenter,
        Self::Portal,
        Self::Agent,
        Self::DoubleOptIn,
        Self::UnsubscribeLink,
    ];
}

/// The SHA-256 of the notice text shown, as 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NoticeHash(String);

impl NoticeHash {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let s = input.trim().to_ascii_lowercase();
        if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Self(s))
        } else {
            Err(InvalidValue(
                "must be the SHA-256 of the notice text: 64 hexadecimal digits".into(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

parsed_string!(NoticeHash);

/// A BCP 47 language tag in its common form: a 2–3 letter language, then subtags of
/// 1–8 letters or digits (`en`, `de-CH`, `zh-Hant-TW`); at most 35 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LanguageTag(String);

impl LanguageTag {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let s = input.trim();
        let mut parts = s.split('-');
        let primary_ok = parts.next().is_some_and(|p| {
            (2..=3).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphabetic())
        });
        let rest_ok = parts
            .all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()));
        if s.len() <= 35 && primary_ok && rest_ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidValue(
                "must be a BCP 47 language tag such as `en` or `de-CH`".into(),
            ))
        }
    }
}

parsed_string!(LanguageTag);

/// Where the law that governs a record applies: an ISO 3166-1 alpha-2 country, an
/// ISO 3166-2 subdivision (`US-CA`), or `EU`. Upper case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Jurisdiction(String);

impl Jurisdiction {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let s = input.trim().to_ascii_uppercase();
        let (country, sub) = match s.split_once('-') {
            Some((c, sub)) => (c, Some(sub)),
            None => (s.as_str(), None),
        };
        let country_ok = country.len() == 2 && country.chars().all(|c| c.is_ascii_uppercase());
        let sub_ok = sub.is_none_or(|p| {
            (1..=3).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric())
        });
        if country_ok && sub_ok {
            Ok(Self(s))
        } else {
            Err(InvalidValue(
                "must be a country (`DE`), a subdivision (`US-CA`) or `EU`".into(),
            ))
        }
    }
}

parsed_string!(Jurisdiction);

/// The notice (privacy policy, consent text) shown when the choice was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub id: Line,
    pub version: Line,
    pub sha256: NoticeHash,
}

/// The proof a consent change carries (besides its event's metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentProof {
    pub lawful_basis: LawfulBasis,
    pub source: CaptureSource,
    /// Required in GDPR mode (the caller checks the organisation's mode).
    pub notice: Option<Notice>,
    pub language: Option<LanguageTag>,
    pub jurisdiction: Option<Jurisdiction>,
    /// A grant that holds until then.
    pub expires_at: Option<DateTime<Utc>>,
    /// The bulk import this change came from.
    pub import_id: Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_hashes_are_64_hex_digits_kept_lowercase() {
        let h = NoticeHash::parse(&"AB".repeat(32)).unwrap();
        assert_eq!(h.as_str(), "ab".repeat(32));
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
            assert!(NoticeHash::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn language_tags_in_their_common_form() {
        for ok in ["en", "de-CH", "zh-Hant-TW", "es-419", "gsw"] {
            assert!(LanguageTag::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "e",
            "english-but-far-too-long",
            "de_CH",
            "de--CH",
            "d3",
            "de-ÄÖ",
        ] {
            assert!(LanguageTag::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jurisdictions_are_countries_subdivisions_or_the_eu() {
        for (input, kept) in [
            ("de", "DE"),
            ("US-CA", "US-CA"),
            ("EU", "EU"),
            ("gb-sct", "GB-SCT"),
        ] {
            assert_eq!(String::from(Jurisdiction::parse(input).unwrap()), kept);
        }
        for bad in ["", "D", "DEU", "US-", "US-CALI", "1A"] {
            assert!(Jurisdiction::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_proof_round_trips_and_refuses_bad_members() {
        let proof = serde_json::json!({
            "lawful_basis": "consent", "source": "preference_center",
            "notice": {"id": "privacy-policy", "version": "2026-01", "sha256": "0".repeat(64)},
            "language": "de-CH", "jurisdiction": "EU", "expires_at": null, "import_id": null
        });
        let parsed: ConsentProof = serde_json::from_value(proof.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), proof);
        let mut bad = proof;
        bad["notice"]["sha256"] = "xyz".into();
        assert!(serde_json::from_value::<ConsentProof>(bad).is_err());
    }
}
