//! Metric names and pre-registered handles (CONTRACT §7), in one place.
//!
//! The Prometheus recorder is installed once per process; handles are
//! resolved once, so the hot path only does atomic adds (never a map lookup).
//! Label values are a closed set: no topic names or addresses as labels.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Why a connection ended (the `reason` label of `connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed or went away.
    Client,
    /// No frame from the client within `idle_timeout`.
    IdleTimeout,
    /// Outbound queue overflow under `overflow = "disconnect"`.
    SlowConsumer,
    /// Server shutdown.
    Shutdown,
    /// Protocol, I/O or policy error.
    Error,
}

/// Why a handshake was refused (the `reason` label of `handshake_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Origin not allowed or missing.
    Origin,
    /// Wrong path.
    Path,
    /// max_connections or max_connections_per_ip.
    Limit,
    /// handshake_timeout expired.
    Timeout,
    /// TLS handshake failed.
    Tls,
    /// Not a valid WebSocket upgrade.
    BadRequest,
}

impl RejectReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Origin => "origin",
            RejectReason::Path => "path",
            RejectReason::Limit => "limit",
            RejectReason::Timeout => "timeout",
            RejectReason::Tls => "tls",
            RejectReason::BadRequest => "bad_request",
        }
    }
}

impl CloseReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
        }
    }
}

/// Every wsbroker metric, resolved once.
pub struct Metrics {
    /// wsbroker_connections_active
    pub connections_active: Gauge,
    /// wsbroker_connections_opened_total
    pub connections_opened: Counter,
    closed: [Counter; 5],
    rejected: [Counter; 6],
    /// wsbroker_subscriptions_active
    pub subscriptions_active: Gauge,
    /// wsbroker_topics_active
    pub topics_active: Gauge,
    /// wsbroker_messages_published_total{source="ws"}
    pub published_ws: Counter,
    /// wsbroker_messages_published_total{source="http"}
    pub published_http: Counter,
    /// wsbroker_messages_delivered_total
    pub delivered: Counter,
    /// wsbroker_messages_dropped_total{reason="queue_full"}
    pub dropped_queue_full: Counter,
    /// wsbroker_bytes_received_total
    pub bytes_received: Counter,
    /// wsbroker_bytes_sent_total
    pub bytes_sent: Counter,
    /// wsbroker_delivery_latency_seconds
    pub delivery_latency: Histogram,
    /// wsbroker_tls_cert_not_after_seconds
    pub tls_cert_not_after: Gauge,
}

impl Metrics {
    /// The counter for a close reason.
    pub fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[reason as usize]
    }

    /// The counter for a rejection reason.
    pub fn rejected(&self, reason: RejectReason) -> &Counter {
        &self.rejected[reason as usize]
    }
}

/// Latency buckets: 100 µs … 1 s (and a few beyond, for backlogs).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

