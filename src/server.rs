//! Listeners, connection limits, the handshake budget and the accept loop;
//! `start` wires the whole daemon together and returns a handle for tests and
//! the lifecycle (reload, drain).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::config::{
    AdminSettings, AuthMode, AuthSettings, ConnectionSettings, LogSettings, ServerSettings,
    Settings,
};
use crate::handshake::{self, Refusal, Rules};
use crate::logging::RateLimit;
use crate::metrics::{Metrics, RejectReason};
use crate::origin::OriginPolicy;
use crate::tls::{DevCert, TlsError, TlsMaterial, TlsState};

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Certificate or key problems.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// Config key.
        key: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Origin patterns did not parse.
    #[error("origins.allow: {0}")]
    Origins(String),
    /// `[auth]` keys or lists did not load (each line names its key).
    #[error("{}", .0.join("; "))]
    Auth(Vec<String>),
}

/// Over-limit handshakes answered with a 503 at once; beyond this they are
/// simply closed, so a flood cannot make us do TLS work for it. Large
/// enough that a burst of a few hundred clients past the limit each get
/// the contract's 503 (each refusal holds an fd and ~40 KB for a moment).
pub const MAX_REFUSING: usize = 256;

/// Counts connections in total and per source address.
pub struct Limiter {
    max: usize,
    per_ip: usize,
    total: AtomicUsize,
    refusing: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A held connection slot; released on drop.
pub struct Slot {
    limiter: Arc<Limiter>,
    ip: IpAddr,
    /// Why this connection is over a limit (it is still answered with a 503).
    over: Option<String>,
    refusing: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.total.fetch_sub(1, Ordering::AcqRel);
        if self.refusing {
            self.limiter.refusing.fetch_sub(1, Ordering::AcqRel);
        }
        if self.limiter.per_ip > 0 {
            let mut map = self.limiter.by_ip.lock();
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

impl Limiter {
    fn new(max: usize, per_ip: usize) -> Self {
        Limiter {
            max,
            per_ip,
            total: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a slot; `None` means close the socket without answering.
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        let mut over =
            (total > self.max).then(|| format!("server is at its connection limit ({})", self.max));
        if self.per_ip > 0 {
            let mut map = self.by_ip.lock();
            let n = map.entry(ip).or_insert(0);
            *n += 1;
            if *n > self.per_ip && over.is_none() {
                over = Some(format!(
                    "too many connections from your address (limit {})",
                    self.per_ip
                ));
            }
        }
        let mut slot = Slot {
            limiter: self.clone(),
            ip,
            over,
            refusing: false,
        };
        if slot.over.is_some() {
            if self.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
                self.refusing.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            slot.refusing = true;
        }
        Some(slot)
    }

    /// Connections currently held (including handshakes in progress).
    pub fn current(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// State shared by every task of the daemon.
pub struct Shared {
    /// Subscriptions and routing.
    pub broker: Arc<Broker>,
    /// Metric handles.
    pub metrics: &'static Metrics,
    /// Current TLS configuration.
    pub tls: TlsState,
    /// Current Origin allowlist.
    pub origins: ArcSwap<OriginPolicy>,
    /// Settings the daemon started with.
    pub settings: ArcSwap<Settings>,
    /// Per-connection settings.
    pub connection: Arc<ConnectionSettings>,
    /// Connection limits.
    pub limiter: Arc<Limiter>,
    /// Stops the accept loops.
    pub stop_accepting: CancellationToken,
    /// Starts the graceful close of every connection.
    pub drain: CancellationToken,
    /// Cuts whatever is left.
    pub hard: CancellationToken,
    /// Every connection task.
    pub tracker: TaskTracker,
    /// False while draining (`/readyz`).
    pub ready: AtomicBool,
    /// The generated certificate in dev mode.
    pub dev_cert: Option<DevCert>,
    /// `[auth]` keys and lists (replaced whole on reload); `auth.mode`
    /// itself needs a restart.
    pub auth: Arc<ArcSwap<Authenticator>>,
    /// Stops the refresh loop of the current `auth.jwks_url`.
    jwks_stop: Mutex<CancellationToken>,
    next_id: AtomicU64,
    accept_log: RateLimit,
    reject_log: RateLimit,
}

/// A running daemon.
pub struct RunningServer {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, ServerError> {
    let err = |source| ServerError::Bind { key, addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    if addr.is_ipv6() {
        // So "[::]:8443" and "0.0.0.0:8443" can both be listed.
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(4096).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// Binds the listeners and starts serving.
pub async fn start(settings: Settings) -> Result<RunningServer, ServerError> {
    crate::tls::install_default_provider();
    let metrics = crate::metrics::metrics();
    let dev_cert = if settings.dev && settings.tls.cert.is_none() {
        Some(crate::tls::generate_dev_cert()?)
    } else {
        None
    };
    let material = TlsMaterial::load(&settings.tls, dev_cert.as_ref())?;
    crate::metrics::record_tls_cert(metrics, &material.certified.cert);
    crate::metrics::record_max_connections(metrics, settings.server.max_connections);
    let tls = TlsState::new(material.server_configs()?);
    let origins = OriginPolicy::new(&settings.origins.allow, settings.origins.allow_missing)
        .map_err(|e| ServerError::Origins(e.to_string()))?;
    let auth = Authenticator::load(&settings.auth, None).map_err(ServerError::Auth)?;
    // Refresh loops end with the daemon (`hard`), or on a reload that
    // replaces the URL.
    let hard = CancellationToken::new();
    let jwks_stop = hard.child_token();
    start_jwks(&auth, &jwks_stop).await;
    let mut listeners = Vec::new();
    for addr in &settings.server.listen {
        listeners.push(bind(*addr, "server.listen")?);
    }
    let admin_listener = match settings.admin.listen {
        Some(addr) => Some(bind(addr, "admin.listen")?),
        None => None,
    };
    let shared = Arc::new(Shared {
        broker: Arc::new(Broker::new(metrics)),
        metrics,
        tls,
        origins: ArcSwap::from_pointee(origins),
        connection: Arc::new(settings.connection.clone()),
        limiter: Arc::new(Limiter::new(
            settings.server.max_connections,
            settings.server.max_connections_per_ip,
        )),
        settings: ArcSwap::from_pointee(settings),
        stop_accepting: CancellationToken::new(),
        drain: CancellationToken::new(),
        hard,
        tracker: TaskTracker::new(),
        ready: AtomicBool::new(true),
        dev_cert,
        auth: Arc::new(ArcSwap::from_pointee(auth)),
        jwks_stop: Mutex::new(jwks_stop),
        next_id: AtomicU64::new(1),
        accept_log: RateLimit::new(Duration::from_secs(1)),
        reject_log: RateLimit::new(Duration::from_secs(1)),
    });
    let mut local_addrs = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            key: "server.listen",
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        info!(%addr, "listening (wss)");
        local_addrs.push(addr);
        tokio::spawn(accept_loop(listener, shared.clone()));
    }
    let admin_addr = match admin_listener {
        Some(listener) => {
            let addr = listener.local_addr().ok();
            if let Some(a) = addr {
                info!(addr = %a, "admin listening (http)");
            }
            tokio::spawn(crate::admin::serve(listener, shared.clone()));
            addr
        }
        None => None,
    };
    Ok(RunningServer {
        shared,
        local_addrs,
        admin_addr,
    })
}

impl RunningServer {
    /// Bound wss addresses (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Bound admin address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The generated certificate (PEM) in dev mode.
    pub fn dev_cert_pem(&self) -> Option<&str> {
        self.shared.dev_cert.as_ref().map(|d| d.cert_pem.as_str())
    }

    /// Shared state (broker, limits, tokens).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Applies what a reload may change; returns the keys that need a restart.
    pub fn reload(&self, new: Settings) -> Result<Vec<String>, ServerError> {
        let material = TlsMaterial::load(&new.tls, self.shared.dev_cert.as_ref())?;
        let config = material.server_configs()?;
        let origins = OriginPolicy::new(&new.origins.allow, new.origins.allow_missing)
            .map_err(|e| ServerError::Origins(e.to_string()))?;
        let old_auth = self.shared.auth.load_full();
        // auth.mode needs a restart (connections' sessions depend on it).
        let mut auth_settings = new.auth.clone();
        auth_settings.mode = old_auth.mode();
        let auth =
            Authenticator::load(&auth_settings, Some(&old_auth)).map_err(ServerError::Auth)?;
        self.shared.tls.replace(config);
        if !same_remote(&auth, &old_auth) {
            let stop = self.shared.hard.child_token();
            let old_stop = std::mem::replace(&mut *self.shared.jwks_stop.lock(), stop.clone());
            old_stop.cancel();
            // The first fetch of a new URL runs in the background: a reload
            // never waits on an identity provider.
            let remote = auth.remote().cloned();
            let every = auth.settings().jwks_refresh;
            if let Some(remote) = remote {
                tokio::spawn(async move {
                    let _ = remote.refresh("reload").await;
                    remote.refresh_loop(every, stop).await;
                });
            }
        }
        self.shared.auth.store(Arc::new(auth));
        crate::metrics::record_tls_cert(self.shared.metrics, &material.certified.cert);
        self.shared.origins.store(Arc::new(origins));
        if let Err(e) = crate::logging::set_level(&new.log.level) {
            warn!(error = %e, "log level not changed");
        }
        let old = self.shared.settings.load_full();
        let restart = needs_restart(&old, &new);
        let mut kept = (*old).clone();
        kept.tls = new.tls;
        kept.origins = new.origins;
        kept.log.level = new.log.level;
        // Read per request by the admin listener: rotating it needs no restart.
        kept.admin.publish_token = new.admin.publish_token;
        kept.auth = auth_settings;
        self.shared.settings.store(Arc::new(kept));
        Ok(restart)
    }

    /// Graceful drain (CONTRACT §9): stop accepting, close every client with
    /// 1001 spread over `shutdown_grace`, then cut what is left.
    pub async fn shutdown(&self) {
        let s = &self.shared;
        s.ready.store(false, Ordering::Release);
        s.stop_accepting.cancel();
        // Before the snapshot: a connection registering after it sees the
        // token and closes itself.
        s.drain.cancel();
        s.tracker.close();
        let grace = s.settings.load().server.shutdown_grace;
        let start = tokio::time::Instant::now();
        // Closes are spread (with jitter) over most of the grace window so
        // clients do not all reconnect at once; the rest of the window is for
        // their close replies.
        let spread = grace.mul_f64(0.75);
        let mut schedule: Vec<_> = s
            .broker
            .subscribers()
            .into_iter()
            .map(|sub| (spread.mul_f64(fastrand::f64()), sub))
            .collect();
        schedule.sort_by_key(|(at, _)| *at);
        let closer = tokio::spawn(async move {
            for (at, sub) in schedule {
                tokio::time::sleep_until(start + at).await;
                sub.outbox.close(crate::queue::CloseRequest::shutdown());
            }
        });
        if tokio::time::timeout(grace, s.tracker.wait()).await.is_err() {
            warn!("shutdown grace expired; cutting the remaining connections");
            self.cut();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.tracker.wait()).await;
        }
        closer.abort();
        s.hard.cancel();
    }

    /// Ends every connection now, without close handshakes.
    pub fn cut(&self) {
        for sub in self.shared.broker.subscribers() {
            sub.outbox.abort();
        }
        self.shared.hard.cancel();
    }
}

/// The keys that differ between the running and the new settings but only
/// take effect on a restart, named `section.key`.
fn needs_restart(old: &Settings, new: &Settings) -> Vec<String> {
    let mut keys = Vec::new();
    // The destructuring lists every field without `..`: a key added to a
    // section does not compile until it is sorted into restart or reloaded.
    macro_rules! diff {
        ($ty:ident $section:ident: $($key:ident),* ; reloaded: $($live:ident),*) => {{
            let $ty { $($key: _,)* $($live: _,)* } = &new.$section;
            $(if old.$section.$key != new.$section.$key {
                keys.push(concat!(stringify!($section), ".", stringify!($key)).to_string());
            })*
        }};
    }
    diff!(ServerSettings server: listen, path, max_connections, max_connections_per_ip,
        handshake_timeout, max_message_size, shutdown_grace; reloaded:);
    diff!(ConnectionSettings connection: queue_capacity, queue_max_bytes, overflow,
        max_subscriptions, max_inbound_rate, ping_interval, idle_timeout; reloaded:);
    diff!(AdminSettings admin: listen; reloaded: publish_token);
    diff!(LogSettings log: format; reloaded: level);
    diff!(AuthSettings auth: mode; reloaded: hmac_secret_file, public_keys, jwks_file, jwks_url,
        jwks_refresh, jwks_ca, allow_query_token, issuer, audience, leeway, auth_timeout,
        anonymous_subscribe, anonymous_publish, default_subscribe, default_publish);
    keys
}

/// Whether two configurations share one `jwks_url` key set.
fn same_remote(a: &Authenticator, b: &Authenticator) -> bool {
    match (a.remote(), b.remote()) {
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        (None, None) => true,
        _ => false,
    }
}

/// At start: the first fetch of `auth.jwks_url` (bounded by its timeout; a
/// failure is logged and retried on schedule), then the refresh loop.
async fn start_jwks(auth: &Authenticator, stop: &CancellationToken) {
    if let Some(remote) = auth.remote().cloned() {
        let _ = remote.refresh("start").await;
        tokio::spawn(remote.refresh_loop(auth.settings().jwks_refresh, stop.clone()));
    }
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop_accepting.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Some(slot) = shared.limiter.acquire(peer.ip()) else {
                    shared.metrics.rejected(RejectReason::Limit).increment(1);
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let fut = handle(tcp, peer, id, slot, shared.clone());
                shared.tracker.spawn(fut);
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the
                // pending connection stays in the backlog until fds free up.
                shared.metrics.accept_errors.increment(1);
                if let Some(suppressed) = shared.accept_log.allow() {
                    warn!(error = %e, suppressed, "accept failed");
                }
                let pause = if is_fd_exhaustion(&e) { 100 } else { 10 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}

fn reject(shared: &Shared, peer: SocketAddr, label: RejectReason, reason: &str) {
    shared.metrics.rejected(label).increment(1);
    if let Some(suppressed) = shared.reject_log.allow() {
        debug!(%peer, reason = label.as_str(), detail = reason, suppressed, "handshake rejected");
    }
}

/// One accepted socket: the handshake, then the connection as a task of its
/// own. Two tasks, so the long-lived one is allocated at the size of the
/// connection's future alone, not of the handshake's (TLS accept, request
/// buffer, the stream before the split). The slot goes with the connection.
async fn handle(tcp: TcpStream, peer: SocketAddr, id: u64, slot: Slot, shared: Arc<Shared>) {
    if let Some((tls, leftover, ctx)) = upgrade(tcp, peer, id, &slot, &shared).await {
        shared
            .tracker
            .spawn(crate::connection::run(tls, leftover, ctx, slot));
    }
}

type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// The TLS handshake, with the configuration chosen from the ClientHello
/// (suite order: see `tls`). Both steps answer a bad hello with its alert.
async fn tls_accept(tcp: TcpStream, shared: &Shared) -> std::io::Result<ServerTls> {
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let config = shared.tls.config_for(&start.client_hello());
    start.into_stream(config).await
}

async fn upgrade(
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    slot: &Slot,
    shared: &Arc<Shared>,
) -> Option<(ServerTls, Vec<u8>, crate::connection::Context)> {
    let settings = shared.settings.load_full();
    let budget = settings.server.handshake_timeout;
    let upgraded = tokio::time::timeout(budget, async {
        let mut tls = match tls_accept(tcp, shared).await {
            Ok(tls) => tls,
            Err(e) => {
                reject(shared, peer, RejectReason::Tls, &e.to_string());
                return None;
            }
        };
        let origins = shared.origins.load();
        let rules = Rules {
            path: &settings.server.path,
            origins: &origins,
        };
        let verdict = match handshake::read_and_evaluate(&mut tls, &rules).await {
            Ok(v) => v,
            Err(e) => {
                reject(shared, peer, RejectReason::BadRequest, &e.to_string());
                return None;
            }
        };
        let verdict = match (verdict, &slot.over) {
            (Ok(_), Some(over)) => Err(Refusal::limit(over.clone())),
            (Ok(_), None) if !shared.ready.load(Ordering::Acquire) => {
                Err(Refusal::limit("server is shutting down"))
            }
            (v, _) => v,
        };
        // Tokens are checked last: a request refused anyway costs no
        // signature check. Verification is CPU work per connection, done
        // here in the handshake task.
        let (verdict, session) = match verdict {
            Ok(accepted) => match admit(shared, id, peer, &accepted.presented).await {
                Ok(session) => (Ok(accepted), session),
                Err(refusal) => (Err(refusal), None),
            },
            Err(r) => (Err(r), None),
        };
        match verdict {
            Ok(accepted) => {
                match handshake::switch(&mut tls, &accepted.accept_key, accepted.protocol).await {
                    Ok(()) => Some((tls, accepted, session)),
                    Err(e) => {
                        reject(shared, peer, RejectReason::BadRequest, &e.to_string());
                        None
                    }
                }
            }
            Err(refusal) => {
                reject(shared, peer, refusal.label, &refusal.reason);
                let _ = handshake::respond(&mut tls, &refusal).await;
                None
            }
        }
    })
    .await;
    let (tls, accepted, session) = match upgraded {
        Ok(Some(pair)) => pair,
        Ok(None) => return None,
        Err(_) => {
            reject(shared, peer, RejectReason::Timeout, "handshake timeout");
            return None;
        }
    };
    let ctx = crate::connection::Context {
        id,
        peer,
        broker: shared.broker.clone(),
        settings: shared.connection.clone(),
        metrics: shared.metrics,
        drain: shared.drain.clone(),
        max_message_size: settings.server.max_message_size,
        auth: session.map(|s| (shared.auth.clone(), Box::new(s))),
    };
    Some((tls, accepted.leftover, ctx))
}

/// `auth.mode = "jwt"`: the connection's session from the request's token
/// (or the anonymous one), or a 401. `Ok(None)` in mode none, where tokens
/// are ignored wherever they appear.
async fn admit(
    shared: &Shared,
    id: u64,
    peer: SocketAddr,
    presented: &crate::auth::Presented,
) -> Result<Option<crate::auth::Session>, Refusal> {
    let auth = shared.auth.load_full();
    if auth.mode() == AuthMode::None {
        return Ok(None);
    }
    match crate::auth::admit(&auth, presented).await {
        Ok(session) => Ok(Some(session)),
        Err(e) => {
            let reason = e.reason();
            shared.metrics.auth_rejected(reason).increment(1);
            crate::auth::log_rejection(id, peer, reason.as_str(), &e.to_string());
            Err(Refusal::auth(e.to_string()))
        }
    }
}
