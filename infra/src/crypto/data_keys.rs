//! Data keys: one random 256-bit key per subject, created on first use, stored only
//! wrapped by the KEK in `data_keys`, unwrapped on demand and cached briefly.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use deadpool_postgres::GenericClient;
use rand::RngCore;
use uuid::Uuid;

use super::{open, seal, Crypto, CryptoError, DataKey};
use crate::db::Heard;

const CACHE_TTL: Duration = Duration::from_secs(300);

/// `NOTIFY crm_keys, '<org id>'`: sent by the transaction that destroys data keys
/// (an erasure), delivered with its commit; every process forgets the organisation's
/// cached keys ([`Crypto::listen`]).
pub const KEYS_CHANNEL: &str = "crm_keys";
const CACHE_MAX: usize = 200_000;

/// Unwrapped keys by organisation, then subject: a lookup borrows the subject's id (no
/// key string is built for it), and an organisation's keys go at once.
#[derive(Default)]
pub(super) struct KeyCache {
    by_org: HashMap<Uuid, HashMap<String, (DataKey, Instant)>>,
    /// Keys held, over all organisations.
    len: usize,
}

impl KeyCache {
    fn insert(&mut self, org: &Uuid, subject: &str, key: DataKey) {
        let keys = self.by_org.entry(*org).or_default();
        let entry = (key, Instant::now());
        match keys.get_mut(subject) {
            Some(held) => *held = entry,
            None => {
                keys.insert(subject.to_owned(), entry);
                self.len += 1;
            }
        }
    }

    fn remove(&mut self, org: &Uuid, subject: &str) {
        if let Some(keys) = self.by_org.get_mut(org) {
            if keys.remove(subject).is_some() {
                self.len -= 1;
            }
        }
    }

    fn remove_org(&mut self, org: &Uuid) {
        if let Some(keys) = self.by_org.remove(org) {
            self.len -= keys.len();
        }
    }

    fn drop_expired(&mut self) {
        for keys in self.by_org.values_mut() {
            keys.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        self.by_org.retain(|_, keys| !keys.is_empty());
        self.len = self.by_org.values().map(HashMap::len).sum();
    }

    pub(super) fn clear(&mut self) {
        self.by_org.clear();
        self.len = 0;
    }
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

    fn cached(&self, org: &Uuid, subject: &str) -> Option<DataKey> {
        if !self.cache_live.load(Ordering::Acquire) {
            return None;
        }
        let cache = self.cache.lock().expect("key cache poisoned");
        cache
            .by_org
            .get(org)
            .and_then(|keys| keys.get(subject))
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(k, _)| k.clone())
    }

    /// Caches a key; call only once the key is committed.
    pub fn remember(&self, org: &Uuid, subject: &str, key: &DataKey) {
        let mut cache = self.cache.lock().expect("key cache poisoned");
        if cache.len >= CACHE_MAX {
            // Expired entries first; everything only if the live ones fill it (rare:
            // emptying it at once makes every subject a query again).
            cache.drop_expired();
            if cache.len >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(org, subject, key.clone());
    }

    /// Forgets a cached key (after it was destroyed).
    pub fn forget(&self, org: &Uuid, subject: &str) {
        let mut cache = self.cache.lock().expect("key cache poisoned");
        cache.remove(org, subject);
    }

    /// Forgets every cached key of `org` (another process destroyed some).
    pub fn forget_org(&self, org: &Uuid) {
        let mut cache = self.cache.lock().expect("key cache poisoned");
        cache.remove_org(org);
    }

    /// LISTENs for destroyed keys ([`KEYS_CHANNEL`]) until `shutdown`: each notification
    /// empties the organisation's cached keys; while the listener is disconnected no
    /// cached key is used.
    pub async fn listen(
        self: Arc<Self>,
        pg: tokio_postgres::Config,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let me = self.clone();
        let on = Arc::new(move |heard: Heard<'_>| match heard {
            Heard::Live(live) => {
                me.cache.lock().expect("key cache poisoned").clear();
                me.cache_live.store(live, Ordering::Release);
            }
            Heard::Notification { payload, .. } => match payload.parse::<Uuid>() {
                Ok(org) => me.forget_org(&org),
                Err(_) => me.cache.lock().expect("key cache poisoned").clear(),
            },
        });
        crate::db::listen(pg, &[KEYS_CHANNEL], "data key cache", on, shutdown).await;
    }

