//! Field-level encryption of personal data (AES-256-GCM).
//!
//! Each subject (a contact, a user) has its own random 256-bit data key, stored only in
//! wrapped form (encrypted under the key-encryption key, KEK) in `data_keys`. Every
//! personal field is encrypted separately with a fresh 96-bit nonce and the associated
//! data `org|subject|field`, so a ciphertext cannot be moved to another field, subject
//! or organisation without failing authentication. Destroying a subject's data key makes
//! all its personal data unreadable everywhere it was copied (crypto-shredding).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use deadpool_postgres::GenericClient;
use rand::RngCore;
use secrecy::ExposeSecret;
use serde_json::Value;
use uuid::Uuid;

use crate::settings::KeySettings;

/// Prefix of an encrypted JSON string value: `enc:v1:<base64(nonce ‖ ciphertext)>`.
pub const ENCRYPTED_PREFIX: &str = "enc:v1:";
const CACHE_TTL: Duration = Duration::from_secs(300);
const CACHE_MAX: usize = 200_000;

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
    cache: Mutex<HashMap<(Uuid, String), (DataKey, Instant)>>,
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
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, org: &Uuid, subject: &str) -> Option<DataKey> {
        let cache = self.cache.lock().expect("key cache poisoned");
        cache
            .get(&(*org, subject.to_owned()))
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(k, _)| k.clone())
    }

    /// Caches a key; call only once the key is committed.
    pub fn remember(&self, org: &Uuid, subject: &str, key: &DataKey) {
        let mut cache = self.cache.lock().expect("key cache poisoned");
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert((*org, subject.to_owned()), (key.clone(), Instant::now()));
    }

    /// Forgets a cached key (after it was destroyed).
    pub fn forget(&self, org: &Uuid, subject: &str) {
        let mut cache = self.cache.lock().expect("key cache poisoned");
        cache.remove(&(*org, subject.to_owned()));
    }

    fn unwrap_key(
        &self,
        org: &Uuid,
        subject: &str,
        wrapped: &[u8],
    ) -> Result<DataKey, CryptoError> {
        let aad = format!("crm-dek|{org}|{subject}");
        let raw = open(&self.kek, aad.as_bytes(), wrapped).ok_or(CryptoError::Unwrap)?;
        let cipher = Aes256Gcm::new_from_slice(&raw).map_err(|_| CryptoError::Unwrap)?;
        Ok(DataKey(Arc::new(cipher)))
    }

    /// The subject's data key; created on first use. Fails with `Erased` once destroyed.
    ///
    /// A key created here is not cached: it only exists once the caller's transaction
    /// commits, and a rolled-back key must never encrypt anything else.
    pub async fn key_for_writing(
        &self,
        client: &impl GenericClient,
        org: &Uuid,
        subject: &str,
    ) -> Result<DataKey, CryptoError> {
        if let Some(k) = self.cached(org, subject) {
            return Ok(k);
        }
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let aad = format!("crm-dek|{org}|{subject}");
        let wrapped = seal(&self.kek, aad.as_bytes(), &raw)?;
        let inserted = client
            .execute(
                "INSERT INTO data_keys (org_id, subject_id, kek_id, wrapped_key) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[org, &subject, &self.kek_id, &wrapped],
            )
            .await?;
        if inserted == 1 {
            let cipher = Aes256Gcm::new_from_slice(&raw).map_err(|_| CryptoError::Encrypt)?;
            return Ok(DataKey(Arc::new(cipher)));
        }
        // It existed (perhaps only inside the caller's transaction): not cached here.
        self.fetch_key(client, org, subject, false)
            .await?
            .ok_or(CryptoError::Erased)
    }

    /// The subject's data key if it exists and was not destroyed.
    pub async fn key_for_reading(
        &self,
        client: &impl GenericClient,
        org: &Uuid,
        subject: &str,
    ) -> Result<Option<DataKey>, CryptoError> {
        self.fetch_key(client, org, subject, true).await
    }

    async fn fetch_key(
        &self,
        client: &impl GenericClient,
        org: &Uuid,
        subject: &str,
        cache: bool,
    ) -> Result<Option<DataKey>, CryptoError> {
        if let Some(k) = self.cached(org, subject) {
            return Ok(Some(k));
        }
        let row = client
            .query_opt(
                "SELECT wrapped_key FROM data_keys WHERE org_id = $1 AND subject_id = $2",
                &[org, &subject],
            )
            .await?;
        let Some(wrapped) = row.and_then(|r| r.get::<_, Option<Vec<u8>>>(0)) else {
            return Ok(None);
        };
        let key = self.unwrap_key(org, subject, &wrapped)?;
        if cache {
            self.remember(org, subject, &key);
        }
        Ok(Some(key))
    }

    /// Encrypts one JSON value as an `enc:v1:` string bound to org, subject and field.
    pub fn encrypt_value(
        key: &DataKey,
        org: &Uuid,
        subject: &str,
        field: &str,
        value: &Value,
    ) -> Result<Value, CryptoError> {
        let plaintext = serde_json::to_vec(value).map_err(|_| CryptoError::Encrypt)?;
        let sealed = seal(&key.0, &field_aad(org, subject, field), &plaintext)?;
        Ok(Value::String(format!(
            "{ENCRYPTED_PREFIX}{}",
            B64.encode(sealed)
        )))
    }

    /// Decrypts an `enc:v1:` string; `None` when the key is gone or the value was tampered.
    pub fn decrypt_value(
        key: Option<&DataKey>,
        org: &Uuid,
        subject: &str,
        field: &str,
        value: &Value,
    ) -> Option<Value> {
        let s = value.as_str()?.strip_prefix(ENCRYPTED_PREFIX)?;
        let sealed = B64.decode(s).ok()?;
        let plaintext = open(&key?.0, &field_aad(org, subject, field), &sealed)?;
        serde_json::from_slice(&plaintext).ok()
    }

    /// Encrypts opaque bytes (snapshots) under the subject's key.
    pub fn seal_bytes(
        key: &DataKey,
        org: &Uuid,
        subject: &str,
        what: &str,
        bytes: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        seal(&key.0, &field_aad(org, subject, what), bytes)
    }

    pub fn open_bytes(
        key: &DataKey,
        org: &Uuid,
        subject: &str,
        what: &str,
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        open(&key.0, &field_aad(org, subject, what), sealed)
    }
}

