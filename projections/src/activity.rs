//! The activity log: who did what to which entity, when. A projection of event metadata.

use chrono::{DateTime, Utc};
use crm_domain::metadata::EventMetadata;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Envelope;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityEntry {
    pub event_id: Uuid,
    pub org_id: Uuid,
    pub global_position: i64,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub actor_kind: String,
    pub actor_id: String,
    /// The event type, e.g. `ContactUpdated`; `credentials.decrypt` for every
    /// decryption of a stored secret ([`action_name`]).
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
}

/// Event types whose activity entries share one action name, whatever stream they
/// belong to: every decryption of a stored secret (an AI provider key, a carrier's
/// secret) reads `credentials.decrypt`, so one filter finds them all; the entity type
/// says whose secret it was.
pub const ACTION_NAMES: &[(&str, &str)] = &[
    ("CredentialDecrypted", "credentials.decrypt"),
    ("CarrierSecretDecrypted", "credentials.decrypt"),
];

/// The activity log's name of an event type's action: [`ACTION_NAMES`], else the event
/// type itself.
pub fn action_name(event_type: &str) -> &str {
    ACTION_NAMES
        .iter()
        .find(|(t, _)| *t == event_type)
        .map_or(event_type, |(_, name)| name)
}

/// The activity entry an event produces. Personal metadata (IP, user agent) is left out.
pub fn entry(env: &Envelope<'_>, meta: &EventMetadata) -> ActivityEntry {
    ActivityEntry {
        event_id: env.event_id,
        org_id: env.org_id,
        global_position: env.global_position,
        occurred_at: meta.occurred_at,
        recorded_at: env.recorded_at,
        actor_kind: meta.principal.kind.name().to_owned(),
        actor_id: meta.principal.id.clone(),
        action: action_name(env.event_type).to_owned(),
        entity_type: env.aggregate_type.to_owned(),
        entity_id: env.aggregate_id.to_owned(),
        request_id: meta.request_id.clone(),
        correlation_id: meta.correlation_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_actor_action_and_entity() {
        let org = Uuid::now_v7();
        let mut meta = EventMetadata::system(org, "cli");
        meta.ip = Some("203.0.113.9".into());
        let env = Envelope {
            event_id: Uuid::now_v7(),
            org_id: org,
            aggregate_type: "contact",
            aggregate_id: "c1",
            event_type: "ContactCreated",
            sequence: 1,
            global_position: 7,
            recorded_at: Utc::now(),
        };
        let e = entry(&env, &meta);
        assert_eq!(
            (e.actor_kind.as_str(), e.actor_id.as_str()),
            ("system", "cli")
        );
        assert_eq!(
            (e.action.as_str(), e.entity_id.as_str()),
            ("ContactCreated", "c1")
        );
        assert!(!serde_json::to_string(&e).unwrap().contains("203.0.113.9"));
    }

    #[test]
    fn every_decryption_reads_credentials_decrypt() {
        assert_eq!(action_name("CredentialDecrypted"), "credentials.decrypt");
        assert_eq!(action_name("CarrierSecretDecrypted"), "credentials.decrypt");
        assert_eq!(action_name("CredentialRotated"), "CredentialRotated");
        assert_eq!(action_name("ContactCreated"), "ContactCreated");
    }
}
