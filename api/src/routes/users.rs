//! Staff users (`/v1/users`) and the caller's own account (`/v1/me`, logout, password).
//! Every change is a command on the user's stream; the actor is in the event metadata.

use crm_domain::access::{Permission, Policy, RoleRef};
use crm_domain::user::{Grant, UserCommand, UserError};
use crm_domain::values::{Email, Name};
use crm_infra::access::accounts::{self, NewUser};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

use super::{allowed, body, require_json, staff, with_state, Authed};
use crate::auth::{check_password_policy, hash_password, verify_password};
use crate::error::{finish, json_response, parse_json, ApiError, FieldError};
use crate::state::AppState;

const BODY_LIMIT: u64 = 16 * 1024;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewUserInput {
    email: String,
    display_name: String,
    role: String,
    /// Absent: the user is invited by mail (a single-use link, 72 h) to set one.
    password: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleChange {
    role: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordInput {
    current_password: String,
    new_password: String,
}

fn parse_user_id(raw: &str) -> Result<Uuid, ApiError> {
    super::parse_uuid(raw, "user")
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

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let list = warp::path!("v1" / "users")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::UsersRead))
        .and_then(|s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(list(s, a).await, &rid)
        });
    let get_one = warp::path!("v1" / "users" / String)
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::UsersRead))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(get_one(s, a, id).await, &rid)
        });
    let create = warp::path!("v1" / "users")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::UsersManage))
        .and(body(BODY_LIMIT))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(create(s, a, ct, b).await, &rid)
            },
        );
    let change_role = warp::path!("v1" / "users" / String / "role")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::UsersManage))
        .and(body(BODY_LIMIT))
        .and_then(
            |id: String, s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(change_role(s, a, id, ct, b).await, &rid)
            },
        );
    let deactivate = warp::path!("v1" / "users" / String / "deactivate")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::UsersManage))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            let by = a.access.grantor();
            finish(
                simple(s, a, id, |holds| UserCommand::Deactivate { by, holds }).await,
                &rid,
            )
        });
    let reset_two_factor = warp::path!("v1" / "users" / String / "two-factor" / "reset")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::UsersManage))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(reset_two_factor(s, a, id).await, &rid)
        });
    let reactivate = warp::path!("v1" / "users" / String / "reactivate")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(allowed(state.clone(), Permission::UsersManage))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            let by = a.access.grantor();
            finish(
                simple(s, a, id, |holds| UserCommand::Reactivate { by, holds }).await,
                &rid,
            )
        });
    let me = warp::path!("v1" / "me")
        .and(warp::get())
        .and(staff(state.clone()))
        .map(|a: Authed| me(&a));
    let logout = warp::path!("v1" / "auth" / "logout")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(staff(state.clone()))
        .and_then(|s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(logout(s, a).await, &rid)
        });
    let password = warp::path!("v1" / "auth" / "password")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(staff(state.clone()))
        .and(body(BODY_LIMIT))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(change_password(s, a, ct, b).await, &rid)
            },
        );
    let two_factor = two_factor_routes(state.clone());
    list.or(get_one)
        .unify()
        .or(two_factor)
        .unify()
        .or(create)
        .unify()
        .or(change_role)
        .unify()
        .or(deactivate)
        .unify()
        .or(reactivate)
        .unify()
        .or(reset_two_factor)
        .unify()
        .or(me)
        .unify()
        .or(logout)
        .unify()
        .or(password)
        .unify()
        .boxed()
}

fn user_json(u: &accounts::UserRow) -> Value {
    json!({ "id": u.user_id, "email": u.email, "role": u.role, "active": u.active })
}

async fn list(s: AppState, a: Authed) -> Result<Response, ApiError> {
    let client = s.pool.get().await?;
    let users = accounts::list_users(&client, a.caller.org_id).await?;
    let items: Vec<Value> = users.iter().map(user_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "items": items }),
        &a.ctx.request_id,
    ))
}

async fn get_one(s: AppState, a: Authed, id: String) -> Result<Response, ApiError> {
    let id = parse_user_id(&id)?;
    let client = s.pool.get().await?;
    let user = accounts::get_user(&client, a.caller.org_id, id)
        .await?
        .ok_or(ApiError::NotFound("user not found"))?;
    Ok(json_response(
        StatusCode::OK,
        &user_json(&user),
        &a.ctx.request_id,
    ))
}

async fn create(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let input: NewUserInput = parse_json(&body)?;
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
    let mut resp = json_response(
        StatusCode::CREATED,
        &json!({ "id": user_id, "invited": invited }),
        &a.ctx.request_id,
    );
    if let Ok(v) = format!("/v1/users/{user_id}").parse() {
        resp.headers_mut().insert("location", v);
    }
    Ok(resp)
}

