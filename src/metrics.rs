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
    /// Token expired (4001) or authentication required (4003), CONTRACT §10.
    Auth,
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
    /// A token on the upgrade request that does not verify (401).
    Auth,
}

/// Why a token or a request was refused (`wsbroker_auth_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    /// Malformed, bad signature, wrong claims.
    Invalid,
    /// `exp` (+ leeway) has passed.
    Expired,
    /// No configured key for its `kid` or algorithm.
    UnknownKey,
    /// A subscribe or publish (or a refresh with another `sub`) not permitted.
    Forbidden,
}

impl AuthReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthReason::Invalid => "invalid",
            AuthReason::Expired => "expired",
            AuthReason::UnknownKey => "unknown_key",
            AuthReason::Forbidden => "forbidden",
        }
    }
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
            RejectReason::Auth => "auth",
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
            CloseReason::Auth => "auth",
        }
    }
}

/// Every wsbroker metric, resolved once.
pub struct Metrics {
    /// wsbroker_connections_active
    pub connections_active: Gauge,
    /// wsbroker_connections_opened_total
    pub connections_opened: Counter,
    closed: [Counter; 6],
    rejected: [Counter; 7],
    auth_rejected: [Counter; 4],
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
    /// wsbroker_connections_max (server.max_connections)
    pub connections_max: Gauge,
    /// wsbroker_accept_errors_total (accept(2) failed, e.g. EMFILE)
    pub accept_errors: Counter,
    /// wsbroker_tls_resumed_total (TLS handshakes that resumed a session)
    pub tls_resumed: Counter,
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

    /// The counter of `wsbroker_auth_rejected_total` for a reason.
    pub fn auth_rejected(&self, reason: AuthReason) -> &Counter {
        &self.auth_rejected[reason as usize]
    }
}

