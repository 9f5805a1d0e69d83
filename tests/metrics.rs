//! End-to-end metrics test against the real binary (CONTRACT §6, §7): drive
//! connections, subscriptions, publishes (ws and HTTP), handshake rejections,
//! a slow consumer, an idle timeout and client closes, then assert every
//! counter and gauge moved by exactly the expected amount; `/readyz` flips to
//! 503 while draining. Also unit-tests the certificate expiry DER walk.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{admin_request, client_config, closes_total, free_port, metric, ORIGIN};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use wsbroker::metrics::cert_not_after;

type Ws = common::Ws;

const TOKEN: &str = "metrics-test-token";
/// The notAfter of the served certificate: 2031-05-17T00:00:00Z.
const NOT_AFTER: i64 = 1_936_742_400;
/// Set to true once server.rs calls `metrics::record_tls_cert` (see the
/// issue 6 report); until then the gauge may still read 0.
const CERT_EXPIRY_WIRED: bool = true;
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- certs

struct Cert {
    pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn cert_expiring(year: i32, month: u8, day: u8) -> Cert {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
    params.not_after = rcgen::date_time_ymd(year, month, day);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    Cert {
        pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    }
}

#[test]
fn cert_not_after_reads_utc_and_generalized_time() {
    // rcgen writes UTCTime for 1950..2049 and GeneralizedTime otherwise.
    assert_eq!(
        cert_not_after(&cert_expiring(2031, 5, 17).der),
        Some(NOT_AFTER)
    );
    assert_eq!(
        cert_not_after(&cert_expiring(2000, 2, 29).der),
        Some(951_782_400)
    );
    assert_eq!(
        cert_not_after(&cert_expiring(2055, 1, 2).der),
        Some(2_682_460_800)
    );
    let default = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    assert_eq!(cert_not_after(default.cert.der()), Some(67_090_118_400)); // 4096-01-01
    let chain = [
        cert_expiring(2031, 5, 17).der,
        cert_expiring(2055, 1, 2).der,
    ];
    wsbroker::metrics::record_tls_cert(wsbroker::metrics::metrics(), &chain);
    let empty: [&[u8]; 0] = [];
    wsbroker::metrics::record_tls_cert(wsbroker::metrics::metrics(), &empty);
}

#[test]
fn cert_not_after_rejects_garbage() {
    let der = cert_expiring(2031, 5, 17).der.to_vec();
    assert_eq!(cert_not_after(&[]), None);
    assert_eq!(cert_not_after(b"not a certificate"), None);
    assert_eq!(
        cert_not_after(&[0x30, 0x80, 0x00, 0x00]),
        None,
        "indefinite length"
    );
    assert_eq!(
        cert_not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
        None,
        "length beyond input"
    );
    // Every truncation fails cleanly (the outer length no longer fits).
    for n in 0..der.len() {
        assert_eq!(cert_not_after(&der[..n]), None, "truncated to {n}");
    }
    // Corrupt the notAfter digits: find "310517000000Z" and break a digit.
    let pos = der
        .windows(13)
        .position(|w| w == b"310517000000Z")
        .expect("UTCTime notAfter in the DER");
    let mut bad = der.clone();
    bad[pos + 2] = b'x';
    assert_eq!(cert_not_after(&bad), None, "non-digit");
    let mut bad = der.clone();
    bad[pos + 2] = b'1';
    bad[pos + 3] = b'3';
    assert_eq!(cert_not_after(&bad), None, "month 13");
    let mut bad = der.clone();
    bad[pos + 12] = b'+';
    assert_eq!(cert_not_after(&bad), None, "not Z");
}

// ---------------------------------------------------------------- the daemon

/// The real binary, killed on drop.
struct Daemon {
    child: Child,
    wss: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    dir: tempfile::TempDir,
    tls: Arc<rustls::ClientConfig>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let resp = admin_request(addr, request).await;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Non-blocking probe (the admin port may not be bound yet).
async fn try_get(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
}

async fn start_daemon() -> Daemon {
    let cert = cert_expiring(2031, 5, 17);
    let mut last_log = String::new();
    for _attempt in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, &cert.pem).expect("write cert");
        std::fs::write(&key_path, &cert.key_pem).expect("write key");
        let wss = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            r#"[server]
listen = "{wss}"
path = "/ws"
max_connections = 1000
shutdown_grace = "3s"
[tls]
cert = "{}"
key = "{}"
[origins]
allow = ["{ORIGIN}"]
[connection]
queue_capacity = 8
queue_max_bytes = 1048576
overflow = "drop_oldest"
max_inbound_rate = 0
ping_interval = "500ms"
idle_timeout = "2s"
[admin]
listen = "{admin}"
publish_token = "{TOKEN}"
[log]
level = "info"
format = "json"
"#,
            cert_path.display(),
            key_path.display()
        );
        let config_path = dir.path().join("wsbroker.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = dir.path().join("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_wsbroker"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .env_remove("NOTIFY_SOCKET")
            .spawn()
            .expect("spawn wsbroker");
        let mut daemon = Daemon {
            child,
            wss,
            admin,
            log,
            dir,
            tls: client_config(&cert.der),
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = daemon.child.try_wait().expect("try_wait") {
                // Most likely a port taken between probe and bind: try again.
                last_log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
                eprintln!("wsbroker exited at start ({status}); retrying:\n{last_log}");
                break;
            }
            if try_get(admin, "/healthz").await == Some(200) {
                return daemon;
            }
            assert!(Instant::now() < deadline, "wsbroker did not become healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("wsbroker did not start after 5 attempts:\n{last_log}");
}

impl Daemon {
    async fn scrape(&self) -> String {
        let (status, body) = get(self.admin, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn tcp(&self, small_rcvbuf: bool) -> TcpStream {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        if small_rcvbuf {
            // Fixing SO_RCVBUF disables receive autotuning: a client that
            // stops reading fills its window after a few KiB.
            socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        }
        socket.connect(&self.wss.into()).expect("connect");
        socket.set_nonblocking(true).expect("nonblocking");
        TcpStream::from_std(socket.into()).expect("tokio stream")
    }

    async fn try_ws(&self, path: &str, origin: &str, small_rcvbuf: bool) -> Result<Ws, WsError> {
        let mut req = format!("wss://localhost:{}{path}", self.wss.port())
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("Origin", origin.parse().expect("header"));
        let tcp = self.tcp(small_rcvbuf).await;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = connector
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("tls connect");
        tokio_tungstenite::client_async(req, tls)
            .await
            .map(|(ws, _)| ws)
    }

    async fn ws(&self, small_rcvbuf: bool) -> Ws {
        self.try_ws("/ws", ORIGIN, small_rcvbuf)
            .await
            .expect("upgrade")
    }

    async fn http_publish(&self, topic: &str, data: &str) -> Value {
        let body = format!(r#"{{"topic":"{topic}","data":{data}}}"#);
        let (status, resp) = http(
            self.admin,
            &format!(
                "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        assert_eq!(status, 200, "{resp}");
        serde_json::from_str(&resp).expect("json answer")
    }
}

/// Polls `/metrics` until `pred` holds for the scrape.
async fn wait_metrics(d: &Daemon, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let m = d.scrape().await;
        if pred(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- clients

/// Text payload bytes the clients sent (= what the server must count).
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    received: AtomicU64,
}

enum Event {
    Text(String),
    Closed,
}

/// A client whose frames are read by a background task (so it answers pings
/// and stays alive past idle_timeout) and tallied.
struct Client {
    sink: SplitSink<Ws, Message>,
    rx: mpsc::UnboundedReceiver<Event>,
    tally: Arc<Tally>,
}

impl Client {
    fn new(ws: Ws, tally: &Arc<Tally>) -> Client {
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let t = tally.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(text) = msg {
                    t.received.fetch_add(text.len() as u64, Ordering::Relaxed);
                    if tx.send(Event::Text(text.as_str().to_string())).is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(Event::Closed);
        });
        Client {
            sink,
            rx,
            tally: tally.clone(),
        }
    }

    async fn send(&mut self, v: Value) {
        let text = v.to_string();
        self.tally
            .sent
            .fetch_add(text.len() as u64, Ordering::Relaxed);
        self.sink
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    async fn recv(&mut self) -> Value {
        match tokio::time::timeout(DEADLINE, self.rx.recv()).await {
            Ok(Some(Event::Text(t))) => serde_json::from_str(&t).expect("json frame"),
            Ok(Some(Event::Closed)) | Ok(None) => panic!("connection ended"),
            Err(_) => panic!("timed out waiting for a frame"),
        }
    }

    async fn request(&mut self, v: Value, id: u64) {
        self.send(v).await;
        assert_eq!(self.recv().await, json!({"type":"ack","id":id}));
    }

    async fn subscribe(&mut self, topic: &str, id: u64) {
        self.request(json!({"op":"subscribe","topic":topic,"id":id}), id)
            .await;
    }

    async fn expect_message(&mut self, topic: &str, data: Value) {
        assert_eq!(
            self.recv().await,
            json!({"type":"message","topic":topic,"data":data})
        );
    }

    /// Client-initiated close; waits for the end of the stream.
    async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        self.sink
            .send(Message::Close(Some(frame)))
            .await
            .expect("send close");
        match tokio::time::timeout(DEADLINE, self.rx.recv()).await {
            Ok(Some(Event::Text(t))) => panic!("unexpected frame while closing: {t}"),
            Ok(Some(Event::Closed)) | Ok(None) => {}
            Err(_) => panic!("close not completed"),
        }
    }
}

fn http_status(r: Result<Ws, WsError>) -> u16 {
    match r {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Ok(_) => 101,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Sends a JSON text frame on a raw (unread) connection, tallied.
async fn raw_send<S>(sink: &mut S, tally: &Tally, v: Value)
where
    S: SinkExt<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    let text = v.to_string();
    tally.sent.fetch_add(text.len() as u64, Ordering::Relaxed);
    sink.send(Message::Text(text.into())).await.expect("send");
}

/// Reads the (unsplit) stream until the ack for `id`; returns its length.
async fn read_ack(stream: &mut SplitStream<Ws>, id: u64) -> u64 {
    loop {
        let msg = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("ack in time")
            .expect("stream open")
            .expect("read");
        if let Message::Text(t) = msg {
            assert_eq!(
                serde_json::from_str::<Value>(t.as_str()).expect("json"),
                json!({"type":"ack","id":id})
            );
            return t.len() as u64;
        }
    }
}

// ---------------------------------------------------------------- the scenario

fn counters(m: &str) -> HashMap<&'static str, f64> {
    const SERIES: &[&str] = &[
        "wsbroker_connections_opened_total",
        r#"wsbroker_connections_closed_total{reason="client"}"#,
        r#"wsbroker_connections_closed_total{reason="idle_timeout"}"#,
        r#"wsbroker_connections_closed_total{reason="slow_consumer"}"#,
        r#"wsbroker_connections_closed_total{reason="shutdown"}"#,
        r#"wsbroker_connections_closed_total{reason="error"}"#,
        r#"wsbroker_handshake_rejected_total{reason="origin"}"#,
        r#"wsbroker_handshake_rejected_total{reason="path"}"#,
        r#"wsbroker_handshake_rejected_total{reason="limit"}"#,
        r#"wsbroker_handshake_rejected_total{reason="timeout"}"#,
        r#"wsbroker_handshake_rejected_total{reason="tls"}"#,
        r#"wsbroker_handshake_rejected_total{reason="bad_request"}"#,
        r#"wsbroker_messages_published_total{source="ws"}"#,
        r#"wsbroker_messages_published_total{source="http"}"#,
        "wsbroker_messages_delivered_total",
        r#"wsbroker_messages_dropped_total{reason="queue_full"}"#,
        "wsbroker_bytes_received_total",
        "wsbroker_bytes_sent_total",
        "wsbroker_delivery_latency_seconds_count",
    ];
    SERIES.iter().map(|s| (*s, metric(m, s))).collect()
}

/// Every connection opened since scrape `m0` has been counted closed, under
/// some reason. A scrape renders series one by one, so the gauge alone can
/// reach 0 in the same scrape that still misses the last close.
fn all_closed(m: &str, m0: &str) -> bool {
    let opened = |m: &str| metric(m, "wsbroker_connections_opened_total");
    closes_total(m) - closes_total(m0) == opened(m) - opened(m0)
}

fn gauges_are(m: &str, conns: f64, subs: f64, topics: f64) -> bool {
    metric(m, "wsbroker_connections_active") == conns
        && metric(m, "wsbroker_subscriptions_active") == subs
        && metric(m, "wsbroker_topics_active") == topics
}

fn promtool_check(m: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("note: promtool not on PATH; skipping `promtool check metrics` (CI installs it)");
        return;
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(m.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn log_lines(path: &Path) -> Vec<Value> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("read log");
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    line.get(name)
        .or_else(|| line.get("fields").and_then(|f| f.get(name)))
        .and_then(Value::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_moves_by_exactly_what_happened() {
    let d = start_daemon().await;
    let m0 = d.scrape().await;
    let before = counters(&m0);
    assert!(gauges_are(&m0, 0.0, 0.0, 0.0), "{m0}");
    assert!(
        m0.contains(r#"wsbroker_build_info{version="0.1.0"} 1"#),
        "{m0}"
    );
    assert_eq!(metric(&m0, "wsbroker_connections_max"), 1000.0);
    assert_eq!(metric(&m0, "wsbroker_accept_errors_total"), 0.0);
    let tally = Arc::new(Tally::default());
    // Text bytes read outside the Client tasks (acks of the raw clients).
    let mut raw_read_bytes = 0u64;

    // Reading clients.
    let mut sub1 = Client::new(d.ws(false).await, &tally);
    let mut sub2 = Client::new(d.ws(false).await, &tally);
    let mut publ = Client::new(d.ws(false).await, &tally);
    sub1.subscribe("news.*", 1).await;
    sub1.subscribe("chat", 2).await;
    sub1.subscribe("news.*", 3).await; // again: no new subscription
    sub1.subscribe("tmp", 4).await;
    sub1.request(json!({"op":"unsubscribe","topic":"tmp","id":5}), 5)
        .await;
    sub2.subscribe("news.sports", 1).await;
    sub2.subscribe("chat", 2).await;
    // news.*, chat (x2), news.sports: 4 subscriptions on 3 patterns.
    wait_metrics(&d, "gauges after subscribing", |m| {
        gauges_are(m, 3.0, 4.0, 3.0)
    })
    .await;

    // Handshake rejections: one bad origin, one wrong path.
    assert_eq!(
        http_status(d.try_ws("/ws", "https://evil.example", false).await),
        403
    );
    assert_eq!(http_status(d.try_ws("/nope", ORIGIN, false).await), 404);

    // Publishes over ws: 2 + 2 + 0 deliveries.
    let mut ws_publishes = 0u64;
    let mut deliveries = 0u64;
    publ.request(
        json!({"op":"publish","topic":"news.sports","data":{"score":1},"id":10}),
        10,
    )
    .await;
    publ.request(
        json!({"op":"publish","topic":"chat","data":"hello","id":11}),
        11,
    )
    .await;
    publ.request(
        json!({"op":"publish","topic":"nobody.here","data":false,"id":12}),
        12,
    )
    .await;
    ws_publishes += 3;
    deliveries += 4;
    for c in [&mut sub1, &mut sub2] {
        c.expect_message("news.sports", json!({"score":1})).await;
        c.expect_message("chat", json!("hello")).await;
    }

    // Publishes over HTTP: 1 + 2 deliveries.
    assert_eq!(
        d.http_publish("news.weather", r#"{"t":20}"#).await,
        json!({"delivered":1})
    );
    assert_eq!(
        d.http_publish("chat", r#""hi""#).await,
        json!({"delivered":2})
    );
    let mut http_publishes = 2u64;
    deliveries += 3;
    sub1.expect_message("news.weather", json!({"t":20})).await;
    sub1.expect_message("chat", json!("hi")).await;
    sub2.expect_message("chat", json!("hi")).await;

    // A client close: sub2 leaves, its subscriptions go with it.
    sub2.close().await;
    wait_metrics(&d, "sub2 gone", |m| gauges_are(m, 2.0, 2.0, 2.0)).await;
    assert_eq!(
        d.http_publish("chat", r#""after""#).await,
        json!({"delivered":1})
    );
    http_publishes += 1;
    deliveries += 1;
    sub1.expect_message("chat", json!("after")).await;

    // An idle client: subscribes, reads its ack, then never reads again, so
    // it never answers a ping and idle_timeout (2s) closes it.
    let (mut idle_sink, mut idle_stream) = d.ws(false).await.split();
    raw_send(
        &mut idle_sink,
        &tally,
        json!({"op":"subscribe","topic":"idle.topic","id":7}),
    )
    .await;
    raw_read_bytes += read_ack(&mut idle_stream, 7).await;
    let m = d.scrape().await;
    assert!(
        gauges_are(&m, 3.0, 3.0, 3.0),
        "idle client subscribed:\n{m}"
    );

    // A slow consumer: subscribes, reads its ack, then stops reading while it
    // keeps itself alive with its own pings; 16 KiB messages fill its window.
    let (mut slow_sink, mut slow_stream) = d.ws(true).await.split();
    raw_send(
        &mut slow_sink,
        &tally,
        json!({"op":"subscribe","topic":"slow","id":1}),
    )
    .await;
    let slow_ack = read_ack(&mut slow_stream, 1).await;
    let stop_pinging = Arc::new(AtomicBool::new(false));
    let pinger = {
        let stop = stop_pinging.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if slow_sink
                    .send(Message::Ping(bytes::Bytes::new()))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            slow_sink
        })
    };
    let payload = "x".repeat(16 * 1024);
    let slow_cmd = json!({"op":"publish","topic":"slow","data":payload});
    let slow_frame_len =
        wsbroker::protocol::encode_message("slow", &json!(payload).to_string()).len() as u64;
    let mut slow_publishes = 0u64;
    let deadline = Instant::now() + DEADLINE;
    let mut round = 0u64;
    let mut dropped_seen;
    loop {
        for _ in 0..64 {
            let text = slow_cmd.to_string();
            tally.sent.fetch_add(text.len() as u64, Ordering::Relaxed);
            publ.sink
                .feed(Message::Text(text.into()))
                .await
                .expect("feed");
        }
        publ.sink.flush().await.expect("flush");
        slow_publishes += 64;
        // Commands are handled in order: the ack means all were published.
        // Go on until a whole round's worth was dropped: by then the
        // consumer's TCP window is full, not just its queue momentarily.
        round += 1;
        let id = 1000 + round;
        publ.request(
            json!({"op":"publish","topic":"sync","data":round,"id":id}),
            id,
        )
        .await;
        ws_publishes += 1;
        let m = d.scrape().await;
        dropped_seen = metric(
            &m,
            r#"wsbroker_messages_dropped_total{reason="queue_full"}"#,
        ) - before[r#"wsbroker_messages_dropped_total{reason="queue_full"}"#];
        if dropped_seen >= 64.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no drops after {slow_publishes} publishes:\n{m}"
        );
    }
    ws_publishes += slow_publishes;
    // Stop pinging: the idle timeout ends the slow consumer too.
    stop_pinging.store(true, Ordering::Relaxed);
    let slow_sink = pinger.await.expect("pinger");

    // The idle and the slow client are closed by the idle timeout.
    wait_metrics(&d, "idle timeouts", |m| {
        metric(
            m,
            r#"wsbroker_connections_closed_total{reason="idle_timeout"}"#,
        ) - before[r#"wsbroker_connections_closed_total{reason="idle_timeout"}"#]
            == 2.0
    })
    .await;
    drop((idle_sink, idle_stream, slow_sink, slow_stream));
    raw_read_bytes += slow_ack;

    // Everyone else leaves.
    sub1.close().await;
    publ.close().await;
    let m1 = wait_metrics(&d, "gauges back to 0, every close counted", |m| {
        gauges_are(m, 0.0, 0.0, 0.0) && all_closed(m, &m0)
    })
    .await;
    let after = counters(&m1);
    let delta = |k: &str| after[k] - before[k];

    assert_eq!(delta("wsbroker_connections_opened_total"), 5.0);
    for (reason, n) in [
        ("client", 3.0),
        ("idle_timeout", 2.0),
        ("slow_consumer", 0.0),
        ("shutdown", 0.0),
        ("error", 0.0),
    ] {
        let k = format!(r#"wsbroker_connections_closed_total{{reason="{reason}"}}"#);
        assert_eq!(delta(&k), n, "{k}");
    }
    for (reason, n) in [
        ("origin", 1.0),
        ("path", 1.0),
        ("limit", 0.0),
        ("timeout", 0.0),
        ("tls", 0.0),
        ("bad_request", 0.0),
    ] {
        let k = format!(r#"wsbroker_handshake_rejected_total{{reason="{reason}"}}"#);
        assert_eq!(delta(&k), n, "{k}");
    }
    assert_eq!(
        delta(r#"wsbroker_messages_published_total{source="ws"}"#),
        ws_publishes as f64
    );
    assert_eq!(
        delta(r#"wsbroker_messages_published_total{source="http"}"#),
        http_publishes as f64
    );
    assert_eq!(
        delta("wsbroker_bytes_received_total"),
        tally.sent.load(Ordering::Relaxed) as f64
    );

    // The slow consumer: each of its messages was written, dropped, or
    // discarded when it closed; what was written shows in delivered and, at
    // one frame length each, in bytes_sent.
    let dropped = delta(r#"wsbroker_messages_dropped_total{reason="queue_full"}"#);
    let slow_delivered = delta("wsbroker_messages_delivered_total") - deliveries as f64;
    assert!(dropped > 0.0, "dropped {dropped}");
    assert!(
        slow_delivered >= 0.0,
        "delivered fewer than the reading clients got"
    );
    assert!(
        slow_delivered + dropped <= slow_publishes as f64,
        "written {slow_delivered} + dropped {dropped} > published {slow_publishes}"
    );
    eprintln!(
        "slow consumer: {slow_publishes} published, {slow_delivered} written, {dropped} dropped"
    );
    let known_sent = (tally.received.load(Ordering::Relaxed) + raw_read_bytes) as f64;
    assert_eq!(
        delta("wsbroker_bytes_sent_total"),
        known_sent + slow_delivered * slow_frame_len as f64,
        "bytes_sent = frames the clients read + slow frames written"
    );
    // One latency sample per write batch holding at least one message.
    let batches = delta("wsbroker_delivery_latency_seconds_count");
    assert!(
        batches >= 1.0 && batches <= deliveries as f64 + slow_delivered,
        "batches {batches}"
    );

    // Shape of the exposition.
    assert!(
        m1.contains(r#"wsbroker_delivery_latency_seconds_bucket{le="0.0001"}"#),
        "{m1}"
    );
    assert!(
        m1.contains(r#"wsbroker_delivery_latency_seconds_bucket{le="1"}"#),
        "{m1}"
    );
    assert!(
        m1.contains("# TYPE wsbroker_delivery_latency_seconds histogram"),
        "{m1}"
    );
    assert!(
        m1.contains("# TYPE wsbroker_connections_active gauge"),
        "{m1}"
    );
    assert!(
        m1.contains("# TYPE wsbroker_messages_delivered_total counter"),
        "{m1}"
    );
    assert!(metric(&m1, "process_resident_memory_bytes") > 0.0);
    assert!(metric(&m1, "process_open_fds") > 0.0);
    // Whole seconds (metrics-process records it as an integer counter).
    assert!(metric(&m1, "process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let started = metric(&m1, "process_start_time_seconds");
    assert!(
        (now - started).abs() < 600.0,
        "start time {started} vs now {now}"
    );
    let not_after = metric(&m1, "wsbroker_tls_cert_not_after_seconds");
    if CERT_EXPIRY_WIRED || not_after != 0.0 {
        assert_eq!(not_after, NOT_AFTER as f64);
    } else {
        eprintln!("note: wsbroker_tls_cert_not_after_seconds is 0 (server.rs does not set it yet)");
    }
    promtool_check(&m1);

    // Drain: a connected client that does not read keeps the drain going
    // while /readyz answers 503. It never answers the server's pings, so it
    // sends its own every 300 ms: any client frame is activity, and without
    // them idle_timeout (2s) could close it before the jittered shutdown
    // close reaches it on a slow machine.
    let (mut drain_sink, drain_stream) = d.ws(false).await.split();
    let keepalive = tokio::spawn(async move {
        while drain_sink
            .send(Message::Ping(Vec::new().into()))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    wait_metrics(&d, "drainee connected", |m| {
        metric(m, "wsbroker_connections_active") == 1.0
    })
    .await;
    assert_eq!(get(d.admin, "/readyz").await.0, 200);
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(
        unsafe { libc::kill(d.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match try_get(d.admin, "/readyz").await {
            Some(503) => break,
            Some(200) => {}
            other => panic!("/readyz answered {other:?} before 503"),
        }
        assert!(Instant::now() < deadline, "/readyz never went 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        try_get(d.admin, "/healthz").await,
        Some(200),
        "healthz while draining"
    );
    let mut d = d;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = d.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "wsbroker did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    keepalive.abort();
    drop(drain_stream);

    // One log line per open and per close, with the reason.
    let lines = log_lines(&d.log);
    let opened = lines
        .iter()
        .filter(|l| field(l, "message") == Some("connection opened"))
        .count();
    assert_eq!(opened, 6, "connection opened lines");
    let mut closed: HashMap<String, usize> = HashMap::new();
    for l in lines
        .iter()
        .filter(|l| field(l, "message") == Some("connection closed"))
    {
        *closed
            .entry(field(l, "reason").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let expected: HashMap<String, usize> = [("client", 3), ("idle_timeout", 2), ("shutdown", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(closed, expected, "connection closed lines by reason");
    let _ = &d.dir;
}

/// A client that leaves without a close frame (TCP FIN, TLS close_notify, or
/// a reset) is counted as `client`, like one that closes cleanly; `error` is
/// for protocol violations and failures on our side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_are_counted_as_client_closes() {
    let d = start_daemon().await;
    let m0 = d.scrape().await;
    let before = counters(&m0);

    // Clean close handshake.
    let mut clean = d.ws(false).await;
    clean.close(None).await.expect("close");
    // FIN without a WebSocket close (no TLS close_notify either).
    let fin = d.ws(false).await;
    // TLS close_notify, then FIN, without a WebSocket close.
    let mut notify = d.ws(false).await;
    // RST: linger 0 turns the close into a reset.
    let rst = d.ws(false).await;
    let opened0 = before["wsbroker_connections_opened_total"];
    wait_metrics(&d, "four opened", |m| {
        metric(m, "wsbroker_connections_opened_total") - opened0 == 4.0
    })
    .await;
    drop(fin);
    tokio::io::AsyncWriteExt::shutdown(notify.get_mut())
        .await
        .expect("close_notify");
    rst.get_ref().get_ref().0.set_zero_linger().expect("linger");
    drop(rst);

    let m1 = wait_metrics(&d, "everyone gone, every close counted", |m| {
        gauges_are(m, 0.0, 0.0, 0.0) && all_closed(m, &m0)
    })
    .await;
    drop(notify);
    let after = counters(&m1);
    let delta = |k: &str| after[k] - before[k];
    assert_eq!(delta("wsbroker_connections_opened_total"), 4.0);
    assert_eq!(
        delta(r#"wsbroker_connections_closed_total{reason="client"}"#),
        4.0,
        "{m1}"
    );
    assert_eq!(
        delta(r#"wsbroker_connections_closed_total{reason="error"}"#),
        0.0,
        "{m1}"
    );
}
