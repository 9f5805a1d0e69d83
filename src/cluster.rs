//! Several nodes as one broker over NATS (CONTRACT §11): the NATS
//! connection, interest bookkeeping (one NATS subscription per distinct
//! local pattern), forwarding both ways, and the link state behind
//! `/readyz` and the `wsbroker_cluster_*` metrics.
//!
//! Exactly once per subscriber (docs/cluster.md): NATS hands the node one
//! copy of a message per matching NATS subscription. Every subscription
//! gets a serial number when it is taken; of the copies of one message
//! only the one that arrives on the *oldest* held subscription matching its
//! topic (the canonical one) is delivered, to every local subscriber at
//! once through the topic index, which already gives each connection one
//! copy. Taking a new, overlapping subscription never changes which one is
//! canonical for the topics the older one covers, and all messages of one
//! topic come in through the same subscription, in NATS order.
//!
//! Per-publisher order across subscriptions: the NATS client hands each
//! subscription its own queue, so two messages of one publisher on topics
//! that arrive through different subscriptions (a subscriber holding `a.*`
//! and `b.*`) could be taken out of order. Every message a node publishes
//! carries its sequence number (`Wsbroker-Seq`, per node), and one pump task
//! takes from all subscriptions at once in [`Merge`] rounds that put each
//! sender's messages back in sequence order before they reach the bounded
//! inbound queue (overflow dropped and counted), read by the task that owns
//! the interest bookkeeping and delivers.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{ConnectOptions, Event, HeaderMap, ServerAddr};
use bytes::Bytes;
use futures_util::stream::StreamExt;
use futures_util::FutureExt;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::{Broker, Interest};
use crate::config::ClusterSettings;
use crate::metrics::ClusterMetrics;
use crate::protocol;
use crate::topics::TopicIndex;

/// The NATS header naming the node that published a message.
pub const NODE_HEADER: &str = "Wsbroker-Node";

/// The NATS header with the publishing node's sequence number (1, 2, …):
/// restores per-publisher order across subscriptions (see [`Merge`]).
pub const SEQ_HEADER: &str = "Wsbroker-Seq";

/// How long a NATS subscription is kept after its last local subscriber
/// left, so a client that resubscribes at once costs no UNSUB/SUB pair.
pub const INTEREST_LINGER: Duration = Duration::from_secs(1);

/// How often lingering subscriptions are checked for removal.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Messages from NATS waiting for the delivering task, over all
/// subscriptions; beyond that they are dropped (`slow_consumer`).
pub const INBOUND_CAPACITY: usize = 8192;

/// Messages the NATS client buffers per subscription before the pump moves
/// them on. The pump only `try_send`s, but it is one task among many: while every connection's writer is woken by a
/// fan-out it can wait its turn, and the client must absorb the burst
/// meanwhile. Drops here are counted from the client's slow-consumer
/// events, which can miss some (its event queue holds 128), so the buffer
/// is large enough that the exact count at the pump is the one that counts.
pub const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// Local publishes waiting to be handed to the NATS client; beyond that
/// they are dropped (`publish_failed`), never queued without bound.
pub const FORWARD_CAPACITY: usize = 8192;

/// Cluster start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A configured file could not be used.
    #[error("{key}: {reason}")]
    File {
        /// Config key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The NATS client refused its options.
    #[error("cluster: {0}")]
    Connect(String),
}

/// Checks one `cluster.nats_url` entry: `nats://` or `tls://`, a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let url = url.trim();
    if !(url.starts_with("nats://") || url.starts_with("tls://")) {
        return Err(format!("`{url}` must start with nats:// or tls://"));
    }
    let addr: ServerAddr = url
        .parse()
        .map_err(|e: io::Error| format!("`{url}` is not a NATS URL: {e}"))?;
    if addr.host().is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(())
}

/// The default node name: host name and process id.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wsbroker".to_string());
    format!("{host}-{}", std::process::id())
}

