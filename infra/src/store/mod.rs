//! The event store: the `events` table and everything that writes, reads or checks it.
//!
//! - [`event_store`]: append with optimistic concurrency, read a stream, read in commit
//!   order below the visibility horizon, and the post-append wake-up (`crm_events`);
//! - [`group_commit`]: single-event appends of concurrent commands in one statement;
//! - [`hash_chain`]: the per-stream SHA-256 chain over what is stored;
//! - [`snapshots`]: sealed aggregate states every few events, a cache for loading;
//! - [`stream_reader`]: the reads before concurrent commands, batched into one statement;
//! - [`decode`]: stored events read back with their personal data decrypted;
//! - [`verify`]: walking the chains to name altered or missing events.
//!
//! Invariants: the events table is append-only (a trigger refuses UPDATE, DELETE and
//! TRUNCATE; the application role may only SELECT and INSERT). A stream's sequence
//! runs 1, 2, 3… with no gaps, guarded by the unique (type, id, sequence): two commands
//! that raced for the same version get one success and one conflict. Each event's hash
//! chains it to its predecessor in the stream. Nothing personal is stored in clear:
//! callers encrypt it before they append (`crate::commands`). Commit order is
//! `(tx_id, global_position)`, read only below `pg_snapshot_xmin`, so a reader never
//! skips an event that commits late.

pub mod decode;
pub mod event_store;
pub mod group_commit;
pub mod hash_chain;
pub mod snapshots;
pub mod stream_reader;
pub mod verify;
