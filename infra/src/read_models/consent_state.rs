//! The `consent_state` table: persistence of `crm_projections::consent`'s per-contact
//! consent state, one row per contact, and the reads of it: one contact's state, and
//! the bulk check (`POST /v1/consent/check`), which reads every asked contact in one
//! statement and decides with the one send gate.

use std::sync::Arc;

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use crm_domain::consent::gate::{self, ConsentState, Decision, Request};
use crm_domain::consent::ledger::ConsentEvent;
use crm_domain::consent::{Channel, PurposeKey};
use crm_domain::contact::{ContactEvent, ContactProfile};
use crm_projections::consent::{
    update, ConsentStateView, StateEvent, Update, CONSENT_STREAM, CONTACT_STREAM,
};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Transaction;
use futures::pin_mut;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::Row;
use uuid::Uuid;

use super::envelope;
use crate::consent::normalize_point;
use crate::consent::state::{contact_point, point_hmac};
use crate::feed::projector::{Projection, ProjectionError, Rebuilder};
use crate::store::decode::DecodedEvent;

pub struct ConsentStateProjection;

const COLUMNS: &str = "org_id, contact_id, state, points, email, phone, postal, time_zone, \
    contact_version, consent_version, last_position, updated_at";

/// A value written as `jsonb` straight from its `Serialize` (no `serde_json::Value`
/// built first).
#[derive(Debug)]
struct JsonbOut<'a, T>(&'a T);

impl<T: Serialize + std::fmt::Debug> ToSql for JsonbOut<'_, T> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u8(1); // the jsonb binary format's version
        serde_json::to_writer(out.writer(), self.0)?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A `jsonb` value read straight into `T` from the wire (no `serde_json::Value` built
/// first: the bulk check decodes thousands of states per request).
pub(crate) struct JsonbIn<T>(pub(crate) T);

impl<'a, T: DeserializeOwned> FromSql<'a> for JsonbIn<T> {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let body = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, rest)) => rest,
                _ => return Err("unsupported jsonb format version".into()),
            }
        } else {
            raw
        };
        Ok(JsonbIn(serde_json::from_slice(body)?))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

/// The columns of a view derived from its points.
struct Derived {
    email: Option<String>,
    phone: Option<String>,
    postal: Option<String>,
    time_zone: Option<String>,
}

fn derived(v: &ConsentStateView) -> Derived {
    Derived {
        email: contact_point(&v.points, Channel::Email),
        phone: contact_point(&v.points, Channel::Phone),
        postal: contact_point(&v.points, Channel::Postal),
        time_zone: v.points.time_zone.map(String::from),
    }
}

fn view_from_row(row: &Row) -> Result<ConsentStateView, ProjectionError> {
    let unreadable = |e: tokio_postgres::Error| {
        ProjectionError::OutOfOrder(format!(
            "stored consent state unreadable: {}",
            std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
        ))
    };
    let JsonbIn(state) = row
        .try_get::<_, JsonbIn<ConsentState>>(2)
        .map_err(unreadable)?;
    let JsonbIn(points) = row
        .try_get::<_, JsonbIn<ContactProfile>>(3)
        .map_err(unreadable)?;
    Ok(ConsentStateView {
        org_id: row.get(0),
        contact_id: row.get(1),
        state,
        points,
        contact_version: row.get(8),
        consent_version: row.get(9),
        last_position: row.get(10),
        updated_at: row.get(11),
    })
}

/// The contact an event is about and the event as the view takes it, for contact and
/// consent events (`None` for the others).
fn state_event(e: &DecodedEvent) -> Result<Option<(Uuid, Typed)>, ProjectionError> {
    let typed = match e.stored.aggregate_type.as_str() {
        CONTACT_STREAM => Typed::Contact(e.typed()?),
        CONSENT_STREAM => Typed::Consent(e.typed()?),
        _ => return Ok(None),
    };
    let id = e.stored.aggregate_id.parse().map_err(|_| {
        ProjectionError::OutOfOrder(format!(
            "{} stream id `{}` is not a UUID",
            e.stored.aggregate_type, e.stored.aggregate_id
        ))
    })?;
    Ok(Some((id, typed)))
}

enum Typed {
    Contact(ContactEvent),
    Consent(ConsentEvent),
}

/// Folds one event into `views`; returns the key of the view it changed.
fn fold_into(
    views: &mut HashMap<(Uuid, Uuid), ConsentStateView>,
    event: &DecodedEvent,
) -> Result<Option<(Uuid, Uuid)>, ProjectionError> {
    let Some((id, typed)) = state_event(event)? else {
        return Ok(None);
    };
    let key = (event.stored.org_id, id);
    let offered = match &typed {
        Typed::Contact(e) => StateEvent::Contact(e),
        Typed::Consent(e) => StateEvent::Consent(e),
    };
    match update(views.get(&key), &envelope(event), id, offered) {
        Update::Changed(v) => {
            views.insert(key, *v);
            Ok(Some(key))
        }
        Update::AlreadyApplied => Ok(None),
        Update::OutOfOrder { have, got } => Err(ProjectionError::OutOfOrder(format!(
            "consent state of {id} ({} stream): have version {have}, got event {got}",
            event.stored.aggregate_type
        ))),
    }
}

