//! An organisation's webhook endpoint: one stream per endpoint, stream type
//! `webhook_endpoint`, id = a UUID.
//!
//! Invariants kept here:
//! - the signing secret never appears in an event: events carry its version and last
//!   four characters only (the sealed secret lives in the vault, written in the same
//!   transaction); every decryption of it is on the record
//!   ([`WebhookEvent::WebhookSecretDecrypted`], with its purpose);
//! - a rotation keeps the previous secret valid until a stated time, so receivers can
//!   switch without losing a delivery: deliveries are signed with both meanwhile;
//! - the URL is an `http(s)` URL with a host and without credentials or fragment
//!   ([`EndpointUrl`]); whether its address may be reached is the network policy's
//!   decision at every attempt (`crm_infra::webhooks::net`), not the domain's;
//! - the event types are public types of the catalogue (`crate::public_events`), at
//!   least one, each once;
//! - an automatic disable records the run of failures that caused it, and only an
//!   enabled endpoint is disabled; a deleted endpoint stays deleted.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::access::RoleRef;
use crate::PersonalData;

/// Where deliveries go: an `http` or `https` URL with a host, without a user, password
/// or fragment, at most 2,048 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointUrl(String);

impl EndpointUrl {
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let bad = "must be an http(s) URL with a host, without user, password or fragment (at most 2048 characters)";
        if s.len() > 2048 {
            return Err(bad);
        }
        let url = url::Url::parse(s).map_err(|_| bad)?;
        let fine = matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some_and(|h| !h.is_empty())
            && url.username().is_empty()
            && url.password().is_none()
            && url.fragment().is_none();
        if !fine {
            return Err(bad);
        }
        Ok(Self(url.as_str().to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What an endpoint receives, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSettings {
    pub url: EndpointUrl,
    /// Public event types (`contact.created`…), each once.
    pub event_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The role whose permissions and field visibility shape the payloads.
    pub role: RoleRef,
    /// One delivery at a time, in event order: a message waits until every earlier
    /// one was delivered or given up.
    #[serde(default)]
    pub ordered: bool,
}

/// Parses the event types of an endpoint: public types of the catalogue, 1 to 64,
/// duplicates dropped; the first unknown one is named.
pub fn parse_event_types(given: &[String]) -> Result<Vec<String>, String> {
    if given.is_empty() || given.len() > 64 {
        return Err("must name 1 to 64 event types".into());
    }
    let mut out: Vec<String> = Vec::new();
    for t in given {
        if crate::public_events::public_entry(t).is_none() {
            return Err(format!(
                "`{}` is not an event type of the catalogue (docs/webhooks.md)",
                t.chars().take(64).collect::<String>()
            ));
        }
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    Ok(out)
}

/// A description: at most 200 characters without control characters, trimmed; empty
/// is none.
pub fn parse_description(s: Option<&str>) -> Result<Option<String>, &'static str> {
    let Some(s) = s.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if s.chars().count() > 200 || s.chars().any(char::is_control) {
        return Err("must be at most 200 characters without control characters");
    }
    Ok(Some(s.to_owned()))
}

/// What a replay re-sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scope", rename_all = "snake_case")]
pub enum Replay {
    /// One message, whatever became of it.
    Message { message_id: Uuid },
    /// Every message since a time that was not delivered (failed, or missed while the
    /// endpoint was disabled).
    Since { since: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq)]
pub enum WebhookCommand {
    Create {
        endpoint_id: Uuid,
        settings: EndpointSettings,
        secret_last4: Option<String>,
    },
    Update {
        settings: EndpointSettings,
    },
    RotateSecret {
        secret_last4: Option<String>,
        previous_valid_until: DateTime<Utc>,
    },
    Disable,
    AutoDisable {
        consecutive_failures: u32,
        failing_since: DateTime<Utc>,
    },
    Enable,
    Delete,
    Replay {
        replay: Replay,
    },
    RecordDecrypt {
        secret_version: u32,
        purpose: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WebhookEvent {
    WebhookEndpointCreated {
        endpoint_id: Uuid,
        settings: EndpointSettings,
        secret_last4: Option<String>,
    },
    WebhookEndpointUpdated {
        settings: EndpointSettings,
    },
    /// Secret version `secret_version` replaces the one before, which stays valid
    /// (deliveries are signed with both) until `previous_valid_until`.
    WebhookSecretRotated {
        secret_version: u32,
        secret_last4: Option<String>,
        previous_valid_until: DateTime<Utc>,
    },
    WebhookEndpointDisabled {},
    /// Disabled by the delivery worker after a run of failed attempts.
    WebhookEndpointAutoDisabled {
        consecutive_failures: u32,
        failing_since: DateTime<Utc>,
    },
    WebhookEndpointEnabled {},
    WebhookEndpointDeleted {},
    WebhookReplayRequested {
        replay: Replay,
    },
    WebhookSecretDecrypted {
        secret_version: u32,
        purpose: String,
    },
}

impl DomainEvent for WebhookEvent {
    fn event_type(&self) -> String {
        match self {
            Self::WebhookEndpointCreated { .. } => "WebhookEndpointCreated",
            Self::WebhookEndpointUpdated { .. } => "WebhookEndpointUpdated",
            Self::WebhookSecretRotated { .. } => "WebhookSecretRotated",
            Self::WebhookEndpointDisabled { .. } => "WebhookEndpointDisabled",
            Self::WebhookEndpointAutoDisabled { .. } => "WebhookEndpointAutoDisabled",
            Self::WebhookEndpointEnabled { .. } => "WebhookEndpointEnabled",
            Self::WebhookEndpointDeleted { .. } => "WebhookEndpointDeleted",
            Self::WebhookReplayRequested { .. } => "WebhookReplayRequested",
            Self::WebhookSecretDecrypted { .. } => "WebhookSecretDecrypted",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl PersonalData for WebhookEvent {
    fn personal_sections(&self) -> &'static [&'static str] {
        &[]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("this endpoint already exists")]
    AlreadyExists,
    #[error("no such webhook endpoint")]
    NotFound,
    #[error("the endpoint is already enabled")]
    AlreadyEnabled,
    #[error("the endpoint is already disabled")]
    AlreadyDisabled,
    #[error("the endpoint is disabled: enable it before replaying")]
    NotEnabled,
    #[error("a decryption needs a purpose of 1 to 64 lower-case letters, digits or _")]
    BadPurpose,
    #[error("no such secret version")]
    NoSuchSecret,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointStatus {
    #[default]
    New,
    Enabled,
    Disabled,
    AutoDisabled,
    Deleted,
}

impl EndpointStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::AutoDisabled => "auto_disabled",
            Self::Deleted => "deleted",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WebhookEndpoint {
    pub status: EndpointStatus,
    pub settings: Option<EndpointSettings>,
    pub secret_version: u32,
    pub secret_last4: Option<String>,
    pub previous_valid_until: Option<DateTime<Utc>>,
}

fn purpose_ok(purpose: &str) -> bool {
    (1..=64).contains(&purpose.len())
        && purpose
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Aggregate for WebhookEndpoint {
    const TYPE: &'static str = "webhook_endpoint";
    type Command = WebhookCommand;
    type Event = WebhookEvent;
    type Error = WebhookError;
    type Services = ();

    async fn handle(
        &mut self,
        command: WebhookCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), WebhookError> {
        use EndpointStatus as S;
        let event = match command {
            WebhookCommand::Create {
                endpoint_id,
                settings,
                secret_last4,
            } => {
                if self.status != S::New {
                    return Err(WebhookError::AlreadyExists);
                }
                WebhookEvent::WebhookEndpointCreated {
                    endpoint_id,
                    settings,
                    secret_last4,
                }
            }
            WebhookCommand::Update { settings } => {
                self.require_live()?;
                WebhookEvent::WebhookEndpointUpdated { settings }
            }
            WebhookCommand::RotateSecret {
                secret_last4,
                previous_valid_until,
            } => {
                self.require_live()?;
                WebhookEvent::WebhookSecretRotated {
                    secret_version: self.secret_version + 1,
                    secret_last4,
                    previous_valid_until,
                }
            }
            WebhookCommand::Disable => match self.status {
                S::Enabled => WebhookEvent::WebhookEndpointDisabled {},
                S::Disabled | S::AutoDisabled => return Err(WebhookError::AlreadyDisabled),
                S::New | S::Deleted => return Err(WebhookError::NotFound),
            },
            WebhookCommand::AutoDisable {
                consecutive_failures,
                failing_since,
            } => match self.status {
                S::Enabled => WebhookEvent::WebhookEndpointAutoDisabled {
                    consecutive_failures,
                    failing_since,
                },
                S::Disabled | S::AutoDisabled => return Err(WebhookError::AlreadyDisabled),
                S::New | S::Deleted => return Err(WebhookError::NotFound),
            },
            WebhookCommand::Enable => match self.status {
                S::Disabled | S::AutoDisabled => WebhookEvent::WebhookEndpointEnabled {},
                S::Enabled => return Err(WebhookError::AlreadyEnabled),
                S::New | S::Deleted => return Err(WebhookError::NotFound),
            },
            WebhookCommand::Delete => {
                self.require_live()?;
                WebhookEvent::WebhookEndpointDeleted {}
            }
            WebhookCommand::Replay { replay } => match self.status {
                S::Enabled => WebhookEvent::WebhookReplayRequested { replay },
                S::Disabled | S::AutoDisabled => return Err(WebhookError::NotEnabled),
                S::New | S::Deleted => return Err(WebhookError::NotFound),
            },
            WebhookCommand::RecordDecrypt {
                secret_version,
                purpose,
            } => {
                self.require_live()?;
                if !purpose_ok(&purpose) {
                    return Err(WebhookError::BadPurpose);
                }
                let previous_valid = secret_version + 1 == self.secret_version
                    && self.previous_valid_until.is_some();
                if secret_version != self.secret_version && !previous_valid {
                    return Err(WebhookError::NoSuchSecret);
                }
                WebhookEvent::WebhookSecretDecrypted {
                    secret_version,
                    purpose,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: WebhookEvent) {
        use EndpointStatus as S;
        match event {
            WebhookEvent::WebhookEndpointCreated {
                settings,
                secret_last4,
                ..
            } => {
                self.status = S::Enabled;
                self.settings = Some(settings);
                self.secret_version = 1;
                self.secret_last4 = secret_last4;
            }
            WebhookEvent::WebhookEndpointUpdated { settings } => self.settings = Some(settings),
            WebhookEvent::WebhookSecretRotated {
                secret_version,
                secret_last4,
                previous_valid_until,
            } => {
                self.secret_version = secret_version;
                self.secret_last4 = secret_last4;
                self.previous_valid_until = Some(previous_valid_until);
            }
            WebhookEvent::WebhookEndpointDisabled {} => self.status = S::Disabled,
            WebhookEvent::WebhookEndpointAutoDisabled { .. } => self.status = S::AutoDisabled,
            WebhookEvent::WebhookEndpointEnabled {} => self.status = S::Enabled,
            WebhookEvent::WebhookEndpointDeleted {} => {
                self.status = S::Deleted;
                self.secret_last4 = None;
            }
            WebhookEvent::WebhookReplayRequested { .. }
            | WebhookEvent::WebhookSecretDecrypted { .. } => {}
        }
    }
}

impl WebhookEndpoint {
    fn require_live(&self) -> Result<(), WebhookError> {
        match self.status {
            EndpointStatus::New | EndpointStatus::Deleted => Err(WebhookError::NotFound),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Role;
    use cqrs_es::test::TestFramework;

    fn settings() -> EndpointSettings {
        EndpointSettings {
            url: EndpointUrl::parse("https://hooks.example.com/crm").unwrap(),
            event_types: vec!["contact.created".into()],
            description: None,
            role: RoleRef::Builtin(Role::Viewer),
            ordered: false,
        }
    }

    fn created() -> WebhookEvent {
        WebhookEvent::WebhookEndpointCreated {
            endpoint_id: Uuid::nil(),
            settings: settings(),
            secret_last4: Some("abcd".into()),
        }
    }

    #[test]
    fn urls_are_http_with_a_host_and_no_credentials() {
        assert!(EndpointUrl::parse("https://hooks.example.com/a?b=c").is_ok());
        for bad in [
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "https://example.com/#frag",
            "not a url",
            "https://",
            "mailto:a@example.com",
        ] {
            assert!(EndpointUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn event_types_come_from_the_catalogue() {
        assert_eq!(
            parse_event_types(&["contact.created".into(), "contact.created".into()]).unwrap(),
            vec!["contact.created".to_owned()]
        );
        let err = parse_event_types(&["contact.exploded".into()]).unwrap_err();
        assert!(err.contains("contact.exploded"), "{err}");
        assert!(parse_event_types(&[]).is_err());
    }

    #[test]
    fn only_an_enabled_endpoint_is_auto_disabled_and_only_a_disabled_one_enabled() {
        let now = Utc::now();
        TestFramework::<WebhookEndpoint>::with(())
            .given(vec![created()])
            .when(WebhookCommand::AutoDisable {
                consecutive_failures: 5,
                failing_since: now,
            })
            .then_expect_events(vec![WebhookEvent::WebhookEndpointAutoDisabled {
                consecutive_failures: 5,
                failing_since: now,
            }]);
        TestFramework::<WebhookEndpoint>::with(())
            .given(vec![created(), WebhookEvent::WebhookEndpointDisabled {}])
            .when(WebhookCommand::AutoDisable {
                consecutive_failures: 5,
                failing_since: now,
            })
            .then_expect_error(WebhookError::AlreadyDisabled);
        TestFramework::<WebhookEndpoint>::with(())
            .given(vec![created()])
            .when(WebhookCommand::Enable)
            .then_expect_error(WebhookError::AlreadyEnabled);
        TestFramework::<WebhookEndpoint>::with(())
            .given(vec![created(), WebhookEvent::WebhookEndpointDeleted {}])
            .when(WebhookCommand::Enable)
            .then_expect_error(WebhookError::NotFound);
    }

    #[test]
    fn a_rotation_keeps_the_previous_secret_decryptable_during_its_grace() {
        let until = Utc::now();
        let rotated = WebhookEvent::WebhookSecretRotated {
            secret_version: 2,
            secret_last4: Some("efgh".into()),
            previous_valid_until: until,
        };
        TestFramework::<WebhookEndpoint>::with(())
            .given(vec![created()])
            .when(WebhookCommand::RotateSecret {
                secret_last4: Some("efgh".into()),
                previous_valid_until: until,
            })
            .then_expect_events(vec![rotated.clone()]);
        for version in [1, 2] {
            TestFramework::<WebhookEndpoint>::with(())
                .given(vec![created(), rotated.clone()])
                .when(WebhookCommand::RecordDecrypt {
                    secret_version: version,
                    purpose: "sign_deliveries".into(),
                })
                .then_expect_events(vec![WebhookEvent::WebhookSecretDecrypted {
                    secret_version: version,
                    purpose: "sign_deliveries".into(),
                }]);
        }
        TestFramework::<WebhookEndpoint>::with(())
            .given(vec![created(), rotated])
            .when(WebhookCommand::RecordDecrypt {
                secret_version: 3,
                purpose: "sign_deliveries".into(),
            })
            .then_expect_error(WebhookError::NoSuchSecret);
    }
}
