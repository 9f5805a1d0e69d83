//! End-to-end tests of the real `wsbroker` binary as a daemon (CONTRACT §1,
//! §5, §9; issue 5): SIGTERM drain, SIGHUP reload, sd_notify, the open-file
//! limit warning, check-config, and reclaiming a peer that went silent.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use common::daemon::{field, serve_command as serve_cmd, spawn_logged, Daemon, BIN};

/// The `[tls]`, `[origins]`, `[admin]` and `[log]` sections every daemon here
/// gets, plus whatever `server` and `connection` lines the test wants.
fn config_text(
    cert: &Path,
    key: &Path,
    origins: &[&str],
    server: &str,
    connection: &str,
) -> String {
    let allow: Vec<String> = origins.iter().map(|o| format!("\"{o}\"")).collect();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[origins]\nallow = [{}]\n[connection]\n{connection}\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"info\"\nformat = \"json\"\n",
        cert.display(),
        key.display(),
        allow.join(", ")
    )
}

fn client_tls(roots: &[&CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
}

async fn ws_connect(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    origin: &str,
) -> Result<Ws, WsError> {
    let mut req = format!("wss://localhost:{}/ws", addr.port())
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", origin.parse().expect("header"));
    let stream = tls_connect(addr, tls).await.map_err(WsError::Io)?;
    tokio_tungstenite::client_async(req, stream)
        .await
        .map(|(ws, _)| ws)
}

/// The leaf certificate a fresh TLS handshake presents.
async fn served_cert(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> CertificateDer<'static> {
    // No saved session: a resumed one (CONTRACT §12) reports the certificate
    // of the handshake it resumes, not the one served now.
    let mut fresh = (**tls).clone();
    fresh.resumption = rustls::client::Resumption::disabled();
    let stream = tls_connect(addr, &Arc::new(fresh))
        .await
        .expect("tls handshake");
    let (_, conn) = stream.get_ref();
    conn.peer_certificates().expect("server certificate")[0]
        .clone()
        .into_owned()
}

/// Upgrades by hand and returns the stream, which the caller never reads:
/// pings and the close frame go unanswered.
async fn raw_upgrade(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut stream = tls_connect(addr, tls).await.expect("tls");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        timeout(WAIT, stream.read_exact(&mut b))
            .await
            .expect("101 in time")
            .expect("read");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

fn gauge(metrics: &str, series: &str) -> f64 {
    metric(metrics, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let cert = make_cert();
    let file = cert.dir.path().join("wsbroker.toml");
    std::fs::write(
        &file,
        config_text(
            &cert.cert_path,
            &cert.key_path,
            &[ORIGIN],
            "shutdown_grace = \"3s\"",
            "",
        ),
    )
    .expect("config");
    let mut d = Daemon::start(serve_cmd(&file));
    let tls = client_tls(&[&cert.cert_der]);
    let mut tasks = Vec::new();
    for i in 0..5 {
        let mut ws = ws_connect(d.wss, &tls, ORIGIN).await.expect("connect");
        subscribe(&mut ws, "t", i).await;
        tasks.push(tokio::spawn(async move {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => return (Instant::now(), frame),
                    Some(Ok(_)) => continue,
                    other => panic!("ended without a close frame: {other:?}"),
                }
            }
        }));
    }
    // And some that never read, so never answer the close: they are cut at
    // the end of the grace, not CLOSE_WAIT after their (jittered) close.
    let mut _deaf = Vec::new();
    for _ in 0..10 {
        _deaf.push(raw_upgrade(d.wss, &tls).await);
    }
    assert!(d.http("/readyz").await.starts_with("HTTP/1.1 200"));

    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    // /readyz turns 503 while the drain runs.
    let deadline = t0 + Duration::from_secs(2);
    loop {
        let r = d.http("/readyz").await;
        if r.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz during drain: {r}");
        sleep(Duration::from_millis(20)).await;
    }
    let draining_at = t0.elapsed();
    // New connections are no longer accepted.
    let deadline = t0 + Duration::from_secs(2);
    while TcpStream::connect(d.wss).await.is_ok() {
        assert!(Instant::now() < deadline, "wss listener still accepting");
        sleep(Duration::from_millis(20)).await;
    }

    let mut times = Vec::new();
    for t in tasks {
        let (at, frame) = timeout(Duration::from_secs(5), t)
            .await
            .expect("close within grace + slack")
            .expect("client task");
        let frame = frame.expect("close frame with a code");
        assert_eq!(u16::from(frame.code), 1001);
        assert_eq!(frame.reason.as_str(), "server shutting down");
        times.push(at.duration_since(t0));
    }
    let status = d.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}:\n{}", d.log_text());
    let exited = t0.elapsed();
    assert!(
        exited < Duration::from_millis(3800),
        "exit after {exited:?} (grace 3s)"
    );
    times.sort();
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(last <= Duration::from_millis(3000), "closes: {times:?}");
    assert!(
        last - first >= Duration::from_millis(100),
        "closes should be spread over the grace window: {times:?}"
    );
    assert!(
        draining_at < last,
        "readyz 503 at {draining_at:?}, last close {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_cert_and_origins_without_dropping_clients() {
    let cert = make_cert();
    let new = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    let new_der = new.cert.der().clone();
    let file = cert.dir.path().join("wsbroker.toml");
    let other = "https://other.example.com";
    std::fs::write(
        &file,
        config_text(&cert.cert_path, &cert.key_path, &[ORIGIN], "", ""),
    )
    .expect("config");
    let d = Daemon::start(serve_cmd(&file));
    let tls = client_tls(&[&cert.cert_der, &new_der]);
    assert_eq!(served_cert(d.wss, &tls).await, cert.cert_der);
    let mut old = ws_connect(d.wss, &tls, ORIGIN).await.expect("connect");
    subscribe(&mut old, "news", 1).await;

    // 1. New certificate and key over the same files.
    std::fs::write(&cert.key_path, new.signing_key.serialize_pem()).expect("key");
    std::fs::write(&cert.cert_path, new.cert.pem()).expect("cert");
    let applied = d.count_lines("reload applied");
    d.signal(libc::SIGHUP);
    d.wait_for_line("reload applied", applied).await;
    assert_eq!(
        served_cert(d.wss, &tls).await,
        new_der,
        "new handshakes use the new cert"
    );
    let mut publisher = ws_connect(d.wss, &tls, ORIGIN).await.expect("connect");
    publish(&mut publisher, "news", serde_json::json!(1), 2).await;
    assert_eq!(
        recv(&mut old).await,
        serde_json::json!({"type":"message","topic":"news","data":1}),
        "the old client stays connected and keeps receiving"
    );

    // 2. A broken certificate: the reload is refused, the old one stays.
    std::fs::write(&cert.cert_path, "not a certificate\n").expect("cert");
    let rejected = d.count_lines("reload rejected");
    d.signal(libc::SIGHUP);
    d.wait_for_line("reload rejected", rejected).await;
    assert!(
        d.log_text()
            .lines()
            .any(|l| l.contains("reload rejected") && l.contains("tls.cert")),
        "the error names the key:\n{}",
        d.log_text()
    );
    assert_eq!(served_cert(d.wss, &tls).await, new_der);
    publish(&mut publisher, "news", serde_json::json!(2), 3).await;
    assert_eq!(
        recv(&mut old).await,
        serde_json::json!({"type":"message","topic":"news","data":2})
    );

    // 3. Add an origin (and change a restart-only key, which is reported).
    std::fs::write(&cert.cert_path, new.cert.pem()).expect("cert");
    match ws_connect(d.wss, &tls, other).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        Err(e) => panic!("{other} before the reload: expected 403, got {e}"),
        Ok(_) => panic!("{other} accepted before it was allowed"),
    }
    // The publish token is reloadable too: rotate it in (publishing was off).
    let post = |token: &'static str| {
        let body = r#"{"topic":"news","data":0}"#;
        format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let before = admin_request(d.admin, &post("rotated")).await;
    assert!(before.starts_with("HTTP/1.1 404"), "{before}");
    std::fs::write(
        &file,
        config_text(
            &cert.cert_path,
            &cert.key_path,
            &[ORIGIN, other],
            "max_connections = 5000",
            "idle_timeout = \"45s\"",
        )
        .replace("[admin]\n", "[admin]\npublish_token = \"rotated\"\n"),
    )
    .expect("config");
    let applied = d.count_lines("reload applied");
    d.signal(libc::SIGHUP);
    d.wait_for_line("reload applied", applied).await;
    let mut third = ws_connect(d.wss, &tls, other)
        .await
        .expect("the added origin is accepted after SIGHUP");
    let after = admin_request(d.admin, &post("rotated")).await;
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    assert_eq!(
        recv(&mut old).await,
        serde_json::json!({"type":"message","topic":"news","data":0})
    );
    // Each restart-only change is named by its key.
    for key in ["server.max_connections", "connection.idle_timeout"] {
        assert!(
            d.log_text()
                .lines()
                .any(|l| l.contains("needs restart") && l.contains(key)),
            "{key} is reported as needing a restart:\n{}",
            d.log_text()
        );
    }
    publish(&mut third, "news", serde_json::json!(3), 4).await;
    assert_eq!(
        recv(&mut old).await,
        serde_json::json!({"type":"message","topic":"news","data":3})
    );

    // 4. The log level: at "warn", the info lines of the next reloads vanish
    // while its "needs restart" warning (max_connections still differs) stays.
    let text = config_text(
        &cert.cert_path,
        &cert.key_path,
        &[ORIGIN, other],
        "max_connections = 5000",
        "",
    )
    .replace("level = \"info\"", "level = \"warn\"");
    std::fs::write(&file, text).expect("config");
    let (applied, reloading) = (
        d.count_lines("reload applied"),
        d.count_lines("SIGHUP: reloading"),
    );
    for _ in 0..2 {
        let warned = d.count_lines("needs restart");
        d.signal(libc::SIGHUP);
        d.wait_for_line("needs restart", warned).await;
    }
    // stderr is one ordered stream: the second reload's warning came after
    // anything the first reload logged.
    assert_eq!(d.count_lines("reload applied"), applied, "{}", d.log_text());
    assert_eq!(
        d.count_lines("SIGHUP: reloading"),
        reloading + 1,
        "{}",
        d.log_text()
    );
}

