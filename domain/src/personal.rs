//! Where personal data sits inside an event's JSON payload.

/// Implemented by every event type: names the JSON objects of the serialized event
/// whose *direct members* are personal data (names, email, phone, address, free text).
///
/// The event store encrypts each member of those objects separately, under the data key
/// of the event's subject, before the event is stored or published; it decrypts them
/// again on the way back. Members of these objects are therefore never visible in the
/// events table nor on the message bus.
pub trait PersonalData {
    /// Top-level keys of the serialized event (after its enum tag is removed) whose
    /// values are objects holding personal data only.
    fn personal_sections(&self) -> &'static [&'static str];
}
