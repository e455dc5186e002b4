//! The HTTP side of `/mcp`: what every request passes before the SDK's Streamable HTTP
//! service answers it, and what every answer gets after.
//!
//! In order: request context (id, address, user agent); the rate gate (the API's);
//! authentication with the API's own check (`routes::authenticate`: 401 with the API's
//! JSON error when missing or invalid); only an agent's key (403 `agent_only` for a
//! user's token or an integration key); the body, bounded and timed like the API's
//! (413, 408); then the SDK, with the agent ([`Authed`]) in the request's extensions,
//! which the SDK hands to the tool handlers. Every answer carries `X-Request-Id` and the
//! security headers, and one log line.
//!
//! The SDK runs stateless (no `Mcp-Session-Id`): every request is a whole exchange, so a
//! credential is checked on every request and no session can outlive it or change
//! hands, and any API process answers any request. Answers are JSON
//! (`application/json`) unless a tool streams.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use crm_domain::metadata::PrincipalKind;
use crm_infra::metrics::METRICS;
use http_body_util::{BodyDataStream, Either, Full};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warp::http::{HeaderValue, Request, Response};

use super::tools::Catalog;
use super::Server;
use crate::edge::context::RequestContext;
use crate::edge::ratelimit;
use crate::edge::server::ClientAddr;
use crate::error::ApiError;
use crate::routes::Authed;
use crate::state::AppState;

/// The path the endpoint is served at.
pub const PATH: &str = "/mcp";

/// What an answer's body may fail with (the SDK's never fails; the API's answers are
/// whole bytes).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// `/mcp`: cheap to clone (one `Arc`; the server loop clones it for every request).
#[derive(Clone)]
pub struct Endpoint(Arc<Shared>);

struct Shared {
    state: AppState,
    sdk: StreamableHttpService<Server, NeverSessionManager>,
    stop: CancellationToken,
}

impl Endpoint {
    pub fn new(state: AppState) -> Self {
        let stop = CancellationToken::new();
        let server = Server {
            state: state.clone(),
            catalog: Arc::new(Catalog::new()),
        };
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            // Host checks guard servers that trust where a request comes from (a local
            // server without credentials, reached through DNS rebinding). This one
            // trusts only the bearer key, which a browser never adds by itself.
            .disable_allowed_hosts()
            .with_max_request_body_bytes(
                usize::try_from(state.settings.http.max_body_bytes).unwrap_or(usize::MAX),
            )
            .with_cancellation_token(stop.clone());
        let sdk = StreamableHttpService::new(
            move || Ok(server.clone()),
            Arc::new(NeverSessionManager::default()),
            config,
        );
        Self(Arc::new(Shared { state, sdk, stop }))
    }

    /// Ends what the SDK still streams (server shutdown: the listener is closed).
    pub fn stop(&self) {
        self.0.stop.cancel();
    }

    /// Answers one HTTP request to [`PATH`].
    pub async fn answer<B>(
        &self,
        req: Request<B>,
    ) -> Response<impl warp::hyper::body::Body<Data = Bytes, Error = BodyError> + Send + Sync>
    where
        B: warp::hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let started = Instant::now();
        let addr = req.extensions().get::<ClientAddr>().map(|a| a.0);
        let ctx = RequestContext::from_request(req.headers(), addr);
        let method = req.method().clone();
        let span = tracing::info_span!("request", request_id = %ctx.request_id);
        let mut response = match self.admit(req, &ctx).instrument(span.clone()).await {
            Ok(req) => self
                .0
                .sdk
                .handle(req)
                .instrument(span)
                .await
                .map(Either::Right),
            Err(e) => e.into_response(&ctx.request_id).map(Either::Left),
        };
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            headers.insert("x-request-id", v);
        }
        for (name, value) in crate::edge::SECURITY_HEADERS {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let status = response.status().as_u16();
        METRICS
            .http_requests
            .with_label_values(&[method.as_str(), &status.to_string()])
            .inc();
        tracing::info!(
            method = %method,
            route = PATH,
            status,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            request_id = %ctx.request_id,
            "request"
        );
        response
    }

    /// The request as the SDK gets it: its caller authenticated (an agent), its body
    /// read within the API's limits.
    async fn admit<B>(
        &self,
        req: Request<B>,
        ctx: &RequestContext,
    ) -> Result<Request<Full<Bytes>>, ApiError>
    where
        B: warp::hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let s = &self.0.state;
        if let Some(addr) = ctx.ip.as_deref().and_then(|ip| ip.parse().ok()) {
            s.rate_limits
                .check(ratelimit::Class::of(PATH), addr)
                .map_err(ApiError::too_many_requests)?;
        }
        let authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let authed = crate::routes::authenticate(s, authorization, ctx).await?;
        require_agent(&authed)?;
        let (mut parts, body) = req.into_parts();
        let limit = s.settings.http.max_body_bytes;
        if parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > limit)
        {
            return Err(ApiError::PayloadTooLarge);
        }
        let bytes =
            crate::edge::collect_body(BodyDataStream::new(body), limit, &s.settings.http.timeouts)
                .await?;
        parts.extensions.insert(authed);
        Ok(Request::from_parts(parts, Full::new(bytes)))
    }
}

/// Only an AI agent's key uses MCP: a person, or an integration's key, uses the API.
fn require_agent(a: &Authed) -> Result<(), ApiError> {
    if a.kind == PrincipalKind::AiAgent && a.access.agent_of.is_some() {
        Ok(())
    } else {
        Err(ApiError::Forbidden {
            code: "agent_only",
            message: "the MCP endpoint is for AI agents: register the agent's key with \
                      kind `agent` (POST /v1/api-keys)"
                .into(),
        })
    }
}
