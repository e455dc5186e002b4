//! Snapshots: an aggregate's state, sealed with the subject's data key, at a version
//! of its stream, so that loading it reads only the events after that version.
//!
//! A snapshot is a cache, never needed for correctness: a missing, unreadable or
//! undecryptable one only means reading the stream from an earlier one, or from its
//! start. Snapshots are kept, one per version they were taken at (every
//! `SNAPSHOT_EVERY` events): the executor starts from the latest, a read of the past
//! (`as_of`) from the latest whose last event was recorded by then.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use deadpool_postgres::GenericClient;

use crate::crypto::Crypto;
use crate::store::event_store::{StoreError, StreamHead, StreamId};

/// A snapshot as loaded: the state, the head it was taken at, and when that head's
/// event was recorded.
pub struct Snapshot<A> {
    pub aggregate: A,
    pub head: StreamHead,
    pub recorded_at: DateTime<Utc>,
}

/// The stream's latest snapshot; `None` when there is none, or it cannot be opened
/// (the subject's key destroyed) or read (an older state shape).
pub async fn load<A: Aggregate>(
    crypto: &Crypto,
    client: &impl GenericClient,
    stream: &StreamId<'_>,
) -> Result<Option<Snapshot<A>>, StoreError> {
    load_at_or_before(crypto, client, stream, None).await
}

/// The stream's latest snapshot whose last event was recorded at or before `as_of`
/// (the latest of all without `as_of`); `None` as for [`load`]. Only the one latest
/// snapshot is tried: if it cannot be opened, the caller replays from the start.
pub async fn load_at_or_before<A: Aggregate>(
    crypto: &Crypto,
    client: &impl GenericClient,
    stream: &StreamId<'_>,
    as_of: Option<DateTime<Utc>>,
) -> Result<Option<Snapshot<A>>, StoreError> {
    let stmt = client
        .prepare_cached(
            "SELECT last_sequence, last_hash, state, last_recorded_at FROM snapshots \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND org_id = $3 \
               AND ($4::timestamptz IS NULL OR last_recorded_at <= $4) \
             ORDER BY last_sequence DESC LIMIT 1",
        )
        .await?;
    let row = client
        .query_opt(
            &stmt,
            &[
                &stream.aggregate_type,
                &stream.aggregate_id,
                &stream.org_id,
                &as_of,
            ],
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
    Ok(state.map(|aggregate| Snapshot {
        aggregate,
        head: StreamHead {
            version: row.get(0),
            last_hash: Some(row.get(1)),
        },
        recorded_at: row.get(3),
    }))
}

/// Stores `aggregate` as the stream's snapshot at `head` (once: a second snapshot of
/// the same version is the same state). The time of `head`'s event comes from the
/// stream itself, in the same statement.
pub async fn save<A: Aggregate>(
    crypto: &Crypto,
    client: &impl GenericClient,
    stream: &StreamId<'_>,
    aggregate: &A,
    head: &StreamHead,
) -> Result<(), StoreError> {
    let key = crypto
        .key_for_writing(client, &stream.org_id, stream.aggregate_id, &[])
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
            "INSERT INTO snapshots (aggregate_type, aggregate_id, org_id, last_sequence, \
                                    last_hash, state, last_recorded_at) \
             SELECT $1, $2, $3, $4, $5, $6, e.recorded_at FROM events e \
             WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.sequence = $4 \
             ON CONFLICT (aggregate_type, aggregate_id, last_sequence) DO NOTHING",
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
