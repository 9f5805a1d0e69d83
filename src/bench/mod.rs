//! `wsbroker bench`: the load generator of contract §8.
//!
//! It opens subscribers (subscriber `j` on topic `bench.t{j % topics}`, plus
//! optional wildcard subscribers on `bench.>`), then publishers, with bounded
//! connection concurrency; every connection counts as open only once its
//! subscribe ack arrived. Publishers then send for `--duration` at a fixed
//! total rate (or as fast as the socket takes, `--rate max`), each message
//! carrying its send time; subscribers record `now - send time` in a latency
//! histogram. After publishing stops the bench waits until every expected
//! delivery arrived or nothing arrived for 5 s, and returns a [`BenchReport`].
//!
//! The client shares the machine with the server, so it is kept cheap:
//! subscribers are read by a few receiver threads with hand-parsed frames
//! (see [`receiver`]), no JSON parsing on the receive path (the timestamp is
//! found by a byte search), per-connection counters that are stored, not
//! contended, and one latency histogram per receiver thread.
//!
//! TLS session resumption is disabled so every connection pays a full
//! handshake, as in the reference measurements (PEERS.md).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, ClientError, ClientOptions, Target};

mod receiver;
pub mod reconnect;

use receiver::{Inlets, Receivers};

/// Above this many connections the sources are spread over 127.0.0.1–250
/// (one source address has ~28k ephemeral ports, shared with TIME_WAIT
/// leftovers of earlier runs).
const SPREAD_THRESHOLD: usize = 10_000;
/// Number of 127.0.0.x source addresses used when spreading.
const SPREAD_ADDRS: usize = 250;
/// Subscribe ack wait per connection.
const SUB_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Stop waiting for the remaining deliveries after this long without progress.
const DRAIN_IDLE: Duration = Duration::from_secs(5);
/// Highest latency the histograms track, in microseconds (1 hour).
const LAT_MAX_US: u64 = 3_600_000_000;
/// Messages fed per flush by a `--rate max` publisher.
const MAX_RATE_BATCH: usize = 256;
/// Cap on messages a paced publisher sends per tick when it fell behind.
const PACED_MAX_BATCH: u64 = 4096;

/// Pause before publishing when subscribers are spread over several
/// `--url`s (cluster nodes), for their NATS interest to propagate.
const CLUSTER_SETTLE: Duration = Duration::from_secs(1);

/// Resolves every `--url` for subscribers (the first one is `first`).
async fn sub_targets(args: &BenchArgs, first: &Target) -> Result<Vec<Target>, BenchError> {
    let mut targets = vec![first.clone()];
    for url in args.client.all_urls().iter().skip(1) {
        let mut t = Target::resolve(url).await?;
        t.addrs.sort_by_key(|a| !a.is_ipv4());
        targets.push(t);
    }
    Ok(targets)
}

/// Arguments of `wsbroker bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Connection options (URL, origin, trust, token).
    #[command(flatten)]
    pub client: ClientOptions,
    /// Subscribers; subscriber j subscribes to bench.t{j % topics}
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publisher connections; each round-robins over its share of the topics
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Number of topics bench.t0 … bench.t{K-1}
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Total publish rate in messages/s across all publishers (split evenly), or "max"
    #[arg(long, default_value = "1000")]
    pub rate: String,
    /// Size in bytes of each message's data string (at least the timestamp fits)
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// How long to publish, e.g. 10s, 500ms, 1m
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Only open N idle connections (each subscribes to one topic) and report connect figures
    #[arg(long, value_name = "N")]
    pub connections_only: Option<usize>,
    /// With --connections-only: keep them open this long before reporting (e.g. 30s)
    #[arg(long, default_value = "0s")]
    pub hold: String,
    /// Also subscribe this many extra subscribers to the wildcard `bench.>`
    #[arg(long, default_value_t = 0)]
    pub wildcard_subscribers: usize,
    /// Each subscriber also holds this many subscriptions that are never
    /// published to (every tenth a `*` pattern), to grow the server's index
    /// without more connections
    #[arg(long, default_value_t = 0)]
    pub extra_subscriptions: usize,
    /// Read the server's RSS (/proc/PID/status) and CPU (/proc/PID/stat)
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Concurrent connection attempts while opening
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Threads reading the subscribers' sockets
    #[arg(long, default_value_t = 1)]
    pub receiver_threads: usize,
    /// With --connections-only N: a reconnect storm. Open N connections
    /// (full TLS handshakes, each keeping its session ticket), close them
    /// all, reopen each with its saved session; report both storms
    #[arg(long, requires = "connections_only")]
    pub reconnect: bool,
}

/// Why a bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag has an unusable value.
    #[error("--{flag}: {reason}")]
    Usage {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Setting up the client failed (URL, trust, …).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Not a single connection could be opened.
    #[error("all {attempts} connection attempts failed; first error: {first_error}")]
    AllConnectsFailed {
        /// Connections tried.
        attempts: usize,
        /// The first failure seen.
        first_error: String,
    },
    /// Subscribers connected but no publisher did.
    #[error("no publisher could connect; first error: {0}")]
    NoPublisher(String),
}

