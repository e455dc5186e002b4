//! One catalogue event as the hub holds it. It arrives as the relay published it
//! (personal members encrypted); it is decrypted the first time a connection needs it
//! (once per process, whatever the number of connections), and its SSE frame is built
//! once per distinct policy and shared by every connection holding that policy.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use crm_domain::access::Policy;
use crm_domain::public_events::{self, Entry, Source};
use serde_json::Value;
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::crypto::Crypto;
use crate::store::event_store::{CommitKey, RawEvent};

/// What decoding gave: the payload with personal members decrypted (`null` where the
/// key is destroyed), and the actor.
struct Decoded {
    payload: Value,
    actor_kind: String,
    actor_id: String,
}

/// A catalogue event, shared by the ring and every connection's buffer.
pub struct LiveEvent {
    pub key: CommitKey,
    pub org_id: Uuid,
    pub entry: &'static Entry,
    raw: RawEvent,
    decoded: OnceCell<Option<Decoded>>,
    /// The frame for each policy seen so far (`None`: not offered to that policy).
    frames: Mutex<Vec<(Arc<Policy>, Option<Bytes>)>>,
}

impl std::fmt::Debug for LiveEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No payload: it may hold personal data.
        f.debug_struct("LiveEvent")
            .field("position", &self.key.position)
            .field("type", &self.entry.public)
            .finish()
    }
}

impl LiveEvent {
    /// `None` for an event outside the catalogue (never offered).
    pub fn new(raw: RawEvent) -> Option<Self> {
        let entry = public_events::entry(&raw.event_type)?;
        Some(Self {
            key: raw.commit_key(),
            org_id: raw.org_id,
            entry,
            raw,
            decoded: OnceCell::new(),
            frames: Mutex::new(Vec::new()),
        })
    }

    pub fn position(&self) -> i64 {
        self.key.position
    }

    pub fn aggregate_type(&self) -> &str {
        &self.raw.aggregate_type
    }

    pub fn aggregate_id(&self) -> &str {
        &self.raw.aggregate_id
    }

    async fn decoded(&self, crypto: &Crypto, pool: &deadpool_postgres::Pool) -> Option<&Decoded> {
        self.decoded
            .get_or_init(|| async {
                let mut payload: Value = serde_json::from_str(self.raw.payload.get()).ok()?;
                let metadata: Value = serde_json::from_str(self.raw.metadata.get()).ok()?;
                if self.raw.payload.get().contains("enc:v1:") {
                    let client = match pool.get().await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(position = self.key.position, error = %e, "live: no connection to decrypt an event; skipped");
                            return None;
                        }
                    };
                    let mut no_metadata = Value::Null;
                    if let Err(e) = crypto
                        .decrypt_event(
                            &client,
                            &self.raw.org_id,
                            &self.raw.aggregate_id,
                            &mut payload,
                            &mut no_metadata,
                        )
                        .await
                    {
                        tracing::warn!(position = self.key.position, error = %e, "live: event not decrypted; skipped");
                        return None;
                    }
                }
                let principal = metadata.get("principal");
                let text = |name: &str| {
                    principal
                        .and_then(|p| p.get(name))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                Some(Decoded {
                    payload,
                    actor_kind: text("kind"),
                    actor_id: text("id"),
                })
            })
            .await
            .as_ref()
    }

    /// The SSE frame of this event for `policy` (`id`, `event`, `data`), or `None` when
    /// the policy may not receive it (or it could not be decoded).
    pub async fn frame(
        &self,
        policy: &Arc<Policy>,
        crypto: &Crypto,
        pool: &deadpool_postgres::Pool,
    ) -> Option<Bytes> {
        if let Some(hit) = self.cached_frame(policy) {
            return hit;
        }
        if !policy.allows(self.entry.needs) {
            return self.remember(policy, None);
        }
        let decoded = self.decoded(crypto, pool).await?;
        let timestamp = public_events::timestamp(&self.raw.recorded_at);
        let source = Source {
            event_id: self.raw.event_id,
            position: self.key.position,
            event_type: &self.raw.event_type,
            aggregate_type: &self.raw.aggregate_type,
            aggregate_id: &self.raw.aggregate_id,
            payload: &decoded.payload,
            timestamp: &timestamp,
            actor_kind: &decoded.actor_kind,
            actor_id: &decoded.actor_id,
        };
        let frame = public_events::shape(&source, policy).map(|shaped| {
            // serde_json never writes a raw newline inside a value: one `data:` line.
            Bytes::from(format!(
                "id: {}\nevent: {}\ndata: {}\n\n",
                self.key.position, shaped.public_type, shaped.body
            ))
        });
        self.remember(policy, frame)
    }

    fn cached_frame(&self, policy: &Arc<Policy>) -> Option<Option<Bytes>> {
        let frames = self.frames.lock().expect("frames lock");
        frames
            .iter()
            .find(|(p, _)| Arc::ptr_eq(p, policy) || **p == **policy)
            .map(|(_, f)| f.clone())
    }

    fn remember(&self, policy: &Arc<Policy>, frame: Option<Bytes>) -> Option<Bytes> {
        let mut frames = self.frames.lock().expect("frames lock");
        if !frames
            .iter()
            .any(|(p, _)| Arc::ptr_eq(p, policy) || **p == **policy)
        {
            frames.push((policy.clone(), frame.clone()));
        }
        frame
    }
}