/// Names the personal members of an event so they can be encrypted: the event's
/// `sections` (objects inside the variant body) and the personal metadata fields.
pub fn personal_paths(
    payload: &Value,
    sections: &[&str],
    metadata: &Value,
) -> Vec<(Vec<String>, String)> {
    let mut paths = Vec::new();
    if let Some((variant, body)) = payload.as_object().and_then(|o| o.iter().next()) {
        for section in sections {
            if let Some(obj) = body.get(*section).and_then(Value::as_object) {
                for (member, v) in obj {
                    if !v.is_null() {
                        paths.push((
                            vec![variant.clone(), (*section).to_owned(), member.clone()],
                            format!("{section}.{member}"),
                        ));
                    }
                }
            }
        }
    }
    for field in crm_domain::metadata::PERSONAL_METADATA_FIELDS {
        if metadata.get(*field).is_some_and(|v| !v.is_null()) {
            paths.push((vec![(*field).to_owned()], format!("metadata.{field}")));
        }
    }
    paths
}

fn get_mut<'a>(root: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(root, |v, k| v.get_mut(k))
}

/// A data key made in memory, with its wrapped form, not stored yet.
pub struct NewDataKey {
    pub key: DataKey,
    pub wrapped: Vec<u8>,
}

impl Crypto {
    /// The key-encryption key's id (stored beside each wrapped key).
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// The cached key of a subject, if any.
    pub fn cached_key(&self, org: &Uuid, subject: &str) -> Option<DataKey> {
        self.cached(org, subject)
    }

    /// A fresh data key for `subject`, wrapped; the caller stores it (or drops it).
    pub fn new_data_key(&self, org: &Uuid, subject: &str) -> Result<NewDataKey, CryptoError> {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let aad = format!("crm-dek|{org}|{subject}");
        let wrapped = seal(&self.kek, aad.as_bytes(), &raw)?;
        let cipher = Aes256Gcm::new_from_slice(&raw).map_err(|_| CryptoError::Encrypt)?;
        Ok(NewDataKey {
            key: DataKey(Arc::new(cipher)),
            wrapped,
        })
    }

    /// Encrypts, in place, every personal member of an event with `key`; returns
    /// whether there was anything personal.
    pub fn encrypt_event_with(
        key: &DataKey,
        org: &Uuid,
        subject: &str,
        sections: &[&str],
        payload: &mut Value,
        metadata: &mut Value,
    ) -> Result<bool, CryptoError> {
        let paths = personal_paths(payload, sections, metadata);
        for (path, field) in &paths {
            let root = if field.starts_with("metadata.") {
                &mut *metadata
            } else {
                &mut *payload
            };
            if let Some(slot) = get_mut(root, path) {
                *slot = Self::encrypt_value(key, org, subject, field, slot)?;
            }
        }
        Ok(!paths.is_empty())
    }

    /// Encrypts, in place, every personal member of an event about `subject`.
    pub async fn encrypt_event(
        &self,
        client: &impl GenericClient,
        org: &Uuid,
        subject: &str,
        sections: &[&str],
        payload: &mut Value,
        metadata: &mut Value,
    ) -> Result<Option<DataKey>, CryptoError> {
        let paths = personal_paths(payload, sections, metadata);
        if paths.is_empty() {
            return Ok(None);
        }
        let key = self.key_for_writing(client, org, subject).await?;
        for (path, field) in paths {
            let root = if field.starts_with("metadata.") {
                &mut *metadata
            } else {
                &mut *payload
            };
            if let Some(slot) = get_mut(root, &path) {
                *slot = Self::encrypt_value(&key, org, subject, &field, slot)?;
            }
        }
        Ok(Some(key))
    }

