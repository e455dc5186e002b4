//! Data-subject rights (GDPR Art. 15–20): erasure by crypto-shredding
//! ([`erasure`]) and what an export reads ([`export`]).
//!
//! Erasure destroys data keys rather than rewriting history: the events stay, hash
//! chain and all, and what they held of the person can no longer be read anywhere it
//! was copied (the events table, snapshots, JetStream, caches). The read models that
//! hold decrypted personal data purge it when they apply the tombstone.

pub mod erasure;
pub mod export;
pub mod preferences;
pub mod retention;
