//! The admin listener (CONTRACT §6): `/healthz`, `/readyz`, `/metrics` and
//! the bearer-token `POST /publish`, against an in-process server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "t0ken-for-tests";

/// Metrics are process-global: tests whose publishes succeed take turns, so
/// the one that counts sees only its own.
static PUBLISHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A parsed admin response.
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn request(srv: &TestServer, method: &str, path: &str, headers: &[&str], body: &str) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let raw = admin_request(srv.admin(), &req).await;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {raw:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    Resp {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

async fn publish(srv: &TestServer, auth: Option<&str>, body: &str) -> Resp {
    let auth = auth.map(|a| format!("Authorization: {a}"));
    let mut headers = vec!["Content-Type: application/json"];
    if let Some(a) = &auth {
        headers.push(a);
    }
    request(srv, "POST", "/publish", &headers, body).await
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn with_token() -> TestServer {
    TestServer::start(&[
        ("WSBROKER__ADMIN__PUBLISH_TOKEN", TOKEN),
        ("WSBROKER__SERVER__MAX_MESSAGE_SIZE", "1024"),
    ])
    .await
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let srv = TestServer::start(&[]).await;
    let r = request(&srv, "GET", "/healthz", &[], "").await;
    assert_eq!(r.status, 200);
    let r = request(&srv, "GET", "/readyz", &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    let r = request(&srv, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain; version=0.0.4"),
        "{}",
        r.head
    );
    assert!(
        r.body.contains("# TYPE wsbroker_connections_active gauge"),
        "{}",
        r.body
    );
    let r = request(&srv, "GET", "/nope", &[], "").await;
    assert_eq!(r.status, 404);
    let r = request(&srv, "POST", "/healthz", &[], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    srv.server.shutdown().await;
}

#[tokio::test]
async fn publish_delivers_and_counts_connections() {
    let _turn = PUBLISHING.lock().await;
    let srv = with_token().await;
    let before = srv.metrics().await;
    let published = |m: &str| metric(m, r#"wsbroker_messages_published_total{source="http"}"#);

    let mut a = srv.ws().await;
    subscribe(&mut a, "a.b", 1).await;
    let mut b = srv.ws().await;
    subscribe(&mut b, "a.*", 1).await;
    // Two matching patterns on one connection: one delivery.
    let mut c = srv.ws().await;
    subscribe(&mut c, "a.b", 1).await;
    subscribe(&mut c, "a.>", 2).await;
    let mut d = srv.ws().await;
    subscribe(&mut d, "x.y", 1).await;

    let r = publish(
        &srv,
        Some(&bearer()),
        r#"{"topic":"a.b","data":{ "k" : [1, 2] }}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, r#"{"delivered":3}"#);
    for ws in [&mut a, &mut b, &mut c] {
        // data is delivered byte for byte.
        assert_eq!(
            recv_text(ws).await,
            r#"{"type":"message","topic":"a.b","data":{ "k" : [1, 2] }}"#
        );
    }

    // The scheme is case-insensitive; null is a value like any other.
    let r = publish(
        &srv,
        Some(&format!("bearer {TOKEN}")),
        r#"{"topic":"a.b","data":null}"#,
    )
    .await;
    assert_eq!((r.status, r.json()), (200, json!({"delivered":3})));
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(
            recv(ws).await,
            json!({"type":"message","topic":"a.b","data":null})
        );
    }
    // Nothing else reached c (the next frame is the marker) nor d.
    let r = publish(
        &srv,
        Some(&bearer()),
        r#"{"topic":"a.c.d","data":"marker"}"#,
    )
    .await;
    assert_eq!((r.status, r.json()), (200, json!({"delivered":1})));
    assert_eq!(
        recv(&mut c).await,
        json!({"type":"message","topic":"a.c.d","data":"marker"})
    );
    let r = publish(&srv, Some(&bearer()), r#"{"topic":"x.y","data":1}"#).await;
    assert_eq!((r.status, r.json()), (200, json!({"delivered":1})));
    assert_eq!(
        recv(&mut d).await,
        json!({"type":"message","topic":"x.y","data":1})
    );
    let r = publish(&srv, Some(&bearer()), r#"{"topic":"no.one","data":1}"#).await;
    assert_eq!((r.status, r.json()), (200, json!({"delivered":0})));

    // Refused publishes are not counted; the five above are.
    let refused = [
        publish(&srv, None, r#"{"topic":"a.b","data":1}"#)
            .await
            .status,
        publish(&srv, Some("Bearer wrong"), r#"{"topic":"a.b","data":1}"#)
            .await
            .status,
        publish(&srv, Some("{}"), "{").await.status,
        publish(&srv, Some(&bearer()), "{").await.status,
    ];
    assert_eq!(refused, [401, 401, 401, 400]);
    let after = srv.metrics().await;
    assert_eq!(published(&after) - published(&before), 5.0);
    drop((a, b, c, d));
    srv.server.shutdown().await;
}

#[tokio::test]
async fn publish_refusals_say_why() {
    let _turn = PUBLISHING.lock().await;
    let srv = with_token().await;
    let good = r#"{"topic":"a.b","data":1}"#;

    for auth in [
        None,
        Some("Bearer wrong".to_string()),
        Some(format!("Basic {TOKEN}")),
        Some(format!("Bearer {TOKEN}x")),
        Some("Bearer".to_string()),
    ] {
        let r = publish(&srv, auth.as_deref(), good).await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{auth:?}");
        assert!(r.json()["error"].is_string(), "{}", r.body);
    }

    let bad_bodies = [
        ("{", "malformed JSON"),
        (r#"{"topic":"a.b"}"#, "missing data"),
        (r#"{"data":1}"#, "missing topic"),
        (r#"{"topic":"a.b","data":}"#, "bad data"),
        (r#"["a.b",1]"#, "not an object"),
        (r#"{"topic":"a.*","data":1}"#, "wildcard *"),
        (r#"{"topic":"a.>","data":1}"#, "wildcard >"),
        (r#"{"topic":"","data":1}"#, "empty topic"),
        (r#"{"topic":"a..b","data":1}"#, "empty token"),
    ];
    for (body, what) in bad_bodies {
        let r = publish(&srv, Some(&bearer()), body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        let reason = r.json()["error"].as_str().unwrap_or("").to_string();
        assert!(!reason.is_empty(), "{what}: no reason in {}", r.body);
    }
    let r = publish(&srv, Some(&bearer()), r#"{"topic":"a.*","data":1}"#).await;
    assert!(
        r.body.contains("wildcard") || r.body.contains('*'),
        "{}",
        r.body
    );

    // Larger than server.max_message_size (1024 here).
    let big = format!(r#"{{"topic":"a.b","data":"{}"}}"#, "x".repeat(1100));
    let r = publish(&srv, Some(&bearer()), &big).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("1024"), "{}", r.body);
    assert!(r.body.contains("max_message_size"), "{}", r.body);
    // Right at the limit is fine.
    let pad = 1024 - r#"{"topic":"a.b","data":""}"#.len();
    let exact = format!(r#"{{"topic":"a.b","data":"{}"}}"#, "x".repeat(pad));
    assert_eq!(exact.len(), 1024);
    let r = publish(&srv, Some(&bearer()), &exact).await;
    assert_eq!((r.status, r.json()), (200, json!({"delivered":0})));

    let r = request(
        &srv,
        "GET",
        "/publish",
        &[&format!("Authorization: {}", bearer())],
        "",
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = request(&srv, "PUT", "/publish", &[], "").await;
    assert_eq!(r.status, 405);
    let r = request(&srv, "POST", "/publish/x", &[], "").await;
    assert_eq!(r.status, 404);
    srv.server.shutdown().await;
}

#[tokio::test]
async fn publish_is_404_without_a_token() {
    let srv = TestServer::start(&[]).await;
    for auth in [
        None,
        Some("Bearer ".to_string()),
        Some("Bearer anything".to_string()),
    ] {
        let r = publish(&srv, auth.as_deref(), r#"{"topic":"a.b","data":1}"#).await;
        assert_eq!(r.status, 404, "{auth:?}: {}", r.body);
        assert!(r.body.contains("publish_token"), "{}", r.body);
    }
    srv.server.shutdown().await;
}

/// Reads until EOF or error; true when the server ended the connection in time.
async fn closed_by_server(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn stalled_admin_clients_cannot_stall_anything() {
    let turn = PUBLISHING.lock().await;
    let srv = with_token().await;
    // A client that sends half a request and stops.
    let mut stalled = TcpStream::connect(srv.admin()).await.expect("connect");
    stalled
        .write_all(b"POST /publish HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // Another that promises a body and never sends it.
    let mut no_body = TcpStream::connect(srv.admin()).await.expect("connect");
    no_body
        .write_all(
            format!(
                "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    // Meanwhile everything else works.
    let mut ws = srv.ws().await;
    subscribe(&mut ws, "t", 1).await;
    let r = publish(&srv, Some(&bearer()), r#"{"topic":"t","data":1}"#).await;
    assert_eq!((r.status, r.json()), (200, json!({"delivered":1})));
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"message","topic":"t","data":1})
    );
    assert_eq!(request(&srv, "GET", "/healthz", &[], "").await.status, 200);
    drop(turn);
    drop(ws);
    // The half request is cut by the header timeout (5 s).
    assert!(closed_by_server(&mut stalled, Duration::from_secs(10)).await);
    srv.server.shutdown().await;
    drop(no_body);
}

#[tokio::test]
async fn admin_connections_are_capped() {
    let srv = TestServer::start(&[]).await;
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(TcpStream::connect(srv.admin()).await.expect("connect"));
    }
    // The 65th is closed without an answer (the accept loop is FIFO, so the
    // 64 above hold every permit by the time it is accepted).
    let mut extra = TcpStream::connect(srv.admin()).await.expect("connect");
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, extra.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    // Once they go, the listener serves again.
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        let raw = admin_request(
            srv.admin(),
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if raw.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "admin listener did not recover: {raw:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.server.shutdown().await;
}
