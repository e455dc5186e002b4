//! The client portal (`/portal/…`): contacts log in (password or magic link) with
//! tokens of type `portal`, which every staff route refuses (and staff tokens are
//! refused here). Every portal query is scoped to the contact's own id. Staff give and
//! take access with `/v1/contacts/{id}/portal-access`. Password resets for staff and
//! contacts live here too: the same single-use mailed tokens.
//!
//! Requests that name an email (login, magic link, reset) answer an unknown address
//! exactly as a known one: same status, same body, and the same work on the request
//! path (one lookup; a bcrypt check against a dummy hash for logins); the mail for a
//! known address is created in the background.

use crm_domain::access::{Module, Permission};
use crm_domain::metadata::{EventMetadata, Principal, PrincipalKind};
use crm_domain::portal::{PortalCommand, PortalError, PortalLogin};
use crm_domain::values::Email;
use crm_infra::access::auth_tokens::{self, Purpose};
use crm_infra::access::portal::{self, PortalCredential};
use crm_infra::commands::executor::CommandError;
use crm_infra::read_models::contacts as contacts_rm;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::{allowed, body, require_json, with_state, Authed};
use crate::auth::{check_password_policy, dummy_hash, hash_password, verify_password};
use crate::context::{request_context, RequestContext};
use crate::error::{finish, json_response, parse_json, ApiError, ApiRejection, FieldError};
use crate::mail::Mail;
use crate::state::AppState;

