//! End-to-end tests of `wsbroker bench` (CONTRACT §8) against an in-process
//! broker: the subscriber side runs on the bench's receiver threads (hand
//! parsed frames, pongs, close 1000 at the end), so these exercise that path
//! over real TLS on 127.0.0.1.
//!
//! The broker's metrics are process-wide, so the tests of this file run one
//! at a time (`SERIAL`) and read metric deltas.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::{metric, TestCert, TestServer, ORIGIN, WAIT};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use wsbroker::bench::{BenchArgs, BenchReport};

/// One test at a time: the metric registry is shared by every server of the
/// process, and two fan-out runs on a 2-core machine would starve each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Upper bound for a whole bench run (connect + publish/hold + drain + close).
const RUN_LIMIT: Duration = Duration::from_secs(60);

const CLIENT_CLOSES: &str = r#"wsbroker_connections_closed_total{reason="client"}"#;
const IDLE_CLOSES: &str = r#"wsbroker_connections_closed_total{reason="idle_timeout"}"#;
const SHUTDOWN_CLOSES: &str = r#"wsbroker_connections_closed_total{reason="shutdown"}"#;
const DROPPED: &str = r#"wsbroker_messages_dropped_total{reason="queue_full"}"#;
const ERROR_CLOSES: &str = r#"wsbroker_connections_closed_total{reason="error"}"#;

/// `wsbroker bench` as the command line parses it (so every flag not given
/// takes its real default).
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

/// Bench arguments against the wss endpoint at `addr`, trusting `cert`.
fn args_for(addr: SocketAddr, cert: &TestCert, extra: &[&str]) -> BenchArgs {
    let url = format!("wss://127.0.0.1:{}/ws", addr.port());
    let ca = cert.cert_path.display().to_string();
    let mut argv = vec![
        "bench",
        "--url",
        url.as_str(),
        "--ca",
        ca.as_str(),
        "--origin",
        ORIGIN,
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(&argv) {
        Ok(cli) => cli.bench,
        Err(e) => panic!("bench arguments {argv:?}: {e}"),
    }
}

/// Bench arguments against `srv` (URL, trust and origin filled in) plus `extra` flags.
fn args(srv: &TestServer, extra: &[&str]) -> BenchArgs {
    args_for(srv.addr, &srv.cert, extra)
}

/// Runs the bench with an overall time limit.
async fn run(args: &BenchArgs) -> BenchReport {
    match tokio::time::timeout(RUN_LIMIT, wsbroker::bench::run(args)).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => panic!("bench failed: {e}"),
        Err(_) => panic!("bench did not finish within {RUN_LIMIT:?}"),
    }
}

/// The current value of one series of the server's metrics.
async fn sample(srv: &TestServer, series: &str) -> f64 {
    metric(&srv.metrics().await, series)
}

/// The same, read in-process (the admin listener is gone after a shutdown;
/// the registry is the process-wide one the admin endpoint renders).
fn sample_in_process(series: &str) -> f64 {
    metric(&wsbroker::metrics::render(), series)
}

