//! Routes. Every `/v1` route except login is built on [`staff`]: deny by default.

pub mod activity;
pub mod api_keys;
pub mod contacts;
pub mod cors;
pub mod health;
pub mod login;
pub mod portal;
pub mod reports;
pub mod roles;
pub mod users;

use std::collections::HashMap;

use bytes::Buf;
use std::time::Duration;

use crm_domain::metadata::{EventMetadata, Principal, PrincipalKind};
use crm_infra::metrics::METRICS;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::auth::Caller;
use crate::context::{request_context, RequestContext};
use crate::error::{ApiError, ApiRejection};
use crate::state::AppState;
use crm_domain::access::Permission;
use crm_infra::access::accounts::Access;

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

/// 200 with what a command wrote: `{id, version, positions}`.
/// A new staff token at `generation` (a sign-in, or the session that survives a change
/// that ended every other), answered as `{access_token, token_type, expires_in}` plus
/// `extra`'s members.
pub fn staff_token(
    s: &AppState,
    user_id: uuid::Uuid,
    org_id: uuid::Uuid,
    generation: i32,
    extra: serde_json::Value,
    request_id: &str,
) -> Result<Response, ApiError> {
    let token = s
        .tokens
        .issue(user_id, org_id, generation)
        .map_err(ApiError::internal)?;
    let mut body = serde_json::json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": s.tokens.ttl_secs(),
    });
    if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    Ok(crate::error::json_response(
        warp::http::StatusCode::OK,
        &body,
        request_id,
    ))
}

pub fn outcome(o: &crm_infra::commands::executor::CommandOutcome, request_id: &str) -> Response {
    crate::error::json_response(
        warp::http::StatusCode::OK,
        &serde_json::json!({ "id": o.id, "version": o.version, "positions": o.positions }),
        request_id,
    )
}

