//! The one read path of consent state for decisions: a contact's `consent` stream
//! folded with the id of every event (`crm_domain::consent::ledger::fold`), its time
//! zone and contact points from its `contact` stream, the suppression list, and the
//! organisation's settings.
//!
//! A decision is exact at its moment, whatever a projection's lag: [`GateReader::load`]
//! takes the contact's row of the `consent_state` read model (the same fold, kept by
//! its projection) only when that row has applied every event of both streams, which
//! the same statement checks against the streams' heads in the store (one statement,
//! one snapshot); otherwise (a change not yet projected, a rebuild under way) it folds
//! the streams themselves. The row spares the common case reading and decrypting the
//! contact's events.
//!
//! Concurrent loads share their round trip, as concurrent appends share their commit
//! (`crate::store::group_commit`): a few reader tasks each take whatever loads are
//! waiting (up to [`MAX_BATCH`]) and read them per organisation with one statement, in
//! one read-only transaction scoped to that organisation (row-level security, as
//! `crate::read_models::org_scope`), sent together with the settings' statement and
//! the commit. Under load that turns N round trips into one; with a single client the
//! batch is that one load.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use crm_domain::consent::gate::{self, ConsentState, Decision, Request};
use crm_domain::consent::ledger::{fold, ConsentEvent, ConsentLedger};
use crm_domain::consent::privacy::PrivacySettings;
use crm_domain::consent::Channel;
use crm_domain::contact::{Contact, ContactEvent, ContactProfile};
use deadpool_postgres::{GenericClient, Pool};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::normalize_point;
use crate::commands::executor::Executor;
use crate::crypto::org_secrets::{keyed_hash, SUPPRESSION};
use crate::crypto::Crypto;
use crate::read_models::consent_state::JsonbIn;
use crate::read_models::{begin_in_org, Scope};
use crate::store::decode::decode;
use crate::store::event_store::{self, StoreError, StreamId};

/// A contact's consent, folded from the events of its `consent` and `contact` streams
/// recorded up to `as_of` (all of them when `None`): the records, Do Not Contact and
/// the opt-out, and the restriction of processing and its lift (GDPR Art. 18) as they
/// stood then, as the gate folds them.
pub async fn consent_state(
    executor: &Executor,
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
    as_of: Option<DateTime<Utc>>,
) -> Result<ConsentState, StoreError> {
    let (_, state) = fold_streams(executor.crypto(), client, org_id, contact_id, as_of).await?;
    Ok(state)
}

/// The contact and its consent state folded from both of its streams (recorded by
/// `as_of` if given), read in one statement: the one fold of every read that does not
/// take the read model.
async fn fold_streams(
    crypto: &Crypto,
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
    as_of: Option<DateTime<Utc>>,
) -> Result<(Contact, ConsentState), StoreError> {
    let id = contact_id.to_string();
    let events = event_store::read_sibling_streams(
        client,
        org_id,
        &[Contact::TYPE, ConsentLedger::TYPE],
        &id,
        as_of,
    )
    .await?;
    let mut contact = Contact::default();
    let mut state = ConsentState::default();
    for stored in events {
        let (event_id, is_contact) = (stored.event_id, stored.aggregate_type == Contact::TYPE);
        let decoded = decode(crypto, client, stored).await?;
        if is_contact {
            let event = decoded.typed::<ContactEvent>()?;
            gate::fold_contact(&mut state, event_id, &event);
            contact.apply(event);
        } else {
            fold(&mut state, event_id, &decoded.typed::<ConsentEvent>()?);
        }
    }
    Ok((contact, state))
}

/// Whether the contact exists in `org_id` (archived ones included).
pub async fn contact_exists(
    executor: &Executor,
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<bool, StoreError> {
    Ok(contact_presence(executor, client, org_id, contact_id).await? != Presence::Missing)
}

/// Whether a contact exists, and whether it was erased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Missing,
    Live,
    /// Its data key is destroyed: nothing more may be recorded about it.
    Erased,
}