/// Polls `cond` every 20 ms until it holds; panics after `limit`.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fan-out figures every lossless run must satisfy.
fn assert_lossless(r: &BenchReport) {
    assert_eq!(r.mode, "fanout", "{r:#?}");
    assert_eq!(r.connect_errors, 0, "{r:#?}");
    assert!(r.first_connect_error.is_none(), "{r:#?}");
    assert!(r.published > 0, "nothing published: {r:#?}");
    assert!(r.expected > 0, "{r:#?}");
    assert_eq!(r.delivered, r.expected, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(
        r.latency_ms.samples, r.delivered,
        "every delivery is timed: {r:#?}"
    );
    assert_eq!(r.unexpected_frames, 0, "{r:#?}");
    assert_eq!(r.subscriber_disconnects, 0, "{r:#?}");
    assert_eq!(r.publisher_disconnects, 0, "{r:#?}");
    assert_eq!(r.publish_errors, 0, "{r:#?}");
    assert!(r.first_publish_error.is_none(), "{r:#?}");
    // Latencies are real measurements: positive and ordered.
    let l = &r.latency_ms;
    assert!(l.p50 > 0.0, "{r:#?}");
    assert!(
        l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
        "{r:#?}"
    );
    assert!(l.mean > 0.0 && l.mean <= l.max, "{r:#?}");
    assert!(
        l.max < RUN_LIMIT.as_secs_f64() * 1000.0,
        "latency beyond the run itself: {r:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_run_delivers_every_message_and_times_each_one() {
    let _serial = SERIAL.lock().await;
    let srv = TestServer::start(&[]).await;
    let a = args(
        &srv,
        &[
            "--subscribers",
            "20",
            "--publishers",
            "1",
            "--rate",
            "200",
            "--payload",
            "64",
            "--duration",
            "1s",
            "--receiver-threads",
            "1",
        ],
    );
    assert_eq!(a.receiver_threads, 1);
    let r = run(&a).await;

    assert_eq!(r.subscribers, 20, "{r:#?}");
    assert_eq!(r.wildcard_subscribers, 0, "{r:#?}");
    assert_eq!(r.publishers, 1, "{r:#?}");
    assert_eq!(r.connections, 21, "{r:#?}");
    assert_eq!(r.expected, r.published * 20, "{r:#?}");
    assert_lossless(&r);
    // 200 msg/s for 1 s: the first goes out at once, none after the
    // deadline; a short stall may cost a few at the end, not a quarter.
    assert!(
        (150..=201).contains(&r.published),
        "paced at 200/s for 1s but published {}: {r:#?}",
        r.published
    );
    // Publishing time is the publishers' own (not the 50 ms progress poll),
    // so the rate comes out at what was asked, give or take a late tick.
    assert!(
        (185.0..=210.0).contains(&r.published_per_s),
        "published_per_s {}: {r:#?}",
        r.published_per_s
    );
    assert_eq!((r.rate.as_str(), r.payload, r.topics), ("200", 64, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_receiver_threads_and_topics_share_the_work() {
    let _serial = SERIAL.lock().await;
    // At --rate max the publishers outrun the subscribers' writers; queues
    // large enough for the whole run keep it lossless, and no inbound rate
    // limit turns publishes into errors.
    let srv = TestServer::start(&[
        ("WSBROKER__CONNECTION__MAX_INBOUND_RATE", "0"),
        ("WSBROKER__CONNECTION__QUEUE_CAPACITY", "10000000"),
        ("WSBROKER__CONNECTION__QUEUE_MAX_BYTES", "1073741824"),
    ])
    .await;
    let dropped_before = sample(&srv, DROPPED).await;
    let a = args(
        &srv,
        &[
            "--subscribers",
            "30",
            "--topics",
            "3",
            "--wildcard-subscribers",
            "2",
            "--publishers",
            "3",
            "--rate",
            "max",
            "--duration",
            "500ms",
            "--receiver-threads",
            "3",
        ],
    );
    assert_eq!(a.receiver_threads, 3);
    let r = run(&a).await;

    assert_eq!(r.subscribers, 30, "{r:#?}");
    assert_eq!(r.wildcard_subscribers, 2, "{r:#?}");
    assert_eq!(r.publishers, 3, "{r:#?}");
    assert_eq!(r.connections, 35, "{r:#?}");
    // Each topic has 10 subscribers, and the 2 wildcard ones get everything.
    assert_eq!(r.expected, r.published * 12, "{r:#?}");
    assert_lossless(&r);
    assert_eq!(
        sample(&srv, DROPPED).await - dropped_before,
        0.0,
        "queues overflowed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_answer_pings_and_close_cleanly() {
    let _serial = SERIAL.lock().await;
    // A connection that does not answer pings is closed after 600 ms, well
    // within the 2 s hold.
    let srv = TestServer::start(&[
        ("WSBROKER__CONNECTION__PING_INTERVAL", "200ms"),
        ("WSBROKER__CONNECTION__IDLE_TIMEOUT", "600ms"),
    ])
    .await;
    let client_before = sample(&srv, CLIENT_CLOSES).await;
    let idle_before = sample(&srv, IDLE_CLOSES).await;
    let error_before = sample(&srv, ERROR_CLOSES).await;

    let a = args(&srv, &["--connections-only", "5", "--hold", "2s"]);
    assert_eq!(a.connections_only, Some(5));
    let r = run(&a).await;

    assert_eq!(r.mode, "connections_only", "{r:#?}");
    assert_eq!(r.connections, 5, "{r:#?}");
    assert_eq!(r.subscribers, 5, "{r:#?}");
    assert_eq!(r.connect_errors, 0, "{r:#?}");
    assert_eq!(
        r.subscriber_disconnects, 0,
        "the receivers must keep idle connections alive by answering pings: {r:#?}"
    );
    assert_eq!(r.unexpected_frames, 0, "{r:#?}");
    assert!(r.duration_s >= 2.0, "{r:#?}");

    // The receivers closed every connection on their way out; the server
    // counts those as closed by the client.
    wait_until(WAIT, "the 5 client closes", || async {
        sample(&srv, CLIENT_CLOSES).await - client_before >= 5.0
    })
    .await;
    wait_until(WAIT, "the server to forget the connections", || async {
        srv.server.shared().broker.subscribers().is_empty()
    })
    .await;
    assert_eq!(sample(&srv, CLIENT_CLOSES).await - client_before, 5.0);
    assert_eq!(sample(&srv, IDLE_CLOSES).await - idle_before, 0.0);
    assert_eq!(sample(&srv, ERROR_CLOSES).await - error_before, 0.0);
    assert_eq!(srv.server.shared().broker.subscription_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_subscribers_is_counted() {
    let _serial = SERIAL.lock().await;
    let srv = TestServer::start(&[("WSBROKER__SERVER__SHUTDOWN_GRACE", "1s")]).await;
    let shutdown_before = sample(&srv, SHUTDOWN_CLOSES).await;
    let client_before = sample(&srv, CLIENT_CLOSES).await;

    let a = args(&srv, &["--connections-only", "3", "--hold", "5s"]);
    // The bench holds its connections while the server drains: every one
    // is closed (1001) by the server within its 1 s grace.
    let drain = async {
        wait_until(WAIT, "3 subscribed connections", || async {
            srv.server.shared().broker.subscription_count() == 3
        })
        .await;
        srv.server.shutdown().await;
        assert!(
            srv.server.shared().broker.subscribers().is_empty(),
            "the drain left connections open"
        );
    };
    let (r, ()) = tokio::join!(run(&a), drain);

    assert_eq!(r.mode, "connections_only", "{r:#?}");
    assert_eq!(r.connections, 3, "{r:#?}");
    assert_eq!(r.connect_errors, 0, "{r:#?}");
    assert_eq!(
        r.subscriber_disconnects, 3,
        "every connection the server closed mid-hold is counted: {r:#?}"
    );
    assert_eq!(r.unexpected_frames, 0, "{r:#?}");
    assert_eq!(sample_in_process(SHUTDOWN_CLOSES) - shutdown_before, 3.0);
    assert_eq!(sample_in_process(CLIENT_CLOSES) - client_before, 0.0);
}

// ------------------------------------------------- a scripted fake broker

/// What a scripted broker saw from one bench subscriber.
#[derive(Debug, Default)]
struct Seen {
    /// Payloads of the pongs received, in order.
    pongs: Vec<Vec<u8>>,
    /// The status code of the client's close frame (None: no close frame).
    close: Option<CloseCode>,
    /// Anything else the client sent after subscribing.
    other: Vec<String>,
}

/// Ping payloads the scripted broker sends to every subscriber after its ack.
const PINGS: [&[u8]; 2] = [b"", b"are you there? 0123456789"];
/// The ping it sends right after the upgrade, before the subscribe arrives.
const EARLY_PING: &[u8] = b"early";

/// One connection of the scripted broker: TLS, upgrade, ack the subscribe,
/// ping twice, then record everything the client sends until it is gone.
async fn scripted_session(acceptor: tokio_rustls::TlsAcceptor, tcp: tokio::net::TcpStream) -> Seen {
    let tls = acceptor.accept(tcp).await.expect("TLS accept");
    let mut ws = tokio_tungstenite::accept_async(tls)
        .await
        .expect("WebSocket upgrade");
    // Right behind the 101, in the same flight as the upgrade response: the
    // bench must neither lose it nor misread the frames after it.
    ws.send(Message::Ping(EARLY_PING.to_vec().into()))
        .await
        .expect("send early ping");
    let subscribe = match ws.next().await {
        Some(Ok(Message::Text(t))) => t.as_str().to_string(),
        other => panic!("expected a subscribe, got {other:?}"),
    };
    let v: Value = serde_json::from_str(&subscribe).expect("JSON subscribe");
    assert_eq!(v["op"], "subscribe", "{subscribe}");
    ws.send(Message::text(
        json!({"type": "ack", "id": v["id"]}).to_string(),
    ))
    .await
    .expect("send ack");
    // Anything after the last ack is the receiver thread's to handle.
    for p in PINGS {
        ws.send(Message::Ping(p.to_vec().into()))
            .await
            .expect("send ping");
    }
    let mut seen = Seen::default();
    // Reading on after the client's close sends our echo (tungstenite does
    // that) and ends with the stream.
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Pong(p)) => seen.pongs.push(p.to_vec()),
            Ok(Message::Close(frame)) => seen.close = frame.map(|f| f.code),
            Ok(other) => seen.other.push(format!("{other:?}")),
            Err(e) => {
                seen.other.push(format!("error: {e}"));
                break;
            }
        }
    }
    seen
}

/// A TLS WebSocket server on 127.0.0.1 that runs [`scripted_session`] for
/// the first `n` connections and returns what each saw.
async fn scripted_broker(
    cert: &TestCert,
    n: usize,
) -> (SocketAddr, tokio::task::JoinHandle<Vec<Seen>>) {
    let key = PrivateKeyDer::from_pem_file(&cert.key_path).expect("key PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert_der.clone()], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let mut sessions = Vec::new();
        for _ in 0..n {
            let (tcp, _) = listener.accept().await.expect("accept");
            sessions.push(tokio::spawn(scripted_session(acceptor.clone(), tcp)));
        }
        let mut seen = Vec::new();
        for s in sessions {
            seen.push(s.await.expect("session"));
        }
        seen
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_pong_with_the_ping_payload_and_close_with_1000() {
    let _serial = SERIAL.lock().await;
    // The broker counts a close frame and a bare EOF alike (reason
    // "client"), so the wire is checked against a scripted server.
    let cert = common::make_cert();
    let (addr, broker) = scripted_broker(&cert, 3).await;
    let a = args_for(
        addr,
        &cert,
        &[
            "--connections-only",
            "3",
            "--hold",
            "1s",
            "--receiver-threads",
            "2",
        ],
    );
    let r = run(&a).await;
    assert_eq!(r.connections, 3, "{r:#?}");
    assert_eq!(r.connect_errors, 0, "{r:#?}");
    assert_eq!(r.subscriber_disconnects, 0, "{r:#?}");

    let seen = tokio::time::timeout(WAIT, broker)
        .await
        .expect("every session ended")
        .expect("scripted broker");
    assert_eq!(seen.len(), 3);
    for s in &seen {
        let want: Vec<Vec<u8>> = std::iter::once(EARLY_PING)
            .chain(PINGS)
            .map(|p| p.to_vec())
            .collect();
        assert_eq!(s.pongs, want, "each ping answered with its payload: {s:?}");
        assert_eq!(s.close, Some(CloseCode::Normal), "{s:?}");
        assert!(s.other.is_empty(), "{s:?}");
    }
}

/// `--reconnect` (issue 15): every connection is opened with a full
/// handshake, closed, and reopened with its own saved session; the server
/// counts exactly those resumptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_resumes_every_connection() {
    let _serial = SERIAL.lock().await;
    let srv = TestServer::start(&[]).await;
    let resumed_before = sample(&srv, "wsbroker_tls_resumed_total").await;
    let a = args(
        &srv,
        &[
            "--connections-only",
            "40",
            "--reconnect",
            "--connect-concurrency",
            "8",
        ],
    );
    let r = run(&a).await;
    assert_eq!(r.mode, "reconnect");
    assert_eq!(r.connect_errors, 0, "{:?}", r.first_connect_error);
    let storms = r.reconnect.as_ref().expect("reconnect figures");
    assert_eq!(storms.full.connections, 40);
    assert_eq!(storms.full.resumed, 0, "first handshakes are full");
    assert_eq!(storms.resumed.connections, 40);
    assert_eq!(storms.resumed.resumed, 40, "each reconnect resumed");
    assert!(storms.full.per_s > 0.0 && storms.resumed.per_s > 0.0);
    assert_eq!(
        sample(&srv, "wsbroker_tls_resumed_total").await - resumed_before,
        40.0
    );
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(json["reconnect"]["resumed"]["resumed"], json!(40));
}
