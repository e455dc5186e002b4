//! Consent receipts: a compact JWS (RFC 7515; `alg` EdDSA, Ed25519, RFC 8037) over
//! the claims of one consent change, which the contact or an auditor verifies offline
//! with any JOSE library against the keys published at `/.well-known/jwks.json`.
//!
//! - [`ReceiptSigner`]: signs ([`ReceiptSigner::sign`]), issues once per event
//!   ([`ReceiptSigner::issue`]), rotates the key ([`ReceiptSigner::rotate`]) and lists
//!   every key as a JWKS ([`ReceiptSigner::jwks`]);
//! - [`load`] and [`store`]: the issued receipts in `consent_receipts`.
//!
//! The claims are built by the consent code; this module signs any JSON object as it
//! is given (the payload is its compact serialisation, members in sorted order).
//!
//! Invariants: exactly one key signs at a time (`receipt_keys`: the one not retired,
//! a partial unique index); a private key leaves memory only wrapped by the KEK, with
//! its kid in the AAD; a key is never deleted, so every receipt ever issued stays
//! verifiable against the JWKS; a receipt is issued at most once per (org, event), and
//! whoever loses a race gets the one stored. A kid is the key's JWK thumbprint (RFC
//! 7638), so it names exactly one public key.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use deadpool_postgres::{GenericClient, Pool};
use ed25519_dalek::{Signer, SigningKey};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::crypto::{Crypto, CryptoError};
use crate::read_models::{pipelined_in_org, Scope};

/// How long a process signs with the key it last read: a rotation by another process
/// is followed within this time (receipts signed meanwhile with the retired key stay
/// verifiable: it stays in the JWKS).
const ACTIVE_KEY_TTL: Duration = Duration::from_secs(60);

/// How long a process answers the JWKS it last read (a public route, not rate
/// limited: at most one query per this time, however many ask). A rotation in this
/// process shows at once; one in another process within this time.
const JWKS_TTL: Duration = Duration::from_secs(10);

/// One transaction-level advisory lock serialises rotations (a second rotation waits,
/// then retires the first one's new key rather than colliding with it).
const ROTATION_LOCK: i64 = 0x6372_6d5f_7263_7074; // "crm_rcpt"

