//! Test harness: an in-process broker on 127.0.0.1 port 0 with a fresh rcgen
//! certificate, and a real WebSocket client over real TLS.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wsbroker::config::{LoadOptions, Settings};
use wsbroker::server::RunningServer;

pub mod auth;
pub mod daemon;

/// A child process (the real binary) killed and reaped on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago on 127.0.0.1 (for configs of the real
/// binary, whose port-0 listeners are not visible from outside).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// How long any single expectation may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// The origin every harness server allows.
pub const ORIGIN: &str = "https://app.example.com";

/// A WebSocket client connection.
pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A certificate + key for `localhost` / 127.0.0.1, written to a temp dir.
pub struct TestCert {
    pub dir: tempfile::TempDir,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
    pub cert_der: CertificateDer<'static>,
}

pub fn make_cert() -> TestCert {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).expect("write cert");
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).expect("write key");
    TestCert {
        dir,
        cert_path,
        key_path,
        cert_der: ck.cert.der().clone(),
    }
}

pub struct TestServer {
    pub server: RunningServer,
    pub addr: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub cert: TestCert,
}

pub fn client_config(root: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Loads settings for a test server: the given overrides (env-style keys,
/// e.g. `WSBROKER__SERVER__MAX_MESSAGE_SIZE`) on top of a minimal file.
pub fn settings(cert: &TestCert, overrides: &[(&str, &str)]) -> Settings {
    let file = cert.dir.path().join("wsbroker.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[origins]\nallow = [\"{ORIGIN}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n",
        cert.cert_path.display(),
        cert.key_path.display()
    );
    std::fs::write(&file, toml).expect("write config");
    let env: HashMap<String, String> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load(&LoadOptions {
        path: Some(file),
        dev: false,
        env: Some(env),
    })
    .expect("valid test settings")
}

impl TestServer {
    pub async fn start(overrides: &[(&str, &str)]) -> TestServer {
        let cert = make_cert();
        let s = settings(&cert, overrides);
        let server = wsbroker::server::start(s).await.expect("server starts");
        let addr = server.local_addrs()[0];
        TestServer {
            tls: client_config(&cert.cert_der),
            server,
            addr,
            cert,
        }
    }

    pub fn admin(&self) -> SocketAddr {
        self.server.admin_addr().expect("admin enabled")
    }

    /// TLS connection to the wss port, nothing sent yet.
    pub async fn tls(&self) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.expect("tcp connect");
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = ServerName::try_from("localhost").expect("name");
        connector.connect(name, tcp).await.expect("tls connect")
    }

    /// WebSocket upgrade with optional Origin; Err carries tungstenite's error (HTTP status).
    pub async fn try_ws(
        &self,
        path: &str,
        origin: Option<&str>,
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let mut req = format!("wss://localhost:{}{}", self.addr.port(), path)
            .into_client_request()
            .expect("request");
        if let Some(o) = origin {
            req.headers_mut()
                .insert("Origin", o.parse().expect("header"));
        }
        let tls = self.tls().await;
        tokio_tungstenite::client_async(req, tls)
            .await
            .map(|(ws, _)| ws)
    }

    /// A connected client with the allowed origin.
    pub async fn ws(&self) -> Ws {
        self.try_ws("/ws", Some(ORIGIN)).await.expect("upgrade")
    }

    /// Sends a raw HTTP request over TLS and returns the whole response.
    pub async fn raw_http(&self, request: &str) -> String {
        let mut tls = self.tls().await;
        tls.write_all(request.as_bytes()).await.expect("write");
        // tokio-rustls may hold plaintext until flushed.
        tls.flush().await.expect("flush");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// `GET /metrics` from the admin listener.
    pub async fn metrics(&self) -> String {
        admin_request(
            self.admin(),
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
    }
}

/// Sends a raw plain-HTTP request to an admin address.
pub async fn admin_request(addr: SocketAddr, request: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("admin connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one metric sample value (`name{labels}` exactly as rendered).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("series {series} not found in:\n{text}"))
}

/// The `reason` labels of `wsbroker_connections_closed_total` (CONTRACT §7).
pub const CLOSE_REASONS: [&str; 6] = [
    "client",
    "idle_timeout",
    "slow_consumer",
    "shutdown",
    "error",
    "auth",
];

/// Connections counted closed so far, over every reason.
pub fn closes_total(text: &str) -> f64 {
    CLOSE_REASONS
        .iter()
        .map(|r| {
            metric(
                text,
                &format!(r#"wsbroker_connections_closed_total{{reason="{r}"}}"#),
            )
        })
        .sum()
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// Next text frame as JSON (skipping pings); panics on timeout or close.
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("read error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Next text frame as the raw string.
pub async fn recv_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("read error");
        match msg {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Asserts nothing arrives within `d`.
pub async fn expect_silence(ws: &mut Ws, d: Duration) {
    loop {
        match tokio::time::timeout(d, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Waits for the server's close frame and returns it.
pub async fn expect_close(ws: &mut Ws) -> Option<CloseFrame> {
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for close");
        match next {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// subscribe + wait for the ack.
pub async fn subscribe(ws: &mut Ws, topic: &str, id: u64) {
    send(
        ws,
        serde_json::json!({"op":"subscribe","topic":topic,"id":id}),
    )
    .await;
    let ack = recv(ws).await;
    assert_eq!(
        ack,
        serde_json::json!({"type":"ack","id":id}),
        "subscribe {topic}"
    );
}

/// publish + wait for the ack (the publisher must not be subscribed to `topic`).
pub async fn publish(ws: &mut Ws, topic: &str, data: Value, id: u64) {
    send(
        ws,
        serde_json::json!({"op":"publish","topic":topic,"data":data,"id":id}),
    )
    .await;
    let ack = recv(ws).await;
    assert_eq!(
        ack,
        serde_json::json!({"type":"ack","id":id}),
        "publish {topic}"
    );
}

pub mod raw;

impl TestServer {
    /// A TLS connection upgraded by hand, for the raw client in [`raw`].
    pub async fn raw_ws(&self) -> TlsStream<TcpStream> {
        self.raw_ws_with("").await
    }

    /// [`TestServer::raw_ws`] with extra request header lines (`\r\n` each).
    pub async fn raw_ws_with(&self, extra: &str) -> TlsStream<TcpStream> {
        let mut tls = self.tls().await;
        raw::upgrade_with(&mut tls, extra)
            .await
            .expect("raw upgrade");
        tls
    }
}

/// A real `nats-server` on free loopback ports (client and monitoring),
/// killed by pid (SIGKILL) and reaped on drop.
pub struct NatsServer {
    pub child: Option<std::process::Child>,
    pub port: u16,
    pub monitor_port: u16,
    pub args: Vec<String>,
}

impl NatsServer {
    /// Starts `nats-server` on free ports with extra arguments (e.g. `--user`).
    pub async fn start(args: &[&str]) -> NatsServer {
        Self::start_on(free_port(), free_port(), args).await
    }

    /// Starts `nats-server` on the given ports; waits until it accepts.
    pub async fn start_on(port: u16, monitor_port: u16, args: &[&str]) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port,
            monitor_port,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        server.restart().await;
        server
    }

    /// (Re)starts the process on the same ports.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server already running");
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts (apt-get install nats-server)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let up = TcpStream::connect(("127.0.0.1", self.monitor_port))
                .await
                .is_ok()
                && TcpStream::connect(("127.0.0.1", self.port)).await.is_ok();
            if up {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL (kill -9) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A monitoring endpoint's JSON (e.g. `/connz?subs=1`).
    pub async fn monitor(&self, path: &str) -> Value {
        let resp = admin_request(
            SocketAddr::from(([127, 0, 0, 1], self.monitor_port)),
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("monitor {path}: {e}: {resp}"))
    }

    /// Every subscription subject of the client connection named `name`.
    pub async fn subscriptions_of(&self, name: &str) -> Vec<String> {
        let connz = self.monitor("/connz?subs=1").await;
        let mut subs: Vec<String> = connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == name)
            .flat_map(|c| {
                c["subscriptions_list"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        subs.sort();
        subs
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A WebSocket client to any wss address served with `tls`'s root.
pub async fn ws_to(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> Ws {
    let req = format!("wss://localhost:{}/ws", addr.port())
        .into_client_request()
        .expect("request");
    let mut req = req;
    req.headers_mut()
        .insert("Origin", ORIGIN.parse().expect("header"));
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let name = ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("tls connect");
    tokio_tungstenite::client_async(req, tls)
        .await
        .map(|(ws, _)| ws)
        .expect("upgrade")
}

/// The real `wsbroker` binary ([`daemon::Daemon`]) as a cluster node: wss
/// and admin on port 0, extra TOML appended to its config, a publish token,
/// a client TLS config trusting its certificate; killed (SIGKILL) on drop.
pub struct Node {
    daemon: Option<daemon::Daemon>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub cert: TestCert,
    pub config: std::path::PathBuf,
}

/// The admin token every [`Node`] accepts on `POST /publish`.
pub const NODE_PUBLISH_TOKEN: &str = "node-secret";

impl Node {
    /// Starts the binary; waits (bounded) until both listeners are up.
    pub async fn start(extra_toml: &str) -> Node {
        let cert = make_cert();
        let config = daemon::config_file(
            &cert,
            "\"127.0.0.1:0\"",
            "shutdown_grace = \"1s\"",
            "",
            extra_toml,
        );
        let mut cmd = daemon::serve_command(&config);
        cmd.env("WSBROKER__ADMIN__PUBLISH_TOKEN", NODE_PUBLISH_TOKEN);
        let d = tokio::task::spawn_blocking(move || daemon::Daemon::start(cmd))
            .await
            .expect("start node");
        Node {
            addr: d.wss,
            admin: d.admin,
            daemon: Some(d),
            tls: client_config(&cert.cert_der),
            cert,
            config,
        }
    }

    /// A connected WebSocket client.
    pub async fn ws(&self) -> Ws {
        ws_to(self.addr, &self.tls).await
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        admin_request(
            self.admin,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
    }

    /// `GET /readyz`: (status code, body).
    pub async fn readyz(&self) -> (u16, String) {
        let resp = admin_request(
            self.admin,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (code, body.to_string())
    }

    /// `POST /publish`: the raw response.
    pub async fn http_publish(&self, topic: &str, data: Value) -> String {
        let body = serde_json::json!({"topic": topic, "data": data}).to_string();
        admin_request(
            self.admin,
            &format!(
                "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {NODE_PUBLISH_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await
    }

    /// Everything it logged so far (JSON lines).
    pub fn log_text(&self) -> String {
        self.daemon
            .as_ref()
            .map(daemon::Daemon::log_text)
            .unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        // Dropping the daemon kills and reaps it.
        self.daemon = None;
    }
}

/// Waits until `check` holds, polling; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
