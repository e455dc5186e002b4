//! An organisation's AI provider credential ("bring your own key"): one stream per
//! credential, stream type `credential`, id = a UUID.
//!
//! Invariants kept here:
//! - the secret (an API key) never appears in an event: events carry the provider, the
//!   label, the base URL and the secret's last four characters only (the sealed secret
//!   lives in the vault, `vault_secrets`, written in the same transaction);
//! - every use of the secret is on the record: [`CredentialEvent::CredentialDecrypted`]
//!   with its purpose (who decrypted is the event's principal), appended before the
//!   secret is decrypted;
//! - a deleted credential stays deleted: it cannot be rotated, decrypted or created
//!   again under the same id.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::PersonalData;

/// Whose API the key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Openai,
    Anthropic,
    AzureOpenai,
    Google,
    Other,
}

impl Provider {
    pub const ALL: [Provider; 5] = [
        Self::Openai,
        Self::Anthropic,
        Self::AzureOpenai,
        Self::Google,
        Self::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::AzureOpenai => "azure_openai",
            Self::Google => "google",
            Self::Other => "other",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The API's base URL when none is given; `None`: the provider has no single one
    /// (an Azure resource, any other service), so a base URL is required.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Self::Openai => Some("https://api.openai.com/v1"),
            Self::Anthropic => Some("https://api.anthropic.com/v1"),
            Self::Google => Some("https://generativelanguage.googleapis.com/v1beta/openai"),
            Self::AzureOpenai | Self::Other => None,
        }
    }
}

/// What a person calls the credential ("Production OpenAI"): 1 to 100 characters,
/// without control characters, trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CredentialLabel(String);

