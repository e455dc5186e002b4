//! Erasure of a contact (GDPR Art. 17) by crypto-shredding, in one commit:
//!
//! 1. the contact is loaded (its profile decrypted one last time, for the suppression
//!    list) and must exist, not be erased already, and not be under a legal hold (the
//!    aggregate refuses otherwise);
//! 2. its tombstone, `ContactErased`, is appended to the contact's stream, naming the
//!    keys destroyed and the channels suppressed; in the same transaction
//! 3. every data key that holds the contact's data is destroyed: its own (its contact
//!    and consent streams, its snapshots) and every key it owns (its messages, the AI
//!    actions that touched it: `data_keys.owners`). A key that appeared meanwhile (a
//!    message queued since step 1) makes the commit a conflict, and the erasure is
//!    decided again;
//! 4. its snapshots are deleted (they could no longer be opened anyway);
//! 5. its e-mail address and phone number go onto the suppression list as keyed
//!    hashes (`crate::consent::state::point_hmac`), pointing at the tombstone;
//! 6. `NOTIFY crm_keys` tells every process to forget the organisation's cached keys.
//!
//! The read models purge what they hold when they apply the tombstone; the receipt is
//! the projection `erasure_receipts` of it.

use std::collections::BTreeSet;
use std::sync::Arc;

use crm_domain::consent::Channel;
use crm_domain::contact::{
    Contact, ContactCommand, ContactError, ContactEvent, ContactProfile, RequestSource,
};
use crm_domain::metadata::EventMetadata;
use deadpool_postgres::GenericClient;
use futures::FutureExt;
use uuid::Uuid;

use crate::commands::executor::{effect, CommandError, CommandOutcome, Executor};
use crate::consent::state::{channels_of_point, point_hmac};
use crate::crypto::data_keys::KEYS_CHANNEL;
use crate::crypto::org_secrets::SUPPRESSION;
use crate::store::event_store::StoreError;

/// How often an erasure is decided again when a new key of the contact appeared
/// between its read and its commit.
const TRIES: usize = 3;

/// What an erasure asks.
#[derive(Debug, Clone)]
pub struct Erase {
    pub org_id: Uuid,
    pub contact_id: Uuid,
    /// The receipt's id.
    pub request_id: Uuid,
    pub source: RequestSource,
}

/// What an erasure did.
#[derive(Debug, Clone)]
pub struct Erased {
    /// What was written: the tombstone alone.
    pub outcome: CommandOutcome,
    /// The tombstone (`ContactErased`: the keys destroyed, the channels suppressed).
    pub tombstone: ContactEvent,
}

/// Erases a contact (see the module's documentation).
pub async fn erase(
    executor: &Executor,
    request: &Erase,
    metadata: &EventMetadata,
) -> Result<Erased, CommandError<ContactError>> {
    let mut last = CommandError::Conflict;
    for _ in 0..TRIES {
        match erase_once(executor, request, metadata).await {
            Err(CommandError::Conflict) => last = CommandError::Conflict,
            other => return other,
        }
    }
    Err(last)
}

