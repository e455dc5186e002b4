//! Prometheus metrics of this process.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub commands: IntCounterVec,
    pub conflicts: IntCounterVec,
    pub command_seconds: HistogramVec,
    pub append_seconds: Histogram,
    pub relay_published: prometheus::IntCounter,
    pub relay_lag_events: IntGauge,
    pub projector_applied: IntCounterVec,
    pub projector_lag_events: IntGaugeVec,
    /// Events a projector read from the store rather than from a message: catching up
    /// at the start of a session, or filling a gap in a batch.
    pub projector_from_store: IntCounterVec,
    pub projector_caught_up: prometheus::IntCounter,
    pub projector_gap_filled: prometheus::IntCounter,
    pub http_requests: IntCounterVec,
    /// Requests given up at the edge for being too slow, by stage (`head`, `body`).
    pub http_timeouts: IntCounterVec,
    pub access_lookups: IntCounterVec,
    /// `access_lookups` by source, resolved once (counted on every staff request).
    pub access_from_cache: prometheus::IntCounter,
    pub access_from_database: prometheus::IntCounter,
}

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let commands = IntCounterVec::new(
        Opts::new(
            "crm_commands_total",
            "Commands handled, by aggregate and outcome",
        ),
        &["aggregate", "outcome"],
    )
    .expect("metric");
    let conflicts = IntCounterVec::new(
        Opts::new(
            "crm_command_conflicts_total",
            "Optimistic concurrency conflicts",
        ),
        &["aggregate"],
    )
    .expect("metric");
    let command_seconds = HistogramVec::new(
        HistogramOpts::new("crm_command_duration_seconds", "Command latency")
            .buckets(BUCKETS.to_vec()),
        &["aggregate"],
    )
    .expect("metric");
    let append_seconds = Histogram::with_opts(
        HistogramOpts::new("crm_append_duration_seconds", "Event store append latency")
            .buckets(BUCKETS.to_vec()),
    )
    .expect("metric");
    let relay_published =
        prometheus::IntCounter::new("crm_relay_published_total", "Events published to JetStream")
            .expect("metric");
    let relay_lag_events = IntGauge::new(
        "crm_relay_lag_events",
        "Committed events not yet published by the relay",
    )
    .expect("metric");
    let projector_applied = IntCounterVec::new(
        Opts::new(
            "crm_projector_applied_total",
            "Events applied, by projection",
        ),
        &["projection"],
    )
    .expect("metric");
    let projector_lag_events = IntGaugeVec::new(
        Opts::new(
            "crm_projector_lag_events",
            "Committed events a projection has not applied",
        ),
        &["projection"],
    )
    .expect("metric");
    let projector_from_store = IntCounterVec::new(
        Opts::new(
            "crm_projector_store_reads_total",
            "Events projectors read from the store instead of a message, by reason (catch_up, gap)",
        ),
        &["reason"],
    )
    .expect("metric");
    let http_timeouts = IntCounterVec::new(
        Opts::new(
            "crm_http_timeouts_total",
            "Requests given up for being too slow, by stage (head, body)",
        ),
        &["stage"],
    )
    .expect("metric");
    let http_requests = IntCounterVec::new(
        Opts::new(
            "crm_http_requests_total",
            "HTTP requests, by method and status",
        ),
        &["method", "status"],
    )
    .expect("metric");
    let access_lookups = IntCounterVec::new(
        Opts::new(
            "crm_access_lookups_total",
            "Who-may-do-what lookups of staff requests, by source (cache or database)",
        ),
        &["source"],
    )
    .expect("metric");
    for c in [
        Box::new(commands.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(conflicts.clone()),
        Box::new(command_seconds.clone()),
        Box::new(append_seconds.clone()),
        Box::new(relay_published.clone()),
        Box::new(relay_lag_events.clone()),
        Box::new(projector_applied.clone()),
        Box::new(projector_lag_events.clone()),
        Box::new(http_requests.clone()),
        Box::new(access_lookups.clone()),
        Box::new(projector_from_store.clone()),
        Box::new(http_timeouts.clone()),
    ] {
        registry.register(c).expect("metric registered once");
    }
    Metrics {
        registry,
        commands,
        conflicts,
        command_seconds,
        append_seconds,
        relay_published,
        relay_lag_events,
        projector_applied,
        projector_lag_events,
        projector_caught_up: projector_from_store.with_label_values(&["catch_up"]),
        projector_gap_filled: projector_from_store.with_label_values(&["gap"]),
        projector_from_store,
        http_requests,
        http_timeouts,
        access_from_cache: access_lookups.with_label_values(&["cache"]),
        access_from_database: access_lookups.with_label_values(&["database"]),
        access_lookups,
    }
});

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut buf)
        .expect("text encoding never fails");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}