/// Latency buckets: 100 µs … 1 s (and a few beyond, for backlogs).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Environment variable that turns metric recording off (`=1`), to measure its cost.
pub const DISABLE_ENV: &str = "WSBROKER_DISABLE_METRICS";

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
    // A benchmarking aid (docs/benchmarks.md): with no recorder installed
    // every handle below is a no-op, which measures what counting costs.
    if std::env::var_os(DISABLE_ENV).is_some_and(|v| v == "1") {
        tracing::warn!("{DISABLE_ENV}=1: metrics are not recorded (benchmarking only)");
    } else {
        // Fails only if another recorder was installed first (a test
        // harness); then our handles simply record into that one.
        let _ = metrics::set_global_recorder(recorder);
    }
    let process = metrics_process::Collector::default();
    process.describe();
    describe();
    let closed = [
        CloseReason::Client,
        CloseReason::IdleTimeout,
        CloseReason::SlowConsumer,
        CloseReason::Shutdown,
        CloseReason::Error,
        CloseReason::Auth,
    ]
    .map(|r| metrics::counter!("wsbroker_connections_closed_total", "reason" => r.as_str()));
    let rejected = [
        RejectReason::Origin,
        RejectReason::Path,
        RejectReason::Limit,
        RejectReason::Timeout,
        RejectReason::Tls,
        RejectReason::BadRequest,
        RejectReason::Auth,
    ]
    .map(|r| metrics::counter!("wsbroker_handshake_rejected_total", "reason" => r.as_str()));
    let auth_rejected = [
        AuthReason::Invalid,
        AuthReason::Expired,
        AuthReason::UnknownKey,
        AuthReason::Forbidden,
    ]
    .map(|r| metrics::counter!("wsbroker_auth_rejected_total", "reason" => r.as_str()));
    let metrics = Metrics {
        connections_active: metrics::gauge!("wsbroker_connections_active"),
        connections_opened: metrics::counter!("wsbroker_connections_opened_total"),
        closed,
        rejected,
        auth_rejected,
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
        connections_max: metrics::gauge!("wsbroker_connections_max"),
        accept_errors: metrics::counter!("wsbroker_accept_errors_total"),
        tls_resumed: metrics::counter!("wsbroker_tls_resumed_total"),
    };
    // Touch every series so a scrape shows zeros from the start.
    for c in metrics
        .closed
        .iter()
        .chain(metrics.rejected.iter())
        .chain(metrics.auth_rejected.iter())
    {
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
        &metrics.accept_errors,
        &metrics.tls_resumed,
    ] {
        c.increment(0);
    }
    metrics.connections_active.set(0.0);
    metrics.subscriptions_active.set(0.0);
    metrics.topics_active.set(0.0);
    metrics::gauge!("wsbroker_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    spawn_upkeep(handle.clone());
    Installed {
        handle,
        metrics,
        process,
    }
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes. `build_recorder` does not spawn the exporter's upkeep task, and
/// without upkeep every latency sample would be kept until the next scrape
/// (unbounded memory on a host that is never scraped).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

fn spawn_upkeep(handle: PrometheusHandle) {
    // A plain thread: the recorder may be installed outside a tokio runtime,
    // and upkeep must not depend on one being alive.
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are folded on scrape only");
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("wsbroker_connections_active", "Open WebSocket connections.");
    describe_counter!(
        "wsbroker_connections_opened_total",
        "WebSocket connections opened (upgrade completed)."
    );
    describe_counter!(
        "wsbroker_connections_closed_total",
        "WebSocket connections closed, by reason."
    );
    describe_counter!(
        "wsbroker_handshake_rejected_total",
        "Connections refused before the upgrade, by reason."
    );
    describe_gauge!(
        "wsbroker_subscriptions_active",
        "Active subscriptions across all connections."
    );
    describe_gauge!("wsbroker_topics_active", "Distinct subscribed patterns.");
    describe_counter!(
        "wsbroker_messages_published_total",
        "Messages accepted for publishing, by source."
    );
    describe_counter!(
        "wsbroker_messages_delivered_total",
        "Message frames written to subscriber sockets."
    );
    describe_counter!(
        "wsbroker_messages_dropped_total",
        "Messages dropped from outbound queues, by reason."
    );
    describe_counter!(
        "wsbroker_bytes_received_total",
        Unit::Bytes,
        "WebSocket payload bytes received from clients."
    );
    describe_counter!(
        "wsbroker_bytes_sent_total",
        Unit::Bytes,
        "WebSocket payload bytes sent to clients."
    );
    describe_histogram!("wsbroker_delivery_latency_seconds", Unit::Seconds, "Publish accepted to frame written to the socket (one sample per write batch: its oldest frame).");
    describe_gauge!(
        "wsbroker_build_info",
        "Always 1; the version label says which build runs."
    );
    describe_gauge!(
        "wsbroker_tls_cert_not_after_seconds",
        Unit::Seconds,
        "Expiry (notAfter) of the served TLS leaf certificate, Unix time; 0 until known."
    );
    describe_gauge!(
        "wsbroker_connections_max",
        "The server.max_connections limit."
    );
    describe_counter!(
        "wsbroker_auth_rejected_total",
        "Tokens and requests refused by authentication or permissions (CONTRACT §10), by reason."
    );
    describe_counter!(
        "wsbroker_auth_jwks_fetches_total",
        "Fetches of auth.jwks_url (start, jwks_refresh, unknown kid)."
    );
    describe_counter!(
        "wsbroker_auth_jwks_fetch_errors_total",
        "Failed fetches of auth.jwks_url (the last good key set is kept)."
    );
    describe_counter!(
        "wsbroker_accept_errors_total",
        "accept(2) failures on the wss listeners (EMFILE, ENFILE, ENOBUFS, ...)."
    );
    describe_counter!(
        "wsbroker_tls_resumed_total",
        "TLS handshakes that resumed a session (a session ticket), skipping the certificate exchange."
    );
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

/// Publishes `server.max_connections` as `wsbroker_connections_max`, so
/// alerts can compare `wsbroker_connections_active` against it.
pub fn record_max_connections(m: &Metrics, max: usize) {
    m.connections_max.set(max as f64);
}

/// Sets `wsbroker_tls_cert_not_after_seconds` from the served chain (leaf
/// first); an empty chain or an unparsable leaf leaves the gauge unchanged.
pub fn record_tls_cert(m: &Metrics, chain: &[impl AsRef<[u8]>]) {
    if let Some(not_after) = chain.first().and_then(|leaf| cert_not_after(leaf.as_ref())) {
        m.tls_cert_not_after.set(not_after as f64);
    }
}

/// The notAfter of a DER X.509 certificate as Unix seconds, by a minimal DER
/// walk: Certificate → tbsCertificate → [version] serial signature issuer
/// validity → notAfter (UTCTime or GeneralizedTime, `Z` form as RFC 5280
/// requires). `None` for anything malformed.
pub fn cert_not_after(der: &[u8]) -> Option<i64> {
    use crate::der::{tbs_fields, tlv, SEQUENCE};
    let [serial, signature, issuer, validity, ..] = tbs_fields(der)?;
    // serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name.
    if serial.tag != 0x02 || signature.tag != SEQUENCE || issuer.tag != SEQUENCE {
        return None;
    }
    if validity.tag != SEQUENCE {
        return None;
    }
    let (_, _, after) = tlv(validity.contents)?; // notBefore
    let (tag, time, _) = tlv(after)?;
    parse_x509_time(tag, time)
}

/// UTCTime (0x17, `YYMMDDHHMMSSZ`) or GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`).
fn parse_x509_time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match (tag, text.len()) {
        (0x17, 13) => {
            let yy = digits(&text[..2])?;
            // RFC 5280 4.1.2.5.1: YY >= 50 is 19YY, else 20YY.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (0x18, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let hour = digits(&rest[4..6])?;
    let minute = digits(&rest[6..8])?;
    let second = digits(&rest[8..10])?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Records one delivery latency sample.
pub fn observe_latency(m: &Metrics, latency: Duration) {
    m.delivery_latency.record(latency.as_secs_f64());
}

/// The cluster's series (CONTRACT §7, §11), registered only when
/// `cluster.nats_url` is set, so a single node exports none of them.
pub struct ClusterMetrics {
    /// wsbroker_cluster_connected
    pub connected: Gauge,
    /// wsbroker_cluster_subscriptions
    pub subscriptions: Gauge,
    /// wsbroker_cluster_messages_sent_total
    pub sent: Counter,
    /// wsbroker_cluster_messages_received_total
    pub received: Counter,
    /// wsbroker_cluster_reconnects_total
    pub reconnects: Counter,
    /// wsbroker_cluster_errors_total{reason="publish_failed"}
    pub publish_failed: Counter,
    /// wsbroker_cluster_errors_total{reason="slow_consumer"}
    pub slow_consumer: Counter,
    /// wsbroker_cluster_errors_total{reason="bad_payload"}
    pub bad_payload: Counter,
}

static CLUSTER: OnceLock<ClusterMetrics> = OnceLock::new();

/// The cluster's metric handles, registered (at zero) on first use.
pub fn cluster_metrics() -> &'static ClusterMetrics {
    CLUSTER.get_or_init(|| {
        // The recorder must be installed before the handles are resolved.
        let _ = metrics();
        use metrics::{describe_counter, describe_gauge};
        describe_gauge!(
            "wsbroker_cluster_connected",
            "1 while the NATS link is up, 0 otherwise."
        );
        describe_gauge!(
            "wsbroker_cluster_subscriptions",
            "NATS subscriptions this node holds (one per distinct local pattern)."
        );
        describe_counter!(
            "wsbroker_cluster_messages_sent_total",
            "Messages published to NATS."
        );
        describe_counter!(
            "wsbroker_cluster_messages_received_total",
            "Messages received from NATS for delivery (once per message, however many subscriptions matched)."
        );
        describe_counter!(
            "wsbroker_cluster_reconnects_total",
            "Times the NATS link came back after being lost."
        );
        describe_counter!(
            "wsbroker_cluster_errors_total",
            "Cluster messages lost, by reason."
        );
        let error = |r: &'static str| metrics::counter!("wsbroker_cluster_errors_total", "reason" => r);
        let m = ClusterMetrics {
            connected: metrics::gauge!("wsbroker_cluster_connected"),
            subscriptions: metrics::gauge!("wsbroker_cluster_subscriptions"),
            sent: metrics::counter!("wsbroker_cluster_messages_sent_total"),
            received: metrics::counter!("wsbroker_cluster_messages_received_total"),
            reconnects: metrics::counter!("wsbroker_cluster_reconnects_total"),
            publish_failed: error("publish_failed"),
            slow_consumer: error("slow_consumer"),
            bad_payload: error("bad_payload"),
        };
        m.connected.set(0.0);
        m.subscriptions.set(0.0);
        for c in [
            &m.sent,
            &m.received,
            &m.reconnects,
            &m.publish_failed,
            &m.slow_consumer,
            &m.bad_payload,
        ] {
            c.increment(0);
        }
        m
    })
}