/// 204 with the request id.
pub fn no_content(request_id: &str) -> Response {
    let mut resp = warp::Reply::into_response(warp::reply::with_status(
        warp::reply(),
        warp::http::StatusCode::NO_CONTENT,
    ));
    if let Ok(v) = request_id.parse() {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// A UUID from a path segment, or 400 `invalid_id` naming what it should identify.
pub fn parse_uuid(raw: &str, what: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| {
        ApiError::bad_request(
            "invalid_id",
            format!("`{raw}` is not a valid {what} id (a UUID)"),
        )
    })
}

pub fn with_state(
    state: AppState,
) -> impl Filter<Extract = (AppState,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// Requires a valid staff bearer token and the permission `permission`.
pub fn allowed(
    state: AppState,
    permission: Permission,
) -> impl Filter<Extract = (Authed,), Error = Rejection> + Clone {
    staff(state).and_then(move |a: Authed| async move {
        match a.require(permission) {
            Ok(()) => Ok(a),
            Err(e) => Err(warp::reject::custom(ApiRejection(
                e,
                a.ctx.request_id.clone(),
            ))),
        }
    })
}

/// Requires a valid staff bearer token of an active user, whose access it loads.
/// Routes use [`allowed`]; this alone is for what every signed-in user may do to
/// their own account (`/v1/me`, logout, password).
pub fn staff(state: AppState) -> impl Filter<Extract = (Authed,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(request_context())
        .and_then(move |header: Option<String>, ctx: RequestContext| {
            let state = state.clone();
            async move {
                let token = header
                    .as_deref()
                    .and_then(|h| {
                        h.strip_prefix("Bearer ")
                            .or_else(|| h.strip_prefix("bearer "))
                    })
                    .map(str::trim);
                let Some(token) = token else {
                    return Err(warp::reject::custom(ApiRejection(
                        ApiError::Unauthorized("a bearer token is required"),
                        ctx.request_id,
                    )));
                };
                let reject = |e: ApiError, ctx: RequestContext| {
                    warp::reject::custom(ApiRejection(e, ctx.request_id))
                };
                let invalid = ApiError::Unauthorized("the token is invalid or expired");
                if crate::api_keys::is_api_key(token) {
                    // A mistyped key fails its checksum before any lookup.
                    let Some(digest) = crate::api_keys::check(token) else {
                        return Err(reject(invalid, ctx));
                    };
                    let access = match key_access(&state, &digest).await {
                        Ok(Some(a)) => a,
                        Ok(None) => return Err(reject(invalid, ctx)),
                        Err(e) => return Err(reject(e, ctx)),
                    };
                    return Ok(Authed {
                        caller: Caller {
                            user_id: access.user_id,
                            org_id: access.org_id,
                            generation: 0,
                        },
                        access,
                        ctx,
                        kind: PrincipalKind::ApiKey,
                    });
                }
                let Some(caller) = state.tokens.verify_staff(token) else {
                    return Err(reject(invalid, ctx));
                };
                let access = match load_access(&state, &caller).await {
                    Ok(Some(a)) if a.token_generation == caller.generation => a,
                    // Unknown or deactivated user, or a token from before a logout or
                    // a password change: all read the same.
                    Ok(_) => return Err(reject(invalid, ctx)),
                    Err(e) => return Err(reject(e, ctx)),
                };
                Ok(Authed {
                    caller,
                    access,
                    ctx,
                    kind: PrincipalKind::User,
                })
            }
        })
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

/// A request body of at most `limit` bytes (with or without Content-Length) and its
/// content type. Larger bodies are refused with 413 without reading them whole.
pub fn body(
    limit: u64,
) -> impl Filter<Extract = (Option<String>, bytes::Bytes), Error = Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<u64>("content-length"))
        .and(request_context())
        .and(warp::body::stream())
        .and_then(
            move |ct: Option<String>, declared: Option<u64>, ctx: RequestContext, stream| async move {
                // The request's own id (the client's, if it sent one), as on every other error.
                let reject = |e: ApiError| {
                    warp::reject::custom(ApiRejection(e, ctx.request_id.clone()))
                };
                if declared.is_some_and(|n| n > limit) {
                    return Err(reject(ApiError::PayloadTooLarge));
                }
                let bytes = collect_body(stream, limit).await.map_err(reject)?;
                Ok::<_, Rejection>((ct, bytes))
            },
        )
        .untuple_one()
}

async fn collect_body<S, B>(stream: S, limit: u64) -> Result<bytes::Bytes, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut buf = bytes::BytesMut::new();
    futures::pin_mut!(stream);
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let mut chunk = chunk.map_err(|_| {
            ApiError::bad_request("invalid_body", "the request body could not be read")
        })?;
        if (buf.len() + chunk.remaining()) as u64 > limit {
            return Err(ApiError::PayloadTooLarge);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            buf.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// Insists on a JSON content type.
pub fn require_json(content_type: Option<&str>) -> Result<(), ApiError> {
    match content_type {
        Some(ct)
            if ct
                .trim()
                .to_ascii_lowercase()
                .starts_with("application/json") =>
        {
            Ok(())
        }
        _ => Err(ApiError::UnsupportedMediaType),
    }
}

/// The raw query string (empty when absent).
pub fn raw_query() -> impl Filter<Extract = (String,), Error = std::convert::Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// Query parameters; unknown names are refused by name.
pub fn parse_query(raw: &str, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
    let mut out = HashMap::new();
    for (k, v) in pairs {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "unknown query parameter `{k}`; allowed: {}",
                    allowed.join(", ")
                ),
            ));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("`{k}` is given twice"),
            ));
        }
    }
    Ok(out)
}