/// An issued receipt: the compact JWS and the id of the key that signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub kid: String,
    pub jws: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt claims must be a JSON object")]
    ClaimsNotAnObject,
    #[error("receipt key {kid}: {problem}")]
    BadKey { kid: String, problem: &'static str },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// The key that signs now, unwrapped.
struct ActiveKey {
    kid: String,
    key: SigningKey,
}

struct Inner {
    pool: Pool,
    crypto: Arc<Crypto>,
    active: Mutex<Option<(Arc<ActiveKey>, Instant)>>,
    jwks: Mutex<Option<(Value, Instant)>>,
}

/// Signs receipts with the active key, read from `receipt_keys` (created there on
/// first use) and kept in memory for [`ACTIVE_KEY_TTL`]. Cheap to clone.
#[derive(Clone)]
pub struct ReceiptSigner(Arc<Inner>);

impl ReceiptSigner {
    pub fn new(pool: Pool, crypto: Arc<Crypto>) -> Self {
        Self(Arc::new(Inner {
            pool,
            crypto,
            active: Mutex::new(None),
            jwks: Mutex::new(None),
        }))
    }

    /// A compact JWS over `claims` (a JSON object), header
    /// `{"alg":"EdDSA","kid":…,"typ":"JWT"}`, signed with the active key.
    pub async fn sign(&self, claims: &Value) -> Result<Receipt, ReceiptError> {
        if !claims.is_object() {
            return Err(ReceiptError::ClaimsNotAnObject);
        }
        let active = self.active_key().await?;
        Ok(sign_with(&active.kid, &active.key, claims))
    }

    /// The receipt of event `event_id`: the one stored, else a new one signed over
    /// `claims` and stored. Idempotent; when two race, both return the stored one.
    /// `client` is a pooled connection, not in a transaction: each step is a transaction
    /// of its own that names `org_id`.
    pub async fn issue(
        &self,
        client: &deadpool_postgres::Object,
        org_id: Uuid,
        event_id: Uuid,
        claims: &Value,
    ) -> Result<Receipt, ReceiptError> {
        if let Some(receipt) = load_scoped(client, org_id, event_id).await? {
            return Ok(receipt);
        }
        let receipt = self.sign(claims).await?;
        store(client, org_id, event_id, &receipt).await
    }

    /// Retires the active key and makes a new one, in one transaction; returns the
    /// new kid. The retired key stays in the JWKS. This process signs with the new
    /// key at once; others within [`ACTIVE_KEY_TTL`].
    pub async fn rotate(&self) -> Result<String, ReceiptError> {
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ROTATION_LOCK])
            .await?;
        tx.execute(
            "UPDATE receipt_keys SET retired_at = now() WHERE retired_at IS NULL",
            &[],
        )
        .await?;
        let (new, row) = self.new_key()?;
        row.insert(&tx).await?;
        tx.commit().await?;
        let kid = new.kid.clone();
        self.remember(Arc::new(new));
        *self.0.jwks.lock().expect("jwks poisoned") = None;
        Ok(kid)
    }

    /// Every key, retired ones included, as a JWK Set (RFC 7517; OKP keys, RFC 8037),
    /// oldest first. Makes the first key when there is none yet, so the set always
    /// holds the key that signs next. Read again at most every [`JWKS_TTL`].
    pub async fn jwks(&self) -> Result<Value, ReceiptError> {
        if let Some((set, at)) = self.0.jwks.lock().expect("jwks poisoned").as_ref() {
            if at.elapsed() < JWKS_TTL {
                return Ok(set.clone());
            }
        }
        self.active_key().await?;
        let client = self.0.pool.get().await?;
        let rows = client
            .query(
                "SELECT kid, public_key FROM receipt_keys ORDER BY created_at, kid",
                &[],
            )
            .await?;
        let keys: Vec<Value> = rows
            .iter()
            .map(|r| {
                let kid: String = r.get(0);
                let public: Vec<u8> = r.get(1);
                json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": B64URL.encode(public),
                    "kid": kid,
                    "use": "sig",
                    "alg": "EdDSA",
                })
            })
            .collect();
        let set = json!({ "keys": keys });
        *self.0.jwks.lock().expect("jwks poisoned") = Some((set.clone(), Instant::now()));
        Ok(set)
    }

    /// The key that signs now: from memory while fresh, else the stored active key,
    /// made (race-safe: the partial unique index, `ON CONFLICT DO NOTHING`, then read
    /// back whichever won) when there is none.
    async fn active_key(&self) -> Result<Arc<ActiveKey>, ReceiptError> {
        if let Some((key, at)) = self.0.active.lock().expect("receipt key poisoned").as_ref() {
            if at.elapsed() < ACTIVE_KEY_TTL {
                return Ok(key.clone());
            }
        }
        let client = self.0.pool.get().await?;
        let key = match self.read_active(&client).await? {
            Some(key) => key,
            None => {
                let (_, row) = self.new_key()?;
                row.insert_unless_active(&client).await?;
                self.read_active(&client)
                    .await?
                    .expect("an active receipt key exists after inserting one")
            }
        };
        let key = Arc::new(key);
        self.remember(key.clone());
        Ok(key)
    }

    fn remember(&self, key: Arc<ActiveKey>) {
        *self.0.active.lock().expect("receipt key poisoned") = Some((key, Instant::now()));
    }

    async fn read_active(
        &self,
        client: &impl GenericClient,
    ) -> Result<Option<ActiveKey>, ReceiptError> {
        let Some(row) = client
            .query_opt(
                "SELECT kid, public_key, wrapped_key FROM receipt_keys WHERE retired_at IS NULL",
                &[],
            )
            .await?
        else {
            return Ok(None);
        };
        let kid: String = row.get(0);
        let public: Vec<u8> = row.get(1);
        let wrapped: Vec<u8> = row.get(2);
        let secret = self.0.crypto.unwrap_secret(&key_aad(&kid), &wrapped)?;
        let secret: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| ReceiptError::BadKey {
                kid: kid.clone(),
                problem: "the private key is not 32 bytes",
            })?;
        let key = SigningKey::from_bytes(&secret);
        if key.verifying_key().as_bytes().as_slice() != public.as_slice() {
            return Err(ReceiptError::BadKey {
                kid,
                problem: "the private key does not match the public key",
            });
        }
        Ok(Some(ActiveKey { kid, key }))
    }

    /// A fresh key, and its row (private half wrapped), not stored yet.
    fn new_key(&self) -> Result<(ActiveKey, KeyRow), ReceiptError> {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let key = SigningKey::from_bytes(&secret);
        secret.fill(0);
        let public = key.verifying_key().to_bytes();
        let kid = thumbprint(&public);
        let wrapped = self.0.crypto.wrap_secret(&key_aad(&kid), key.as_bytes())?;
        let row = KeyRow {
            kid: kid.clone(),
            public: public.to_vec(),
            kek_id: self.0.crypto.kek_id().to_owned(),
            wrapped,
        };
        Ok((ActiveKey { kid, key }, row))
    }
}

