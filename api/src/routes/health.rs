//! `GET /healthz` (alive), `GET /readyz` (dependencies and lag), `GET /metrics`, and
//! `GET /openapi.json` (the API's description, see [`crate::openapi`]).

use crm_infra::feed::{projector, relay};
use crm_infra::metrics::{render, METRICS};
use crm_infra::read_models;
use crm_infra::store::event_store;
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::with_state;
use crate::error::json_response;
use crate::state::AppState;

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, &json!({"status": "ok"}), ""));
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(readyz);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .then(metrics);
    let openapi = warp::path!("openapi.json").and(warp::get()).map(|| {
        warp::reply::with_header(crate::openapi::json(), "content-type", "application/json")
            .into_response()
    });
    healthz
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .or(openapi)
        .unify()
        .boxed()
}

/// Events the relay and each projection have not processed yet.
async fn lags(state: &AppState) -> Result<(i64, Vec<(&'static str, i64)>), String> {
    let client = state.pool.get().await.map_err(|e| e.to_string())?;
    let ck = relay::checkpoint(&client, "main")
        .await
        .map_err(|e| e.to_string())?;
    let relay_lag = event_store::count_after(&client, ck, 1_000_000)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for p in read_models::all() {
        let ck = projector::checkpoint(&client, p.name())
            .await
            .map_err(|e| e.to_string())?;
        let lag = event_store::count_after(&client, ck, 1_000_000)
            .await
            .map_err(|e| e.to_string())?;
        out.push((p.name(), lag));
    }
    Ok((relay_lag, out))
}

async fn readyz(state: AppState) -> Response {
    let pg_ok = match state.pool.get().await {
        Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
        Err(_) => false,
    };
    let nats_ok = state.bus.ping().await;
    let lag = if pg_ok { lags(&state).await.ok() } else { None };
    let ready = pg_ok && nats_ok;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "postgres": if pg_ok { "ok" } else { "unreachable" },
        "nats": if nats_ok { "ok" } else { "unreachable" },
        "relay_lag_events": lag.as_ref().map(|l| l.0),
        "projector_lag_events": lag.as_ref().map(|l| l.1.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body, "")
}

async fn metrics(state: AppState) -> Response {
    if let Ok((relay_lag, projections)) = lags(&state).await {
        METRICS.relay_lag_events.set(relay_lag);
        for (name, lag) in projections {
            METRICS
                .projector_lag_events
                .with_label_values(&[name])
                .set(lag);
        }
    }
    warp::reply::with_header(render(), "content-type", "text/plain; version=0.0.4").into_response()
}
