//! The `contacts` table: persistence of `crm_projections::contacts`.

use std::sync::Arc;

use std::collections::HashMap;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use crm_domain::contact::{Contact, ContactEvent, ContactProfile};
use crm_projections::contacts::{update, ContactView, Update};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Transaction;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::Row;
use uuid::Uuid;

use super::{envelope, ListQuery};
use crate::feed::projector::{Projection, ProjectionError, Rebuilder};
use crate::store::decode::DecodedEvent;

pub struct ContactsProjection;

const VIEW_COLUMNS: &str = "id, org_id, version, profile, archived, created_at, updated_at, \
    last_position, erased_at, legal_hold, processing_restricted, retention_days";

fn view_from_row(row: &Row) -> Result<ContactView, ProjectionError> {
    let profile: serde_json::Value = row.try_get(3).map_err(|e| {
        ProjectionError::OutOfOrder(format!(
            "stored profile unreadable: {}",
            std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
        ))
    })?;
    Ok(ContactView {
        id: row.get(0),
        org_id: row.get(1),
        version: row.get(2),
        profile: serde_json::from_value::<ContactProfile>(profile)
            .map_err(|e| ProjectionError::OutOfOrder(format!("stored profile unreadable: {e}")))?,
        archived: row.get(4),
        created_at: row.get(5),
        updated_at: row.get(6),
        last_position: row.get(7),
        erased_at: row.get(8),
        legal_hold: row.get(9),
        processing_restricted: row.get(10),
        retention_days: row
            .get::<_, Option<i32>>(11)
            .and_then(|d| u32::try_from(d).ok()),
    })
}

fn profile_json(p: &ContactProfile) -> serde_json::Value {
    serde_json::to_value(p).expect("profiles serialize")
}

#[async_trait]
impl Projection for ContactsProjection {
    fn name(&self) -> &'static str {
        "contacts"
    }

    fn table(&self) -> &'static str {
        "contacts"
    }

    fn reads_type(&self, aggregate_type: &str) -> bool {
        aggregate_type == REBUILD_AGGREGATE_TYPE
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        table: &str,
        events: &[Arc<DecodedEvent>],
    ) -> Result<(), ProjectionError> {
        let Some((orgs, ids)) = super::row_keys(events, contact_id) else {
            return Ok(());
        };
        // By primary key (org_id, id), one index probe per contact. No FOR UPDATE: every
        // writer of this table holds the projection's lock.
        let sql = format!(
            "SELECT {VIEW_COLUMNS} FROM {table} \
             WHERE (org_id, id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))"
        );
        let mut views = HashMap::new();
        let stmt = tx.prepare_cached(&sql).await?;
        for row in tx.query(&stmt, &[&orgs, &ids]).await? {
            let v = view_from_row(&row)?;
            views.insert((v.org_id, v.id), v);
        }
        let mut changed = Vec::new();
        let mut seen = std::collections::HashSet::new();
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
        Box::new(ContactsRebuilder::default())
    }
}

/// The contact an event is about, if it is a contact event.
fn contact_id(e: &DecodedEvent) -> Option<Uuid> {
    (e.stored.aggregate_type == Contact::TYPE)
        .then(|| e.stored.aggregate_id.parse().ok())
        .flatten()
}

/// Folds one event into `views`; returns the key of the view it changed.
fn fold_into(
    views: &mut HashMap<(Uuid, Uuid), ContactView>,
    event: &DecodedEvent,
) -> Result<Option<(Uuid, Uuid)>, ProjectionError> {
    let Some(id) = contact_id(event) else {
        return Ok(None);
    };
    let typed: ContactEvent = event.typed()?;
    let key = (event.stored.org_id, id);
    match update(views.get(&key), &envelope(event), &typed) {
        Update::Changed(v) => {
            views.insert(key, *v);
            Ok(Some(key))
        }
        Update::AlreadyApplied => Ok(None),
        Update::OutOfOrder { have, got } => Err(ProjectionError::OutOfOrder(format!(
            "contact {id}: have version {have}, got event {got}"
        ))),
    }
}

