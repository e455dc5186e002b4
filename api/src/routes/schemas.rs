//! Bodies several operations answer or take: a command's outcome, a token, a message,
//! and the RFC 3339 time of query parameters.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// What a command wrote.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "0193a1c2-7d1e-7c3a-9f00-2b5c1d9e8a11", "version": 2, "positions": [1041]}))]
pub struct Outcome {
    /// The record's id.
    pub id: String,
    /// The record's version after the command (pass it as `expected_version`).
    pub version: i64,
    /// Global positions of the events written, in order (empty when nothing changed):
    /// pass the last as `min_position` to read your write.
    pub positions: Vec<i64>,
}

impl From<&crm_infra::commands::executor::CommandOutcome> for Outcome {
    fn from(o: &crm_infra::commands::executor::CommandOutcome) -> Self {
        Self {
            id: o.id.clone(),
            version: o.version,
            positions: o.positions.clone(),
        }
    }
}

/// A bearer token.
#[derive(Debug, Serialize, ToSchema)]
pub struct Token {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// A sentence for a person.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    pub message: String,
}

impl Message {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// The id of a created record.
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    pub id: uuid::Uuid,
}

/// An RFC 3339 time in a query parameter (e.g. `2026-01-31T12:00:00Z`).
#[derive(Debug, Clone, Copy)]
pub struct Time(pub chrono::DateTime<chrono::Utc>);

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        chrono::DateTime::parse_from_rfc3339(&raw)
            .map(|t| Time(t.with_timezone(&chrono::Utc)))
            .map_err(|_| {
                serde::de::Error::custom("must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")
            })
    }
}