/// Reads the credential and CA files, one error line per problem.
pub fn validate_files(settings: &ClusterSettings, errors: &mut Vec<String>) {
    if let Some(path) = &settings.nats_creds {
        if let Err(e) = read_creds(path) {
            errors.push(e.to_string());
        }
    }
    if let Some(path) = &settings.nats_ca {
        if let Err(e) = read_ca(path) {
            errors.push(e.to_string());
        }
    }
}

fn read_file(key: &'static str, path: &Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path).map_err(|e| ClusterError::File {
        key,
        reason: match e.kind() {
            io::ErrorKind::NotFound => format!("file not found: {}", path.display()),
            _ => format!("cannot read {}: {e}", path.display()),
        },
    })
}

fn read_creds(path: &Path) -> Result<String, ClusterError> {
    let text = read_file("cluster.nats_creds", path)?;
    ConnectOptions::with_credentials(&text).map_err(|e| ClusterError::File {
        key: "cluster.nats_creds",
        reason: format!("{} is not a NATS credentials file: {e}", path.display()),
    })?;
    Ok(text)
}

fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClusterError> {
    let text = read_file("cluster.nats_ca", path)?;
    let bad = |reason: String| ClusterError::File {
        key: "cluster.nats_ca",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("no PEM certificate in {}", path.display())));
    }
    Ok(certs)
}

