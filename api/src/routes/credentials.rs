//! `/v1/ai/credentials`: the organisation's AI provider credentials ("bring your own
//! key", docs/vault.md). Create one (the key is sealed into the vault and never
//! answered: only its last four characters), list and read them, rotate the key,
//! delete one, and verify one: the key is decrypted (`CredentialDecrypted`, purpose
//! `verify`, the caller as principal, on record before it is opened) and the provider
//! asked for `GET {base_url}/models` with it. Everything is scoped by organisation:
//! another organisation's credential reads as absent (404).

use crm_domain::credential::{CredentialError, CredentialLabel, Provider};
use crm_infra::commands::executor::CommandError;
use crm_infra::vault::ai_credentials::{self, CredentialAdminError, CredentialRow};
use crm_infra::vault::VaultError;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::Authed;
use crate::edge::extract::{Id, Json};
use crate::edge::reply::{Created, NoContent, Ok200};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// Whose API the key is for.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AiCredentialProvider {
    /// Base URL `https://api.openai.com/v1` unless given.
    Openai,
    /// Base URL `https://api.anthropic.com/v1` unless given.
    Anthropic,
    /// The resource's URL is required.
    AzureOpenai,
    /// Base URL `https://generativelanguage.googleapis.com/v1beta/openai` unless given.
    Google,
    /// Any other service with an OpenAI-shaped `GET /models`: the URL is required.
    Other,
}

impl AiCredentialProvider {
    fn domain(self) -> Provider {
        match self {
            Self::Openai => Provider::Openai,
            Self::Anthropic => Provider::Anthropic,
            Self::AzureOpenai => Provider::AzureOpenai,
            Self::Google => Provider::Google,
            Self::Other => Provider::Other,
        }
    }

    fn of(provider: Provider) -> Self {
        match provider {
            Provider::Openai => Self::Openai,
            Provider::Anthropic => Self::Anthropic,
            Provider::AzureOpenai => Self::AzureOpenai,
            Provider::Google => Self::Google,
            Provider::Other => Self::Other,
        }
    }
}

/// `POST /v1/ai/credentials`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"provider": "openai", "label": "Production", "secret": "sk-proj-0123456789abcdef"}))]
pub(crate) struct AiCredentialInput {
    provider: AiCredentialProvider,
    /// What people call it.
    #[schema(min_length = 1, max_length = 100, pattern = "@line")]
    label: String,
    /// The API key: stored sealed, never answered (only its last four characters).
    #[schema(min_length = 8, max_length = 4096, pattern = "^[!-~]+$")]
    secret: String,
    /// The API's base URL (`GET {base_url}/models` verifies the key); required for
    /// `azure_openai` and `other`, the provider's own by default.
    #[schema(max_length = 2048, pattern = "@line")]
    base_url: Option<String>,
}

/// `POST /v1/ai/credentials/{id}/rotate`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"secret": "sk-proj-fedcba9876543210"}))]
pub(crate) struct AiCredentialRotateInput {
    /// The new API key: replaces the old one, which is gone.
    #[schema(min_length = 8, max_length = 4096, pattern = "^[!-~]+$")]
    secret: String,
}

/// A credential (never its key).
#[derive(Serialize, ToSchema)]
pub(crate) struct AiCredentialDoc {
    id: Uuid,
    provider: AiCredentialProvider,
    label: String,
    base_url: String,
    /// The key's last four characters (null for a key shorter than eight).
    secret_last4: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    /// When the key was last replaced.
    rotated_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<CredentialRow> for AiCredentialDoc {
    fn from(r: CredentialRow) -> Self {
        Self {
            id: r.id,
            provider: AiCredentialProvider::of(r.provider),
            label: r.label,
            base_url: r.base_url,
            secret_last4: r.secret_last4,
            created_at: r.created_at,
            rotated_at: r.rotated_at,
        }
    }
}

/// The organisation's credentials, oldest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct AiCredentialList {
    items: Vec<AiCredentialDoc>,
}

/// What the provider answered to `GET {base_url}/models` with the key.
#[derive(Serialize, ToSchema)]
pub(crate) struct AiCredentialVerification {
    /// The provider answered 2xx.
    ok: bool,
    /// The provider's HTTP status (null: no answer).
    status: Option<u16>,
    /// Why no answer came: `timeout`, `unreachable` or `request_failed`.
    error: Option<String>,
}

const NOT_FOUND: &str = "no such credential";

