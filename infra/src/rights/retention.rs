//! Retention: an organisation's period (its privacy settings) and a contact's own
//! (`contact_retention`, kept by the command that sets it), and the sweep that erases
//! contacts past theirs through the erasure's own path.
//!
//! A contact is past retention when its last change (the `contacts` read model's
//! `updated_at`: its stream's last event) is older than its period. The sweep skips
//! those under a legal hold, and records what it did on the organisation's `privacy`
//! stream (`RetentionSwept`: the contacts erased and those left under a hold), once
//! per run that erased any.

use chrono::{DateTime, Duration, Utc};
use crm_domain::consent::privacy::PrivacyCommand;
use crm_domain::contact::{Contact, ContactCommand, ContactError, ContactEvent, RequestSource};
use crm_domain::metadata::EventMetadata;
use deadpool_postgres::GenericClient;
use futures::FutureExt;
use uuid::Uuid;

use crate::commands::executor::{effect, CommandError, CommandOutcome, Executor};
use crate::store::event_store::StoreError;

use super::erasure::{self, Erase};

/// Sets contact `id`'s own retention period (`None`: the organisation's again), the
/// `contact_retention` row in the same commit.
pub async fn set_contact_period(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    days: Option<u32>,
    reason: Option<String>,
    metadata: &EventMetadata,
) -> Result<CommandOutcome, CommandError<ContactError>> {
    let keep_row = effect(move |tx, events: &[ContactEvent]| {
        async move {
            for e in events {
                if let ContactEvent::RetentionPeriodSet { days, .. } = e {
                    let r = match days {
                        Some(d) => {
                            tx.execute(
                                "INSERT INTO contact_retention (org_id, contact_id, days) \
                                 VALUES ($1, $2, $3) ON CONFLICT (org_id, contact_id) \
                                 DO UPDATE SET days = EXCLUDED.days",
                                &[&org_id, &id, &(*d as i32)],
                            )
                            .await
                        }
                        None => {
                            tx.execute(
                                "DELETE FROM contact_retention \
                                 WHERE org_id = $1 AND contact_id = $2",
                                &[&org_id, &id],
                            )
                            .await
                        }
                    };
                    r.map_err(|e| CommandError::Store(StoreError::from(e)))?;
                }
            }
            Ok(())
        }
        .boxed()
    });
    let command = ContactCommand::SetRetention { days, reason };
    executor
        .execute_with::<Contact>(org_id, &id.to_string(), command, metadata, None, &keep_row)
        .await
}

/// A contact past its retention period at the sweep's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub org_id: Uuid,
    pub contact_id: Uuid,
    pub on_hold: bool,
}

/// Up to `limit` contacts of each organisation past their period at `now`, oldest
/// change first: those under the organisation's period (by the `updated_at` index),
/// then those with a period of their own.
pub async fn due(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Due>, StoreError> {
    let orgs = client
        .query(
            "SELECT org_id, (settings ->> 'retention_days')::int FROM privacy_settings \
             WHERE settings ? 'retention_days' \
             UNION SELECT DISTINCT org_id, NULL::int FROM contact_retention",
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for row in orgs {
        let (org, days): (Uuid, Option<i32>) = (row.get(0), row.get(1));
        if let Some(days) = days {
            let before = now - Duration::days(days.into());
            for r in client
                .query(
                    "SELECT c.id, c.legal_hold FROM contacts c \
                     WHERE c.org_id = $1 AND c.erased_at IS NULL AND c.updated_at < $2 \
                       AND NOT EXISTS (SELECT 1 FROM contact_retention r \
                                       WHERE r.org_id = c.org_id AND r.contact_id = c.id) \
                     ORDER BY c.updated_at LIMIT $3",
                    &[&org, &before, &limit],
                )
                .await?
            {
                out.push(Due {
                    org_id: org,
                    contact_id: r.get(0),
                    on_hold: r.get(1),
                });
            }
        }
        for r in client
            .query(
                "SELECT c.id, c.legal_hold FROM contact_retention r \
                 JOIN contacts c ON c.org_id = r.org_id AND c.id = r.contact_id \
                 WHERE r.org_id = $1 AND c.erased_at IS NULL \
                   AND c.updated_at < $2::timestamptz - make_interval(days => r.days) \
                 ORDER BY c.updated_at LIMIT $3",
                &[&org, &now, &limit],
            )
            .await?
        {
            let d = Due {
                org_id: org,
                contact_id: r.get(0),
                on_hold: r.get(1),
            };
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    Ok(out)
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    pub erased: Vec<(Uuid, Uuid)>,
    pub on_hold: Vec<(Uuid, Uuid)>,
}

/// One pass: erases up to `limit` contacts of each organisation past their period at
/// `now` (the sweep's clock), leaves those under a legal hold, and records per
/// organisation what it did.
pub async fn sweep(
    executor: &Executor,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Swept, StoreError> {
    let found = {
        let mut client = executor.pool().get().await?;
        // The read models are behind row-level security: the sweep reads every
        // organisation's, read-only.
        let tx = crate::read_models::all_orgs_scope(&mut client, true).await?;
        let found = due(&tx, now, limit).await?;
        tx.commit().await?;
        found
    };
    let mut swept = Swept::default();
    let mut orgs: Vec<Uuid> = found.iter().map(|d| d.org_id).collect();
    orgs.sort();
    orgs.dedup();
    for org in orgs {
        let meta = EventMetadata::system(org, "retention");
        let (mut erased, mut on_hold) = (vec![], vec![]);
        for d in found.iter().filter(|d| d.org_id == org) {
            if d.on_hold {
                on_hold.push(d.contact_id);
                continue;
            }
            let request = Erase {
                org_id: org,
                contact_id: d.contact_id,
                request_id: Uuid::now_v7(),
                source: RequestSource::Retention,
            };
            match erasure::erase(executor, &request, &meta).await {
                Ok(_) => erased.push(d.contact_id),
                // A hold placed (or an erasure done) since the read: left alone.
                Err(CommandError::Domain(ContactError::OnLegalHold)) => on_hold.push(d.contact_id),
                Err(CommandError::Domain(ContactError::Erased | ContactError::NotFound)) => {}
                Err(CommandError::Store(e)) => return Err(e),
                Err(e) => {
                    tracing::warn!(contact = %d.contact_id, error = %e, "retention erasure retried next sweep")
                }
            }
        }
        if !erased.is_empty() {
            let command = PrivacyCommand::RecordRetentionSweep {
                erased: erased.clone(),
                on_hold: on_hold.clone(),
                now,
            };
            match crate::consent::privacy::execute(executor, org, command, &meta).await {
                Ok(_) => {}
                Err(CommandError::Store(e)) => return Err(e),
                Err(e) => tracing::warn!(org = %org, error = %e, "retention sweep not recorded"),
            }
        }
        swept.erased.extend(erased.into_iter().map(|c| (org, c)));
        swept.on_hold.extend(on_hold.into_iter().map(|c| (org, c)));
    }
    Ok(swept)
}
