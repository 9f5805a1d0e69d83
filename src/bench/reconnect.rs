//! `wsbroker bench --connections-only N --reconnect`: a reconnect storm.
//!
//! Opens N connections with full TLS handshakes, each keeping the session
//! the server gives it (its own one-entry session store, so connection i
//! resumes with its own ticket, as N separate clients would), closes them
//! all, then reopens every one with its saved session. Both storms are timed
//! and, with `--server-pid`, the server's CPU per connection is read from
//! `/proc`: what session tickets (CONTRACT §12) save when a fleet of clients
//! reconnects after a network blip or a reload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{client_cpu_seconds, server_cpu_seconds, BenchArgs, BenchError, SPREAD_ADDRS};
use crate::client::{self, ClientError, Target, UpgradeRequest};

/// Per-connection connect budget (TCP + TLS + upgrade).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One storm: N connections opened at `--connect-concurrency`.
#[derive(Debug, Default, Serialize)]
pub struct Storm {
    /// Connections that completed the upgrade.
    pub connections: u64,
    /// Attempts that failed.
    pub errors: u64,
    /// The first failure, to tell why.
    pub first_error: Option<String>,
    /// TLS handshakes the client saw resume.
    pub resumed: u64,
    /// Wall time of the storm.
    pub seconds: f64,
    /// connections / seconds.
    pub per_s: f64,
    /// The server's CPU time during the storm, with --server-pid.
    pub server_cpu_seconds: Option<f64>,
    /// server_cpu_seconds / connections, in microseconds.
    pub server_cpu_us_per_connection: Option<f64>,
    /// This process's CPU time during the storm.
    pub client_cpu_seconds: f64,
}

/// Both storms of a `--reconnect` run.
#[derive(Debug, Default, Serialize)]
pub struct ReconnectReport {
    /// First connections: full handshakes.
    pub full: Storm,
    /// Every connection closed and reopened with its saved session.
    pub resumed: Storm,
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Runs both storms against the first `--url` with `n` connections.
pub async fn run(args: &BenchArgs, n: usize) -> Result<ReconnectReport, BenchError> {
    let mut target = Target::resolve(args.client.primary_url()).await?;
    target.addrs.sort_by_key(|a| !a.is_ipv4());
    let target = Arc::new(target);
    let request = Arc::new(client::upgrade_request(&target, &args.client)?);
    let base = client::tls_config(&args.client)?;
    // One store per connection: each reconnects with its own session.
    let configs: Vec<Arc<rustls::ClientConfig>> = (0..n)
        .map(|_| {
            let mut c = (*base).clone();
            c.resumption = rustls::client::Resumption::store(Arc::new(
                rustls::client::ClientSessionMemoryCache::new(1),
            ));
            Arc::new(c)
        })
        .collect();
    // Two storms use two ports per connection (the first storm's are in
    // TIME_WAIT on this side): spread at half the usual threshold.
    let spread = 2 * n > super::SPREAD_THRESHOLD && target.is_ipv4_loopback();
    let concurrency = args.connect_concurrency.max(1);

    eprintln!("bench: reconnect storm: {n} connections, full handshakes first");
    let (full, streams) = storm(args, &target, &request, &configs, spread, concurrency).await;
    if full.connections == 0 {
        return Err(BenchError::AllConnectsFailed {
            attempts: n,
            first_error: full.first_error.unwrap_or_else(|| "unknown".into()),
        });
    }
    eprintln!(
        "bench: {} connections in {:.2}s ({:.0}/s, {} errors); closing them all",
        full.connections, full.seconds, full.per_s, full.errors
    );
    close_all(streams).await;
    // Let the server finish its side of the closes before the next storm.
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("bench: reopening every connection with its saved session");
    let (resumed, streams) = storm(args, &target, &request, &configs, spread, concurrency).await;
    eprintln!(
        "bench: {} reconnections in {:.2}s ({:.0}/s, {} resumed, {} errors)",
        resumed.connections, resumed.seconds, resumed.per_s, resumed.resumed, resumed.errors
    );
    close_all(streams).await;
    Ok(ReconnectReport { full, resumed })
}

/// Opens one connection per config; returns the storm's figures and the
/// open streams.
async fn storm(
    args: &BenchArgs,
    target: &Arc<Target>,
    request: &Arc<UpgradeRequest>,
    configs: &[Arc<rustls::ClientConfig>],
    spread: bool,
    concurrency: usize,
) -> (Storm, Vec<Tls>) {
    let sem = Arc::new(Semaphore::new(concurrency));
    let resumed = Arc::new(AtomicU64::new(0));
    let cpu0 = (
        client_cpu_seconds(),
        args.server_pid.and_then(server_cpu_seconds),
    );
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(configs.len());
    for (idx, cfg) in configs.iter().enumerate() {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (target, request, cfg, resumed) = (
            target.clone(),
            request.clone(),
            cfg.clone(),
            resumed.clone(),
        );
        let local = spread.then(|| {
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                127,
                0,
                0,
                1 + (idx % SPREAD_ADDRS) as u8,
            ))
        });
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(CONNECT_TIMEOUT, open(&target, &request, cfg, local))
                .await
                .unwrap_or(Err(ClientError::Timeout("connecting (over 30 s)")));
            drop(permit);
            if let Ok((_, true)) = &r {
                resumed.fetch_add(1, Ordering::Relaxed);
            }
            r.map(|(tls, _)| tls)
        }));
    }
    let mut streams = Vec::with_capacity(tasks.len());
    let mut s = Storm::default();
    for t in tasks {
        match t.await {
            Ok(Ok(tls)) => streams.push(tls),
            Ok(Err(e)) => {
                s.errors += 1;
                s.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    s.seconds = start.elapsed().as_secs_f64();
    let cpu1 = (
        client_cpu_seconds(),
        args.server_pid.and_then(server_cpu_seconds),
    );
    s.connections = streams.len() as u64;
    s.resumed = resumed.load(Ordering::Relaxed);
    s.per_s = s.connections as f64 / s.seconds.max(1e-9);
    s.client_cpu_seconds = cpu1.0 - cpu0.0;
    s.server_cpu_seconds = cpu0.1.zip(cpu1.1).map(|(a, b)| b - a);
    s.server_cpu_us_per_connection = s
        .server_cpu_seconds
        .map(|c| c * 1e6 / s.connections.max(1) as f64);
    (s, streams)
}

/// TCP, TLS (resuming when the config holds a session) and the upgrade;
/// true when the handshake resumed. Reading the 101 also takes in the TLS
/// 1.3 tickets the server sends after its handshake.
async fn open(
    target: &Target,
    request: &UpgradeRequest,
    cfg: Arc<rustls::ClientConfig>,
    local: Option<std::net::IpAddr>,
) -> Result<(Tls, bool), ClientError> {
    let mut tls = client::connect_tls(target, cfg, local).await?;
    super::receiver::upgrade(&mut tls, request).await?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok((tls, resumed))
}

/// Sends each a Close (1000) and close_notify, then drops them.
async fn close_all(streams: Vec<Tls>) {
    let close = {
        // A masked Close frame with code 1000 (mask 0: the payload is as is).
        let mut f = vec![0x88, 0x82, 0, 0, 0, 0];
        f.extend_from_slice(&1000u16.to_be_bytes());
        f
    };
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut tls| {
            let close = close.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    let _ = tls.write_all(&close).await;
                    let _ = tls.shutdown().await;
                })
                .await;
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}
