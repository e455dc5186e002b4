//! Dispatch: what happens to an outbound message (email, SMS, WhatsApp) after the send
//! gate has allowed it. This folder holds the dispatch worker, which hands each message
//! to a carrier at least once, and the carriers themselves ([`carriers`]: the SMTP,
//! Twilio-shaped and spool adapters, and each organisation's encrypted carrier
//! credentials).
//!
//! Invariant: every hand-over of one message carries ONE idempotency key, the message's
//! id, however often it is retried or the process crashes, so a carrier that
//! de-duplicates sees the message once.

pub mod carriers;
pub mod worker;
