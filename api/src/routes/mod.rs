//! The operations of the API: one module per resource, each declaring its routes in
//! [`table`] (method, path, permission, handler; the handler's types say what it takes
//! and answers). The edge ([`crate::edge`]) serves the table; the OpenAPI document
//! ([`crate::openapi`]) is generated from it.

pub mod activity;
pub mod ai;
pub mod ai_audit;
pub mod api_keys;
pub mod carriers;
pub mod consent;
pub mod consent_log;
pub mod contacts;
pub mod credentials;
pub mod events;
pub mod health;
pub mod login;
pub mod messages;
pub mod portal;
pub mod preferences;
pub mod receipts;
pub mod reports;
pub mod rights;
pub mod roles;
pub mod schemas;
pub mod table;
pub mod users;
pub mod webhooks;

use std::time::Duration;

use crm_domain::metadata::{EventMetadata, Principal, PrincipalKind};
use crm_infra::metrics::METRICS;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::auth::Caller;
use crate::edge::context::RequestContext;
use crate::edge::reply::Ok200;
use crate::error::ApiError;
use crate::state::AppState;
use crm_domain::access::Permission;
use crm_infra::access::accounts::Access;
use schemas::{Outcome, Token};

/// An authenticated staff request, with what the caller may do right now.
#[derive(Debug, Clone)]
pub struct Authed {
    /// For an API key, `user_id` is the key's id.
    pub caller: Caller,
    /// Shared with the access cache: no copy per request.
    pub access: std::sync::Arc<Access>,
    pub ctx: RequestContext,
    /// `User` (a staff JWT) or `ApiKey`.
    pub kind: PrincipalKind,
}

impl Authed {
    /// For what only a person signed in with a password does (logout, password change).
    pub fn require_user(&self) -> Result<(), ApiError> {
        if self.kind == PrincipalKind::User {
            Ok(())
        } else {
            Err(ApiError::Forbidden {
                code: "user_only",
                message: "only a user signed in with a token may do this, not an API key".into(),
            })
        }
    }

    /// The one check of a request's permission: the module it belongs to must be
    /// active for the organisation, and the caller's role must hold the permission.
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        if self.access.two_factor_pending {
            return Err(ApiError::Forbidden {
                code: "two_factor_setup_required",
                message: "your organisation requires two-factor authentication for your role: \
                          set it up under /v1/auth/2fa first"
                    .into(),
            });
        }
        let module = permission.module();
        if !self.access.modules.contains(&module) {
            return Err(ApiError::Forbidden {
                code: "module_inactive",
                message: format!(
                    "the `{}` module is not active for this organisation",
                    module.name()
                ),
            });
        }
        if !self.access.policy.allows(permission) {
            return Err(ApiError::Forbidden {
                code: "permission_denied",
                message: format!(
                    "your role does not grant the `{}` permission",
                    permission.name()
                ),
            });
        }
        Ok(())
    }
}

impl Authed {
    /// Metadata for the events this request causes.
    pub fn metadata(&self) -> EventMetadata {
        let principal = Principal {
            kind: self.kind,
            id: self.caller.user_id.to_string(),
        };
        event_metadata(&self.ctx, self.caller.org_id, principal)
    }
}

/// Metadata for events caused by a request of `principal` in `org_id`.
pub fn event_metadata(
    ctx: &RequestContext,
    org_id: uuid::Uuid,
    principal: Principal,
) -> EventMetadata {
    EventMetadata {
        org_id,
        principal,
        on_behalf_of: None,
        ip: ctx.ip.clone(),
        user_agent: ctx.user_agent.clone(),
        request_id: Some(ctx.request_id.clone()),
        correlation_id: ctx.correlation_id.clone(),
        causation_id: ctx.causation_id.clone(),
        occurred_at: chrono::Utc::now(),
    }
}

/// A new staff token at `generation` (a sign-in, or the session that survives a change
/// that ended every other).
pub fn staff_token(
    s: &AppState,
    user_id: uuid::Uuid,
    org_id: uuid::Uuid,
    generation: i32,
) -> Result<Token, ApiError> {
    let token = s
        .tokens
        .issue(user_id, org_id, generation)
        .map_err(ApiError::internal)?;
    Ok(Token {
        access_token: token,
        token_type: "Bearer".into(),
        expires_in: s.tokens.ttl_secs(),
    })
}

/// 200 with what a command wrote: `{id, version, positions}`.
pub fn outcome(o: &crm_infra::commands::executor::CommandOutcome) -> Ok200<Outcome> {
    Ok200(Outcome::from(o))
}

