//! Churn soak (issue 7) against the real binary: ROUNDS rounds of CLIENTS
//! clients connecting, subscribing and receiving while a publisher runs;
//! half of them close cleanly, half vanish (socket dropped, no close frame).
//! After every round the daemon's open fds, active-connection and
//! subscription gauges return to their baseline; its RSS does not grow round
//! over round; every clean subscriber got every message published while it
//! was subscribed, in order.
//!
//! The size, 50 rounds x 200 clients, takes ~40 s on 2 cores (debug
//! build); SOAK_ROUNDS / SOAK_CLIENTS override it (e.g. a longer local run).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The daemon as a child process; killed on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    _cert: TestCert,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    async fn start() -> Daemon {
        let cert = make_cert();
        let (port, admin_port) = (free_port(), free_port());
        let file = cert.dir.path().join("soak.toml");
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nhandshake_timeout = \"5s\"\nshutdown_grace = \"2s\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [origins]\nallow = [\"{ORIGIN}\"]\n\
             [connection]\nping_interval = \"1s\"\nidle_timeout = \"3s\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [log]\nlevel = \"warn\"\n",
            cert.cert_path.display(),
            cert.key_path.display()
        );
        std::fs::write(&file, toml).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
            .arg("serve")
            .arg("--config")
            .arg(&file)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wsbroker");
        let daemon = Daemon {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            tls: client_config(&cert.cert_der),
            _cert: cert,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(daemon.admin).await.is_ok() {
                let r = admin_request(
                    daemon.admin,
                    "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .await;
                if r.starts_with("HTTP/1.1 200") {
                    return daemon;
                }
            }
            assert!(Instant::now() < deadline, "daemon did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open fds of the daemon (exact: /proc of a child process).
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("proc fd")
            .count()
    }

    /// What each open fd of the daemon points at, for failure messages.
    fn fd_targets(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| {
                        let target = std::fs::read_link(e.path())
                            .map(|t| t.display().to_string())
                            .unwrap_or_else(|_| "?".into());
                        format!("{}->{target}", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The daemon's fd count at rest. A single sample can include the
    /// server side of an admin request whose client already saw EOF (the
    /// daemon closes that fd a moment later), which would make an exact
    /// baseline one too high: take the least of samples over half a second.
    async fn fds_at_rest(&self) -> usize {
        let mut least = usize::MAX;
        for _ in 0..10 {
            least = least.min(self.fds());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        least
    }

    fn rss_bytes(&self) -> u64 {
        proc_status(self.pid(), "VmRSS:") * 1024
    }

    fn threads(&self) -> u64 {
        proc_status(self.pid(), "Threads:")
    }

    async fn gauge(&self, series: &str) -> f64 {
        let text = admin_request(
            self.admin,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        metric(&text, series)
    }

    async fn ws(&self) -> Ws {
        let tcp = TcpStream::connect(self.addr).await.expect("tcp");
        let name = ServerName::try_from("localhost").expect("name");
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .expect("tls");
        let mut req = format!("wss://localhost:{}/ws", self.addr.port())
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("Origin", ORIGIN.parse().expect("header"));
        tokio_tungstenite::client_async(req, tls)
            .await
            .expect("upgrade")
            .0
    }
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(Path::new(&format!("/proc/{pid}/status"))).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

/// Next frame as JSON, skipping control frames.
async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .map_err(|_| "timed out waiting for a frame".to_string())?
            .ok_or("stream ended")?
            .map_err(|e| e.to_string())?;
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).map_err(|e| e.to_string()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return Err(format!("unexpected frame {other:?}")),
        }
    }
}

fn seq_of(v: &Value) -> Result<i64, String> {
    if v["type"] != "message" || v["topic"] != "soak.t" {
        return Err(format!("unexpected frame {v}"));
    }
    v["data"]["seq"].as_i64().ok_or(format!("no seq in {v}"))
}

/// One churn client: subscribe, check contiguous delivery of everything
/// published while subscribed, then close cleanly or vanish.
async fn churn_client(
    daemon: Arc<Daemon>,
    pattern: &'static str,
    last_acked: Arc<AtomicI64>,
    clean: bool,
    min_messages: usize,
) -> Result<usize, String> {
    let mut ws = daemon.ws().await;
    ws.send(Message::Text(
        json!({"op":"subscribe","topic":pattern,"id":1})
            .to_string()
            .into(),
    ))
    .await
    .map_err(|e| e.to_string())?;
    // Messages may overtake the ack (the subscription is live before the ack is queued).
    let mut seqs: Vec<i64> = Vec::new();
    let acked_at_subscribe = loop {
        let v = next_json(&mut ws).await?;
        if v == json!({"type":"ack","id":1}) {
            break last_acked.load(Ordering::SeqCst);
        }
        seqs.push(seq_of(&v)?);
    };
    while seqs.len() < min_messages {
        seqs.push(seq_of(&next_json(&mut ws).await?)?);
    }
    // Everything acked by now must arrive.
    let stop_at = last_acked.load(Ordering::SeqCst);
    while seqs.last().copied().unwrap_or(i64::MIN) < stop_at {
        seqs.push(seq_of(&next_json(&mut ws).await?)?);
    }
    // The publisher waits for each ack before the next publish, so the
    // second publish after our ack was certainly routed after our subscribe.
    let first = seqs[0];
    if first > acked_at_subscribe + 2 {
        return Err(format!(
            "first message {first}, but {} was published after the subscription",
            acked_at_subscribe + 2
        ));
    }
    for w in seqs.windows(2) {
        if w[1] != w[0] + 1 {
            return Err(format!("gap or reorder: {} then {}", w[0], w[1]));
        }
    }
    if clean {
        ws.close(None).await.map_err(|e| e.to_string())?;
        // Drain until the server's close reply ends the stream.
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await {
                Err(_) => return Err("no close reply".into()),
                Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(_))) => continue,
            }
        }
    } else {
        // Vanish: drop the socket, no close frame.
        drop(ws);
    }
    Ok(seqs.len())
}

/// Polls the daemon until `check` holds, or panics after `within`.
async fn settle(daemon: &Daemon, what: &str, within: Duration, baseline_fds: usize) {
    let deadline = Instant::now() + within;
    loop {
        let conns = daemon.gauge("wsbroker_connections_active").await;
        let subs = daemon.gauge("wsbroker_subscriptions_active").await;
        let fds = daemon.fds();
        // 1 connection: the publisher.
        if conns == 1.0 && subs == 0.0 && fds == baseline_fds {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: connections {conns} (want 1), subscriptions {subs} (want 0), fds {fds} (want {baseline_fds}): {:?}",
            daemon.fd_targets()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_soak_returns_to_baseline() {
    let rounds = env_or("SOAK_ROUNDS", 50);
    let clients = env_or("SOAK_CLIENTS", 200);
    let min_messages = 8;
    let started = Instant::now();
    let daemon = Arc::new(Daemon::start().await);

    // The publisher: one message at a time, each acked before the next.
    let last_acked = Arc::new(AtomicI64::new(-1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut publ = daemon.ws().await;
    let publisher = {
        let (last_acked, stop) = (last_acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seq: i64 = 0;
            while !stop.load(Ordering::SeqCst) {
                let cmd = json!({"op":"publish","topic":"soak.t","data":{"seq":seq,"pad":"x".repeat(64)},"id":seq});
                publ.send(Message::Text(cmd.to_string().into()))
                    .await
                    .expect("publish");
                let ack = next_json(&mut publ).await.expect("ack");
                assert_eq!(ack, json!({"type":"ack","id":seq}));
                last_acked.store(seq, Ordering::SeqCst);
                seq += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            publ.close(None).await.ok();
            seq
        })
    };

    // Baseline: the daemon with only the publisher connected.
    let deadline = Instant::now() + WAIT;
    while daemon.gauge("wsbroker_connections_active").await != 1.0 {
        assert!(Instant::now() < deadline, "publisher not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let baseline_fds = daemon.fds_at_rest().await;
    eprintln!(
        "soak: baseline fds {baseline_fds}: {:?}",
        daemon.fd_targets()
    );
    let baseline_threads = daemon.threads();
    let opened_before = daemon.gauge("wsbroker_connections_opened_total").await;
    let mut rss = Vec::new();
    let patterns = ["soak.t", "soak.*", "soak.>", "*.t"];

    for round in 0..rounds {
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                tokio::spawn(churn_client(
                    daemon.clone(),
                    patterns[i % patterns.len()],
                    last_acked.clone(),
                    i % 2 == 0,
                    min_messages,
                ))
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let received = t
                .await
                .expect("client task")
                .unwrap_or_else(|e| panic!("round {round} client {i}: {e}"));
            assert!(received >= min_messages);
        }
        settle(
            &daemon,
            &format!("after round {round}"),
            Duration::from_secs(15),
            baseline_fds,
        )
        .await;
        rss.push(daemon.rss_bytes());
    }

    stop.store(true, Ordering::SeqCst);
    let published = publisher.await.expect("publisher");
    let opened = daemon.gauge("wsbroker_connections_opened_total").await - opened_before;
    assert_eq!(
        opened,
        (rounds * clients) as f64,
        "every client was a real connection"
    );
    assert!(published > 0);
    assert!(
        daemon.threads() <= baseline_threads + 2,
        "threads {} vs baseline {baseline_threads}",
        daemon.threads()
    );

    // RSS: no growth round over round (allocator noise allowed).
    const SLACK: u64 = 20 * 1024 * 1024;
    let first = rss[0];
    let last = *rss.last().expect("rounds");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "soak: {rounds} rounds x {clients} clients, {published} messages, {:?}; RSS MiB per round {:?}",
        started.elapsed(),
        rss.iter().map(|b| (mib(*b) * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
    assert!(
        last <= first + SLACK,
        "RSS grew from {:.1} MiB to {:.1} MiB",
        mib(first),
        mib(last)
    );
    // The second half of the run must not trend upward beyond the slack either.
    let mid = rss[rss.len() / 2];
    assert!(
        last <= mid + SLACK,
        "RSS still growing: {:.1} -> {:.1} MiB",
        mib(mid),
        mib(last)
    );

    // Graceful stop: SIGTERM, exit 0.
    let pid = daemon.pid() as i32;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut daemon = Arc::try_unwrap(daemon).unwrap_or_else(|_| panic!("daemon still shared"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
