//! Personal members of events: which they are, and their encryption under the
//! subject's data key, each bound to its organisation, subject and field.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use deadpool_postgres::GenericClient;
use serde_json::Value;
use uuid::Uuid;

use super::{field_aad, open, seal, Crypto, CryptoError, DataKey};

/// Prefix of an encrypted JSON string value: `enc:v1:<base64(nonce ‖ ciphertext)>`.
pub const ENCRYPTED_PREFIX: &str = "enc:v1:";

impl Crypto {
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

impl Crypto {
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

    /// Encrypts, in place, every personal member of an event about `subject`; a key
    /// created for it records `owners` (whose erasure destroys it too).
    #[allow(clippy::too_many_arguments)]
    pub async fn encrypt_event(
        &self,
        client: &impl GenericClient,
        org: &Uuid,
        subject: &str,
        owners: &[Uuid],
        sections: &[&str],
        payload: &mut Value,
        metadata: &mut Value,
    ) -> Result<Option<DataKey>, CryptoError> {
        let paths = personal_paths(payload, sections, metadata);
        if paths.is_empty() {
            return Ok(None);
        }
        let key = match self.key_for_writing(client, org, subject, owners).await {
            Ok(key) => key,
            // The subject was erased. What is recorded about it from now on (an
            // outcome, an export) carries no personal data of its own; the actor's IP
            // address and user agent are left out rather than kept in clear. New
            // personal data of an erased subject is refused.
            Err(CryptoError::Erased) if paths.iter().all(|(_, f)| f.starts_with("metadata.")) => {
                if let Value::Object(m) = metadata {
                    for (path, _) in &paths {
                        m.remove(&path[0]);
                    }
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
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
    /// Decrypts, in place, every `enc:v1:` member of a stored event's payload with `key`
    /// (`None`: destroyed or never created, so they become `null`). No I/O: for readers
    /// that found the key already ([`Crypto::key_from_wrapped`]) and read no metadata
    /// (a load folding an aggregate).
    pub fn decrypt_payload_with_key(
        key: Option<&DataKey>,
        org: &Uuid,
        subject: &str,
        payload: &mut Value,
    ) {
        let mut no_metadata = Value::Null;
        let targets = encrypted_members(payload, &no_metadata);
        if !targets.is_empty() {
            decrypt_members(key, org, subject, targets, payload, &mut no_metadata);
        }
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
    use crate::settings::KeySettings;
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
}
