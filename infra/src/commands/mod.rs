//! Commands: the only way events enter the store.
//!
//! - [`executor`]: loads an aggregate (snapshot and later events, decrypted), lets it
//!   decide, encrypts the personal members of what it decided, and appends it in one
//!   commit, optionally with an *effect* run in the same transaction;
//! - [`unit`]: several commands, on several streams, decided in memory one after the
//!   other and committed together, all or none, in one group-committed statement (an
//!   AI action proposed, run and recorded in one request);
//! - [`hooks`]: post-commit hooks, through which caches and waiting workers of a process
//!   hear of what committed; the executor itself knows none of them.
//!
//! Invariants: every append checks the stream's version (a stale or racing command is a
//! conflict, never a lost update); a command's events commit together or not at all,
//! with its effect and a new subject's data key; nothing personal reaches the store in
//! clear; the aggregates themselves stay pure (no I/O in `handle`); every hook has seen
//! a command before the executor returns it.

pub mod executor;
pub mod hooks;
pub mod unit;
