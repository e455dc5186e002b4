//! Staff users (`/v1/users`) and the caller's own account (`/v1/me`, logout, password).
//! Every change is a command on the user's stream; the actor is in the event metadata.

use crm_domain::access::{Policy, RoleRef};
use crm_domain::user::{Grant, UserCommand, UserError};
use crm_domain::values::{Email, Name};
use crm_infra::access::accounts::{self, NewUser};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::schemas::{Outcome, RoleName, Token};
use super::Authed;
use crate::auth::{check_password_policy, hash_password, verify_password};
use crate::edge::extract::{Id, Json};
use crate::edge::reply::{Created, NoContent, Ok200};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

/// A staff user.
#[derive(Serialize, ToSchema)]
pub(crate) struct User {
    id: Uuid,
    email: String,
    /// A built-in role's name or a custom role's id.
    role: String,
    active: bool,
}

/// Staff users.
#[derive(Serialize, ToSchema)]
pub(crate) struct UserList {
    items: Vec<User>,
}

/// A created user.
#[derive(Serialize, ToSchema)]
pub(crate) struct CreatedUser {
    id: Uuid,
    /// Whether an invitation to set a password was mailed (no password was given).
    invited: bool,
}

/// Who the caller is and what they may do.
#[derive(Serialize, ToSchema)]
pub(crate) struct Me {
    principal: MePrincipal,
    user_id: Uuid,
    org_id: Uuid,
    role: String,
    /// Permissions as `module.action`.
    permissions: Vec<String>,
    /// Per contact field: `read` or `write` (absent: hidden).
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    fields: serde_json::Value,
    /// Active modules.
    modules: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct MePrincipal {
    /// `user` or `api_key`.
    kind: String,
    id: Uuid,
}

/// A new TOTP seed, to add to an authenticator app.
#[derive(Serialize, ToSchema)]
pub(crate) struct TotpSetup {
    /// Base32.
    secret: String,
    otpauth_url: String,
    digits: u32,
    period: u64,
}

/// 2FA is on: the backup codes (shown once) and a new token.
#[derive(Serialize, ToSchema)]
pub(crate) struct TwoFactorEnabled {
    access_token: String,
    token_type: String,
    expires_in: u64,
    backup_codes: Vec<String>,
    note: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "sam@example.com", "display_name": "Sam Jones", "role": "team"}))]
pub(crate) struct NewUserInput {
    #[schema(max_length = 254, pattern = "@email")]
    email: String,
    #[schema(max_length = 200, pattern = "@line")]
    display_name: String,
    /// A built-in role or a custom role's id.
    #[schema(value_type = RoleName)]
    role: String,
    /// Absent: the user is invited by mail (a single-use link, 72 h) to set one.
    #[schema(value_type = Option<String>, min_length = 12, max_length = 1024)]
    password: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleChange {
    #[schema(value_type = RoleName)]
    role: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordInput {
    #[schema(max_length = 1024, pattern = "@no_nul")]
    current_password: String,
    #[schema(min_length = 12, max_length = 1024, pattern = "@no_nul")]
    new_password: String,
}

/// The role a role change names, checked without reading anything.
pub(crate) fn check_role_change(input: &RoleChange) -> Result<(), ApiError> {
    parse_role(&input.role).map(|_| ())
}

fn parse_role(raw: &str) -> Result<RoleRef, ApiError> {
    RoleRef::parse(raw).ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new(
            "role",
            "must be a built-in role (owner, admin, board, executive, director, team, support, partner, viewer, client) or a custom role's id",
        )])
    })
}

/// The grant of `role` in the caller's organisation (422 if no such live role).
pub(crate) async fn grant_of(s: &AppState, a: &Authed, role: RoleRef) -> Result<Grant, ApiError> {
    let client = s.pool.get().await?;
    let policy = accounts::policy_of(&client, a.caller.org_id, role)
        .await?
        .ok_or_else(|| {
            ApiError::Validation(vec![FieldError::new(
                "role",
                "no such role in this organisation, or it is retired",
            )])
        })?;
    Ok(Grant { role, policy })
}

fn user_json(u: &accounts::UserRow) -> User {
    User {
        id: u.user_id,
        email: u.email.clone(),
        role: u.role.clone(),
        active: u.active,
    }
}

