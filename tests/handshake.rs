//! End-to-end handshake tests (CONTRACT §3): path, upgrade validity, Origin.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Error as WsError;

fn status_of(r: Result<Ws, WsError>) -> (u16, String) {
    match r {
        Ok(_) => (101, String::new()),
        Err(WsError::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn wrong_path_is_404() {
    let srv = TestServer::start(&[]).await;
    let (status, body) = status_of(srv.try_ws("/nope", Some(ORIGIN)).await);
    assert_eq!(status, 404);
    assert!(body.contains("/ws"), "{body}");
    let (status, _) = status_of(srv.try_ws("/ws?x=1", Some(ORIGIN)).await);
    assert_eq!(status, 101, "a query string does not change the path");
    // The absolute form of the request target names the same path.
    let upgrade = format!("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n\r\n");
    // (Only the head: after a 101 the connection stays open.)
    let mut tls = srv.tls().await;
    tls.write_all(
        format!("GET https://localhost/ws?x=1 HTTP/1.1\r\nHost: localhost\r\n{upgrade}").as_bytes(),
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tls.read_u8().await.expect("response head"));
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let resp = srv
        .raw_http(&format!(
            "GET https://localhost/other HTTP/1.1\r\nHost: localhost\r\n{upgrade}"
        ))
        .await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let resp = srv
        .raw_http(&format!(
            "GET https://localhost HTTP/1.1\r\nHost: localhost\r\n{upgrade}"
        ))
        .await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
}

#[tokio::test]
async fn non_upgrade_requests_are_refused_with_a_reason() {
    let srv = TestServer::start(&[]).await;
    let resp = srv
        .raw_http("GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    // RFC 9110: a 426 names the protocol to switch to; one Connection header.
    let head = resp.split("\r\n\r\n").next().unwrap_or("").to_lowercase();
    assert!(head.contains("\r\nupgrade: websocket"), "{resp}");
    assert_eq!(head.matches("\r\nconnection:").count(), 1, "{resp}");
    assert!(head.contains("\r\nconnection: upgrade, close"), "{resp}");
    let resp = srv
        .raw_http("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://app.example.com\r\n\r\n")
        .await;
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    assert!(resp.contains("Sec-WebSocket-Version: 13"), "{resp}");
    let resp = srv
        .raw_http("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example.com\r\n\r\n")
        .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("Sec-WebSocket-Key"), "{resp}");
    let resp = srv.raw_http("this is not http\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let huge = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let resp = srv.raw_http(&huge).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    let m = srv.metrics().await;
    assert!(
        metric(
            &m,
            r#"wsbroker_handshake_rejected_total{reason="bad_request"}"#
        ) >= 5.0
    );
}

#[tokio::test]
async fn smuggling_shapes_are_refused() {
    let srv = TestServer::start(&[]).await;
    let base = "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example.com\r\n";
    let dup = format!("{base}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
    let resp = srv.raw_http(&dup).await;
    assert!(
        resp.starts_with("HTTP/1.1 400") && resp.contains("duplicate"),
        "{resp}"
    );
    let te = format!(
        "{base}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let resp = srv.raw_http(&te).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

async fn origin_status(srv: &TestServer, origin: Option<&str>) -> (u16, String) {
    status_of(srv.try_ws("/ws", origin).await)
}

#[tokio::test]
async fn origin_rules_allow_and_deny() {
    let allow =
        "https://app.example.com,https://*.example.org,http://localhost:*,https://plain.test,null";
    let srv = TestServer::start(&[("WSBROKER__ORIGINS__ALLOW", allow)]).await;
    let cases: &[(&str, u16)] = &[
        ("https://app.example.com", 101),
        ("https://APP.Example.COM", 101),
        ("https://app.example.com:443", 101),
        ("http://app.example.com", 403),
        ("https://app.example.com:8443", 403),
        ("https://evil.com", 403),
        ("https://a.example.org", 101),
        ("https://a.b.example.org", 101),
        ("https://example.org", 403),
        ("https://example.org.evil.net", 403),
        ("https://a.example.org.evil.net", 403),
        ("https://badexample.org", 403),
        ("http://localhost:3000", 101),
        ("http://localhost", 101),
        ("http://localhost.evil.net:3000", 403),
        ("https://plain.test", 101),
        ("https://plain.test:443", 101),
        ("https://plain.test:444", 403),
        ("null", 101),
        ("https://app.example.com/path", 403),
    ];
    for (origin, want) in cases {
        let (status, body) = origin_status(&srv, Some(origin)).await;
        assert_eq!(status, *want, "origin {origin}: {body}");
        if status == 403 {
            assert!(
                body.to_lowercase().contains("origin"),
                "403 body says why: {body}"
            );
        }
    }
    let m = srv.metrics().await;
    assert!(metric(&m, r#"wsbroker_handshake_rejected_total{reason="origin"}"#) >= 10.0);
}

#[tokio::test]
async fn null_origin_is_denied_unless_listed() {
    let srv = TestServer::start(&[]).await;
    let (status, _) = origin_status(&srv, Some("null")).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn missing_origin_denied_by_default() {
    let srv = TestServer::start(&[]).await;
    let (status, body) = origin_status(&srv, None).await;
    assert_eq!(status, 403);
    assert!(body.contains("missing Origin"), "{body}");
}

#[tokio::test]
async fn missing_origin_allowed_when_configured() {
    let srv = TestServer::start(&[("WSBROKER__ORIGINS__ALLOW_MISSING", "true")]).await;
    let (status, body) = origin_status(&srv, None).await;
    assert_eq!(status, 101, "{body}");
    let (status, _) = origin_status(&srv, Some("https://evil.com")).await;
    assert_eq!(status, 403, "allow_missing does not allow wrong origins");
}

#[tokio::test]
async fn listens_on_ipv4_and_ipv6_at_once() {
    let srv = TestServer::start(&[("WSBROKER__SERVER__LISTEN", "127.0.0.1:0,[::1]:0")]).await;
    let addrs = srv.server.local_addrs().to_vec();
    assert_eq!(addrs.len(), 2);
    assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{addrs:?}");
    // Subscribe over IPv6, publish over IPv4: one broker behind both.
    let tcp = tokio::net::TcpStream::connect(addrs[1])
        .await
        .expect("v6 connect");
    let tls = tokio_rustls::TlsConnector::from(srv.tls.clone())
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("tls over v6");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("wss://localhost:{}/ws", addrs[1].port()),
    )
    .expect("request");
    req.headers_mut()
        .insert("Origin", ORIGIN.parse().expect("origin"));
    let (mut v6, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade v6");
    subscribe(&mut v6, "dual", 1).await;
    let mut v4 = srv.ws().await;
    publish(&mut v4, "dual", serde_json::json!("both"), 1).await;
    assert_eq!(recv(&mut v6).await["data"], "both");
    v6.close(None).await.expect("close");
}

/// The 101's head for a raw upgrade request carrying `extra` header lines.
async fn upgrade_head(srv: &TestServer, extra: &str) -> String {
    let mut tls = srv.tls().await;
    let req = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n{extra}\r\n");
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tls.read_u8().await.expect("response head"));
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn wsbroker_v1_is_selected_whenever_offered_and_a_token_is_never_echoed() {
    let srv = TestServer::start(&[]).await;
    let head = upgrade_head(
        &srv,
        "Sec-WebSocket-Protocol: wsbroker.v1, wsbroker.bearer.eyJhbGciOiJIUzI1NiJ9.e30.c2ln\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("\r\nSec-WebSocket-Protocol: wsbroker.v1\r\n"),
        "{head}"
    );
    assert!(!head.contains("bearer"), "token echoed: {head}");
    // Offered in a second header line, after another protocol.
    let head = upgrade_head(
        &srv,
        "Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: wsbroker.v1\r\n",
    )
    .await;
    assert!(
        head.contains("\r\nSec-WebSocket-Protocol: wsbroker.v1\r\n"),
        "{head}"
    );
    // Not offered (or offered in another case): nothing selected.
    for extra in [
        "",
        "Sec-WebSocket-Protocol: chat\r\n",
        "Sec-WebSocket-Protocol: WSBROKER.V1\r\n",
    ] {
        let head = upgrade_head(&srv, extra).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
            "{extra:?}: {head}"
        );
    }
}

#[tokio::test]
async fn an_auth_op_is_acked_unchecked_when_auth_is_off() {
    let srv = TestServer::start(&[]).await;
    let mut ws = srv.ws().await;
    send(
        &mut ws,
        serde_json::json!({"op":"auth","token":"not-a-jwt","id":"a1"}),
    )
    .await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack, serde_json::json!({"type":"ack","id":"a1"}));
    send(&mut ws, serde_json::json!({"op":"auth","id":2})).await;
    let err = recv(&mut ws).await;
    assert_eq!(err["code"], "bad_request", "{err}");
    assert_eq!(err["id"], 2, "{err}");
    subscribe(&mut ws, "a.b", 3).await;
}
