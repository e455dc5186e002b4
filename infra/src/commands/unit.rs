//! Units: several commands, possibly on several streams, decided in memory one after
//! the other and committed together, all or none.
//!
//! A request that must write to more than one stream atomically (an AI action that the
//! policy approves at once: its proposal, the contact change it runs, and its outcome)
//! stages each command with [`Executor::stage`] on the aggregate as it loaded it, then
//! [`Executor::commit`]s the unit. Staging runs the aggregate's own `handle` and `apply`,
//! encrypts as an append would, and chains each stream's hashes, but writes nothing; the
//! commit hands every row to the group committer as one job, so the unit shares a
//! statement with whatever else is being appended and still commits or fails as one.
//!
//! Each stream keeps its optimistic-concurrency check: if any stream of the unit moved
//! on since it was loaded, nothing of the unit is stored and the commit fails with
//! [`StoreError::Conflict`] (or [`StoreError::KeyExists`] when a subject it thought new
//! had a key); the caller may load again and retry, or take another path.

use cqrs_es::{Aggregate, DomainEvent};
use crm_domain::metadata::EventMetadata;
use crm_domain::PersonalData;
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::commands::executor::{decide, CommandError, CommandOutcome, Executor, Loaded};
use crate::commands::hooks::Committed;
use crate::crypto::{Crypto, DataKey};
use crate::metrics::METRICS;
use crate::store::event_store::{Appended, PendingEvent, StoreError, StreamId};
use crate::store::group_commit::{KeyRow, Row};

/// Commands staged to commit together (see the module's documentation).
#[derive(Default)]
pub struct Unit {
    rows: Vec<Row>,
    streams: Vec<Staged>,
}

/// What a unit writes to one stream.
struct Staged {
    org_id: Uuid,
    aggregate_type: &'static str,
    id: String,
    /// The stream's version before the unit.
    before: i64,
    /// Its rows, as indices into [`Unit::rows`].
    rows: Vec<usize>,
    /// The subject's data key once staging needed it, and whether the unit stores it.
    key: Option<(DataKey, bool)>,
    /// Writes the stream's snapshot (typed by its aggregate) when the unit crossed an
    /// interval.
    snapshot: SnapshotFn,
}

type SnapshotFn = fn(Executor, Uuid, String) -> BoxFuture<'static, ()>;

fn snapshot_of<A: Aggregate + 'static>(
    ex: Executor,
    org: Uuid,
    id: String,
) -> BoxFuture<'static, ()> {
    Box::pin(async move { ex.snapshot::<A>(org, &id).await })
}

/// Where a unit stood: [`Unit::rewind`] takes it back there.
pub struct Mark {
    rows: usize,
    streams: Vec<(usize, bool)>,
}

impl Unit {
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the unit stands now.
    pub fn mark(&self) -> Mark {
        Mark {
            rows: self.rows.len(),
            streams: self
                .streams
                .iter()
                .map(|s| (s.rows.len(), s.key.is_some()))
                .collect(),
        }
    }

