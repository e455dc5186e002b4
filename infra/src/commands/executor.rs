//! The executor: runs cqrs-es aggregates against the event store — load, decide,
//! encrypt, append.
//!
//! It is generic: it knows aggregates, the store and encryption, nothing of what a
//! command means. Features hook in two ways, both chosen by the feature:
//! - an *effect* ([`Executor::execute_with`]) runs in the appending transaction, before
//!   the commit: it keeps a table of current state exactly in step with the events, may
//!   refuse the command, and may `NOTIFY` other processes (delivered only on commit);
//! - a *post-commit hook* ([`CommitHook`], registered with [`Executor::with_hook`]) is
//!   told of every command that committed, right after the commit and before the
//!   executor returns: for this process's caches and wake-ups. The access cache
//!   forgets an organisation's access this way (`crate::access::cache`); a consent-state
//!   cache or a dispatcher waiting for messages would register a hook of its own.

use std::sync::Arc;
use std::time::Instant;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use crm_domain::metadata::EventMetadata;
use crm_domain::PersonalData;
use deadpool_postgres::GenericClient;
use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::commands::hooks::{CommitHook, Committed};
use crate::crypto::Crypto;
use crate::metrics::METRICS;
use crate::store::decode::decode;
use crate::store::event_store::{self, PendingEvent, StoreError, StreamHead, StreamId};
use crate::store::group_commit::{GroupCommitter, KeyRow};
use crate::store::snapshots;
use crate::store::stream_reader::{Page, PageEvent, StreamReader};

/// Snapshot a stream every this many events.
/// (The fast path below and the general path must produce identical events.)
const SNAPSHOT_EVERY: i64 = 50;

/// What a successful command wrote.
#[derive(Debug, Clone, Serialize)]
pub struct CommandOutcome {
    pub id: String,
    /// The stream's version after the command.
    pub version: i64,
    /// Global positions of the events written, in order (empty when nothing changed).
    pub positions: Vec<i64>,
    /// What was written of each event, in order: id, position, hash, time.
    #[serde(skip)]
    pub appended: Vec<event_store::Appended>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    #[error(transparent)]
    Domain(E),
    #[error("version conflict: expected version {expected}, the stream is at {actual}")]
    VersionMismatch { expected: i64, actual: i64 },
    #[error("version conflict: another command changed this record first")]
    Conflict,
    #[error(transparent)]
    Store(StoreError),
}

impl<E: std::error::Error> From<StoreError> for CommandError<E> {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Conflict,
            other => Self::Store(other),
        }
    }
}

/// Work done in the transaction that appends a command's events, before it commits:
/// keeps a table of current state (who holds which role) exactly in step with the
/// events, and may refuse the command on what it finds there (the last Owner).
pub type Effect<'f, E, Err> = &'f (dyn for<'t> Fn(
    &'t deadpool_postgres::Transaction<'t>,
    &'t [E],
) -> futures::future::BoxFuture<'t, Result<(), CommandError<Err>>>
         + Send
         + Sync);

/// Gives a closure the signature of an [`Effect`] (closures do not infer it).
pub fn effect<E, Err, F>(f: F) -> F
where
    Err: std::error::Error,
    F: for<'t> Fn(
            &'t deadpool_postgres::Transaction<'t>,
            &'t [E],
        ) -> futures::future::BoxFuture<'t, Result<(), CommandError<Err>>>
        + Send
        + Sync,
{
    f
}

/// What `aggregate` decides on `command` (pure domain code: no I/O).
pub(super) async fn decide<A>(
    aggregate: &mut A,
    command: A::Command,
) -> Result<Vec<A::Event>, CommandError<A::Error>>
where
    A: Aggregate<Services = ()>,
{
    let sink = EventSink::<A>::default();
    aggregate
        .handle(command, &(), &sink)
        .await
        .map_err(CommandError::Domain)?;
    Ok(sink.collect().await)
}

/// An aggregate with the head of its stream.
pub struct Loaded<A> {
    pub aggregate: A,
    pub head: StreamHead,
}

/// Executes commands: the only way events enter the store.
#[derive(Clone)]
pub struct Executor {
    pub(super) pool: Pool,
    pub(super) crypto: Arc<Crypto>,
    pub(super) notifier: event_store::Notifier,
    pub(super) committer: GroupCommitter,
    /// The reads before commands, batched ([`Self::load_batched`]).
    reader: StreamReader,
    /// Told of every commit, in this order (see [`crate::commands::hooks`]).
    pub(super) hooks: Vec<Arc<dyn CommitHook>>,
}