/// Reads the next datagram, skipping `WATCHDOG=1` ones (counted).
fn next_state(sock: &UnixDatagram, watchdogs: &mut usize) -> String {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            Instant::now() < deadline,
            "no sd_notify datagram within {WAIT:?}"
        );
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                if msg == "WATCHDOG=1" {
                    *watchdogs += 1;
                } else {
                    return msg;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
}

fn wait_exit_blocking(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a child on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sd_notify_run(watchdog_pid_is_self: bool) {
    let cert = make_cert();
    let file = cert.dir.path().join("wsbroker.toml");
    std::fs::write(
        &file,
        config_text(&cert.cert_path, &cert.key_path, &[ORIGIN], "", ""),
    )
    .expect("config");
    let sock_path: PathBuf = cert.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut cmd = if watchdog_pid_is_self {
        // As systemd does: WATCHDOG_PID names the service's main pid.
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
            .arg(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&file);
        c
    } else {
        serve_cmd(&file)
    };
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID");
    let (child, log) = spawn_logged(cmd);
    let mut child = Guard(child);
    let dump = || log.lock().expect("log").join("\n");
    let pid = child.0.id() as libc::pid_t;

    let mut watchdogs = 0;
    assert_eq!(next_state(&sock, &mut watchdogs), "READY=1", "{}", dump());
    // WATCHDOG=1 every 200 ms (half of WATCHDOG_USEC).
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 256];
    let mut seen = 0;
    while seen < 3 {
        assert!(
            Instant::now() < deadline,
            "only {seen} WATCHDOG=1:\n{}",
            dump()
        );
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).trim().to_string();
            assert_eq!(msg, "WATCHDOG=1", "before any signal:\n{}", dump());
            seen += 1;
        }
    }
    // SAFETY: signals to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let reloading = next_state(&sock, &mut watchdogs);
    let mut fields: Vec<&str> = reloading.lines().collect();
    assert_eq!(fields.remove(0), "RELOADING=1", "{reloading}");
    for f in fields {
        let usec = f.strip_prefix("MONOTONIC_USEC=").expect(&reloading);
        assert!(usec.parse::<u64>().is_ok(), "{reloading}");
    }
    assert_eq!(next_state(&sock, &mut watchdogs), "READY=1");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(next_state(&sock, &mut watchdogs), "STOPPING=1");
    let status = wait_exit_blocking(&mut child.0, WAIT);
    assert!(status.success(), "{status}:\n{}", dump());
}