impl BenchError {
    /// True for mistakes in the command line, reported with exit code 2.
    pub fn is_usage(&self) -> bool {
        match self {
            BenchError::Usage { .. } => true,
            BenchError::Client(e) => e.is_usage(),
            _ => false,
        }
    }
}

/// Latency percentiles in milliseconds (microsecond resolution).
#[derive(Debug, Default, Serialize)]
pub struct LatencyMs {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest seen.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Number of deliveries measured.
    pub samples: u64,
}

/// The result of a bench run; printed as one JSON object by `main`.
#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    /// "fanout", "connections_only" or "reconnect".
    pub mode: &'static str,
    /// Messages sent by the publishers.
    pub published: u64,
    /// Messages received by the subscribers.
    pub delivered: u64,
    /// Deliveries due: for each published message, the subscribers of its topic plus the wildcard subscribers.
    pub expected: u64,
    /// expected - delivered (0 when more arrived than expected).
    pub lost: u64,
    /// delivered / (first publish .. last delivery seen), per second.
    pub deliveries_per_s: f64,
    /// published / publishing time, per second.
    pub published_per_s: f64,
    /// Publish-to-receipt latency.
    pub latency_ms: LatencyMs,
    /// Connections opened (subscribe acked for subscribers).
    pub connections: u64,
    /// Connection attempts that failed (TCP, TLS, upgrade or subscribe).
    pub connect_errors: u64,
    /// The first connection error, to tell why.
    pub first_connect_error: Option<String>,
    /// connections / connect phase time (TCP + TLS + upgrade + first subscribe ack).
    pub connect_per_s: f64,
    /// Length of the connect phase.
    pub connect_seconds: f64,
    /// Subscribers connected (topic ones).
    pub subscribers: u64,
    /// Wildcard subscribers connected.
    pub wildcard_subscribers: u64,
    /// Publishers connected.
    pub publishers: u64,
    /// Error frames received by publishers (e.g. `limit`).
    pub publish_errors: u64,
    /// The first of those.
    pub first_publish_error: Option<String>,
    /// Publisher connections lost while publishing.
    pub publisher_disconnects: u64,
    /// Subscriber connections that ended before the end of the run.
    pub subscriber_disconnects: u64,
    /// Text frames subscribers could not take a timestamp from (not counted as delivered).
    pub unexpected_frames: u64,
    /// Server VmRSS at the end (before closing), with --server-pid.
    pub server_rss_bytes: Option<u64>,
    /// Server VmRSS before the first connection, with --server-pid.
    pub server_rss_before_bytes: Option<u64>,
    /// (rss_after - rss_before) / connections, connections-only with --server-pid.
    pub server_rss_per_connection_bytes: Option<u64>,
    /// This process's CPU time (user + system) during the measured phase (publishing + drain, or connect + hold).
    pub client_cpu_seconds: f64,
    /// The server's CPU time during the same phase, with --server-pid.
    pub server_cpu_seconds: Option<f64>,
    /// This process's CPU time during the connect phase.
    pub connect_client_cpu_seconds: f64,
    /// The server's CPU time during the connect phase, with --server-pid.
    pub connect_server_cpu_seconds: Option<f64>,
    /// Publishing time (connections-only: hold time).
    pub duration_s: f64,
    /// Time spent waiting for the last deliveries after publishing stopped.
    pub drain_s: f64,
    /// --rate as given.
    pub rate: String,
    /// --payload.
    pub payload: usize,
    /// --topics.
    pub topics: usize,
    /// The two storms of `--reconnect` (full, then resumed handshakes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<reconnect::ReconnectReport>,
}

#[derive(Debug, Clone, Copy)]
enum Rate {
    PerSecond(f64),
    Max,
}

fn parse_rate(s: &str) -> Result<Rate, BenchError> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(Rate::PerSecond(r)),
        _ => Err(BenchError::Usage {
            flag: "rate",
            reason: format!("{s:?}: expected messages per second (> 0) or \"max\""),
        }),
    }
}

fn parse_duration(flag: &'static str, s: &str) -> Result<Duration, BenchError> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| BenchError::Usage {
        flag,
        reason: format!("{s:?}: {e} (e.g. 10s, 500ms, 1m)"),
    })
}

/// A counter on its own cache line: each connection task stores its running
/// total without bouncing a line shared with other tasks.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Counter(AtomicU64);

impl Counter {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed)
    }
}

/// What a connection is for.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Subscriber of topic index.
    Sub(usize),
    /// Subscriber of `bench.>`.
    Wildcard,
    /// Publisher.
    Pub,
}

/// Per-publisher figures.
#[derive(Debug, Default)]
struct PubStats {
    published: Counter,
    expected: Counter,
    /// When publishing finished, in ns since `Ctx::base` (valid once `done`).
    finished_ns: AtomicU64,
    /// Publishing finished (deadline reached or connection lost).
    done: AtomicBool,
}

impl PubStats {
    /// Marks publishing as finished now.
    fn finish(&self, base: Instant) {
        self.finished_ns
            .store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.done.store(true, Ordering::Release);
    }
}

/// Handed to publishers once every connection is open.
#[derive(Debug)]
struct Plan {
    /// Deliveries due per message, by topic index.
    fanout: Vec<u64>,
    /// Messages per second for each publisher (None = max).
    per_pub_rate: Option<f64>,
    /// When publishing ends.
    deadline: Instant,
}

