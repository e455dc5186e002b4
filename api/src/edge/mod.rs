//! The HTTP edge: everything between a request's bytes and a handler.
//!
//! One warp filter takes every request and [`dispatch`]es it over the route table
//! ([`route`], declared in [`crate::routes::table`]): request context (id, address,
//! user agent) first, so every answer carries `X-Request-Id`; CORS preflights; the
//! rate gate; the route by path and method (404 / 405 with `Allow`); path ids as
//! UUIDs; authentication and the route's permission (deny by default); the body,
//! bounded, only for routes that take one; then the handler with its extractors
//! ([`extract`]). Every answer gets the security headers and CORS headers, and one
//! log line (method, route, status, latency, request id).

pub mod context;
pub mod cors;
pub mod extract;
pub mod ratelimit;
pub mod reply;
pub mod route;
pub mod server;

use std::sync::Arc;
use std::time::Instant;

use bytes::Buf;
use crm_infra::metrics::METRICS;
use tracing::Instrument;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue, Method};
use warp::reply::Response;
use warp::Filter;

use self::context::RequestContext;
use self::route::{Auth, BodyLimit, Call, Caller, Route, BULK_BODY_BYTES, SMALL_BODY_BYTES};
use crate::error::ApiError;
use crate::state::AppState;

/// Headers every response carries, errors included. The API serves JSON: no content
/// may load, frame or be sniffed as anything else. The few HTML pages (the preference
/// center) set a policy of their own, which is kept.
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

struct Edge {
    state: AppState,
    table: Vec<Route>,
    cors: cors::CorsPolicy,
}

/// The whole service as one filter: every request is answered (nothing rejects).
pub fn serve(state: AppState, table: Vec<Route>) -> BoxedFilter<(Response,)> {
    let edge = Arc::new(Edge {
        cors: cors::CorsPolicy {
            api: state.settings.http.cors_origins.clone(),
            portal: state.settings.http.portal_cors_origins.clone(),
        },
        state,
        table,
    });
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<server::ClientAddr>())
        .and(warp::body::stream())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  addr: Option<server::ClientAddr>,
                  body| {
                let edge = edge.clone();
                async move {
                    let request = Request {
                        method,
                        path: path.as_str(),
                        query,
                        headers,
                        addr: addr.map(|a| a.0),
                    };
                    edge.dispatch(request, body).await
                }
            },
        )
        .boxed()
}

struct Request<'a> {
    method: Method,
    path: &'a str,
    query: String,
    headers: HeaderMap,
    addr: Option<std::net::SocketAddr>,
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether the request announces a body larger than we would drain unread.
    fn announces_large_body(&self) -> bool {
        self.headers.contains_key("transfer-encoding")
            || self
                .header("content-length")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n > SMALL_BODY_BYTES)
    }
}

impl Edge {
    async fn dispatch<S, B>(&self, req: Request<'_>, body: S) -> Response
    where
        S: futures::Stream<Item = Result<B, warp::Error>> + Send,
        B: Buf,
    {
        let started = Instant::now();
        let ctx = RequestContext::from_request(&req.headers, req.addr);
        let span = tracing::info_span!("request", request_id = %ctx.request_id);
        let mut body_read = false;
        let (route, result) = self
            .answer(&req, ctx.clone(), body, &mut body_read)
            .instrument(span)
            .await;
        let mut response = result.unwrap_or_else(|e| e.into_response(&ctx.request_id));
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            headers.insert("x-request-id", v);
        }
        for (name, value) in SECURITY_HEADERS {
            headers
                .entry(name)
                .or_insert(HeaderValue::from_static(value));
        }
        // An unread body the server would have to drain: say the connection ends.
        if !body_read && req.announces_large_body() {
            headers.insert("connection", HeaderValue::from_static("close"));
        }
        let response = cors::decorate(self.cors.for_path(req.path), req.header("origin"), response);
        let status = response.status().as_u16();
        METRICS
            .http_requests
            .with_label_values(&[req.method.as_str(), &status.to_string()])
            .inc();
        // One line per request. The client's address stays out of logs (personal data).
        tracing::info!(
            method = %req.method,
            route,
            status,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            request_id = %ctx.request_id,
            "request"
        );
        response
    }

