//! A resume older than the ring: the organisation's catalogue events after a commit
//! key, read from the store below the visibility horizon, a page at a time.

use std::sync::OnceLock;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::live::event::LiveEvent;
use crate::store::event_store::{self, CommitKey, StoreError};

/// Every internal event type of the catalogue (what a catch-up reads).
fn catalogue_types() -> &'static [&'static str] {
    static TYPES: OnceLock<Vec<&'static str>> = OnceLock::new();
    TYPES.get_or_init(|| {
        crm_domain::public_events::CATALOGUE
            .iter()
            .map(|e| e.internal)
            .collect()
    })
}

/// At most `limit` of `org`'s catalogue events after `after`, in commit order.
pub async fn page(
    client: &impl GenericClient,
    org: Uuid,
    after: CommitKey,
    limit: i64,
) -> Result<Vec<LiveEvent>, StoreError> {
    let raw = event_store::read_committed_raw_in_org(client, org, after, catalogue_types(), limit)
        .await?;
    Ok(raw.into_iter().filter_map(LiveEvent::new).collect())
}

/// The commit key of `org`'s event at `position`: where a resume starts (`None`: no
/// such event in this organisation).
pub async fn resume_key(
    client: &impl GenericClient,
    org: Uuid,
    position: i64,
) -> Result<Option<CommitKey>, StoreError> {
    if position == 0 {
        return Ok(Some(CommitKey::default()));
    }
    let stmt = client
        .prepare_cached(
            "SELECT tx_id::text::bigint FROM events WHERE global_position = $1 AND org_id = $2",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&position, &org])
        .await?
        .map(|r| CommitKey {
            tx_id: r.get(0),
            position,
        }))
}

/// The store's visibility horizon as a commit key: every event before it is committed
/// (or never will be), and every later one is after it in commit order. A new stream
/// that starts while the hub reads nothing resumes from here.
pub async fn horizon(client: &impl GenericClient) -> Result<CommitKey, StoreError> {
    let stmt = client
        .prepare_cached("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
        .await?;
    let tx_id: i64 = client.query_one(&stmt, &[]).await?.get(0);
    Ok(CommitKey { tx_id, position: 0 })
}