struct Installed {
    handle: PrometheusHandle,
    metrics: Metrics,
    process: metrics_process::Collector,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

fn install() -> Installed {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("wsbroker_delivery_latency_seconds".into()),
            LATENCY_BUCKETS,
        )
        .unwrap_or_else(|_| PrometheusBuilder::new());
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    // Fails only if another recorder was installed first (a test harness);
    // then our handles simply record into that one.
    let _ = metrics::set_global_recorder(recorder);
    let process = metrics_process::Collector::default();
    process.describe();
    describe();
    let closed = [
        CloseReason::Client,
        CloseReason::IdleTimeout,
        CloseReason::SlowConsumer,
        CloseReason::Shutdown,
        CloseReason::Error,
    ]
    .map(|r| metrics::counter!("wsbroker_connections_closed_total", "reason" => r.as_str()));
    let rejected = [
        RejectReason::Origin,
        RejectReason::Path,
        RejectReason::Limit,
        RejectReason::Timeout,
        RejectReason::Tls,
        RejectReason::BadRequest,
    ]
    .map(|r| metrics::counter!("wsbroker_handshake_rejected_total", "reason" => r.as_str()));
    let metrics = Metrics {
        connections_active: metrics::gauge!("wsbroker_connections_active"),
        connections_opened: metrics::counter!("wsbroker_connections_opened_total"),
        closed,
        rejected,
        subscriptions_active: metrics::gauge!("wsbroker_subscriptions_active"),
        topics_active: metrics::gauge!("wsbroker_topics_active"),
        published_ws: metrics::counter!("wsbroker_messages_published_total", "source" => "ws"),
        published_http: metrics::counter!("wsbroker_messages_published_total", "source" => "http"),
        delivered: metrics::counter!("wsbroker_messages_delivered_total"),
        dropped_queue_full: metrics::counter!("wsbroker_messages_dropped_total", "reason" => "queue_full"),
        bytes_received: metrics::counter!("wsbroker_bytes_received_total"),
        bytes_sent: metrics::counter!("wsbroker_bytes_sent_total"),
        delivery_latency: metrics::histogram!("wsbroker_delivery_latency_seconds"),
        tls_cert_not_after: metrics::gauge!("wsbroker_tls_cert_not_after_seconds"),
    };
    // Touch every series so a scrape shows zeros from the start.
    for c in metrics.closed.iter().chain(metrics.rejected.iter()) {
        c.increment(0);
    }
    for c in [
        &metrics.connections_opened,
        &metrics.published_ws,
        &metrics.published_http,
        &metrics.delivered,
        &metrics.dropped_queue_full,
        &metrics.bytes_received,
        &metrics.bytes_sent,
    ] {
        c.increment(0);
    }
    metrics.connections_active.set(0.0);
    metrics.subscriptions_active.set(0.0);
    metrics.topics_active.set(0.0);
    metrics::gauge!("wsbroker_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Installed {
        handle,
        metrics,
        process,
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("wsbroker_connections_active", "Open WebSocket connections.");
    describe_counter!("wsbroker_connections_opened_total", "WebSocket connections opened (upgrade completed).");
    describe_counter!("wsbroker_connections_closed_total", "WebSocket connections closed, by reason.");
    describe_counter!("wsbroker_handshake_rejected_total", "Connections refused before the upgrade, by reason.");
    describe_gauge!("wsbroker_subscriptions_active", "Active subscriptions across all connections.");
    describe_gauge!("wsbroker_topics_active", "Distinct subscribed patterns.");
    describe_counter!("wsbroker_messages_published_total", "Messages accepted for publishing, by source.");
    describe_counter!("wsbroker_messages_delivered_total", "Message frames written to subscriber sockets.");
    describe_counter!("wsbroker_messages_dropped_total", "Messages dropped from outbound queues, by reason.");
    describe_counter!("wsbroker_bytes_received_total", Unit::Bytes, "WebSocket payload bytes received from clients.");
    describe_counter!("wsbroker_bytes_sent_total", Unit::Bytes, "WebSocket payload bytes sent to clients.");
    describe_histogram!("wsbroker_delivery_latency_seconds", Unit::Seconds, "Publish accepted to frame written to the socket (one sample per write batch: its oldest frame).");
    describe_gauge!("wsbroker_build_info", "Always 1; the version label says which build runs.");
    describe_gauge!("wsbroker_tls_cert_not_after_seconds", Unit::Seconds, "Expiry of the served TLS certificate (Unix time).");
}

/// The process-wide metric handles (installs the recorder on first use).
pub fn metrics() -> &'static Metrics {
    &INSTALLED.get_or_init(install).metrics
}

/// Renders the Prometheus text exposition, refreshing process metrics first.
pub fn render() -> String {
    let installed = INSTALLED.get_or_init(install);
    installed.process.collect();
    installed.handle.run_upkeep();
    installed.handle.render()
}

/// Records one delivery latency sample.
pub fn observe_latency(m: &Metrics, latency: Duration) {
    m.delivery_latency.record(latency.as_secs_f64());
}
