//! The per-stream hash chain: `hash = SHA-256(prev_hash ‖ canonical bytes of the event)`.
//!
//! The canonical bytes are the JSON of the stored fields with object keys sorted, so
//! the chain covers what is stored (ciphertext where a field is encrypted): destroying a
//! data key never breaks verification, while any change to a stored event does.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The stored fields an event's hash covers.
pub struct HashedFields<'a> {
    pub event_id: &'a Uuid,
    pub org_id: &'a Uuid,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub payload: &'a Value,
    pub metadata: &'a Value,
}

fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&m[k]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

fn canonical_bytes(v: &Value) -> Vec<u8> {
    // Keys are inserted in sorted order; serde_json keeps insertion order or sorts, and
    // both give the same bytes here.
    serde_json::to_vec(&canonical(v)).expect("JSON values always serialize")
}

/// Computes the hash of an event given the previous hash in its stream.
pub fn event_hash(prev_hash: Option<&[u8]>, f: &HashedFields<'_>) -> [u8; 32] {
    let body = serde_json::json!({
        "event_id": f.event_id,
        "org_id": f.org_id,
        "aggregate_type": f.aggregate_type,
        "aggregate_id": f.aggregate_id,
        "sequence": f.sequence,
        "event_type": f.event_type,
        "event_version": f.event_version,
        "payload": f.payload,
        "metadata": f.metadata,
    });
    let mut h = Sha256::new();
    h.update(prev_hash.unwrap_or(&[]));
    h.update(canonical_bytes(&body));
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_content_and_chain_but_not_key_order() {
        let id = Uuid::nil();
        let p1 = serde_json::json!({"a": 1, "b": {"x": 1, "y": 2}});
        let p2: Value = serde_json::from_str(r#"{"b": {"y": 2, "x": 1}, "a": 1}"#).unwrap();
        let m = serde_json::json!({});
        let f = |p| HashedFields {
            event_id: &id,
            org_id: &id,
            aggregate_type: "contact",
            aggregate_id: "c",
            sequence: 1,
            event_type: "E",
            event_version: "1",
            payload: p,
            metadata: &m,
        };
        assert_eq!(event_hash(None, &f(&p1)), event_hash(None, &f(&p2)));
        assert_ne!(event_hash(None, &f(&p1)), event_hash(Some(&[1]), &f(&p1)));
        let p3 = serde_json::json!({"a": 2, "b": {"x": 1, "y": 2}});
        assert_ne!(event_hash(None, &f(&p1)), event_hash(None, &f(&p3)));
    }
}
