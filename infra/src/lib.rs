//! Infrastructure: everything that talks to PostgreSQL or NATS.
//!
//! A folder per concern; a feature of its own (consent, messages, dispatch, the vault,
//! AI actions, webhooks) gets a folder of its own beside these:
//! - [`store`]: the event store (append, read, group commit, hash chain, verification);
//! - [`commands`]: the command executor that runs cqrs-es aggregates against the store;
//! - [`feed`]: the relay to JetStream, the projector runtime, checkpoints, rebuilds;
//! - [`read_models`]: the read models' SQL and the queries the API runs;
//! - [`access`]: organisations, users, roles, API keys, the portal, mailed tokens, the
//!   access cache and field-access history;
//! - [`consent`]: privacy settings, consent commands and the gate's read path;
//! - [`crypto`]: field encryption of personal data under per-subject data keys;
//! - [`live`]: the live event stream's hub (one JetStream consumer fanned out to SSE
//!   clients, a ring of recent events, per-connection bounded buffers);
//! - [`receipts`]: consent receipts (JWS, EdDSA), their signing keys and the JWKS;
//! - [`vault`]: every secret kept for an organisation (AI provider keys, carrier
//!   secrets), sealed per value and bound to its row, decrypted only on the record;
//! - cross-cutting: the connection pool and migrations ([`db`]), batching of
//!   concurrent requests ([`batch`]), [`settings`], [`metrics`].
//!
//! Invariants: the events table is append-only; nothing personal is written to it or to
//! NATS in clear; a projection's read model and checkpoint move in one transaction.

pub mod access;
pub mod batch;
pub mod commands;
pub mod consent;
pub mod crypto;
pub mod db;
pub mod dispatch;
pub mod feed;
pub mod live;
pub mod metrics;
pub mod read_models;
pub mod receipts;
pub mod rights;
pub mod settings;
pub mod store;
pub mod vault;
pub mod webhooks;
