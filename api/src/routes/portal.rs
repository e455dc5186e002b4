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

use crm_domain::access::Module;
use crm_domain::metadata::{EventMetadata, Principal, PrincipalKind};
use crm_domain::portal::{PortalCommand, PortalError, PortalLogin};
use crm_domain::values::Email;
use crm_infra::access::auth_tokens::{self, Purpose};
use crm_infra::access::portal::{self, PortalCredential};
use crm_infra::commands::executor::CommandError;
use crm_infra::read_models::contacts as contacts_rm;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::contacts::ContactDoc;
use super::schemas::{Message, Outcome, Token};
use super::Authed;
use crate::auth::{check_password_policy, dummy_hash, hash_password, verify_password};
use crate::edge::context::RequestContext;
use crate::edge::extract::{Id, Json, OptionalJson};
use crate::edge::reply::{Accepted, NoContent, Ok200, Shaped};
use crate::error::{ApiError, FieldError};
use crate::mail::Mail;
use crate::state::AppState;
const BAD_LOGIN: &str = "invalid email or password";
/// The one answer to "send me a link", whether or not the address has an account.
const LINK_SENT: &str = "if the address belongs to an account, a message with a link is on its way";

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalLoginInput {
    org_id: Uuid,
    #[schema(max_length = 320, pattern = "@no_nul")]
    email: String,
    #[schema(max_length = 1024, pattern = "@no_nul")]
    password: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalEmailInput {
    org_id: Uuid,
    #[schema(max_length = 320, pattern = "@no_nul")]
    email: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StaffEmailInput {
    #[schema(max_length = 320, pattern = "@no_nul")]
    email: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenInput {
    #[schema(pattern = "@no_nul")]
    token: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetInput {
    #[schema(pattern = "@no_nul")]
    token: String,
    #[schema(min_length = 12, max_length = 1024, pattern = "@no_nul")]
    new_password: String,
}

/// The portal login's email (default: the contact's own).
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantInput {
    #[schema(value_type = Option<String>, max_length = 254, pattern = "@email")]
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

/// Authenticates a portal request: a valid portal token of a contact whose access is
/// live (staff tokens are refused). A request that carries `Sec-GPC: 1` records the
/// contact's opt-out of sale and sharing before its route runs (once: a contact that
/// opted out already records nothing).
pub async fn authenticate(
    state: &AppState,
    authorization: Option<&str>,
    ctx: &RequestContext,
) -> Result<PortalAuthed, ApiError> {
    let invalid = ApiError::Unauthorized("the token is invalid or expired");
    let Some(caller) = super::bearer(authorization).and_then(|t| state.tokens.verify_portal(t))
    else {
        return Err(invalid);
    };
    let client = state.pool.get().await?;
    match portal::by_contact(&client, caller.org_id, caller.user_id).await? {
        Some(c) if c.token_generation == caller.generation => {
            if !c.portal_on {
                return Err(portal_off());
            }
            let authed = PortalAuthed {
                contact_id: c.contact_id,
                org_id: c.org_id,
                ctx: ctx.clone(),
            };
            drop(client);
            super::consent::honour_gpc(
                state,
                ctx,
                authed.org_id,
                authed.contact_id,
                crm_domain::consent::proof::CaptureSource::Portal,
                &authed.metadata(),
            )
            .await?;
            Ok(authed)
        }
        _ => Err(invalid),
    }
}

fn token_response(s: &AppState, token: String) -> Ok200<Token> {
    Ok200(Token {
        access_token: token,
        token_type: "Bearer".into(),
        expires_in: s.tokens.ttl_secs(),
    })
}

/// No address is longer than 320 characters (RFC 5321): refused by its length alone,
/// which says nothing about whether an account has it.
fn too_long(email: &str) -> Result<(), ApiError> {
    if email.chars().count() > 320 {
        return Err(ApiError::Validation(vec![FieldError::new(
            "email",
            "must be at most 320 characters",
        )]));
    }
    Ok(())
}

fn link_sent() -> Accepted<Message> {
    Accepted(Message::new(LINK_SENT))
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

pub(crate) async fn portal_login(
    s: AppState,
    Json(req): Json<PortalLoginInput>,
) -> Result<Ok200<Token>, ApiError> {
    if req.password.chars().count() > crate::auth::MAX_PASSWORD_CHARS
        || req.email.chars().count() > 320
    {
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
    Ok(token_response(&s, token))
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

pub(crate) async fn magic_link(
    s: AppState,
    Json(req): Json<PortalEmailInput>,
) -> Result<Accepted<Message>, ApiError> {
    portal_link(s, req, Purpose::PortalMagicLink).await
}

pub(crate) async fn portal_reset_request(
    s: AppState,
    Json(req): Json<PortalEmailInput>,
) -> Result<Accepted<Message>, ApiError> {
    portal_link(s, req, Purpose::PortalReset).await
}

async fn portal_link(
    s: AppState,
    req: PortalEmailInput,
    purpose: Purpose,
) -> Result<Accepted<Message>, ApiError> {
    too_long(&req.email)?;
    {
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
    Ok(link_sent())
}

pub(crate) async fn redeem_magic_link(
    s: AppState,
    Json(req): Json<TokenInput>,
) -> Result<Ok200<Token>, ApiError> {
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
    Ok(token_response(&s, token))
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

pub(crate) async fn portal_reset_confirm(
    s: AppState,
    ctx: RequestContext,
    Json(req): Json<ResetInput>,
) -> Result<Ok200<Message>, ApiError> {
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
    Ok(Ok200(Message::new("the password is set; sign in with it")))
}

pub(crate) async fn staff_reset_request(
    s: AppState,
    Json(req): Json<StaffEmailInput>,
) -> Result<Accepted<Message>, ApiError> {
    too_long(&req.email)?;
    {
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
    Ok(link_sent())
}

/// Sets a new password from a reset link. It does not sign in: the next login still
/// needs the second factor if the account has one.
pub(crate) async fn staff_reset_confirm(
    s: AppState,
    ctx: RequestContext,
    Json(req): Json<ResetInput>,
) -> Result<Ok200<Message>, ApiError> {
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
    Ok(Ok200(Message::new("the password is set; sign in with it")))
}

pub(crate) async fn portal_me(
    s: AppState,
    p: PortalAuthed,
) -> Result<Ok200<Shaped<ContactDoc>>, ApiError> {
    let mut client = s.pool.get().await?;
    let tx = crm_infra::read_models::org_scope(&mut client, p.org_id).await?;
    // Scoped to the contact's own id: there is no other id a portal caller can name.
    let view = contacts_rm::get(&tx, p.org_id, p.contact_id)
        .await?
        .ok_or(ApiError::NotFound("contact not found"))?;
    Ok(Ok200(Shaped::new(super::contacts::view_json(&view))))
}

pub(crate) async fn portal_logout(s: AppState, p: PortalAuthed) -> Result<NoContent, ApiError> {
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
    Ok(NoContent)
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
    if !loaded.aggregate.exists() {
        return Err(ApiError::NotFound("contact not found"));
    }
    // Nothing more is recorded about an erased contact; its portal stream's login is
    // unreadable too (its key was destroyed with the contact's).
    if loaded.aggregate.erased {
        return Err(ApiError::erased());
    }
    Ok(loaded.aggregate)
}

/// Gives a contact of the caller's organisation portal access, with its current email
/// (or the one given). The contact then sets a password through a reset link or signs
/// in with a magic link.
pub(crate) async fn grant(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
    OptionalJson(input): OptionalJson<GrantInput>,
) -> Result<Ok200<Outcome>, ApiError> {
    let contact = current_contact(&s, a.caller.org_id, contact_id).await?;
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
    Ok(super::outcome(&o))
}

pub(crate) async fn revoke(
    s: AppState,
    a: Authed,
    Id(contact_id): Id,
) -> Result<Ok200<Outcome>, ApiError> {
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
    Ok(super::outcome(&o))
}

/// `GET /portal/export`: the signed-in contact's own copy of its data (recorded as an
/// export with source `portal`): everything, every field (docs/rights.md).
pub(crate) async fn portal_export(
    s: AppState,
    p: PortalAuthed,
) -> Result<crate::edge::reply::RawAs<super::rights::ExportDocument>, ApiError> {
    let everything = crm_domain::access::builtin_policy(crm_domain::access::Role::Owner);
    let response = super::rights::export_contact(
        &s,
        p.org_id,
        p.contact_id,
        crm_domain::contact::RequestSource::Portal,
        &p.metadata(),
        &everything,
    )
    .await?;
    Ok(crate::edge::reply::RawAs::new(response))
}

/// What asking for erasure did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErasureAsked {
    /// `confirmation_sent` (a single-use link went to the e-mail address on file:
    /// nothing is erased until it is confirmed), `no_address` or `not_sent` (the gate
    /// refused: the suppression list, Do Not Contact).
    status: String,
}

/// `POST /portal/erase`: the signed-in contact asks for its erasure; a link to confirm
/// it goes to the e-mail address on file (the same link as the preference center's).
pub(crate) async fn portal_erase(
    s: AppState,
    p: PortalAuthed,
) -> Result<crate::edge::reply::Accepted<ErasureAsked>, ApiError> {
    let done = super::preferences::request_erasure(
        &s,
        (p.org_id, p.contact_id),
        "en",
        "portal",
        &p.metadata(),
    )
    .await?;
    let status = match done {
        "erase_sent" => "confirmation_sent",
        "erase_no_address" => "no_address",
        _ => "not_sent",
    };
    Ok(crate::edge::reply::Accepted(ErasureAsked {
        status: status.into(),
    }))
}