#[test]
fn sd_notify_ready_watchdog_reloading_stopping_in_order() {
    sd_notify_run(true);
}

#[test]
fn sd_notify_watchdog_without_watchdog_pid() {
    // libsystemd treats an unset WATCHDOG_PID as "for this process".
    sd_notify_run(false);
}

#[test]
fn warns_when_max_connections_does_not_fit_the_open_file_limit() {
    let cert = make_cert();
    let file = cert.dir.path().join("wsbroker.toml");
    std::fs::write(
        &file,
        config_text(
            &cert.cert_path,
            &cert.key_path,
            &[ORIGIN],
            "max_connections = 5000",
            "",
        ),
    )
    .expect("config");
    let mut cmd = serve_cmd(&file);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let d = Daemon::start(cmd);
    let line = d
        .log_lines()
        .into_iter()
        .find(|l| l.contains("open-file limit"))
        .unwrap_or_else(|| panic!("no warning:\n{}", d.log_text()));
    assert_eq!(field(&line, "level").as_deref(), Some("WARN"), "{line}");
    let message = field(&line, "message").expect("message");
    assert!(
        message.contains("5000") && message.contains("256"),
        "{message}"
    );
}

fn check_config(file: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("run check-config");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_exit_codes_and_one_line_per_problem() {
    let cert = make_cert();
    let good = cert.dir.path().join("good.toml");
    std::fs::write(
        &good,
        config_text(&cert.cert_path, &cert.key_path, &[ORIGIN], "", ""),
    )
    .expect("config");
    let (code, err) = check_config(&good);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "no warnings for a plain file: {err}");

    // Valid but suspicious: accepted (exit 0), with a warning naming the key.
    let short_idle = cert.dir.path().join("short_idle.toml");
    std::fs::write(
        &short_idle,
        config_text(
            &cert.cert_path,
            &cert.key_path,
            &[ORIGIN],
            "",
            "idle_timeout = \"2s\"",
        ),
    )
    .expect("config");
    let (code, err) = check_config(&short_idle);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with("warning: connection.idle_timeout: 2s is not longer than connection.ping_interval (20s)"),
        "{err}"
    );

    // No [tls] at all: the contract's paths are the defaults, and their
    // absence is reported by key (unless this machine has them).
    if !Path::new(wsbroker::config::DEFAULT_CERT).exists()
        && !Path::new(wsbroker::config::DEFAULT_KEY).exists()
    {
        let no_tls = cert.dir.path().join("no_tls.toml");
        std::fs::write(&no_tls, "[origins]\nallow = [\"https://a.com\"]\n").expect("config");
        let (code, err) = check_config(&no_tls);
        assert_eq!(code, 1, "{err}");
        assert_eq!(
            err.lines().collect::<Vec<_>>(),
            vec![
                "tls.cert: file not found: /etc/wsbroker/tls/cert.pem",
                "tls.key: file not found: /etc/wsbroker/tls/key.pem"
            ],
            "{err}"
        );
    }

    let missing = cert.dir.path().join("nope/cert.pem");
    let cases: Vec<(&str, String, String)> = vec![
        (
            "unknown key",
            config_text(
                &cert.cert_path,
                &cert.key_path,
                &[ORIGIN],
                "listne = \"x\"",
                "",
            ),
            "server.listne: unknown key".to_string(),
        ),
        (
            "bad duration",
            config_text(
                &cert.cert_path,
                &cert.key_path,
                &[ORIGIN],
                "",
                "idle_timeout = \"10 parsecs\"",
            ),
            "connection.idle_timeout: ".to_string(),
        ),
        (
            "not TOML",
            "[server\nlisten = 1\n".to_string(),
            format!(
                "config: {}: TOML parse error at line 1",
                cert.dir.path().join("bad.toml").display()
            ),
        ),
        (
            "missing cert",
            config_text(&missing, &cert.key_path, &[ORIGIN], "", ""),
            format!("tls.cert: file not found: {}", missing.display()),
        ),
        (
            "wildcard over a public suffix",
            config_text(
                &cert.cert_path,
                &cert.key_path,
                &[ORIGIN, "https://*.github.io"],
                "",
                "",
            ),
            "origins.allow[1]: `https://*.github.io`: `*.github.io` would allow every site under the public suffix `github.io`".to_string(),
        ),
    ];
    for (what, text, expected) in &cases {
        let bad = cert.dir.path().join("bad.toml");
        std::fs::write(&bad, text).expect("config");
        let (code, err) = check_config(&bad);
        assert_eq!(code, 1, "{what}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: one line per problem: {err}");
        assert!(lines[0].starts_with(expected.as_str()), "{what}: {err}");
    }

    // `serve` with an invalid file (the last case above) is a configuration
    // error: exit 2.
    let bad = cert.dir.path().join("bad.toml");
    let (child, log) = spawn_logged(serve_cmd(&bad));
    let mut child = Guard(child);
    let status = wait_exit_blocking(&mut child.0, WAIT);
    assert_eq!(
        status.code(),
        Some(2),
        "{}",
        log.lock().expect("log").join("\n")
    );
}

