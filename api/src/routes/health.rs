//! `GET /healthz` (alive), `GET /readyz` (dependencies and lag), `GET /metrics`, and
//! `GET /openapi.json` (the API's description, see [`crate::openapi`]).

use std::collections::btree_map::{BTreeMap, Entry};

use crm_infra::feed::{projector, relay};
use crm_infra::metrics::{render, METRICS};
use crm_infra::read_models;
use crm_infra::store::event_store;
use serde::Serialize;
use utoipa::ToSchema;
use warp::http::StatusCode;
use warp::Reply;

use crate::edge::reply::{Ok200, RawAs, RawDoc};
use crate::edge::route::OpDoc;
use crate::error::ApiError;
use crate::state::AppState;

/// The process answers.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// Always `ok`.
    status: String,
}

pub(crate) async fn healthz(_s: AppState) -> Result<Ok200<Health>, ApiError> {
    Ok(Ok200(Health {
        status: "ok".into(),
    }))
}

/// Whether the service can work, and how far behind its workers are.
#[derive(Serialize, ToSchema)]
pub(crate) struct Ready {
    /// `ready` or `not_ready`.
    status: String,
    /// `ok` or `unreachable`.
    postgres: String,
    /// `ok` or `unreachable`.
    nats: String,
    /// Committed events the relay has not published yet (null when unknown).
    relay_lag_events: Option<i64>,
    /// Per read model, events not applied yet (null when unknown).
    #[schema(value_type = Option<std::collections::BTreeMap<String, i64>>)]
    projector_lag_events: Option<std::collections::BTreeMap<String, i64>>,
}

pub(crate) struct ReadyDoc;

impl RawDoc for ReadyDoc {
    fn document(doc: &mut OpDoc) {
        let schema = doc.schema::<Ready>();
        doc.success(200, "Ready", Some(("application/json", schema.clone())));
        doc.success(
            503,
            "Not ready: PostgreSQL or NATS unreachable",
            Some(("application/json", schema)),
        );
    }
}

pub(crate) struct MetricsDoc;

impl RawDoc for MetricsDoc {
    fn document(doc: &mut OpDoc) {
        doc.success(
            200,
            "Prometheus text exposition format",
            Some((
                "text/plain",
                schema_of_type(utoipa::openapi::schema::Type::String),
            )),
        );
    }
}

pub(crate) struct OpenApiDoc;

impl RawDoc for OpenApiDoc {
    fn document(doc: &mut OpDoc) {
        doc.success(
            200,
            "The OpenAPI 3.1 document",
            Some((
                "application/json",
                schema_of_type(utoipa::openapi::schema::Type::Object),
            )),
        );
    }
}

fn schema_of_type(
    t: utoipa::openapi::schema::Type,
) -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(t)
            .build(),
    ))
}

pub(crate) async fn openapi(_s: AppState) -> Result<RawAs<OpenApiDoc>, ApiError> {
    Ok(RawAs::new(
        warp::reply::with_header(crate::openapi::json(), "content-type", "application/json")
            .into_response(),
    ))
}

/// Events the relay and each projection have not processed yet.
///
/// Counted once per distinct checkpoint: each count walks every event after its
/// checkpoint (up to a million), and the relay's and the projections' checkpoints
/// mostly stand at one or two points (one worker moves its read models together). A
/// probe or a scrape during a long catch-up then reads the backlog once or twice, not
/// once per read model, and takes that much less from the catching up.
async fn lags(state: &AppState) -> Result<(i64, Vec<(&'static str, i64)>), String> {
    let client = state.pool.get().await.map_err(|e| e.to_string())?;
    let relay = relay::checkpoint(&client, "main")
        .await
        .map_err(|e| e.to_string())?;
    let mut projections = Vec::new();
    for p in read_models::all() {
        let ck = projector::checkpoint(&client, p.name())
            .await
            .map_err(|e| e.to_string())?;
        projections.push((p.name(), ck));
    }
    let mut lag_after = BTreeMap::new();
    for ck in std::iter::once(relay).chain(projections.iter().map(|(_, ck)| *ck)) {
        if let Entry::Vacant(slot) = lag_after.entry(ck) {
            let lag = event_store::count_after(&client, ck, 1_000_000)
                .await
                .map_err(|e| e.to_string())?;
            slot.insert(lag);
        }
    }
    Ok((
        lag_after[&relay],
        projections
            .into_iter()
            .map(|(name, ck)| (name, lag_after[&ck]))
            .collect(),
    ))
}

pub(crate) async fn readyz(state: AppState) -> Result<RawAs<ReadyDoc>, ApiError> {
    let pg_ok = match state.pool.get().await {
        Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
        Err(_) => false,
    };
    let nats_ok = state.bus.ping().await;
    let lag = if pg_ok { lags(&state).await.ok() } else { None };
    let ready = pg_ok && nats_ok;
    let body = Ready {
        status: if ready { "ready" } else { "not_ready" }.into(),
        postgres: if pg_ok { "ok" } else { "unreachable" }.into(),
        nats: if nats_ok { "ok" } else { "unreachable" }.into(),
        relay_lag_events: lag.as_ref().map(|l| l.0),
        projector_lag_events: lag
            .as_ref()
            .map(|l| l.1.iter().map(|(n, v)| (n.to_string(), *v)).collect()),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(RawAs::new(
        warp::reply::with_status(warp::reply::json(&body), status).into_response(),
    ))
}

pub(crate) async fn metrics(state: AppState) -> Result<RawAs<MetricsDoc>, ApiError> {
    if let Ok((relay_lag, projections)) = lags(&state).await {
        METRICS.relay_lag_events.set(relay_lag);
        for (name, lag) in projections {
            METRICS
                .projector_lag_events
                .with_label_values(&[name])
                .set(lag);
        }
    }
    Ok(RawAs::new(
        warp::reply::with_header(render(), "content-type", "text/plain; version=0.0.4")
            .into_response(),
    ))
}
