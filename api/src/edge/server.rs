//! The HTTP server loop: hyper, with the edge's time limits, serving the one edge
//! filter ([`super::serve`]) and, at `/mcp`, the MCP endpoint ([`crate::mcp`]), which
//! reads its bodies with the same limits.
//!
//! - A request's head must arrive within `head` (hyper's header read timeout): a client
//!   that trickles its headers, or never sends them, has its connection closed, and
//!   `crm_http_timeouts_total{stage="head"}` counts it.
//! - A body is read with `body_read` between reads and `body_total` in all (the edge's
//!   body reader answers 408 `request_timeout`, stage `body`).
//! - On shutdown the listener closes at once, connections finish the request in hand
//!   (idle ones close), and after `shutdown_grace` whatever is left is dropped: the
//!   process never waits on a stalled client. What a dropped request committed is in
//!   the store; it was never acknowledged to the client.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use crm_infra::metrics::METRICS;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::config::HttpTimeouts;

/// The client's address, as the edge reads it (`warp::ext::optional`).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// Whether a connection ended because its client was too slow with a request head.
fn is_head_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Serves `routes`, and `mcp` at its path, on `listener` until `shutdown`, then drains
/// within the grace period.
pub async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    mcp: crate::mcp::Endpoint,
    timeouts: HttpTimeouts,
    shutdown: impl Future<Output = ()>,
) {
    let api = warp::service(routes);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.head)
        .keep_alive(true);
    let builder = builder.http1_only();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (api, mcp) = (api.clone(), mcp.clone());
        // Every request carries its peer's address; `/mcp` goes to the MCP endpoint,
        // everything else to the edge's filter. Both answer every request.
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ClientAddr(addr));
            let (mut api, mcp) = (api.clone(), mcp.clone());
            async move {
                if req.uri().path() == crate::mcp::http::PATH {
                    return Ok::<_, Infallible>(mcp.answer(req).await.map(Either::Right));
                }
                // warp's service is always ready: no `poll_ready` to wait for.
                let response = tower_service::Service::call(&mut api, req).await?;
                Ok(response.map(Either::Left))
            }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if is_head_timeout(&*e) {
                    METRICS.http_timeouts.with_label_values(&["head"]).inc();
                } else {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    // What the MCP endpoint still streams ends now, as the API's requests do.
    mcp.stop();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(timeouts.shutdown_grace) => {
            tracing::warn!(
                grace_ms = timeouts.shutdown_grace.as_millis() as u64,
                "shutdown grace period over: closing the connections still open"
            );
        }
    }
}
