//! Every close the server starts reaches the client as a Close frame with
//! its code, also while the client is still sending (CONTRACT §5, issue 15):
//! after its Close the server drains input until the client closes its side,
//! so an unread receive buffer never turns the close into a TCP reset.
//!
//! Each kind runs many times against a raw client (`common::raw`) that keeps
//! writing until the Close arrives and fails on a reset in either direction.

mod common;

use std::time::{Duration, Instant};

use common::raw::{self, close_code_while_sending, ServerClose, CONTINUATION, TEXT};
use common::*;

/// Iterations per close kind.
const ROUNDS: usize = 30;

/// Runs `rounds` sequential connections that each send `first`, then `junk`
/// until the server closes; every one must end with `code`/`reason` and
/// cleanly.
async fn every_time(
    server: &TestServer,
    rounds: usize,
    first: &[u8],
    junk: &[u8],
    pace: Duration,
    code: u16,
    reason: &str,
) {
    let expected = ServerClose {
        code,
        reason: reason.into(),
    };
    let started = Instant::now();
    for round in 0..rounds {
        let stream = server.raw_ws().await;
        let got = close_code_while_sending(stream, first.to_vec(), junk.to_vec(), pace).await;
        assert_eq!(
            got.as_ref(),
            Ok(&expected),
            "round {round} of {rounds} (after {:?})",
            started.elapsed()
        );
    }
}

