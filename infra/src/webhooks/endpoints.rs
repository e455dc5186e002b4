//! Webhook endpoints: the commands of the `webhook_endpoint` stream with the effects
//! that keep `webhook_endpoints`, the vault and the message queue in step with them, in
//! the same transaction; and the reads of the endpoint rows.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use crm_domain::access::RoleRef;
use crm_domain::metadata::EventMetadata;
use crm_domain::webhook::{
    EndpointSettings, Replay, WebhookCommand, WebhookEndpoint, WebhookError, WebhookEvent,
};
use deadpool_postgres::{Pool, Transaction};
use futures::FutureExt;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use super::signer;
use crate::commands::executor::{effect, CommandError, CommandOutcome, Executor};
use crate::crypto::Crypto;
use crate::store::event_store::StoreError;
use crate::vault::{self, DecryptError, SecretRef, VaultError};

/// The vault's record type of a signing secret.
pub const RECORD_TYPE: &str = "webhook";
const FIELD: &str = "secret";
/// What a signing secret is decrypted for.
pub const SIGN_PURPOSE: &str = "sign_deliveries";

/// Where version `version` of endpoint `id`'s signing secret lives.
pub fn secret_ref(org_id: Uuid, id: Uuid, version: u32) -> SecretRef {
    SecretRef::new(org_id, RECORD_TYPE, format!("{id}/{version}"), FIELD)
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookAdminError {
    #[error(transparent)]
    Command(#[from] CommandError<WebhookError>),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("a stored endpoint is unreadable: {0}")]
    Corrupt(String),
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl From<DecryptError<WebhookError>> for WebhookAdminError {
    fn from(e: DecryptError<WebhookError>) -> Self {
        match e {
            DecryptError::Command(e) => Self::Command(e),
            DecryptError::Vault(e) => Self::Vault(e),
        }
    }
}

fn db(e: tokio_postgres::Error) -> CommandError<WebhookError> {
    CommandError::Store(StoreError::from(e))
}

async fn name_org(tx: &Transaction<'_>, org_id: Uuid) -> Result<(), CommandError<WebhookError>> {
    vault::name_org(tx, org_id).await.map_err(db)
}

/// Creates endpoint `id` with a new signing secret: `WebhookEndpointCreated`, its row
/// and its sealed secret in one transaction. The secret is answered here, once.
pub async fn create(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    settings: EndpointSettings,
    meta: &EventMetadata,
) -> Result<(CommandOutcome, SecretString), WebhookAdminError> {
    let secret = signer::generate();
    let at = secret_ref(org_id, id, 1);
    let sealed = vault::seal(executor.crypto(), &at, &secret)?;
    let last4 = sealed.last4.clone();
    let write = effect(move |tx, events: &[WebhookEvent]| {
        let (at, sealed) = (at.clone(), sealed.clone());
        async move {
            for event in events {
                if let WebhookEvent::WebhookEndpointCreated {
                    settings,
                    secret_last4,
                    ..
                } = event
                {
                    vault::put(tx, &at, &sealed).await.map_err(db)?;
                    name_org(tx, org_id).await?;
                    tx.execute(
                        "INSERT INTO webhook_endpoints (org_id, endpoint_id, url, event_types, \
                           description, role, ordered, status, secret_version, secret_last4) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, 'enabled', 1, $8)",
                        &[
                            &org_id,
                            &id,
                            &settings.url.as_str(),
                            &settings.event_types,
                            &settings.description,
                            &settings.role.to_string(),
                            &settings.ordered,
                            secret_last4,
                        ],
                    )
                    .await
                    .map_err(db)?;
                }
            }
            Ok(())
        }
        .boxed()
    });
    let outcome = executor
        .execute_with::<WebhookEndpoint>(
            org_id,
            &id.to_string(),
            WebhookCommand::Create {
                endpoint_id: id,
                settings,
                secret_last4: last4,
            },
            meta,
            Some(0),
            &write,
        )
        .await?;
    Ok((outcome, secret))
}

/// Replaces an endpoint's settings.
pub async fn update(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    settings: EndpointSettings,
    meta: &EventMetadata,
) -> Result<CommandOutcome, WebhookAdminError> {
    let write = effect(move |tx, events: &[WebhookEvent]| {
        async move {
            for event in events {
                if let WebhookEvent::WebhookEndpointUpdated { settings } = event {
                    name_org(tx, org_id).await?;
                    tx.execute(
                        "UPDATE webhook_endpoints SET url = $3, event_types = $4, \
                           description = $5, role = $6, ordered = $7, updated_at = now() \
                         WHERE org_id = $1 AND endpoint_id = $2",
                        &[
                            &org_id,
                            &id,
                            &settings.url.as_str(),
                            &settings.event_types,
                            &settings.description,
                            &settings.role.to_string(),
                            &settings.ordered,
                        ],
                    )
                    .await
                    .map_err(db)?;
                }
            }
            Ok(())
        }
        .boxed()
    });
    Ok(executor
        .execute_with::<WebhookEndpoint>(
            org_id,
            &id.to_string(),
            WebhookCommand::Update { settings },
            meta,
            None,
            &write,
        )
        .await?)
}

/// A new signing secret for endpoint `id`; the one before stays valid (deliveries are
/// signed with both) for `grace`. The new secret is answered here, once.
pub async fn rotate(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    grace: chrono::Duration,
    meta: &EventMetadata,
) -> Result<(CommandOutcome, SecretString), WebhookAdminError> {
    let secret = signer::generate();
    let last4 = vault::last4(secret.expose_secret());
    let crypto: Arc<Crypto> = executor.crypto().clone();
    let failed: Arc<Mutex<Option<VaultError>>> = Arc::default();
    let write = {
        let (secret, failed) = (secret.clone(), failed.clone());
        effect(move |tx, events: &[WebhookEvent]| {
            // Sealed here: the version is the event's.
            let mut work = Vec::new();
            let mut unsealed = false;
            for event in events {
                if let WebhookEvent::WebhookSecretRotated {
                    secret_version,
                    secret_last4,
                    previous_valid_until,
                } = event
                {
                    let at = secret_ref(org_id, id, *secret_version);
                    match vault::seal(&crypto, &at, &secret) {
                        Ok(sealed) => work.push((
                            at,
                            sealed,
                            *secret_version,
                            secret_last4.clone(),
                            *previous_valid_until,
                        )),
                        Err(e) => {
                            unsealed = true;
                            if let Ok(mut f) = failed.lock() {
                                *f = Some(e);
                            }
                        }
                    }
                }
            }
            async move {
                // No rotation on record without its secret in the vault: roll back.
                if unsealed {
                    return Err(CommandError::Store(StoreError::Corrupt(
                        0,
                        "the new signing secret could not be sealed".into(),
                    )));
                }
                for (at, sealed, version, last4, until) in work {
                    vault::put(tx, &at, &sealed).await.map_err(db)?;
                    if version > 2 {
                        vault::delete(tx, &secret_ref(org_id, id, version - 2))
                            .await
                            .map_err(db)?;
                    }
                    name_org(tx, org_id).await?;
                    tx.execute(
                        "UPDATE webhook_endpoints SET secret_version = $3, secret_last4 = $4, \
                           previous_valid_until = $5, updated_at = now() \
                         WHERE org_id = $1 AND endpoint_id = $2",
                        &[&org_id, &id, &(version as i32), &last4, &until],
                    )
                    .await
                    .map_err(db)?;
                }
                Ok(())
            }
            .boxed()
        })
    };
    let result = executor
        .execute_with::<WebhookEndpoint>(
            org_id,
            &id.to_string(),
            WebhookCommand::RotateSecret {
                secret_last4: last4,
                previous_valid_until: Utc::now() + grace,
            },
            meta,
            None,
            &write,
        )
        .await;
    if let Some(e) = failed.lock().ok().and_then(|mut f| f.take()) {
        return Err(e.into());
    }
    Ok((result?, secret))
}

/// Disables an endpoint by hand, or automatically (`auto`: the run of failures): its
/// queued messages become `missed` (a replay sends them).
pub async fn disable(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    auto: Option<(u32, DateTime<Utc>)>,
    meta: &EventMetadata,
) -> Result<CommandOutcome, WebhookAdminError> {
    let status = if auto.is_some() {
        "auto_disabled"
    } else {
        "disabled"
    };
    let write = effect(move |tx, events: &[WebhookEvent]| {
        let disabled = events.iter().any(|e| {
            matches!(
                e,
                WebhookEvent::WebhookEndpointDisabled {}
                    | WebhookEvent::WebhookEndpointAutoDisabled { .. }
            )
        });
        async move {
            if disabled {
                name_org(tx, org_id).await?;
                tx.execute(
                    "UPDATE webhook_endpoints SET status = $3, disabled_at = now(), \
                       updated_at = now() WHERE org_id = $1 AND endpoint_id = $2",
                    &[&org_id, &id, &status],
                )
                .await
                .map_err(db)?;
                tx.execute(
                    "UPDATE webhook_messages SET status = 'missed', next_attempt_at = NULL, \
                       lease_until = NULL \
                     WHERE org_id = $1 AND endpoint_id = $2 AND status IN ('pending', 'sending')",
                    &[&org_id, &id],
                )
                .await
                .map_err(db)?;
            }
            Ok(())
        }
        .boxed()
    });
    let command = match auto {
        Some((consecutive_failures, failing_since)) => WebhookCommand::AutoDisable {
            consecutive_failures,
            failing_since,
        },
        None => WebhookCommand::Disable,
    };
    Ok(executor
        .execute_with::<WebhookEndpoint>(org_id, &id.to_string(), command, meta, None, &write)
        .await?)
}

/// Enables a disabled endpoint: new events reach it again, its failure run starts over.
/// What it missed meanwhile waits for a replay.
pub async fn enable(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    meta: &EventMetadata,
) -> Result<CommandOutcome, WebhookAdminError> {
    let write = effect(move |tx, events: &[WebhookEvent]| {
        let enabled = events
            .iter()
            .any(|e| matches!(e, WebhookEvent::WebhookEndpointEnabled {}));
        async move {
            if enabled {
                name_org(tx, org_id).await?;
                tx.execute(
                    "UPDATE webhook_endpoints SET status = 'enabled', disabled_at = NULL, \
                       consecutive_failures = 0, failing_since = NULL, updated_at = now() \
                     WHERE org_id = $1 AND endpoint_id = $2",
                    &[&org_id, &id],
                )
                .await
                .map_err(db)?;
            }
            Ok(())
        }
        .boxed()
    });
    Ok(executor
        .execute_with::<WebhookEndpoint>(
            org_id,
            &id.to_string(),
            WebhookCommand::Enable,
            meta,
            None,
            &write,
        )
        .await?)
}

/// Deletes an endpoint: its row and its secrets go; what was queued for it is dropped.
/// Its delivery log stays for its retention period.
pub async fn delete(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    meta: &EventMetadata,
) -> Result<CommandOutcome, WebhookAdminError> {
    let write = effect(move |tx, events: &[WebhookEvent]| {
        let deleted = events
            .iter()
            .any(|e| matches!(e, WebhookEvent::WebhookEndpointDeleted {}));
        async move {
            if deleted {
                name_org(tx, org_id).await?;
                let version: Option<i32> = tx
                    .query_opt(
                        "DELETE FROM webhook_endpoints WHERE org_id = $1 AND endpoint_id = $2 \
                         RETURNING secret_version",
                        &[&org_id, &id],
                    )
                    .await
                    .map_err(db)?
                    .map(|r| r.get(0));
                if let Some(v) = version {
                    for version in [v, v - 1].into_iter().filter(|v| *v >= 1) {
                        vault::delete(tx, &secret_ref(org_id, id, version as u32))
                            .await
                            .map_err(db)?;
                    }
                }
                tx.execute(
                    "UPDATE webhook_messages SET status = 'dropped', next_attempt_at = NULL, \
                       lease_until = NULL, finished_at = now(), last_error = 'endpoint deleted' \
                     WHERE org_id = $1 AND endpoint_id = $2 \
                       AND status IN ('pending', 'sending', 'missed')",
                    &[&org_id, &id],
                )
                .await
                .map_err(db)?;
            }
            Ok(())
        }
        .boxed()
    });
    Ok(executor
        .execute_with::<WebhookEndpoint>(
            org_id,
            &id.to_string(),
            WebhookCommand::Delete,
            meta,
            None,
            &write,
        )
        .await?)
}

/// Queues again what `replay` names (`WebhookReplayRequested`); answers how many
/// messages were queued.
pub async fn replay(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    replay: Replay,
    meta: &EventMetadata,
) -> Result<(CommandOutcome, u64), WebhookAdminError> {
    let count: Arc<Mutex<u64>> = Arc::default();
    let write = {
        let count = count.clone();
        effect(move |tx, events: &[WebhookEvent]| {
            let replay = events.iter().find_map(|e| match e {
                WebhookEvent::WebhookReplayRequested { replay } => Some(replay.clone()),
                _ => None,
            });
            let count = count.clone();
            async move {
                let Some(replay) = replay else {
                    return Ok(());
                };
                name_org(tx, org_id).await?;
                let n = match replay {
                    Replay::Message { message_id } => tx
                        .execute(
                            "UPDATE webhook_messages SET status = 'pending', \
                               next_attempt_at = now(), finished_at = NULL, lease_until = NULL \
                             WHERE org_id = $1 AND endpoint_id = $2 AND id = $3 \
                               AND status <> 'sending'",
                            &[&org_id, &id, &message_id],
                        )
                        .await
                        .map_err(db)?,
                    Replay::Since { since } => tx
                        .execute(
                            "UPDATE webhook_messages SET status = 'pending', \
                               next_attempt_at = now(), finished_at = NULL, lease_until = NULL \
                             WHERE org_id = $1 AND endpoint_id = $2 AND created_at >= $3 \
                               AND status IN ('failed', 'missed')",
                            &[&org_id, &id, &since],
                        )
                        .await
                        .map_err(db)?,
                };
                if let Ok(mut c) = count.lock() {
                    *c = n;
                }
                Ok(())
            }
            .boxed()
        })
    };
    let outcome = executor
        .execute_with::<WebhookEndpoint>(
            org_id,
            &id.to_string(),
            WebhookCommand::Replay { replay },
            meta,
            None,
            &write,
        )
        .await?;
    let n = count.lock().map(|c| *c).unwrap_or(0);
    Ok((outcome, n))
}

/// The key bytes of version `version` of endpoint `id`'s secret, decrypted once
/// `WebhookSecretDecrypted` (purpose `sign_deliveries`, `meta`'s principal) is on record.
pub async fn decrypt_key(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    version: u32,
    meta: &EventMetadata,
) -> Result<Vec<u8>, WebhookAdminError> {
    let (_, secret) = vault::decrypt_recorded::<WebhookEndpoint>(
        executor,
        &secret_ref(org_id, id, version),
        &id.to_string(),
        WebhookCommand::RecordDecrypt {
            secret_version: version,
            purpose: SIGN_PURPOSE.to_owned(),
        },
        meta,
        None,
    )
    .await?;
    signer::key_of(secret.expose_secret())
        .ok_or_else(|| WebhookAdminError::Corrupt(format!("secret {version} of {id}")))
}

/// An endpoint as listed: never its secret, only its last four characters.
#[derive(Debug, Clone)]
pub struct EndpointRow {
    pub org_id: Uuid,
    pub id: Uuid,
    pub url: String,
    pub event_types: Vec<String>,
    pub description: Option<String>,
    pub role: RoleRef,
    pub ordered: bool,
    /// `enabled`, `disabled`, `auto_disabled`.
    pub status: String,
    pub secret_version: u32,
    pub secret_last4: Option<String>,
    pub previous_valid_until: Option<DateTime<Utc>>,
    pub consecutive_failures: i32,
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

pub(crate) const COLUMNS: &str = "org_id, endpoint_id, url, event_types, description, role, \
     ordered, status, secret_version, secret_last4, previous_valid_until, \
     consecutive_failures, failing_since, created_at, updated_at, disabled_at";

pub(crate) fn row_of(r: &tokio_postgres::Row) -> Result<EndpointRow, WebhookAdminError> {
    let role: String = r.get(5);
    Ok(EndpointRow {
        org_id: r.get(0),
        id: r.get(1),
        url: r.get(2),
        event_types: r.get(3),
        description: r.get(4),
        role: RoleRef::parse(&role).ok_or(WebhookAdminError::Corrupt(role))?,
        ordered: r.get(6),
        status: r.get(7),
        secret_version: r.get::<_, i32>(8).max(1) as u32,
        secret_last4: r.get(9),
        previous_valid_until: r.get(10),
        consecutive_failures: r.get(11),
        failing_since: r.get(12),
        created_at: r.get(13),
        updated_at: r.get(14),
        disabled_at: r.get(15),
    })
}

/// The organisation's endpoints, oldest first.
pub async fn list(pool: &Pool, org_id: Uuid) -> Result<Vec<EndpointRow>, WebhookAdminError> {
    let mut client = pool.get().await?;
    let tx = crate::read_models::org_scope(&mut client, org_id).await?;
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM webhook_endpoints WHERE org_id = $1 \
                 ORDER BY created_at, endpoint_id"
            ),
            &[&org_id],
        )
        .await?;
    tx.commit().await?;
    rows.iter().map(row_of).collect()
}

/// Endpoint `id` of the organisation (none: unknown, deleted, or another's).
pub async fn get(
    pool: &Pool,
    org_id: Uuid,
    id: Uuid,
) -> Result<Option<EndpointRow>, WebhookAdminError> {
    let mut client = pool.get().await?;
    let tx = crate::read_models::org_scope(&mut client, org_id).await?;
    let row = tx
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM webhook_endpoints WHERE org_id = $1 AND endpoint_id = $2"
            ),
            &[&org_id, &id],
        )
        .await?;
    tx.commit().await?;
    row.as_ref().map(row_of).transpose()
}