/// State shared by all connection tasks.
struct Ctx {
    target: Target,
    /// Where subscriber `idx` connects: `sub_targets[idx % len]` (several
    /// `--url`s spread subscribers over cluster nodes; publishers use the first).
    sub_targets: Vec<Target>,
    opts: ClientOptions,
    tls: Arc<rustls::ClientConfig>,
    spread: bool,
    pub_ws: WebSocketConfig,
    topics: usize,
    publishers: usize,
    payload: usize,
    extra_subscriptions: usize,
    /// Time origin of the timestamps in payloads.
    base: Instant,
    shards: Vec<Mutex<Histogram<u64>>>,
    /// Connected subscribers per topic, wildcard, publishers.
    subs_ok: Vec<AtomicU64>,
    wildcard_ok: AtomicU64,
    pubs_ok: AtomicU64,
    connect_errors: AtomicU64,
    first_connect_error: Mutex<Option<String>>,
    publish_errors: AtomicU64,
    first_publish_error: Mutex<Option<String>>,
    publisher_disconnects: AtomicU64,
    subscriber_disconnects: AtomicU64,
    unexpected_frames: AtomicU64,
    /// One message per finished connection attempt.
    attempt_done: mpsc::UnboundedSender<()>,
}

impl Ctx {
    /// The node subscriber `idx` connects to.
    fn sub_target(&self, idx: usize) -> &Target {
        &self.sub_targets[idx % self.sub_targets.len()]
    }

    fn local_addr(&self, idx: usize) -> Option<IpAddr> {
        // 127.0.0.1..=250; the whole 127/8 is loopback on Linux.
        self.spread
            .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (idx % SPREAD_ADDRS) as u8)))
    }

    fn record_connect(&self, role: Role, result: &Result<(), ClientError>) {
        match result {
            Ok(()) => match role {
                Role::Sub(t) => {
                    self.subs_ok[t].fetch_add(1, Ordering::Relaxed);
                }
                Role::Wildcard => {
                    self.wildcard_ok.fetch_add(1, Ordering::Relaxed);
                }
                Role::Pub => {
                    self.pubs_ok.fetch_add(1, Ordering::Relaxed);
                }
            },
            Err(e) => {
                self.connect_errors.fetch_add(1, Ordering::Relaxed);
                note_first(&self.first_connect_error, e);
            }
        }
        // The receiver lives until every attempt reported; a send error
        // only means the bench is already being torn down.
        let _ = self.attempt_done.send(());
    }
}

fn note_first(slot: &Mutex<Option<String>>, e: &dyn std::fmt::Display) {
    let mut g = match slot.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if g.is_none() {
        *g = Some(e.to_string());
    }
}

fn take_first(slot: &Mutex<Option<String>>) -> Option<String> {
    match slot.lock() {
        Ok(mut g) => g.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    }
}

fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds (1 µs .. 1 h, 3 significant figures): this can
    // only fail if the constants are edited to nonsense.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, LAT_MAX_US, 3).expect("valid histogram bounds")
}

