//! Secrets of an organisation other than its subjects' data keys: random 256-bit
//! keys, one per purpose, created on first use, stored wrapped by the KEK in
//! `org_secrets` and kept in memory once unwrapped (they are never destroyed). The
//! suppression list's keyed hashes use one ([`SUPPRESSION`]).

use std::sync::Arc;

use deadpool_postgres::GenericClient;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use uuid::Uuid;

use super::{Crypto, CryptoError};

/// The purpose of the key that keys the suppression list's hashes.
pub const SUPPRESSION: &str = "suppression";

/// One organisation's secret for one purpose, unwrapped.
pub type OrgSecret = Arc<[u8; 32]>;

impl Crypto {
    /// `org`'s secret for `purpose` if this process has it already (no I/O).
    pub fn cached_org_secret(&self, org: &Uuid, purpose: &'static str) -> Option<OrgSecret> {
        let secrets = self.secrets.lock().expect("secrets poisoned");
        secrets.get(&(*org, purpose)).cloned()
    }

    /// `org`'s secret for `purpose`: cached, else read, else created.
    pub async fn org_secret(
        &self,
        client: &impl GenericClient,
        org: &Uuid,
        purpose: &'static str,
    ) -> Result<OrgSecret, CryptoError> {
        if let Some(s) = self
            .secrets
            .lock()
            .expect("secrets poisoned")
            .get(&(*org, purpose))
        {
            return Ok(s.clone());
        }
        let aad = format!("org-secret|{org}|{purpose}");
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let wrapped = self.wrap_secret(&aad, &raw)?;
        // The first writer's key wins; every later one reads it.
        let stmt = client
            .prepare_cached(
                "WITH new AS (INSERT INTO org_secrets (org_id, purpose, kek_id, wrapped) \
                   VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING wrapped) \
                 SELECT wrapped FROM new \
                 UNION ALL SELECT wrapped FROM org_secrets WHERE org_id = $1 AND purpose = $2",
            )
            .await?;
        let first = client
            .query(&stmt, &[org, &purpose, &self.kek_id, &wrapped])
            .await?
            .into_iter()
            .next();
        let row = match first {
            Some(row) => row,
            // Another process inserted it meanwhile: its insert made ours skip, after
            // this statement's snapshot was taken. A new statement sees it.
            None => client
                .query_opt(
                    "SELECT wrapped FROM org_secrets WHERE org_id = $1 AND purpose = $2",
                    &[org, &purpose],
                )
                .await?
                .ok_or(CryptoError::Unwrap)?,
        };
        let plain = self.unwrap_secret(&aad, &row.get::<_, Vec<u8>>(0))?;
        let secret: OrgSecret = Arc::new(plain.try_into().map_err(|_| CryptoError::Unwrap)?);
        self.secrets
            .lock()
            .expect("secrets poisoned")
            .insert((*org, purpose), secret.clone());
        Ok(secret)
    }
}

/// HMAC-SHA256 of `data` under `secret`, hex: a digest that reveals nothing of `data`
/// without the organisation's key (a plain hash of an address is reversed by hashing a
/// list of addresses).
pub fn keyed_hash(secret: &[u8; 32], data: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keyed_hash_depends_on_the_key() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(
            keyed_hash(&a, b"x@example.com"),
            keyed_hash(&a, b"x@example.com")
        );
        assert_ne!(
            keyed_hash(&a, b"x@example.com"),
            keyed_hash(&b, b"x@example.com")
        );
        assert_ne!(
            keyed_hash(&a, b"x@example.com"),
            keyed_hash(&a, b"y@example.com")
        );
        assert_eq!(keyed_hash(&a, b"").len(), 64);
    }
}
