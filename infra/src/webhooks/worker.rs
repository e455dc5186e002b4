//! The delivery worker (`crm deliver`, and in `crm serve`): two loops.
//!
//! **Fan-out.** A durable JetStream consumer (`webhooks`, every subject of the events
//! stream) hands over each event in commit order. An event of the public catalogue
//! becomes one `webhook_messages` row per endpoint of its organisation subscribed to
//! its type (`pending`, or `missed` while the endpoint is disabled). The events that
//! are at hand (up to [`FANOUT_BATCH`]) are queued by one statement in one
//! transaction, in feed order; their JetStream messages are acknowledged only after it
//! committed, so an event is never lost between the feed and the queue, and a
//! redelivery adds nothing (one row per endpoint and event). While no organisation has
//! an endpoint the consumer is not read at all (checked every [`ENDPOINTS_CHECK`]): a
//! deployment without webhooks pays nothing per event, and what waits in the stream is
//! read when an endpoint appears (an event goes only to endpoints created before it was
//! recorded, so nothing of the pause is owed to the new one).
//!
//! **Delivery.** Due messages are claimed with `FOR UPDATE SKIP LOCKED` and a lease
//! (any number of workers share the queue; a worker that dies leaves its claims to be
//! taken again once their lease has passed, with the same `webhook-id`). Each attempt is
//! logged before it starts and completed when it ends. The body is shaped at each
//! attempt from the stored event for the endpoint's role (`crm_domain::public_events`),
//! signed (Standard Webhooks) with every valid secret, and POSTed through the network
//! policy's client. A 2xx delivers; anything else is retried on [`SCHEDULE`] (with
//! jitter) until it is exhausted (`failed`). An ordered endpoint gets one message at a
//! time, in feed order. A run of failures disables the endpoint (`auto_disabled`), and
//! its organisation's admins are told.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use chrono::{DateTime, Utc};
use crm_domain::access::{Policy, RoleRef};
use crm_domain::metadata::EventMetadata;
use crm_domain::public_events::{self, Source};
use futures::future::BoxFuture;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::endpoints::{self, EndpointRow};
use super::net::WebhookClient;
use super::signer;
use crate::commands::executor::Executor;
use crate::feed::bus::{self, Bus};
use crate::store::event_store::{self, RawEvent};

/// The durable consumer's name.
pub const CONSUMER: &str = "webhooks";

/// Most events the fan-out queues in one transaction: those the consumer has at hand
/// when it looks, so a quiet feed still goes one event at a time, without waiting.
pub const FANOUT_BATCH: usize = 256;
/// How often the fan-out looks whether any endpoint exists (it reads the feed only
/// while one does).
pub const ENDPOINTS_CHECK: Duration = Duration::from_secs(1);

/// The wait after each failed attempt: 11 attempts over about 24 hours. Each wait is
/// drawn within ±20 % of its value (jitter), so receivers coming back are not hit by
/// every sender at once.
pub const SCHEDULE: [Duration; 10] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(2 * 60),
    Duration::from_secs(10 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(60 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(4 * 3600),
    Duration::from_secs(8 * 3600),
    Duration::from_secs(8 * 3600),
];

/// The time the worker goes by: the system's, or a test's.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told (tests).
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Mutex::new(at))
    }
    pub fn advance(&self, by: chrono::Duration) {
        if let Ok(mut t) = self.0.lock() {
            *t += by;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.0.lock().map(|t| *t).unwrap_or_else(|_| Utc::now())
    }
}

