//! The dispatcher: a worker like the projectors, fed by its own durable JetStream
//! consumer (`dispatch`, filtered to message streams), that hands each queued message
//! to its carrier and records what happened.
//!
//! Each attempt is started by an event: `MessageQueued` (the first), and
//! `MessageAttemptFailed` (the next, once its `next_attempt_at` has come: until then
//! the delivery is handed back with a delay). Before sending, the gate is asked again
//! from the store: a consent withdrawn (or a Do Not Contact set) after queueing stops
//! the message, recorded as `MessageBlockedAtDispatch`.
//!
//! At least once, one key: a message's idempotency key is its id, for every attempt
//! and every process. A delivery is acknowledged only after the outcome is recorded;
//! a dispatcher that dies after its carrier accepted a message but before
//! `MessageSent` was recorded leaves the delivery unacknowledged, JetStream hands it
//! out again after [`Dispatcher::ack_wait`], and the carrier sees the same key again
//! (the `Message-ID` for SMTP, `I-Twilio-Idempotency-Token` for the HTTP adapter),
//! so a carrier that de-duplicates delivers it once.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use chrono::Utc;
use crm_domain::consent::gate::Request;
use crm_domain::consent::{Channel, PurposeKey};
use crm_domain::message::{Message, MessageCommand, MessageError, MessageStatus};
use crm_domain::metadata::EventMetadata;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::carriers::{Carriers, Outbound};
use crate::commands::executor::{CommandError, Executor};
use crate::consent::state::GateReader;
use crate::feed::bus::{self, Bus};
use crate::store::event_store::{RawEvent, StoreError};

/// Makes the one-click unsubscribe URL of a message (organisation, contact, channel,
/// purpose, message id); `None`: no link.
pub type UnsubscribeLinks =
    Arc<dyn Fn(Uuid, Uuid, Channel, &PurposeKey, Uuid) -> Option<String> + Send + Sync>;

/// The durable consumer's name.
pub const CONSUMER: &str = "dispatch";
/// Messages sent at once by one dispatcher.
const IN_FLIGHT: usize = 32;
const SESSION_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("JetStream: {0}")]
    Bus(String),
}

impl From<CommandError<MessageError>> for DispatchError {
    fn from(e: CommandError<MessageError>) -> Self {
        match e {
            CommandError::Store(s) => Self::Store(s),
            other => Self::Store(StoreError::Corrupt(0, other.to_string())),
        }
    }
}

/// What to do with a delivery once handled.
enum Handled {
    Done,
    /// Hand it back; JetStream redelivers it after this long.
    Later(Duration),
}

pub struct Dispatcher {
    pub executor: Executor,
    /// The send gate's read path, asked again before each attempt.
    pub gate: GateReader,
    pub bus: Bus,
    pub carriers: Arc<Carriers>,
    pub links: UnsubscribeLinks,
    /// How long a delivery may stay unacknowledged before JetStream hands it out again
    /// (a crashed dispatcher's messages come back after this long).
    pub ack_wait: Duration,
}

impl Dispatcher {
    pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