const BODY_LIMIT: u64 = 16 * 1024;
const BAD_LOGIN: &str = "invalid email or password";
/// The one answer to "send me a link", whether or not the address has an account.
const LINK_SENT: &str = "if the address belongs to an account, a message with a link is on its way";

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalLoginInput {
    org_id: Uuid,
    email: String,
    password: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalEmailInput {
    org_id: Uuid,
    email: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StaffEmailInput {
    email: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenInput {
    token: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetInput {
    token: String,
    new_password: String,
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantInput {
    email: Option<String>,
}

/// A contact signed in to the portal.
#[derive(Debug, Clone)]
pub struct PortalAuthed {
    pub contact_id: Uuid,
    pub org_id: Uuid,
    pub ctx: RequestContext,
}

impl PortalAuthed {
    fn metadata(&self) -> EventMetadata {
        let principal = Principal {
            kind: PrincipalKind::Portal,
            id: self.contact_id.to_string(),
        };
        super::event_metadata(&self.ctx, self.org_id, principal)
    }
}

fn portal_off() -> ApiError {
    ApiError::Forbidden {
        code: "module_inactive",
        message: format!(
            "the `{}` module is not active for this organisation",
            Module::Portal.name()
        ),
    }
}

/// Requires a valid portal token of a contact whose access is live.
fn portal_user(
    state: AppState,
) -> impl Filter<Extract = (PortalAuthed,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(request_context())
        .and_then(move |header: Option<String>, ctx: RequestContext| {
            let state = state.clone();
            async move {
                let reject = |e: ApiError, ctx: RequestContext| {
                    warp::reject::custom(ApiRejection(e, ctx.request_id))
                };
                let invalid = ApiError::Unauthorized("the token is invalid or expired");
                let token = header
                    .as_deref()
                    .and_then(|h| {
                        h.strip_prefix("Bearer ")
                            .or_else(|| h.strip_prefix("bearer "))
                    })
                    .map(str::trim);
                let Some(caller) = token.and_then(|t| state.tokens.verify_portal(t)) else {
                    return Err(reject(invalid, ctx));
                };
                let found = match state.pool.get().await {
                    Ok(client) => portal::by_contact(&client, caller.org_id, caller.user_id)
                        .await
                        .map_err(ApiError::from),
                    Err(e) => Err(e.into()),
                };
                match found {
                    Ok(Some(c)) if c.token_generation == caller.generation => {
                        if !c.portal_on {
                            return Err(reject(portal_off(), ctx));
                        }
                        Ok(PortalAuthed {
                            contact_id: c.contact_id,
                            org_id: c.org_id,
                            ctx,
                        })
                    }
                    Ok(_) => Err(reject(invalid, ctx)),
                    Err(e) => Err(reject(e, ctx)),
                }
            }
        })
}

fn with_ctx_json<F, Fut>(
    state: AppState,
    path: BoxedFilter<()>,
    handler: F,
) -> BoxedFilter<(Response,)>
where
    F: Fn(AppState, RequestContext, Option<String>, bytes::Bytes) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
{
    path.and(warp::post())
        .and(with_state(state))
        .and(request_context())
        .and(body(BODY_LIMIT))
        .and_then(
            move |s: AppState, ctx: RequestContext, ct: Option<String>, b: bytes::Bytes| {
                let handler = handler.clone();
                async move {
                    let rid = ctx.request_id.clone();
                    finish(handler(s, ctx, ct, b).await, &rid)
                }
            },
        )
        .boxed()
}

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let s = state.clone();
    let login = with_ctx_json(
        s.clone(),
        warp::path!("portal" / "auth" / "login").boxed(),
        portal_login,
    );
    let magic = with_ctx_json(
        s.clone(),
        warp::path!("portal" / "auth" / "magic-link").boxed(),
        magic_link,
    );
    let redeem = with_ctx_json(
        s.clone(),
        warp::path!("portal" / "auth" / "magic-link" / "redeem").boxed(),
        redeem_magic_link,
    );
    let portal_reset = with_ctx_json(
        s.clone(),
        warp::path!("portal" / "auth" / "password-reset").boxed(),
        portal_reset_request,
    );
    let portal_confirm = with_ctx_json(
        s.clone(),
        warp::path!("portal" / "auth" / "password-reset" / "confirm").boxed(),
        portal_reset_confirm,
    );
    let staff_reset = with_ctx_json(
        s.clone(),
        warp::path!("v1" / "auth" / "password-reset").boxed(),
        staff_reset_request,
    );
    let staff_confirm = with_ctx_json(
        s.clone(),
        warp::path!("v1" / "auth" / "password-reset" / "confirm").boxed(),
        staff_reset_confirm,
    );
    let me = warp::path!("portal" / "me")
        .and(warp::get())
        .and(with_state(s.clone()))
        .and(portal_user(s.clone()))
        .and_then(|s: AppState, p: PortalAuthed| async move {
            let rid = p.ctx.request_id.clone();
            finish(portal_me(s, p).await, &rid)
        });
    let logout = warp::path!("portal" / "auth" / "logout")
        .and(warp::post())
        .and(with_state(s.clone()))
        .and(portal_user(s.clone()))
        .and_then(|s: AppState, p: PortalAuthed| async move {
            let rid = p.ctx.request_id.clone();
            finish(portal_logout(s, p).await, &rid)
        });
    let grant = warp::path!("v1" / "contacts" / String / "portal-access")
        .and(warp::post())
        .and(with_state(s.clone()))
        .and(allowed(s.clone(), Permission::PortalManage))
        .and(body(BODY_LIMIT))
        .and_then(
            |id: String, s: AppState, a: Authed, ct: Option<String>, b: bytes::Bytes| async move {
                let rid = a.ctx.request_id.clone();
                finish(grant(s, a, id, ct, b).await, &rid)
            },
        );
    let revoke = warp::path!("v1" / "contacts" / String / "portal-access" / "revoke")
        .and(warp::post())
        .and(with_state(s.clone()))
        .and(allowed(s, Permission::PortalManage))
        .and_then(|id: String, s: AppState, a: Authed| async move {
            let rid = a.ctx.request_id.clone();
            finish(revoke(s, a, id).await, &rid)
        });
    login
        .or(magic)
        .unify()
        .or(redeem)
        .unify()
        .or(portal_reset)
        .unify()
        .or(portal_confirm)
        .unify()
        .or(staff_reset)
        .unify()
        .or(staff_confirm)
        .unify()
        .or(me)
        .unify()
        .or(logout)
        .unify()
        .or(grant)
        .unify()
        .or(revoke)
        .unify()
        .boxed()
}

fn token_response(s: &AppState, token: String, rid: &str) -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "access_token": token, "token_type": "Bearer", "expires_in": s.tokens.ttl_secs() }),
        rid,
    )
}