pub(crate) async fn list(s: AppState, a: Authed) -> Result<Ok200<UserList>, ApiError> {
    let client = s.pool.get().await?;
    let users = accounts::list_users(&client, a.caller.org_id).await?;
    let items = users.iter().map(user_json).collect();
    Ok(Ok200(UserList { items }))
}

pub(crate) async fn get_one(s: AppState, a: Authed, Id(id): Id) -> Result<Ok200<User>, ApiError> {
    let client = s.pool.get().await?;
    let user = accounts::get_user(&client, a.caller.org_id, id)
        .await?
        .ok_or(ApiError::NotFound("user not found"))?;
    Ok(Ok200(user_json(&user)))
}

pub(crate) async fn create(
    s: AppState,
    a: Authed,
    Json(input): Json<NewUserInput>,
) -> Result<Created<CreatedUser>, ApiError> {
    let mut errors = Vec::new();
    let email = Email::parse(&input.email)
        .map_err(|e| errors.push(FieldError::new("email", e.0)))
        .ok();
    let name = Name::parse(&input.display_name)
        .map_err(|e| errors.push(FieldError::new("display_name", e.0)))
        .ok();
    let role = parse_role(&input.role)
        .map_err(|_| errors.push(FieldError::new("role", "unknown role")))
        .ok();
    if let Some(Err(e)) = input.password.as_deref().map(check_password_policy) {
        errors.push(FieldError::new("password", e));
    }
    let (Some(email), Some(display_name), Some(role), true) =
        (email, name, role, errors.is_empty())
    else {
        return Err(ApiError::Validation(errors));
    };
    // Checked here for a clear 422; the aggregate checks the grant itself.
    grant_of(&s, &a, role).await?;
    let invited = input.password.is_none();
    // An invited user has no password yet: a random one nobody knows stands in.
    let password = input.password.unwrap_or_else(|| {
        use rand::distributions::{Alphanumeric, DistString};
        Alphanumeric.sample_string(&mut rand::rngs::OsRng, 40)
    });
    let invite_to = email.as_str().to_owned();
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let user_id = accounts::create_user(
        &s.executor,
        &s.pool,
        NewUser {
            org_id: a.caller.org_id,
            email,
            display_name,
            role,
            password_hash,
        },
        a.access.grantor(),
        &a.metadata(),
    )
    .await?;
    if invited {
        super::portal::send_link(
            &s,
            crm_infra::access::auth_tokens::Purpose::StaffInvite,
            a.caller.org_id,
            user_id,
            invite_to,
        );
    }
    Ok(Created {
        body: CreatedUser {
            id: user_id,
            invited,
        },
        location: format!("/v1/users/{user_id}"),
    })
}

pub(crate) async fn change_role(
    s: AppState,
    a: Authed,
    Id(id): Id,
    Json(input): Json<RoleChange>,
) -> Result<Ok200<Outcome>, ApiError> {
    let role = parse_role(&input.role)?;
    let grant = grant_of(&s, &a, role).await?;
    let by = a.access.grantor();
    simple(s, a, id, |holds| UserCommand::ChangeRole {
        grant,
        by,
        holds,
    })
    .await
}

/// A command on another user of the caller's organisation, given what that user's
/// current role allows (nobody changes a user who holds more than they do).
async fn simple(
    s: AppState,
    a: Authed,
    id: Uuid,
    command: impl FnOnce(Policy) -> UserCommand,
) -> Result<Ok200<Outcome>, ApiError> {
    let holds = {
        let client = s.pool.get().await?;
        let user = accounts::get_user(&client, a.caller.org_id, id)
            .await?
            .ok_or(ApiError::NotFound("user not found"))?;
        // A role cannot be retired while held; were it gone, it would allow nothing.
        match RoleRef::parse(&user.role) {
            Some(role) => accounts::policy_of(&client, a.caller.org_id, role)
                .await?
                .unwrap_or_default(),
            None => Policy::default(),
        }
    };
    let o = accounts::user_command(
        &s.executor,
        a.caller.org_id,
        id,
        command(holds),
        &a.metadata(),
    )
    .await?;
    Ok(super::outcome(&o))
}

pub(crate) async fn deactivate(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
    let by = a.access.grantor();
    simple(s, a, id, |holds| UserCommand::Deactivate { by, holds }).await
}

pub(crate) async fn reactivate(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
    let by = a.access.grantor();
    simple(s, a, id, |holds| UserCommand::Reactivate { by, holds }).await
}