impl Executor {
    /// Must be called inside a tokio runtime (it starts the append notifier). No hooks:
    /// add them with [`Self::with_hook`].
    pub fn new(pool: Pool, crypto: Arc<Crypto>) -> Self {
        Self {
            notifier: event_store::Notifier::spawn(pool.clone()),
            committer: GroupCommitter::spawn(pool.clone()),
            reader: StreamReader::spawn(pool.clone(), SNAPSHOT_EVERY),
            hooks: Vec::new(),
            pool,
            crypto,
        }
    }

    /// Registers `hook`, told of every command this executor (and its clones made
    /// from now on) commits; hooks run in the order they were added.
    pub fn with_hook(mut self, hook: Arc<dyn CommitHook>) -> Self {
        self.hooks.push(hook);
        self
    }

    pub fn crypto(&self) -> &Arc<Crypto> {
        &self.crypto
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Woken whenever this executor has appended (see [`event_store::Notifier::local`]).
    pub fn appended(&self) -> Arc<tokio::sync::Notify> {
        self.notifier.local()
    }

    /// Rebuilds an aggregate from its snapshot and the events after it.
    pub async fn load<A>(
        &self,
        client: &impl GenericClient,
        org_id: Uuid,
        id: &str,
    ) -> Result<Loaded<A>, StoreError>
    where
        A: Aggregate,
    {
        let stream = StreamId {
            org_id,
            aggregate_type: A::TYPE,
            aggregate_id: id,
        };
        let first = event_store::read_stream_page(client, &stream, 0, SNAPSHOT_EVERY).await?;
        self.load_from_first_page(client, &stream, first).await
    }

    /// [`Self::load`] through the batched reader ([`StreamReader`]): concurrent loads
    /// share one statement, and the subject's key comes with the events. For a caller
    /// that holds no connection (it must not, while it waits for the reader's).
    pub async fn load_batched<A>(&self, org_id: Uuid, id: &str) -> Result<Loaded<A>, StoreError>
    where
        A: Aggregate,
    {
        let mut pages = self
            .reader
            .first_pages(org_id, vec![(A::TYPE, id.to_owned())])
            .await?;
        let page = pages.pop().unwrap_or_default();
        self.load_from_page(org_id, A::TYPE, id, page).await
    }

    /// Several aggregates of one type and organisation, as of one moment, through the
    /// batched reader; as [`Self::load_batched`] each, in the order of `ids`.
    pub async fn load_many<A>(
        &self,
        org_id: Uuid,
        ids: &[String],
    ) -> Result<Vec<Loaded<A>>, StoreError>
    where
        A: Aggregate,
    {
        let streams = ids.iter().map(|id| (A::TYPE, id.clone())).collect();
        let pages = self.reader.first_pages(org_id, streams).await?;
        let mut loaded = Vec::with_capacity(ids.len());
        for (id, page) in ids.iter().zip(pages) {
            loaded.push(self.load_from_page(org_id, A::TYPE, id, page).await?);
        }
        Ok(loaded)
    }

    /// Two aggregates of one organisation, as of one moment (their first pages are read
    /// by one statement of the batched reader); as [`Self::load_batched`] each.
    pub async fn load_two<A, B>(
        &self,
        org_id: Uuid,
        id_a: &str,
        id_b: &str,
    ) -> Result<(Loaded<A>, Loaded<B>), StoreError>
    where
        A: Aggregate,
        B: Aggregate,
    {
        let pages = self
            .reader
            .first_pages(
                org_id,
                vec![(A::TYPE, id_a.to_owned()), (B::TYPE, id_b.to_owned())],
            )
            .await?;
        let mut pages = pages.into_iter();
        let (a, b) = (
            pages.next().unwrap_or_default(),
            pages.next().unwrap_or_default(),
        );
        Ok((
            self.load_from_page(org_id, A::TYPE, id_a, a).await?,
            self.load_from_page(org_id, B::TYPE, id_b, b).await?,
        ))
    }

    /// An aggregate from a page of the batched reader: folded from its events when the
    /// page is not full (no I/O), else from a pooled connection as [`Self::load`] does.
    async fn load_from_page<A: Aggregate>(
        &self,
        org_id: Uuid,
        aggregate_type: &'static str,
        id: &str,
        page: Page,
    ) -> Result<Loaded<A>, StoreError> {
        let stream = StreamId {
            org_id,
            aggregate_type,
            aggregate_id: id,
        };
        if page.events.len() as i64 >= SNAPSHOT_EVERY {
            let client = self.pool.get().await?;
            return self.load_from_snapshot(&client, &stream).await;
        }
        let mut loaded = Loaded {
            aggregate: A::default(),
            head: StreamHead::default(),
        };
        if page.events.is_empty() {
            return Ok(loaded);
        }
        let key = self
            .crypto
            .key_from_wrapped(&org_id, id, page.wrapped_key.as_deref())?;
        for PageEvent {
            global_position,
            sequence,
            hash,
            mut payload,
        } in page.events
        {
            Crypto::decrypt_payload_with_key(key.as_ref(), &org_id, id, &mut payload);
            let event = A::Event::deserialize(payload)
                .map_err(|e| StoreError::Corrupt(global_position, e.to_string()))?;
            loaded.aggregate.apply(event);
            loaded.head.version = sequence;
            loaded.head.last_hash = Some(hash);
        }
        Ok(loaded)
    }

    /// An aggregate from the first page of its stream's events: folded from them when
    /// the page is not full (most streams are shorter than a snapshot's interval), else
    /// from its latest snapshot and the events after it (the page is then not used).
    async fn load_from_first_page<A: Aggregate>(
        &self,
        client: &impl GenericClient,
        stream: &StreamId<'_>,
        first: Vec<event_store::StoredEvent>,
    ) -> Result<Loaded<A>, StoreError> {
        if (first.len() as i64) < SNAPSHOT_EVERY {
            self.fold(client, A::default(), StreamHead::default(), first)
                .await
        } else {
            self.load_from_snapshot(client, stream).await
        }
    }

    /// An aggregate from its latest snapshot (if any) and the events after it.
    async fn load_from_snapshot<A: Aggregate>(
        &self,
        client: &impl GenericClient,
        stream: &StreamId<'_>,
    ) -> Result<Loaded<A>, StoreError> {
        let (aggregate, head) = snapshots::load::<A>(&self.crypto, client, stream)
            .await?
            .map(|s| (s.aggregate, s.head))
            .unwrap_or_default();
        let rest = event_store::read_stream(client, stream, head.version, None).await?;
        self.fold(client, aggregate, head, rest).await
    }

    /// `aggregate` at `head`, with `events` (the stream's next ones) applied.
    async fn fold<A: Aggregate>(
        &self,
        client: &impl GenericClient,
        mut aggregate: A,
        mut head: StreamHead,
        events: Vec<event_store::StoredEvent>,
    ) -> Result<Loaded<A>, StoreError> {
        for stored in events {
            head.version = stored.sequence;
            head.last_hash = Some(hex::decode(&stored.hash).unwrap_or_default());
            let decoded = decode(&self.crypto, client, stored).await?;
            aggregate.apply(decoded.typed::<A::Event>()?);
        }
        Ok(Loaded { aggregate, head })
    }

    /// The usual case, one event, in one statement: with the subject's key from the cache,
    /// or (for a new stream) a new key inserted by the same statement. `None` when the
    /// general path is needed.
    async fn append_single<E: DomainEvent + PersonalData>(
        &self,
        stream: &StreamId<'_>,
        head: &StreamHead,
        event: &E,
        meta_json: &Value,
    ) -> Result<Option<event_store::Appended>, StoreError> {
        let (org, id) = (&stream.org_id, stream.aggregate_id);
        let mut payload =
            serde_json::to_value(event).map_err(|e| StoreError::Corrupt(0, e.to_string()))?;
        let mut meta = meta_json.clone();
        let sections = event.personal_sections();
        let personal = !crate::crypto::fields::personal_paths(&payload, sections, &meta).is_empty();
        let mut new_key = None;
        if personal {
            if let Some(key) = self.crypto.cached_key(org, id) {
                Crypto::encrypt_event_with(&key, org, id, sections, &mut payload, &mut meta)?;
            } else if head.version == 0 {
                let nk = self.crypto.new_data_key(org, id)?;
                Crypto::encrypt_event_with(&nk.key, org, id, sections, &mut payload, &mut meta)?;
                new_key = Some(nk);
            } else {
                return Ok(None);
            }
        }
        let pending = PendingEvent {
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload,
            metadata: meta,
        };
        let owners = if new_key.is_some() {
            event.key_owners()
        } else {
            vec![]
        };
        let key_row = new_key.as_ref().map(|nk| KeyRow {
            kek_id: self.crypto.kek_id(),
            wrapped: nk.wrapped.as_slice(),
            owners: &owners,
        });
        match self.committer.append(stream, head, pending, key_row).await {
            Ok(appended) => {
                if let Some(nk) = new_key {
                    // Committed with the event: readers may use it now.
                    self.crypto.remember(org, id, &nk.key);
                }
                Ok(Some(appended))
            }
            Err(StoreError::KeyExists) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Any number of events in one transaction, one commit: a new subject's data key is
    /// stored together with the events it encrypts.
    async fn append_in_transaction<E: DomainEvent + PersonalData, Err: std::error::Error>(
        &self,
        client: &mut deadpool_postgres::Object,
        stream: &StreamId<'_>,
        head: &StreamHead,
        events: &[E],
        meta_json: &Value,
        effect: Option<Effect<'_, E, Err>>,
    ) -> Result<Vec<event_store::Appended>, CommandError<Err>> {
        let (org_id, id) = (stream.org_id, stream.aggregate_id);
        let tx = client.transaction().await.map_err(StoreError::from)?;
        let mut pending = Vec::with_capacity(events.len());
        let mut key = None;
        for event in events {
            let mut payload = serde_json::to_value(event)
                .map_err(|e| CommandError::from(StoreError::Corrupt(0, e.to_string())))?;
            let mut meta = meta_json.clone();
            let sections = event.personal_sections();
            let owners = event.key_owners();
            let used = self
                .crypto
                .encrypt_event(&tx, &org_id, id, &owners, sections, &mut payload, &mut meta)
                .await
                .map_err(StoreError::from)?;
            key = key.or(used);
            pending.push(PendingEvent {
                event_type: event.event_type(),
                event_version: event.event_version(),
                payload,
                metadata: meta,
            });
        }
        let appended = event_store::append(&tx, stream, head, pending)
            .await
            .map_err(CommandError::from)?;
        if let Some(effect) = effect {
            effect(&tx, events).await?;
        }
        tx.commit()
            .await
            .map_err(|e| CommandError::from(event_store::conflict_or_db(e)))?;
        if let Some(key) = key {
            // Committed now: readers (projectors in this process) may use it.
            self.crypto.remember(&org_id, id, &key);
        }
        Ok(appended)
    }

    /// Loads the aggregate, lets it decide, and appends what it decided in one
    /// commit. `expected_version`, when given, must equal the stream's version.
    pub async fn execute<A>(
        &self,
        org_id: Uuid,
        id: &str,
        command: A::Command,
        metadata: &EventMetadata,
        expected_version: Option<i64>,
    ) -> Result<CommandOutcome, CommandError<A::Error>>
    where
        A: Aggregate<Services = ()>,
        A::Event: PersonalData,
    {
        self.execute_returning::<A>(org_id, id, command, metadata, expected_version, None, None)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// [`Self::execute`], with `effect` run in the appending transaction.
    pub async fn execute_with<A>(
        &self,
        org_id: Uuid,
        id: &str,
        command: A::Command,
        metadata: &EventMetadata,
        expected_version: Option<i64>,
        effect: Effect<'_, A::Event, A::Error>,
    ) -> Result<CommandOutcome, CommandError<A::Error>>
    where
        A: Aggregate<Services = ()>,
        A::Event: PersonalData,
    {
        self.execute_returning::<A>(
            org_id,
            id,
            command,
            metadata,
            expected_version,
            Some(effect),
            None,
        )
        .await
        .map(|(outcome, _)| outcome)
    }

    /// [`Self::execute`] (with `effect`, if any, run in the appending transaction),
    /// also returning the events written, in clear and in order. `loaded`, when given,
    /// is the aggregate as the caller read it with [`Self::load`] (say in the same
    /// round trip as its other reads) and is not read again: had the stream moved on
    /// since, the append is a conflict, as for any command.
    #[allow(clippy::too_many_arguments)]
    pub async fn execute_returning<A>(
        &self,
        org_id: Uuid,
        id: &str,
        command: A::Command,
        metadata: &EventMetadata,
        expected_version: Option<i64>,
        effect: Option<Effect<'_, A::Event, A::Error>>,
        loaded: Option<Loaded<A>>,
    ) -> Result<(CommandOutcome, Vec<A::Event>), CommandError<A::Error>>
    where
        A: Aggregate<Services = ()>,
        A::Event: PersonalData,
    {
        let span = tracing::info_span!(
            "command",
            aggregate = A::TYPE,
            id = %id,
            org = %org_id,
            request_id = metadata.request_id.as_deref().unwrap_or(""),
        );
        let started = Instant::now();
        let result = self
            .execute_inner::<A>(
                org_id,
                id,
                command,
                metadata,
                expected_version,
                effect,
                loaded,
            )
            .instrument(span)
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(CommandError::Domain(_)) => "rejected",
            Err(CommandError::Conflict | CommandError::VersionMismatch { .. }) => {
                METRICS.conflicts.with_label_values(&[A::TYPE]).inc();
                "conflict"
            }
            Err(CommandError::Store(_)) => "error",
        };
        METRICS
            .commands
            .with_label_values(&[A::TYPE, outcome])
            .inc();
        METRICS
            .command_seconds
            .with_label_values(&[A::TYPE])
            .observe(started.elapsed().as_secs_f64());
        if let Err(CommandError::Store(e)) = &result {
            tracing::error!(error = %e, "command failed in the store");
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute_inner<A>(
        &self,
        org_id: Uuid,
        id: &str,
        command: A::Command,
        metadata: &EventMetadata,
        expected_version: Option<i64>,
        effect: Option<Effect<'_, A::Event, A::Error>>,
        loaded: Option<Loaded<A>>,
    ) -> Result<(CommandOutcome, Vec<A::Event>), CommandError<A::Error>>
    where
        A: Aggregate<Services = ()>,
        A::Event: PersonalData,
    {
        // A stream that must be new is not read: if it is not new after all, appending
        // its first event collides with the existing one and the command gets a conflict.
        let Loaded {
            mut aggregate,
            head,
        } = if let Some(loaded) = loaded {
            loaded
        } else if expected_version == Some(0) {
            Loaded {
                aggregate: A::default(),
                head: StreamHead::default(),
            }
        } else {
            self.load_batched::<A>(org_id, id).await?
        };
        if let Some(expected) = expected_version {
            if expected != head.version {
                return Err(CommandError::VersionMismatch {
                    expected,
                    actual: head.version,
                });
            }
        }
        let events = decide(&mut aggregate, command).await?;
        if events.is_empty() {
            let outcome = CommandOutcome {
                id: id.to_owned(),
                version: head.version,
                positions: vec![],
                appended: vec![],
            };
            return Ok((outcome, events));
        }
        let meta_json =
            serde_json::to_value(metadata).map_err(|e| StoreError::Corrupt(0, e.to_string()))?;
        let stream = StreamId {
            org_id,
            aggregate_type: A::TYPE,
            aggregate_id: id,
        };
        let append_started = Instant::now();
        let fast = match events.as_slice() {
            [event] if effect.is_none() => {
                self.append_single(&stream, &head, event, &meta_json)
                    .await?
            }
            _ => None,
        };
        let appended = match fast {
            Some(appended) => vec![appended],
            None => {
                let mut client = self.pool.get().await.map_err(StoreError::from)?;
                self.append_in_transaction(&mut client, &stream, &head, &events, &meta_json, effect)
                    .await?
            }
        };
        let outcome = CommandOutcome {
            id: id.to_owned(),
            version: head.version + appended.len() as i64,
            positions: appended.iter().map(|a| a.global_position).collect(),
            appended,
        };
        // Before the caller answers: whatever a hook keeps in this process (a cache)
        // already reflects the command when the caller acts on its answer.
        let committed = Committed {
            org_id,
            aggregate_type: A::TYPE,
            outcome: &outcome,
        };
        for hook in &self.hooks {
            hook.committed(&committed);
        }
        self.notifier.poke();
        METRICS
            .append_seconds
            .observe(append_started.elapsed().as_secs_f64());
        if Self::snapshot_due(head.version, outcome.version) {
            self.snapshot::<A>(org_id, id).await;
        }
        Ok((outcome, events))
    }

    /// Writes a snapshot of the stream as it stands. A snapshot is a cache: failing to
    /// write one never fails the command (it is logged).
    pub(super) async fn snapshot<A>(&self, org_id: Uuid, id: &str)
    where
        A: Aggregate,
    {
        let stream = StreamId {
            org_id,
            aggregate_type: A::TYPE,
            aggregate_id: id,
        };
        let written = match self.pool.get().await {
            Ok(client) => match self.load::<A>(&client, org_id, id).await {
                Ok(l) => {
                    snapshots::save(&self.crypto, &client, &stream, &l.aggregate, &l.head).await
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e.into()),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "snapshot not written");
        }
    }

    /// Whether a stream that went from version `before` to `after` is due a snapshot.
    pub(super) fn snapshot_due(before: i64, after: i64) -> bool {
        after / SNAPSHOT_EVERY > before / SNAPSHOT_EVERY
    }
}
