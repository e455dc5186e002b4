//! Access: who may do what, and how they prove who they are.
//!
//! - [`accounts`]: organisations (modules, 2FA requirement), staff users (role, active,
//!   token generation, credentials, TOTP) and custom roles; [`accounts::Access`], what
//!   one user may do now;
//! - [`api_keys`]: keys issued and revoked by command, looked up by digest;
//! - [`portal`]: client-portal accounts of contacts;
//! - [`auth_tokens`]: single-use mailed tokens (magic links, resets, invitations);
//! - [`cache`]: the per-process cache of [`accounts::Access`] and its invalidation;
//! - [`history`]: who could read a field at a moment, folded from the events alone.
//!
//! Invariants: the current access state (`credentials`, `organizations`, `roles`,
//! `api_keys`, `portal_accounts`) is written by the effect of the very transaction
//! that appends its events (an effect of `Executor::execute_with`), never by a
//! projector: authorisation is never behind the events and a crash cannot leave one
//! without the other. Every such command runs through
//! [`cache::execute_access_change`], whose transaction also sends
//! `NOTIFY crm_access, '<org id>'`, so every process forgets the organisation's cached
//! access when (and only if) it commits; the process that ran it has already forgotten
//! it, before it answers, through the cache's post-commit hook.
//! Secrets are kept only as digests (keys, mailed tokens), bcrypt (passwords) or
//! sealed under the user's data key (TOTP seeds).

pub mod accounts;
pub mod api_keys;
pub mod auth_tokens;
pub mod cache;
pub mod history;
pub mod portal;
