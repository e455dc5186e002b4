//! Black-box tests against real PostgreSQL and NATS JetStream. One binary; each test
//! spawns its own database, stream and server (see `crm_tests::harness`).

mod access_history;
mod ai;
mod api_keys;
mod auth;
mod bad_input;
mod carriers;
mod concurrency;
mod consent;
mod consent_log;
mod contacts;
mod contract;
mod dispatch;
mod edge;
mod escalation;
mod faults;
mod fields;
mod headers;
mod health;
mod live;
mod mcp;
mod openapi;
mod permissions;
mod pipeline;
mod portal;
mod preferences;
mod queries;
mod ratelimit;
mod receipts;
mod rights;
mod rls;
mod scale;
mod store;
mod tenants;
mod two_factor;
mod vault;