/// Writes views with one statement.
async fn upsert(
    tx: &Transaction<'_>,
    table: &str,
    views: impl Iterator<Item = &ContactView>,
) -> Result<(), ProjectionError> {
    let views: Vec<&ContactView> = views.collect();
    if views.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = views.iter().map(|v| v.id).collect();
    let orgs: Vec<Uuid> = views.iter().map(|v| v.org_id).collect();
    let versions: Vec<i64> = views.iter().map(|v| v.version).collect();
    let profiles: Vec<serde_json::Value> = views.iter().map(|v| profile_json(&v.profile)).collect();
    let archived: Vec<bool> = views.iter().map(|v| v.archived).collect();
    let created: Vec<DateTime<Utc>> = views.iter().map(|v| v.created_at).collect();
    let updated: Vec<DateTime<Utc>> = views.iter().map(|v| v.updated_at).collect();
    let positions: Vec<i64> = views.iter().map(|v| v.last_position).collect();
    let erased: Vec<Option<DateTime<Utc>>> = views.iter().map(|v| v.erased_at).collect();
    let holds: Vec<bool> = views.iter().map(|v| v.legal_hold).collect();
    let restricted: Vec<bool> = views.iter().map(|v| v.processing_restricted).collect();
    let retention: Vec<Option<i32>> = views.iter().map(|v| retention_days(v)).collect();
    let sql = format!(
        "INSERT INTO {table} ({VIEW_COLUMNS}) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::jsonb[], $5::bool[], \
                              $6::timestamptz[], $7::timestamptz[], $8::int8[], \
                              $9::timestamptz[], $10::bool[], $11::bool[], $12::int4[]) \
         ON CONFLICT (org_id, id) DO UPDATE SET version = EXCLUDED.version, \
         profile = EXCLUDED.profile, archived = EXCLUDED.archived, \
         updated_at = EXCLUDED.updated_at, last_position = EXCLUDED.last_position, \
         erased_at = EXCLUDED.erased_at, legal_hold = EXCLUDED.legal_hold, \
         processing_restricted = EXCLUDED.processing_restricted, \
         retention_days = EXCLUDED.retention_days"
    );
    let stmt = tx.prepare_cached(&sql).await?;
    tx.execute(
        &stmt,
        &[
            &ids,
            &orgs,
            &versions,
            &profiles,
            &archived,
            &created,
            &updated,
            &positions,
            &erased,
            &holds,
            &restricted,
            &retention,
        ],
    )
    .await?;
    Ok(())
}

/// A view's retention period as its column stores it (a domain value fits: at most
/// [`crm_domain::consent::privacy::MAX_RETENTION_DAYS`]).
fn retention_days(v: &ContactView) -> Option<i32> {
    v.retention_days.and_then(|d| i32::try_from(d).ok())
}

/// The aggregate type a rebuild of `contacts` reads (the other events change nothing).
pub(crate) const REBUILD_AGGREGATE_TYPE: &str = Contact::TYPE;

/// Views folded since the last flush are written in batches of about this many.
const REBUILD_BATCH: usize = 2048;

/// The rebuild's fold. It is handed the contact streams one after the other, each
/// whole and in sequence order (`rebuild::Order::Stream`), and flushed only between two
/// streams, so every view it holds is final and is written by the next flush; memory
/// stays at one batch, however many contacts there are. A stream that came back after
/// it was written would start again past its first event with no view to apply to:
/// the fold reports that as out of order, never a silently different read model.
#[derive(Default)]
struct ContactsRebuilder {
    /// Views not written yet.
    views: HashMap<(Uuid, Uuid), ContactView>,
}

/// A profile written as `jsonb` straight from the struct, without building a
/// `serde_json::Value` first (PostgreSQL stores the same `jsonb` either way).
#[derive(Debug)]
struct ProfileJsonb<'a>(&'a ContactProfile);

impl ToSql for ProfileJsonb<'_> {
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

#[async_trait]
impl Rebuilder for ContactsRebuilder {
    fn fold(&mut self, event: &DecodedEvent) -> Result<(), ProjectionError> {
        fold_into(&mut self.views, event).map(|_| ())
    }

    fn wants_flush(&self) -> bool {
        self.views.len() >= REBUILD_BATCH
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
                "COPY {table} ({VIEW_COLUMNS}) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::UUID,
                Type::UUID,
                Type::INT8,
                Type::JSONB,
                Type::BOOL,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::INT8,
                Type::TIMESTAMPTZ,
                Type::BOOL,
                Type::BOOL,
                Type::INT4,
            ],
        );
        pin_mut!(writer);
        for (_, v) in self.views.drain() {
            let retention = retention_days(&v);
            writer
                .as_mut()
                .write(&[
                    &v.id,
                    &v.org_id,
                    &v.version,
                    &ProfileJsonb(&v.profile),
                    &v.archived,
                    &v.created_at,
                    &v.updated_at,
                    &v.last_position,
                    &v.erased_at,
                    &v.legal_hold,
                    &v.processing_restricted,
                    &retention,
                ])
                .await?;
        }
        Ok(writer.finish().await?)
    }
}

