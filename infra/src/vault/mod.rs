//! The credentials vault: every secret the service keeps for an organisation, one row
//! of `vault_secrets` per (organisation, record type, record id, field) — an AI
//! provider's API key ([`ai_credentials`], record type `credential`), a carrier's SMTP
//! password or auth token (`crate::dispatch::carriers::credentials`, record type
//! `carrier`).
//!
//! - A value is sealed with AES-256-GCM under the KEK ([`Crypto::wrap_secret`]: a fresh
//!   96-bit nonce per value), with the associated data `vault|{org}|{record type}|
//!   {field}|{record id}` ([`SecretRef::aad`]): a sealed value copied into another row
//!   (another organisation, record or field) does not open there ([`VaultError::Unbound`]),
//!   it never decrypts to anything.
//! - Rows are written ([`put`]) and deleted ([`delete`]) only inside the transaction
//!   that appends the owning stream's event (an effect of
//!   `Executor::execute_with`), so the vault and the events never disagree.
//! - A secret leaves the vault only through [`decrypt_recorded`]: the owning stream's
//!   decryption event (principal in its metadata, purpose in its payload) is appended
//!   in the transaction that reads the sealed value, and the value is opened only once
//!   that transaction has committed. No decryption without its event; one event per
//!   decryption.
//! - Only the last four characters of a secret ([`last4`]) are ever shown or put in an
//!   event; the table has row-level security by organisation, and every statement here
//!   runs in a transaction that names it.

use std::sync::{Arc, Mutex};

use cqrs_es::Aggregate;
use crm_domain::metadata::EventMetadata;
use crm_domain::PersonalData;
use deadpool_postgres::Transaction;
use futures::FutureExt;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::commands::executor::{effect, CommandError, CommandOutcome, Executor};
use crate::crypto::Crypto;
use crate::store::event_store::StoreError;

pub mod ai_credentials;

/// Where a secret lives: the row it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub org_id: Uuid,
    /// `credential`, `carrier`: lower-case letters and `_` only.
    pub record_type: &'static str,
    pub record_id: String,
    /// `secret`: lower-case letters and `_` only.
    pub field: &'static str,
}

impl SecretRef {
    /// # Panics
    /// When `record_type` or `field` is not 1 to 32 lower-case letters or `_` (they are
    /// constants of the code, never input).
    pub fn new(
        org_id: Uuid,
        record_type: &'static str,
        record_id: impl Into<String>,
        field: &'static str,
    ) -> Self {
        let word = |s: &str| {
            (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        };
        assert!(
            word(record_type) && word(field),
            "a vault record type or field is a lower-case word"
        );
        Self {
            org_id,
            record_type,
            record_id: record_id.into(),
            field,
        }
    }

    /// The associated data the value is sealed with. Unambiguous: the organisation is
    /// a UUID, type and field hold no `|`, and the record id comes last.
    pub fn aad(&self) -> String {
        format!(
            "vault|{}|{}|{}|{}",
            self.org_id, self.record_type, self.field, self.record_id
        )
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.record_type, self.record_id, self.field)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("the secret could not be sealed")]
    Seal,
    /// The value does not authenticate at this row: sealed for another organisation,
    /// record or field (copied here), or altered.
    #[error("the stored secret of {0} does not decrypt: it was sealed for another row or altered")]
    Unbound(String),
    #[error("the stored secret of {record} was sealed under key-encryption key {kek_id}, not the current one")]
    OtherKek { record: String, kek_id: String },
    #[error("the stored secret of {0} is not text")]
    NotText(String),
    #[error("no secret is stored for {0}")]
    Missing(String),
}

/// A value sealed for one row, ready to be [`put`].
#[derive(Debug, Clone)]
pub struct Sealed {
    pub sealed: Vec<u8>,
    pub kek_id: String,
    pub last4: Option<String>,
}

/// A row's sealed value as stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sealed: Vec<u8>,
    pub kek_id: String,
}

/// The last four characters of a secret of at least eight (a shorter one shows none:
/// four of its characters would give too much of it away).
pub fn last4(secret: &str) -> Option<String> {
    let chars: Vec<char> = secret.chars().collect();
    (chars.len() >= 8).then(|| chars[chars.len() - 4..].iter().collect())
}

/// Seals `secret` for the row `at`.
pub fn seal(crypto: &Crypto, at: &SecretRef, secret: &SecretString) -> Result<Sealed, VaultError> {
    let sealed = crypto
        .wrap_secret(&at.aad(), secret.expose_secret().as_bytes())
        .map_err(|_| VaultError::Seal)?;
    Ok(Sealed {
        sealed,
        kek_id: crypto.kek_id().to_owned(),
        last4: last4(secret.expose_secret()),
    })
}

