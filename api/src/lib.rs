//! The HTTP API and the `crm` binary's commands.
//!
//! This crate owns the edge ([`edge`]: request context, rate limits, CORS, the
//! dispatcher that serves the route table), authentication and authorisation
//! ([`auth`]), the operations ([`routes`], one declaration each in `routes::table`, from
//! which the OpenAPI document ([`openapi`]) is generated), parsing requests into domain
//! commands, turning every error into one JSON shape with one status mapping
//! ([`error`]), the MCP endpoint for AI agents ([`mcp`], tools over the same
//! operations), and process wiring ([`startup`]): the API server plus, by default, the
//! relay and the projectors in the same process.

pub mod auth;
pub mod cli;
pub mod config;
pub mod edge;
pub mod error;
pub mod mail;
pub mod mcp;
pub mod openapi;
pub mod routes;
pub mod startup;
pub mod state;
pub mod telemetry;
