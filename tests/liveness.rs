//! Liveness and limits against an in-process server (CONTRACT §3, §5; issue 5):
//! pings and the idle timeout, the handshake budget (slowloris), and
//! `max_connections` / `max_subscriptions`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// `connection::CLOSE_WAIT`: how long the server waits for a close reply.
const CLOSE_WAIT: Duration = wsbroker::connection::CLOSE_WAIT;

/// A frame as a raw client sees it (server frames are never masked).
#[derive(Debug, PartialEq)]
enum Frame {
    Ping,
    Pong,
    Text(String),
    Close(u16, String),
    Other(u8),
}

/// A hand-driven WebSocket client: it never answers anything on its own, so
/// it can play a peer that ignores pings.
struct Raw {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(srv: &TestServer) -> Raw {
        let mut tls = srv.tls().await;
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await.expect("write upgrade");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = timeout(WAIT, tls.read(&mut chunk))
                .await
                .expect("upgrade response in time")
                .expect("read upgrade response");
            assert!(n > 0, "closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..head_end);
        Raw { tls, buf }
    }

    /// Ensures `n` bytes are buffered; false on EOF or error.
    async fn fill(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            match self.tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        true
    }

    /// The next frame; `None` once the connection is gone.
    async fn next_frame(&mut self) -> Option<Frame> {
        if !self.fill(2).await {
            return None;
        }
        let opcode = self.buf[0] & 0x0f;
        assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
        let (len, header) = match self.buf[1] & 0x7f {
            126 => {
                if !self.fill(4).await {
                    return None;
                }
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                if !self.fill(10).await {
                    return None;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        if !self.fill(header + len).await {
            return None;
        }
        let payload: Vec<u8> = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        Some(match opcode {
            0x1 => Frame::Text(String::from_utf8(payload).expect("utf-8 text")),
            0x8 => {
                assert!(payload.len() >= 2, "close frame carries a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                Frame::Close(code, String::from_utf8_lossy(&payload[2..]).into_owned())
            }
            0x9 => Frame::Ping,
            0xA => Frame::Pong,
            other => Frame::Other(other),
        })
    }
}

fn rejected(m: &str, reason: &str) -> f64 {
    metric(
        m,
        &format!("wsbroker_handshake_rejected_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_1001_then_cut() {
    let srv = TestServer::start(&[
        ("WSBROKER__CONNECTION__IDLE_TIMEOUT", "2s"),
        ("WSBROKER__CONNECTION__PING_INTERVAL", "500ms"),
    ])
    .await;
    let mut raw = Raw::connect(&srv).await;
    let start = Instant::now();
    let mut pings = 0;
    let close = timeout(WAIT, async {
        loop {
            match raw.next_frame().await {
                Some(Frame::Ping) => pings += 1,
                Some(Frame::Close(code, reason)) => return (code, reason),
                other => panic!("unexpected before the close: {other:?}"),
            }
        }
    })
    .await
    .expect("closed within WAIT");
    let elapsed = start.elapsed();
    assert_eq!(close, (1001, "idle timeout".to_string()));
    assert!(
        elapsed >= Duration::from_millis(1800) && elapsed <= Duration::from_millis(3500),
        "closed after {elapsed:?}, idle_timeout is 2s"
    );
    assert!(pings >= 2, "a ping every 500ms, saw {pings} in {elapsed:?}");
    // We never answer the close: the server must still drop the socket.
    let gone = timeout(CLOSE_WAIT + Duration::from_secs(3), async {
        while let Some(frame) = raw.next_frame().await {
            assert!(matches!(frame, Frame::Ping), "after the close: {frame:?}");
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "TCP still open {:?} after the close",
        start.elapsed() - elapsed
    );
}

/// The contract bounds `idle_timeout` by nothing: shorter than the ping
/// interval (here the default 20 s) it is accepted and cuts a quiet client
/// before any ping goes out, even one that would answer pings.
#[tokio::test]
async fn an_idle_timeout_shorter_than_the_ping_interval_is_accepted_and_enforced() {
    let overrides = [("WSBROKER__CONNECTION__IDLE_TIMEOUT", "1s")];
    let cert = make_cert();
    let settings = settings(&cert, &overrides);
    assert_eq!(settings.connection.ping_interval, Duration::from_secs(20));
    let warnings = settings.warnings();
    assert!(
        warnings.len() == 1 && warnings[0].starts_with("connection.idle_timeout: "),
        "{warnings:?}"
    );
    let srv = TestServer::start(&overrides).await;
    let mut ws = srv.ws().await;
    let start = Instant::now();
    let end = timeout(WAIT, ws.next()).await.expect("closed within WAIT");
    let elapsed = start.elapsed();
    match end {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001);
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected close 1001 \"idle timeout\", got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed <= Duration::from_millis(3000),
        "closed after {elapsed:?}, idle_timeout is 1s"
    );
}

#[tokio::test]
async fn a_client_that_answers_pings_outlives_several_idle_timeouts() {
    let srv = TestServer::start(&[
        ("WSBROKER__CONNECTION__IDLE_TIMEOUT", "1s"),
        ("WSBROKER__CONNECTION__PING_INTERVAL", "250ms"),
    ])
    .await;
    let mut ws = srv.ws().await;
    subscribe(&mut ws, "alive", 1).await;
    // Only read (tungstenite answers each ping with a pong); send nothing.
    let until = Instant::now() + Duration::from_millis(3500);
    let mut pings = 0;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match timeout(left, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => panic!("connection should stay quiet and open, got {other:?}"),
        }
    }
    assert!(pings >= 8, "pings every 250ms for 3.5s, saw {pings}");
    let mut publisher = srv.ws().await;
    publish(
        &mut publisher,
        "alive",
        serde_json::json!({"still":"here"}),
        2,
    )
    .await;
    let msg = recv(&mut ws).await;
    assert_eq!(
        msg,
        serde_json::json!({"type":"message","topic":"alive","data":{"still":"here"}})
    );
}

#[tokio::test]
async fn slowloris_and_silent_clients_are_cut_at_the_handshake_timeout() {
    let srv = TestServer::start(&[("WSBROKER__SERVER__HANDSHAKE_TIMEOUT", "1s")]).await;
    let before = rejected(&srv.metrics().await, "timeout");

    // One header byte every 300 ms: the full request would take a minute.
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n\r\n"
    );
    let start = Instant::now();
    let tls = srv.tls().await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut reader = tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
        sink
    });
    let mut sent = 0;
    let cut = timeout(WAIT, async {
        for b in request.as_bytes() {
            tokio::select! {
                r = &mut reader => return r.expect("reader"),
                _ = sleep(Duration::from_millis(300)) => {}
            }
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                break;
            }
            sent += 1;
        }
        reader.await.expect("reader")
    })
    .await
    .expect("slowloris connection cut");
    let elapsed = start.elapsed();
    assert!(cut.is_empty(), "no response to a partial request: {cut:?}");
    assert!(
        elapsed < Duration::from_millis(2500),
        "cut after {elapsed:?}; handshake_timeout is 1s"
    );
    assert!(
        sent < request.len() / 2,
        "sent {sent} of {} bytes",
        request.len()
    );

    // A TCP client that sends nothing at all (not even a ClientHello).
    let start = Instant::now();
    let mut tcp = TcpStream::connect(srv.addr).await.expect("connect");
    let mut buf = [0u8; 64];
    let r = timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("silent client cut");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_millis(2500),
        "silent client cut after {elapsed:?}"
    );

    // Both counted (counters are process-wide: other tests only add).
    let deadline = Instant::now() + WAIT;
    loop {
        let now = rejected(&srv.metrics().await, "timeout");
        if now - before >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timeout rejections: {before} -> {now}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn beyond_max_connections_is_503_while_the_others_keep_working() {
    let srv = TestServer::start(&[("WSBROKER__SERVER__MAX_CONNECTIONS", "3")]).await;
    let mut a = srv.ws().await;
    let mut b = srv.ws().await;
    let mut c = srv.ws().await;
    subscribe(&mut a, "full", 1).await;
    subscribe(&mut b, "full", 1).await;

    match srv.try_ws("/ws", Some(ORIGIN)).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            let retry = resp
                .headers()
                .get("retry-after")
                .expect("Retry-After header")
                .to_str()
                .expect("ascii");
            assert!(retry.parse::<u64>().is_ok(), "Retry-After: {retry}");
        }
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("a 4th connection was accepted with max_connections = 3"),
    }

    publish(&mut c, "full", serde_json::json!(1), 2).await;
    for ws in [&mut a, &mut b] {
        assert_eq!(
            recv(ws).await,
            serde_json::json!({"type":"message","topic":"full","data":1})
        );
    }

    // Free a slot: a new client gets in (once the server has seen the close).
    a.close(None).await.expect("close");
    while let Ok(Some(_)) = timeout(WAIT, a.next()).await {}
    let deadline = Instant::now() + WAIT;
    let mut d = loop {
        match srv.try_ws("/ws", Some(ORIGIN)).await {
            Ok(ws) => break ws,
            Err(WsError::Http(resp)) if resp.status().as_u16() == 503 => {
                assert!(Instant::now() < deadline, "slot never freed");
                sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    subscribe(&mut d, "full", 3).await;
    publish(&mut c, "full", serde_json::json!(2), 4).await;
    for ws in [&mut b, &mut d] {
        assert_eq!(
            recv(ws).await,
            serde_json::json!({"type":"message","topic":"full","data":2})
        );
    }
}

#[tokio::test]
async fn beyond_max_subscriptions_is_error_limit() {
    let srv = TestServer::start(&[("WSBROKER__CONNECTION__MAX_SUBSCRIPTIONS", "2")]).await;
    let mut ws = srv.ws().await;
    subscribe(&mut ws, "a", 1).await;
    subscribe(&mut ws, "b.*", 2).await;
    send(
        &mut ws,
        serde_json::json!({"op":"subscribe","topic":"c","id":3}),
    )
    .await;
    let err = recv(&mut ws).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["id"], 3, "{err}");
    assert_eq!(err["code"], "limit", "{err}");
    // Re-subscribing to a held pattern is not a new subscription; the
    // connection stays usable.
    subscribe(&mut ws, "a", 4).await;
    ws.send(Message::Close(None)).await.expect("close");
}
