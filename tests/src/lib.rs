//! Shared support for the black-box tests: a fresh database, a private JetStream stream
//! and a running application per test, against real PostgreSQL and NATS.

pub mod harness;
pub mod logs;
pub mod sinks;
pub mod sse;
