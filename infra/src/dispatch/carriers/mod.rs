//! Carriers: the adapters that hand one outbound message to the outside world, and
//! how the one for an (organisation, channel) is found.
//!
//! - [`smtp`]: email through an SMTP relay (lettre; `smtp://`, `smtp+starttls://`,
//!   `smtps://`), `Message-ID: <{key}@{from domain}>`, RFC 8058 one-click unsubscribe;
//! - [`twilio`]: SMS and WhatsApp through a Twilio-shaped Messages API, with the key in
//!   `I-Twilio-Idempotency-Token` and `Idempotency-Key`;
//! - [`spool`]: the default without a carrier: one RFC 5322 file per message in the
//!   spool directory, named by the key (a retry overwrites, never duplicates);
//! - [`credentials`]: an organisation's carrier per channel, its secret in the vault
//!   (`crate::vault`), every decryption recorded as a `CarrierSecretDecrypted` event.
//!
//! Invariants: a message is sent under its one idempotency key (the message id) on
//! every attempt; a [`CarrierError`] says whether a retry may succeed and never carries
//! a secret or a message body; a secret is decrypted only after its decryption is on
//! record, and the built adapter is kept in memory for [`CACHE_TTL`] (so not every
//! message decrypts). A carrier configured or removed through this process's executor
//! (with [`Carriers::commit_hook`] registered) is dropped from the cache at once; other
//! processes pick the change up when their entry expires, within [`CACHE_TTL`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cqrs_es::Aggregate;
use crm_domain::carrier::Carrier as CarrierStream;
use crm_domain::consent::Channel;
use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::commands::executor::Executor;
use crate::commands::hooks::{CommitHook, Committed};
use crate::crypto::Crypto;

pub mod credentials;
pub mod smtp;
pub mod spool;
pub mod twilio;

/// How long a built adapter (and so a decrypted secret) is kept in memory.
pub const CACHE_TTL: Duration = Duration::from_secs(5 * 60);

/// One message as a carrier gets it.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The message id (e.g. a UUID string): the same on every attempt.
    pub idempotency_key: String,
    /// Email, SMS or WhatsApp (phone and postal have no adapter: a permanent error).
    pub channel: Channel,
    /// An email address or an E.164 number.
    pub to: String,
    pub subject: Option<String>,
    pub body: String,
    /// One-click unsubscribe (RFC 8058), email only.
    pub unsubscribe_url: Option<String>,
}

/// A carrier took the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// `smtp`, `twilio` or `spool`.
    pub carrier: String,
    /// The carrier's id for it, when it gives one (Twilio's `sid`, the Message-ID).
    pub carrier_message_id: Option<String>,
}

/// A carrier did not take the message. `message` never holds a secret or a body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CarrierError {
    /// Whether the same message may succeed later (a timeout, a 4xx SMTP reply, an
    /// HTTP 429 or 5xx), or never will (a 5xx SMTP reply, another HTTP 4xx).
    pub retryable: bool,
    pub message: String,
}

impl CarrierError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }

    fn no_carrier(channel: Channel) -> Self {
        Self::permanent(format!("no carrier configured for {}", channel.name()))
    }
}

/// Sends one message; called at least once per message, always with the same key.
#[async_trait::async_trait]
pub trait Carrier: Send + Sync {
    async fn send(&self, msg: &Outbound) -> Result<Delivered, CarrierError>;
}

/// The process's own carrier, for organisations that configured none.
#[derive(Debug, Clone)]
pub struct CarrierDefaults {
    /// `CRM_SMTP_URL`: email through this relay (user and password may be in the URL).
    pub smtp_url: Option<String>,
    /// `CRM_MAIL_FROM`: the sender of email sent through the defaults.
    pub mail_from: String,
    /// `CRM_MAIL_SPOOL_DIR`: every other message is written here; unset: refused.
    pub spool_dir: Option<PathBuf>,
}

impl Default for CarrierDefaults {
    fn default() -> Self {
        Self {
            smtp_url: None,
            mail_from: "crm@localhost".into(),
            spool_dir: None,
        }
    }
}

type Key = (Uuid, Channel);

struct Entry {
    carrier: Arc<dyn Carrier>,
    /// The version of the carrier stream it was built from.
    version: i64,
    at: Instant,
}

/// Built adapters per (organisation, channel), and the newest version of each carrier
/// stream this process has seen commit: an adapter built from an older version than
/// that is not kept.
#[derive(Default)]
struct Cache {
    entries: HashMap<Key, Entry>,
    seen: HashMap<Key, i64>,
}

/// The post-commit hook of [`Carriers`] (see [`Carriers::commit_hook`]).
#[derive(Default)]
pub struct CarrierCache(Mutex<Cache>);

impl CarrierCache {
    fn get(&self, key: Key) -> Option<Arc<dyn Carrier>> {
        let cache = self.0.lock().ok()?;
        cache
            .entries
            .get(&key)
            .filter(|e| e.at.elapsed() < CACHE_TTL)
            .map(|e| e.carrier.clone())
    }