fn publish(topic: &str, data_len: usize) -> Vec<u8> {
    raw::text(&format!(
        r#"{{"op":"publish","topic":"{topic}","data":"{}"}}"#,
        "x".repeat(data_len)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_single_frame_gets_1009_while_its_payload_still_arrives() {
    let server = TestServer::start(&[("WSBROKER__SERVER__MAX_MESSAGE_SIZE", "65536")]).await;
    // A 1 MiB frame: the header is refused at once, the payload keeps coming.
    let first = raw::frame_header(0x80 | TEXT, 1 << 20);
    every_time(
        &server,
        ROUNDS,
        &first,
        &vec![b'a'; 16 * 1024],
        Duration::ZERO,
        1009,
        "message too big",
    )
    .await;
}

/// The case of the issue: fragments each under the limit, together over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fragmented_message_gets_1009_while_fragments_still_arrive() {
    let server = TestServer::start(&[("WSBROKER__SERVER__MAX_MESSAGE_SIZE", "65536")]).await;
    let first = raw::frame(TEXT, false, &[b'a'; 1000]);
    let fragment = raw::frame(CONTINUATION, false, &[b'b'; 8 * 1024]);
    every_time(
        &server,
        ROUNDS,
        &first,
        &fragment.repeat(4),
        Duration::ZERO,
        1009,
        "message too big",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_gets_1007_while_requests_still_arrive() {
    let server = TestServer::start(&[]).await;
    let first = raw::frame(TEXT, true, &[0x7b, 0xff, 0xfe, 0x7d]);
    every_time(
        &server,
        ROUNDS,
        &first,
        &publish("nobody.listens", 2000).repeat(8),
        Duration::ZERO,
        1007,
        "invalid UTF-8",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violation_gets_1002_while_requests_still_arrive() {
    let server = TestServer::start(&[]).await;
    // RSV1 set without a negotiated extension.
    let first = raw::frame_raw(0x80 | 0x40 | TEXT, b"{}");
    every_time(
        &server,
        ROUNDS,
        &first,
        &publish("nobody.listens", 2000).repeat(8),
        Duration::ZERO,
        1002,
        "protocol error",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_flood_gets_1008_while_it_floods() {
    let server = TestServer::start(&[("WSBROKER__CONNECTION__MAX_INBOUND_RATE", "50")]).await;
    every_time(
        &server,
        ROUNDS,
        &[],
        &publish("nobody.listens", 100).repeat(20),
        Duration::ZERO,
        1008,
        "rate limit exceeded",
    )
    .await;
}

/// The client publishes to its own topic faster than its one-message outbox
/// drains, and keeps publishing when the disconnect comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_gets_1008_while_it_still_publishes() {
    let server = TestServer::start(&[
        ("WSBROKER__CONNECTION__OVERFLOW", "disconnect"),
        ("WSBROKER__CONNECTION__QUEUE_CAPACITY", "1"),
        ("WSBROKER__CONNECTION__MAX_INBOUND_RATE", "0"),
    ])
    .await;
    let first = raw::text(r#"{"op":"subscribe","topic":"mine"}"#);
    every_time(
        &server,
        ROUNDS,
        &first,
        &publish("mine", 8 * 1024).repeat(4),
        Duration::ZERO,
        1008,
        "slow consumer",
    )
    .await;
}

/// Idle: the client trickles the payload of a frame it never finishes (no
/// complete frame, so no activity), and is still trickling at the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_gets_1001_while_a_frame_trickles_in() {
    let server = TestServer::start(&[
        ("WSBROKER__CONNECTION__PING_INTERVAL", "100ms"),
        ("WSBROKER__CONNECTION__IDLE_TIMEOUT", "400ms"),
    ])
    .await;
    let first = raw::frame_header(0x80 | TEXT, 60_000);
    // Concurrently: each round waits for the timeout.
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let stream = server.raw_ws().await;
        let first = first.clone();
        rounds.push(tokio::spawn(async move {
            close_code_while_sending(stream, first, vec![b'a'; 32], Duration::from_millis(10)).await
        }));
    }
    for (i, r) in rounds.into_iter().enumerate() {
        let got = r.await.expect("client task");
        assert_eq!(
            got,
            Ok(ServerClose {
                code: 1001,
                reason: "idle timeout".into()
            }),
            "connection {i}"
        );
    }
}

/// Shutdown: clients publishing steadily when the drain reaches them; the
/// drain still ends within the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gets_1001_while_clients_still_publish() {
    for round in 0..3 {
        let server = TestServer::start(&[("WSBROKER__SERVER__SHUTDOWN_GRACE", "2s")]).await;
        let mut clients = Vec::new();
        for _ in 0..10 {
            let stream = server.raw_ws().await;
            clients.push(tokio::spawn(close_code_while_sending(
                stream,
                Vec::new(),
                publish("nobody.listens", 500),
                Duration::from_millis(5),
            )));
        }
        let t0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(6), server.server.shutdown())
            .await
            .expect("shutdown returns");
        let took = t0.elapsed();
        // Within the grace plus scheduling slack; a drain that ignored the
        // grace could run 2 s past it.
        assert!(
            took < Duration::from_millis(3000),
            "drain took {took:?} (grace 2s)"
        );
        for (i, c) in clients.into_iter().enumerate() {
            assert_eq!(
                c.await.expect("client task"),
                Ok(ServerClose {
                    code: 1001,
                    reason: "server shutting down".into()
                }),
                "round {round}, client {i}"
            );
        }
    }
}

/// A client that closes its side without a word is not kept waiting, and a
/// client that stays silent after the Close is released after the drain's
/// 2 s bound: neither holds the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_is_bounded_by_two_seconds() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&[]).await;
    let mut s = server.raw_ws().await;
    // 1007, then the client neither reads nor closes.
    s.write_all(&raw::frame(TEXT, true, &[0xff]))
        .await
        .expect("write");
    s.flush().await.expect("flush");
    let t0 = Instant::now();
    let mut all = Vec::new();
    // The server's Close and close_notify come at once; its socket is
    // closed (EOF after them) after the 2 s drain bound.
    let r = tokio::time::timeout(WAIT, s.read_to_end(&mut all)).await;
    assert!(r.is_ok(), "server never ended the stream");
    assert!(
        all.windows(2).any(|w| w == [0x88, 15]),
        "close frame in {all:?}"
    );
    let metrics_wait = Instant::now() + WAIT;
    loop {
        // The connection's slot (per server; the metrics are per process).
        if server.server.shared().limiter.current() == 0 {
            break;
        }
        assert!(Instant::now() < metrics_wait, "connection never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "released after {took:?}, expected the 2 s drain bound"
    );
}

/// Runs `rounds` connections at once, each made by `connect(round)`, that
/// send `first` and then `junk` every `pace` until the server closes; every
/// one must end with `code`/`reason` and cleanly. For closes that come after
/// a fixed delay (auth), where rounds one after another would take minutes.
async fn every_one_at_once<F, Fut>(
    rounds: usize,
    connect: F,
    first: Vec<u8>,
    junk: Vec<u8>,
    pace: Duration,
    code: u16,
    reason: &str,
) where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
{
    let expected = ServerClose {
        code,
        reason: reason.into(),
    };
    let mut tasks = Vec::new();
    for round in 0..rounds {
        let stream = connect(round).await;
        let (first, junk) = (first.clone(), junk.clone());
        tasks.push(tokio::spawn(async move {
            close_code_while_sending(stream, first, junk, pace).await
        }));
    }
    for (round, task) in tasks.into_iter().enumerate() {
        let got = task.await.expect("round task");
        assert_eq!(got.as_ref(), Ok(&expected), "round {round} of {rounds}");
    }
}

/// A jwt-mode server keyed with an HMAC secret written to a temp file.
async fn jwt_server(extra: &[(&str, &str)]) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = common::auth::write(
        dir.path(),
        "secret",
        &String::from_utf8_lossy(common::auth::SECRET),
    );
    let secret = secret.display().to_string();
    let mut overrides = vec![
        ("WSBROKER__AUTH__MODE", "jwt"),
        ("WSBROKER__AUTH__HMAC_SECRET_FILE", secret.as_str()),
    ];
    overrides.extend_from_slice(extra);
    (TestServer::start(&overrides).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_timeout_gets_4003_while_forbidden_requests_still_arrive() {
    let (server, _dir) = jwt_server(&[("WSBROKER__AUTH__AUTH_TIMEOUT", "300ms")]).await;
    // No token and no anonymous permission: every subscribe is refused
    // (`forbidden`) until the auth_timeout closes the connection.
    let sub = raw::text(r#"{"op":"subscribe","topic":"a","id":1}"#);
    every_one_at_once(
        ROUNDS,
        |_| server.raw_ws(),
        sub.clone(),
        sub,
        Duration::from_millis(5),
        4003,
        "authentication required",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_gets_4001_while_publishes_still_arrive() {
    let (server, _dir) = jwt_server(&[("WSBROKER__AUTH__LEEWAY", "0s")]).await;
    let signer = common::auth::Signer::hmac("HS256", common::auth::SECRET);
    // `exp` is whole seconds: 3 s from now leaves at least 2 s for the
    // upgrades (a 401 `token expired` would fail the round's connect).
    let token = signer.sign(&common::auth::claims("u", 3, &[], &["a"]));
    let header = format!("Authorization: Bearer {token}\r\n");
    every_one_at_once(
        ROUNDS,
        |_| server.raw_ws_with(&header),
        publish("a", 100),
        publish("a", 100),
        Duration::from_millis(2),
        4001,
        "token expired",
    )
    .await;
}
