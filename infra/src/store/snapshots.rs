//! Snapshots: an aggregate's state, sealed with the subject's data key, at a version
//! of its stream, so that loading it reads only the events after that version.
//!
//! A snapshot is a cache, never needed for correctness: a missing, unreadable or
//! undecryptable one only means reading the stream from its start. A snapshot is only
//! ever replaced by a later one.

use cqrs_es::Aggregate;
use deadpool_postgres::GenericClient;

use crate::crypto::Crypto;
use crate::store::event_store::{StoreError, StreamHead, StreamId};

/// The stream's snapshot and the head it was taken at; `None` when there is none, or
/// it cannot be opened (the subject's key destroyed) or read (an older state shape).
pub async fn load<A: Aggregate>(
    crypto: &Crypto,
    client: &impl GenericClient,
    stream: &StreamId<'_>,
) -> Result<Option<(A, StreamHead)>, StoreError> {
    let row = client
        .query_opt(
            "SELECT last_sequence, last_hash, state FROM snapshots \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND org_id = $3",
            &[&stream.aggregate_type, &stream.aggregate_id, &stream.org_id],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let Some(key) = crypto
        .key_for_reading(client, &stream.org_id, stream.aggregate_id)
        .await?
    else {
        return Ok(None);
    };
    let sealed: Vec<u8> = row.get(2);
    let state = Crypto::open_bytes(
        &key,
        &stream.org_id,
        stream.aggregate_id,
        "snapshot",
        &sealed,
    )
    .and_then(|bytes| serde_json::from_slice::<A>(&bytes).ok());
    Ok(state.map(|a| {
        (
            a,
            StreamHead {
                version: row.get(0),
                last_hash: Some(row.get(1)),
            },
        )
    }))
}

/// Stores `aggregate` as the stream's snapshot at `head`, unless a later one is there.
pub async fn save<A: Aggregate>(
    crypto: &Crypto,
    client: &impl GenericClient,
    stream: &StreamId<'_>,
    aggregate: &A,
    head: &StreamHead,
) -> Result<(), StoreError> {
    let key = crypto
        .key_for_writing(client, &stream.org_id, stream.aggregate_id)
        .await?;
    let bytes = serde_json::to_vec(aggregate)
        .map_err(|e| StoreError::Corrupt(head.version, e.to_string()))?;
    let sealed = Crypto::seal_bytes(
        &key,
        &stream.org_id,
        stream.aggregate_id,
        "snapshot",
        &bytes,
    )?;
    client
        .execute(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, org_id, last_sequence, last_hash, state) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
             SET last_sequence = EXCLUDED.last_sequence, last_hash = EXCLUDED.last_hash, \
                 state = EXCLUDED.state, taken_at = now() \
             WHERE snapshots.last_sequence < EXCLUDED.last_sequence",
            &[
                &stream.aggregate_type,
                &stream.aggregate_id,
                &stream.org_id,
                &head.version,
                &head.last_hash,
                &sealed,
            ],
        )
        .await?;
    Ok(())
}