    fn put(&self, key: Key, carrier: Arc<dyn Carrier>, version: i64) {
        if let Ok(mut cache) = self.0.lock() {
            if cache.seen.get(&key).is_some_and(|seen| *seen > version) {
                return; // changed since it was read: the next message builds anew
            }
            cache.entries.insert(
                key,
                Entry {
                    carrier,
                    version,
                    at: Instant::now(),
                },
            );
        }
    }

    /// Forgets everything (e.g. after the settings of the process changed).
    pub fn clear(&self) {
        if let Ok(mut cache) = self.0.lock() {
            cache.entries.clear();
        }
    }
}

impl CommitHook for CarrierCache {
    /// A command on a carrier stream committed: an adapter built from an earlier
    /// version of it is dropped (its own `CarrierSecretDecrypted` does not drop the
    /// adapter built from the same version).
    fn committed(&self, commit: &Committed<'_>) {
        if commit.aggregate_type != CarrierStream::TYPE {
            return;
        }
        let Some(channel) = Channel::parse(&commit.outcome.id) else {
            return;
        };
        let key = (commit.org_id, channel);
        let version = commit.outcome.version;
        if let Ok(mut cache) = self.0.lock() {
            let seen = cache.seen.entry(key).or_insert(version);
            *seen = (*seen).max(version);
            if cache.entries.get(&key).is_some_and(|e| e.version < version) {
                cache.entries.remove(&key);
            }
        }
    }
}

/// Finds the carrier of an (organisation, channel): the organisation's own, else the
/// process's defaults.
pub struct Carriers {
    pool: Pool,
    crypto: Arc<Crypto>,
    /// Appends `CarrierSecretDecrypted`; the cache is its hook.
    executor: Executor,
    cache: Arc<CarrierCache>,
    defaults: CarrierDefaults,
    /// Email without an organisation's carrier: through `CRM_SMTP_URL` if set (or why
    /// that URL is unusable), else the spool.
    default_email: Result<Option<Arc<dyn Carrier>>, CarrierError>,
}

impl Carriers {
    /// Must be called inside a tokio runtime (it starts an executor of its own, which
    /// records decryptions and whose commits reach the cache).
    pub fn new(pool: Pool, crypto: Arc<Crypto>, defaults: CarrierDefaults) -> Self {
        let cache = Arc::new(CarrierCache::default());
        let executor = Executor::new(pool.clone(), crypto.clone()).with_hook(cache.clone());
        let default_email = match &defaults.smtp_url {
            Some(url) => smtp::SmtpCarrier::from_url(url, &defaults.mail_from, None)
                .map(|c| Some(Arc::new(c) as Arc<dyn Carrier>)),
            None => Ok(None),
        };
        if let Err(e) = &default_email {
            tracing::error!(error = %e, "CRM_SMTP_URL is unusable: default email is refused");
        }
        Self {
            pool,
            crypto,
            executor,
            cache,
            defaults,
            default_email,
        }
    }

    /// To register with the process's executor (`Executor::with_hook`), so that a
    /// carrier configured or removed through it is dropped from this cache at once.
    pub fn commit_hook(&self) -> Arc<dyn CommitHook> {
        self.cache.clone()
    }

    /// The carrier for `channel` of `org_id`. Decrypts the organisation's secret (on
    /// record first) when the adapter is not cached.
    pub async fn for_channel(
        &self,
        org_id: Uuid,
        channel: Channel,
    ) -> Result<Arc<dyn Carrier>, CarrierError> {
        if matches!(channel, Channel::Phone | Channel::Postal) {
            return Err(CarrierError::permanent(format!(
                "the {} channel has no carrier",
                channel.name()
            )));
        }
        let key = (org_id, channel);
        if let Some(carrier) = self.cache.get(key) {
            return Ok(carrier);
        }
        let resolved =
            credentials::resolve(&self.executor, &self.pool, &self.crypto, org_id, channel).await?;
        let (carrier, version) = match resolved {
            credentials::Resolved::Own { carrier, version } => (carrier, version),
            credentials::Resolved::NoneConfigured { version } => {
                (self.default_for(channel)?, version)
            }
        };
        self.cache.put(key, carrier.clone(), version);
        Ok(carrier)
    }

    fn default_for(&self, channel: Channel) -> Result<Arc<dyn Carrier>, CarrierError> {
        if channel == Channel::Email {
            if let Some(smtp) = self.default_email.clone()? {
                return Ok(smtp);
            }
        }
        match &self.defaults.spool_dir {
            Some(dir) => Ok(Arc::new(spool::SpoolCarrier::new(
                dir.clone(),
                self.defaults.mail_from.clone(),
            ))),
            None => Err(CarrierError::no_carrier(channel)),
        }
    }
}