fn link_sent(rid: &str) -> Response {
    json_response(StatusCode::ACCEPTED, &json!({ "message": LINK_SENT }), rid)
}

fn portal_error(e: CommandError<PortalError>) -> ApiError {
    match e {
        CommandError::Domain(PortalError::NoAccess) => {
            ApiError::Unauthorized("the token is invalid or expired")
        }
        CommandError::Domain(d @ PortalError::EmailTaken) => ApiError::Conflict(d.to_string()),
        CommandError::VersionMismatch { .. } | CommandError::Conflict => {
            ApiError::Conflict("another command changed this portal account first; retry".into())
        }
        CommandError::Store(e) => e.into(),
    }
}

async fn portal_login(
    s: AppState,
    ctx: RequestContext,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let req: PortalLoginInput = parse_json(&body)?;
    if req.password.len() > crate::auth::MAX_PASSWORD_BYTES || req.email.len() > 320 {
        return Err(ApiError::Unauthorized(BAD_LOGIN));
    }
    let failures = s.rate_limits.failed_logins();
    let account_key = format!("portal:{}:{}", req.org_id, req.email);
    failures
        .check(&account_key)
        .map_err(ApiError::too_many_requests)?;
    let client = s.pool.get().await?;
    let found = portal::find(&client, req.org_id, &req.email).await?;
    drop(client);
    // Always one bcrypt check: unknown addresses and accounts without a password cost
    // the same as a wrong password.
    let hash = found
        .as_ref()
        .and_then(|c| c.password_hash.clone())
        .unwrap_or_else(|| dummy_hash().to_owned());
    let password = req.password;
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(ApiError::internal)?;
    let Some(c) = found.filter(|c| ok && c.password_hash.is_some()) else {
        failures
            .record_failure(&account_key)
            .map_err(ApiError::too_many_requests)?;
        return Err(ApiError::Unauthorized(BAD_LOGIN));
    };
    if !c.portal_on {
        return Err(portal_off());
    }
    let token = s
        .tokens
        .issue_portal(c.contact_id, c.org_id, c.token_generation)
        .map_err(ApiError::internal)?;
    Ok(token_response(&s, token, &ctx.request_id))
}

/// Creates a token for `subject` and mails a link with it, in the background.
pub(crate) fn send_link(s: &AppState, purpose: Purpose, org_id: Uuid, subject: Uuid, to: String) {
    let (pool, mailer) = (s.pool.clone(), s.mailer.clone());
    let base = s.settings.mail.link_base.clone();
    tokio::spawn(async move {
        let token = match pool.get().await {
            Ok(client) => auth_tokens::create(&client, purpose, org_id, subject).await,
            Err(e) => {
                tracing::error!(error = %e, "no link token: database");
                return;
            }
        };
        let token = match token {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %crm_infra::db::describe(&e), "no link token");
                return;
            }
        };
        let (subject_line, path) = match purpose {
            Purpose::PortalMagicLink => ("Your sign-in link", "/portal/magic-link"),
            Purpose::PortalReset => ("Reset your password", "/portal/reset-password"),
            Purpose::StaffReset => ("Reset your password", "/reset-password"),
            Purpose::StaffInvite => ("You are invited: choose a password", "/reset-password"),
        };
        let hours = purpose.lifetime().as_secs() / 3600;
        mailer.send(Mail {
            to,
            subject: subject_line.into(),
            body: format!(
                "Open this link within {hours} hours; it works once:\n\n{base}{path}#token={token}\n\nIf you did not ask for it, ignore this message."
            ),
        });
    });
}