/// The TLS client configuration for `tls://` URLs, on the ring provider
/// (the only one in the binary), trusting `nats_ca` or the system store.
fn tls_config(settings: &ClusterSettings) -> Result<rustls::ClientConfig, ClusterError> {
    let mut roots = rustls::RootCertStore::empty();
    match &settings.nats_ca {
        Some(path) => {
            for cert in read_ca(path)? {
                roots.add(cert).map_err(|e| ClusterError::File {
                    key: "cluster.nats_ca",
                    reason: format!("{}: {e}", path.display()),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClusterError::Connect(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The state of the NATS link, for `/readyz`, logs and metrics.
pub struct Link {
    connected: AtomicBool,
    ever_connected: AtomicBool,
    down_since: Mutex<Instant>,
    last_error: Mutex<String>,
    node_name: String,
    unready_after: Duration,
    metrics: &'static ClusterMetrics,
    error_log: crate::logging::RateLimit,
}

impl Link {
    fn on_event(&self, event: Event) {
        match event {
            Event::Connected => {
                if self.ever_connected.swap(true, Ordering::AcqRel) {
                    self.metrics.reconnects.increment(1);
                    info!(node = %self.node_name, "NATS link restored");
                } else {
                    info!(node = %self.node_name, "NATS link up");
                }
                self.connected.store(true, Ordering::Release);
                self.metrics.connected.set(1.0);
            }
            Event::Disconnected | Event::Closed => {
                if self.connected.swap(false, Ordering::AcqRel) {
                    *self.down_since.lock() = Instant::now();
                    warn!(node = %self.node_name, "NATS link lost; serving local clients, reconnecting");
                }
                self.metrics.connected.set(0.0);
            }
            Event::SlowConsumer(_) => self.metrics.slow_consumer.increment(1),
            Event::ServerError(e) => self.error(e.to_string()),
            Event::ClientError(e) => self.error(e.to_string()),
            Event::LameDuckMode | Event::Draining => {
                info!(node = %self.node_name, event = %event, "NATS server event")
            }
        }
    }

    fn error(&self, text: String) {
        if let Some(suppressed) = self.error_log.allow() {
            warn!(node = %self.node_name, error = %text, suppressed, "NATS error");
        }
        *self.last_error.lock() = text;
    }

    /// True while the NATS link is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Why `/readyz` should answer 503, once the link has been down for
    /// `unready_after` (never when that is zero).
    pub fn unready_reason(&self) -> Option<String> {
        if self.unready_after.is_zero() || self.is_connected() {
            return None;
        }
        let down = self.down_since.lock().elapsed();
        if down < self.unready_after {
            return None;
        }
        let last = self.last_error.lock().clone();
        let mut reason = format!(
            "not ready: NATS link down for {}s (node {}, cluster.unready_after = {})",
            down.as_secs(),
            self.node_name,
            humantime::format_duration(self.unready_after)
        );
        if !last.is_empty() {
            reason.push_str("; last error: ");
            reason.push_str(&last);
        }
        Some(reason)
    }
}

/// A local publish on its way to NATS.
struct Outgoing {
    subject: String,
    data: Bytes,
}

/// Hands local publishes to the NATS publishing task without waiting.
pub struct Forwarder {
    tx: mpsc::Sender<Outgoing>,
    /// `<subject_prefix>.`
    prefix: Arc<str>,
    metrics: &'static ClusterMetrics,
}

impl Forwarder {
    /// Queues `frame`'s data for NATS under `topic`; a full queue drops it
    /// and counts `publish_failed` (the publisher never waits for NATS).
    pub fn forward(&self, topic: &str, frame: &Bytes) {
        let data = protocol::message_frame_data(frame, topic);
        let subject = [&*self.prefix, topic].concat();
        if self.tx.try_send(Outgoing { subject, data }).is_err() {
            self.metrics.publish_failed.increment(1);
        }
    }
}

/// A running cluster link.
pub struct Cluster {
    link: Arc<Link>,
    node_id: String,
}

impl Cluster {
    /// The NATS link state.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// This process's id in the `Wsbroker-Node` header (node name + random suffix).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// `/readyz`: the reason to answer 503, if any.
    pub fn unready_reason(&self) -> Option<String> {
        self.link.unready_reason()
    }
}

/// Reconnect delay: exponential from 100 ms to 5 s, with jitter.
fn backoff(attempt: usize) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

/// Connects to NATS (in the background: a node whose NATS is not up yet
/// serves its own clients and joins when it appears), attaches to
/// `broker`, and runs until `stop`.
pub async fn start(
    settings: &ClusterSettings,
    max_message_size: usize,
    broker: Arc<Broker>,
    stop: CancellationToken,
) -> Result<Arc<Cluster>, ClusterError> {
    let metrics = crate::metrics::cluster_metrics();
    let node_id = format!("{}-{:08x}", settings.node_name, fastrand::u32(..));
    let link = Arc::new(Link {
        connected: AtomicBool::new(false),
        ever_connected: AtomicBool::new(false),
        down_since: Mutex::new(Instant::now()),
        last_error: Mutex::new(String::new()),
        node_name: settings.node_name.clone(),
        unready_after: settings.unready_after,
        metrics,
        error_log: crate::logging::RateLimit::new(Duration::from_secs(5)),
    });
    let events = link.clone();
    let mut options = ConnectOptions::new()
        .name(&settings.node_name)
        // Our own publishes are delivered locally; NATS need not echo them.
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(backoff)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(10))
        .event_callback(move |event| {
            let link = events.clone();
            async move { link.on_event(event) }
        });
    if let Some(path) = &settings.nats_creds {
        let text = read_creds(path)?;
        options = options.credentials(&text).map_err(|e| ClusterError::File {
            key: "cluster.nats_creds",
            reason: e.to_string(),
        })?;
    }
    if !settings.nats_user.is_empty() {
        options =
            options.user_and_password(settings.nats_user.clone(), settings.nats_password.clone());
    }
    if !settings.nats_token.is_empty() {
        options = options.token(settings.nats_token.clone());
    }
    let wants_tls = settings.nats_url.iter().any(|u| u.starts_with("tls://"));
    if wants_tls || settings.nats_ca.is_some() {
        options = options.tls_client_config(tls_config(settings)?);
    }
    let mut addrs = Vec::new();
    for url in &settings.nats_url {
        let addr: ServerAddr = url
            .trim()
            .parse()
            .map_err(|e: io::Error| ClusterError::Connect(format!("cluster.nats_url: {e}")))?;
        addrs.push(addr);
    }
    let client = options
        .connect(addrs)
        .await
        .map_err(|e| ClusterError::Connect(e.to_string()))?;
    info!(node = %settings.node_name, node_id = %node_id, urls = ?settings.nats_url, "cluster: connecting to NATS");

    let prefix: Arc<str> = format!("{}.", settings.subject_prefix).into();
    let (out_tx, out_rx) = mpsc::channel(FORWARD_CAPACITY);
    let (interest_tx, interest_rx) = mpsc::unbounded_channel();
    let forwarder = Forwarder {
        tx: out_tx,
        prefix: prefix.clone(),
        metrics,
    };
    tokio::spawn(publish_loop(
        client.clone(),
        out_rx,
        node_id.clone(),
        metrics,
        stop.clone(),
    ));
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let (pump_tx, pump_rx) = mpsc::unbounded_channel();
    tokio::spawn(pump(pump_rx, inbound_tx, metrics));
    let receiver = Receiver {
        client,
        broker: broker.clone(),
        prefix,
        node_id: node_id.clone(),
        max_message_size,
        held: HashMap::new(),
        live: TopicIndex::new(),
        pump: pump_tx,
        next_serial: 1,
        metrics,
        drop_log: crate::logging::RateLimit::new(Duration::from_secs(5)),
    };
    tokio::spawn(receiver.run(interest_rx, inbound_rx, stop));
    broker.attach_cluster(interest_tx, forwarder);
    Ok(Arc::new(Cluster { link, node_id }))
}

/// Publishes local messages to NATS in the order they were accepted.
async fn publish_loop(
    client: async_nats::Client,
    mut rx: mpsc::Receiver<Outgoing>,
    node_id: String,
    metrics: &'static ClusterMetrics,
    stop: CancellationToken,
) {
    let mut headers = HeaderMap::new();
    headers.insert(NODE_HEADER, node_id.as_str());
    let mut seq = 0u64;
    loop {
        let out = tokio::select! {
            _ = stop.cancelled() => break,
            out = rx.recv() => match out {
                Some(out) => out,
                None => break,
            },
        };
        // While the link is down the client would buffer commands (and
        // then block): count the message as failed instead.
        if client.connection_state() != State::Connected {
            metrics.publish_failed.increment(1);
            continue;
        }
        seq += 1;
        let mut headers = headers.clone();
        headers.insert(SEQ_HEADER, seq.to_string().as_str());
        match client
            .publish_with_headers(out.subject, headers, out.data)
            .await
        {
            Ok(()) => metrics.sent.increment(1),
            Err(e) => {
                debug!(error = %e, "NATS publish failed");
                metrics.publish_failed.increment(1);
            }
        }
    }
    // Hand over what was published before the stop.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
}

/// A held NATS subscription.
struct Held {
    /// Order of taking: the oldest matching subscription is canonical.
    serial: u64,
    /// Ends the subscription's stream (dropping it unsubscribes).
    cancel: CancellationToken,
    /// Set while no local subscriber holds the pattern: drop at this time.
    linger_until: Option<Instant>,
}

/// A message from NATS with the serial of the subscription it came in on.
type Copy = (u64, async_nats::Message);

/// A subscription handed to the pump: its serial, the stream, and the
/// token that ends it (dropping the stream unsubscribes).
type Taken = (u64, async_nats::Subscriber, CancellationToken);

/// One subscription's stream in the pump, tagged with its serial.
type Tagged = std::pin::Pin<Box<dyn futures_util::Stream<Item = Copy> + Send>>;

/// The sender and sequence number of a message a node published; `None`
/// for other NATS clients' messages.
fn sender_seq(msg: &async_nats::Message) -> Option<(&str, u64)> {
    let h = msg.headers.as_ref()?;
    let node = h.get(NODE_HEADER)?.as_str();
    let seq = h.get(SEQ_HEADER)?.as_str().parse().ok()?;
    Some((node, seq))
}

/// Puts messages taken from several subscriptions back in each sender's
/// order.
///
/// The NATS client reads its socket in order and hands each message to its
/// subscription's queue before it reads the next. So once a message has
/// been taken from any queue, every message that came before it on the
/// socket is already in some queue. A round therefore takes whatever the
/// queues hold (pass 1), then takes again (pass 2: now every predecessor of
/// a pass-1 message is in hand), and releases, per sender, the messages up
/// to the highest sequence number seen in pass 1, in sequence order. Later
/// ones wait for the next round, which starts at once. Messages without a
/// sequence (other NATS clients) keep their arrival order per subscription.
#[derive(Default)]
pub struct Merge {
    held: Vec<Copy>,
}

impl Merge {
    /// Messages waiting for a later round.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Adds a message taken outside a round (the one a wait returned).
    pub fn push(&mut self, copy: Copy) {
        self.held.push(copy);
    }

    /// One round over `take` (which drains every queue without waiting
    /// into the vector it is given); returns the messages to release, in
    /// order.
    pub fn round(&mut self, mut take: impl FnMut(&mut Vec<Copy>)) -> Vec<Copy> {
        take(&mut self.held);
        let mut bound: HashMap<&str, u64> = HashMap::new();
        for (_, msg) in &self.held {
            if let Some((node, seq)) = sender_seq(msg) {
                let b = bound.entry(node).or_insert(seq);
                *b = (*b).max(seq);
            }
        }
        // Owned: the bounds borrow from messages about to move.
        let bound: HashMap<String, u64> =
            bound.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        take(&mut self.held);
        let (mut out, later): (Vec<Copy>, Vec<Copy>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(_, msg)| match sender_seq(msg) {
                None => true,
                Some((node, seq)) => bound.get(node).is_some_and(|b| seq <= *b),
            });
        self.held = later;
        // Stable: messages without a sequence keep their arrival order.
        out.sort_by(|(_, a), (_, b)| sender_seq(a).cmp(&sender_seq(b)));
        out
    }
}

/// Moves every subscription's messages into the shared inbound queue, in
/// each sender's order ([`Merge`]), without waiting: a full queue drops the
/// message (`slow_consumer`). A subscription ends (and is dropped, which
/// unsubscribes) when its token is cancelled.
async fn pump(
    mut taken: mpsc::UnboundedReceiver<Taken>,
    inbound: mpsc::Sender<Copy>,
    metrics: &'static ClusterMetrics,
) {
    let mut subs: futures_util::stream::SelectAll<Tagged> = futures_util::stream::SelectAll::new();
    let add = |subs: &mut futures_util::stream::SelectAll<Tagged>, (serial, sub, cancel): Taken| {
        let stream = sub
            .map(move |msg| (serial, msg))
            .take_until(cancel.cancelled_owned());
        subs.push(Box::pin(stream));
    };
    let mut merge = Merge::default();
    loop {
        if merge.is_empty() {
            tokio::select! {
                t = taken.recv() => match t {
                    Some(t) => add(&mut subs, t),
                    None => break,
                },
                Some(copy) = subs.next(), if !subs.is_empty() => merge.push(copy),
            }
        }
        while let Ok(t) = taken.try_recv() {
            add(&mut subs, t);
        }
        // Through the `SelectAll` (not each stream on its own): a poll
        // without a waker must not replace the wakers it waits on, and it
        // drops the streams that have ended (which unsubscribes them).
        let out = merge.round(|into| {
            while let Some(Some(copy)) = subs.next().now_or_never() {
                into.push(copy);
            }
        });
        for copy in out {
            match inbound.try_send(copy) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => metrics.slow_consumer.increment(1),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        // A round may release nothing (all held for the next one); let the
        // NATS client's task run before taking again.
        tokio::task::yield_now().await;
    }
}

/// Follows the broker's patterns with NATS subscriptions and delivers
/// what arrives on them.
struct Receiver {
    client: async_nats::Client,
    broker: Arc<Broker>,
    prefix: Arc<str>,
    node_id: String,
    max_message_size: usize,
    held: HashMap<Box<str>, Held>,
    /// The held patterns by serial, to find the canonical one for a topic.
    live: TopicIndex<()>,
    /// Hands new subscriptions to the pump.
    pump: mpsc::UnboundedSender<Taken>,
    next_serial: u64,
    metrics: &'static ClusterMetrics,
    drop_log: crate::logging::RateLimit,
}

impl Receiver {
    async fn run(
        mut self,
        mut interest: mpsc::UnboundedReceiver<Interest>,
        mut inbound: mpsc::Receiver<Copy>,
        stop: CancellationToken,
    ) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                change = interest.recv() => match change {
                    Some(Interest::Added(p)) => self.add(p).await,
                    Some(Interest::Removed(p)) => {
                        if let Some(h) = self.held.get_mut(&p) {
                            h.linger_until = Some(Instant::now() + INTEREST_LINGER);
                        }
                    }
                    None => break,
                },
                Some((serial, msg)) = inbound.recv() => self.on_message(serial, msg),
                _ = sweep.tick() => self.sweep(),
            }
        }
        for held in self.held.values() {
            held.cancel.cancel();
        }
    }

    async fn add(&mut self, pattern: Box<str>) {
        if let Some(h) = self.held.get_mut(&pattern) {
            h.linger_until = None;
            return;
        }
        let subject = [&*self.prefix, &*pattern].concat();
        match self.client.subscribe(subject).await {
            Ok(sub) => {
                let serial = self.next_serial;
                self.next_serial += 1;
                let cancel = CancellationToken::new();
                // Only fails once the pump has ended (shutdown).
                let _ = self.pump.send((serial, sub, cancel.clone()));
                self.live.insert(&pattern, serial, ());
                self.held.insert(
                    pattern,
                    Held {
                        serial,
                        cancel,
                        linger_until: None,
                    },
                );
                self.metrics.subscriptions.set(self.held.len() as f64);
            }
            // Only when the client is closed (shutdown).
            Err(e) => warn!(pattern = %pattern, error = %e, "NATS subscribe failed"),
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let expired: Vec<Box<str>> = self
            .held
            .iter()
            .filter(|(_, h)| h.linger_until.is_some_and(|t| t <= now))
            .map(|(p, _)| p.clone())
            .collect();
        for pattern in expired {
            if let Some(h) = self.held.remove(&pattern) {
                self.live.remove(&pattern, h.serial);
                h.cancel.cancel();
            }
        }
        self.metrics.subscriptions.set(self.held.len() as f64);
    }

    fn on_message(&mut self, serial: u64, msg: async_nats::Message) {
        let own = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(NODE_HEADER))
            .is_some_and(|v| v.as_str() == self.node_id);
        if own {
            return;
        }
        let Some(topic) = msg.subject.strip_prefix(&*self.prefix) else {
            return;
        };
        // One copy per message: the one on the oldest held subscription
        // matching the topic (see the module docs).
        let mut canonical = u64::MAX;
        self.live
            .for_each_match(topic, |s, _| canonical = canonical.min(s));
        if canonical != serial {
            return;
        }
        self.metrics.received.increment(1);
        match self.check(topic, &msg.payload) {
            Ok(data) => {
                let frame = protocol::message_frame(topic, data);
                self.broker.deliver_remote(topic, &frame);
            }
            Err(reason) => {
                self.metrics.bad_payload.increment(1);
                if let Some(suppressed) = self.drop_log.allow() {
                    warn!(subject = %msg.subject, reason, suppressed, "dropped a message from NATS");
                }
            }
        }
    }

    /// The message's data when it can be delivered as is.
    fn check<'a>(&self, topic: &str, payload: &'a [u8]) -> Result<&'a str, String> {
        protocol::validate_topic(topic, false).map_err(|e| format!("bad topic: {e}"))?;
        if payload.len() > self.max_message_size {
            return Err(format!(
                "{} bytes is larger than server.max_message_size",
                payload.len()
            ));
        }
        let text = std::str::from_utf8(payload).map_err(|_| "body is not UTF-8".to_string())?;
        if !protocol::depth_within(text, protocol::MAX_DATA_DEPTH) {
            return Err("body nests too deep".into());
        }
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| format!("body is not JSON: {e}"))?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(unready_after: Duration) -> Link {
        Link {
            connected: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
            down_since: Mutex::new(Instant::now()),
            last_error: Mutex::new(String::new()),
            node_name: "n1".into(),
            unready_after,
            metrics: crate::metrics::cluster_metrics(),
            error_log: crate::logging::RateLimit::new(Duration::from_secs(5)),
        }
    }

    fn msg(node: Option<&str>, seq: u64, body: &str) -> async_nats::Message {
        let headers = node.map(|n| {
            let mut h = HeaderMap::new();
            h.insert(NODE_HEADER, n);
            h.insert(SEQ_HEADER, seq.to_string().as_str());
            h
        });
        async_nats::Message {
            subject: "wsbroker.t".into(),
            reply: None,
            payload: Bytes::copy_from_slice(body.as_bytes()),
            headers,
            status: None,
            description: None,
            length: 0,
        }
    }

    fn bodies(out: &[Copy]) -> Vec<String> {
        out.iter()
            .map(|(_, m)| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    #[test]
    fn a_round_restores_each_senders_order_and_holds_what_may_have_predecessors_pending() {
        let mut merge = Merge::default();
        // Pass 1 sees a's 2 (on one subscription) and b's 7; pass 2 sees a's
        // 1 (another subscription, taken before 2 was), a's 3 and a plain
        // NATS client's message.
        let mut passes = vec![
            vec![(1, msg(Some("a"), 2, "a2")), (1, msg(Some("b"), 7, "b7"))],
            vec![
                (2, msg(Some("a"), 1, "a1")),
                (2, msg(None, 0, "n1")),
                (1, msg(Some("a"), 3, "a3")),
            ],
        ]
        .into_iter();
        let out = merge.round(|into| into.extend(passes.next().unwrap_or_default()));
        assert_eq!(bodies(&out), ["n1", "a1", "a2", "b7"]);
        // a's 3 came only in pass 2: one of its predecessors could still
        // have been on its way, so it waits for the next round.
        assert!(!merge.is_empty());
        let out = merge.round(|_| {});
        assert_eq!(bodies(&out), ["a3"]);
        assert!(merge.is_empty());
    }

    #[test]
    fn only_nats_and_tls_urls_with_a_host() {
        assert!(check_url("nats://10.0.0.5:4222").is_ok());
        assert!(check_url("tls://nats.example.com:4222").is_ok());
        assert!(check_url("nats://user:pass@127.0.0.1").is_ok());
        for bad in [
            "ws://a:1",
            "wss://a:1",
            "http://a",
            "10.0.0.5:4222",
            "nats://",
            "tls://:4222",
        ] {
            assert!(check_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn backoff_grows_to_five_seconds_with_jitter() {
        for attempt in 0..100 {
            let d = backoff(attempt);
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
        assert!(backoff(0) <= Duration::from_millis(100));
        assert!(backoff(20) >= Duration::from_millis(2500));
    }

    #[test]
    fn unready_after_the_delay_with_the_reason_and_never_when_zero() {
        let never = link(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(never.unready_reason(), None);

        let l = link(Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(20));
        l.error("authorization violation".into());
        let reason = l.unready_reason().expect("unready");
        assert!(
            reason.contains("NATS link down") && reason.contains("node n1"),
            "{reason}"
        );
        assert!(
            reason.ends_with("last error: authorization violation"),
            "{reason}"
        );
        l.on_event(Event::Connected);
        assert_eq!(l.unready_reason(), None);
        assert!(l.is_connected());
        // Down again: the delay starts over.
        l.on_event(Event::Disconnected);
        assert_eq!(l.unready_reason(), None);
        std::thread::sleep(Duration::from_millis(20));
        assert!(l.unready_reason().is_some());
    }
}
