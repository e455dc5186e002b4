//! The `contacts` table: persistence of `crm_projections::contacts`.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use crm_domain::contact::{Contact, ContactEvent, ContactProfile};
use crm_projections::contacts::{update, ContactView, Update};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Transaction;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::Row;
use uuid::Uuid;

use super::envelope;
use crate::commands::DecodedEvent;
use crate::projector::{Projection, ProjectionError, Rebuilder};

pub struct ContactsProjection;

const VIEW_COLUMNS: &str =
    "id, org_id, version, profile, archived, created_at, updated_at, last_position";

fn view_from_row(row: &Row) -> Result<ContactView, ProjectionError> {
    let profile: serde_json::Value = row.get(3);
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

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        table: &str,
        event: &DecodedEvent,
    ) -> Result<(), ProjectionError> {
        if event.stored.aggregate_type != Contact::TYPE {
            return Ok(());
        }
        let typed: ContactEvent = event.typed()?;
        let id: Uuid = event
            .stored
            .aggregate_id
            .parse()
            .map_err(|_| ProjectionError::OutOfOrder("contact id is not a UUID".into()))?;
        let sql =
            format!("SELECT {VIEW_COLUMNS} FROM {table} WHERE org_id = $1 AND id = $2 FOR UPDATE");
        let row = tx.query_opt(&sql, &[&event.stored.org_id, &id]).await?;
        let current = row.as_ref().map(view_from_row).transpose()?;
        match update(current.as_ref(), &envelope(event), &typed) {
            Update::AlreadyApplied => Ok(()),
            Update::OutOfOrder { have, got } => Err(ProjectionError::OutOfOrder(format!(
                "contact {id}: have version {have}, got event {got}"
            ))),
            Update::Changed(v) => {
                let sql = format!(
                    "INSERT INTO {table} ({VIEW_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (org_id, id) DO UPDATE SET version = EXCLUDED.version, \
                     profile = EXCLUDED.profile, archived = EXCLUDED.archived, \
                     updated_at = EXCLUDED.updated_at, last_position = EXCLUDED.last_position"
                );
                let stmt = tx.prepare_cached(&sql).await?;
                tx.execute(
                    &stmt,
                    &[
                        &v.id,
                        &v.org_id,
                        &v.version,
                        &profile_json(&v.profile),
                        &v.archived,
                        &v.created_at,
                        &v.updated_at,
                        &v.last_position,
                    ],
                )
                .await?;
                Ok(())
            }
        }
    }

    fn rebuilder(&self) -> Box<dyn Rebuilder> {
        Box::new(ContactsRebuilder::default())
    }
}

#[derive(Default)]
struct ContactsRebuilder {
    views: HashMap<(Uuid, Uuid), ContactView>,
}

#[async_trait]
impl Rebuilder for ContactsRebuilder {
    fn fold(&mut self, event: &DecodedEvent) -> Result<(), ProjectionError> {
        if event.stored.aggregate_type != Contact::TYPE {
            return Ok(());
        }
        let typed: ContactEvent = event.typed()?;
        let Ok(id) = event.stored.aggregate_id.parse::<Uuid>() else {
            return Ok(());
        };
        let key = (event.stored.org_id, id);
        match update(self.views.get(&key), &envelope(event), &typed) {
            Update::Changed(v) => {
                self.views.insert(key, *v);
                Ok(())
            }
            Update::AlreadyApplied => Ok(()),
            Update::OutOfOrder { have, got } => Err(ProjectionError::OutOfOrder(format!(
                "contact {id}: have version {have}, got event {got}"
            ))),
        }
    }

    fn wants_flush(&self) -> bool {
        // Contacts fold across the whole history; written once at the end.
        false
    }

    async fn flush(
        &mut self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> Result<u64, ProjectionError> {
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
            ],
        );
        pin_mut!(writer);
        for (_, v) in self.views.drain() {
            let profile = profile_json(&v.profile);
            writer
                .as_mut()
                .write(&[
                    &v.id,
                    &v.org_id,
                    &v.version,
                    &profile,
                    &v.archived,
                    &v.created_at,
                    &v.updated_at,
                    &v.last_position,
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

/// A page of an organisation's contacts, ordered by id (creation order: UUID v7).
pub async fn list(
    client: &impl GenericClient,
    org_id: Uuid,
    f: &ContactFilter,
) -> Result<Vec<ContactView>, ProjectionError> {
    let like = f.q.as_ref().map(|q| {
        let escaped = q
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let email = f.email.as_ref().map(|e| e.to_lowercase());
    let sql = format!(
        "SELECT {VIEW_COLUMNS} FROM contacts WHERE org_id = $1 \
         AND ($2::text IS NULL OR email = $2) \
         AND ($3::text IS NULL OR company = $3) \
         AND ($4::text IS NULL OR search_text LIKE $4) \
         AND ($5::bool IS NULL OR archived = $5) \
         AND ($6::timestamptz IS NULL OR updated_at >= $6) \
         AND ($7::uuid IS NULL OR id > $7) \
         ORDER BY id LIMIT $8"
    );
    let rows = client
        .query(
            &sql,
            &[
                &org_id,
                &email,
                &f.company,
                &like,
                &f.archived,
                &f.updated_since,
                &f.after,
                &f.limit,
            ],
        )
        .await?;
    rows.iter().map(view_from_row).collect()
}
