//! API keys: issued and revoked by command; the `api_keys` row (digest of the secret,
//! last four characters, grant, expiry, last use) is written in the same transaction.

use chrono::{DateTime, Utc};
use crm_domain::access::{Permission, RoleRef};
use crm_domain::api_key::{ApiKey, ApiKeyCommand, ApiKeyError, ApiKeyEvent};
use crm_domain::metadata::EventMetadata;
use deadpool_postgres::GenericClient;
use futures::FutureExt;
use uuid::Uuid;

use crate::access::accounts::{parse_modules, Access, AccountError};
use crate::access::cache::execute_access_change;
use crate::commands::executor::{CommandError, CommandOutcome, Executor};
use crate::store::event_store::StoreError;

fn db(e: tokio_postgres::Error) -> CommandError<ApiKeyError> {
    CommandError::Store(StoreError::from(e))
}

/// Issues a key whose secret has the SHA-256 `digest`.
pub async fn issue(
    executor: &Executor,
    org_id: Uuid,
    key_id: Uuid,
    digest: Vec<u8>,
    command: ApiKeyCommand,
    meta: &EventMetadata,
) -> Result<CommandOutcome, AccountError> {
    let effect = crate::commands::executor::effect(move |tx, events: &[ApiKeyEvent]| {
        let digest = digest.clone();
        async move {
            for event in events {
                if let ApiKeyEvent::ApiKeyIssued {
                    name,
                    role,
                    only,
                    last4,
                    expires_at,
                    agent_of,
                    ..
                } = event
                {
                    let custom = match role {
                        RoleRef::Custom(id) => Some(*id),
                        RoleRef::Builtin(_) => None,
                    };
                    let only: Option<Vec<&str>> =
                        only.as_ref().map(|o| o.iter().map(|p| p.name()).collect());
                    let kind = if agent_of.is_some() { "agent" } else { "integration" };
                    tx.execute(
                        "INSERT INTO api_keys (key_id, org_id, name, digest, last4, role, custom_role, only_permissions, expires_at, kind, registered_by) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                        &[&key_id, &org_id, &name.as_str(), &digest, last4, &role.to_string(), &custom, &only, expires_at, &kind, agent_of],
                    )
                    .await
                    .map_err(db)?;
                }
            }
            Ok(())
        }
        .boxed()
    });
    Ok(execute_access_change::<ApiKey>(
        executor,
        org_id,
        &key_id.to_string(),
        command,
        meta,
        Some(0),
        &effect,
    )
    .await?)
}

/// Revokes a key of `org_id`; from the commit on, it authenticates nothing.
pub async fn revoke(
    executor: &Executor,
    org_id: Uuid,
    key_id: Uuid,
    meta: &EventMetadata,
) -> Result<CommandOutcome, AccountError> {
    let effect = crate::commands::executor::effect(move |tx, events: &[ApiKeyEvent]| {
        async move {
            if !events.is_empty() {
                tx.execute(
                    "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND org_id = $2",
                    &[&key_id, &org_id],
                )
                .await
                .map_err(db)?;
            }
            Ok(())
        }
        .boxed()
    });
    Ok(execute_access_change::<ApiKey>(
        executor,
        org_id,
        &key_id.to_string(),
        ApiKeyCommand::Revoke,
        meta,
        None,
        &effect,
    )
    .await?)
}

/// A key as listed (never its secret or digest).
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub key_id: Uuid,
    pub name: String,
    pub last4: String,
    pub role: String,
    pub only: Option<Vec<String>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// `integration` or `agent`.
    pub kind: String,
    /// An agent's registering user.
    pub registered_by: Option<Uuid>,
}

pub async fn list(
    client: &impl GenericClient,
    org_id: Uuid,
) -> Result<Vec<KeyRow>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT key_id, name, last4, role, only_permissions, expires_at, revoked_at, last_used_at, created_at, \
                    kind, registered_by \
             FROM api_keys WHERE org_id = $1 ORDER BY created_at",
            &[&org_id],
        )
        .await?
        .iter()
        .map(|r| KeyRow {
            key_id: r.get(0),
            name: r.get(1),
            last4: r.get(2),
            role: r.get(3),
            only: r.get(4),
            expires_at: r.get(5),
            revoked_at: r.get(6),
            last_used_at: r.get(7),
            created_at: r.get(8),
            kind: r.get(9),
            registered_by: r.get(10),
        })
        .collect())
}

/// The access of the live key (not revoked, not expired) whose secret has `digest`.
/// Records the use, at most once a minute per key.
///
/// An agent's key holds what its grant allows and its registering user may do now,
/// never more (`Policy::capped_by`); while that user is deactivated, or has to set up
/// two-factor authentication first, the agent can do nothing.
pub async fn access_by_digest(
    client: &impl GenericClient,
    digest: &[u8],
) -> Result<Option<Access>, tokio_postgres::Error> {
    access_where(client, "k.digest = $1", &digest, true).await
}

/// The access of the live key `key_id` of `org_id` now (an agent's, capped by its
/// registering user's as at a request), as when the key itself calls: to act for it
/// later, as an approved AI action does. Records no use.
pub async fn access_by_key_id(
    client: &impl GenericClient,
    org_id: Uuid,
    key_id: Uuid,
) -> Result<Option<Access>, tokio_postgres::Error> {
    Ok(access_where(client, "k.key_id = $1", &key_id, false)
        .await?
        .filter(|a| a.org_id == org_id))
}

async fn access_where(
    client: &impl GenericClient,
    key_is: &str,
    key: &(dyn tokio_postgres::types::ToSql + Sync),
    record_use: bool,
) -> Result<Option<Access>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT k.key_id, k.org_id, k.role, k.only_permissions, o.modules, r.policy, r.retired, \
                    k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute', \
                    k.registered_by \
             FROM api_keys k JOIN organizations o ON o.org_id = k.org_id \
             LEFT JOIN roles r ON r.role_id = k.custom_role AND r.org_id = k.org_id \
             WHERE {key_is} AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())",
        ))
        .await?;
    let row = client.query_opt(&statement, &[key]).await?;
    let Some(row) = row else { return Ok(None) };
    let key_id: Uuid = row.get(0);
    let Some(role) = RoleRef::parse(row.get(2)) else {
        return Ok(None);
    };
    let Some(mut policy) = crate::access::accounts::resolve_policy(role, row.get(5), row.get(6))
    else {
        return Ok(None);
    };
    if let Some(only) = row.get::<_, Option<Vec<String>>>(3) {
        let only: std::collections::BTreeSet<Permission> =
            only.iter().filter_map(|p| Permission::parse(p)).collect();
        policy.permissions = policy.permissions.intersection(&only).copied().collect();
    }
    let org_id: Uuid = row.get(1);
    let agent_of: Option<Uuid> = row.get(8);
    if let Some(user) = agent_of {
        let cap = crate::access::accounts::load_access(client, user, org_id).await?;
        match cap {
            Some(cap) if !cap.two_factor_pending => policy = policy.capped_by(&cap.policy),
            _ => return Ok(None),
        }
    }
    if record_use && row.get::<_, bool>(7) {
        client
            .execute(
                "UPDATE api_keys SET last_used_at = now() WHERE key_id = $1",
                &[&key_id],
            )
            .await?;
    }
    Ok(Some(Access {
        user_id: key_id,
        org_id,
        role,
        policy,
        modules: parse_modules(row.get(4)),
        token_generation: 0,
        two_factor_pending: false,
        agent_of,
    }))
}