/// Whether the contact exists and was not erased: a contact is created with personal
/// data, so its stream always has a data key, and a stream whose key is gone was
/// erased.
pub async fn contact_presence(
    executor: &Executor,
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<Presence, StoreError> {
    let id = contact_id.to_string();
    let stream = StreamId {
        org_id,
        aggregate_type: Contact::TYPE,
        aggregate_id: &id,
    };
    // The contact's data key, which its consent events share, is fetched beside (and
    // cached): the consent append that usually follows then takes the group-commit
    // fast path instead of finding the key taken and falling back to a transaction.
    let (exists, key) = futures::try_join!(event_store::stream_exists(client, &stream), async {
        executor
            .crypto()
            .key_for_reading(client, &org_id, &id)
            .await
            .map_err(StoreError::from)
    },)?;
    Ok(match (exists, key) {
        (false, _) => Presence::Missing,
        (true, Some(_)) => Presence::Live,
        (true, None) => Presence::Erased,
    })
}

/// Where `channel` reaches the contact: its e-mail address, its phone number, or its
/// postal address on one line.
pub fn contact_point(p: &ContactProfile, channel: Channel) -> Option<String> {
    match channel {
        Channel::Email => p.email.as_ref().map(|e| e.to_string()),
        Channel::Sms | Channel::Whatsapp | Channel::Phone => {
            p.phone.as_ref().map(|n| n.as_str().to_owned())
        }
        Channel::Postal => p.address.as_ref().map(|a| {
            [
                a.line1.as_ref().map(|v| v.to_string()),
                a.line2.as_ref().map(|v| v.to_string()),
                a.postal_code.as_ref().map(|v| v.to_string()),
                a.city.as_ref().map(|v| v.to_string()),
                a.region.as_ref().map(|v| v.to_string()),
                a.country.as_ref().map(|v| v.as_str().to_owned()),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        }),
    }
}

/// SHA-256 (hex) of a normalised contact point: how an import names a row's point
/// without repeating it.
pub fn point_sha256(channel: Channel, point: &str) -> String {
    hex::encode(Sha256::digest(normalize_point(channel, point).as_bytes()))
}

/// The suppression list's key of a contact point: HMAC-SHA256 of the normalised point
/// under the organisation's own suppression key, so the list reveals no address.
pub fn point_hmac(secret: &[u8; 32], channel: Channel, point: &str) -> String {
    keyed_hash(secret, normalize_point(channel, point).as_bytes())
}

/// The channels that reach a contact point of `channel`'s kind: a phone number is
/// texted, messaged and called, so suppressing it suppresses all three.
pub fn channels_of_point(channel: Channel) -> &'static [Channel] {
    match channel {
        Channel::Email => &[Channel::Email],
        Channel::Sms | Channel::Whatsapp | Channel::Phone => {
            &[Channel::Sms, Channel::Whatsapp, Channel::Phone]
        }
        Channel::Postal => &[Channel::Postal],
    }
}

/// The event that put `point` on the organisation's suppression list for `channel`.
pub async fn suppressed_by(
    client: &impl GenericClient,
    crypto: &Crypto,
    org_id: Uuid,
    channel: Channel,
    point: &str,
) -> Result<Option<Uuid>, StoreError> {
    let secret = crypto.org_secret(client, &org_id, SUPPRESSION).await?;
    let stmt = client
        .prepare_cached(
            "SELECT event_id FROM suppression_list \
             WHERE org_id = $1 AND channel = $2 AND point_hmac = $3",
        )
        .await?;
    let row = client
        .query_opt(
            &stmt,
            &[
                &org_id,
                &channel.name(),
                &point_hmac(&secret, channel, point),
            ],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Everything one decision rests on.
pub struct GateInput {
    /// Where the contact is reached (e-mail, phone, postal address) and its time zone:
    /// read [`contact_point`] from it.
    pub points: ContactProfile,
    pub state: ConsentState,
    pub settings: PrivacySettings,
    /// Whether the organisation's suppression list has any entry at all.
    pub suppressions: bool,
}

/// Most loads read in one statement.
pub const MAX_BATCH: usize = 256;
/// Batches in flight at once (each on its own pooled connection).
pub const READERS: usize = 2;

/// What the read model holds for the gate of one contact, and the organisation's
/// settings, as one batch read them.
struct Read {
    /// The contact's state and points, when its row has applied every event of both
    /// of its streams (`None`: no row yet, or behind).
    current: Option<(ConsentState, ContactProfile)>,
    settings: PrivacySettings,
    suppressions: bool,
}

struct Job {
    org_id: Uuid,
    contact_id: Uuid,
    reply: oneshot::Sender<Result<Read, StoreError>>,
}

/// Loads what the gate needs (the one read path: see the module's text); cheap to
/// clone. Its reader tasks end when the last handle is dropped.
#[derive(Clone)]
pub struct GateReader {
    jobs: mpsc::Sender<Job>,
    pool: Pool,
    crypto: Arc<Crypto>,
}

impl GateReader {
    /// Starts the reader tasks on `pool` (must be called inside a tokio runtime).
    pub fn spawn(pool: Pool, crypto: Arc<Crypto>) -> Self {
        let readers = pool.clone();
        let jobs = crate::batch::spawn(READERS, MAX_BATCH, move |batch: Vec<Job>| {
            let pool = readers.clone();
            async move { read_batch(&pool, batch).await }
        });
        Self { jobs, pool, crypto }
    }

    /// What the gate needs to decide for `contact_id` now; `None` when there is no
    /// such contact in `org_id`.
    pub async fn load(
        &self,
        org_id: Uuid,
        contact_id: Uuid,
    ) -> Result<Option<GateInput>, StoreError> {
        let job = |reply| Job {
            org_id,
            contact_id,
            reply,
        };
        let read = crate::batch::ask(&self.jobs, job)
            .await
            .ok_or(StoreError::Unavailable("the gate's reader has stopped"))??;
        if let Some((state, points)) = read.current {
            return Ok(Some(GateInput {
                points,
                state,
                settings: read.settings,
                suppressions: read.suppressions,
            }));
        }
        // Not projected yet (or being rebuilt): the contact's two streams, in one
        // statement, folded here.
        let client = self.pool.get().await?;
        let (contact, mut state) =
            fold_streams(&self.crypto, &client, org_id, contact_id, None).await?;
        if !contact.exists() {
            return Ok(None);
        }
        state.time_zone = contact.profile.time_zone.map(|tz| tz.0);
        Ok(Some(GateInput {
            points: contact.profile,
            state,
            settings: read.settings,
            suppressions: read.suppressions,
        }))
    }
}

/// The rows of `consent_state` for `contact_ids` of one organisation that have applied
/// every event of both of the contact's streams (the heads read in the same statement):
/// state and points by contact id.
const CURRENT_ROWS: &str = "\
SELECT i.id, cs.state, cs.points
FROM unnest($2::uuid[]) AS i (id)
JOIN consent_state cs ON cs.org_id = $1 AND cs.contact_id = i.id
WHERE cs.contact_version = (SELECT coalesce(max(e.sequence), 0) FROM events e
        WHERE e.aggregate_type = 'contact' AND e.aggregate_id = i.id::text AND e.org_id = $1)
  AND cs.consent_version = (SELECT coalesce(max(e.sequence), 0) FROM events e
        WHERE e.aggregate_type = 'consent' AND e.aggregate_id = i.id::text AND e.org_id = $1)";

/// Answers every job, reading each organisation's in one round trip; when a
/// statement fails for several jobs, each is read again alone, so that it gets its
/// own answer.
async fn read_batch(pool: &Pool, jobs: Vec<Job>) {
    let mut by_org: HashMap<Uuid, Vec<Job>> = HashMap::new();
    for job in jobs {
        by_org.entry(job.org_id).or_default().push(job);
    }
    for (org_id, jobs) in by_org {
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.contact_id).collect();
        match read_org(pool, org_id, &ids).await {
            Ok((mut rows, settings, suppressions)) => {
                for job in jobs {
                    let _ = job.reply.send(Ok(Read {
                        current: rows.remove(&job.contact_id),
                        settings: settings.clone(),
                        suppressions,
                    }));
                }
            }
            Err(e) if jobs.len() == 1 => {
                let job = jobs.into_iter().next().expect("one job");
                let _ = job.reply.send(Err(e));
            }
            Err(e) => {
                tracing::warn!(error = %e, loads = jobs.len(), "batched gate read failed; reading one by one");
                for job in jobs {
                    let result = read_org(pool, org_id, &[job.contact_id]).await.map(
                        |(mut rows, settings, suppressions)| Read {
                            current: rows.remove(&job.contact_id),
                            settings,
                            suppressions,
                        },
                    );
                    let _ = job.reply.send(result);
                }
            }
        }
    }
}

type Rows = HashMap<Uuid, (ConsentState, ContactProfile)>;

/// One organisation's current rows for `ids`, its settings and whether it has
/// suppressions: the scope, both statements and the commit sent together.
async fn read_org(
    pool: &Pool,
    org_id: Uuid,
    ids: &[Uuid],
) -> Result<(Rows, PrivacySettings, bool), StoreError> {
    let client = pool.get().await?;
    // Both statements prepared first (cached: no round trip once per connection), so
    // that nothing below waits between sending its parts.
    let rows_stmt = client.prepare_cached(CURRENT_ROWS).await?;
    let settings_stmt = client.prepare_cached(super::privacy::SETTINGS).await?;
    let begin = begin_in_org(org_id, Scope::Read);
    // As `pipelined_in_org`, with two statements: all four parts are queued on the
    // connection at their first poll, in this order, before any answer is awaited; the
    // commit always follows (after a failed statement it rolls back).
    let (rows_params, settings_params): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 1]) =
        ([&org_id, &ids], [&org_id]);
    let (_, rows, settings, _) = futures::try_join!(
        client.batch_execute(&begin),
        client.query(&rows_stmt, &rows_params),
        client.query_one(&settings_stmt, &settings_params),
        client.batch_execute("COMMIT"),
    )?;
    let (settings, suppressions) = super::privacy::settings_of(&settings)?;
    let mut current = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.get(0);
        let corrupt = |what: &str, e: tokio_postgres::Error| {
            StoreError::Corrupt(0, format!("{what} of contact {id} in consent_state: {e}"))
        };
        let JsonbIn(state) = row
            .try_get::<_, JsonbIn<ConsentState>>(1)
            .map_err(|e| corrupt("consent state", e))?;
        let JsonbIn(points) = row
            .try_get::<_, JsonbIn<ContactProfile>>(2)
            .map_err(|e| corrupt("contact points", e))?;
        current.insert(id, (state, points));
    }
    Ok((current, settings, suppressions))
}

impl GateInput {
    /// The gate's decision for `request` at `now` (the suppression list looked up for
    /// the request's contact point, on a connection of `pool`, when the organisation
    /// has any entry).
    pub async fn decide(
        &mut self,
        pool: &Pool,
        crypto: &Crypto,
        org_id: Uuid,
        request: &Request,
        now: DateTime<Utc>,
    ) -> Result<Decision, StoreError> {
        self.state.suppressed_by = if self.suppressions {
            let client = pool.get().await?;
            let point = &request.contact_point;
            suppressed_by(&client, crypto, org_id, request.channel, point).await?
        } else {
            None
        };
        Ok(gate::decide(
            &self.state,
            &self.settings.gate_settings(),
            request,
            now,
        ))
    }
}
