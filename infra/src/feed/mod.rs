//! The feed: from the event store to the read models, and back again on a rebuild.
//!
//! - [`relay`]: publishes committed events to JetStream in commit order;
//! - [`bus`]: the NATS connection, the events stream and its subjects;
//! - [`projector`]: the projector runtime, durable consumers feeding projections;
//! - [`checkpoint`]: how far the relay and each projection have got (commit keys);
//! - [`rebuild`]: a read model folded again from the store into a shadow table and
//!   swapped in.
//!
//! Invariants: events are published and applied in the store's commit order
//! `(tx_id, global_position)`. Delivery is at least once (duplicates are dropped by
//! JetStream's window on `Nats-Msg-Id = event_id`, redeliveries by the checkpoint), and
//! a projection's read-model change and its checkpoint commit in one transaction, so
//! each event takes effect exactly once. A projection's batches (and a rebuild's swap)
//! are serialized by its advisory lock. A rebuild reads the store, never NATS. Events
//! travel as stored: personal members stay encrypted on the wire.

pub mod bus;
pub mod checkpoint;
pub mod projector;
pub mod rebuild;
pub mod relay;