async fn change_role(
    s: AppState,
    a: Authed,
    id: String,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let id = parse_user_id(&id)?;
    require_json(ct.as_deref())?;
    let input: RoleChange = parse_json(&body)?;
    let role = parse_role(&input.role)?;
    let grant = grant_of(&s, &a, role).await?;
    let by = a.access.grantor();
    simple(s, a, id.to_string(), |holds| UserCommand::ChangeRole {
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
    id: String,
    command: impl FnOnce(Policy) -> UserCommand,
) -> Result<Response, ApiError> {
    let id = parse_user_id(&id)?;
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
    Ok(super::outcome(&o, &a.ctx.request_id))
}

/// Removes another user's 2FA (their authenticator is lost and no backup code is
/// left). One's own goes through `/v1/auth/2fa/disable`, which asks for a code: an
/// administrator's session alone must not strip the administrator's second factor.
async fn reset_two_factor(s: AppState, a: Authed, id: String) -> Result<Response, ApiError> {
    let target = parse_user_id(&id)?;
    if target == a.caller.user_id {
        return Err(ApiError::Forbidden {
            code: "own_two_factor",
            message: "turn your own two-factor authentication off with POST /v1/auth/2fa/disable"
                .into(),
        });
    }
    let by = a.access.grantor();
    simple(s, a, id, |holds| UserCommand::ResetTwoFactor { by, holds }).await
}

fn me(a: &Authed) -> Response {
    let policy = &a.access.policy;
    json_response(
        StatusCode::OK,
        &json!({
            "principal": { "kind": a.kind, "id": a.caller.user_id },
            "user_id": a.caller.user_id,
            "org_id": a.caller.org_id,
            "role": a.access.role,
            "permissions": policy.permissions,
            "fields": policy.fields,
            "modules": a.access.modules,
        }),
        &a.ctx.request_id,
    )
}

async fn logout(s: AppState, a: Authed) -> Result<Response, ApiError> {
    a.require_user()?;
    accounts::user_command(
        &s.executor,
        a.caller.org_id,
        a.caller.user_id,
        UserCommand::SignOut,
        &a.metadata(),
    )
    .await?;
    let mut resp = warp::Reply::into_response(warp::reply::with_status(
        warp::reply(),
        StatusCode::NO_CONTENT,
    ));
    if let Ok(v) = a.ctx.request_id.parse() {
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
}

async fn change_password(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    a.require_user()?;
    require_json(ct.as_deref())?;
    let input: PasswordInput = parse_json(&body)?;
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
    super::staff_token(
        &s,
        a.caller.user_id,
        a.caller.org_id,
        generation,
        json!({}),
        &a.ctx.request_id,
    )
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeInput {
    code: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DisableTwoFactorInput {
    /// The account's password.
    password: String,
    /// A current TOTP code or an unused backup code.
    code: String,
}

fn two_factor_routes(state: AppState) -> BoxedFilter<(Response,)> {
    let setup = warp::path!("v1" / "auth" / "2fa" / "setup")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(staff(state.clone()))
        .and_then(|s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(two_factor_setup(s, a).await, &rid)
        });
    let enable = warp::path!("v1" / "auth" / "2fa" / "enable")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(staff(state.clone()))
        .and(body(BODY_LIMIT))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(two_factor_enable(s, a, ct, b).await, &rid)
            },
        );
    let disable = warp::path!("v1" / "auth" / "2fa" / "disable")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(staff(state))
        .and(body(BODY_LIMIT))
        .and_then(
            |s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(two_factor_disable(s, a, ct, b).await, &rid)
            },
        );
    setup.or(enable).unify().or(disable).unify().boxed()
}

/// A new seed, stored sealed and not yet on: the user adds it to an authenticator app
/// and proves it with a code (`enable`). Setting up again replaces a pending seed.
async fn two_factor_setup(s: AppState, a: Authed) -> Result<Response, ApiError> {
    a.require_user()?;
    let secret = crate::totp::new_secret();
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
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "secret": crate::totp::base32(&secret),
            "otpauth_url": crate::totp::otpauth_url(&secret, &a.caller.user_id.to_string()),
            "digits": crate::totp::DIGITS,
            "period": crate::totp::STEP_SECS,
        }),
        &a.ctx.request_id,
    ))
}

/// Turns 2FA on once a code of the pending seed is proven; answers with the backup
/// codes (shown once) and a new token (earlier ones end).
async fn two_factor_enable(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    a.require_user()?;
    require_json(ct.as_deref())?;
    let input: CodeInput = parse_json(&body)?;
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
    let step = crate::totp::matching_step(&secret, &input.code, now).ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new(
            "code",
            "is not the current code of the new seed",
        )])
    })?;
    let (codes, digests) = crate::totp::new_backup_codes();
    let generation = accounts::enable_two_factor(
        &s.executor,
        a.caller.org_id,
        a.caller.user_id,
        step as i64,
        digests,
        &a.metadata(),
    )
    .await?;
    super::staff_token(
        &s,
        a.caller.user_id,
        a.caller.org_id,
        generation,
        json!({
            "backup_codes": codes,
            "note": "each backup code works once; they are shown this once",
        }),
        &a.ctx.request_id,
    )
}

/// Turns the caller's own 2FA off: the password and a code (TOTP or backup) prove it
/// is the account's owner with the second factor in hand, not only a session. Failed
/// attempts count against the account like failed logins. Refused where the
/// organisation requires 2FA of the caller's role. Every other session ends; the
/// answer carries a new token.
async fn two_factor_disable(
    s: AppState,
    a: Authed,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    a.require_user()?;
    require_json(ct.as_deref())?;
    let input: DisableTwoFactorInput = parse_json(&body)?;
    if input.password.len() > crate::auth::MAX_PASSWORD_BYTES {
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
    super::staff_token(
        &s,
        a.caller.user_id,
        a.caller.org_id,
        generation,
        json!({}),
        &a.ctx.request_id,
    )
}