async fn erase_once(
    executor: &Executor,
    request: &Erase,
    metadata: &EventMetadata,
) -> Result<Erased, CommandError<ContactError>> {
    let (org_id, contact_id) = (request.org_id, request.contact_id);
    let id = contact_id.to_string();
    let client = executor.pool().get().await.map_err(StoreError::from)?;
    let loaded = executor.load::<Contact>(&client, org_id, &id).await?;
    // The aggregate decides the refusals; what the commit needs is read only for a
    // contact it would erase.
    let (keys, points) = if loaded.aggregate.exists() && !loaded.aggregate.erased {
        let keys = keys_of(&client, org_id, contact_id).await?;
        let secret = executor
            .crypto()
            .org_secret(&client, &org_id, SUPPRESSION)
            .await
            .map_err(StoreError::from)?;
        (keys, suppression_rows(&secret, &loaded.aggregate.profile))
    } else {
        (vec![], vec![])
    };
    drop(client);
    let suppressed: Vec<String> = points
        .iter()
        .map(|(c, _)| c.name().to_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let command = ContactCommand::Erase {
        request_id: request.request_id,
        source: request.source,
        keys_destroyed: keys.clone(),
        suppressed: suppressed.clone(),
    };
    let expected: BTreeSet<String> = keys.iter().cloned().collect();
    let points = Arc::new(points);
    let shred = effect(move |tx, _events: &[_]| {
        let (expected, points) = (expected.clone(), points.clone());
        async move {
            let destroyed: BTreeSet<String> = tx
                .query(
                    "UPDATE data_keys SET wrapped_key = NULL, destroyed_at = now() \
                     WHERE org_id = $1 AND (subject_id = $2 OR owners @> ARRAY[$3::uuid]) \
                       AND wrapped_key IS NOT NULL \
                     RETURNING subject_id",
                    &[&org_id, &contact_id.to_string(), &contact_id],
                )
                .await
                .map_err(StoreError::from)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if destroyed != expected {
                // A key appeared (or went) since the read: decide again.
                return Err(CommandError::Conflict);
            }
            let subjects: Vec<&String> = destroyed.iter().collect();
            tx.execute(
                "DELETE FROM snapshots WHERE org_id = $1 AND aggregate_id = ANY($2)",
                &[&org_id, &subjects],
            )
            .await
            .map_err(StoreError::from)?;
            if !points.is_empty() {
                let channels: Vec<&str> = points.iter().map(|(c, _)| c.name()).collect();
                let hashes: Vec<&str> = points.iter().map(|(_, h)| h.as_str()).collect();
                tx.execute(
                    "INSERT INTO suppression_list (org_id, channel, point_hmac, event_id) \
                     SELECT $1, c, h, (SELECT event_id FROM events \
                                       WHERE org_id = $1 AND aggregate_type = 'contact' \
                                         AND aggregate_id = $2 \
                                       ORDER BY sequence DESC LIMIT 1) \
                     FROM unnest($3::text[], $4::text[]) AS p (c, h) \
                     ON CONFLICT DO NOTHING",
                    &[&org_id, &contact_id.to_string(), &channels, &hashes],
                )
                .await
                .map_err(StoreError::from)?;
            }
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&KEYS_CHANNEL, &org_id.to_string()],
            )
            .await
            .map_err(StoreError::from)?;
            Ok(())
        }
        .boxed()
    });
    let (outcome, mut events) = executor
        .execute_returning::<Contact>(
            org_id,
            &id,
            command,
            metadata,
            None,
            Some(&shred),
            Some(loaded),
        )
        .await?;
    for subject in &keys {
        executor.crypto().forget(&org_id, subject);
    }
    let tombstone = events.pop().ok_or(CommandError::Store(StoreError::Corrupt(
        0,
        "an erasure wrote no tombstone".into(),
    )))?;
    Ok(Erased { outcome, tombstone })
}

/// The subjects whose keys hold the contact's data: its own first, then those it owns
/// in the order they were created.
async fn keys_of(
    client: &impl GenericClient,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query(
            "SELECT subject_id FROM data_keys \
             WHERE org_id = $1 AND (subject_id = $2 OR owners @> ARRAY[$3::uuid]) \
               AND wrapped_key IS NOT NULL \
             ORDER BY subject_id <> $2, created_at, subject_id",
            &[&org_id, &contact_id.to_string(), &contact_id],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The suppression list's rows for a profile's e-mail address and phone number: one
/// per channel that reaches each.
fn suppression_rows(secret: &[u8; 32], profile: &ContactProfile) -> Vec<(Channel, String)> {
    let mut rows = Vec::new();
    if let Some(email) = &profile.email {
        for &c in channels_of_point(Channel::Email) {
            rows.push((c, point_hmac(secret, c, email.as_str())));
        }
    }
    if let Some(phone) = &profile.phone {
        for &c in channels_of_point(Channel::Sms) {
            rows.push((c, point_hmac(secret, c, phone.as_str())));
        }
    }
    rows
}