/// The bearer token of an `Authorization` header.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    header
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// Authenticates a staff request (JWT or API key) of an active user and loads what
/// the caller may do right now. Every failure reads the same (401).
pub async fn authenticate(
    state: &AppState,
    authorization: Option<&str>,
    ctx: &RequestContext,
) -> Result<Authed, ApiError> {
    let Some(token) = bearer(authorization) else {
        return Err(ApiError::Unauthorized("a bearer token is required"));
    };
    let invalid = ApiError::Unauthorized("the token is invalid or expired");
    if crate::auth::api_keys::is_api_key(token) {
        // A mistyped key fails its checksum before any lookup.
        let Some(digest) = crate::auth::api_keys::check(token) else {
            return Err(invalid);
        };
        let Some(access) = key_access(state, &digest).await? else {
            return Err(invalid);
        };
        // An agent's key makes the agent the principal of what it does.
        let kind = if access.agent_of.is_some() {
            PrincipalKind::AiAgent
        } else {
            PrincipalKind::ApiKey
        };
        return Ok(Authed {
            caller: Caller {
                user_id: access.user_id,
                org_id: access.org_id,
                generation: 0,
            },
            access,
            ctx: ctx.clone(),
            kind,
        });
    }
    let Some(caller) = state.tokens.verify_staff(token) else {
        return Err(invalid);
    };
    match load_access(state, &caller).await? {
        Some(access) if access.token_generation == caller.generation => Ok(Authed {
            caller,
            access,
            ctx: ctx.clone(),
            kind: PrincipalKind::User,
        }),
        // Unknown or deactivated user, or a token from before a logout or a password
        // change: all read the same.
        _ => Err(invalid),
    }
}

/// The caller's access: from this process's cache (see `crm_infra::access::cache`), else
/// from the database.
async fn load_access(
    state: &AppState,
    caller: &Caller,
) -> Result<Option<std::sync::Arc<Access>>, ApiError> {
    let cache = &state.access_cache;
    if let Some(a) = cache.get(caller.user_id, caller.org_id) {
        METRICS.access_from_cache.inc();
        return Ok(Some(a));
    }
    METRICS
        .access_lookups
        .with_label_values(&["database"])
        .inc();
    let epoch = cache.epoch();
    let client = state.pool.get().await?;
    let access = crm_infra::access::accounts::load_access(&client, caller.user_id, caller.org_id)
        .await?
        .map(std::sync::Arc::new);
    if let Some(a) = &access {
        cache.put(a, epoch);
    }
    Ok(access)
}

async fn key_access(
    state: &AppState,
    digest: &[u8],
) -> Result<Option<std::sync::Arc<Access>>, ApiError> {
    let client = state.pool.get().await?;
    Ok(
        crm_infra::access::api_keys::access_by_digest(&client, digest)
            .await?
            .map(std::sync::Arc::new),
    )
}

/// `min_position` and `wait_ms`: the read-your-writes parameters of every query.
pub fn consistency(
    min_position: Option<i64>,
    wait_ms: Option<i64>,
) -> Result<(Option<i64>, Option<Duration>), ApiError> {
    if min_position.is_some_and(|p| p < 1) {
        return Err(query_error("min_position", "must be a positive integer"));
    }
    let wait = match wait_ms {
        None => None,
        Some(ms @ 0..=MAX_WAIT_MS) => Some(Duration::from_millis(ms as u64)),
        Some(_) => {
            return Err(query_error(
                "wait_ms",
                "must be between 0 and 600000 milliseconds",
            ))
        }
    };
    Ok((min_position, wait))
}

/// The longest `wait_ms` a query may ask for (the server caps it further, at
/// `CRM_MAX_CONSISTENCY_WAIT_MS`).
pub const MAX_WAIT_MS: i64 = 600_000;

/// 400 `invalid_query` naming `param`.
pub fn query_error(param: &str, message: &str) -> ApiError {
    ApiError::bad_request("invalid_query", format!("`{param}` {message}"))
        .with_fields(vec![crate::error::FieldError::new(param, message)])
}

/// A page size: 1 to 500, 50 when absent.
pub fn parse_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(50),
        Some(l) if (1..=500).contains(&l) => Ok(l),
        Some(_) => Err(query_error("limit", "must be between 1 and 500")),
    }
}

/// Every route of the service (see [`table`]), served by the edge.
pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    crate::edge::serve(state, table::table())
}
