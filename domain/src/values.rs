//! Value objects: input becomes one of these at the edge or is rejected with a reason.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a value was rejected; the API turns it into a field error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

fn invalid(msg: impl Into<String>) -> InvalidValue {
    InvalidValue(msg.into())
}

/// A trimmed, non-empty line of text without control characters, at most `MAX` chars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Text<const MAX: usize>(String);

impl<const MAX: usize> Text<MAX> {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        // Control characters are refused anywhere, also where trimming would drop them
        // (a vertical tab is white space): the document's pattern says so.
        if input.chars().any(|c| c.is_control()) {
            return Err(invalid("must not contain control characters"));
        }
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if trimmed.chars().count() > MAX {
            return Err(invalid(format!("must be at most {MAX} characters")));
        }
        Ok(Self(trimmed.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> fmt::Display for Text<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IANA time zone (`Europe/Berlin`, `America/New_York`, `UTC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeZone(pub chrono_tz::Tz);

impl TimeZone {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        input
            .trim()
            .parse::<chrono_tz::Tz>()
            .map(Self)
            .map_err(|_| invalid("must be an IANA time zone such as `Europe/Berlin`"))
    }
}

impl TryFrom<String> for TimeZone {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<TimeZone> for String {
    fn from(v: TimeZone) -> Self {
        v.0.name().to_owned()
    }
}

/// A personal or organisation name.
pub type Name = Text<200>;
/// A short free-text field (company, job title, address line, ...).
pub type Line = Text<300>;

/// An email address, lower-cased domain, checked for a plausible shape (RFC 5321 lengths).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let s = input.trim();
        if s.len() > 254 {
            return Err(invalid("must be at most 254 characters"));
        }
        let (local, domain) = s
            .rsplit_once('@')
            .ok_or_else(|| invalid("must be an email address like name@example.com"))?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
        let labels: Vec<&str> = domain.split('.').collect();
        let domain_ok = labels.len() >= 2
            && labels.iter().all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !local_ok || !domain_ok {
            return Err(invalid("must be an email address like name@example.com"));
        }
        Ok(Self(format!("{local}@{}", domain.to_ascii_lowercase())))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A phone number in E.164 form: `+` then 8 to 15 digits, the first not 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Phone(String);

impl Phone {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let s = input.trim();
        let digits = s
            .strip_prefix('+')
            .ok_or_else(|| invalid("must be in E.164 form, e.g. +14155550123"))?;
        let ok = (8..=15).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
            && !digits.starts_with('0');
        if !ok {
            return Err(invalid("must be in E.164 form, e.g. +14155550123"));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An ISO 3166-1 alpha-2 country code, upper case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CountryCode(String);

impl CountryCode {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let s = input.trim();
        if s.len() == 2 && s.chars().all(|c| c.is_ascii_alphabetic()) {
            Ok(Self(s.to_ascii_uppercase()))
        } else {
            Err(invalid("must be a two-letter ISO 3166-1 country code"))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A postal address; every part optional, at least one present.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line1: Option<Line>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<Line>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<Line>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Line>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<Text<20>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<CountryCode>,
}

/// Key of a custom field: 1 to 64 of `a-z 0-9 _`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CustomFieldKey(String);

impl CustomFieldKey {
    pub fn parse(input: &str) -> Result<Self, InvalidValue> {
        let ok = !input.is_empty()
            && input.len() <= 64
            && input.starts_with(|c: char| c.is_ascii_lowercase())
            && input
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(Self(input.to_owned()))
        } else {
            Err(invalid(
                "custom field keys are 1-64 characters of a-z, 0-9 and _, starting with a letter",
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Value of a custom field: a string (at most 2000 chars), a number, a boolean or null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CustomFieldValue {
    Bool(bool),
    Number(serde_json::Number),
    Text(String),
}

impl CustomFieldValue {
    pub fn parse(input: &serde_json::Value) -> Result<Self, InvalidValue> {
        match input {
            serde_json::Value::Bool(b) => Ok(Self::Bool(*b)),
            serde_json::Value::Number(n) => Ok(Self::Number(n.clone())),
            serde_json::Value::String(s) if s.chars().count() > 2000 => {
                Err(invalid("must be at most 2000 characters"))
            }
            // Free text may span lines; other control characters (NUL above all, which
            // PostgreSQL's jsonb cannot hold) are refused.
            serde_json::Value::String(s)
                if s.chars()
                    .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) =>
            {
                Err(invalid(
                    "must not contain control characters other than line breaks and tabs",
                ))
            }
            serde_json::Value::String(s) => Ok(Self::Text(s.clone())),
            _ => Err(invalid("must be a string, a number or a boolean")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_text_may_span_lines_but_holds_no_other_control_character() {
        let text = |s: &str| CustomFieldValue::parse(&serde_json::Value::String(s.into()));
        assert!(text("line one\nline two\r\n\tindented").is_ok());
        for bad in ["a\u{0}b", "\u{7}", "x\u{1b}[31m", "\u{85}"] {
            assert!(text(bad).is_err(), "{bad:?} accepted");
        }
        assert!(text(&"x".repeat(2000)).is_ok());
        assert!(text(&"x".repeat(2001)).is_err());
    }

    #[test]
    fn email_is_normalised_and_checked() {
        assert_eq!(
            Email::parse(" Ada@Example.COM ").unwrap().as_str(),
            "Ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a..b@example.com",
            "ada@-x.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn phone_must_be_e164() {
        assert!(Phone::parse("+14155550123").is_ok());
        for bad in [
            "14155550123",
            "+0123456789",
            "+1-415-555",
            "+1234567",
            "+1234567890123456",
        ] {
            assert!(Phone::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn text_rejects_empty_long_and_control() {
        assert!(Name::parse("  ").is_err());
        assert!(Name::parse(&"x".repeat(201)).is_err());
        assert!(Name::parse("a\u{0}b").is_err());
        assert_eq!(Name::parse(" Ada ").unwrap().as_str(), "Ada");
    }

    #[test]
    fn custom_keys_and_values() {
        assert!(CustomFieldKey::parse("tier_2").is_ok());
        assert!(CustomFieldKey::parse("Tier").is_err());
        assert!(CustomFieldKey::parse("2tier").is_err());
        assert!(CustomFieldValue::parse(&serde_json::json!({"a": 1})).is_err());
        assert!(CustomFieldValue::parse(&serde_json::json!("gold")).is_ok());
    }
}