    /// Drops what was staged since `mark` (a later command was refused and the unit
    /// must not hold part of it). The aggregates staged on since moved on: the caller
    /// drops them too.
    pub fn rewind(&mut self, mark: Mark) {
        self.rows.truncate(mark.rows);
        self.streams.truncate(mark.streams.len());
        for (s, (rows, had_key)) in self.streams.iter_mut().zip(mark.streams) {
            s.rows.truncate(rows);
            if !had_key {
                s.key = None;
            }
        }
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl Executor {
    /// Lets `loaded` decide `command` and stages the events it decided in `unit`: each
    /// encrypted as an append would, with an id and its stream's hash chain. `loaded`
    /// moves on as if they were committed (applied, its head advanced), so that a later
    /// command of the same unit sees them. The events, in clear, with their ids; a
    /// refusal stages nothing.
    pub async fn stage<A>(
        &self,
        unit: &mut Unit,
        org_id: Uuid,
        id: &str,
        loaded: &mut Loaded<A>,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<Vec<(Uuid, A::Event)>, CommandError<A::Error>>
    where
        A: Aggregate<Services = ()> + 'static,
        A::Event: PersonalData,
    {
        let events = decide(&mut loaded.aggregate, command).await?;
        if events.is_empty() {
            return Ok(vec![]);
        }
        let meta_json =
            serde_json::to_value(metadata).map_err(|e| StoreError::Corrupt(0, e.to_string()))?;
        let stream = StreamId {
            org_id,
            aggregate_type: A::TYPE,
            aggregate_id: id,
        };
        let slot = match unit
            .streams
            .iter()
            .position(|s| s.org_id == org_id && s.aggregate_type == A::TYPE && s.id == id)
        {
            Some(n) => n,
            None => {
                unit.streams.push(Staged {
                    org_id,
                    aggregate_type: A::TYPE,
                    id: id.to_owned(),
                    before: loaded.head.version,
                    rows: vec![],
                    key: None,
                    snapshot: snapshot_of::<A>,
                });
                unit.streams.len() - 1
            }
        };
        let mut staged = Vec::with_capacity(events.len());
        for event in events {
            let mut payload =
                serde_json::to_value(&event).map_err(|e| StoreError::Corrupt(0, e.to_string()))?;
            let mut meta = meta_json.clone();
            let sections = event.personal_sections();
            let mut new_key = None;
            if !crate::crypto::fields::personal_paths(&payload, sections, &meta).is_empty() {
                let key = match &unit.streams[slot].key {
                    Some((key, _)) => key.clone(),
                    None => {
                        let (key, wrapped) =
                            self.unit_key(&org_id, id, loaded.head.version).await?;
                        // A new key goes with the stream's first row that uses it.
                        unit.streams[slot].key = Some((key.clone(), wrapped.is_some()));
                        new_key = wrapped;
                        key
                    }
                };
                Crypto::encrypt_event_with(&key, &org_id, id, sections, &mut payload, &mut meta)
                    .map_err(StoreError::from)?;
            }
            let pending = PendingEvent {
                event_type: event.event_type(),
                event_version: event.event_version(),
                payload,
                metadata: meta,
            };
            let event_id = Uuid::now_v7();
            let kek = self.crypto.kek_id().to_owned();
            let owners = if new_key.is_some() {
                event.key_owners()
            } else {
                vec![]
            };
            let row = Row::new(
                &stream,
                &loaded.head,
                event_id,
                pending,
                new_key.as_deref().map(|w| KeyRow {
                    kek_id: kek.as_str(),
                    wrapped: w,
                    owners: &owners,
                }),
            );
            loaded.head.version += 1;
            loaded.head.last_hash = Some(row.hash().to_vec());
            loaded.aggregate.apply(event.clone());
            unit.streams[slot].rows.push(unit.rows.len());
            unit.rows.push(row);
            staged.push((event_id, event));
        }
        Ok(staged)
    }

    /// The key to encrypt a staged stream's events with, and, for a key the unit must
    /// store, its wrapped form: the cached key; else, for a stream with events, the
    /// stored one; else (a new stream, or a subject without a key yet) a new one.
    async fn unit_key(
        &self,
        org_id: &Uuid,
        id: &str,
        version: i64,
    ) -> Result<(DataKey, Option<Vec<u8>>), StoreError> {
        if let Some(key) = self.crypto.cached_key(org_id, id) {
            return Ok((key, None));
        }
        if version > 0 {
            let client = self.pool.get().await?;
            if let Some(key) = self.crypto.key_for_reading(&client, org_id, id).await? {
                return Ok((key, None));
            }
        }
        // Stored with the unit, only if no other key appeared meanwhile (KeyExists; a
        // destroyed key stays destroyed).
        let nk = self.crypto.new_data_key(org_id, id)?;
        Ok((nk.key, Some(nk.wrapped)))
    }

    /// Commits what `unit` staged, all or none (see the module's documentation). What
    /// was written of each row, in staging order. Hooks hear of each stream as of a
    /// command of its own.
    pub async fn commit(&self, unit: Unit) -> Result<Vec<Appended>, StoreError> {
        let Unit { rows, streams } = unit;
        let appended = self.committer.append_unit(rows).await?;
        for s in &streams {
            if let Some((key, true)) = &s.key {
                // Committed with the events: readers may use it now.
                self.crypto.remember(&s.org_id, &s.id, key);
            }
            let mine: Vec<Appended> = s.rows.iter().map(|&i| appended[i].clone()).collect();
            let outcome = CommandOutcome {
                id: s.id.clone(),
                version: s.before + mine.len() as i64,
                positions: mine.iter().map(|a| a.global_position).collect(),
                appended: mine,
            };
            let committed = Committed {
                org_id: s.org_id,
                aggregate_type: s.aggregate_type,
                outcome: &outcome,
            };
            for hook in &self.hooks {
                hook.committed(&committed);
            }
            METRICS
                .commands
                .with_label_values(&[s.aggregate_type, "ok"])
                .inc();
            if Self::snapshot_due(s.before, outcome.version) {
                (s.snapshot)(self.clone(), s.org_id, s.id.clone()).await;
            }
        }
        self.notifier.poke();
        Ok(appended)
    }
}