    /// The answer, and the route that gave it (`-` when none matched).
    async fn answer<S, B>(
        &self,
        req: &Request<'_>,
        ctx: RequestContext,
        body: S,
        body_read: &mut bool,
    ) -> (&'static str, Result<Response, ApiError>)
    where
        S: futures::Stream<Item = Result<B, warp::Error>> + Send,
        B: Buf,
    {
        if let Some(addr) = req.addr {
            let class = ratelimit::Class::of(req.path);
            if let Err(wait) = self.state.rate_limits.check(class, addr.ip()) {
                return ("-", Err(ApiError::too_many_requests(wait)));
            }
        }
        if let Some(answer) = cors::preflight(
            self.cors.for_path(req.path),
            &req.method,
            req.header("origin"),
            req.header("access-control-request-method"),
        ) {
            return ("preflight", answer);
        }
        let (route, ids) = match lookup(&self.table, &req.method, req.path) {
            Lookup::Found(route, ids) => (route, ids),
            Lookup::NoSuchPath => return ("-", Err(ApiError::NotFound("no such route"))),
            Lookup::OtherMethods(allowed) => {
                let mut response = ApiError::MethodNotAllowed.into_response(&ctx.request_id);
                if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                    response.headers_mut().insert("allow", v);
                }
                return ("-", Ok(response));
            }
        };
        let result = self.run(route, req, ctx, ids, body, body_read).await;
        (route.path, result)
    }

    async fn run<S, B>(
        &self,
        route: &Route,
        req: &Request<'_>,
        ctx: RequestContext,
        raw_ids: Vec<(&'static str, &str)>,
        body: S,
        body_read: &mut bool,
    ) -> Result<Response, ApiError>
    where
        S: futures::Stream<Item = Result<B, warp::Error>> + Send,
        B: Buf,
    {
        let ids = parse_ids(raw_ids)?;
        let state = &self.state;
        let authorization = req.header("authorization");
        let caller = match route.auth {
            Auth::Public => Caller::Nobody,
            Auth::SignedIn => {
                Caller::Staff(crate::routes::authenticate(state, authorization, &ctx).await?)
            }
            Auth::Staff(permission) => {
                let a = crate::routes::authenticate(state, authorization, &ctx).await?;
                a.require(permission)?;
                Caller::Staff(a)
            }
            Auth::Portal => Caller::Portal(
                crate::routes::portal::authenticate(state, authorization, &ctx).await?,
            ),
        };
        if !route.takes_query && !req.query.is_empty() {
            return Err(crate::edge::extract::no_query_expected(&req.query));
        }
        let content_type = req.header("content-type").map(str::to_owned);
        let body = if route.reads_body {
            let limit = body_limit(route, state);
            if req
                .header("content-length")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n > limit)
            {
                return Err(ApiError::PayloadTooLarge);
            }
            let bytes = collect_body(body, limit, &state.settings.http.timeouts).await?;
            *body_read = true;
            bytes
        } else {
            bytes::Bytes::new()
        };
        let call = Call {
            ctx,
            caller,
            ids,
            query: req.query.clone(),
            content_type,
            body,
            credential: authorization.map(str::to_owned),
        };
        route.call(state.clone(), call).await
    }
}

/// The largest body `route` takes.
fn body_limit(route: &Route, state: &AppState) -> u64 {
    match route.body_limit {
        BodyLimit::Small => SMALL_BODY_BYTES,
        BodyLimit::Large => state.settings.http.max_body_bytes,
        BodyLimit::Bulk => state.settings.http.max_body_bytes.max(BULK_BODY_BYTES),
    }
}

