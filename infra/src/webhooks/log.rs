//! The delivery log's reads: an endpoint's messages (filtered by status, event type and
//! time, newest first, keyset-paged) and a message with every attempt.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use uuid::Uuid;

use super::endpoints::WebhookAdminError;

#[derive(Debug, Clone)]
pub struct MessageRow {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub event_id: Uuid,
    pub position: i64,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub seq: i64,
}

#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status_code: Option<i32>,
    pub latency_ms: Option<i32>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// What the list of an endpoint's messages is narrowed to.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    pub status: Option<String>,
    pub event_type: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Keyset: messages older (in feed order) than this one's `seq`.
    pub before_seq: Option<i64>,
    pub limit: i64,
}

const COLUMNS: &str = "id, endpoint_id, event_id, position, event_type, status, attempts, \
     next_attempt_at, created_at, finished_at, last_status, last_error, seq";

fn message(r: &tokio_postgres::Row) -> MessageRow {
    MessageRow {
        id: r.get(0),
        endpoint_id: r.get(1),
        event_id: r.get(2),
        position: r.get(3),
        event_type: r.get(4),
        status: r.get(5),
        attempts: r.get(6),
        next_attempt_at: r.get(7),
        created_at: r.get(8),
        finished_at: r.get(9),
        last_status: r.get(10),
        last_error: r.get(11),
        seq: r.get(12),
    }
}

/// An endpoint's messages, newest first.
pub async fn messages(
    pool: &Pool,
    org_id: Uuid,
    endpoint_id: Uuid,
    filter: &MessageFilter,
) -> Result<Vec<MessageRow>, WebhookAdminError> {
    let mut client = pool.get().await?;
    let tx = crate::read_models::org_scope(&mut client, org_id).await?;
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM webhook_messages \
                 WHERE org_id = $1 AND endpoint_id = $2 \
                   AND ($3::text IS NULL OR status = $3) \
                   AND ($4::text IS NULL OR event_type = $4) \
                   AND ($5::timestamptz IS NULL OR created_at >= $5) \
                   AND ($6::timestamptz IS NULL OR created_at < $6) \
                   AND ($7::bigint IS NULL OR seq < $7) \
                 ORDER BY seq DESC LIMIT $8"
            ),
            &[
                &org_id,
                &endpoint_id,
                &filter.status,
                &filter.event_type,
                &filter.since,
                &filter.until,
                &filter.before_seq,
                &filter.limit,
            ],
        )
        .await?;
    tx.commit().await?;
    Ok(rows.iter().map(message).collect())
}

/// One message of an endpoint, with its attempts in order.
pub async fn message_with_attempts(
    pool: &Pool,
    org_id: Uuid,
    endpoint_id: Uuid,
    message_id: Uuid,
) -> Result<Option<(MessageRow, Vec<AttemptRow>)>, WebhookAdminError> {
    let mut client = pool.get().await?;
    let tx = crate::read_models::org_scope(&mut client, org_id).await?;
    let row = tx
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM webhook_messages \
                 WHERE org_id = $1 AND endpoint_id = $2 AND id = $3"
            ),
            &[&org_id, &endpoint_id, &message_id],
        )
        .await?;
    let Some(row) = row else {
        tx.commit().await?;
        return Ok(None);
    };
    let attempts = tx
        .query(
            "SELECT attempt, started_at, finished_at, status_code, latency_ms, error, \
               response_excerpt, next_attempt_at \
             FROM webhook_attempts WHERE org_id = $1 AND message_id = $2 ORDER BY attempt",
            &[&org_id, &message_id],
        )
        .await?;
    tx.commit().await?;
    Ok(Some((
        message(&row),
        attempts
            .iter()
            .map(|r| AttemptRow {
                attempt: r.get(0),
                started_at: r.get(1),
                finished_at: r.get(2),
                status_code: r.get(3),
                latency_ms: r.get(4),
                error: r.get(5),
                response_excerpt: r.get(6),
                next_attempt_at: r.get(7),
            })
            .collect(),
    )))
}
