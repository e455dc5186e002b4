//! `POST /v1/auth/login`: email and password for a staff JWT.

use serde::Deserialize;
use utoipa::ToSchema;

use super::schemas::Token;
use crate::auth::{dummy_hash, verify_password};
use crate::edge::extract::Json;
use crate::edge::reply::Ok200;
use crate::error::ApiError;
use crate::state::AppState;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "owner@example.com", "password": "correct horse battery staple"}))]
pub(crate) struct LoginRequest {
    #[schema(max_length = 320, pattern = "@no_nul")]
    email: String,
    #[schema(max_length = 1024, pattern = "@no_nul")]
    password: String,
    /// A TOTP code or a backup code, for accounts with two-factor authentication.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "@no_nul")]
    code: Option<String>,
}

const BAD_LOGIN: &str = "invalid email or password";

pub(crate) async fn login(
    state: AppState,
    Json(req): Json<LoginRequest>,
) -> Result<Ok200<Token>, ApiError> {
    if req.password.chars().count() > crate::auth::MAX_PASSWORD_CHARS
        || req.email.chars().count() > 320
    {
        return Err(ApiError::Unauthorized(BAD_LOGIN));
    }
    // An account with too many failed logins is refused before its password is
    // checked (known or unknown alike).
    let failures = state.rate_limits.failed_logins();
    failures
        .check(&req.email)
        .map_err(ApiError::too_many_requests)?;
    let client = state.pool.get().await?;
    let credential = crm_infra::access::accounts::find_credential(&client, &req.email).await?;
    drop(client);
    // Always run bcrypt once, so that unknown and known emails cost the same.
    let hash = credential
        .as_ref()
        .map_or_else(|| dummy_hash().to_owned(), |c| c.password_hash.clone());
    let password = req.password;
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(ApiError::internal)?;
    let known = credential.as_ref().map(|c| (c.org_id, c.user_id));
    let Some(c) = credential.filter(|c| ok && c.active) else {
        failures.record_failure(&req.email).map_err(|wait| {
            locked_out(&state, known, wait);
            ApiError::too_many_requests(wait)
        })?;
        return Err(ApiError::Unauthorized(BAD_LOGIN));
    };
    if c.totp_enabled {
        // Only now, after the right password, does the caller learn that a code is due.
        let Some(code) = req.code.as_deref() else {
            return Err(ApiError::Unauthenticated {
                code: "two_factor_required",
                message: "this account uses two-factor authentication: send `code`",
            });
        };
        if !second_factor(&state, c.org_id, c.user_id, code).await? {
            failures.record_failure(&req.email).map_err(|wait| {
                locked_out(&state, known, wait);
                ApiError::too_many_requests(wait)
            })?;
            return Err(ApiError::Unauthenticated {
                code: "invalid_two_factor_code",
                message: "the two-factor code is wrong, expired or already used",
            });
        }
    }
    super::staff_token(&state, c.user_id, c.org_id, c.token_generation).map(Ok200)
}

/// An existing account was just locked out: `UserLockedOut` goes on the record (a
/// security event), in the background so the answer takes no longer than for an
/// unknown address.
fn locked_out(
    state: &AppState,
    known: Option<(uuid::Uuid, uuid::Uuid)>,
    wait: std::time::Duration,
) {
    let Some((org_id, user_id)) = known else {
        return;
    };
    let executor = state.executor.clone();
    let until = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
    tokio::spawn(async move {
        let meta = crm_domain::metadata::EventMetadata::system(org_id, "login");
        if let Err(e) =
            crm_infra::access::accounts::record_lockout(&executor, org_id, user_id, until, &meta)
                .await
        {
            tracing::warn!(error = %e, "a lockout was not recorded");
        }
    });
}

/// Checks a TOTP code (current or previous step, never twice) or a backup code (once).
pub(crate) async fn second_factor(
    state: &AppState,
    org_id: uuid::Uuid,
    user_id: uuid::Uuid,
    code: &str,
) -> Result<bool, ApiError> {
    let client = state.pool.get().await?;
    let totp =
        crm_infra::access::accounts::totp_state(state.executor.crypto(), &client, org_id, user_id)
            .await?;
    let Some(secret) = totp.and_then(|t| t.secret) else {
        return Ok(false);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Some(step) = crate::auth::totp::matching_step(&secret, code, now) {
        return Ok(
            crm_infra::access::accounts::consume_totp_step(&client, user_id, step as i64).await?,
        );
    }
    let digest = crate::auth::totp::backup_digest(code);
    Ok(crm_infra::access::accounts::consume_backup_code(&client, user_id, &digest).await?)
}
