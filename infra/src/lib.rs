//! Infrastructure: everything that talks to PostgreSQL or NATS.
//!
//! This crate owns:
//! - the event store ([`event_store`]): one transaction per command appends the events,
//!   checks the expected stream version and links the per-stream SHA-256 hash chain;
//! - field encryption of personal data ([`crypto`]) under per-subject data keys;
//! - the command executor ([`commands`]) that runs cqrs-es aggregates against the store;
//! - the relay ([`relay`]) that publishes committed events to JetStream in commit order;
//! - the projector runtime ([`projector`]), the read-model SQL ([`read_models`]) and
//!   rebuilds ([`rebuild`]);
//! - hash-chain verification ([`verify`]), metrics and settings.
//!
//! Invariants: the events table is append-only; nothing personal is written to it or to
//! NATS in clear; a projection's read model and checkpoint move in one transaction.

pub mod access_cache;
pub mod access_history;
pub mod accounts;
pub mod api_keys;
pub mod auth_tokens;
pub mod bus;
pub mod checkpoint;
pub mod commands;
pub mod crypto;
pub mod db;
pub mod event_store;
pub mod group_commit;
pub mod hash_chain;
pub mod metrics;
pub mod portal;
pub mod projector;
pub mod read_models;
pub mod rebuild;
pub mod relay;
pub mod settings;
pub mod verify;
