//! Verification of the per-stream hash chains: detects any change to stored events.

use deadpool_postgres::GenericClient;
use futures::{pin_mut, TryStreamExt};
use serde::Serialize;

use crate::store::event_store::{from_row, COLUMNS};
use crate::store::hash_chain::{event_hash, HashedFields};

/// A place where a chain does not hold.
#[derive(Debug, Clone, Serialize)]
pub struct ChainBreak {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub global_position: i64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    pub streams: u64,
    pub events: u64,
    pub breaks: Vec<ChainBreak>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Walks every stream (of one organisation, or all) and recomputes each hash.
pub async fn verify_chains(
    client: &impl GenericClient,
    org: Option<uuid::Uuid>,
) -> Result<VerifyReport, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE ($1::uuid IS NULL OR org_id = $1) \
         ORDER BY aggregate_type, aggregate_id, sequence"
    );
    let rows = client
        .query_raw(&sql, [&org as &(dyn tokio_postgres::types::ToSql + Sync)])
        .await?;
    pin_mut!(rows);
    let mut report = VerifyReport::default();
    let mut current: Option<(String, String)> = None;
    let mut prev: Option<Vec<u8>> = None;
    let mut expected_seq = 1;
    while let Some(row) = rows.try_next().await? {
        let e = from_row(&row);
        let stream = (e.aggregate_type.clone(), e.aggregate_id.clone());
        if current.as_ref() != Some(&stream) {
            current = Some(stream);
            prev = None;
            expected_seq = 1;
            report.streams += 1;
        }
        report.events += 1;
        let mut broken = |reason: String| {
            report.breaks.push(ChainBreak {
                aggregate_type: e.aggregate_type.clone(),
                aggregate_id: e.aggregate_id.clone(),
                sequence: e.sequence,
                global_position: e.global_position,
                reason,
            })
        };
        if e.sequence != expected_seq {
            broken(format!(
                "expected sequence {expected_seq}, found {}",
                e.sequence
            ));
        }
        let stored_prev = e
            .prev_hash
            .as_deref()
            .map(|h| hex::decode(h).unwrap_or_default());
        if stored_prev != prev {
            broken("prev_hash does not match the previous event's hash".into());
        }
        let computed = event_hash(
            prev.as_deref(),
            &HashedFields {
                event_id: &e.event_id,
                org_id: &e.org_id,
                aggregate_type: &e.aggregate_type,
                aggregate_id: &e.aggregate_id,
                sequence: e.sequence,
                event_type: &e.event_type,
                event_version: &e.event_version,
                payload: &e.payload,
                metadata: &e.metadata,
            },
        );
        if hex::encode(computed) != e.hash {
            broken("content does not match its hash: the stored event was altered".into());
        }
        prev = hex::decode(&e.hash).ok();
        expected_seq = e.sequence + 1;
    }
    Ok(report)
}
