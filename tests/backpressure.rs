//! Per-connection backpressure (CONTRACT §5): a stalled reader never slows the
//! publisher or other subscribers, its queue stays within its bounds, drops
//! are counted, and `disconnect` closes it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A TLS connection whose socket has a receive buffer of `rcvbuf` bytes, so
/// that when the client stops reading the server's writes block quickly.
async fn small_window_tls(
    srv: &TestServer,
    rcvbuf: u32,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(rcvbuf).expect("rcvbuf");
    let tcp = socket.connect(srv.addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(srv.tls.clone());
    connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("tls")
}

/// The receive buffer of a client that stops reading and later resumes.
/// Small next to the ~20 MB published, but not tiny: 4 KiB is too small for
/// TCP window scaling and offers a window under the server's segment size,
/// so a resumed flow crawled on zero-window probes, ~2 KB each (`ss` showed
/// `snd_wnd:1943`, `mss:2048`, a persist timer and 2.8 MB unsent).
const RESUMING_RCVBUF: u32 = 256 * 1024;

/// A WebSocket client over [`small_window_tls`].
async fn stalled_client(srv: &TestServer) -> Ws {
    let tls = small_window_tls(srv, RESUMING_RCVBUF).await;
    let mut req = format!("wss://localhost:{}/ws", srv.addr.port())
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", ORIGIN.parse().expect("origin"));
    let (ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade");
    ws
}

/// How long a reader that resumes after stalling for `stalled` may wait for
/// the rest of the stream. Healthy runs take milliseconds, but the kernel
/// may have to retransmit: the stalled client's full receive buffer can drop
/// a segment, which the server then retransmits with exponential backoff, so
/// the next attempt can come up to about `stalled` after the reader resumes.
/// (Seen beside three busy loops, 11 s into the run: the client's socket had
/// dropped 8 segments (`d8`); the server's had `rto:6784 backoff:5` and
/// 3.9 MB unsent behind the lost one, with the window open again. The
/// resumed reader waited 1–7 s in 14 of 200 such test runs.)
fn resume_wait(stalled: Duration) -> Duration {
    stalled + Duration::from_secs(30)
}

/// The kernel's view of the test server's TCP sockets (`ss`), for failure
/// messages: a stalled flow shows as a full Send-Q behind a small window
/// and a persist timer, or behind a backed-off retransmission timer.
fn socket_report(srv: &TestServer) -> String {
    let filter = format!("( sport = :{p} or dport = :{p} )", p = srv.addr.port());
    match std::process::Command::new("ss")
        .args(["-tanoiem", "state", "all", &filter])
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => format!("(ss not available: {e})"),
    }
}

const N: u64 = 100_000;

fn payload(i: u64) -> String {
    // ~200 bytes a message: 100,000 of them are far more than kernel buffers hold.
    format!(
        r#"{{"op":"publish","topic":"bp","data":[{i},"{}"]}}"#,
        "p".repeat(180)
    )
}

/// Chunk size: the fast subscriber's queue (64 KiB, ~290 messages) holds a
/// whole chunk, so it keeps up; the stalled one overflows.
const CHUNK: u64 = 200;

/// Publishes N messages (no ids) at the pace of the fast subscriber, then one
/// with an id, and returns how long the whole run took: the publisher is never
/// blocked by the stalled reader.
async fn publish_all(publ: &mut Ws, progress: &mut tokio::sync::watch::Receiver<u64>) -> Duration {
    let start = Instant::now();
    let mut i = 0;
    while i < N {
        let end = (i + CHUNK).min(N);
        for j in i..end {
            publ.feed(Message::Text(payload(j).into()))
                .await
                .expect("feed");
        }
        publ.flush().await.expect("flush");
        tokio::time::timeout(WAIT, progress.wait_for(|got| *got >= end))
            .await
            .expect("fast subscriber keeps up")
            .expect("fast subscriber alive");
        i = end;
    }
    send(
        publ,
        json!({"op":"publish","topic":"other","data":"end","id":"last"}),
    )
    .await;
    let ack = recv(publ).await;
    assert_eq!(ack, json!({"type":"ack","id":"last"}));
    start.elapsed()
}

async fn fast_reader(mut ws: Ws, progress: tokio::sync::watch::Sender<u64>) -> u64 {
    let mut next = 0u64;
    while next < N {
        let v = recv(&mut ws).await;
        assert_eq!(
            v["data"][0], next,
            "fast subscriber gets every message in order"
        );
        next += 1;
        if next.is_multiple_of(CHUNK) || next == N {
            progress.send_replace(next);
        }
    }
    next
}

fn settings(overflow: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("WSBROKER__CONNECTION__QUEUE_CAPACITY", "1000"),
        ("WSBROKER__CONNECTION__QUEUE_MAX_BYTES", "65536"),
        ("WSBROKER__CONNECTION__OVERFLOW", overflow),
        ("WSBROKER__CONNECTION__MAX_INBOUND_RATE", "0"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_with_drop_oldest() {
    let srv = TestServer::start(&settings("drop_oldest")).await;
    let dropped_before = metric(
        &srv.metrics().await,
        r#"wsbroker_messages_dropped_total{reason="queue_full"}"#,
    );
    let mut stalled = stalled_client(&srv).await;
    subscribe(&mut stalled, "bp", 1).await;
    let mut fast = srv.ws().await;
    subscribe(&mut fast, "bp", 1).await;
    let (tx, mut progress) = tokio::sync::watch::channel(0u64);
    let fast = tokio::spawn(fast_reader(fast, tx));
    let mut publ = srv.ws().await;

    // Watch the stalled connection's queue while publishing.
    let broker = srv.server.shared().broker.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_watch = stop.clone();
    let watch = tokio::spawn(async move {
        let mut max_msgs = 0;
        let mut max_bytes = 0;
        let mut samples = 0;
        while !stop_watch.load(std::sync::atomic::Ordering::Relaxed) {
            samples += 1;
            for (_, occ) in broker.occupancies() {
                max_msgs = max_msgs.max(occ.messages);
                max_bytes = max_bytes.max(occ.bytes);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (max_msgs, max_bytes, samples)
    });

    let stalled_since = Instant::now();
    let took = publish_all(&mut publ, &mut progress).await;
    assert!(took < Duration::from_secs(60), "publisher took {took:?}");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(60), fast)
            .await
            .expect("fast in time")
            .expect("fast"),
        N
    );

    let occ = srv
        .server
        .shared()
        .broker
        .occupancies()
        .into_iter()
        .map(|(_, o)| o)
        .max_by_key(|o| o.messages)
        .expect("connections");
    assert!(occ.messages <= 1000 && occ.bytes <= 65536, "{occ:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max_msgs, max_bytes, samples) = watch.await.expect("watcher");
    assert!(samples > 10, "the queue was watched while publishing");
    assert!(
        max_msgs <= 1000,
        "queue exceeded queue_capacity: {max_msgs}"
    );
    assert!(
        max_bytes <= 65536,
        "queue exceeded queue_max_bytes: {max_bytes}"
    );
    assert!(
        max_bytes > 32768,
        "the stalled queue did fill up: {max_bytes}"
    );
    let dropped = metric(
        &srv.metrics().await,
        r#"wsbroker_messages_dropped_total{reason="queue_full"}"#,
    );
    assert!(
        dropped - dropped_before > 50_000.0,
        "drops counted: {}",
        dropped - dropped_before
    );

    // Resumed, the stalled reader drains what the kernel buffers hold, then
    // gets the newest messages, in order, up to the last one published.
    let mut last = None;
    let mut seen = 0u64;
    let wait = resume_wait(stalled_since.elapsed());
    let resumed = tokio::time::timeout(wait, async {
        while last != Some(N - 1) {
            match stalled.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                    if let Some(i) = v["data"][0].as_u64() {
                        if let Some(prev) = last {
                            assert!(i > prev, "order kept across drops: {i} after {prev}");
                        }
                        last = Some(i);
                        seen += 1;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("stalled reader lost its connection: {other:?}"),
            }
        }
    })
    .await;
    assert!(
        resumed.is_ok(),
        "the newest message did not arrive within {wait:?} of resuming: \
         last {last:?} after {seen} messages; queues {:?}\n{}",
        srv.server.shared().broker.occupancies(),
        socket_report(&srv)
    );
    assert!(seen < N, "some messages were dropped, got {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_with_disconnect_is_closed_and_others_carry_on() {
    let srv = TestServer::start(&settings("disconnect")).await;
    let mut stalled = stalled_client(&srv).await;
    subscribe(&mut stalled, "bp", 1).await;
    let mut fast = srv.ws().await;
    subscribe(&mut fast, "bp", 1).await;
    let (tx, mut progress) = tokio::sync::watch::channel(0u64);
    let fast = tokio::spawn(fast_reader(fast, tx));
    let mut publ = srv.ws().await;
    let stalled_since = Instant::now();
    publish_all(&mut publ, &mut progress).await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(60), fast)
            .await
            .expect("fast in time")
            .expect("fast"),
        N
    );
    // The stalled one was cut: draining it ends in a 1008 close or the TCP close.
    let mut drained = 0u64;
    let wait = resume_wait(stalled_since.elapsed());
    let ended = tokio::time::timeout(wait, async {
        loop {
            match stalled.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => drained += 1,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await;
    let Ok(ended) = ended else {
        // The server lets go of the connection at once; what is left is the
        // kernel's: its orphaned socket still holds megabytes for the client,
        // behind retransmission backoff (see `resume_wait`). Show both sides.
        panic!(
            "stalled connection not closed within {wait:?}: {drained} frames drained; \
             connections the server still holds (id, occupancy): {:?}\n{}",
            srv.server.shared().broker.occupancies(),
            socket_report(&srv)
        );
    };
    if let Some(code) = ended {
        assert_eq!(code, 1008);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let m = srv.metrics().await;
        if metric(
            &m,
            r#"wsbroker_connections_closed_total{reason="slow_consumer"}"#,
        ) >= 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slow_consumer close not counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The others still work.
    let mut again = srv.ws().await;
    subscribe(&mut again, "after", 1).await;
    publish(&mut publ, "after", json!("ok"), 2).await;
    assert_eq!(recv(&mut again).await["data"], "ok");
}

/// A slow consumer that has stopped reading altogether is cut about one
/// CLOSE_WAIT (2 s) after its queue overflows: it can take neither the close
/// frame nor close_notify, so the server does not wait for either. The client
/// is raw TLS: it upgrades, subscribes with a hand-made frame, and never
/// reads again. (Against the release binary with a Python client the old
/// goodbye took ~6 s, three timeouts; in process it happened to end at 2 s
/// either way, so this test holds the bound rather than the difference.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_slow_consumer_is_cut_without_waiting_for_goodbyes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start(&settings("disconnect")).await;
    // Never reads again: the tiniest buffer fills at once.
    let mut stuck = small_window_tls(&srv, 4096).await;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: {ORIGIN}\r\n\r\n"
    );
    stuck.write_all(request.as_bytes()).await.expect("upgrade");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stuck.read_u8().await.expect("101"));
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let cmd = br#"{"op":"subscribe","topic":"stuck"}"#;
    let mut frame = vec![0x81, 0x80 | cmd.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(cmd);
    stuck.write_all(&frame).await.expect("subscribe");
    let broker = srv.server.shared().broker.clone();
    let deadline = Instant::now() + WAIT;
    let sub = loop {
        let found = broker
            .subscribers()
            .into_iter()
            .find(|s| s.subscriptions.load(std::sync::atomic::Ordering::Relaxed) == 1);
        if let Some(sub) = found {
            break sub;
        }
        assert!(Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut publ = srv.ws().await;
    // Publish until its queue overflows (64 KiB plus kernel buffers).
    let big = "q".repeat(8000);
    while !sub.outbox.is_closing() {
        assert!(Instant::now() < deadline, "never overflowed");
        send(
            &mut publ,
            json!({"op":"publish","topic":"stuck","data":big}),
        )
        .await;
    }
    let overflowed = Instant::now();
    // The connection has fully ended (reader and writer tasks gone) when
    // ours is the last reference to its subscriber entry.
    while std::sync::Arc::strong_count(&sub) > 1 {
        assert!(
            overflowed.elapsed() < Duration::from_millis(4000),
            "still connected {:?} after the overflow",
            overflowed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stuck);
}