async fn magic_link(
    s: AppState,
    ctx: RequestContext,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    portal_link(s, ctx, ct, body, Purpose::PortalMagicLink).await
}

async fn portal_reset_request(
    s: AppState,
    ctx: RequestContext,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    portal_link(s, ctx, ct, body, Purpose::PortalReset).await
}

async fn portal_link(
    s: AppState,
    ctx: RequestContext,
    ct: Option<String>,
    body: bytes::Bytes,
    purpose: Purpose,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let req: PortalEmailInput = parse_json(&body)?;
    if req.email.len() <= 320 {
        let client = s.pool.get().await?;
        let found: Option<PortalCredential> = portal::find(&client, req.org_id, &req.email).await?;
        if let Some(c) = found.filter(|c| c.portal_on) {
            send_link(
                &s,
                purpose,
                c.org_id,
                c.contact_id,
                req.email.trim().to_owned(),
            );
        }
    }
    Ok(link_sent(&ctx.request_id))
}

async fn redeem_magic_link(
    s: AppState,
    ctx: RequestContext,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let req: TokenInput = parse_json(&body)?;
    let client = s.pool.get().await?;
    let expired = ApiError::Unauthorized("the link is invalid, expired or already used");
    let Some((org_id, contact_id)) =
        auth_tokens::redeem(&client, &[Purpose::PortalMagicLink], &req.token).await?
    else {
        return Err(expired);
    };
    let c = portal::by_contact(&client, org_id, contact_id)
        .await?
        .ok_or(expired)?;
    if !c.portal_on {
        return Err(portal_off());
    }
    let token = s
        .tokens
        .issue_portal(c.contact_id, c.org_id, c.token_generation)
        .map_err(ApiError::internal)?;
    Ok(token_response(&s, token, &ctx.request_id))
}

async fn new_password_hash(password: String) -> Result<String, ApiError> {
    if let Err(e) = check_password_policy(&password) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "new_password",
            e,
        )]));
    }
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

async fn portal_reset_confirm(
    s: AppState,
    ctx: RequestContext,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let req: ResetInput = parse_json(&body)?;
    // The password is checked first, so a weak one does not use the token up.
    let hash = new_password_hash(req.new_password).await?;
    let client = s.pool.get().await?;
    let Some((org_id, contact_id)) =
        auth_tokens::redeem(&client, &[Purpose::PortalReset], &req.token).await?
    else {
        return Err(ApiError::Unauthorized(
            "the link is invalid, expired or already used",
        ));
    };
    drop(client);
    let meta = PortalAuthed {
        contact_id,
        org_id,
        ctx: ctx.clone(),
    }
    .metadata();
    portal::command(
        &s.executor,
        org_id,
        contact_id,
        PortalCommand::SetPassword,
        Some(hash),
        &meta,
    )
    .await
    .map_err(portal_error)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "message": "the password is set; sign in with it" }),
        &ctx.request_id,
    ))
}

async fn staff_reset_request(
    s: AppState,
    ctx: RequestContext,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let req: StaffEmailInput = parse_json(&body)?;
    if req.email.len() <= 320 {
        let client = s.pool.get().await?;
        let found = crm_infra::access::accounts::find_credential(&client, &req.email).await?;
        if let Some(c) = found.filter(|c| c.active) {
            send_link(
                &s,
                Purpose::StaffReset,
                c.org_id,
                c.user_id,
                req.email.trim().to_owned(),
            );
        }
    }
    Ok(link_sent(&ctx.request_id))
}