    /// Decrypts, in place, every `enc:v1:` member of a stored event. Values whose key was
    /// destroyed become `null`: the event stays readable, the personal data does not.
    pub async fn decrypt_event(
        &self,
        client: &impl GenericClient,
        org: &Uuid,
        subject: &str,
        payload: &mut Value,
        metadata: &mut Value,
    ) -> Result<(), CryptoError> {
        let targets = encrypted_members(payload, metadata);
        if targets.is_empty() {
            return Ok(());
        }
        let key = self.key_for_reading(client, org, subject).await?;
        decrypt_members(key.as_ref(), org, subject, targets, payload, metadata);
        Ok(())
    }
}

impl Crypto {
    /// Like [`Crypto::decrypt_event`], with the subject's wrapped key as read from
    /// `data_keys` by the caller (`None`: destroyed or never created, so the personal
    /// members become `null`). No I/O and no cache: for bulk readers (a rebuild) that
    /// read the wrapped keys in the same snapshot as the events.
    pub fn decrypt_event_with_wrapped(
        &self,
        org: &Uuid,
        subject: &str,
        wrapped: Option<&[u8]>,
        payload: &mut Value,
        metadata: &mut Value,
    ) -> Result<(), CryptoError> {
        let targets = encrypted_members(payload, metadata);
        if targets.is_empty() {
            return Ok(());
        }
        let key = wrapped
            .map(|w| self.unwrap_key(org, subject, w))
            .transpose()?;
        decrypt_members(key.as_ref(), org, subject, targets, payload, metadata);
        Ok(())
    }
}

/// (in metadata?, JSON path, field name) of every encrypted member of an event.
type Members = Vec<(bool, Vec<String>, String)>;

fn encrypted_members(payload: &Value, metadata: &Value) -> Members {
    let mut targets = Vec::new();
    if let Some((variant, body)) = payload.as_object().and_then(|o| o.iter().next()) {
        if let Some(body) = body.as_object() {
            for (section, inner) in body {
                if let Some(inner) = inner.as_object() {
                    for (member, v) in inner {
                        if v.as_str().is_some_and(|s| s.starts_with(ENCRYPTED_PREFIX)) {
                            targets.push((
                                false,
                                vec![variant.clone(), section.clone(), member.clone()],
                                format!("{section}.{member}"),
                            ));
                        }
                    }
                }
            }
        }
    }
    for field in crm_domain::metadata::PERSONAL_METADATA_FIELDS {
        if metadata
            .get(*field)
            .and_then(Value::as_str)
            .is_some_and(|s| s.starts_with(ENCRYPTED_PREFIX))
        {
            targets.push((true, vec![(*field).to_owned()], format!("metadata.{field}")));
        }
    }
    targets
}

fn decrypt_members(
    key: Option<&DataKey>,
    org: &Uuid,
    subject: &str,
    targets: Members,
    payload: &mut Value,
    metadata: &mut Value,
) {
    for (is_meta, path, field) in targets {
        let root = if is_meta {
            &mut *metadata
        } else {
            &mut *payload
        };
        if let Some(slot) = get_mut(root, &path) {
            *slot = Crypto::decrypt_value(key, org, subject, &field, slot).unwrap_or(Value::Null);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn crypto() -> Crypto {
        Crypto::new(&KeySettings {
            kek_id: "test".into(),
            kek: SecretString::from(B64.encode([7u8; 32])),
        })
        .unwrap()
    }

    #[test]
    fn values_are_bound_to_their_field_and_subject() {
        let c = crypto();
        let key = c
            .unwrap_key(
                &Uuid::nil(),
                "s",
                &seal(
                    &c.kek,
                    b"crm-dek|00000000-0000-0000-0000-000000000000|s",
                    &[1u8; 32],
                )
                .unwrap(),
            )
            .unwrap();
        let org = Uuid::nil();
        let v = serde_json::json!("ada@example.com");
        let enc = Crypto::encrypt_value(&key, &org, "s", "profile.email", &v).unwrap();
        assert!(!enc.as_str().unwrap().contains("ada"));
        assert_eq!(
            Crypto::decrypt_value(Some(&key), &org, "s", "profile.email", &enc),
            Some(v)
        );
        assert_eq!(
            Crypto::decrypt_value(Some(&key), &org, "s", "profile.phone", &enc),
            None
        );
        assert_eq!(
            Crypto::decrypt_value(Some(&key), &org, "t", "profile.email", &enc),
            None
        );
        assert_eq!(
            Crypto::decrypt_value(None, &org, "s", "profile.email", &enc),
            None
        );
    }

    #[test]
    fn a_short_kek_is_refused() {
        let bad = Crypto::new(&KeySettings {
            kek_id: "x".into(),
            kek: SecretString::from(B64.encode([7u8; 16])),
        });
        assert!(matches!(bad, Err(CryptoError::BadKek)));
    }
}