/// A new `receipt_keys` row.
struct KeyRow {
    kid: String,
    public: Vec<u8>,
    kek_id: String,
    wrapped: Vec<u8>,
}

impl KeyRow {
    const INSERT: &'static str = "INSERT INTO receipt_keys (kid, public_key, kek_id, wrapped_key) \
                                  VALUES ($1, $2, $3, $4)";

    async fn insert(&self, client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                Self::INSERT,
                &[&self.kid, &self.public, &self.kek_id, &self.wrapped],
            )
            .await
            .map(drop)
    }

    /// Inserts unless a key is active already (another process made one meanwhile).
    async fn insert_unless_active(
        &self,
        client: &impl GenericClient,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                &format!("{} ON CONFLICT DO NOTHING", Self::INSERT),
                &[&self.kid, &self.public, &self.kek_id, &self.wrapped],
            )
            .await
            .map(drop)
    }
}

/// The AAD a receipt key is wrapped with: the key cannot be swapped for another row's.
fn key_aad(kid: &str) -> String {
    format!("receipt-key|{kid}")
}

/// The JWK thumbprint (RFC 7638) of an Ed25519 public key: SHA-256 over its required
/// members in lexicographic order, base64url.
fn thumbprint(public: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64URL.encode(public)
    );
    B64URL.encode(Sha256::digest(canonical.as_bytes()))
}

/// The compact JWS of `claims` under `key`.
fn sign_with(kid: &str, key: &SigningKey, claims: &Value) -> Receipt {
    let header = json!({ "alg": "EdDSA", "kid": kid, "typ": "JWT" });
    let signing_input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    let signature = key.sign(signing_input.as_bytes());
    Receipt {
        kid: kid.to_owned(),
        jws: format!("{signing_input}.{}", B64URL.encode(signature.to_bytes())),
    }
}

/// The receipt issued for `event_id`, if any. `client` must be inside a transaction
/// that named `org_id` (row-level security: `read_models::org_scope` does, and may
/// be read-only); elsewhere nothing is found.
pub async fn load(
    client: &impl GenericClient,
    org_id: Uuid,
    event_id: Uuid,
) -> Result<Option<Receipt>, ReceiptError> {
    let row = client
        .query_opt(
            "SELECT kid, jws FROM consent_receipts WHERE org_id = $1 AND event_id = $2",
            &[&org_id, &event_id],
        )
        .await?;
    Ok(row.map(|r| Receipt {
        kid: r.get(0),
        jws: r.get(1),
    }))
}

/// Stores `receipt` as the receipt of `event_id` unless one is stored already, and
/// returns the one stored. One short transaction of its own on `client` (a pooled
/// connection, not in a transaction), which names `org_id` for row-level security,
/// sent in one round trip.
///
/// The commit does not wait for its WAL flush (`synchronous_commit = off` for this
/// transaction): a stored receipt is a copy of what its event and the key can always
/// give again, so one lost in a crash right after is simply signed again when it is
/// next asked for ([`ReceiptSigner::issue`]), while every consent change no longer
/// pays a second synchronous flush after its event's.
pub async fn store(
    client: &deadpool_postgres::Object,
    org_id: Uuid,
    event_id: Uuid,
    receipt: &Receipt,
) -> Result<Receipt, ReceiptError> {
    let insert = client
        .prepare_cached(
            "INSERT INTO consent_receipts (org_id, event_id, kid, jws) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING RETURNING kid, jws",
        )
        .await?;
    let inserted = pipelined_in_org(
        client,
        org_id,
        Scope::UnflushedWrite,
        &insert,
        &[&org_id, &event_id, &receipt.kid, &receipt.jws],
    )
    .await?;
    match inserted.first() {
        Some(r) => Ok(Receipt {
            kid: r.get(0),
            jws: r.get(1),
        }),
        // Stored already (a racing issue won): that one.
        None => Ok(load_scoped(client, org_id, event_id)
            .await?
            .expect("a receipt is stored when inserting one conflicts")),
    }
}

