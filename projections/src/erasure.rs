//! Erasure receipts: one per erasure, from its tombstone (`ContactErased`). A receipt
//! holds no personal data: the contact's id (a pseudonym once its keys are gone), who
//! asked and when, the keys destroyed, the channels suppressed, and the tombstone's
//! hash, which `crm audit verify` checks in the contact stream's chain.

use chrono::{DateTime, Utc};
use crm_domain::contact::ContactEvent;
use crm_domain::metadata::EventMetadata;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Envelope;

/// The read models an erasure purges when it applies the tombstone (the others hold
/// only ciphertext under the destroyed keys, or no personal data at all).
pub const PURGING_READ_MODELS: [&str; 3] = ["contacts", "consent_state", "consent_log"];

/// Where the erased data also was, unreadable from the commit on: stored under the
/// destroyed keys, never in clear.
pub const SHREDDED: [&str; 5] = ["events", "snapshots", "jetstream", "messages", "ai_audit"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErasureReceipt {
    pub org_id: Uuid,
    pub request_id: Uuid,
    /// The contact's id: what links the receipt to the history, and to nothing else.
    pub subject_id: Uuid,
    pub source: String,
    pub requested_by_kind: String,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    /// When the tombstone (and the keys' destruction) committed.
    pub erased_at: DateTime<Utc>,
    pub keys_destroyed: Vec<String>,
    pub suppressed: Vec<String>,
    pub tombstone_event_id: Uuid,
    pub tombstone_position: i64,
    pub tombstone_hash: String,
}

/// The receipt of a tombstone (`None` for every other event).
pub fn receipt(
    env: &Envelope<'_>,
    event: &ContactEvent,
    meta: &EventMetadata,
    hash: &str,
) -> Option<ErasureReceipt> {
    let ContactEvent::ContactErased {
        request_id,
        source,
        keys_destroyed,
        suppressed,
    } = event
    else {
        return None;
    };
    Some(ErasureReceipt {
        org_id: env.org_id,
        request_id: *request_id,
        subject_id: env.aggregate_id.parse().unwrap_or_default(),
        source: source.name().to_owned(),
        requested_by_kind: meta.principal.kind.name().to_owned(),
        requested_by: meta.principal.id.clone(),
        requested_at: meta.occurred_at,
        erased_at: env.recorded_at,
        keys_destroyed: keys_destroyed.clone(),
        suppressed: suppressed.clone(),
        tombstone_event_id: env.event_id,
        tombstone_position: env.global_position,
        tombstone_hash: hash.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_domain::contact::RequestSource;

    #[test]
    fn only_a_tombstone_makes_a_receipt_and_it_names_no_one() {
        let org = Uuid::now_v7();
        let contact = Uuid::now_v7();
        let id = contact.to_string();
        let mut meta = EventMetadata::system(org, "retention");
        meta.ip = Some("203.0.113.7".into());
        let env = Envelope {
            event_id: Uuid::now_v7(),
            org_id: org,
            aggregate_type: "contact",
            aggregate_id: &id,
            event_type: "ContactErased",
            sequence: 9,
            global_position: 90,
            recorded_at: Utc::now(),
        };
        let erased = ContactEvent::ContactErased {
            request_id: Uuid::from_u128(7),
            source: RequestSource::Retention,
            keys_destroyed: vec![id.clone(), "m1".into()],
            suppressed: vec!["email".into()],
        };
        let r = receipt(&env, &erased, &meta, "ab12").unwrap();
        assert_eq!((r.subject_id, r.source.as_str()), (contact, "retention"));
        assert_eq!(
            (r.tombstone_position, r.tombstone_hash.as_str()),
            (90, "ab12")
        );
        assert_eq!(r.keys_destroyed.len(), 2);
        assert!(!serde_json::to_string(&r).unwrap().contains("203.0.113.7"));
        assert!(receipt(&env, &ContactEvent::ContactArchived {}, &meta, "x").is_none());
    }
}
