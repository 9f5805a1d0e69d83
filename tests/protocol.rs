//! End-to-end protocol tests (CONTRACT §4, §5) over real TLS and sockets.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn round_trip_subscribe_publish_message() {
    let srv = TestServer::start(&[]).await;
    let mut sub = srv.ws().await;
    let mut publ = srv.ws().await;
    subscribe(&mut sub, "chat.room1", 1).await;
    publish(&mut publ, "chat.room1", json!({"any":"json value"}), 2).await;
    // data is forwarded byte-for-byte, whitespace and key order included.
    publ.send(Message::Text(
        r#"{"op":"publish","topic":"chat.room1","data":{"z":1,"a":[1,2]}}"#.into(),
    ))
    .await
    .expect("send");
    assert_eq!(
        recv(&mut sub).await,
        json!({"type":"message","topic":"chat.room1","data":{"any":"json value"}})
    );
    assert_eq!(
        recv_text(&mut sub).await,
        r#"{"type":"message","topic":"chat.room1","data":{"z":1,"a":[1,2]}}"#
    );
    publ.send(Message::Text(
        r#"{"op":"publish","topic":"chat.room1","data": { "b" : 2 , "a":1 } }"#.into(),
    ))
    .await
    .expect("send");
    assert_eq!(
        recv_text(&mut sub).await,
        r#"{"type":"message","topic":"chat.room1","data":{ "b" : 2 , "a":1 }}"#
    );
}

#[tokio::test]
async fn every_json_type_is_carried() {
    let srv = TestServer::start(&[]).await;
    let mut ws = srv.ws().await;
    subscribe(&mut ws, "t", 1).await;
    for data in [
        json!(null),
        json!(true),
        json!(1.5e300),
        json!("s\u{1F600}"),
        json!([]),
        json!({"k":{}}),
    ] {
        send(&mut ws, json!({"op":"publish","topic":"t","data":data})).await;
        let m = recv(&mut ws).await;
        assert_eq!(m["data"], data, "a publisher receives its own message");
    }
}

