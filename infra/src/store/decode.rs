//! Events read back from the store with their personal data decrypted (or, for
//! readers that need none, merely parsed): what the executor folds into aggregates and
//! what projectors and rebuilds apply.

use deadpool_postgres::GenericClient;
use serde_json::Value;

use crm_domain::metadata::EventMetadata;

use crate::crypto::Crypto;
use crate::store::event_store::{StoreError, StoredEvent};

/// An event read back from the store with its personal data decrypted.
#[derive(Debug, Clone)]
pub struct DecodedEvent {
    /// The event as stored, without its payload and metadata (moved to the fields below).
    pub stored: StoredEvent,
    /// Decrypted payload (personal members whose key was destroyed are `null`).
    pub payload: Value,
    pub metadata: EventMetadata,
}

impl DecodedEvent {
    /// An event with its payload and metadata (decrypted, or left as they are), the
    /// metadata read into [`EventMetadata`].
    pub fn new(stored: StoredEvent, payload: Value, metadata: Value) -> Result<Self, StoreError> {
        let metadata = serde_json::from_value(metadata)
            .map_err(|e| StoreError::Corrupt(stored.global_position, e.to_string()))?;
        Ok(Self {
            stored,
            payload,
            metadata,
        })
    }

    pub fn typed<E: serde::de::DeserializeOwned>(&self) -> Result<E, StoreError> {
        E::deserialize(&self.payload)
            .map_err(|e| StoreError::Corrupt(self.stored.global_position, e.to_string()))
    }
}

/// Decrypts a stored event. The decrypted payload and metadata are moved out of
/// `stored` (which keeps the envelope, hashes and positions).
pub async fn decode(
    crypto: &Crypto,
    client: &impl GenericClient,
    mut stored: StoredEvent,
) -> Result<DecodedEvent, StoreError> {
    let mut payload = std::mem::take(&mut stored.payload);
    let mut metadata = std::mem::take(&mut stored.metadata);
    crypto
        .decrypt_event(
            client,
            &stored.org_id,
            &stored.aggregate_id,
            &mut payload,
            &mut metadata,
        )
        .await?;
    DecodedEvent::new(stored, payload, metadata)
}

/// Parses a stored event without decrypting anything: personal members stay ciphertext.
/// For consumers that read no personal data (e.g. the activity log).
pub fn decode_without_personal_data(mut stored: StoredEvent) -> Result<DecodedEvent, StoreError> {
    let payload = std::mem::take(&mut stored.payload);
    let metadata = std::mem::take(&mut stored.metadata);
    DecodedEvent::new(stored, payload, metadata)
}