/// Where a request's method and path lead in `table`.
enum Lookup<'t, 'p> {
    /// The route, and its path's ids (`{name}` → the segment as sent).
    Found(&'t Route, Vec<(&'static str, &'p str)>),
    /// The path exists with these methods only (405 with `Allow`).
    OtherMethods(Vec<&'t str>),
    NoSuchPath,
}

fn lookup<'t, 'p>(table: &'t [Route], method: &Method, path: &'p str) -> Lookup<'t, 'p> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut allowed = Vec::new();
    for r in table {
        if let Some(ids) = r.matches(&parts) {
            if r.method == method {
                return Lookup::Found(r, ids);
            }
            allowed.push(r.method.as_str());
        }
    }
    if allowed.is_empty() {
        Lookup::NoSuchPath
    } else {
        Lookup::OtherMethods(allowed)
    }
}

/// The path's ids as UUIDs (400 `invalid_id` naming the first that is not one).
fn parse_ids(raw_ids: Vec<(&'static str, &str)>) -> Result<Vec<uuid::Uuid>, ApiError> {
    raw_ids
        .into_iter()
        .map(|(name, raw)| {
            uuid::Uuid::parse_str(raw).map_err(|_| {
                ApiError::bad_request(
                    "invalid_id",
                    format!("`{name}` must be a UUID; `{raw}` is not one"),
                )
                .with_fields(vec![crate::error::FieldError::new(name, "must be a UUID")])
            })
        })
        .collect()
}

/// Calls the operation at `method` `path` of `table` as `caller`, already
/// authenticated, in this process: the route's declared permission (deny by default),
/// then its query and body extractors and its handler, exactly as the dispatcher runs
/// them after authentication. So another front end (the MCP tools, [`crate::mcp`]) is
/// one more client of the same declarations, and answers what the API answers: the
/// reply, or the error the API would send (the caller turns it into the one JSON shape
/// with [`ApiError::into_response`]). Only staff routes can be called this way.
pub async fn call_as(
    state: &AppState,
    table: &[Route],
    caller: crate::routes::Authed,
    method: Method,
    path: &str,
    query: String,
    body: Option<&serde_json::Value>,
) -> Result<Response, ApiError> {
    let Lookup::Found(route, raw_ids) = lookup(table, &method, path) else {
        return Err(ApiError::internal(format!(
            "in-process call of {method} {path}: no such operation"
        )));
    };
    let ids = parse_ids(raw_ids)?;
    match route.auth {
        Auth::Staff(permission) => caller.require(permission)?,
        Auth::SignedIn => {}
        Auth::Public | Auth::Portal => {
            return Err(ApiError::internal(format!(
                "in-process call of {method} {path}: not a staff operation"
            )))
        }
    }
    if !route.takes_query && !query.is_empty() {
        return Err(crate::edge::extract::no_query_expected(&query));
    }
    let body = match (route.reads_body, body) {
        (true, Some(v)) => bytes::Bytes::from(serde_json::to_vec(v).map_err(ApiError::internal)?),
        _ => bytes::Bytes::new(),
    };
    if body.len() as u64 > body_limit(route, state) {
        return Err(ApiError::PayloadTooLarge);
    }
    let call = Call {
        ctx: caller.ctx.clone(),
        caller: Caller::Staff(caller),
        ids,
        query,
        content_type: Some("application/json".into()),
        body,
        credential: None,
    };
    route.call(state.clone(), call).await
}

/// Reads a body of at most `limit` bytes, with `body_read` between reads and
/// `body_total` in all (408 `request_timeout` otherwise).
pub(crate) async fn collect_body<S, B, E>(
    stream: S,
    limit: u64,
    timeouts: &crate::config::HttpTimeouts,
) -> Result<bytes::Bytes, ApiError>
where
    S: futures::Stream<Item = Result<B, E>>,
    B: Buf,
{
    let mut buf = bytes::BytesMut::new();
    futures::pin_mut!(stream);
    let deadline = tokio::time::Instant::now() + timeouts.body_total;
    loop {
        let wait = (tokio::time::Instant::now() + timeouts.body_read).min(deadline);
        let Ok(next) = tokio::time::timeout_at(wait, futures::StreamExt::next(&mut stream)).await
        else {
            METRICS.http_timeouts.with_label_values(&["body"]).inc();
            return Err(ApiError::RequestTimeout);
        };
        let Some(chunk) = next else { break };
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