#[async_trait]
impl Projection for ConsentStateProjection {
    fn name(&self) -> &'static str {
        "consent_state"
    }

    fn table(&self) -> &'static str {
        "consent_state"
    }

    fn reads_type(&self, aggregate_type: &str) -> bool {
        matches!(aggregate_type, CONTACT_STREAM | CONSENT_STREAM)
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        table: &str,
        events: &[Arc<DecodedEvent>],
    ) -> Result<(), ProjectionError> {
        let of_contact = |e: &DecodedEvent| {
            let stream = e.stored.aggregate_type.as_str();
            matches!(stream, CONTACT_STREAM | CONSENT_STREAM)
                .then(|| e.stored.aggregate_id.parse().ok())
                .flatten()
        };
        let Some((orgs, ids)) = super::row_keys(events, of_contact) else {
            return Ok(());
        };
        // By primary key; no FOR UPDATE: every writer of this table holds the
        // projection's lock.
        let sql = format!(
            "SELECT {COLUMNS} FROM {table} \
             WHERE (org_id, contact_id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))"
        );
        let stmt = tx.prepare_cached(&sql).await?;
        let mut views = HashMap::new();
        for row in tx.query(&stmt, &[&orgs, &ids]).await? {
            let v = view_from_row(&row)?;
            views.insert((v.org_id, v.contact_id), v);
        }
        let mut changed = Vec::new();
        let mut seen = HashSet::new();
        for e in events {
            if let Some(key) = fold_into(&mut views, e)? {
                if seen.insert(key) {
                    changed.push(key);
                }
            }
        }
        upsert(tx, table, changed.iter().filter_map(|k| views.get(k))).await
    }

    fn rebuilder(&self) -> Box<dyn Rebuilder> {
        Box::new(ConsentStateRebuilder::default())
    }
}

/// Writes views with one statement.
async fn upsert(
    tx: &Transaction<'_>,
    table: &str,
    views: impl Iterator<Item = &ConsentStateView>,
) -> Result<(), ProjectionError> {
    let views: Vec<&ConsentStateView> = views.collect();
    if views.is_empty() {
        return Ok(());
    }
    let derived: Vec<Derived> = views.iter().map(|v| derived(v)).collect();
    let json = |v: serde_json::Result<serde_json::Value>| {
        v.map_err(|e| ProjectionError::OutOfOrder(format!("consent state unwritable: {e}")))
    };
    let states = views
        .iter()
        .map(|v| json(serde_json::to_value(&v.state)))
        .collect::<Result<Vec<_>, _>>()?;
    let points = views
        .iter()
        .map(|v| json(serde_json::to_value(&v.points)))
        .collect::<Result<Vec<_>, _>>()?;
    let text = |f: fn(&Derived) -> &Option<String>| derived.iter().map(f).collect::<Vec<_>>();
    let sql = format!(
        "INSERT INTO {table} ({COLUMNS}) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::jsonb[], $4::jsonb[], $5::text[], \
                              $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[], \
                              $11::int8[], $12::timestamptz[]) \
         ON CONFLICT (org_id, contact_id) DO UPDATE SET state = EXCLUDED.state, \
         points = EXCLUDED.points, email = EXCLUDED.email, phone = EXCLUDED.phone, \
         postal = EXCLUDED.postal, time_zone = EXCLUDED.time_zone, \
         contact_version = EXCLUDED.contact_version, \
         consent_version = EXCLUDED.consent_version, \
         last_position = EXCLUDED.last_position, updated_at = EXCLUDED.updated_at"
    );
    let stmt = tx.prepare_cached(&sql).await?;
    tx.execute(
        &stmt,
        &[
            &views.iter().map(|v| v.org_id).collect::<Vec<_>>(),
            &views.iter().map(|v| v.contact_id).collect::<Vec<_>>(),
            &states,
            &points,
            &text(|d| &d.email),
            &text(|d| &d.phone),
            &text(|d| &d.postal),
            &text(|d| &d.time_zone),
            &views.iter().map(|v| v.contact_version).collect::<Vec<_>>(),
            &views.iter().map(|v| v.consent_version).collect::<Vec<_>>(),
            &views.iter().map(|v| v.last_position).collect::<Vec<_>>(),
            &views.iter().map(|v| v.updated_at).collect::<Vec<_>>(),
        ],
    )
    .await?;
    Ok(())
}

/// The rebuild's fold. It reads every event in commit order (a view follows two
/// streams, the contact's and its consent's, which no per-stream order keeps
/// together), so a view is final only at the end: the views are held until then and
/// written with one `COPY` (one small view per contact).
#[derive(Default)]
struct ConsentStateRebuilder {
    views: HashMap<(Uuid, Uuid), ConsentStateView>,
}

#[async_trait]
impl Rebuilder for ConsentStateRebuilder {
    fn fold(&mut self, event: &DecodedEvent) -> Result<(), ProjectionError> {
        fold_into(&mut self.views, event).map(|_| ())
    }

