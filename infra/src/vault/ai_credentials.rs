//! AI provider credentials ("bring your own key"), kept in the vault.
//!
//! Each credential is a `credential` stream (`crm_domain::credential`, id = a UUID)
//! whose events carry the provider, label, base URL and the secret's last four
//! characters only. The same transaction that appends an event keeps two tables in
//! step with it: `ai_credentials` (the non-secret part, for listing) and the vault row
//! (`credential`, id, `secret`) holding the sealed API key. Deleting removes both.
//!
//! The key is decrypted only through [`decrypt`], which records `CredentialDecrypted`
//! (the caller as principal, with a purpose) before it opens the value; [`verify`] is
//! its first use: `GET {base_url}/models` with the key as a bearer token.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use crm_domain::credential::{
    Credential, CredentialCommand, CredentialError, CredentialEvent, CredentialLabel, Provider,
};
use crm_domain::metadata::EventMetadata;
use deadpool_postgres::Pool;
use futures::FutureExt;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use super::{DecryptError, SecretRef, VaultError};
use crate::commands::executor::{effect, CommandError, CommandOutcome, Executor};
use crate::store::event_store::StoreError;

/// The vault's record type of a credential's secret.
pub const RECORD_TYPE: &str = "credential";
/// The vault's field of a credential's secret.
pub const FIELD: &str = "secret";

