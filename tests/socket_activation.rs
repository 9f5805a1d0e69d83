//! Socket activation (CONTRACT §12, issue 15), without systemd: the test
//! plays the service manager. It owns the listening socket, starts the real
//! binary with it as fd 3 (`LISTEN_FDS`, `LISTEN_PID` = the daemon's pid),
//! and restarts the daemon the way `systemctl restart` does (SIGTERM, wait
//! for the exit, start the next one on the same socket) while a client opens
//! a connection every 50 ms: no attempt may be refused or dropped.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{activated_command, config_file, Daemon};
use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// How one connection attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Upgraded and the subscribe was acknowledged.
    Served,
    /// Upgraded, then closed with this code before the ack (the old daemon
    /// took it just before it stopped accepting, then drained it).
    UpgradedThenClosed(u16),
    /// Anything else: refused, reset, timed out, not upgraded.
    Failed(String),
}

/// When an attempt began, and its task.
type Attempt = (Instant, tokio::task::JoinHandle<Outcome>);

async fn attempt(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, id: u64) -> Outcome {
    let go = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").expect("name");
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let mut req = format!("wss://localhost:{}/ws", addr.port())
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("Origin", ORIGIN.parse().expect("origin"));
        let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
        let sub = serde_json::json!({"op":"subscribe","topic":"t","id":id}).to_string();
        ws.send(Message::Text(sub.into()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str().contains("\"ack\"") => {
                    let _ = ws.close(None).await;
                    return Ok(Outcome::Served);
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Outcome::UpgradedThenClosed(
                        frame.map(|f| u16::from(f.code)).unwrap_or(1005),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("ended before the ack".to_string()),
            }
        }
    };
    match tokio::time::timeout(WAIT, go).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => Outcome::Failed("timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_inherited_socket_refuses_no_one() {
    let cert = make_cert();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let file = config_file(
        &cert,
        &format!("\"{addr}\""),
        "shutdown_grace = \"2s\"",
        "",
        "",
    );
    let mut first = Daemon::start(activated_command(&file, &[&listener], &["wsbroker"]));
    assert_eq!(first.wss, addr, "serves the inherited socket");
    assert!(
        first.log_text().contains("socket activation"),
        "{}",
        first.log_text()
    );
    let tls = client_config(&cert.cert_der);

    // The client: one attempt every 50 ms, each recorded with its start.
    let results: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = {
        let (results, stop, tls) = (results.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut id = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                tick.tick().await;
                id += 1;
                let task = tokio::spawn(attempt(addr, tls.clone(), id));
                results.lock().expect("lock").push((Instant::now(), task));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // `systemctl restart`: stop, wait for the exit, start the next one.
    let sigterm = Instant::now();
    first.signal(libc::SIGTERM);
    let status = first.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}:\n{}", first.log_text());
    let gap_start = Instant::now();
    // Nobody accepts now: attempts wait in the backlog.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cmd = activated_command(&file, &[&listener], &["wsbroker"]);
    let second = tokio::task::spawn_blocking(move || Daemon::start(cmd))
        .await
        .expect("start");
    let second_up = Instant::now();
    assert_eq!(second.wss, addr);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    driver.await.expect("driver");

    let attempts: Vec<Attempt> = std::mem::take(&mut *results.lock().expect("lock"));
    let mut after_sigterm = 0;
    let mut queued_in_gap = 0;
    let mut lines = Vec::new();
    let mut failed = 0;
    for (started, task) in attempts {
        let outcome = task.await.expect("attempt task");
        let ms = if started >= sigterm {
            started.duration_since(sigterm).as_millis() as i64
        } else {
            -(sigterm.duration_since(started).as_millis() as i64)
        };
        lines.push(format!("{ms:>6} ms after SIGTERM: {outcome:?}"));
        if matches!(outcome, Outcome::Failed(_)) {
            failed += 1;
        }
        if started >= sigterm {
            after_sigterm += 1;
        }
        if started >= gap_start && started < second_up {
            queued_in_gap += 1;
            // Waited in the backlog and was served by the next daemon.
            assert_eq!(outcome, Outcome::Served, "{}", lines.join("\n"));
        }
        if started >= second_up {
            assert_eq!(outcome, Outcome::Served, "{}", lines.join("\n"));
        }
    }
    eprintln!("{}", lines.join("\n"));
    assert_eq!(
        failed,
        0,
        "refused or dropped attempts:\n{}",
        lines.join("\n")
    );
    assert!(after_sigterm >= 10, "{}", lines.join("\n"));
    assert!(queued_in_gap >= 4, "{}", lines.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_does_not_match_server_listen_is_a_startup_error() {
    let cert = make_cert();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let other = free_port();

    // The address differs.
    let file = config_file(&cert, &format!("\"127.0.0.1:{other}\""), "", "", "");
    let cmd = activated_command(&file, &[&listener], &["wsbroker.socket"]);
    let (status, log) = match Daemon::try_start(cmd) {
        Ok(_) => panic!("started on a socket bound elsewhere"),
        Err(e) => e,
    };
    assert_eq!(status.code(), Some(2), "{log}");
    let expected = format!(
        "server.listen: inherited socket 1 (fd 3, \"wsbroker.socket\"): bound to {addr}, but server.listen lists 127.0.0.1:{other} in its place"
    );
    assert!(log.contains(&expected), "expected {expected:?} in:\n{log}");

    // The count differs.
    let file = config_file(
        &cert,
        &format!("[\"{addr}\", \"127.0.0.1:{other}\"]"),
        "",
        "",
        "",
    );
    let cmd = activated_command(&file, &[&listener], &["wsbroker.socket"]);
    let (status, log) = match Daemon::try_start(cmd) {
        Ok(_) => panic!("started with one socket for two addresses"),
        Err(e) => e,
    };
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("server.listen: 2 address(es) listed")
            && log.contains("passed 1 socket(s) (LISTEN_FDS=1)"),
        "{log}"
    );
    // And nothing was bound in its place: the socket still only queues.
    assert!(listener.set_nonblocking(true).is_ok());
    assert!(listener.accept().is_err(), "no connection was ever made");
}

/// The race the restart test can hit: a connection the old daemon accepted
/// just before SIGTERM finishes its handshake during the drain. It is
/// upgraded and closed with 1001 like every open connection (the client
/// reconnects into the shared backlog), not refused with a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_accepted_before_the_drain_is_upgraded_then_closed_1001() {
    let server = Arc::new(TestServer::start(&[("WSBROKER__SERVER__SHUTDOWN_GRACE", "3s")]).await);
    // Accepted and through TLS, the upgrade request not sent yet.
    let mut tls = server.tls().await;
    let draining = {
        let server = server.clone();
        tokio::spawn(async move { server.server.shutdown().await })
    };
    let deadline = Instant::now() + WAIT;
    while server
        .server
        .shared()
        .ready
        .load(std::sync::atomic::Ordering::Acquire)
    {
        assert!(Instant::now() < deadline, "drain never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    raw::upgrade(&mut tls)
        .await
        .expect("upgraded although the drain began");
    let got = raw::close_code_while_sending(tls, Vec::new(), Vec::new(), Duration::ZERO).await;
    assert_eq!(
        got,
        Ok(raw::ServerClose {
            code: 1001,
            reason: "server shutting down".into()
        })
    );
    tokio::time::timeout(WAIT, draining)
        .await
        .expect("drain ends")
        .expect("drain task");
}