    fn wants_flush(&self) -> bool {
        false
    }

    async fn flush(
        &mut self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> Result<u64, ProjectionError> {
        if self.views.is_empty() {
            return Ok(0);
        }
        let sink = client
            .copy_in(&format!(
                "COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::UUID,
                Type::UUID,
                Type::JSONB,
                Type::JSONB,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::INT8,
                Type::INT8,
                Type::INT8,
                Type::TIMESTAMPTZ,
            ],
        );
        pin_mut!(writer);
        for (_, v) in self.views.drain() {
            let d = derived(&v);
            writer
                .as_mut()
                .write(&[
                    &v.org_id,
                    &v.contact_id,
                    &JsonbOut(&v.state),
                    &JsonbOut(&v.points),
                    &d.email,
                    &d.phone,
                    &d.postal,
                    &d.time_zone,
                    &v.contact_version,
                    &v.consent_version,
                    &v.last_position,
                    &v.updated_at,
                ])
                .await?;
        }
        Ok(writer.finish().await?)
    }
}

/// One contact's consent state, if the read model knows the contact.
pub async fn get(
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<Option<ConsentStateView>, ProjectionError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM consent_state WHERE org_id = $1 AND contact_id = $2"
        ))
        .await?;
    let row = client.query_opt(&stmt, &[&org_id, &contact_id]).await?;
    row.as_ref().map(view_from_row).transpose()
}

/// The most contacts one bulk check may ask about.
pub const MAX_CHECK: usize = 10_000;

/// What the bulk check answers for one contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// No such contact in the organisation (as far as the read model knows).
    Unknown,
    /// The contact has no address or number for the channel: nothing to send to.
    NoContactPoint,
    /// The gate's decision.
    Decided(Decision),
}

/// What a bulk check asks: may a message on `channel` for `purpose` go to each of
/// `contact_ids`?
pub struct CheckFor<'a> {
    pub channel: Channel,
    pub purpose: &'a PurposeKey,
    pub contact_ids: &'a [Uuid],
}

/// The gate's answer, now, for each contact of `asked` (in their order): one statement
/// reads every asked contact's state and point (`= ANY`), and, only when the
/// organisation has suppressions (`suppression_key`: its key, given only then), one
/// more the suppression list for all their points; the organisation's `settings` are
/// passed in (`crate::consent::privacy::load_with_suppressions`).
pub async fn check(
    client: &impl GenericClient,
    org_id: Uuid,
    (settings, suppression_key): (&gate::Settings, Option<&[u8; 32]>),
    asked: CheckFor<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<Checked>, ProjectionError> {
    let CheckFor {
        channel,
        purpose,
        contact_ids,
    } = asked;
    let column = match channel {
        Channel::Email => "email",
        Channel::Sms | Channel::Whatsapp | Channel::Phone => "phone",
        Channel::Postal => "postal",
    };
    let stmt = client
        .prepare_cached(&format!(
            "SELECT contact_id, state, {column} FROM consent_state \
             WHERE org_id = $1 AND contact_id = ANY($2)"
        ))
        .await?;
    let rows = client.query(&stmt, &[&org_id, &contact_ids]).await?;
    let mut found: HashMap<Uuid, (ConsentState, Option<String>, Option<String>)> =
        HashMap::with_capacity(rows.len());
    for row in &rows {
        let JsonbIn(state) = row.try_get::<_, JsonbIn<ConsentState>>(1)?;
        let point = row
            .get::<_, Option<String>>(2)
            .map(|p| normalize_point(channel, &p));
        // Digests only when the suppression list has entries to compare them with.
        let hash = point
            .as_deref()
            .zip(suppression_key)
            .map(|(p, key)| point_hmac(key, channel, p));
        found.insert(row.get(0), (state, point, hash));
    }
    let hashes: Vec<&str> = found
        .values()
        .filter_map(|(_, _, h)| h.as_deref())
        .collect();
    let suppressed: HashMap<String, Uuid> = if hashes.is_empty() {
        HashMap::new()
    } else {
        let stmt = client
            .prepare_cached(
                "SELECT point_hmac, event_id FROM suppression_list \
                 WHERE org_id = $1 AND channel = $2 AND point_hmac = ANY($3)",
            )
            .await?;
        client
            .query(&stmt, &[&org_id, &channel.name(), &hashes])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    Ok(contact_ids
        .iter()
        .map(|id| {
            let Some((state, point, hash)) = found.get_mut(id) else {
                return Checked::Unknown;
            };
            let Some(point) = point else {
                return Checked::NoContactPoint;
            };
            state.suppressed_by = hash.as_ref().and_then(|h| suppressed.get(h).copied());
            let request = Request {
                channel,
                purpose: purpose.clone(),
                contact_point: std::mem::take(point),
            };
            let decision = gate::decide(state, settings, &request, now);
            // The same id asked twice is decided twice, on the same point.
            *point = request.contact_point;
            Checked::Decided(decision)
        })
        .collect())
}