/// `min_position` and `wait_ms`: the read-your-writes parameters of every query.
pub fn consistency(
    q: &HashMap<String, String>,
) -> Result<(Option<i64>, Option<Duration>), ApiError> {
    let pos = q
        .get("min_position")
        .map(|v| {
            v.parse::<i64>().ok().filter(|p| *p > 0).ok_or_else(|| {
                ApiError::bad_request("invalid_query", "`min_position` must be a positive integer")
            })
        })
        .transpose()?;
    let wait = q
        .get("wait_ms")
        .map(|v| {
            v.parse::<u64>().map(Duration::from_millis).map_err(|_| {
                ApiError::bad_request(
                    "invalid_query",
                    "`wait_ms` must be a number of milliseconds",
                )
            })
        })
        .transpose()?;
    Ok((pos, wait))
}

pub fn parse_time(name: &str, v: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("`{name}` must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z"),
            )
        })
}

pub fn parse_limit(q: &HashMap<String, String>) -> Result<i64, ApiError> {
    match q.get("limit") {
        None => Ok(50),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_query", "`limit` must be between 1 and 500")
            }),
    }
}

/// Counts the request against its client address's budget (see [`crate::ratelimit`]);
/// over it, a 429 with `Retry-After` before any route runs.
fn rate_gate(
    limits: crate::ratelimit::RateLimits,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::path::full()
        .and(warp::addr::remote())
        .and_then(
            move |path: warp::path::FullPath, addr: Option<std::net::SocketAddr>| {
                let limits = limits.clone();
                async move {
                    let Some(addr) = addr else { return Ok(()) };
                    let class = crate::ratelimit::Class::of(path.as_str());
                    limits.check(class, addr.ip()).map_err(|wait| {
                        warp::reject::custom(ApiRejection(
                            ApiError::too_many_requests(wait),
                            crate::context::new_request_id(),
                        ))
                    })
                }
            },
        )
        .untuple_one()
}

/// Headers every response carries, errors included. The API serves JSON only: no
/// content may load, frame or be sniffed as anything else.
pub const SECURITY_HEADERS: [(&str, &str); 5] = [
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "SAMEORIGIN"),
    (
        "strict-transport-security",
        "max-age=63072000; includeSubDomains",
    ),
    ("referrer-policy", "no-referrer"),
];

fn with_security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, warp::http::HeaderValue::from_static(value));
    }
    response
}

/// Every route of the service, with errors recovered into JSON, security headers on
/// every response, and requests logged.
pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let cors_policy = cors::CorsPolicy {
        api: state.settings.http.cors_origins.clone(),
        portal: state.settings.http.portal_cors_origins.clone(),
    };
    let limits = state.rate_limits.clone();
    let routes = cors::preflight(cors_policy.clone())
        .or(login::routes(state.clone()))
        .unify()
        .or(contacts::routes(state.clone()))
        .unify()
        .or(activity::routes(state.clone()))
        .unify()
        .or(users::routes(state.clone()))
        .unify()
        .or(roles::routes(state.clone()))
        .unify()
        .or(reports::routes(state.clone()))
        .unify()
        .or(api_keys::routes(state.clone()))
        .unify()
        .or(portal::routes(state.clone()))
        .unify()
        .or(health::routes(state))
        .unify();
    let api = rate_gate(limits).and(routes).boxed();
    let recovered = api.recover(crate::error::recover).unify();
    warp::path::full()
        .and(warp::header::optional::<String>("origin"))
        .and(recovered)
        .map(
            move |path: warp::path::FullPath, origin: Option<String>, response| {
                cors::decorate(
                    cors_policy.for_path(path.as_str()),
                    origin.as_deref(),
                    response,
                )
            },
        )
        .map(with_security_headers)
        .with(warp::log::custom(|info| {
            let status = info.status().as_u16();
            METRICS
                .http_requests
                .with_label_values(&[info.method().as_str(), &status.to_string()])
                .inc();
            tracing::info!(
                method = %info.method(),
                path = info.path(),
                status,
                elapsed_ms = info.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
        }))
        // A span per request; the client's address stays out of logs (personal data).
        .with(warp::trace(
            |info| tracing::info_span!("request", method = %info.method(), path = %info.path()),
        ))
        .map(warp::Reply::into_response)
        .boxed()
}
