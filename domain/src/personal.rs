//! Where personal data sits inside an event's JSON payload, and whose erasure reaches it.

use serde::{Deserialize, Deserializer};
use uuid::Uuid;

/// Implemented by every event type: names the JSON objects of the serialized event
/// whose *direct members* are personal data (names, email, phone, address, free text).
///
/// The event store encrypts each member of those objects separately, under the data key
/// of the event's subject, before the event is stored or published; it decrypts them
/// again on the way back. Members of these objects are therefore never visible in the
/// events table nor on the message bus. Once the key is destroyed (erasure) each member
/// reads as `null`: a section's members must deserialize from `null`
/// ([`erased_or_default`] for those that are not `Option`s).
pub trait PersonalData {
    /// Top-level keys of the serialized event (after its enum tag is removed) whose
    /// values are objects holding personal data only.
    fn personal_sections(&self) -> &'static [&'static str];

    /// The contacts whose erasure must also destroy the data key of this event's
    /// subject, when this event is the one that creates that key: a message's
    /// recipient, the contacts an AI action touches. Their personal data then goes with
    /// the contact's, wherever it is stored (the contact's own streams use the
    /// contact's key and need none).
    fn key_owners(&self) -> Vec<Uuid> {
        Vec::new()
    }
}

/// Deserializes a personal member that reads `null` once its key was destroyed as its
/// type's default (an empty text, an empty map): an erased event stays readable.
pub fn erased_or_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