/// Opens the value stored at `at`. Call only once its decryption is on record (see
/// [`decrypt_recorded`]).
pub fn open(crypto: &Crypto, at: &SecretRef, stored: &Stored) -> Result<SecretString, VaultError> {
    if stored.kek_id != crypto.kek_id() {
        return Err(VaultError::OtherKek {
            record: at.to_string(),
            kek_id: stored.kek_id.clone(),
        });
    }
    let plain = crypto
        .unwrap_secret(&at.aad(), &stored.sealed)
        .map_err(|_| VaultError::Unbound(at.to_string()))?;
    String::from_utf8(plain)
        .map(SecretString::from)
        .map_err(|_| VaultError::NotText(at.to_string()))
}

/// Names the organisation for the rest of the transaction (row-level security).
pub(crate) async fn name_org(
    tx: &Transaction<'_>,
    org_id: Uuid,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT set_config('crm.org_id', $1, true)",
        &[&org_id.to_string()],
    )
    .await
    .map(|_| ())
}

/// Stores (or replaces) the value of `at`; in the transaction of the event that says so.
pub async fn put(
    tx: &Transaction<'_>,
    at: &SecretRef,
    value: &Sealed,
) -> Result<(), tokio_postgres::Error> {
    name_org(tx, at.org_id).await?;
    tx.execute(
        "INSERT INTO vault_secrets (org_id, record_type, record_id, field, sealed, kek_id, last4) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (org_id, record_type, record_id, field) DO UPDATE SET \
           sealed = EXCLUDED.sealed, kek_id = EXCLUDED.kek_id, last4 = EXCLUDED.last4, \
           sealed_at = now()",
        &[
            &at.org_id,
            &at.record_type,
            &at.record_id,
            &at.field,
            &value.sealed,
            &value.kek_id,
            &value.last4,
        ],
    )
    .await?;
    Ok(())
}

/// Deletes the value of `at` (if any); in the transaction of the event that says so.
pub async fn delete(tx: &Transaction<'_>, at: &SecretRef) -> Result<(), tokio_postgres::Error> {
    name_org(tx, at.org_id).await?;
    tx.execute(
        "DELETE FROM vault_secrets \
         WHERE org_id = $1 AND record_type = $2 AND record_id = $3 AND field = $4",
        &[&at.org_id, &at.record_type, &at.record_id, &at.field],
    )
    .await?;
    Ok(())
}

/// The sealed value of `at`, if one is stored. Only for the effect that records its
/// decryption (see [`decrypt_recorded`]).
pub async fn read_sealed(
    tx: &Transaction<'_>,
    at: &SecretRef,
) -> Result<Option<Stored>, tokio_postgres::Error> {
    name_org(tx, at.org_id).await?;
    let row = tx
        .query_opt(
            "SELECT sealed, kek_id FROM vault_secrets \
             WHERE org_id = $1 AND record_type = $2 AND record_id = $3 AND field = $4",
            &[&at.org_id, &at.record_type, &at.record_id, &at.field],
        )
        .await?;
    Ok(row.map(|r| Stored {
        sealed: r.get(0),
        kek_id: r.get(1),
    }))
}

/// Why [`decrypt_recorded`] gave no secret.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError<E: std::error::Error> {
    /// The decryption event was not appended (the record is gone, a race, the store):
    /// nothing was decrypted.
    #[error(transparent)]
    Command(CommandError<E>),
    /// The event is on record, but the value does not open (or is missing).
    #[error(transparent)]
    Vault(VaultError),
}