#[tokio::test]
async fn wildcards_star_and_gt() {
    let srv = TestServer::start(&[]).await;
    let mut star = srv.ws().await;
    let mut gt = srv.ws().await;
    let mut publ = srv.ws().await;
    subscribe(&mut star, "chat.*", 1).await;
    subscribe(&mut gt, "chat.>", 1).await;
    publish(&mut publ, "chat.a", json!(1), 1).await;
    publish(&mut publ, "chat.a.b", json!(2), 2).await;
    publish(&mut publ, "chat", json!(3), 3).await;
    publish(&mut publ, "other.a", json!(4), 4).await;
    publish(&mut publ, "chat.end", json!(5), 5).await;
    assert_eq!(recv(&mut star).await["data"], 1);
    assert_eq!(recv(&mut star).await["data"], 5);
    assert_eq!(recv(&mut gt).await["data"], 1);
    assert_eq!(recv(&mut gt).await["data"], 2);
    assert_eq!(recv(&mut gt).await["data"], 5);
    expect_silence(&mut star, Duration::from_millis(200)).await;
    expect_silence(&mut gt, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn overlapping_patterns_deliver_once() {
    let srv = TestServer::start(&[]).await;
    let mut sub = srv.ws().await;
    let mut publ = srv.ws().await;
    for (i, p) in ["a.b.c", "a.*.c", "a.>", ">", "*.b.*"].iter().enumerate() {
        subscribe(&mut sub, p, i as u64).await;
    }
    publish(&mut publ, "a.b.c", json!("once"), 9).await;
    publish(&mut publ, "z", json!("marker"), 10).await;
    assert_eq!(recv(&mut sub).await["data"], "once");
    assert_eq!(recv(&mut sub).await["data"], "marker");
    expect_silence(&mut sub, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let srv = TestServer::start(&[]).await;
    let mut sub = srv.ws().await;
    let mut publ = srv.ws().await;
    subscribe(&mut sub, "news", 1).await;
    subscribe(&mut sub, "marker", 2).await;
    publish(&mut publ, "news", json!(1), 1).await;
    assert_eq!(recv(&mut sub).await["data"], 1);
    send(
        &mut sub,
        json!({"op":"unsubscribe","topic":"news","id":"u"}),
    )
    .await;
    assert_eq!(recv(&mut sub).await, json!({"type":"ack","id":"u"}));
    publish(&mut publ, "news", json!(2), 2).await;
    publish(&mut publ, "marker", json!("m"), 3).await;
    assert_eq!(
        recv(&mut sub).await["data"],
        "m",
        "nothing from news after unsubscribe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_publisher_order_over_10000_messages() {
    // Room for the whole burst, so ordering is tested without drops.
    let srv = TestServer::start(&[
        ("WSBROKER__CONNECTION__QUEUE_CAPACITY", "20000"),
        ("WSBROKER__CONNECTION__QUEUE_MAX_BYTES", "10000000"),
        ("WSBROKER__CONNECTION__MAX_INBOUND_RATE", "0"),
    ])
    .await;
    let mut sub = srv.ws().await;
    let mut publ = srv.ws().await;
    subscribe(&mut sub, "seq", 1).await;
    let n = 10_000u64;
    let writer = tokio::spawn(async move {
        for i in 0..n {
            publ.feed(Message::Text(
                json!({"op":"publish","topic":"seq","data":i})
                    .to_string()
                    .into(),
            ))
            .await
            .expect("feed");
        }
        publ.flush().await.expect("flush");
        publ
    });
    for i in 0..n {
        assert_eq!(recv(&mut sub).await["data"], i);
    }
    drop(writer.await.expect("publisher"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_subscribers_all_receive() {
    let srv = TestServer::start(&[]).await;
    let mut subs = Vec::new();
    for _ in 0..200 {
        let mut ws = srv.ws().await;
        subscribe(&mut ws, "fan.out", 1).await;
        subs.push(ws);
    }
    let mut publ = srv.ws().await;
    for i in 0..5 {
        publish(&mut publ, "fan.out", json!(i), i).await;
    }
    for ws in subs.iter_mut() {
        for i in 0..5 {
            assert_eq!(recv(ws).await["data"], i);
        }
    }
}

async fn expect_error(ws: &mut Ws, frame: Message, id: Option<serde_json::Value>, code: &str) {
    ws.send(frame).await.expect("send");
    let e = recv(ws).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], code, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    match id {
        Some(id) => assert_eq!(e["id"], id, "{e}"),
        None => assert!(e.get("id").is_none(), "{e}"),
    }
}

#[tokio::test]
async fn bad_frames_get_an_error_and_the_connection_keeps_working() {
    let srv = TestServer::start(&[]).await;
    let mut ws = srv.ws().await;
    let text = |s: &str| Message::Text(s.to_string().into());
    expect_error(&mut ws, text("{not json"), None, "bad_request").await;
    expect_error(
        &mut ws,
        text(r#"{"op":"dance","topic":"a","id":1}"#),
        Some(json!(1)),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(r#"{"op":"subscribe","topic":"a..b","id":"x"}"#),
        Some(json!("x")),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(r#"{"op":"subscribe","topic":"has space","id":2}"#),
        Some(json!(2)),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(r#"{"op":"publish","topic":"a.*","data":1,"id":3}"#),
        Some(json!(3)),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(r#"{"op":"publish","topic":"a.>","data":1,"id":4}"#),
        Some(json!(4)),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(r#"{"op":"publish","topic":"a","id":5}"#),
        Some(json!(5)),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(&format!(
            r#"{{"op":"subscribe","topic":"{}","id":6}}"#,
            "a".repeat(257)
        )),
        Some(json!(6)),
        "bad_request",
    )
    .await;
    // Well-formed JSON with a mistyped field still gets its id back.
    expect_error(
        &mut ws,
        text(r#"{"op":"subscribe","topic":5,"id":27}"#),
        Some(json!(27)),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(r#"{"id":"first","op":5,"topic":"a"}"#),
        Some(json!("first")),
        "bad_request",
    )
    .await;
    expect_error(&mut ws, text("[1,2]"), None, "bad_request").await;
    expect_error(
        &mut ws,
        Message::Binary(vec![1u8, 2, 3].into()),
        None,
        "bad_request",
    )
    .await;
    // Still fully usable.
    subscribe(&mut ws, "still.ok", 7).await;
    send(
        &mut ws,
        json!({"op":"publish","topic":"still.ok","data":"yes","id":8}),
    )
    .await;
    // The ack comes before the publisher's own copy of the message.
    assert_eq!(recv(&mut ws).await, json!({"type":"ack","id":8}));
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["data"], "yes");
}

#[tokio::test]
async fn subscription_limit_gives_limit_error() {
    let srv = TestServer::start(&[("WSBROKER__CONNECTION__MAX_SUBSCRIPTIONS", "3")]).await;
    let mut ws = srv.ws().await;
    for i in 0..3 {
        subscribe(&mut ws, &format!("t{i}"), i).await;
    }
    expect_error(
        &mut ws,
        Message::Text(r#"{"op":"subscribe","topic":"t9","id":9}"#.into()),
        Some(json!(9)),
        "limit",
    )
    .await;
    // Re-subscribing to a held topic is not a new subscription.
    subscribe(&mut ws, "t1", 10).await;
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let srv = TestServer::start(&[]).await;
    let mut ws = srv.ws().await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.expect("send");
    let close = expect_close(&mut ws).await.expect("close frame");
    assert_eq!(close.code, CloseCode::Invalid);
    assert_eq!(u16::from(close.code), 1007);
}

#[tokio::test]
async fn oversized_message_closes_1009() {
    let srv = TestServer::start(&[("WSBROKER__SERVER__MAX_MESSAGE_SIZE", "1024")]).await;
    let mut ws = srv.ws().await;
    let big = format!(
        r#"{{"op":"publish","topic":"a","data":"{}"}}"#,
        "x".repeat(2000)
    );
    ws.send(Message::Text(big.into())).await.expect("send");
    let close = expect_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1009);
}

#[tokio::test]
async fn fragmented_message_over_the_limit_closes_1009() {
    let srv = TestServer::start(&[("WSBROKER__SERVER__MAX_MESSAGE_SIZE", "1024")]).await;
    let mut ws = srv.ws().await;
    let part = vec![b'x'; 600];
    ws.send(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .expect("first fragment");
    ws.send(Message::Frame(Frame::message(
        part,
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .expect("second fragment");
    let close = expect_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1009);
}

#[tokio::test]
async fn client_close_is_echoed() {
    let srv = TestServer::start(&[]).await;
    let mut ws = srv.ws().await;
    ws.close(None).await.expect("close");
    // The echo completes the handshake and the stream ends cleanly.
    let rest = tokio::time::timeout(WAIT, async {
        let mut frames = Vec::new();
        while let Some(f) = ws.next().await {
            frames.push(f);
        }
        frames
    })
    .await
    .expect("closed in time");
    assert!(
        rest.iter().all(|f| matches!(f, Ok(Message::Close(_)))),
        "{rest:?}"
    );
}

#[tokio::test]
async fn plain_http_to_the_tls_port_does_not_disturb_a_subscriber() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start(&[]).await;
    let mut sub = srv.ws().await;
    let mut publ = srv.ws().await;
    subscribe(&mut sub, "live", 1).await;
    for _ in 0..5 {
        let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.expect("tcp");
        tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await;
        let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.expect("tcp");
        let _ = tcp
            .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7])
            .await;
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await;
    }
    publish(&mut publ, "live", json!("still here"), 1).await;
    assert_eq!(recv(&mut sub).await["data"], "still here");
    let m = srv.metrics().await;
    assert!(metric(&m, r#"wsbroker_handshake_rejected_total{reason="tls"}"#) >= 10.0);
}