/// The worker's settings (docs/webhooks.md, "Settings").
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Per attempt: connect, TLS, request, answer (`CRM_WEBHOOK_TIMEOUT_SECS`, 10).
    pub attempt_timeout: Duration,
    /// Attempts in flight per worker (`CRM_WEBHOOK_CONCURRENCY`, 64).
    pub concurrency: usize,
    /// Consecutive failed attempts that disable an endpoint
    /// (`CRM_WEBHOOK_DISABLE_AFTER_FAILURES`, 50)...
    pub disable_after_failures: u32,
    /// ...when the first of them is at least this old (`CRM_WEBHOOK_DISABLE_AFTER_SECS`,
    /// 5 days: a receiver that is down for an afternoon is not disabled).
    pub disable_after: Duration,
    /// How long the delivery log is kept (`CRM_WEBHOOK_LOG_DAYS`, 30).
    pub log_days: u32,
    /// Jitter on the schedule (tests turn it off to know when an attempt is due).
    pub jitter: bool,
    /// How often the queue is looked at without a wake-up.
    pub poll: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(10),
            concurrency: 64,
            disable_after_failures: 50,
            disable_after: Duration::from_secs(5 * 24 * 3600),
            log_days: 30,
            jitter: true,
            poll: Duration::from_millis(250),
        }
    }
}

