//! The preference center's links: a token that opens one contact's page (unguessable,
//! bound to the contact, expiring, revocable), and the single-use token of a link that
//! confirms an erasure asked for there. Only their SHA-256 is stored.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::event_store::StoreError;

/// How long a preference link lives unless told otherwise.
pub const LINK_DAYS: i64 = 30;
/// How long an erasure confirmation link lives.
pub const ERASURE_CONFIRM_HOURS: i64 = 24;

fn new_token(prefix: &str) -> String {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    format!("{prefix}{}", B64URL.encode(raw))
}

/// The stored digest of a token.
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Issues a link to contact `contact_id`'s page: (token, expiry). The token is shown
/// once.
pub async fn issue(
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
    days: i64,
) -> Result<(String, DateTime<Utc>), StoreError> {
    let token = new_token("pc_");
    let expires_at = Utc::now() + Duration::days(days);
    client
        .execute(
            "INSERT INTO preference_tokens (token_sha256, org_id, contact_id, expires_at) \
             VALUES ($1, $2, $3, $4)",
            &[&digest(&token), &org_id, &contact_id, &expires_at],
        )
        .await?;
    Ok((token, expires_at))
}

/// Revokes every open link of a contact; how many.
pub async fn revoke_all(
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<u64, StoreError> {
    Ok(client
        .execute(
            "UPDATE preference_tokens SET revoked_at = now() \
             WHERE org_id = $1 AND contact_id = $2 AND revoked_at IS NULL",
            &[&org_id, &contact_id],
        )
        .await?)
}

/// What a presented token comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// It opens this contact's page.
    Open {
        org_id: Uuid,
        contact_id: Uuid,
    },
    Expired,
    Revoked,
    Unknown,
}

/// What `token` opens at `now`.
pub async fn find(
    client: &impl GenericClient,
    token: &str,
    now: DateTime<Utc>,
) -> Result<Link, StoreError> {
    let stmt = client
        .prepare_cached(
            "SELECT org_id, contact_id, expires_at, revoked_at IS NOT NULL \
             FROM preference_tokens WHERE token_sha256 = $1",
        )
        .await?;
    let Some(row) = client.query_opt(&stmt, &[&digest(token)]).await? else {
        return Ok(Link::Unknown);
    };
    let expires_at: DateTime<Utc> = row.get(2);
    Ok(if row.get::<_, bool>(3) {
        Link::Revoked
    } else if expires_at <= now {
        Link::Expired
    } else {
        Link::Open {
            org_id: row.get(0),
            contact_id: row.get(1),
        }
    })
}

/// Issues the single-use token of an erasure confirmation link, asked for from
/// `source` (`preference_center`, `portal`).
pub async fn issue_erasure(
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
    source: &str,
) -> Result<(String, DateTime<Utc>), StoreError> {
    let token = new_token("ec_");
    let expires_at = Utc::now() + Duration::hours(ERASURE_CONFIRM_HOURS);
    client
        .execute(
            "INSERT INTO erasure_confirmations \
               (token_sha256, org_id, contact_id, source, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&digest(&token), &org_id, &contact_id, &source, &expires_at],
        )
        .await?;
    Ok((token, expires_at))
}

/// The contact an erasure confirmation token names and where it asked, if the token is
/// open at `now` (`take`: and uses it up: a link confirms once).
pub async fn erasure_confirmation(
    client: &impl GenericClient,
    token: &str,
    now: DateTime<Utc>,
    take: bool,
) -> Result<Option<(Uuid, Uuid, String)>, StoreError> {
    let sql = if take {
        "DELETE FROM erasure_confirmations WHERE token_sha256 = $1 AND expires_at > $2 \
         RETURNING org_id, contact_id, source"
    } else {
        "SELECT org_id, contact_id, source FROM erasure_confirmations \
         WHERE token_sha256 = $1 AND expires_at > $2"
    };
    let row = client.query_opt(sql, &[&digest(token), &now]).await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unguessable_and_only_their_digest_is_kept() {
        let (a, b) = (new_token("pc_"), new_token("pc_"));
        assert_ne!(a, b);
        assert!(a.starts_with("pc_") && a.len() >= 40, "{a}");
        assert_eq!(digest(&a).len(), 64);
        assert!(!digest(&a).contains(&a[3..]));
    }
}
