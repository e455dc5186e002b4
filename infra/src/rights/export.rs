//! What an export (GDPR Art. 15/20) reads besides the read models: which streams hold
//! a contact's data.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::store::event_store::StoreError;

/// The ids of the messages sent (or refused) to `contact`, oldest first: the message
/// streams whose data key the contact owns (`data_keys.owners`, kept after an
/// erasure).
pub async fn messages_of(
    client: &impl GenericClient,
    org_id: Uuid,
    contact: Uuid,
) -> Result<Vec<Uuid>, StoreError> {
    let rows = client
        .query(
            "SELECT d.subject_id FROM data_keys d \
             WHERE d.org_id = $1 AND d.owners @> ARRAY[$2::uuid] \
               AND EXISTS (SELECT 1 FROM events e WHERE e.org_id = d.org_id \
                           AND e.aggregate_type = 'message' AND e.aggregate_id = d.subject_id \
                           AND e.sequence = 1) \
             ORDER BY d.created_at, d.subject_id",
            &[&org_id, &contact],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.get::<_, String>(0).parse().ok())
        .collect())
}
