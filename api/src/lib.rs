//! The HTTP API and the `crm` binary's commands.
//!
//! This crate owns the edge: authentication (JWT, bcrypt), parsing requests into domain
//! commands, turning every error into one JSON shape with one status mapping
//! ([`error`]), request ids and spans, and process wiring ([`startup`]): the API server
//! plus, by default, the relay and the projectors in the same process.

pub mod api_keys;
pub mod auth;
pub mod cli;
pub mod config;
pub mod context;
pub mod error;
pub mod mail;
pub mod openapi;
pub mod ratelimit;
pub mod routes;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod totp;
pub mod visibility;