/// Decrypts the secret at `at`, recorded: runs `command` (the owning stream's
/// decryption command, e.g. `RecordDecrypt { purpose }`) on stream `stream_id` with
/// `metadata` (its principal is who decrypts), reads the sealed value in the
/// transaction that appends the event, and opens it once that has committed. With
/// `expected_version`, the stream must still be at that version (as the caller loaded
/// it).
pub async fn decrypt_recorded<A>(
    executor: &Executor,
    at: &SecretRef,
    stream_id: &str,
    command: A::Command,
    metadata: &EventMetadata,
    expected_version: Option<i64>,
) -> Result<(CommandOutcome, SecretString), DecryptError<A::Error>>
where
    A: Aggregate<Services = ()>,
    A::Event: PersonalData,
{
    let slot: Arc<Mutex<Option<Stored>>> = Arc::default();
    let read = {
        let (slot, at) = (slot.clone(), at.clone());
        effect(move |tx, _: &[A::Event]| {
            let (slot, at) = (slot.clone(), at.clone());
            async move {
                let stored = read_sealed(tx, &at)
                    .await
                    .map_err(|e| CommandError::Store(StoreError::from(e)))?;
                if let Ok(mut slot) = slot.lock() {
                    *slot = stored;
                }
                Ok(())
            }
            .boxed()
        })
    };
    let outcome = executor
        .execute_with::<A>(
            at.org_id,
            stream_id,
            command,
            metadata,
            expected_version,
            &read,
        )
        .await
        .map_err(DecryptError::Command)?;
    let stored = slot.lock().ok().and_then(|mut s| s.take());
    let stored = stored.ok_or_else(|| DecryptError::Vault(VaultError::Missing(at.to_string())))?;
    let secret = open(executor.crypto(), at, &stored).map_err(DecryptError::Vault)?;
    Ok((outcome, secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn crypto(kek_id: &str, byte: u8) -> Crypto {
        Crypto::new(&crate::settings::KeySettings {
            kek_id: kek_id.into(),
            kek: SecretString::from(base64::engine::general_purpose::STANDARD.encode([byte; 32])),
        })
        .unwrap()
    }

    fn secret() -> SecretString {
        SecretString::from("sk-live-0123456789abcdefWXYZ".to_owned())
    }

    #[test]
    fn a_value_opens_at_its_own_row() {
        let c = crypto("k1", 7);
        let at = SecretRef::new(Uuid::now_v7(), "credential", "a", "secret");
        let sealed = seal(&c, &at, &secret()).unwrap();
        assert_eq!(sealed.last4.as_deref(), Some("WXYZ"));
        assert_eq!(sealed.kek_id, "k1");
        assert!(!sealed
            .sealed
            .windows(8)
            .any(|w| w == b"sk-live-".as_slice()));
        let stored = Stored {
            sealed: sealed.sealed,
            kek_id: sealed.kek_id,
        };
        assert_eq!(
            open(&c, &at, &stored).unwrap().expose_secret(),
            secret().expose_secret()
        );
    }

    #[test]
    fn a_value_copied_to_another_row_does_not_decrypt() {
        let c = crypto("k1", 7);
        let org = Uuid::now_v7();
        let at = SecretRef::new(org, "credential", "a", "secret");
        let sealed = seal(&c, &at, &secret()).unwrap();
        let stored = Stored {
            sealed: sealed.sealed.clone(),
            kek_id: sealed.kek_id.clone(),
        };
        for elsewhere in [
            SecretRef::new(Uuid::now_v7(), "credential", "a", "secret"),
            SecretRef::new(org, "credential", "b", "secret"),
            SecretRef::new(org, "carrier", "a", "secret"),
            SecretRef::new(org, "credential", "a", "token"),
        ] {
            match open(&c, &elsewhere, &stored) {
                Err(VaultError::Unbound(row)) => assert_eq!(row, elsewhere.to_string()),
                Err(e) => panic!("{elsewhere}: {e}"),
                Ok(_) => panic!("{elsewhere}: a copied value decrypted"),
            }
        }
        // Altered by one bit: refused too.
        let mut altered = stored.clone();
        let last = altered.sealed.len() - 1;
        altered.sealed[last] ^= 1;
        assert!(matches!(
            open(&c, &at, &altered),
            Err(VaultError::Unbound(_))
        ));
    }

    #[test]
    fn a_fresh_nonce_per_value() {
        let c = crypto("k1", 7);
        let at = SecretRef::new(Uuid::now_v7(), "credential", "a", "secret");
        let (a, b) = (
            seal(&c, &at, &secret()).unwrap(),
            seal(&c, &at, &secret()).unwrap(),
        );
        assert_ne!(a.sealed[..12], b.sealed[..12]);
        assert_ne!(a.sealed, b.sealed);
    }

    #[test]
    fn another_kek_is_named_not_tried() {
        let at = SecretRef::new(Uuid::now_v7(), "carrier", "sms", "secret");
        let sealed = seal(&crypto("old", 1), &at, &secret()).unwrap();
        let stored = Stored {
            sealed: sealed.sealed,
            kek_id: sealed.kek_id,
        };
        assert!(matches!(
            open(&crypto("new", 2), &at, &stored),
            Err(VaultError::OtherKek { kek_id, .. }) if kek_id == "old"
        ));
    }

    #[test]
    fn the_associated_data_is_unambiguous() {
        let org = Uuid::nil();
        assert_eq!(
            SecretRef::new(org, "carrier", "sms", "secret").aad(),
            format!("vault|{org}|carrier|secret|sms")
        );
        // A record id with `|` cannot pass for another field: the id comes last.
        assert_ne!(
            SecretRef::new(org, "credential", "a|b", "secret").aad(),
            SecretRef::new(org, "credential", "a", "b").aad()
        );
        assert!(
            std::panic::catch_unwind(|| SecretRef::new(org, "Bad|type", "a", "secret")).is_err()
        );
    }

    #[test]
    fn last_four_only_of_a_long_enough_secret() {
        assert_eq!(last4("abcdefghij").as_deref(), Some("ghij"));
        assert_eq!(last4("short"), None);
    }
}