/// [`load`] in a read-only transaction of its own that names `org_id`, in one round
/// trip.
async fn load_scoped(
    client: &deadpool_postgres::Object,
    org_id: Uuid,
    event_id: Uuid,
) -> Result<Option<Receipt>, ReceiptError> {
    let select = client
        .prepare_cached("SELECT kid, jws FROM consent_receipts WHERE org_id = $1 AND event_id = $2")
        .await?;
    let rows =
        pipelined_in_org(client, org_id, Scope::Read, &select, &[&org_id, &event_id]).await?;
    Ok(rows.first().map(|r| Receipt {
        kid: r.get(0),
        jws: r.get(1),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier};

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42u8; 32])
    }

    fn parts(jws: &str) -> Vec<&str> {
        jws.split('.').collect()
    }

    fn decode(part: &str) -> Value {
        serde_json::from_slice(&B64URL.decode(part).unwrap()).unwrap()
    }

    fn claims() -> Value {
        json!({
            "iss": "crm",
            "sub": "0190a0b0-0000-7000-8000-000000000001",
            "jti": "0190a0b0-0000-7000-8000-000000000002",
            "iat": 1_750_000_000,
            "consent": { "channel": "email", "status": "granted" },
            "event_hash": "ab".repeat(32),
        })
    }

    #[test]
    fn a_receipt_is_a_compact_jws_with_the_eddsa_header_and_the_claims() {
        let r = sign_with("kid-1", &key(), &claims());
        assert_eq!(r.kid, "kid-1");
        let p = parts(&r.jws);
        assert_eq!(p.len(), 3);
        assert!(p
            .iter()
            .all(|s| !s.contains(['=', '+', '/']) && !s.is_empty()));
        assert_eq!(
            decode(p[0]),
            json!({ "alg": "EdDSA", "kid": "kid-1", "typ": "JWT" })
        );
        assert_eq!(decode(p[1]), claims());
        assert_eq!(B64URL.decode(p[2]).unwrap().len(), 64);
    }

    #[test]
    fn the_signature_verifies_with_the_public_key() {
        let r = sign_with("kid-1", &key(), &claims());
        let p = parts(&r.jws);
        let sig = Signature::from_slice(&B64URL.decode(p[2]).unwrap()).unwrap();
        let input = format!("{}.{}", p[0], p[1]);
        key()
            .verifying_key()
            .verify(input.as_bytes(), &sig)
            .expect("verifies");
        assert!(SigningKey::from_bytes(&[7u8; 32])
            .verifying_key()
            .verify(input.as_bytes(), &sig)
            .is_err());
    }

    #[test]
    fn a_tampered_payload_or_header_fails() {
        let r = sign_with("kid-1", &key(), &claims());
        let p = parts(&r.jws);
        let sig = Signature::from_slice(&B64URL.decode(p[2]).unwrap()).unwrap();
        let mut changed = claims();
        changed["consent"]["status"] = json!("withdrawn");
        let forged = format!("{}.{}", p[0], B64URL.encode(changed.to_string()));
        assert!(key()
            .verifying_key()
            .verify(forged.as_bytes(), &sig)
            .is_err());
        let other_kid =
            B64URL.encode(json!({ "alg": "EdDSA", "kid": "kid-2", "typ": "JWT" }).to_string());
        let forged = format!("{other_kid}.{}", p[1]);
        assert!(key()
            .verifying_key()
            .verify(forged.as_bytes(), &sig)
            .is_err());
    }

    #[test]
    fn the_kid_is_the_rfc_7638_thumbprint() {
        // RFC 8037, appendix A.3: the thumbprint of its example Ed25519 key.
        let x = B64URL
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        assert_eq!(
            thumbprint(&x.try_into().unwrap()),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn ed25519_matches_rfc_8032() {
        // RFC 8037, appendix A.4: the example key signing "Example of Ed25519 signing".
        let d: [u8; 32] = B64URL
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap()
            .try_into()
            .unwrap();
        let input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
        let sig = SigningKey::from_bytes(&d).sign(input.as_bytes());
        assert_eq!(
            B64URL.encode(sig.to_bytes()),
            "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
    }
}