    /// Runs until `shutdown`; reconnects after errors.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        while !shutdown.is_cancelled() {
            match this.clone().session(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatcher session ended; retrying in 250 ms");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(SESSION_RETRY) => {}
                    }
                }
            }
        }
        tracing::info!("dispatcher stopped");
    }

    async fn session(self: Arc<Self>, shutdown: &CancellationToken) -> Result<(), DispatchError> {
        // Message streams travel under their own subject (`bus::OWN_SUBJECT_TYPES`).
        let filter = format!(
            "{}.*.{}.*",
            self.bus.settings.subject_prefix,
            <Message as cqrs_es::Aggregate>::TYPE
        );
        let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = self
            .bus
            .stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    filter_subject: filter,
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: self.ack_wait,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| DispatchError::Bus(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| DispatchError::Bus(e.to_string()))?;
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = messages.next() => m,
            };
            let Some(msg) = next else {
                return Err(DispatchError::Bus("message stream ended".into()));
            };
            let msg = msg.map_err(|e| DispatchError::Bus(e.to_string()))?;
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| DispatchError::Bus(e.to_string()))?;
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // Work starts now: the ack wait counts from here, not from the
                // delivery (which may have waited for a free slot).
                let _ = msg.ack_with(AckKind::Progress).await;
                let ack = match bus::events_of(&msg.payload) {
                    Err(e) => {
                        tracing::error!(subject = %msg.subject, error = %e, "not an event; terminated");
                        AckKind::Term
                    }
                    Ok(events) => match this.handle(&events).await {
                        Ok(Handled::Done) => AckKind::Ack,
                        Ok(Handled::Later(after)) => AckKind::Nak(Some(after)),
                        Err(e) => {
                            let message = events.first().map(|e| e.aggregate_id.as_str());
                            tracing::warn!(error = %e, message = message.unwrap_or_default(), "dispatch failed; retried");
                            AckKind::Nak(Some(Duration::from_secs(1)))
                        }
                    },
                };
                if let Err(e) = msg.ack_with(ack).await {
                    tracing::warn!(error = %e, "ack failed: the delivery comes back");
                }
            });
        }
        // Let the sends in flight finish and record their outcome.
        let _ = slots.acquire_many(IN_FLIGHT as u32).await;
        Ok(())
    }

    /// A message's events (one, or a commit's events of one message's stream): one
    /// attempt if any of them leaves it queued.
    async fn handle(&self, events: &[RawEvent]) -> Result<Handled, DispatchError> {
        let Some(event) = events.iter().rev().find(|e| {
            matches!(
                e.event_type.as_str(),
                "MessageQueued" | "MessageAttemptFailed"
            )
        }) else {
            return Ok(Handled::Done);
        };
        let org_id = event.org_id;
        let Ok(message_id) = event.aggregate_id.parse::<Uuid>() else {
            return Ok(Handled::Done);
        };
        self.attempt(org_id, message_id).await
    }

    /// One attempt at `message_id`, if it is still queued and due.
    async fn attempt(&self, org_id: Uuid, message_id: Uuid) -> Result<Handled, DispatchError> {
        let id = message_id.to_string();
        let pool = self.executor.pool().clone();
        let message = {
            let client = pool.get().await?;
            self.executor
                .load::<Message>(&client, org_id, &id)
                .await?
                .aggregate
        };
        if message.status != Some(MessageStatus::Queued) {
            return Ok(Handled::Done);
        }
        if let Some(at) = message.next_attempt_at {
            let wait = at - Utc::now();
            if wait > chrono::Duration::zero() {
                return Ok(Handled::Later(
                    wait.to_std().unwrap_or(Duration::from_secs(1)),
                ));
            }
        }
        let (Some(contact_id), Some(channel), Some(purpose), Some(content)) = (
            message.contact_id,
            message.channel,
            message.purpose.clone(),
            message.content.clone(),
        ) else {
            return Ok(Handled::Done);
        };
        let attempt = message.attempts + 1;
        let meta = EventMetadata::system(org_id, "dispatch");
        if content.to.is_empty() {
            // Its key was destroyed with its recipient's erasure: there is nothing left
            // to send, nor anyone to send it to.
            let command = MessageCommand::RecordFailure {
                attempt,
                error: "the recipient was erased".into(),
                retryable: false,
                now: Utc::now(),
            };
            self.record(org_id, &id, command, &meta).await?;
            return Ok(Handled::Done);
        }
        // The gate again, now: what changed since the message was queued counts.
        let decision = match self.gate.load(org_id, contact_id).await? {
            None => None,
            Some(mut input) => {
                let request = Request {
                    channel,
                    purpose: purpose.clone(),
                    contact_point: crate::consent::normalize_point(channel, &content.to),
                };
                Some(
                    input
                        .decide(&pool, self.executor.crypto(), org_id, &request, Utc::now())
                        .await?,
                )
            }
        };
        let Some(decision) = decision else {
            // The contact is gone from the organisation: nothing to send it to.
            let command = MessageCommand::RecordFailure {
                attempt,
                error: "the contact no longer exists".into(),
                retryable: false,
                now: Utc::now(),
            };
            self.record(org_id, &id, command, &meta).await?;
            return Ok(Handled::Done);
        };
        if !decision.allowed {
            self.record(
                org_id,
                &id,
                MessageCommand::Recheck { decision, attempt },
                &meta,
            )
            .await?;
            return Ok(Handled::Done);
        }
        let outbound = Outbound {
            idempotency_key: id.clone(),
            channel,
            to: content.to.clone(),
            subject: content.subject.clone(),
            body: content.body.clone(),
            unsubscribe_url: (channel == Channel::Email)
                .then(|| (self.links)(org_id, contact_id, channel, &purpose, message_id))
                .flatten(),
        };
        let sent = match self.carriers.for_channel(org_id, channel).await {
            Ok(carrier) => carrier.send(&outbound).await,
            Err(e) => Err(e),
        };
        let command = match sent {
            Ok(delivered) => MessageCommand::RecordSent {
                attempt,
                carrier: delivered.carrier,
                carrier_message_id: delivered.carrier_message_id,
            },
            Err(e) => {
                tracing::info!(message = %id, attempt, retryable = e.retryable, error = %e, "send failed");
                MessageCommand::RecordFailure {
                    attempt,
                    error: e.message,
                    retryable: e.retryable,
                    now: Utc::now(),
                }
            }
        };
        self.record(org_id, &id, command, &meta).await?;
        Ok(Handled::Done)
    }

    /// Records an outcome; one already recorded by another dispatcher (the message is
    /// no longer queued) is not an error.
    async fn record(
        &self,
        org_id: Uuid,
        id: &str,
        command: MessageCommand,
        meta: &EventMetadata,
    ) -> Result<(), DispatchError> {
        match self
            .executor
            .execute::<Message>(org_id, id, command, meta, None)
            .await
        {
            Ok(_) | Err(CommandError::Domain(MessageError::NotQueued)) => Ok(()),
            Err(CommandError::Conflict) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