    pub(super) fn unwrap_key(
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
        owners: &[Uuid],
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
                "INSERT INTO data_keys (org_id, subject_id, kek_id, wrapped_key, owners) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[org, &subject, &self.kek_id, &wrapped, &owners],
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

    /// The subject's key: the cached one, else `wrapped` (as read from `data_keys` in
    /// the reader's snapshot; `None`: destroyed or never created) unwrapped and cached,
    /// as [`Self::key_for_reading`] caches what it reads. No I/O.
    pub fn key_from_wrapped(
        &self,
        org: &Uuid,
        subject: &str,
        wrapped: Option<&[u8]>,
    ) -> Result<Option<DataKey>, CryptoError> {
        if let Some(k) = self.cached(org, subject) {
            return Ok(Some(k));
        }
        let Some(wrapped) = wrapped else {
            return Ok(None);
        };
        let key = self.unwrap_key(org, subject, wrapped)?;
        self.remember(org, subject, &key);
        Ok(Some(key))
    }

    /// Reads the keys of `subjects` that are not cached, in one query, and caches them
    /// (a destroyed key stays absent): for a batch of events about to be decrypted one
    /// by one, which would otherwise each wait for a query of its own.
    pub async fn prefetch_keys(
        &self,
        client: &impl GenericClient,
        subjects: &[(Uuid, &str)],
    ) -> Result<(), CryptoError> {
        let mut missing: Vec<(Uuid, &str)> = subjects
            .iter()
            .filter(|(org, subject)| self.cached(org, subject).is_none())
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        let (orgs, ids): (Vec<Uuid>, Vec<&str>) = missing.into_iter().unzip();
        let stmt = client
            .prepare_cached(
                "SELECT d.org_id, d.subject_id, d.wrapped_key FROM data_keys d \
                 JOIN unnest($1::uuid[], $2::text[]) AS s (org_id, subject_id) \
                   ON d.org_id = s.org_id AND d.subject_id = s.subject_id \
                 WHERE d.wrapped_key IS NOT NULL",
            )
            .await?;
        for row in client.query(&stmt, &[&orgs, &ids]).await? {
            let (org, subject): (Uuid, String) = (row.get(0), row.get(1));
            let key = self.unwrap_key(&org, &subject, &row.get::<_, Vec<u8>>(2))?;
            self.remember(&org, &subject, &key);
        }
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DataKey {
        DataKey(Arc::new(Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap()))
    }

    #[test]
    fn the_key_cache_counts_what_it_holds_and_forgets_by_subject_or_organisation() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut cache = KeyCache::default();
        cache.insert(&a, "s1", key());
        cache.insert(&a, "s1", key()); // again: replaced, not counted twice
        cache.insert(&a, "s2", key());
        cache.insert(&b, "s1", key());
        assert_eq!(cache.len, 3);
        assert!(cache.by_org[&b].contains_key("s1"));
        cache.remove(&a, "s1");
        cache.remove(&a, "nobody");
        assert_eq!(cache.len, 2);
        assert!(!cache.by_org[&a].contains_key("s1"));
        cache.remove_org(&a);
        assert_eq!((cache.len, cache.by_org.contains_key(&a)), (1, false));
        cache.drop_expired();
        assert_eq!(cache.len, 1, "nothing expired yet");
        cache.clear();
        assert_eq!((cache.len, cache.by_org.len()), (0, 0));
    }
}