#[test]
fn check_config_reports_every_problem_at_once() {
    let cert = make_cert();
    let missing = cert.dir.path().join("nope/cert.pem");
    let expected = [
        "server.listne: unknown key".to_string(),
        "connection.idle_timeout: ".to_string(),
        format!("tls.cert: file not found: {}", missing.display()),
        "origins.allow[0]: ".to_string(),
        "origins.allow[2]: ".to_string(),
    ];
    let all = config_text(
        &missing,
        &cert.key_path,
        &["x", ORIGIN, "https://a.com/p"],
        "listne = \"x\"",
        "idle_timeout = \"10 parsecs\"",
    );
    let bad = cert.dir.path().join("all.toml");
    std::fs::write(&bad, all).expect("config");
    let (code, err) = check_config(&bad);
    assert_eq!(code, 1, "{err}");
    for e in &expected {
        assert!(
            err.lines().any(|l| l.starts_with(e.as_str())),
            "{e:?} not reported when combined with other problems:\n{err}"
        );
    }
    assert_eq!(err.lines().count(), 5, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_half_open_peer_is_reclaimed() {
    let cert = make_cert();
    let file = cert.dir.path().join("wsbroker.toml");
    std::fs::write(
        &file,
        config_text(
            &cert.cert_path,
            &cert.key_path,
            &[ORIGIN],
            "",
            "idle_timeout = \"1500ms\"\nping_interval = \"500ms\"",
        ),
    )
    .expect("config");
    let d = Daemon::start(serve_cmd(&file));
    let tls = client_tls(&[&cert.cert_der]);
    // Upgrade by hand, then neither read nor write: to the server this peer
    // looks exactly like one whose packets vanish.
    let stream = raw_upgrade(d.wss, &tls).await;
    let start = Instant::now();
    let active = "wsbroker_connections_active";
    let m = d.http("/metrics").await;
    assert_eq!(gauge(&m, active), 1.0, "{m}");

    let deadline = start
        + Duration::from_millis(1500)
        + wsbroker::connection::CLOSE_WAIT * 2
        + Duration::from_secs(2);
    loop {
        let m = d.http("/metrics").await;
        // The gauge and the close counters are separate series in one
        // scrape: wait until the close is counted too, then check its reason.
        if gauge(&m, active) == 0.0 && closes_total(&m) == 1.0 {
            assert_eq!(
                metric(
                    &m,
                    r#"wsbroker_connections_closed_total{reason="idle_timeout"}"#
                ),
                1.0,
                "{m}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still counted active after {:?}:\n{m}",
            start.elapsed()
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    drop(stream);
    // SIGINT is a shutdown like SIGTERM.
    let mut d = d;
    d.signal(libc::SIGINT);
    let status = d.wait_exit(WAIT).await;
    assert!(status.success(), "{status}:\n{}", d.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_drain_short() {
    let cert = make_cert();
    let file = cert.dir.path().join("wsbroker.toml");
    std::fs::write(
        &file,
        config_text(
            &cert.cert_path,
            &cert.key_path,
            &[ORIGIN],
            "shutdown_grace = \"60s\"",
            "",
        ),
    )
    .expect("config");
    let mut d = Daemon::start(serve_cmd(&file));
    let tls = client_tls(&[&cert.cert_der]);
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(raw_upgrade(d.wss, &tls).await);
    }
    d.signal(libc::SIGTERM);
    let deadline = Instant::now() + WAIT;
    while !d.http("/readyz").await.starts_with("HTTP/1.1 503") {
        assert!(Instant::now() < deadline, "not draining");
        sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}:\n{}", d.log_text());
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: libc::pid_t) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

fn open_fds(pid: libc::pid_t) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_neither_spins_nor_kills_the_accept_loop() {
    const LIMIT: u64 = 64;
    let cert = make_cert();
    let file = cert.dir.path().join("wsbroker.toml");
    std::fs::write(
        &file,
        config_text(
            &cert.cert_path,
            &cert.key_path,
            &[ORIGIN],
            "handshake_timeout = \"3s\"",
            "",
        ),
    )
    .expect("config");
    let mut cmd = serve_cmd(&file);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let d = Daemon::start(cmd);
    let pid = d.pid();
    // Silent TCP clients: each accepted one holds an fd until the handshake
    // budget runs out; the rest wait in the backlog while accept() fails.
    let mut silent = Vec::new();
    for _ in 0..LIMIT + 20 {
        silent.push(TcpStream::connect(d.wss).await.expect("connect"));
    }
    let deadline = Instant::now() + WAIT;
    while open_fds(pid) < LIMIT as usize - 1 {
        assert!(Instant::now() < deadline, "fds: {}", open_fds(pid));
        sleep(Duration::from_millis(20)).await;
    }
    let warned = d.count_lines("accept failed");
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    sleep(Duration::from_millis(1000)).await;
    let busy = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    assert!(
        busy < 0.3,
        "daemon uses {:.0}% CPU while out of fds",
        busy * 100.0
    );
    d.wait_for_line("accept failed", warned.saturating_sub(1))
        .await;
    drop(silent);
    // Once fds are free again, service resumes.
    let tls = client_tls(&[&cert.cert_der]);
    let deadline = Instant::now() + WAIT;
    let mut ws = loop {
        match ws_connect(d.wss, &tls, ORIGIN).await {
            Ok(ws) => break ws,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no recovery: {e}\n{}",
                    d.log_text()
                );
                sleep(Duration::from_millis(50)).await;
            }
        }
    };
    subscribe(&mut ws, "back", 1).await;
    // Every failed accept was counted.
    let m = d.http("/metrics").await;
    let failed = gauge(&m, "wsbroker_accept_errors_total");
    assert!(
        failed >= warned.max(1) as f64,
        "accept_errors_total {failed}, {warned} warning lines (rate-limited)"
    );
}
