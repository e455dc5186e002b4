//! Single-use, expiring tokens delivered by mail (magic links, password resets). The
//! token is 256 random bits shown only in the mail; the store keeps its SHA-256.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use deadpool_postgres::GenericClient;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What a token is for; a token only redeems for its own purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    StaffReset,
    /// A new user's first password (an invitation).
    StaffInvite,
    PortalReset,
    PortalMagicLink,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Self::StaffReset => "staff_reset",
            Self::StaffInvite => "staff_invite",
            Self::PortalReset => "portal_reset",
            Self::PortalMagicLink => "portal_magic_link",
        }
    }

    /// Password resets live 2 hours, magic links 24 hours, invitations 72 hours.
    pub fn lifetime(self) -> Duration {
        match self {
            Self::StaffReset | Self::PortalReset => Duration::from_secs(2 * 3600),
            Self::PortalMagicLink => Duration::from_secs(24 * 3600),
            Self::StaffInvite => Duration::from_secs(72 * 3600),
        }
    }
}

fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates a token for `subject` of `org_id`; returns the token (for the mail only).
pub async fn create(
    client: &impl GenericClient,
    purpose: Purpose,
    org_id: Uuid,
    subject_id: Uuid,
) -> Result<String, tokio_postgres::Error> {
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = B64.encode(raw);
    let lifetime = chrono::Duration::from_std(purpose.lifetime()).unwrap_or_default();
    client
        .execute(
            "INSERT INTO auth_tokens (digest, purpose, org_id, subject_id, expires_at) \
             VALUES ($1, $2, $3, $4, now() + $5::bigint * interval '1 second')",
            &[
                &digest(&token),
                &purpose.name(),
                &org_id,
                &subject_id,
                &lifetime.num_seconds(),
            ],
        )
        .await?;
    Ok(token)
}

/// Uses a token up: `(org, subject)` the first time, if unexpired and of one of
/// `purposes`; `None` ever after.
pub async fn redeem(
    client: &impl GenericClient,
    purposes: &[Purpose],
    token: &str,
) -> Result<Option<(Uuid, Uuid)>, tokio_postgres::Error> {
    if token.len() > 100 {
        return Ok(None);
    }
    let names: Vec<&str> = purposes.iter().map(|p| p.name()).collect();
    Ok(client
        .query_opt(
            "UPDATE auth_tokens SET used_at = now() \
             WHERE digest = $1 AND purpose = ANY($2) AND used_at IS NULL AND expires_at > now() \
             RETURNING org_id, subject_id",
            &[&digest(token), &names],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Deletes tokens that expired more than a day ago.
pub async fn purge(client: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM auth_tokens WHERE expires_at < now() - interval '1 day'",
            &[],
        )
        .await
}