/// Told when an endpoint was disabled automatically (the API mails the admins).
pub type DisabledNotice = Arc<dyn Fn(EndpointRow) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Store(#[from] crate::store::event_store::StoreError),
    #[error(transparent)]
    Admin(#[from] endpoints::WebhookAdminError),
    #[error("JetStream: {0}")]
    Bus(String),
}

pub struct Deliverer {
    pub executor: Executor,
    pub bus: Bus,
    pub client: WebhookClient,
    pub settings: DeliverySettings,
    pub clock: Arc<dyn Clock>,
    pub notice: Option<DisabledNotice>,
    wake: Arc<Notify>,
    /// Decrypted signing keys by (endpoint, version): one recorded decryption per
    /// process and secret.
    keys: Mutex<KeyCache>,
    /// Held while a key is decrypted: concurrent first attempts at an endpoint wait
    /// for the one decryption instead of racing to record their own (the losers'
    /// appends conflicted, and their messages waited for the lease to pass).
    decrypting: tokio::sync::Mutex<()>,
}

/// Signing keys by (endpoint, secret version).
type KeyCache = HashMap<(Uuid, u32), Arc<Vec<u8>>>;

/// A claimed message, with what its attempt needs of its endpoint.
struct Claimed {
    id: Uuid,
    org_id: Uuid,
    endpoint_id: Uuid,
    event_id: Uuid,
    event_type: String,
    attempt: i32,
    url: String,
    role: String,
    secret_version: i32,
    previous_valid_until: Option<DateTime<Utc>>,
}

/// How an attempt ended.
enum Outcome {
    Delivered,
    Failed {
        retry_at: Option<DateTime<Utc>>,
    },
    /// The role may not receive it (any more), or the event is gone: not sent.
    Dropped(&'static str),
}

impl Deliverer {
    pub fn new(
        executor: Executor,
        bus: Bus,
        client: WebhookClient,
        settings: DeliverySettings,
        clock: Arc<dyn Clock>,
        notice: Option<DisabledNotice>,
    ) -> Self {
        Self {
            executor,
            bus,
            client,
            settings,
            clock,
            notice,
            wake: Arc::new(Notify::new()),
            keys: Mutex::default(),
            decrypting: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs both loops (and the log's pruning) until `shutdown`; attempts in flight are
    /// finished and recorded first.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let fanout = {
            let (this, shutdown) = (this.clone(), shutdown.clone());
            tokio::spawn(async move { this.fanout_loop(shutdown).await })
        };
        let prune = {
            let (this, shutdown) = (this.clone(), shutdown.clone());
            tokio::spawn(async move { this.prune_loop(shutdown).await })
        };
        this.delivery_loop(shutdown).await;
        let _ = fanout.await;
        let _ = prune.await;
        tracing::info!("webhook deliverer stopped");
    }

    // ---- fan-out ------------------------------------------------------------------

    async fn fanout_loop(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.clone().fanout_session(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook fan-out session ended; retrying in 250 ms");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
        }
    }

    async fn fanout_session(
        self: Arc<Self>,
        shutdown: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = self
            .bus
            .stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    filter_subject: self.bus.settings.all_subjects(),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| DeliveryError::Bus(e.to_string()))?;
        loop {
            // While no endpoint exists at all, nothing is read: the consumer keeps its
            // place, and what arrives meanwhile waits in the stream. An event can only
            // go to an endpoint created before it was recorded, so when one appears,
            // the events read then (those of the pause first) go exactly where they
            // would have gone. A deployment without webhooks pays one query a second.
            if !self.any_endpoint().await? {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(ENDPOINTS_CHECK) => {}
                }
                continue;
            }
            if self.fan_out_while_wanted(&consumer, shutdown).await? {
                return Ok(());
            }
            tracing::info!("no webhook endpoint left: the fan-out pauses");
        }
    }

    /// Whether any organisation has an endpoint (of any status: a disabled one keeps
    /// its messages as `missed`).
    async fn any_endpoint(&self) -> Result<bool, DeliveryError> {
        let mut client = self.executor.pool().get().await?;
        let tx = crate::read_models::all_orgs_scope(&mut client, true).await?;
        let any: bool = tx
            .query_one("SELECT EXISTS (SELECT 1 FROM webhook_endpoints)", &[])
            .await?
            .get(0);
        tx.commit().await?;
        Ok(any)
    }

    /// Fans out what the consumer hands over until `shutdown` (`true`) or until no
    /// endpoint is left (`false`; messages taken and not acknowledged come again).
    async fn fan_out_while_wanted(
        &self,
        consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>,
        shutdown: &CancellationToken,
    ) -> Result<bool, DeliveryError> {
        // The messages at hand, up to FANOUT_BATCH, without waiting for more.
        let mut batches = consumer
            .messages()
            .await
            .map_err(|e| DeliveryError::Bus(e.to_string()))?
            .ready_chunks(FANOUT_BATCH);
        let mut checked = tokio::time::Instant::now();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(true),
                _ = tokio::time::sleep_until(checked + ENDPOINTS_CHECK) => {
                    if !self.any_endpoint().await? {
                        return Ok(false);
                    }
                    checked = tokio::time::Instant::now();
                    continue;
                }
                m = batches.next() => m,
            };
            let Some(batch) = next else {
                return Err(DeliveryError::Bus("message stream ended".into()));
            };
            let mut messages = Vec::with_capacity(batch.len());
            let mut events = Vec::with_capacity(batch.len());
            for msg in batch {
                // (Those not acknowledged come again after the ack wait, and add nothing.)
                let msg = msg.map_err(|e| DeliveryError::Bus(e.to_string()))?;
                match bus::events_of(&msg.payload) {
                    Err(e) => {
                        tracing::error!(subject = %msg.subject, error = %e, "not an event; skipped");
                    }
                    Ok(group) => events.extend(group),
                }
                messages.push(msg);
            }
            if let Err(e) = self.fan_out(&events).await {
                // Not acknowledged: JetStream hands them out again.
                tracing::warn!(error = %e, events = events.len(), "fan-out failed; retried");
                for msg in &messages {
                    let _ = msg
                        .ack_with(async_nats::jetstream::AckKind::Nak(Some(
                            Duration::from_secs(1),
                        )))
                        .await;
                }
                continue;
            }
            for msg in &messages {
                if let Err(e) = msg.ack().await {
                    tracing::warn!(error = %e, "ack failed: the event comes back (and adds nothing)");
                }
            }
        }
    }

    /// Queues each of `events` for every endpoint of its organisation subscribed to its
    /// type: one statement, one transaction, rows in the events' order (`seq`, which
    /// ordered endpoints follow).
    async fn fan_out(&self, events: &[RawEvent]) -> Result<(), DeliveryError> {
        let mut orgs = Vec::new();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut types = Vec::new();
        let mut recorded = Vec::new();
        for event in events {
            if let Some(entry) = public_events::entry(&event.event_type) {
                orgs.push(event.org_id);
                ids.push(event.event_id);
                positions.push(event.global_position);
                types.push(entry.public);
                recorded.push(event.recorded_at);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let mut client = self.executor.pool().get().await?;
        // The events may be of several organisations: each joins its own endpoints.
        let tx = crate::read_models::all_orgs_scope(&mut client, false).await?;
        let added = tx
            .execute(
                "INSERT INTO webhook_messages \
                   (id, org_id, endpoint_id, event_id, position, event_type, status, next_attempt_at) \
                 SELECT gen_random_uuid(), e.org_id, e.endpoint_id, ev.event_id, ev.position, \
                        ev.public_type, \
                        CASE WHEN e.status = 'enabled' THEN 'pending' ELSE 'missed' END, \
                        CASE WHEN e.status = 'enabled' THEN $6::timestamptz END \
                 FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::timestamptz[]) \
                        WITH ORDINALITY AS ev(org_id, event_id, position, public_type, recorded_at, n) \
                 JOIN webhook_endpoints e ON e.org_id = ev.org_id \
                   AND ev.public_type = ANY(e.event_types) AND e.created_at <= ev.recorded_at \
                 ORDER BY ev.n, e.endpoint_id \
                 ON CONFLICT (endpoint_id, event_id) DO NOTHING",
                &[&orgs, &ids, &positions, &types, &recorded, &self.clock.now()],
            )
            .await?;
        tx.commit().await?;
        if added > 0 {
            self.wake.notify_one();
        }
        Ok(())
    }

    // ---- delivery -----------------------------------------------------------------

    async fn delivery_loop(self: &Arc<Self>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.concurrency));
        loop {
            loop {
                let free = slots.available_permits();
                if free == 0 || shutdown.is_cancelled() {
                    break;
                }
                let claimed = match self.claim(free).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming webhook messages failed");
                        break;
                    }
                };
                if claimed.is_empty() {
                    break;
                }
                for message in claimed {
                    let Ok(permit) = slots.clone().acquire_owned().await else {
                        break;
                    };
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let id = message.id;
                        if let Err(e) = this.attempt(message).await {
                            tracing::warn!(error = %e, message = %id, "webhook attempt not recorded; its lease will pass");
                        }
                        this.wake.notify_one();
                    });
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll) => {}
            }
        }
        // Let the attempts in flight finish and record their outcome.
        let _ = slots.acquire_many(self.settings.concurrency as u32).await;
    }

    /// Takes up to `limit` due messages (and expired claims) for this worker.
    async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, DeliveryError> {
        let now = self.clock.now();
        let lease_until = now
            + chrono::Duration::from_std(self.settings.attempt_timeout * 3)
                .unwrap_or(chrono::Duration::seconds(30));
        let mut client = self.executor.pool().get().await?;
        let tx = crate::read_models::all_orgs_scope(&mut client, false).await?;
        // Expired claims and due messages are looked for apart, each in the order of an
        // index (webhook_messages_leased, webhook_messages_due): a claim reads about
        // as many rows as it takes, however long the queue. (One query with both
        // conditions read and sorted every due message at each claim: its cost grew
        // with the backlog.)
        let rows = tx
            .query(
                "WITH expired AS ( \
                   SELECT m.id, m.next_attempt_at, m.seq FROM webhook_messages m \
                   JOIN webhook_endpoints e ON e.endpoint_id = m.endpoint_id \
                   WHERE e.status = 'enabled' AND m.status = 'sending' AND m.lease_until < $1 \
                     AND (NOT e.ordered OR NOT EXISTS ( \
                          SELECT 1 FROM webhook_messages o \
                          WHERE o.endpoint_id = m.endpoint_id AND o.seq < m.seq \
                            AND o.status IN ('pending', 'sending'))) \
                   ORDER BY m.lease_until \
                   LIMIT $2 \
                   FOR UPDATE OF m SKIP LOCKED), \
                 pending AS ( \
                   SELECT m.id, m.next_attempt_at, m.seq FROM webhook_messages m \
                   JOIN webhook_endpoints e ON e.endpoint_id = m.endpoint_id \
                   WHERE e.status = 'enabled' AND m.status = 'pending' AND m.next_attempt_at <= $1 \
                     AND (NOT e.ordered OR NOT EXISTS ( \
                          SELECT 1 FROM webhook_messages o \
                          WHERE o.endpoint_id = m.endpoint_id AND o.seq < m.seq \
                            AND o.status IN ('pending', 'sending'))) \
                   ORDER BY m.next_attempt_at, m.seq \
                   LIMIT $2 \
                   FOR UPDATE OF m SKIP LOCKED), \
                 due AS ( \
                   SELECT id FROM (SELECT * FROM expired UNION ALL SELECT * FROM pending) d \
                   ORDER BY next_attempt_at NULLS FIRST, seq \
                   LIMIT $2) \
                 UPDATE webhook_messages m \
                 SET status = 'sending', lease_until = $3, attempts = m.attempts + 1 \
                 FROM due, webhook_endpoints e \
                 WHERE m.id = due.id AND e.endpoint_id = m.endpoint_id \
                 RETURNING m.id, m.org_id, m.endpoint_id, m.event_id, m.event_type, m.attempts, \
                           e.url, e.role, e.secret_version, e.previous_valid_until",
                &[&now, &(limit as i64), &lease_until],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                org_id: r.get(1),
                endpoint_id: r.get(2),
                event_id: r.get(3),
                event_type: r.get(4),
                attempt: r.get(5),
                url: r.get(6),
                role: r.get(7),
                secret_version: r.get(8),
                previous_valid_until: r.get(9),
            })
            .collect())
    }

    /// One attempt at a claimed message, logged before and after.
    async fn attempt(&self, m: Claimed) -> Result<(), DeliveryError> {
        let started = self.clock.now();
        {
            let mut client = self.executor.pool().get().await?;
            let tx = scoped(&mut client, m.org_id).await?;
            tx.execute(
                "INSERT INTO webhook_attempts (message_id, attempt, org_id, endpoint_id, started_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (message_id, attempt) DO NOTHING",
                &[&m.id, &m.attempt, &m.org_id, &m.endpoint_id, &started],
            )
            .await?;
            tx.commit().await?;
        }
        let body = match self.body(&m).await? {
            Ok(body) => body,
            Err(why) => return self.record(&m, Outcome::Dropped(why), None, None).await,
        };
        let keys = self.keys(&m, started).await?;
        let msg_id = signer::message_id(m.id);
        // The wall clock's time of sending (receivers check it against theirs); the
        // worker's clock only decides what is due.
        let timestamp = Utc::now().timestamp();
        let key_refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let signature = signer::sign(&key_refs, &msg_id, timestamp, &body);
        let headers = [
            ("webhook-id", msg_id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        let sent = self.client.post(&m.url, &headers, body.into()).await;
        let (outcome, answer, error) = match sent {
            Ok(a) if (200..300).contains(&a.status) => (Outcome::Delivered, Some(a), None),
            Ok(a) => {
                let retry_at = self.retry_at(m.attempt);
                let error = format!("HTTP {}", a.status);
                (Outcome::Failed { retry_at }, Some(a), Some(error))
            }
            Err(no) => {
                let retry_at = self.retry_at(m.attempt);
                let error = format!("{}: {}", no.kind, no.message);
                (
                    Outcome::Failed { retry_at },
                    Some(super::net::Answer {
                        status: 0,
                        excerpt: String::new(),
                        latency: no.latency,
                    }),
                    Some(error),
                )
            }
        };
        self.record(&m, outcome, answer, error).await
    }

    /// The body for this message's endpoint: `Err(why)` when nothing may be sent.
    async fn body(&self, m: &Claimed) -> Result<Result<Vec<u8>, &'static str>, DeliveryError> {
        let client = self.executor.pool().get().await?;
        let Some(stored) = event_store::read_by_id(&client, m.org_id, m.event_id).await? else {
            return Ok(Err("the event is not in the store"));
        };
        let policy = match RoleRef::parse(&m.role) {
            None => None,
            Some(role) => role_policy(&client, m.org_id, role).await?,
        };
        let Some(policy) = policy else {
            return Ok(Err("the endpoint's role no longer exists"));
        };
        let decoded = crate::store::decode::decode(self.executor.crypto(), &client, stored).await?;
        let timestamp = public_events::timestamp(&decoded.stored.recorded_at);
        let source = Source {
            event_id: decoded.stored.event_id,
            position: decoded.stored.global_position,
            event_type: &decoded.stored.event_type,
            aggregate_type: &decoded.stored.aggregate_type,
            aggregate_id: &decoded.stored.aggregate_id,
            payload: &decoded.payload,
            timestamp: &timestamp,
            actor_kind: decoded.metadata.principal.kind.name(),
            actor_id: &decoded.metadata.principal.id,
        };
        match public_events::shape(&source, &policy) {
            Some(shaped) if shaped.public_type == m.event_type => {
                Ok(Ok(serde_json::to_vec(&shaped.body).unwrap_or_default()))
            }
            _ => Ok(Err("the endpoint's role may not receive this event type")),
        }
    }

    /// The keys to sign with now: the current secret's, and the previous one's while
    /// its grace lasts.
    async fn keys(
        &self,
        m: &Claimed,
        now: DateTime<Utc>,
    ) -> Result<Vec<Arc<Vec<u8>>>, DeliveryError> {
        let current = m.secret_version.max(1) as u32;
        let mut versions = vec![current];
        if current > 1 && m.previous_valid_until.is_some_and(|until| until > now) {
            versions.push(current - 1);
        }
        let mut out = Vec::new();
        for version in versions {
            let cached = || {
                self.keys
                    .lock()
                    .ok()
                    .and_then(|k| k.get(&(m.endpoint_id, version)).cloned())
            };
            let key = match cached() {
                Some(k) => k,
                None => {
                    let _one = self.decrypting.lock().await;
                    match cached() {
                        // Another attempt decrypted it meanwhile.
                        Some(k) => k,
                        None => {
                            let meta = EventMetadata::system(m.org_id, "webhooks");
                            let key = Arc::new(
                                endpoints::decrypt_key(
                                    &self.executor,
                                    m.org_id,
                                    m.endpoint_id,
                                    version,
                                    &meta,
                                )
                                .await?,
                            );
                            if let Ok(mut k) = self.keys.lock() {
                                k.insert((m.endpoint_id, version), key.clone());
                            }
                            key
                        }
                    }
                }
            };
            out.push(key);
        }
        Ok(out)
    }

    fn retry_at(&self, attempt: i32) -> Option<DateTime<Utc>> {
        let wait = *SCHEDULE.get(usize::try_from(attempt - 1).ok()?)?;
        let factor = if self.settings.jitter {
            rand::thread_rng().gen_range(0.8..1.2)
        } else {
            1.0
        };
        let wait = chrono::Duration::from_std(wait.mul_f64(factor)).ok()?;
        Some(self.clock.now() + wait)
    }

    /// Records how an attempt ended: the attempt's row, the message's state, the
    /// endpoint's failure run (and the automatic disable it may cause).
    async fn record(
        &self,
        m: &Claimed,
        outcome: Outcome,
        answer: Option<super::net::Answer>,
        error: Option<String>,
    ) -> Result<(), DeliveryError> {
        let now = self.clock.now();
        let (status, next, error) = match &outcome {
            Outcome::Delivered => ("delivered", None, None),
            Outcome::Failed { retry_at: Some(at) } => ("pending", Some(*at), error),
            Outcome::Failed { retry_at: None } => ("failed", None, error),
            Outcome::Dropped(why) => ("dropped", None, Some((*why).to_owned())),
        };
        let finished = matches!(status, "delivered" | "failed" | "dropped").then_some(now);
        let code = answer.as_ref().map(|a| a.status as i32).filter(|c| *c > 0);
        let latency = answer
            .as_ref()
            .map(|a| a.latency.as_millis().min(i32::MAX as u128) as i32);
        // (At most 1,024 characters: the client reads at most 1,024 bytes.)
        let excerpt = answer.as_ref().map(|a| a.excerpt.clone());
        let mut client = self.executor.pool().get().await?;
        let tx = scoped(&mut client, m.org_id).await?;
        tx.execute(
            "UPDATE webhook_attempts SET finished_at = $3, status_code = $4, latency_ms = $5, \
               error = $6, response_excerpt = $7, next_attempt_at = $8 \
             WHERE message_id = $1 AND attempt = $2",
            &[
                &m.id, &m.attempt, &now, &code, &latency, &error, &excerpt, &next,
            ],
        )
        .await?;
        // Only the claim's holder records (a message disabled meanwhile stays missed,
        // unless it was delivered).
        tx.execute(
            "UPDATE webhook_messages SET \
               status = CASE WHEN status = 'sending' OR $2 = 'delivered' THEN $2 ELSE status END, \
               next_attempt_at = CASE WHEN status = 'sending' THEN $3 ELSE next_attempt_at END, \
               lease_until = NULL, finished_at = $4, last_status = $5, last_error = $6 \
             WHERE id = $1 AND status IN ('sending', 'missed') AND attempts = $7",
            &[&m.id, &status, &next, &finished, &code, &error, &m.attempt],
        )
        .await?;
        let run = match outcome {
            Outcome::Delivered => {
                tx.execute(
                    "UPDATE webhook_endpoints SET consecutive_failures = 0, failing_since = NULL \
                     WHERE endpoint_id = $1 AND consecutive_failures > 0",
                    &[&m.endpoint_id],
                )
                .await?;
                None
            }
            Outcome::Failed { .. } => tx
                .query_opt(
                    "UPDATE webhook_endpoints SET consecutive_failures = consecutive_failures + 1, \
                       failing_since = COALESCE(failing_since, $2) \
                     WHERE endpoint_id = $1 \
                     RETURNING consecutive_failures, failing_since, status",
                    &[&m.endpoint_id, &now],
                )
                .await?
                .map(|r| (r.get::<_, i32>(0), r.get::<_, DateTime<Utc>>(1), r.get::<_, String>(2))),
            Outcome::Dropped(_) => None,
        };
        tx.commit().await?;
        if let Some((failures, since, status)) = run {
            let long_enough = chrono::Duration::from_std(self.settings.disable_after)
                .is_ok_and(|d| now - since >= d);
            if status == "enabled"
                && failures as u32 >= self.settings.disable_after_failures
                && long_enough
            {
                self.auto_disable(m.org_id, m.endpoint_id, failures as u32, since)
                    .await?;
            }
        }
        Ok(())
    }

    async fn auto_disable(
        &self,
        org_id: Uuid,
        id: Uuid,
        failures: u32,
        since: DateTime<Utc>,
    ) -> Result<(), DeliveryError> {
        let meta = EventMetadata::system(org_id, "webhooks");
        match endpoints::disable(&self.executor, org_id, id, Some((failures, since)), &meta).await {
            Ok(_) => {
                tracing::warn!(endpoint = %id, failures, "webhook endpoint disabled after a run of failures");
                if let (Some(notice), Some(row)) = (
                    &self.notice,
                    endpoints::get(self.executor.pool(), org_id, id).await?,
                ) {
                    notice(row).await;
                }
                Ok(())
            }
            // Another worker (or an admin) was first.
            Err(endpoints::WebhookAdminError::Command(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    // ---- the log's retention ------------------------------------------------------

    async fn prune_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.prune().await {
                tracing::warn!(error = %e, "pruning the webhook delivery log failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
        }
    }

    /// Deletes attempts, and messages that are over, older than the log's period.
    pub async fn prune(&self) -> Result<u64, DeliveryError> {
        let cutoff = self.clock.now() - chrono::Duration::days(i64::from(self.settings.log_days));
        let mut client = self.executor.pool().get().await?;
        let tx = crate::read_models::all_orgs_scope(&mut client, false).await?;
        let a = tx
            .execute(
                "DELETE FROM webhook_attempts WHERE started_at < $1",
                &[&cutoff],
            )
            .await?;
        let m = tx
            .execute(
                "DELETE FROM webhook_messages WHERE \
                   (finished_at < $1 AND status IN ('delivered', 'failed', 'dropped')) \
                   OR (status = 'missed' AND created_at < $1)",
                &[&cutoff],
            )
            .await?;
        tx.commit().await?;
        Ok(a + m)
    }
}

/// A transaction that names `org_id` (row-level security).
async fn scoped(
    client: &mut deadpool_postgres::Object,
    org_id: Uuid,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    crate::vault::name_org(&tx, org_id).await?;
    Ok(tx)
}

async fn role_policy(
    client: &deadpool_postgres::Object,
    org_id: Uuid,
    role: RoleRef,
) -> Result<Option<Policy>, tokio_postgres::Error> {
    crate::access::accounts::policy_of(client, org_id, role).await
}