impl CredentialLabel {
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let s = s.trim();
        if s.is_empty() || s.chars().count() > 100 {
            return Err("must be 1 to 100 characters");
        }
        if s.chars().any(char::is_control) {
            return Err("must not hold control characters");
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CredentialCommand {
    /// A new credential; its secret is sealed into the vault by the same transaction.
    Create {
        provider: Provider,
        label: CredentialLabel,
        /// Checked at the edge (an http(s) URL).
        base_url: String,
        /// The last four characters of the secret (none for a secret shorter than 8).
        secret_last4: Option<String>,
    },
    /// A new secret replaces the old one (sealed by the same transaction).
    Rotate { secret_last4: Option<String> },
    /// The credential and its sealed secret are gone.
    Delete,
    /// The secret is about to be decrypted, for `purpose` (e.g. `verify`).
    RecordDecrypt { purpose: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CredentialEvent {
    CredentialCreated {
        provider: Provider,
        label: CredentialLabel,
        base_url: String,
        secret_last4: Option<String>,
    },
    CredentialRotated {
        secret_last4: Option<String>,
    },
    CredentialDeleted,
    /// Who decrypted is the event's principal (its metadata).
    CredentialDecrypted {
        purpose: String,
    },
}

impl DomainEvent for CredentialEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CredentialCreated { .. } => "CredentialCreated",
            Self::CredentialRotated { .. } => "CredentialRotated",
            Self::CredentialDeleted => "CredentialDeleted",
            Self::CredentialDecrypted { .. } => "CredentialDecrypted",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for CredentialEvent {
    /// An organisation's provider settings: nothing about a person.
    fn personal_sections(&self) -> &'static [&'static str] {
        &[]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("this credential already exists")]
    AlreadyExists,
    #[error("no such credential")]
    NotFound,
    #[error("a decryption needs a purpose of 1 to 64 lower-case letters, digits or _")]
    BadPurpose,
}

/// Where a credential stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CredentialStatus {
    #[default]
    New,
    Active,
    Deleted,
}

/// One AI provider credential of an organisation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Credential {
    pub status: CredentialStatus,
    pub provider: Option<Provider>,
    pub label: Option<CredentialLabel>,
    pub base_url: Option<String>,
    pub secret_last4: Option<String>,
}

fn purpose_ok(purpose: &str) -> bool {
    (1..=64).contains(&purpose.len())
        && purpose
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Aggregate for Credential {
    const TYPE: &'static str = "credential";
    type Command = CredentialCommand;
    type Event = CredentialEvent;
    type Error = CredentialError;
    type Services = ();

    async fn handle(
        &mut self,
        command: CredentialCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CredentialError> {
        let event = match command {
            CredentialCommand::Create {
                provider,
                label,
                base_url,
                secret_last4,
            } => {
                if self.status != CredentialStatus::New {
                    return Err(CredentialError::AlreadyExists);
                }
                CredentialEvent::CredentialCreated {
                    provider,
                    label,
                    base_url,
                    secret_last4,
                }
            }
            CredentialCommand::Rotate { secret_last4 } => {
                self.require_active()?;
                CredentialEvent::CredentialRotated { secret_last4 }
            }
            CredentialCommand::Delete => {
                self.require_active()?;
                CredentialEvent::CredentialDeleted
            }
            CredentialCommand::RecordDecrypt { purpose } => {
                self.require_active()?;
                if !purpose_ok(&purpose) {
                    return Err(CredentialError::BadPurpose);
                }
                CredentialEvent::CredentialDecrypted { purpose }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: CredentialEvent) {
        match event {
            CredentialEvent::CredentialCreated {
                provider,
                label,
                base_url,
                secret_last4,
            } => {
                self.status = CredentialStatus::Active;
                self.provider = Some(provider);
                self.label = Some(label);
                self.base_url = Some(base_url);
                self.secret_last4 = secret_last4;
            }
            CredentialEvent::CredentialRotated { secret_last4 } => {
                self.secret_last4 = secret_last4;
            }
            CredentialEvent::CredentialDeleted => {
                self.status = CredentialStatus::Deleted;
                self.secret_last4 = None;
            }
            CredentialEvent::CredentialDecrypted { .. } => {}
        }
    }
}

impl Credential {
    /// Created and not deleted: otherwise it reads as absent.
    fn require_active(&self) -> Result<(), CredentialError> {
        match self.status {
            CredentialStatus::Active => Ok(()),
            CredentialStatus::New | CredentialStatus::Deleted => Err(CredentialError::NotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn created() -> CredentialEvent {
        CredentialEvent::CredentialCreated {
            provider: Provider::Openai,
            label: CredentialLabel::parse("Production").unwrap(),
            base_url: "https://api.openai.com/v1".into(),
            secret_last4: Some("wxyz".into()),
        }
    }

    fn create() -> CredentialCommand {
        CredentialCommand::Create {
            provider: Provider::Openai,
            label: CredentialLabel::parse(" Production ").unwrap(),
            base_url: "https://api.openai.com/v1".into(),
            secret_last4: Some("wxyz".into()),
        }
    }

    #[test]
    fn create_a_credential_once() {
        TestFramework::<Credential>::with(())
            .given_no_previous_events()
            .when(create())
            .then_expect_events(vec![created()]);
        TestFramework::<Credential>::with(())
            .given(vec![created()])
            .when(create())
            .then_expect_error(CredentialError::AlreadyExists);
        TestFramework::<Credential>::with(())
            .given(vec![created(), CredentialEvent::CredentialDeleted])
            .when(create())
            .then_expect_error(CredentialError::AlreadyExists);
    }

    #[test]
    fn rotate_an_active_credential_only() {
        TestFramework::<Credential>::with(())
            .given(vec![created()])
            .when(CredentialCommand::Rotate {
                secret_last4: Some("abcd".into()),
            })
            .then_expect_events(vec![CredentialEvent::CredentialRotated {
                secret_last4: Some("abcd".into()),
            }]);
        for given in [vec![], vec![created(), CredentialEvent::CredentialDeleted]] {
            TestFramework::<Credential>::with(())
                .given(given)
                .when(CredentialCommand::Rotate { secret_last4: None })
                .then_expect_error(CredentialError::NotFound);
        }
    }

    #[test]
    fn delete_an_active_credential_once() {
        TestFramework::<Credential>::with(())
            .given(vec![created()])
            .when(CredentialCommand::Delete)
            .then_expect_events(vec![CredentialEvent::CredentialDeleted]);
        TestFramework::<Credential>::with(())
            .given(vec![created(), CredentialEvent::CredentialDeleted])
            .when(CredentialCommand::Delete)
            .then_expect_error(CredentialError::NotFound);
    }

    #[test]
    fn a_decryption_is_recorded_with_its_purpose_for_an_active_credential_only() {
        TestFramework::<Credential>::with(())
            .given(vec![created()])
            .when(CredentialCommand::RecordDecrypt {
                purpose: "verify".into(),
            })
            .then_expect_events(vec![CredentialEvent::CredentialDecrypted {
                purpose: "verify".into(),
            }]);
        TestFramework::<Credential>::with(())
            .given(vec![created()])
            .when(CredentialCommand::RecordDecrypt {
                purpose: "Verify!".into(),
            })
            .then_expect_error(CredentialError::BadPurpose);
        for given in [vec![], vec![created(), CredentialEvent::CredentialDeleted]] {
            TestFramework::<Credential>::with(())
                .given(given)
                .when(CredentialCommand::RecordDecrypt {
                    purpose: "verify".into(),
                })
                .then_expect_error(CredentialError::NotFound);
        }
    }

    #[test]
    fn events_never_hold_more_than_the_last_four() {
        let json = serde_json::to_string(&created()).unwrap();
        assert_eq!(
            json,
            r#"{"CredentialCreated":{"provider":"openai","label":"Production","base_url":"https://api.openai.com/v1","secret_last4":"wxyz"}}"#
        );
    }

    #[test]
    fn providers_and_labels_are_parsed() {
        for p in Provider::ALL {
            assert_eq!(Provider::parse(p.name()), Some(p));
            assert_eq!(
                serde_json::to_value(p).unwrap(),
                serde_json::json!(p.name())
            );
        }
        assert_eq!(Provider::parse("azure"), None);
        assert_eq!(CredentialLabel::parse("  a ").unwrap().as_str(), "a");
        assert!(CredentialLabel::parse("   ").is_err());
        assert!(CredentialLabel::parse(&"x".repeat(101)).is_err());
        assert!(CredentialLabel::parse("a\nb").is_err());
    }
}