/// Sets a new password from a reset link. It does not sign in: the next login still
/// needs the second factor if the account has one.
async fn staff_reset_confirm(
    s: AppState,
    ctx: RequestContext,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    require_json(ct.as_deref())?;
    let req: ResetInput = parse_json(&body)?;
    let hash = new_password_hash(req.new_password).await?;
    let client = s.pool.get().await?;
    let Some((org_id, user_id)) = auth_tokens::redeem(
        &client,
        &[Purpose::StaffReset, Purpose::StaffInvite],
        &req.token,
    )
    .await?
    else {
        return Err(ApiError::Unauthorized(
            "the link is invalid, expired or already used",
        ));
    };
    drop(client);
    // The user acts, through the link mailed to them.
    let principal = Principal {
        kind: PrincipalKind::User,
        id: user_id.to_string(),
    };
    let meta = super::event_metadata(&ctx, org_id, principal);
    crm_infra::access::accounts::change_password(&s.executor, org_id, user_id, hash, &meta).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "message": "the password is set; sign in with it" }),
        &ctx.request_id,
    ))
}

async fn portal_me(s: AppState, p: PortalAuthed) -> Result<Response, ApiError> {
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, p.org_id).await?;
    // Scoped to the contact's own id: there is no other id a portal caller can name.
    let view = contacts_rm::get(&tx, p.org_id, p.contact_id)
        .await?
        .ok_or(ApiError::NotFound("contact not found"))?;
    Ok(json_response(
        StatusCode::OK,
        &super::contacts::view_json(&view),
        &p.ctx.request_id,
    ))
}

async fn portal_logout(s: AppState, p: PortalAuthed) -> Result<Response, ApiError> {
    portal::command(
        &s.executor,
        p.org_id,
        p.contact_id,
        PortalCommand::SignOut,
        None,
        &p.metadata(),
    )
    .await
    .map_err(portal_error)?;
    Ok(super::no_content(&p.ctx.request_id))
}

/// The contact as its events say now (not the read model, which may lag behind a
/// contact created a moment ago); 404 when it is not one of `org_id`'s.
async fn current_contact(
    s: &AppState,
    org_id: Uuid,
    contact_id: Uuid,
) -> Result<crm_domain::contact::Contact, ApiError> {
    let client = s.pool.get().await?;
    let loaded = s
        .executor
        .load::<crm_domain::contact::Contact>(&client, org_id, &contact_id.to_string())
        .await?;
    if loaded.aggregate.exists() {
        Ok(loaded.aggregate)
    } else {
        Err(ApiError::NotFound("contact not found"))
    }
}

fn parse_contact_id(raw: &str) -> Result<Uuid, ApiError> {
    super::parse_uuid(raw, "contact")
}

/// Gives a contact of the caller's organisation portal access, with its current email
/// (or the one given). The contact then sets a password through a reset link or signs
/// in with a magic link.
async fn grant(
    s: AppState,
    a: Authed,
    id: String,
    ct: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let contact_id = parse_contact_id(&id)?;
    let contact = current_contact(&s, a.caller.org_id, contact_id).await?;
    let input: GrantInput = if body.is_empty() {
        GrantInput::default()
    } else {
        require_json(ct.as_deref())?;
        parse_json(&body)?
    };
    let email = match input.email {
        Some(e) => Email::parse(&e)
            .map_err(|e| ApiError::Validation(vec![FieldError::new("email", e.0)]))?,
        None => contact.profile.email.clone().ok_or_else(|| {
            ApiError::Validation(vec![FieldError::new(
                "email",
                "the contact has no email: give one",
            )])
        })?,
    };
    let o = portal::command(
        &s.executor,
        a.caller.org_id,
        contact_id,
        PortalCommand::Grant {
            contact_id,
            org_id: a.caller.org_id,
            login: PortalLogin { email },
        },
        None,
        &a.metadata(),
    )
    .await
    .map_err(portal_error)?;
    Ok(super::outcome(&o, &a.ctx.request_id))
}

async fn revoke(s: AppState, a: Authed, id: String) -> Result<Response, ApiError> {
    let contact_id = parse_contact_id(&id)?;
    current_contact(&s, a.caller.org_id, contact_id).await?;
    let o = portal::command(
        &s.executor,
        a.caller.org_id,
        contact_id,
        PortalCommand::Revoke,
        None,
        &a.metadata(),
    )
    .await
    .map_err(portal_error)?;
    Ok(super::outcome(&o, &a.ctx.request_id))
}