/// Removes another user's 2FA (their authenticator is lost and no backup code is
/// left). One's own goes through `/v1/auth/2fa/disable`, which asks for a code: an
/// administrator's session alone must not strip the administrator's second factor.
pub(crate) async fn reset_two_factor(
    s: AppState,
    a: Authed,
    Id(id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
    if id == a.caller.user_id {
        return Err(ApiError::Forbidden {
            code: "own_two_factor",
            message: "turn your own two-factor authentication off with POST /v1/auth/2fa/disable"
                .into(),
        });
    }
    let by = a.access.grantor();
    simple(s, a, id, |holds| UserCommand::ResetTwoFactor { by, holds }).await
}

fn names<T: Serialize>(v: &T) -> Vec<String> {
    serde_json::from_value(serde_json::to_value(v).unwrap_or_default()).unwrap_or_default()
}

pub(crate) async fn me(_s: AppState, a: Authed) -> Result<Ok200<Me>, ApiError> {
    let policy = &a.access.policy;
    Ok(Ok200(Me {
        principal: MePrincipal {
            kind: serde_json::to_value(a.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            id: a.caller.user_id,
        },
        user_id: a.caller.user_id,
        org_id: a.caller.org_id,
        role: a.access.role.to_string(),
        permissions: names(&policy.permissions),
        fields: serde_json::to_value(&policy.fields).unwrap_or_default(),
        modules: names(&a.access.modules),
    }))
}

pub(crate) async fn logout(s: AppState, a: Authed) -> Result<NoContent, ApiError> {
    a.require_user()?;
    accounts::user_command(
        &s.executor,
        a.caller.org_id,
        a.caller.user_id,
        UserCommand::SignOut,
        &a.metadata(),
    )
    .await?;
    Ok(NoContent)
}

pub(crate) async fn change_password(
    s: AppState,
    a: Authed,
    Json(input): Json<PasswordInput>,
) -> Result<Ok200<Token>, ApiError> {
    a.require_user()?;
    if let Err(e) = check_password_policy(&input.new_password) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "new_password",
            e,
        )]));
    }
    let client = s.pool.get().await?;
    let credential = accounts::credential_of(&client, a.caller.user_id)
        .await?
        .ok_or(ApiError::Unauthorized("the token is invalid or expired"))?;
    drop(client);
    let (current, new) = (input.current_password, input.new_password);
    let hash = credential.password_hash;
    let new_hash = tokio::task::spawn_blocking(move || {
        verify_password(&current, &hash).then(|| hash_password(&new))
    })
    .await
    .map_err(ApiError::internal)?
    .ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new(
            "current_password",
            "is not the account's password",
        )])
    })?
    .map_err(ApiError::internal)?;
    let generation = accounts::change_password(
        &s.executor,
        a.caller.org_id,
        a.caller.user_id,
        new_hash,
        &a.metadata(),
    )
    .await?;
    // Every other session ends; this one continues with a new token.
    super::staff_token(&s, a.caller.user_id, a.caller.org_id, generation).map(Ok200)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeInput {
    /// The current code of the new seed.
    #[schema(pattern = "@no_nul")]
    code: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DisableTwoFactorInput {
    /// The account's password.
    #[schema(max_length = 1024, pattern = "@no_nul")]
    password: String,
    /// A current TOTP code or an unused backup code.
    #[schema(pattern = "@no_nul")]
    code: String,
}

/// A new seed, stored sealed and not yet on: the user adds it to an authenticator app
/// and proves it with a code (`enable`). Setting up again replaces a pending seed.
pub(crate) async fn two_factor_setup(s: AppState, a: Authed) -> Result<Ok200<TotpSetup>, ApiError> {
    a.require_user()?;
    let secret = crate::auth::totp::new_secret();
    let client = s.pool.get().await?;
    let stored = accounts::store_pending_totp(
        s.executor.crypto(),
        &client,
        a.caller.org_id,
        a.caller.user_id,
        &secret,
    )
    .await?;
    if !stored {
        return Err(ApiError::Conflict(
            "two-factor authentication is already on".into(),
        ));
    }
    Ok(Ok200(TotpSetup {
        secret: crate::auth::totp::base32(&secret),
        otpauth_url: crate::auth::totp::otpauth_url(&secret, &a.caller.user_id.to_string()),
        digits: crate::auth::totp::DIGITS as u32,
        period: crate::auth::totp::STEP_SECS,
    }))
}

/// Turns 2FA on once a code of the pending seed is proven; answers with the backup
/// codes (shown once) and a new token (earlier ones end).
pub(crate) async fn two_factor_enable(
    s: AppState,
    a: Authed,
    Json(input): Json<CodeInput>,
) -> Result<Ok200<TwoFactorEnabled>, ApiError> {
    a.require_user()?;
    let client = s.pool.get().await?;
    let state = accounts::totp_state(
        s.executor.crypto(),
        &client,
        a.caller.org_id,
        a.caller.user_id,
    )
    .await?
    .ok_or(ApiError::Unauthorized("the token is invalid or expired"))?;
    drop(client);
    if state.enabled {
        return Err(ApiError::Conflict(
            "two-factor authentication is already on".into(),
        ));
    }
    let secret = state.secret.ok_or_else(|| {
        ApiError::bad_request("two_factor_not_set_up", "call /v1/auth/2fa/setup first")
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let step = crate::auth::totp::matching_step(&secret, &input.code, now).ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new(
            "code",
            "is not the current code of the new seed",
        )])
    })?;
    let (codes, digests) = crate::auth::totp::new_backup_codes();
    let generation = accounts::enable_two_factor(
        &s.executor,
        a.caller.org_id,
        a.caller.user_id,
        step as i64,
        digests,
        &a.metadata(),
    )
    .await?;
    let token = super::staff_token(&s, a.caller.user_id, a.caller.org_id, generation)?;
    Ok(Ok200(TwoFactorEnabled {
        access_token: token.access_token,
        token_type: token.token_type,
        expires_in: token.expires_in,
        backup_codes: codes,
        note: "each backup code works once; they are shown this once".into(),
    }))
}

