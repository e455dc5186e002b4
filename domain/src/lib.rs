//! The CRM's domain: aggregates, commands, events, value objects and domain errors.
//!
//! This crate owns the rules and nothing else: aggregates only decide (`handle`) and
//! evolve (`apply`); they never do I/O. Input is parsed into the value objects in
//! [`values`] at the edge, so a command that reaches an aggregate is already well-formed.
//!
//! Invariants kept here:
//! - every event is named in the past tense and carries an explicit type and version;
//! - every event that carries personal data names where it sits ([`PersonalData`]), so
//!   the event store can encrypt exactly those fields and erasure can shred them.

pub mod access;
pub mod ai;
pub mod api_key;
pub mod carrier;
pub mod consent;
pub mod contact;
pub mod credential;
pub mod message;
pub mod metadata;
pub mod organization;
pub mod personal;
pub mod portal;
pub mod public_events;
pub mod role;
pub mod user;
pub mod values;
pub mod webhook;

pub use personal::PersonalData;