/// Filters of a contact list.
#[derive(Debug, Clone, Default)]
pub struct ContactFilter {
    pub email: Option<String>,
    pub company: Option<String>,
    /// Case-insensitive substring of name, email or company.
    pub q: Option<String>,
    pub archived: Option<bool>,
    pub updated_since: Option<DateTime<Utc>>,
    /// Keyset pagination: ids after this one.
    pub after: Option<Uuid>,
    pub limit: i64,
    /// The most contacts changed since `updated_since` read whole (default
    /// [`UPDATED_SINCE_CAP`]); tests set it low to compare both ways of answering.
    pub updated_since_cap: Option<i64>,
}

/// One contact of an organisation.
pub async fn get(
    client: &impl GenericClient,
    org_id: Uuid,
    id: Uuid,
) -> Result<Option<ContactView>, ProjectionError> {
    let row = client
        .query_opt(
            &format!("SELECT {VIEW_COLUMNS} FROM contacts WHERE org_id = $1 AND id = $2"),
            &[&org_id, &id],
        )
        .await?;
    row.as_ref().map(view_from_row).transpose()
}

/// Some of an organisation's contacts, by id, in one query (those that exist).
pub async fn get_many(
    client: &impl GenericClient,
    org_id: Uuid,
    ids: &[Uuid],
) -> Result<Vec<ContactView>, ProjectionError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!("SELECT {VIEW_COLUMNS} FROM contacts WHERE org_id = $1 AND id = ANY($2)"),
            &[&org_id, &ids],
        )
        .await?;
    rows.iter().map(view_from_row).collect()
}

/// Contacts changed since `updated_since`, up to this many, are read whole (by the
/// `updated_at` index) and sorted by id; more are found by walking the id order.
pub const UPDATED_SINCE_CAP: i64 = 5_000;

/// A page of an organisation's contacts, ordered by id (creation order: UUID v7).
///
/// The statement names only the filters given, so each query is planned for what it
/// asks: an exact filter uses its index, `q` the trigram index when the pattern is rare
/// (or the primary key's order when it is common), and a page is a range of an index
/// either way (see migrations/V5__reads_at_scale.sql).
pub async fn list(
    client: &impl GenericClient,
    org_id: Uuid,
    f: &ContactFilter,
) -> Result<Vec<ContactView>, ProjectionError> {
    let like =
        f.q.as_ref()
            .map(|q| format!("%{}%", like_escape(&q.to_lowercase())));
    let email = f.email.as_ref().map(|e| e.to_lowercase());
    if let Some(like) = &like {
        // Row-level security would keep the trigram index from serving LIKE (not a
        // LEAKPROOF operator): this function applies the organisation's wall itself
        // (migrations/V5__reads_at_scale.sql). `org_id` must also be the transaction's.
        let rows = client
            .query(
                &format!(
                    "SELECT {VIEW_COLUMNS} FROM contacts_matching($1, $2, $3, $4, $5, $6, $7) \
                     WHERE org_id = $8"
                ),
                &[
                    like,
                    &email,
                    &f.company,
                    &f.archived,
                    &f.updated_since,
                    &f.after,
                    &f.limit,
                    &org_id,
                ],
            )
            .await?;
        return rows.iter().map(view_from_row).collect();
    }
    let mut query = ListQuery::new(VIEW_COLUMNS, "contacts", &org_id);
    query.and("email", "=", &email);
    query.and("company", "=", &f.company);
    query.and("archived", "=", &f.archived);
    query.and("updated_at", ">=", &f.updated_since);
    query.and("id", ">", &f.after);
    let rows = if f.updated_since.is_some() {
        query
            .window_page(
                client,
                "updated_at",
                f.updated_since_cap.unwrap_or(UPDATED_SINCE_CAP),
                "id",
                &f.limit,
            )
            .await?
    } else {
        query.page(client, "id", &f.limit).await?
    };
    rows.iter().map(view_from_row).collect()
}

/// `text` with LIKE's wildcards (and its escape character) taken literally.
fn like_escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Counts of an organisation's contacts: aggregates without any personal data.
pub async fn counts(
    client: &impl GenericClient,
    org_id: Uuid,
) -> Result<(i64, i64), ProjectionError> {
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE archived) FROM contacts WHERE org_id = $1",
            &[&org_id],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