/// Turns the caller's own 2FA off: the password and a code (TOTP or backup) prove it
/// is the account's owner with the second factor in hand, not only a session. Failed
/// attempts count against the account like failed logins. Refused where the
/// organisation requires 2FA of the caller's role. Every other session ends; the
/// answer carries a new token.
pub(crate) async fn two_factor_disable(
    s: AppState,
    a: Authed,
    Json(input): Json<DisableTwoFactorInput>,
) -> Result<Ok200<Token>, ApiError> {
    a.require_user()?;
    if input.password.chars().count() > crate::auth::MAX_PASSWORD_CHARS {
        return Err(ApiError::Validation(vec![FieldError::new(
            "password",
            "is not the account's password",
        )]));
    }
    let client = s.pool.get().await?;
    let credential = accounts::credential_of(&client, a.caller.user_id)
        .await?
        .ok_or(ApiError::Unauthorized("the token is invalid or expired"))?;
    // Refused before the code is checked (and spent); the command checks it again
    // under the organisation's lock.
    if accounts::two_factor_required_of(&client, a.caller.user_id).await? {
        return Err(ApiError::from(
            crm_infra::commands::executor::CommandError::Domain(UserError::TwoFactorRequired),
        ));
    }
    drop(client);
    if !credential.totp_enabled {
        return Err(ApiError::Conflict(
            "two-factor authentication is not on".into(),
        ));
    }
    // Counted with the account's failed logins (same key, same budget, same lockout).
    let failures = s.rate_limits.failed_logins();
    let account = credential.email;
    failures
        .check(&account)
        .map_err(ApiError::too_many_requests)?;
    let (password, hash) = (input.password, credential.password_hash);
    let password_ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(ApiError::internal)?;
    let fail = |field: &'static str, message: &'static str| {
        failures
            .record_failure(&account)
            .map_err(ApiError::too_many_requests)?;
        Err(ApiError::Validation(vec![FieldError::new(field, message)]))
    };
    if !password_ok {
        return fail("password", "is not the account's password");
    }
    if !super::login::second_factor(&s, a.caller.org_id, a.caller.user_id, &input.code).await? {
        return fail("code", "is wrong, expired or already used");
    }
    let generation = accounts::disable_two_factor(
        &s.executor,
        a.caller.org_id,
        a.caller.user_id,
        &a.metadata(),
    )
    .await?;
    super::staff_token(&s, a.caller.user_id, a.caller.org_id, generation).map(Ok200)
}
