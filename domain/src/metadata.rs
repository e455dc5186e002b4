//! Who did something, from where, and why: carried by every event.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The kind of actor behind a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    User,
    ApiKey,
    Portal,
    AiAgent,
    System,
}

impl PrincipalKind {
    /// Its wire name (`user`, `api_key`, `portal`, `ai_agent`, `system`), as the read
    /// models and the API spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ApiKey => "api_key",
            Self::Portal => "portal",
            Self::AiAgent => "ai_agent",
            Self::System => "system",
        }
    }
}

/// An authenticated actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub kind: PrincipalKind,
    pub id: String,
}

impl Principal {
    pub fn system(name: &str) -> Self {
        Self {
            kind: PrincipalKind::System,
            id: name.to_owned(),
        }
    }
}

/// Metadata stored with every event. `ip` and `user_agent` are personal data: the event
/// store encrypts them like payload fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub org_id: Uuid,
    pub principal: Principal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<Principal>,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

impl EventMetadata {
    /// Metadata for work started by an operator or the system itself (CLI, bootstrap).
    pub fn system(org_id: Uuid, name: &str) -> Self {
        Self {
            org_id,
            principal: Principal::system(name),
            on_behalf_of: None,
            ip: None,
            user_agent: None,
            request_id: None,
            correlation_id: None,
            causation_id: None,
            occurred_at: Utc::now(),
        }
    }
}

/// Keys of [`EventMetadata`] that hold personal data.
pub const PERSONAL_METADATA_FIELDS: &[&str] = &["ip", "user_agent"];

#[cfg(test)]
mod kind_names {
    use super::PrincipalKind as K;

    #[test]
    fn a_kinds_name_is_its_serde_name() {
        for k in [K::User, K::ApiKey, K::Portal, K::AiAgent, K::System] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }
}