/// Runs the bench described by `args` on the caller's (multi-thread) runtime.
pub async fn run(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    let rate = parse_rate(&args.rate)?;
    let duration = parse_duration("duration", &args.duration)?;
    let hold = parse_duration("hold", &args.hold)?;
    if args.topics == 0 {
        return Err(BenchError::Usage {
            flag: "topics",
            reason: "must be at least 1".into(),
        });
    }
    if args.connect_concurrency == 0 {
        return Err(BenchError::Usage {
            flag: "connect-concurrency",
            reason: "must be at least 1".into(),
        });
    }
    if let (true, Some(n)) = (args.reconnect, args.connections_only) {
        return reconnect_report(args, n).await;
    }
    let connections_only = args.connections_only.is_some();
    let (n_subs, n_wild, n_pubs) = match args.connections_only {
        Some(n) => (n, 0, 0),
        None => (args.subscribers, args.wildcard_subscribers, args.publishers),
    };
    if !connections_only && n_pubs == 0 {
        return Err(BenchError::Usage {
            flag: "publishers",
            reason: "must be at least 1 (or use --connections-only)".into(),
        });
    }
    let total = n_subs + n_wild + n_pubs;
    if total == 0 {
        return Err(BenchError::Usage {
            flag: "subscribers",
            reason: "nothing to open".into(),
        });
    }

    if let Some(limit) = crate::lifecycle::raise_nofile_limit() {
        if (total as u64).saturating_add(64) > limit {
            eprintln!(
                "bench: warning: {total} connections but the open-file limit is {limit}; expect connect errors"
            );
        }
    }

    let mut target = Target::resolve(args.client.primary_url()).await?;
    // "localhost" often resolves to ::1 first while servers commonly listen
    // on IPv4 only: try IPv4 first so thousands of connections don't each
    // pay a refused attempt (the other family is still tried on failure).
    target.addrs.sort_by_key(|a| !a.is_ipv4());
    let sub_targets = sub_targets(args, &target).await?;
    let mut tls = (*client::tls_config(&args.client)?).clone();
    // Every connection pays a full handshake, as in the reference figures.
    tls.resumption = rustls::client::Resumption::disabled();
    let spread = total > SPREAD_THRESHOLD && target.is_ipv4_loopback();

    // Publishers coalesce many frames into one write (few TLS records).
    let pub_ws = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(16 << 20));

    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        target,
        opts: args.client.clone(),
        tls: Arc::new(tls),
        spread,
        pub_ws,
        sub_targets,
        topics: args.topics,
        publishers: n_pubs,
        payload: args.payload,
        extra_subscriptions: args.extra_subscriptions,
        base: Instant::now(),
        shards: (0..args.receiver_threads.max(1))
            .map(|_| Mutex::new(new_histogram()))
            .collect(),
        subs_ok: (0..args.topics).map(|_| AtomicU64::new(0)).collect(),
        wildcard_ok: AtomicU64::new(0),
        pubs_ok: AtomicU64::new(0),
        connect_errors: AtomicU64::new(0),
        first_connect_error: Mutex::new(None),
        publish_errors: AtomicU64::new(0),
        first_publish_error: Mutex::new(None),
        publisher_disconnects: AtomicU64::new(0),
        subscriber_disconnects: AtomicU64::new(0),
        unexpected_frames: AtomicU64::new(0),
        attempt_done: done_tx,
    });

    let rss_before = args.server_pid.and_then(read_rss);
    let cpu0 = (
        client_cpu_seconds(),
        args.server_pid.and_then(server_cpu_seconds),
    );
    let receivers = Receivers::start(args.receiver_threads, &ctx).map_err(ClientError::Io)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (plan_tx, plan_rx) = watch::channel::<Option<Arc<Plan>>>(None);

    let sub_counters: Vec<Arc<Counter>> = (0..n_subs + n_wild)
        .map(|_| Arc::new(Counter::default()))
        .collect();
    let pub_stats: Vec<Arc<PubStats>> =
        (0..n_pubs).map(|_| Arc::new(PubStats::default())).collect();

    if spread {
        eprintln!("bench: spreading source addresses over 127.0.0.1-{SPREAD_ADDRS}");
    }
    eprintln!(
        "bench: opening {total} connections ({n_subs} subscribers, {n_wild} wildcard, {n_pubs} publishers) to {}",
        args.client.all_urls().join(", ")
    );
    let connect_start = Instant::now();
    // Spawning waits for connect permits, so it runs beside the progress loop.
    let spawner = {
        let ctx = ctx.clone();
        let sem = Arc::new(Semaphore::new(args.connect_concurrency));
        let sub_counters = sub_counters.clone();
        let pub_stats = pub_stats.clone();
        let (stop_rx, plan_rx) = (stop_rx.clone(), plan_rx.clone());
        let inlets = receivers.inlets();
        tokio::spawn(async move {
            let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(total);
            // idx is the global connection number (source address, role).
            #[allow(clippy::needless_range_loop)]
            for idx in 0..total {
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let ctx = ctx.clone();
                let handle = if idx < n_subs + n_wild {
                    let role = if idx < n_subs {
                        Role::Sub(idx % ctx.topics)
                    } else {
                        Role::Wildcard
                    };
                    let counter = sub_counters[idx].clone();
                    tokio::spawn(subscriber(ctx, idx, role, permit, counter, inlets.clone()))
                } else {
                    let p = idx - n_subs - n_wild;
                    let stats = pub_stats[p].clone();
                    let stop = stop_rx.clone();
                    tokio::spawn(publisher(ctx, idx, p, permit, stats, plan_rx.clone(), stop))
                };
                handles.push(handle);
            }
            handles
        })
    };

    let mut attempts = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while attempts < total {
        tokio::select! {
            got = done_rx.recv() => match got {
                Some(()) => attempts += 1,
                None => break,
            },
            _ = tick.tick() => {
                let ok = attempts as u64 - ctx.connect_errors.load(Ordering::Relaxed);
                let secs = connect_start.elapsed().as_secs_f64();
                eprintln!(
                    "bench: connecting {attempts}/{total}: {ok} open, {} errors, {:.0}/s",
                    ctx.connect_errors.load(Ordering::Relaxed),
                    ok as f64 / secs.max(1e-9),
                );
            }
        }
    }
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let cpu1 = (
        client_cpu_seconds(),
        args.server_pid.and_then(server_cpu_seconds),
    );
    let handles = spawner.await.unwrap_or_default();

    let subs_by_topic: Vec<u64> = ctx
        .subs_ok
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let subs_ok: u64 = subs_by_topic.iter().sum();
    let wild_ok = ctx.wildcard_ok.load(Ordering::Relaxed);
    let pubs_ok = ctx.pubs_ok.load(Ordering::Relaxed);
    let connections = subs_ok + wild_ok + pubs_ok;
    let connect_errors = ctx.connect_errors.load(Ordering::Relaxed);
    let first_connect_error = take_first(&ctx.first_connect_error);
    eprintln!(
        "bench: {connections} connections open, {connect_errors} errors in {connect_seconds:.2}s ({:.0}/s)",
        connections as f64 / connect_seconds.max(1e-9)
    );

    let teardown = |handles: Vec<JoinHandle<()>>, receivers: Receivers| {
        let _ = stop_tx.send(true);
        async move {
            // Publishers close and subscribers are closed by their receiver
            // threads (which record their latencies first); don't wait forever.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let publishers = async {
                for h in handles {
                    if tokio::time::timeout_at(deadline, h).await.is_err() {
                        break;
                    }
                }
            };
            tokio::join!(publishers, receivers.finish());
        }
    };

    if connections == 0 {
        teardown(handles, receivers).await;
        return Err(BenchError::AllConnectsFailed {
            attempts: total,
            first_error: first_connect_error.unwrap_or_else(|| "unknown".into()),
        });
    }

    let mut report = BenchReport {
        mode: if connections_only {
            "connections_only"
        } else {
            "fanout"
        },
        connections,
        connect_errors,
        first_connect_error,
        connect_per_s: connections as f64 / connect_seconds.max(1e-9),
        connect_seconds,
        subscribers: subs_ok,
        wildcard_subscribers: wild_ok,
        publishers: pubs_ok,
        server_rss_before_bytes: rss_before,
        connect_client_cpu_seconds: cpu1.0 - cpu0.0,
        connect_server_cpu_seconds: cpu0.1.zip(cpu1.1).map(|(a, b)| b - a),
        rate: args.rate.clone(),
        payload: args.payload,
        topics: args.topics,
        ..BenchReport::default()
    };

    if connections_only {
        let hold_start = Instant::now();
        while hold_start.elapsed() < hold {
            let left = hold.saturating_sub(hold_start.elapsed());
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
            let left = hold.saturating_sub(hold_start.elapsed());
            if !left.is_zero() {
                eprintln!(
                    "bench: holding {connections} connections, {:.0}s left, {} dropped",
                    left.as_secs_f64(),
                    ctx.subscriber_disconnects.load(Ordering::Relaxed)
                );
            }
        }
        let rss_after = args.server_pid.and_then(read_rss);
        let cpu2 = (
            client_cpu_seconds(),
            args.server_pid.and_then(server_cpu_seconds),
        );
        report.server_rss_bytes = rss_after;
        report.server_rss_per_connection_bytes = rss_before
            .zip(rss_after)
            .map(|(before, after)| after.saturating_sub(before) / connections.max(1));
        // The measured phase of an idle run is connect + hold.
        report.client_cpu_seconds = cpu2.0 - cpu0.0;
        report.server_cpu_seconds = cpu0.1.zip(cpu2.1).map(|(a, b)| b - a);
        report.duration_s = hold_start.elapsed().as_secs_f64();
        teardown(handles, receivers).await;
        // After the teardown, as in a fan-out run: closes the server started
        // before ours count.
        report.subscriber_disconnects = ctx.subscriber_disconnects.load(Ordering::Relaxed);
        return Ok(report);
    }

    if pubs_ok == 0 {
        teardown(handles, receivers).await;
        return Err(BenchError::NoPublisher(
            report
                .first_connect_error
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        ));
    }

    // Every message reaches the subscribers of its topic and every wildcard one.
    let fanout: Vec<u64> = subs_by_topic.iter().map(|n| n + wild_ok).collect();
    let per_pub_rate = match rate {
        Rate::PerSecond(r) => Some(r / pubs_ok as f64),
        Rate::Max => None,
    };
    if ctx.sub_targets.len() > 1 {
        // Subscribers on other nodes are reached through NATS: give their
        // nodes' subscriptions time to reach the NATS server first.
        tokio::time::sleep(CLUSTER_SETTLE).await;
    }
    let publish_start = Instant::now();
    let plan = Arc::new(Plan {
        fanout,
        per_pub_rate,
        deadline: publish_start + duration,
    });
    eprintln!(
        "bench: publishing for {duration:?} at {} to {} subscribers",
        args.rate,
        subs_ok + wild_ok
    );
    let _ = plan_tx.send(Some(plan));

    let sum_subs = || sub_counters.iter().map(|c| c.get()).sum::<u64>();
    let sum_pub = |f: fn(&PubStats) -> u64| pub_stats.iter().map(|s| f(s)).sum::<u64>();
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    let mut last_delivered = 0u64;
    let mut last_progress = publish_start;
    let mut last_print = publish_start;
    let mut printed_delivered = 0u64;
    let mut publishing_done_at: Option<Instant> = None;
    // A publisher stuck in a write (server not reading) must not hang us.
    let give_up_publishers = publish_start + duration + Duration::from_secs(5);
    loop {
        poll.tick().await;
        let now = Instant::now();
        let delivered = sum_subs();
        if delivered != last_delivered {
            last_delivered = delivered;
            last_progress = now;
        }
        let all_done =
            pub_stats.iter().all(|s| s.done.load(Ordering::Acquire)) || now >= give_up_publishers;
        if now.duration_since(last_print) >= Duration::from_secs(1) {
            let secs = now.duration_since(last_print).as_secs_f64();
            eprintln!(
                "bench: t={:.0}s published {} delivered {} ({:.0} deliveries/s){}",
                now.duration_since(publish_start).as_secs_f64(),
                sum_pub(|s| s.published.get()),
                delivered,
                (delivered - printed_delivered) as f64 / secs,
                if all_done { ", draining" } else { "" },
            );
            last_print = now;
            printed_delivered = delivered;
        }
        if all_done {
            let done_at = *publishing_done_at.get_or_insert(now);
            let expected = sum_pub(|s| s.expected.get());
            if delivered >= expected {
                break;
            }
            if now.duration_since(last_progress.max(done_at)) >= DRAIN_IDLE {
                eprintln!(
                    "bench: no delivery for {DRAIN_IDLE:?}, giving up on {} missing",
                    expected - delivered
                );
                break;
            }
        }
    }
    let end = Instant::now();
    // The publishers' own finish times: the loop above only looks every 50 ms.
    let publishing_done_at = if pub_stats.iter().all(|s| s.done.load(Ordering::Acquire)) {
        pub_stats
            .iter()
            .map(|s| ctx.base + Duration::from_nanos(s.finished_ns.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(end)
    } else {
        publishing_done_at.unwrap_or(end)
    };
    let rss_after = args.server_pid.and_then(read_rss);
    let cpu2 = (
        client_cpu_seconds(),
        args.server_pid.and_then(server_cpu_seconds),
    );

    teardown(handles, receivers).await;

    let published = sum_pub(|s| s.published.get());
    let expected = sum_pub(|s| s.expected.get());
    let delivered = sum_subs();
    let publish_secs = publishing_done_at
        .duration_since(publish_start)
        .as_secs_f64();
    let delivery_secs = last_progress.duration_since(publish_start).as_secs_f64();
    report.published = published;
    report.delivered = delivered;
    report.expected = expected;
    report.lost = expected.saturating_sub(delivered);
    report.deliveries_per_s = if delivery_secs > 0.0 {
        delivered as f64 / delivery_secs
    } else {
        0.0
    };
    report.published_per_s = if publish_secs > 0.0 {
        published as f64 / publish_secs
    } else {
        0.0
    };
    report.latency_ms = merged_latency(&ctx);
    report.publish_errors = ctx.publish_errors.load(Ordering::Relaxed);
    report.first_publish_error = take_first(&ctx.first_publish_error);
    report.publisher_disconnects = ctx.publisher_disconnects.load(Ordering::Relaxed);
    report.subscriber_disconnects = ctx.subscriber_disconnects.load(Ordering::Relaxed);
    report.unexpected_frames = ctx.unexpected_frames.load(Ordering::Relaxed);
    report.server_rss_bytes = rss_after;
    report.client_cpu_seconds = cpu2.0 - cpu1.0;
    report.server_cpu_seconds = cpu1.1.zip(cpu2.1).map(|(a, b)| b - a);
    report.duration_s = publish_secs;
    report.drain_s = end.duration_since(publishing_done_at).as_secs_f64();
    Ok(report)
}

fn merged_latency(ctx: &Ctx) -> LatencyMs {
    let mut total = new_histogram();
    for shard in &ctx.shards {
        let h = match shard.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Same bounds everywhere, so adding cannot fail.
        let _ = total.add(&*h);
    }
    if total.is_empty() {
        return LatencyMs::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    LatencyMs {
        p50: ms(total.value_at_quantile(0.50)),
        p90: ms(total.value_at_quantile(0.90)),
        p99: ms(total.value_at_quantile(0.99)),
        p999: ms(total.value_at_quantile(0.999)),
        max: ms(total.max()),
        mean: total.mean() / 1000.0,
        samples: total.len(),
    }
}

/// Opens one subscriber connection (connect, subscribe) and hands it to a
/// receiver thread, which counts and times its deliveries until the end.
async fn subscriber(
    ctx: Arc<Ctx>,
    idx: usize,
    role: Role,
    permit: OwnedSemaphorePermit,
    counter: Arc<Counter>,
    inlets: Arc<Inlets>,
) {
    let topic = match role {
        Role::Sub(t) => format!("bench.t{t}"),
        _ => "bench.>".to_string(),
    };
    let mut topics = vec![topic];
    topics.extend((0..ctx.extra_subscriptions).map(|k| {
        if k % 10 == 9 {
            format!("bench.idle.s{idx}.k{k}.*")
        } else {
            format!("bench.idle.s{idx}.k{k}")
        }
    }));
    let opened = receiver::open(&ctx, idx, &topics).await;
    drop(permit);
    match opened {
        Ok(opened) => {
            inlets.add(idx, opened, counter);
            ctx.record_connect(role, &Ok(()));
        }
        Err(e) => ctx.record_connect(role, &Err(e)),
    }
}

/// Finds the send timestamp (ns since `Ctx::base`) in a message frame:
/// `…"data":"<ts>:<seq>:…"…`. A byte search instead of a JSON parse keeps
/// the receive path cheap; it tolerates spacing around the colon.
fn extract_ts(frame: &str) -> Option<u64> {
    // str::find has a vectorised path for short needles; a naive window
    // scan showed up in profiles.
    let pos = frame.find("\"data\"")?;
    let mut rest = frame.as_bytes()[pos + 6..].iter().copied().peekable();
    let mut expect = |want: u8| -> Option<()> {
        while rest.next_if(|b| b.is_ascii_whitespace()).is_some() {}
        (rest.next()? == want).then_some(())
    };
    expect(b':')?;
    expect(b'"')?;
    let mut ts: u64 = 0;
    let mut digits = 0;
    for b in rest {
        match b {
            b'0'..=b'9' => {
                ts = ts.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
                digits += 1;
            }
            b':' if digits > 0 => return Some(ts),
            _ => return None,
        }
    }
    None
}

/// Topic indices publisher `p` of `publishers` round-robins over.
fn topics_of(p: usize, publishers: usize, topics: usize) -> Vec<usize> {
    if topics >= publishers {
        (p..topics).step_by(publishers.max(1)).collect()
    } else {
        vec![p % topics]
    }
}

/// Appends one publish frame for `topic_prefix` (everything up to the
/// opening quote of data) whose data string is `<ts>:<seq>:` padded with
/// `x` to `payload` bytes.
fn build_frame(buf: &mut String, topic_prefix: &str, ts: u64, seq: u64, payload: usize) {
    buf.clear();
    buf.push_str(topic_prefix);
    let start = buf.len();
    let _ = write!(buf, "{ts}:{seq}:");
    let used = buf.len() - start;
    for _ in used..payload {
        buf.push('x');
    }
    buf.push_str("\"}");
}

/// One publisher connection: connect, wait for the plan, publish until the
/// deadline, keep draining its read side, close when told to stop.
async fn publisher(
    ctx: Arc<Ctx>,
    idx: usize,
    p: usize,
    permit: OwnedSemaphorePermit,
    stats: Arc<PubStats>,
    mut plan_rx: watch::Receiver<Option<Arc<Plan>>>,
    mut stop: watch::Receiver<bool>,
) {
    let opened = client::connect_to(
        &ctx.target,
        &ctx.opts,
        ctx.tls.clone(),
        ctx.local_addr(idx),
        ctx.pub_ws,
    )
    .await;
    drop(permit);
    let (result, ws) = match opened {
        Ok(ws) => (Ok(()), Some(ws)),
        Err(e) => (Err(e), None),
    };
    ctx.record_connect(Role::Pub, &result);
    let Some(ws) = ws else {
        stats.finish(ctx.base);
        return;
    };
    let (mut sink, mut stream) = ws.split();
    // The publisher is subscribed to nothing, but the server may answer
    // (errors, pings, a close); reading keeps pongs flowing and counts errors.
    let reader = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(Message::Text(text)) => {
                        if text.contains("\"error\"") {
                            ctx.publish_errors.fetch_add(1, Ordering::Relaxed);
                            note_first(&ctx.first_publish_error, &text.as_str());
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        if let Some(f) = frame {
                            note_first(
                                &ctx.first_publish_error,
                                &format!(
                                    "publisher closed by server: {} {}",
                                    u16::from(f.code),
                                    f.reason
                                ),
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        })
    };

    let plan = match plan_rx.wait_for(|p| p.is_some()).await {
        Ok(plan) => plan.clone(),
        Err(_) => None,
    };
    if let Some(plan) = plan {
        if let Err(e) = publish(&ctx, p, &plan, &stats, &mut sink).await {
            ctx.publisher_disconnects.fetch_add(1, Ordering::Relaxed);
            eprintln!("bench: publisher {p} failed: {e}");
        }
    }
    stats.finish(ctx.base);

    let _ = stop.wait_for(|s| *s).await.map(|_| ());
    // Sends our close; the reader sees the echo and ends.
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
}

/// The publishing loop of one publisher.
async fn publish<S>(
    ctx: &Ctx,
    p: usize,
    plan: &Plan,
    stats: &PubStats,
    sink: &mut S,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let mine = topics_of(p, ctx.publishers, ctx.topics);
    let prefixes: Vec<String> = mine
        .iter()
        .map(|t| format!(r#"{{"op":"publish","topic":"bench.t{t}","data":""#))
        .collect();
    let fanout: Vec<u64> = mine.iter().map(|&t| plan.fanout[t]).collect();
    let mut gen = FrameGen {
        base: ctx.base,
        payload: ctx.payload,
        buf: String::with_capacity(prefixes[0].len() + ctx.payload + 32),
        prefixes,
        fanout,
        next: 0,
        seq: 0,
        expected: 0,
    };
    match plan.per_pub_rate {
        None => {
            // As fast as the socket takes: feed a batch, flush once.
            while Instant::now() < plan.deadline {
                send_batch(&mut gen, MAX_RATE_BATCH as u64, sink, stats).await?;
            }
        }
        Some(rate) => {
            // Tick at the message period, but at most every 1 ms, and send
            // what is due: high rates go out in small batches per flush.
            let period = Duration::from_secs_f64((1.0 / rate).clamp(0.001, 1.0));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let start = Instant::now();
            loop {
                tick.tick().await;
                let now = Instant::now();
                if now >= plan.deadline {
                    break;
                }
                let due = (now.duration_since(start).as_secs_f64() * rate) as u64 + 1;
                let n = due.saturating_sub(gen.seq).min(PACED_MAX_BATCH);
                if n == 0 {
                    continue;
                }
                send_batch(&mut gen, n, sink, stats).await?;
            }
        }
    }
    // Publish counts only what was flushed above, so expected matches.
    stats.published.set(gen.seq);
    stats.expected.set(gen.expected);
    Ok(())
}

/// Feeds `n` messages, flushes once, then records them as published.
async fn send_batch<S>(
    gen: &mut FrameGen,
    n: u64,
    sink: &mut S,
    stats: &PubStats,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    for _ in 0..n {
        sink.feed(gen.next_message()).await?;
    }
    sink.flush().await?;
    stats.published.set(gen.seq);
    stats.expected.set(gen.expected);
    Ok(())
}

/// Builds a publisher's frames, round-robin over its topics, and keeps its
/// published / expected counts.
struct FrameGen {
    base: Instant,
    payload: usize,
    buf: String,
    /// Frame start per topic, up to the opening quote of data.
    prefixes: Vec<String>,
    /// Deliveries due per message, per topic (same order as prefixes).
    fanout: Vec<u64>,
    next: usize,
    seq: u64,
    expected: u64,
}

impl FrameGen {
    fn next_message(&mut self) -> Message {
        let ts = self.base.elapsed().as_nanos() as u64;
        build_frame(
            &mut self.buf,
            &self.prefixes[self.next],
            ts,
            self.seq,
            self.payload,
        );
        self.expected += self.fanout[self.next];
        self.next = (self.next + 1) % self.prefixes.len();
        self.seq += 1;
        Message::text(self.buf.as_str())
    }
}

/// `--reconnect`: the storms, with the headline fields taken from the
/// resumed one (connections, errors, rate, server CPU).
async fn reconnect_report(args: &BenchArgs, n: usize) -> Result<BenchReport, BenchError> {
    if n == 0 {
        return Err(BenchError::Usage {
            flag: "connections-only",
            reason: "must be at least 1 with --reconnect".into(),
        });
    }
    if args.connect_concurrency == 0 {
        return Err(BenchError::Usage {
            flag: "connect-concurrency",
            reason: "must be at least 1".into(),
        });
    }
    let storms = reconnect::run(args, n).await?;
    let r = &storms.resumed;
    Ok(BenchReport {
        mode: "reconnect",
        connections: r.connections,
        connect_errors: storms.full.errors + r.errors,
        first_connect_error: storms
            .full
            .first_error
            .clone()
            .or_else(|| r.first_error.clone()),
        connect_per_s: r.per_s,
        connect_seconds: r.seconds,
        connect_client_cpu_seconds: r.client_cpu_seconds,
        connect_server_cpu_seconds: r.server_cpu_seconds,
        server_rss_bytes: args.server_pid.and_then(read_rss),
        rate: args.rate.clone(),
        payload: args.payload,
        topics: args.topics,
        reconnect: Some(storms),
        ..BenchReport::default()
    })
}

/// User + system CPU seconds of this process.
fn client_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// utime + stime of `pid` from /proc/PID/stat, in seconds.
fn server_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat_cpu(&stat, clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn parse_proc_stat_cpu(stat: &str, ticks: f64) -> Option<f64> {
    // comm (field 2) may contain spaces and parens: split after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// VmRSS of `pid` in bytes.
fn read_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&status)
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_extraction() {
        assert_eq!(
            extract_ts(r#"{"type":"message","topic":"bench.t0","data":"12345:7:xxxx"}"#),
            Some(12345)
        );
        assert_eq!(
            extract_ts(r#"{"type": "message", "data" : "99:0:"}"#),
            Some(99)
        );
        assert_eq!(extract_ts(r#"{"type":"ack","id":1}"#), None);
        assert_eq!(extract_ts(r#"{"type":"message","data":{"a":1}}"#), None);
        assert_eq!(extract_ts(r#"{"data":"12"#), None);
    }

    #[test]
    fn frames_have_the_payload_size() {
        let mut buf = String::new();
        let prefix = r#"{"op":"publish","topic":"bench.t0","data":""#;
        build_frame(&mut buf, prefix, 123, 4, 64);
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        let data = v["data"].as_str().unwrap();
        assert_eq!(data.len(), 64);
        assert!(data.starts_with("123:4:x"));
        let echoed = format!(r#"{{"type":"message","topic":"bench.t0","data":"{data}"}}"#);
        assert_eq!(extract_ts(&echoed), Some(123));
    }

    #[test]
    fn topic_assignment_covers_all_topics() {
        assert_eq!(topics_of(0, 2, 5), vec![0, 2, 4]);
        assert_eq!(topics_of(1, 2, 5), vec![1, 3]);
        assert_eq!(topics_of(3, 4, 2), vec![1]);
        assert_eq!(topics_of(0, 1, 1), vec![0]);
    }

    #[test]
    fn proc_parsing() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(parse_proc_stat_cpu(stat, 100.0), Some(3.0));
        assert_eq!(
            parse_vmrss("Name:\tx\nVmRSS:\t   2048 kB\nVmSwap: 0 kB\n"),
            Some(2048 * 1024)
        );
    }

    #[test]
    fn rates_and_durations() {
        assert!(matches!(parse_rate("max"), Ok(Rate::Max)));
        assert!(matches!(parse_rate("2500"), Ok(Rate::PerSecond(r)) if r == 2500.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(
            parse_duration("d", "500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("d", "1m").ok(),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_duration("d", "0s").ok(), Some(Duration::ZERO));
        assert!(parse_duration("d", "soon").is_err());
    }
}