/// Where the secret of credential `id` lives.
pub fn secret_ref(org_id: Uuid, id: Uuid) -> SecretRef {
    SecretRef::new(org_id, RECORD_TYPE, id.to_string(), FIELD)
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialAdminError {
    #[error(transparent)]
    Command(#[from] CommandError<CredentialError>),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("a stored credential is unreadable: {0}")]
    Corrupt(String),
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl From<DecryptError<CredentialError>> for CredentialAdminError {
    fn from(e: DecryptError<CredentialError>) -> Self {
        match e {
            DecryptError::Command(e) => Self::Command(e),
            DecryptError::Vault(e) => Self::Vault(e),
        }
    }
}

/// Why an API key is refused: `None` when it may be stored. 8 to 4096 visible ASCII
/// characters (it travels in an HTTP header).
pub fn check_secret(secret: &str) -> Option<&'static str> {
    let ok = (8..=4096).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_graphic());
    (!ok).then_some("must be 8 to 4096 visible ASCII characters, without spaces")
}

/// The base URL to store: the one given (an http(s) URL with a host, no user, query or
/// fragment; without a trailing `/`), else the provider's default.
pub fn parse_base_url(provider: Provider, given: Option<&str>) -> Result<String, &'static str> {
    let Some(given) = given else {
        return provider
            .default_base_url()
            .map(str::to_owned)
            .ok_or("is required for this provider");
    };
    let bad = "must be an http(s) URL with a host, without user, query or fragment (at most 2048 characters)";
    if given.len() > 2048 {
        return Err(bad);
    }
    let url = url::Url::parse(given).map_err(|_| bad)?;
    let fine = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none();
    if !fine {
        return Err(bad);
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn db(e: tokio_postgres::Error) -> CommandError<CredentialError> {
    CommandError::Store(StoreError::from(e))
}

/// Creates credential `id`: `CredentialCreated`, its `ai_credentials` row and its
/// sealed secret, in one transaction. Check the input with [`check_secret`] and
/// [`parse_base_url`] first.
#[allow(clippy::too_many_arguments)]
pub async fn create(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    provider: Provider,
    label: CredentialLabel,
    base_url: String,
    secret: &SecretString,
    meta: &EventMetadata,
) -> Result<CommandOutcome, CredentialAdminError> {
    let at = secret_ref(org_id, id);
    let sealed = super::seal(executor.crypto(), &at, secret)?;
    let last4 = sealed.last4.clone();
    let write = effect(move |tx, events: &[CredentialEvent]| {
        let (at, sealed) = (at.clone(), sealed.clone());
        async move {
            for event in events {
                if let CredentialEvent::CredentialCreated {
                    provider,
                    label,
                    base_url,
                    secret_last4,
                } = event
                {
                    super::put(tx, &at, &sealed).await.map_err(db)?;
                    tx.execute(
                        "INSERT INTO ai_credentials \
                           (org_id, id, provider, label, base_url, secret_last4) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                        &[
                            &org_id,
                            &id,
                            &provider.name(),
                            &label.as_str(),
                            base_url,
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
    Ok(executor
        .execute_with::<Credential>(
            org_id,
            &id.to_string(),
            CredentialCommand::Create {
                provider,
                label,
                base_url,
                secret_last4: last4,
            },
            meta,
            Some(0),
            &write,
        )
        .await?)
}

/// Replaces the secret of credential `id` (`CredentialRotated`), in one transaction.
pub async fn rotate(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    secret: &SecretString,
    meta: &EventMetadata,
) -> Result<CommandOutcome, CredentialAdminError> {
    let at = secret_ref(org_id, id);
    let sealed = super::seal(executor.crypto(), &at, secret)?;
    let last4 = sealed.last4.clone();
    let write = effect(move |tx, events: &[CredentialEvent]| {
        let (at, sealed) = (at.clone(), sealed.clone());
        async move {
            for event in events {
                if let CredentialEvent::CredentialRotated { secret_last4 } = event {
                    super::put(tx, &at, &sealed).await.map_err(db)?;
                    tx.execute(
                        "UPDATE ai_credentials SET secret_last4 = $3, rotated_at = now() \
                         WHERE org_id = $1 AND id = $2",
                        &[&org_id, &id, secret_last4],
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
        .execute_with::<Credential>(
            org_id,
            &id.to_string(),
            CredentialCommand::Rotate {
                secret_last4: last4,
            },
            meta,
            None,
            &write,
        )
        .await?)
}

/// Deletes credential `id` (`CredentialDeleted`): its row and its sealed secret go in
/// the same transaction.
pub async fn delete(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    meta: &EventMetadata,
) -> Result<CommandOutcome, CredentialAdminError> {
    let at = secret_ref(org_id, id);
    let write = effect(move |tx, events: &[CredentialEvent]| {
        let at = at.clone();
        async move {
            if events
                .iter()
                .any(|e| matches!(e, CredentialEvent::CredentialDeleted))
            {
                super::delete(tx, &at).await.map_err(db)?;
                tx.execute(
                    "DELETE FROM ai_credentials WHERE org_id = $1 AND id = $2",
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
        .execute_with::<Credential>(
            org_id,
            &id.to_string(),
            CredentialCommand::Delete,
            meta,
            None,
            &write,
        )
        .await?)
}

/// A credential as listed: never its secret, only the secret's last four.
#[derive(Debug, Clone)]
pub struct CredentialRow {
    pub id: Uuid,
    pub provider: Provider,
    pub label: String,
    pub base_url: String,
    pub secret_last4: Option<String>,
    pub created_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, provider, label, base_url, secret_last4, created_at, rotated_at";

fn row_of(r: &tokio_postgres::Row) -> Result<CredentialRow, CredentialAdminError> {
    let provider: String = r.get(1);
    Ok(CredentialRow {
        id: r.get(0),
        provider: Provider::parse(&provider).ok_or(CredentialAdminError::Corrupt(provider))?,
        label: r.get(2),
        base_url: r.get(3),
        secret_last4: r.get(4),
        created_at: r.get(5),
        rotated_at: r.get(6),
    })
}

/// The organisation's credentials, oldest first.
pub async fn list(pool: &Pool, org_id: Uuid) -> Result<Vec<CredentialRow>, CredentialAdminError> {
    let mut client = pool.get().await?;
    let tx = crate::read_models::org_scope(&mut client, org_id).await?;
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM ai_credentials WHERE org_id = $1 ORDER BY created_at, id"
            ),
            &[&org_id],
        )
        .await?;
    tx.commit().await?;
    rows.iter().map(row_of).collect()
}

/// Credential `id` of the organisation (none: unknown, deleted, or another's).
pub async fn get(
    pool: &Pool,
    org_id: Uuid,
    id: Uuid,
) -> Result<Option<CredentialRow>, CredentialAdminError> {
    let mut client = pool.get().await?;
    let tx = crate::read_models::org_scope(&mut client, org_id).await?;
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM ai_credentials WHERE org_id = $1 AND id = $2"),
            &[&org_id, &id],
        )
        .await?;
    tx.commit().await?;
    row.as_ref().map(row_of).transpose()
}

/// The secret of credential `id`, decrypted for `purpose` once `CredentialDecrypted`
/// (with `meta`'s principal) is committed. Unknown or deleted: the domain's
/// `NotFound`, and nothing decrypted.
pub async fn decrypt(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    purpose: &str,
    meta: &EventMetadata,
) -> Result<SecretString, CredentialAdminError> {
    let (_, secret) = super::decrypt_recorded::<Credential>(
        executor,
        &secret_ref(org_id, id),
        &id.to_string(),
        CredentialCommand::RecordDecrypt {
            purpose: purpose.to_owned(),
        },
        meta,
        None,
    )
    .await?;
    Ok(secret)
}

/// What the provider answered to `GET {base_url}/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// A 2xx answer.
    pub ok: bool,
    /// The HTTP status, if an answer came.
    pub status: Option<u16>,
    /// Why no answer came: `timeout`, `unreachable` or `request_failed`.
    pub error: Option<&'static str>,
}

/// How long [`verify`] waits for the provider.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// One client for every verification: no redirects (the key must not follow one to
/// another host), bounded in time.
fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(VERIFY_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// Decrypts credential `id` (purpose `verify`, on record first) and asks the provider
/// with it: `GET {base_url}/models`, the key as `Authorization: Bearer …` (and, for the
/// providers that read it elsewhere, as `x-api-key` (anthropic) or `api-key`
/// (azure_openai)). The answer's body is not read; the key is never logged.
pub async fn verify(
    executor: &Executor,
    org_id: Uuid,
    id: Uuid,
    meta: &EventMetadata,
) -> Result<Option<Verification>, CredentialAdminError> {
    let Some(row) = get(executor.pool(), org_id, id).await? else {
        return Ok(None);
    };
    let secret = decrypt(executor, org_id, id, "verify", meta).await?;
    let mut request = http()
        .get(format!("{}/models", row.base_url.trim_end_matches('/')))
        .bearer_auth(secret.expose_secret());
    let extra = match row.provider {
        Provider::Anthropic => Some("x-api-key"),
        Provider::AzureOpenai => Some("api-key"),
        Provider::Openai | Provider::Google | Provider::Other => None,
    };
    if let Some(name) = extra {
        if let Ok(mut value) = reqwest::header::HeaderValue::from_str(secret.expose_secret()) {
            value.set_sensitive(true);
            request = request.header(name, value);
        }
    }
    if row.provider == Provider::Anthropic {
        request = request.header("anthropic-version", "2023-06-01");
    }
    Ok(Some(match request.send().await {
        Ok(answer) => Verification {
            ok: answer.status().is_success(),
            status: Some(answer.status().as_u16()),
            error: None,
        },
        Err(e) => Verification {
            ok: false,
            status: None,
            error: Some(if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "unreachable"
            } else {
                "request_failed"
            }),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_visible_ascii_of_8_to_4096() {
        assert_eq!(check_secret("sk-0123456789"), None);
        for bad in [
            "short",
            "sk 0123456789",
            "sk-012345678\n",
            "sk-0123456789é",
            "",
        ] {
            assert!(check_secret(bad).is_some(), "{bad:?}");
        }
        assert!(check_secret(&"x".repeat(4097)).is_some());
    }

    #[test]
    fn base_urls_are_http_without_user_query_or_fragment() {
        assert_eq!(
            parse_base_url(Provider::Openai, None).unwrap(),
            "https://api.openai.com/v1"
        );
        assert!(parse_base_url(Provider::AzureOpenai, None).is_err());
        assert!(parse_base_url(Provider::Other, None).is_err());
        assert_eq!(
            parse_base_url(Provider::Other, Some("http://127.0.0.1:8080/v1/")).unwrap(),
            "http://127.0.0.1:8080/v1"
        );
        for bad in [
            "ftp://h/v1",
            "https://u:p@h/v1",
            "https://h/v1?key=1",
            "https://h/v1#x",
            "not a url",
            "/v1",
        ] {
            assert!(parse_base_url(Provider::Other, Some(bad)).is_err(), "{bad}");
        }
    }
}
