//! Field-level encryption of personal data (AES-256-GCM).
//!
//! Each subject (a contact, a user) has its own random 256-bit data key, stored only in
//! wrapped form (encrypted under the key-encryption key, KEK) in `data_keys`. Every
//! personal field is encrypted separately with a fresh 96-bit nonce and the associated
//! data `org|subject|field`, so a ciphertext cannot be moved to another field, subject
//! or organisation without failing authentication. Destroying a subject's data key makes
//! all its personal data unreadable everywhere it was copied (crypto-shredding).
//!
//! - this module: the service ([`Crypto`]: the KEK and a short-lived cache of unwrapped
//!   keys) and its AEAD primitives, and the wrapping of the service's own secrets
//!   ([`Crypto::wrap_secret`]: the consent receipts' signing keys);
//! - [`data_keys`]: creating, wrapping, storing, finding and caching data keys;
//! - [`fields`]: which members of an event are personal, and encrypting and
//!   decrypting them (and opaque bytes such as snapshots) under a subject's key;
//! - [`org_secrets`]: an organisation's own keys (the suppression list's HMAC key).
//!
//! Invariants: a data key leaves memory only wrapped by the KEK; a key is cached only
//! once the transaction that stored it has committed (a rolled-back key never encrypts
//! anything); a destroyed key keeps its row, so it can never be recreated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use secrecy::ExposeSecret;
use uuid::Uuid;

use crate::settings::KeySettings;

pub mod data_keys;
pub mod fields;
pub mod org_secrets;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the key-encryption key must be 32 bytes, base64-encoded")]
    BadKek,
    #[error("the data key of this subject was destroyed (erased)")]
    Erased,
    #[error("a data key could not be unwrapped: wrong key-encryption key?")]
    Unwrap,
    #[error("encryption failed")]
    Encrypt,
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// One subject's data key, unwrapped, in memory only.
#[derive(Clone)]
pub struct DataKey(Arc<Aes256Gcm>);

/// The encryption service: wraps data keys with the KEK, caches unwrapped keys briefly.
pub struct Crypto {
    kek: Aes256Gcm,
    kek_id: String,
    cache: Mutex<data_keys::KeyCache>,
    /// Whether cached keys may be used: off while a started listener for destroyed keys
    /// ([`Crypto::listen`]) is disconnected, so no process keeps decrypting with a key
    /// another process destroyed.
    cache_live: std::sync::atomic::AtomicBool,
    /// Organisations' secrets ([`org_secrets`]), unwrapped; never destroyed.
    secrets: Mutex<HashMap<(Uuid, &'static str), org_secrets::OrgSecret>>,
}

fn seal(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Encrypt)?;
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 12 + 16 {
        return None;
    }
    let (nonce, ct) = sealed.split_at(12);
    cipher
        .decrypt(
            &Nonce::from(<[u8; 12]>::try_from(nonce).ok()?),
            Payload { msg: ct, aad },
        )
        .ok()
}

fn field_aad(org: &Uuid, subject: &str, field: &str) -> Vec<u8> {
    format!("crm-field|{org}|{subject}|{field}").into_bytes()
}

impl Crypto {
    pub fn new(settings: &KeySettings) -> Result<Self, CryptoError> {
        let raw = B64
            .decode(settings.kek.expose_secret().trim())
            .map_err(|_| CryptoError::BadKek)?;
        if raw.len() != 32 {
            return Err(CryptoError::BadKek);
        }
        Ok(Self {
            kek: Aes256Gcm::new_from_slice(&raw).map_err(|_| CryptoError::BadKek)?,
            kek_id: settings.kek_id.clone(),
            cache: Mutex::new(data_keys::KeyCache::default()),
            cache_live: std::sync::atomic::AtomicBool::new(true),
            secrets: Mutex::new(HashMap::new()),
        })
    }
}

impl Crypto {
    /// Wraps one of the service's own secrets (not a subject's data key) under the
    /// KEK, bound to `aad` (say `receipt-key|<kid>`): it unwraps only with the same.
    pub fn wrap_secret(&self, aad: &str, plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
        seal(&self.kek, &secret_aad(aad), plain)
    }

    /// The secret [`Self::wrap_secret`] wrapped with `aad`.
    pub fn unwrap_secret(&self, aad: &str, wrapped: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open(&self.kek, &secret_aad(aad), wrapped).ok_or(CryptoError::Unwrap)
    }
}

/// Apart from data keys (`crm-dek|…`) and fields (`crm-field|…`).
fn secret_aad(aad: &str) -> Vec<u8> {
    format!("crm-secret|{aad}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    #[test]
    fn a_short_kek_is_refused() {
        let bad = Crypto::new(&KeySettings {
            kek_id: "x".into(),
            kek: SecretString::from(B64.encode([7u8; 16])),
        });
        assert!(matches!(bad, Err(CryptoError::BadKek)));
    }

    #[test]
    fn a_wrapped_secret_unwraps_only_with_its_aad() {
        let crypto = Crypto::new(&KeySettings {
            kek_id: "x".into(),
            kek: SecretString::from(B64.encode([7u8; 32])),
        })
        .unwrap();
        let wrapped = crypto.wrap_secret("receipt-key|a", b"secret").unwrap();
        assert_eq!(
            crypto.unwrap_secret("receipt-key|a", &wrapped).unwrap(),
            b"secret"
        );
        assert!(matches!(
            crypto.unwrap_secret("receipt-key|b", &wrapped),
            Err(CryptoError::Unwrap)
        ));
    }
}
