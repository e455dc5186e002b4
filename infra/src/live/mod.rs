//! The live event stream's hub: one per process, fed by one JetStream consumer, fanning
//! the organisation's public events out to every connected client (`GET
//! /v1/events/stream`, docs/live.md).
//!
//! - [`hub`]: the consumer task, the ring of recent events, the subscribers per
//!   organisation with their bounded buffers, the per-organisation connection limit;
//! - [`event`]: one event as the hub holds it: decoded at most once per process,
//!   shaped at most once per distinct policy (the SSE frame is shared);
//! - [`catch_up`]: an organisation's events after a commit key read from the store,
//!   for a resume older than the ring.
//!
//! Invariants:
//! - order: events are delivered in the store's commit order `(tx_id, global_position)`,
//!   the order the relay publishes and the projectors apply; the SSE id is the event's
//!   global position and a resume maps it back to its commit key, so a resume is
//!   "strictly after that event in commit order";
//! - no gap, no duplicate at a resume: a client joins the live tail only when the ring
//!   provably holds every event after its commit key (everything after the last
//!   evicted event, or everything published since the consumer started and its last
//!   store read began after that); until then it reads the store, below the visibility
//!   horizon (a prefix of commit order), and every event at or below the last key it
//!   sent is skipped;
//! - the consumer is an ordered (gap-checked, self-recreating) ephemeral pull consumer,
//!   not a core subscription: a core subscription silently loses what arrives while
//!   NATS reconnects or while the client is slow, which would leave holes in the ring.
//!   If the consumer fails anyway, every subscriber is cut off (they resume from the
//!   store) and the ring starts again empty;
//! - nothing slows the hub: a subscriber whose buffer is full is dropped on the spot
//!   (`try_send`), and told why when it next reads;
//! - tenancy: subscribers are keyed by organisation, the store is read by organisation;
//!   an event reaches only the connections of its own organisation;
//! - deny by default: only catalogue events are kept (`crm_domain::public_events`), and
//!   each is shaped by the connection's own policy (a type it may not read is never
//!   sent); nothing personal is logged.

pub mod catch_up;
pub mod event;
pub mod hub;

use std::time::Duration;

pub use hub::{CutReason, Hub, Join, Permit, Subscription};

/// The hub's settings (`crm serve --live-*`, `CRM_LIVE_*`; docs/live.md).
#[derive(Clone, Copy, Debug)]
pub struct LiveSettings {
    /// Recent catalogue events kept in memory for resumes (all organisations).
    pub ring_events: usize,
    /// Events a connection may have waiting before it is cut off as too slow.
    pub buffer_events: usize,
    /// How often an idle stream sends a comment line.
    pub heartbeat: Duration,
    /// Open streams per organisation (across this process).
    pub max_per_org: usize,
    /// Events per store read of a catch-up.
    pub catch_up_page: i64,
    /// How long the hub keeps consuming the feed after the last following stream
    /// closed (a reconnect within it resumes from the ring).
    pub idle_stop: Duration,
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            ring_events: 10_000,
            buffer_events: 1_024,
            heartbeat: Duration::from_secs(15),
            max_per_org: 100,
            catch_up_page: 500,
            idle_stop: Duration::from_secs(60),
        }
    }
}

/// The live stream's metrics, registered with the process's registry
/// ([`crate::metrics::METRICS`]) on first use.
pub(crate) struct LiveMetrics {
    /// `crm_live_connections`: streams open in this process.
    pub connections: prometheus::IntGauge,
    /// `crm_live_cutoffs_total`: streams cut off because their client read too slowly.
    pub cutoffs: prometheus::IntCounter,
    /// `crm_live_feed_consuming`: 1 while the hub reads the feed (a stream follows it,
    /// or did within `idle_stop`).
    pub consuming: prometheus::IntGauge,
}

pub(crate) static LIVE_METRICS: std::sync::LazyLock<LiveMetrics> = std::sync::LazyLock::new(|| {
    let connections = prometheus::IntGauge::new("crm_live_connections", "Open live event streams")
        .expect("metric");
    let cutoffs = prometheus::IntCounter::new(
        "crm_live_cutoffs_total",
        "Live event streams cut off because their client read too slowly",
    )
    .expect("metric");
    let consuming = prometheus::IntGauge::new(
        "crm_live_feed_consuming",
        "1 while the live event stream's hub reads the feed",
    )
    .expect("metric");
    let registry = &crate::metrics::METRICS.registry;
    let _ = registry.register(Box::new(connections.clone()));
    let _ = registry.register(Box::new(cutoffs.clone()));
    let _ = registry.register(Box::new(consuming.clone()));
    LiveMetrics {
        connections,
        cutoffs,
        consuming,
    }
});
