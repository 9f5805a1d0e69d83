//! End to end against the real binary: while subscribers are stalled, the
//! daemon's memory grows by no more than the configured queue bounds allow.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS")
}

async fn connect(port: u16, tls: &std::sync::Arc<rustls::ClientConfig>, rcvbuf: Option<u32>) -> Ws {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).expect("rcvbuf");
    }
    let tcp = socket
        .connect(format!("127.0.0.1:{port}").parse().expect("addr"))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("tls");
    let mut req = format!("wss://localhost:{port}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", ORIGIN.parse().expect("origin"));
    tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade")
        .0
}

const STALLED: u64 = 8;
const QUEUE_MAX_BYTES: u64 = 1 << 20;
const MESSAGES: u64 = 150_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_growth_is_bounded_by_the_queue_settings() {
    let cert = make_cert();
    let port = free_port();
    let admin = free_port();
    let config = cert.dir.path().join("wsbroker.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [origins]\nallow = [\"{ORIGIN}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [connection]\nqueue_capacity = 1000000\nqueue_max_bytes = {QUEUE_MAX_BYTES}\n\
             overflow = \"drop_oldest\"\nmax_inbound_rate = 0\n[log]\nlevel = \"warn\"\n",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wsbroker");
    let pid = child.id();
    let _daemon = KillOnDrop(child);
    let tls = client_config(&cert.cert_der);
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "daemon did not start listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut ws = connect(port, &tls, Some(4096)).await;
        subscribe(&mut ws, "mem", 1).await;
        stalled.push(ws);
    }
    let mut publ = connect(port, &tls, None).await;
    // Warm up allocator arenas and buffers before the baseline.
    publish(&mut publ, "warm", json!(0), 0).await;
    let baseline = rss_bytes(pid);

    let data = "m".repeat(300);
    let mut peak = baseline;
    for i in 0..MESSAGES {
        let frame = format!(r#"{{"op":"publish","topic":"mem","data":[{i},"{data}"]}}"#);
        publ.feed(Message::Text(frame.into())).await.expect("feed");
        if i % 1000 == 999 {
            publ.flush().await.expect("flush");
            peak = peak.max(rss_bytes(pid));
        }
    }
    publish(&mut publ, "warm", json!(1), 1).await;
    peak = peak.max(rss_bytes(pid));

    // An unbounded queue would hold every message for every stalled reader
    // (~8 x 50 MB here). The bound: each stalled connection's queue budget
    // plus per-connection write buffers (tungstenite + rustls, < 256 KiB),
    // plus slack for the allocator and the publisher's own buffers.
    let published_bytes = MESSAGES * 340;
    let allowed = STALLED * (QUEUE_MAX_BYTES + 256 * 1024) + 24 * 1024 * 1024;
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "baseline {} MiB, peak {} MiB, growth {} MiB, allowed {} MiB, unbounded would be ~{} MiB",
        baseline >> 20,
        peak >> 20,
        growth >> 20,
        allowed >> 20,
        (published_bytes * STALLED) >> 20
    );
    assert!(
        growth < allowed,
        "RSS grew by {growth} bytes, more than the bound {allowed}"
    );
    drop(stalled);
}