/// A credential command's failure as an answer. (Kept beside the handlers: the
/// domain's credential errors are answered only here.)
fn answer(e: CredentialAdminError) -> ApiError {
    match e {
        CredentialAdminError::Command(CommandError::Domain(CredentialError::NotFound)) => {
            ApiError::NotFound(NOT_FOUND)
        }
        CredentialAdminError::Command(CommandError::Domain(
            e @ (CredentialError::AlreadyExists | CredentialError::BadPurpose),
        )) => ApiError::internal(e),
        CredentialAdminError::Command(
            CommandError::Conflict | CommandError::VersionMismatch { .. },
        ) => ApiError::Conflict(
            "another command changed this credential first; reload and retry".into(),
        ),
        CredentialAdminError::Command(CommandError::Store(e)) => e.into(),
        CredentialAdminError::Db(e) => e.into(),
        CredentialAdminError::Pool(e) => e.into(),
        // On record, but the stored key does not open at this row: say so (it never
        // decrypts to anything), and how to mend it.
        CredentialAdminError::Vault(
            e @ (VaultError::Unbound(_) | VaultError::OtherKek { .. } | VaultError::NotText(_)),
        ) => ApiError::Unreadable(format!("{e}; rotate the credential to store its key again")),
        other @ (CredentialAdminError::Vault(_) | CredentialAdminError::Corrupt(_)) => {
            ApiError::internal(other)
        }
    }
}

fn secret_of(secret: String, errors: &mut Vec<FieldError>) -> Option<SecretString> {
    match ai_credentials::check_secret(&secret) {
        None => Some(SecretString::from(secret)),
        Some(message) => {
            errors.push(FieldError::new("secret", message));
            None
        }
    }
}

/// Stores a new credential; answers it with the key's last four characters only.
pub(crate) async fn create(
    s: AppState,
    a: Authed,
    Json(input): Json<AiCredentialInput>,
) -> Result<Created<AiCredentialDoc>, ApiError> {
    let mut errors = Vec::new();
    let provider = input.provider.domain();
    let label = CredentialLabel::parse(&input.label)
        .map_err(|m| errors.push(FieldError::new("label", m)))
        .ok();
    let base_url = ai_credentials::parse_base_url(provider, input.base_url.as_deref())
        .map_err(|m| errors.push(FieldError::new("base_url", m)))
        .ok();
    let secret = secret_of(input.secret, &mut errors);
    let (Some(label), Some(base_url), Some(secret), true) =
        (label, base_url, secret, errors.is_empty())
    else {
        return Err(ApiError::Validation(errors));
    };
    let org = a.caller.org_id;
    let id = Uuid::now_v7();
    ai_credentials::create(
        &s.executor,
        org,
        id,
        provider,
        label,
        base_url,
        &secret,
        &a.metadata(),
    )
    .await
    .map_err(answer)?;
    let row = ai_credentials::get(&s.pool, org, id)
        .await
        .map_err(answer)?
        .ok_or_else(|| ApiError::internal("a credential just created is not found"))?;
    Ok(Created {
        location: format!("/v1/ai/credentials/{id}"),
        body: row.into(),
    })
}

/// The organisation's credentials.
pub(crate) async fn list(s: AppState, a: Authed) -> Result<Ok200<AiCredentialList>, ApiError> {
    let items = ai_credentials::list(&s.pool, a.caller.org_id)
        .await
        .map_err(answer)?
        .into_iter()
        .map(AiCredentialDoc::from)
        .collect();
    Ok(Ok200(AiCredentialList { items }))
}

/// One credential.
pub(crate) async fn get_one(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<AiCredentialDoc>, ApiError> {
    let row = ai_credentials::get(&s.pool, a.caller.org_id, id)
        .await
        .map_err(answer)?
        .ok_or(ApiError::NotFound(NOT_FOUND))?;
    Ok(Ok200(row.into()))
}

/// Replaces a credential's key.
pub(crate) async fn rotate(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<AiCredentialRotateInput>,
) -> Result<Ok200<AiCredentialDoc>, ApiError> {
    let mut errors = Vec::new();
    let Some(secret) = secret_of(input.secret, &mut errors) else {
        return Err(ApiError::Validation(errors));
    };
    let org = a.caller.org_id;
    ai_credentials::rotate(&s.executor, org, id, &secret, &a.metadata())
        .await
        .map_err(answer)?;
    get_one(s, a, Id(id)).await
}

/// Deletes a credential and its key.
pub(crate) async fn delete(s: AppState, a: Authed, Id(id): Id) -> Result<NoContent, ApiError> {
    ai_credentials::delete(&s.executor, a.caller.org_id, id, &a.metadata())
        .await
        .map_err(answer)?;
    Ok(NoContent)
}

/// Decrypts the key (on record: `CredentialDecrypted`, purpose `verify`) and asks the
/// provider whether it takes it.
pub(crate) async fn verify(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<AiCredentialVerification>, ApiError> {
    let v = ai_credentials::verify(&s.executor, a.caller.org_id, id, &a.metadata())
        .await
        .map_err(answer)?
        .ok_or(ApiError::NotFound(NOT_FOUND))?;
    Ok(Ok200(AiCredentialVerification {
        ok: v.ok,
        status: v.status,
        error: v.error.map(str::to_owned),
    }))
}
