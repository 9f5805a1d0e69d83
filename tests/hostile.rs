//! Hostile-input suite (issue 7): every attack is made against an in-process
//! daemon over real TLS. For each one the offending connection gets the error
//! or close code of the contract, the daemon stays up, and a well-behaved
//! subscriber on the same daemon receives every message of a numbered
//! sequence published between the attacks, in order (`Watch`).
//!
//! Raw WebSocket frames are written by hand (`encode`) after a hand-made
//! upgrade over tokio-rustls, so the attacks are not filtered by a client
//! library; the server's frames are parsed with `decode`.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------
// Raw WebSocket client: hand-made upgrade, frame encoder and decoder.
// ---------------------------------------------------------------------------

/// The RFC 6455 sample key and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;
const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Fixed masking key: deterministic frames.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn push_len(out: &mut Vec<u8>, len: u64, mask_bit: u8) {
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= 0xffff {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// One frame; `first` is FIN | RSV | opcode. Client frames are masked unless `masked` is false.
fn encode(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    if masked {
        push_len(&mut out, payload.len() as u64, 0x80);
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        push_len(&mut out, payload.len() as u64, 0);
        out.extend_from_slice(payload);
    }
    out
}

/// A masked frame header announcing `len` payload bytes, without the payload.
fn header_only(first: u8, len: u64) -> Vec<u8> {
    let mut out = vec![first];
    push_len(&mut out, len, 0x80);
    out.extend_from_slice(&MASK);
    out
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// A frame from the server.
#[derive(Debug)]
struct Frame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: Vec<u8>,
}

/// Parses one server frame from the front of `buf`: the frame and its length.
fn decode(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
    let (len, at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    let frame = Frame {
        fin: buf[0] & FIN != 0,
        rsv: buf[0] & 0x70,
        opcode: buf[0] & 0x0f,
        payload: buf[at..at + len].to_vec(),
    };
    Some((frame, at + len))
}

/// A valid upgrade request with `extra` header lines (each ending in CRLF).
fn upgrade_request(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nOrigin: {ORIGIN}\r\n{extra}\r\n"
    )
}

/// Reads a response head; returns it and whatever followed it.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            return (head, buf[end + 4..].to_vec());
        }
        let n = tokio::time::timeout_at(deadline, io.read(&mut chunk))
            .await
            .expect("timed out reading the response head")
            .unwrap_or(0);
        if n == 0 {
            return (String::from_utf8_lossy(&buf).into_owned(), Vec::new());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A WebSocket connection driven frame by frame.
struct Raw {
    io: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Raw {
    async fn open(srv: &TestServer) -> Raw {
        Raw::upgrade(srv.tls().await).await
    }

    async fn upgrade(mut io: TlsStream<TcpStream>) -> Raw {
        // Always flush: tokio-rustls may accept plaintext into its buffer
        // without writing it (e.g. when the task's coop budget is spent).
        io.write_all(upgrade_request("").as_bytes())
            .await
            .expect("write upgrade");
        io.flush().await.expect("flush upgrade");
        let (head, rest) = read_head(&mut io).await;
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        assert!(
            head.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}")),
            "{head}"
        );
        Raw { io, buf: rest }
    }

    /// Writes bytes; false if the server already closed.
    async fn write(&mut self, bytes: &[u8]) -> bool {
        self.io.write_all(bytes).await.is_ok() && self.io.flush().await.is_ok()
    }

    /// The next frame, None at end of stream.
    async fn next(&mut self) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some((frame, used)) = decode(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout_at(deadline, self.io.read(&mut chunk))
                .await
                .expect("timed out waiting for a frame")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Next text frame (skipping pings and pongs) as a string.
    async fn text(&mut self) -> String {
        loop {
            match self.next().await {
                Some(f) if f.opcode == TEXT => {
                    assert!(f.fin && f.rsv == 0, "{f:?}");
                    return String::from_utf8(f.payload).expect("UTF-8 text frame");
                }
                Some(f) if f.opcode == PING || f.opcode == PONG => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame; returns its code (1005 when empty).
    async fn expect_close(&mut self) -> u16 {
        loop {
            match self.next().await {
                Some(f) if f.opcode == CLOSE => {
                    assert!(f.fin, "close frames are not fragmented");
                    return match f.payload.as_slice() {
                        [] => 1005,
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        other => panic!("malformed close payload {other:?}"),
                    };
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// After the close: the server ends the stream (nothing but control frames first).
    async fn expect_end(&mut self) {
        loop {
            match self.next().await {
                None => return,
                Some(f) if f.opcode == PING || f.opcode == PONG => continue,
                Some(f) => panic!("frame after close: {f:?}"),
            }
        }
    }

    /// Sends `attack`, expects close `code`, then the end of the stream.
    async fn expect_closed_with(&mut self, code: u16, what: &str) {
        let got = self.expect_close().await;
        assert_eq!(got, code, "{what}: close code");
        // Answer the close as a polite client would; the server may be gone.
        let _ = self
            .write(&encode(FIN | CLOSE, &close_payload(code, b""), true))
            .await;
        self.expect_end().await;
    }
}

/// Opens a raw connection, writes `bytes` and checks the close code.
async fn attack(srv: &TestServer, bytes: &[u8], code: u16, what: &str) {
    let mut raw = Raw::open(srv).await;
    raw.write(bytes).await;
    raw.expect_closed_with(code, what).await;
}

// ---------------------------------------------------------------------------
// The well-behaved bystanders.
// ---------------------------------------------------------------------------

/// A good subscriber on `good.seq` and a publisher of a numbered sequence.
struct Watch {
    sub: Ws,
    publ: Ws,
    next: u64,
}

impl Watch {
    async fn new(srv: &TestServer) -> Watch {
        Watch::with(srv.ws().await, srv.ws().await).await
    }

    async fn with(mut sub: Ws, publ: Ws) -> Watch {
        subscribe(&mut sub, "good.seq", 1).await;
        Watch { sub, publ, next: 0 }
    }

    /// Publishes the next number of the sequence (the daemon must still ack).
    async fn tick(&mut self) {
        let n = self.next;
        self.next += 1;
        publish(&mut self.publ, "good.seq", json!(n), 1_000_000 + n).await;
    }

    /// The good subscriber got every number, in order, and nothing else.
    async fn finish(mut self) {
        self.tick().await;
        for n in 0..self.next {
            let got = recv(&mut self.sub).await;
            assert_eq!(
                got,
                json!({"type":"message","topic":"good.seq","data":n}),
                "the good subscriber must get message {n} of {}",
                self.next
            );
        }
        expect_silence(&mut self.sub, Duration::from_millis(100)).await;
    }
}

/// Sends a text frame and returns the parsed reply.
async fn ask(ws: &mut Ws, text: &str) -> Value {
    ws.send(Message::Text(text.to_string().into()))
        .await
        .expect("send");
    recv(ws).await
}

fn assert_bad_request(reply: &Value, what: &str) {
    assert_eq!(reply["type"], "error", "{what}: {reply}");
    assert_eq!(reply["code"], "bad_request", "{what}: {reply}");
    assert!(reply["message"].is_string(), "{what}: {reply}");
}

fn short(s: &str) -> String {
    s.chars().take(100).collect()
}

async fn rejected(srv: &TestServer, reason: &str) -> f64 {
    metric(
        &srv.metrics().await,
        &format!("wsbroker_handshake_rejected_total{{reason=\"{reason}\"}}"),
    )
}

/// Polls `cond` until true or `WAIT` passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connections the server holds (including handshakes in progress).
fn held(srv: &TestServer) -> usize {
    srv.server.shared().limiter.current()
}

/// TLS from a chosen loopback source address (127.0.0.x), to test per-address limits.
async fn tls_from(srv: &TestServer, ip: Ipv4Addr) -> std::io::Result<TlsStream<TcpStream>> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    let tcp = sock.connect(srv.addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(srv.tls.clone())
        .connect(name, tcp)
        .await
}

async fn ws_from(srv: &TestServer, ip: Ipv4Addr) -> Ws {
    let mut req = format!("wss://localhost:{}/ws", srv.addr.port())
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", ORIGIN.parse().expect("header"));
    let tls = tls_from(srv, ip).await.expect("tls");
    tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade")
        .0
}

fn nested(open: &str, inner: &str, close: &str, depth: usize) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hostile_json_is_a_bad_request_and_hurts_nobody() {
    let srv = TestServer::start(&[]).await;
    let mut w = Watch::new(&srv).await;
    let mut bad = srv.ws().await;

    let valid = r#"{"op":"publish","topic":"chat.room1","data":{"a":[1,2,{"b":"c"}]},"id":7}"#;
    let mut cases: Vec<String> = [
        // malformed
        "",
        " ",
        "{",
        "}",
        "{}",
        "null",
        "true",
        "42",
        r#""publish""#,
        "[]",
        r#"[{"op":"subscribe","topic":"a"}]"#,
        r#"{'op':'subscribe','topic':'a'}"#,
        r#"{op:"subscribe",topic:"a"}"#,
        r#"{"op":"subscribe","topic":"a",}"#,
        r#"{"op":"subscribe","topic":"a"} trailing"#,
        r#"{"op":"subscribe","topic":"a"}{"op":"subscribe","topic":"b"}"#,
        r#"{"op":"subscribe" "topic":"a"}"#,
        r#"{"op":"publish","topic":"a","data":}"#,
        r#"{"op":"publish","topic":"a","data":NaN}"#,
        r#"{"op":"publish","topic":"a","data":Infinity}"#,
        r#"{"op":"publish","topic":"a","data":-Infinity}"#,
        r#"{"op":"publish","topic":"a","data":undefined}"#,
        r#"{"op":"publish","topic":"a","data":01}"#,
        r#"{"op":"publish","topic":"a","data":1.}"#,
        r#"{"op":"publish","topic":"a","data":.5}"#,
        r#"{"op":"publish","topic":"a","data":-}"#,
        r#"{"op":"publish","topic":"a","data":0x10}"#,
        r#"{"op":"publish","topic":"a","data":"\x41"}"#,
        r#"{"op":"publish","topic":"a","data":"\uZZZZ"}"#,
        "{\"op\":\"publish\",\"topic\":\"a\",\"data\":\"raw\u{1}control\"}",
        "{\"op\":\"publish\",\"topic\":\"a\",\"data\":\"raw\nnewline\"}",
        r#"{"op":"publish","topic":"a","data":1 /* comment */}"#,
        r#"{"op":"publish","topic":"a","data":tru}"#,
        // wrong types
        r#"{"op":1,"topic":"a"}"#,
        r#"{"op":null,"topic":"a"}"#,
        r#"{"op":["subscribe"],"topic":"a"}"#,
        r#"{"op":{"subscribe":true},"topic":"a"}"#,
        r#"{"op":"subscribe","topic":5}"#,
        r#"{"op":"subscribe","topic":null}"#,
        r#"{"op":"subscribe","topic":true}"#,
        r#"{"op":"subscribe","topic":["a"]}"#,
        r#"{"op":"subscribe","topic":{"a":1}}"#,
        r#"{"op":"subscribe","topic":"a","id":{}}"#,
        r#"{"op":"subscribe","topic":"a","id":[]}"#,
        r#"{"op":"subscribe","topic":"a","id":true}"#,
        r#"{"op":"subscribe","topic":"a","data":1}"#,
        r#"{"op":"publish","topic":"a"}"#,
        r#"{"op":"publish","data":1}"#,
        r#"{"topic":"a"}"#,
        r#"{"op":"PUBLISH","topic":"a","data":1}"#,
        r#"{"op":"subscribe ","topic":"a"}"#,
        r#"{"op":"","topic":"a"}"#,
        // duplicate keys
        r#"{"op":"subscribe","op":"publish","topic":"a","data":1}"#,
        r#"{"op":"subscribe","topic":"a","topic":"b"}"#,
        r#"{"op":"publish","topic":"a","data":1,"data":2}"#,
        r#"{"op":"subscribe","topic":"a","id":1,"id":2}"#,
        // bad topics
        r#"{"op":"subscribe","topic":""}"#,
        r#"{"op":"subscribe","topic":"a..b"}"#,
        r#"{"op":"subscribe","topic":".a"}"#,
        r#"{"op":"subscribe","topic":"a.>.b"}"#,
        r#"{"op":"subscribe","topic":"a b"}"#,
        r#"{"op":"subscribe","topic":"é"}"#,
        r#"{"op":"subscribe","topic":"a\u0000b"}"#,
        r#"{"op":"subscribe","topic":"a\"b"}"#,
        r#"{"op":"publish","topic":"a.*","data":1}"#,
        r#"{"op":"publish","topic":"a.>","data":1}"#,
        // UTF-8 edge cases
        "\u{FEFF}{\"op\":\"subscribe\",\"topic\":\"a\"}",
        r#"{"op":"subscribe","topic":"\ud800"}"#,
        r#"{"op":"subscribe","topic":"\udc00"}"#,
        r#"{"op":"subscribe","topic":"a\ud83d"}"#,
        "{\"op\":\"sub\u{0073}cribe\u{200B}\",\"topic\":\"a\"}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Too long a topic.
    cases.push(format!(
        r#"{{"op":"subscribe","topic":"{}"}}"#,
        "a".repeat(257)
    ));
    // Every truncation of a valid command.
    for cut in 1..valid.len() {
        cases.push(valid[..cut].to_string());
    }
    // 10,000-deep nesting, in every position (serde_json skips `data` and
    // unknown fields without its recursion limit, so the parser must bound it).
    let deep_arr = nested("[", "1", "]", 10_000);
    let deep_obj = nested(r#"{"a":"#, "1", "}", 10_000);
    cases.push(deep_arr.clone());
    cases.push(deep_obj.clone());
    cases.push(format!(
        r#"{{"op":"publish","topic":"a","data":{deep_arr},"id":"deep"}}"#
    ));
    cases.push(format!(
        r#"{{"op":"publish","topic":"a","data":{deep_obj},"id":"deep"}}"#
    ));
    cases.push(format!(
        r#"{{"op":"subscribe","topic":"a","id":{deep_arr}}}"#
    ));
    cases.push(format!(r#"{{"op":{deep_arr},"topic":"a"}}"#));

    for (i, case) in cases.iter().enumerate() {
        let reply = ask(&mut bad, case).await;
        assert_bad_request(&reply, &format!("case {i} `{}`", short(case)));
        if i % 4 == 0 {
            w.tick().await;
        }
    }

    // Deep nesting in an unknown field is skipped (iteratively, no stack
    // risk) and never forwarded: the command is accepted.
    let reply = ask(
        &mut bad,
        &format!(r#"{{"op":"publish","topic":"a","data":1,"x":{deep_obj},"id":"deep"}}"#),
    )
    .await;
    assert_eq!(reply, json!({"type":"ack","id":"deep"}));
    // A known id is echoed with the error.
    let reply = ask(&mut bad, r#"{"op":"dance","topic":"a","id":"x1"}"#).await;
    assert_bad_request(&reply, "unknown op");
    assert_eq!(reply["id"], "x1");
    // `id: null` is neither a string nor a number.
    let reply = ask(&mut bad, r#"{"op":"subscribe","topic":"z","id":null}"#).await;
    assert_bad_request(&reply, "null id");
    // An unknown extra field is tolerated.
    let reply = ask(
        &mut bad,
        r#"{"op":"subscribe","topic":"y","id":3,"extra":[1]}"#,
    )
    .await;
    assert_eq!(reply, json!({"type":"ack","id":3}));
    // After all that the attacker's connection still works.
    subscribe(&mut bad, "x.y", 99).await;
    w.finish().await;
}

/// `data` of every JSON type, huge numbers, odd Unicode and sizes at the limit
/// are delivered byte-for-byte; one byte over the limit is close 1009.
#[tokio::test]
async fn data_is_delivered_verbatim_up_to_the_size_limit() {
    const MAX: usize = 1024 * 1024;
    let max = MAX.to_string();
    // The outbound queue must hold one message of the maximum size (plus its
    // envelope); with queue_max_bytes = max_message_size the largest messages
    // are silently dropped (see the report).
    let queue = (MAX + 64 * 1024).to_string();
    let srv = TestServer::start(&[
        ("WSBROKER__SERVER__MAX_MESSAGE_SIZE", max.as_str()),
        ("WSBROKER__CONNECTION__QUEUE_MAX_BYTES", queue.as_str()),
    ])
    .await;
    let mut w = Watch::new(&srv).await;
    let mut sub = srv.ws().await;
    subscribe(&mut sub, "data.t", 1).await;
    let mut publ = srv.ws().await;

    let datas: Vec<String> = [
        "null",
        "true",
        "false",
        "0",
        "-0",
        "-0.0",
        "1.5e-300",
        "4.9e-324",
        "1e400",
        "-1E+999999",
        "123456789012345678901234567890123456789012345678901234567890",
        "-99999999999999999999999999999999999999.99999999999999999999",
        r#""""#,
        r#""plain""#,
        r#""\u00e9\ud83d\ude00\n\t\"\\\/""#,
        "\"é😀 raw UTF-8, \u{FEFF}BOM inside, \u{10FFFF} max\"",
        r#""\u0000 nul escape""#,
        "[]",
        "{}",
        r#"[1,"a",null,true,{"b":[]}]"#,
        r#"{ "spaced" : [ 1 , 2 ] ,"k":{ } }"#,
        r#"{"dup":1,"dup":2}"#,
        "{\"\u{FEFF}\":\"BOM key\"}",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        nested("[", "0", "]", 100),
        nested(r#"{"a":"#, "0", "}", 100),
    ])
    .collect();
    for (i, data) in datas.iter().enumerate() {
        let cmd = format!(r#"{{"op":"publish","topic":"data.t","data":{data},"id":{i}}}"#);
        publ.send(Message::Text(cmd.into())).await.expect("send");
        let ack = recv_text(&mut publ).await;
        assert_eq!(ack, format!(r#"{{"type":"ack","id":{i}}}"#), "data {data}");
        let got = recv_text(&mut sub).await;
        assert_eq!(
            got,
            format!(r#"{{"type":"message","topic":"data.t","data":{data}}}"#),
            "data must arrive byte-for-byte"
        );
        w.tick().await;
    }
    // Unpaired surrogate escapes are valid JSON grammar but not Unicode;
    // strict parsers (serde_json's Value) refuse them. The broker either
    // passes them through verbatim or answers bad_request; both are safe.
    for (i, data) in [
        r#""\ud800 lone""#,
        r#""\udfff\ud800 reversed""#,
        r#""x\ude00""#,
    ]
    .iter()
    .enumerate()
    {
        let id = 100 + i;
        let cmd = format!(r#"{{"op":"publish","topic":"data.t","data":{data},"id":{id}}}"#);
        publ.send(Message::Text(cmd.into())).await.expect("send");
        let reply: Value = serde_json::from_str(&recv_text(&mut publ).await).expect("json");
        if reply["type"] == "ack" {
            assert_eq!(
                recv_text(&mut sub).await,
                format!(r#"{{"type":"message","topic":"data.t","data":{data}}}"#)
            );
        } else {
            assert_bad_request(&reply, data);
            assert_eq!(reply["id"], id);
        }
        w.tick().await;
    }
    // Leading/trailing whitespace around the value is not part of it.
    publ.send(Message::Text(
        r#"{"op":"publish","topic":"data.t","data":   [ 1 ]   }"#.into(),
    ))
    .await
    .expect("send");
    assert_eq!(
        recv_text(&mut sub).await,
        r#"{"type":"message","topic":"data.t","data":[ 1 ]}"#
    );

    // A frame of exactly max_message_size bytes is accepted and delivered.
    let frame_of = |len: usize| {
        let head = r#"{"op":"publish","topic":"data.t","data":""#;
        let tail = r#""}"#;
        let fill = len - head.len() - tail.len();
        format!("{head}{}{tail}", "x".repeat(fill))
    };
    let exact = frame_of(MAX);
    assert_eq!(exact.len(), MAX);
    publ.send(Message::Text(exact.clone().into()))
        .await
        .expect("send");
    publish(&mut publ, "data.t", json!("after the big one"), 900).await;
    let got = recv_text(&mut sub).await;
    assert_eq!(
        got.len(),
        MAX + 2,
        "the max-size message must be delivered first (got {})",
        short(&got)
    );
    assert_eq!(
        recv(&mut sub).await,
        json!({"type":"message","topic":"data.t","data":"after the big one"})
    );
    w.tick().await;

    // One byte more: close 1009, and only for that connection.
    let over = frame_of(MAX + 1);
    let _ = publ.send(Message::Text(over.into())).await;
    let close = expect_close(&mut publ).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    w.tick().await;
    publish(&mut w.publ, "data.t", json!("still flowing"), 901).await;
    assert_eq!(
        recv(&mut sub).await,
        json!({"type":"message","topic":"data.t","data":"still flowing"})
    );
    w.finish().await;
}

// ---------------------------------------------------------------------------
// WebSocket framing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn websocket_protocol_violations_get_the_contract_close_codes() {
    let srv = TestServer::start(&[]).await;
    let mut w = Watch::new(&srv).await;
    let sub_cmd = br#"{"op":"subscribe","topic":"a"}"#;
    let mut tried = 0;

    // Sanity: the raw client speaks correct WebSocket.
    let mut raw = Raw::open(&srv).await;
    raw.write(&encode(
        FIN | TEXT,
        br#"{"op":"subscribe","topic":"a","id":1}"#,
        true,
    ))
    .await;
    assert_eq!(raw.text().await, r#"{"type":"ack","id":1}"#);
    raw.write(&encode(FIN | CLOSE, &close_payload(1000, b"bye"), true))
        .await;
    raw.expect_closed_with(1000, "normal close").await;
    w.tick().await;

    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        // Size limits (max_message_size = 65536).
        (
            [header_only(FIN | TEXT, 65_537), vec![b'x'; 16]].concat(),
            1009,
            "frame header announcing max+1 bytes",
        ),
        (
            [header_only(FIN | BINARY, 1 << 40), vec![0; 16]].concat(),
            1009,
            "frame header announcing 1 TiB",
        ),
        (
            [
                encode(TEXT, &[b'a'; 40_000], true),
                encode(FIN | CONT, &[b'a'; 40_000], true),
            ]
            .concat(),
            1009,
            "two fragments totalling 80,000 bytes",
        ),
        (
            (0..100)
                .map(|i| encode(if i == 0 { TEXT } else { CONT }, &[b' '; 1000], true))
                .collect::<Vec<_>>()
                .concat(),
            1009,
            "100 fragments of 1000 bytes, never finished",
        ),
        // UTF-8.
        (
            encode(FIN | TEXT, &[0xff, 0xfe], true),
            1007,
            "invalid UTF-8",
        ),
        (
            encode(FIN | TEXT, &[0xc0, 0xaf], true),
            1007,
            "overlong UTF-8",
        ),
        (
            encode(FIN | TEXT, &[b'"', 0xed, 0xa0, 0x80, b'"'], true),
            1007,
            "UTF-8-encoded surrogate",
        ),
        (
            [
                encode(TEXT, b"{\"op\":\"\xe2", true),
                encode(FIN | CONT, b"\x28\xa1\"}", true),
            ]
            .concat(),
            1007,
            "invalid UTF-8 split across fragments",
        ),
        // Framing rules.
        (
            encode(FIN | TEXT, sub_cmd, false),
            1002,
            "unmasked client frame",
        ),
        (encode(FIN | RSV1 | TEXT, sub_cmd, true), 1002, "RSV1 set"),
        (encode(FIN | RSV2 | TEXT, sub_cmd, true), 1002, "RSV2 set"),
        (encode(FIN | RSV3 | TEXT, sub_cmd, true), 1002, "RSV3 set"),
        (
            encode(FIN | 0x3, sub_cmd, true),
            1002,
            "reserved data opcode 0x3",
        ),
        (
            encode(FIN | 0x7, sub_cmd, true),
            1002,
            "reserved data opcode 0x7",
        ),
        (
            encode(FIN | 0xB, b"", true),
            1002,
            "reserved control opcode 0xB",
        ),
        (
            encode(FIN | 0xF, b"", true),
            1002,
            "reserved control opcode 0xF",
        ),
        (
            encode(FIN | PING, &[0; 126], true),
            1002,
            "ping of 126 bytes",
        ),
        (
            [header_only(FIN | PING, 70_000), vec![0; 16]].concat(),
            1009,
            "ping announcing 70,000 bytes (over the frame limit: the size check comes first)",
        ),
        (encode(PING, b"frag", true), 1002, "fragmented ping"),
        (
            encode(CLOSE, &close_payload(1000, b""), true),
            1002,
            "fragmented close",
        ),
        (
            encode(FIN | CONT, b"x", true),
            1002,
            "continuation without a start",
        ),
        (
            [encode(TEXT, b"{", true), encode(FIN | TEXT, b"{}", true)].concat(),
            1002,
            "new message inside a fragmented one",
        ),
        // Close frames.
        (
            encode(FIN | CLOSE, &close_payload(999, b""), true),
            1002,
            "close code 999",
        ),
        (
            encode(FIN | CLOSE, &close_payload(1005, b""), true),
            1002,
            "close code 1005",
        ),
        (
            encode(FIN | CLOSE, &close_payload(1006, b""), true),
            1002,
            "close code 1006",
        ),
        (
            encode(FIN | CLOSE, &close_payload(1015, b""), true),
            1002,
            "close code 1015",
        ),
        (
            encode(FIN | CLOSE, &close_payload(5000, b""), true),
            1002,
            "close code 5000",
        ),
        (
            encode(FIN | CLOSE, &[0x03], true),
            1002,
            "close payload of 1 byte",
        ),
        (
            encode(FIN | CLOSE, &close_payload(1000, &[0xff]), true),
            1007,
            "close reason not UTF-8",
        ),
    ];
    for (bytes, code, what) in &cases {
        attack(&srv, bytes, *code, what).await;
        w.tick().await;
        tried += 1;
    }

    // Valid but unusual close codes are echoed.
    for code in [1001u16, 3000, 4999] {
        attack(
            &srv,
            &encode(FIN | CLOSE, &close_payload(code, b"x"), true),
            code,
            "valid code",
        )
        .await;
    }

    // Data after close is ignored: a publish to the good topic must not arrive.
    let mut raw = Raw::open(&srv).await;
    let intruder = br#"{"op":"publish","topic":"good.seq","data":"after close"}"#;
    raw.write(
        &[
            encode(FIN | CLOSE, &close_payload(1000, b""), true),
            encode(FIN | TEXT, intruder, true),
            encode(FIN | PING, b"p", true),
        ]
        .concat(),
    )
    .await;
    assert_eq!(raw.expect_close().await, 1000, "close echoed");
    raw.expect_end().await;
    w.tick().await;

    // Binary frame: error bad_request, connection stays open.
    let mut raw = Raw::open(&srv).await;
    raw.write(&encode(FIN | BINARY, &[1, 2, 3], true)).await;
    let reply: Value = serde_json::from_str(&raw.text().await).expect("json");
    assert_bad_request(&reply, "binary frame");
    // Unsolicited pong and an empty text frame.
    raw.write(&encode(FIN | PONG, b"unsolicited", true)).await;
    raw.write(&encode(FIN | TEXT, b"", true)).await;
    let reply: Value = serde_json::from_str(&raw.text().await).expect("json");
    assert_bad_request(&reply, "empty text frame");
    // A valid fragmented command with an interleaved ping works.
    raw.write(
        &[
            encode(TEXT, br#"{"op":"subscribe","#, true),
            encode(FIN | PING, b"mid", true),
            encode(FIN | CONT, br#""topic":"f.g","id":5}"#, true),
        ]
        .concat(),
    )
    .await;
    let mut saw_pong = false;
    let ack = loop {
        let f = raw.next().await.expect("frame");
        match f.opcode {
            PONG => {
                assert_eq!(f.payload, b"mid");
                saw_pong = true;
            }
            TEXT => break String::from_utf8(f.payload).expect("utf8"),
            other => panic!("unexpected opcode {other}"),
        }
    };
    assert_eq!(ack, r#"{"type":"ack","id":5}"#);
    // The pong may be written after the ack; wait for it briefly.
    if !saw_pong {
        let f = raw.next().await.expect("pong");
        assert_eq!((f.opcode, f.payload.as_slice()), (PONG, b"mid".as_slice()));
    }
    w.tick().await;

    // Ping flood within the burst: answered, connection usable.
    let pings: Vec<u8> = (0..1500)
        .flat_map(|i: u32| encode(FIN | PING, &i.to_be_bytes(), true))
        .collect();
    raw.write(&pings).await;
    raw.write(&encode(
        FIN | TEXT,
        br#"{"op":"subscribe","topic":"h","id":6}"#,
        true,
    ))
    .await;
    let mut pongs = 0;
    loop {
        let f = raw.next().await.expect("frame");
        match f.opcode {
            PONG => pongs += 1,
            TEXT => {
                assert_eq!(f.payload, br#"{"type":"ack","id":6}"#);
                break;
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
    assert!(
        pongs >= 1,
        "pings are answered (tungstenite may coalesce pongs)"
    );
    w.tick().await;

    // A sustained ping flood (10x the rate): rate-limited, close 1008.
    let flood: Vec<u8> = (0..10_000u32)
        .flat_map(|i| encode(FIN | PING, &i.to_be_bytes(), true))
        .collect();
    raw.write(&flood).await;
    raw.expect_closed_with(1008, "sustained ping flood").await;
    w.tick().await;

    assert!(tried > 25);
    eventually("attack connections released", || held(&srv) == 2).await;
    w.finish().await;
}

/// Requests sent just before a client's Close are answered before the echo
/// of the Close, and nothing follows the echo (RFC 6455 §5.5.1; browsers
/// report 1006 when data follows a Close). Requests and Close go in one
/// write, the case where the echo used to overtake the acks.
#[tokio::test]
async fn replies_precede_the_close_echo_and_nothing_follows_it() {
    let srv = TestServer::start(&[]).await;
    for round in 0..10 {
        let mut raw = Raw::open(&srv).await;
        let sub = r#"{"op":"subscribe","topic":"bye.t","id":"s"}"#;
        assert!(raw.write(&encode(FIN | TEXT, sub.as_bytes(), true)).await);
        let ack: Value = serde_json::from_str(&raw.text().await).expect("json");
        assert_eq!(ack, json!({"type":"ack","id":"s"}));
        let mut burst = Vec::new();
        for id in 0..3 {
            let publish = json!({"op":"publish","topic":"bye.t","data":id,"id":id}).to_string();
            burst.extend(encode(FIN | TEXT, publish.as_bytes(), true));
        }
        burst.extend(encode(FIN | CLOSE, &close_payload(1000, b"bye"), true));
        assert!(raw.write(&burst).await);
        let mut acks = Vec::new();
        let code = loop {
            match raw.next().await {
                Some(f) if f.opcode == TEXT => {
                    let v: Value = serde_json::from_slice(&f.payload).expect("json");
                    match v["type"].as_str() {
                        Some("ack") => acks.push(v["id"].clone()),
                        // Its own messages may go out before the close or
                        // be abandoned by it; either is fine.
                        Some("message") => {}
                        _ => panic!("round {round}: unexpected {v}"),
                    }
                }
                Some(f) if f.opcode == CLOSE => {
                    break u16::from_be_bytes([f.payload[0], f.payload[1]]);
                }
                Some(f) if f.opcode == PONG || f.opcode == PING => {}
                other => panic!("round {round}: expected the close echo, got {other:?}"),
            }
        };
        assert_eq!(
            code, 1000,
            "round {round}: the echo carries the client's code"
        );
        assert_eq!(
            acks,
            vec![json!(0), json!(1), json!(2)],
            "round {round}: every ack, before the echo"
        );
        // The echo is the last frame: then the end of the stream.
        assert!(
            raw.next().await.is_none(),
            "round {round}: a frame after the close echo"
        );
    }
}

// ---------------------------------------------------------------------------
// HTTP and TLS
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hostile_upgrade_requests_are_refused_with_a_status() {
    let srv = TestServer::start(&[]).await;
    let mut w = Watch::new(&srv).await;
    let before = rejected(&srv, "bad_request").await;
    let base = "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example.com\r\n";
    let key = format!("Sec-WebSocket-Key: {KEY}\r\n");

    // Exactly 8 KiB of head that never ends: read completely, then 431.
    let mut big = format!("{base}{key}X-Big: ");
    big.push_str(&"a".repeat(8192 - big.len()));
    assert_eq!(big.len(), 8192);
    let many: String = (0..70).map(|i| format!("x{i}: v\r\n")).collect();
    let cases: Vec<(String, &str, &str)> = vec![
        (big, "HTTP/1.1 431", "oversized head"),
        (
            format!("{base}{key}{many}\r\n"),
            "HTTP/1.1 431",
            "70 headers",
        ),
        (
            format!("{base}{key}{key}\r\n"),
            "HTTP/1.1 400",
            "duplicate Sec-WebSocket-Key",
        ),
        (
            format!("{base}{key}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            "HTTP/1.1 400",
            "Transfer-Encoding",
        ),
        (
            format!("{base}{key}Content-Length: 5\r\n\r\nhello"),
            "HTTP/1.1 400",
            "request body",
        ),
        (
            format!("{base}{key}Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "HTTP/1.1 400",
            "Content-Length + Transfer-Encoding",
        ),
        (
            format!("{base}{key}Host: evil.example\r\n\r\n"),
            "HTTP/1.1 400",
            "two Host headers",
        ),
        (
            base.replace("Version: 13", "Version: 8") + &key + "\r\n",
            "HTTP/1.1 426",
            "Sec-WebSocket-Version 8",
        ),
        (
            base.replace("Version: 13", "Version: 13, 8") + &key + "\r\n",
            "HTTP/1.1 426",
            "Sec-WebSocket-Version list",
        ),
        (
            format!("{base}Sec-WebSocket-Key: short\r\n\r\n"),
            "HTTP/1.1 400",
            "bad key",
        ),
        (
            base.replace("GET", "POST") + &key + "\r\n",
            "HTTP/1.1 400",
            "POST",
        ),
        (
            base.replace("HTTP/1.1", "HTTP/1.0") + &key + "\r\n",
            "HTTP/1.1 400",
            "HTTP/1.0",
        ),
        (
            format!("{base}{key}X-Folded: a\r\n b\r\n\r\n"),
            "HTTP/1.1 400",
            "obsolete line folding",
        ),
        (
            format!("{base}{key}X-Nul: a\0b\r\n\r\n"),
            "HTTP/1.1 400",
            "NUL in a header",
        ),
        (
            "GET /ws HTTP/1.1\nHost: localhost\n\n".to_string(),
            "HTTP/1.1 4",
            "bare LF line ends",
        ),
    ];
    for (req, want, what) in &cases {
        let resp = srv.raw_http(req).await;
        assert!(resp.starts_with(want), "{what}: got {}", short(&resp));
        if *want == "HTTP/1.1 426" {
            assert!(resp.contains("Sec-WebSocket-Version: 13"), "{what}: {resp}");
        }
        w.tick().await;
    }
    let after = rejected(&srv, "bad_request").await;
    assert!(
        after - before >= (cases.len() - 1) as f64,
        "{before} -> {after}"
    );
    eventually("refused connections released", || held(&srv) == 2).await;
    w.finish().await;
}

/// A deterministic byte soup (xorshift).
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Writes `bytes` on a plain TCP connection and reads until the server closes.
async fn tcp_poke(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    if !bytes.is_empty() {
        tcp.write_all(bytes).await.expect("write");
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .expect("server must close the connection")
            .unwrap_or(0);
        if n == 0 {
            return (out, start.elapsed());
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Accepts any server certificate (for odd SNI values).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A WebSocket session over an already established TLS stream; checks it works.
async fn ws_works_over(tls: TlsStream<TcpStream>, port: u16, topic: &str) {
    let mut req = format!("wss://localhost:{port}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", ORIGIN.parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade");
    subscribe(&mut ws, topic, 1).await;
    publish(&mut ws, "other.topic", json!(1), 2).await;
    let _ = ws.close(None).await;
}

#[tokio::test]
async fn tls_port_garbage_sni_and_stalled_handshakes() {
    let srv = TestServer::start(&[("WSBROKER__SERVER__HANDSHAKE_TIMEOUT", "1s")]).await;
    let mut w = Watch::new(&srv).await;
    let tls_before = rejected(&srv, "tls").await;

    // Plain HTTP and random bytes on the TLS port: closed, counted `tls`.
    let pokes: Vec<(Vec<u8>, &str)> = vec![
        (
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".to_vec(),
            "plain HTTP",
        ),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), "HTTP/2 preface"),
        (noise(1000, 0x9e37_79b9_7f4a_7c15), "random bytes"),
        ([0x16, 0x03, 0x01, 0xff, 0xff].to_vec(), "TLS record of 65535 bytes announced"),
        ([0x16, 0x03, 0x01, 0x00, 0x00].to_vec(), "empty TLS handshake record"),
        ([0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5].to_vec(), "application data before the handshake"),
        (
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28].to_vec(),
            "fatal alert before the handshake",
        ),
    ];
    for (bytes, what) in &pokes {
        let (resp, took) = tcp_poke(srv.addr, bytes).await;
        assert!(
            !resp.starts_with(b"HTTP/"),
            "{what}: answered in plain HTTP"
        );
        // Either an alert record or nothing; never anything else.
        assert!(resp.is_empty() || resp[0] == 0x15, "{what}: {resp:?}");
        assert!(
            took < Duration::from_millis(900),
            "{what}: closed at once, not by the timeout ({took:?})"
        );
        w.tick().await;
    }
    let tls_after = rejected(&srv, "tls").await;
    assert!(
        tls_after - tls_before >= pokes.len() as f64,
        "tls rejections {tls_before} -> {tls_after}"
    );

    // No SNI: connect by IP address (rustls sends no SNI for an IP).
    let tcp = TcpStream::connect(srv.addr).await.expect("tcp");
    let ip = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let tls = tokio_rustls::TlsConnector::from(srv.tls.clone())
        .connect(ip, tcp)
        .await
        .expect("TLS without SNI");
    ws_works_over(tls, srv.addr.port(), "nosni.t").await;
    w.tick().await;

    // Odd but valid SNI values: the single certificate is served anyway.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut any = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    any.alpn_protocols = vec![b"http/1.1".to_vec()];
    let any = Arc::new(any);
    let long_label = format!("{}.example", "a".repeat(63));
    for sni in [
        "other.invalid",
        "xn--nxasmq6b.example",
        "x",
        long_label.as_str(),
        "LOCALHOST",
    ] {
        let tcp = TcpStream::connect(srv.addr).await.expect("tcp");
        let name = ServerName::try_from(sni.to_string()).expect("sni");
        let tls = tokio_rustls::TlsConnector::from(any.clone())
            .connect(name, tcp)
            .await
            .unwrap_or_else(|e| panic!("SNI {sni}: {e}"));
        ws_works_over(tls, srv.addr.port(), "sni.t").await;
    }
    w.tick().await;

    // Stalled handshakes are cut at handshake_timeout (1 s), counted `timeout`.
    let timeouts_before = rejected(&srv, "timeout").await;
    let (resp, took) = tcp_poke(srv.addr, b"").await;
    assert!(resp.is_empty(), "{resp:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "silent TCP client cut after {took:?}"
    );
    // Half a ClientHello, then silence.
    let (_, took) = tcp_poke(srv.addr, &[0x16, 0x03, 0x01, 0x00, 0x40, 0x01]).await;
    assert!(
        took >= Duration::from_millis(900),
        "partial ClientHello cut after {took:?}"
    );
    // Only blank lines (allowed before a request line, RFC 9112 §2.2), then silence.
    let start = Instant::now();
    let resp = srv.raw_http("\r\n\r\n\r\n").await;
    assert!(resp.is_empty(), "{resp}");
    assert!(start.elapsed() >= Duration::from_millis(900));
    // TLS done, no HTTP request.
    let start = Instant::now();
    let mut tls = srv.tls().await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut sink))
        .await
        .expect("server closes a TLS connection that never sends a request");
    assert!(start.elapsed() >= Duration::from_millis(900));
    // Slowloris: one byte of the request every 150 ms.
    let start = Instant::now();
    let mut tls = srv.tls().await;
    let req = upgrade_request("");
    let mut cut = false;
    for b in req.as_bytes() {
        if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if !cut {
        let mut rest = Vec::new();
        let n = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest))
            .await
            .expect("slowloris must be cut");
        assert!(
            n.is_err() || rest.is_empty(),
            "no 101 for a slowloris: {rest:?}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    let timeouts_after = rejected(&srv, "timeout").await;
    assert!(
        timeouts_after - timeouts_before >= 4.0,
        "timeouts {timeouts_before} -> {timeouts_after}"
    );
    w.tick().await;
    eventually("stalled connections released", || held(&srv) == 2).await;
    w.finish().await;
}

// ---------------------------------------------------------------------------
// Abuse
// ---------------------------------------------------------------------------

#[tokio::test]
async fn publish_flood_gets_limit_errors_then_close_1008() {
    let srv = TestServer::start(&[("WSBROKER__CONNECTION__MAX_INBOUND_RATE", "50")]).await;
    let mut w = Watch::new(&srv).await;
    let mut flood_sub = srv.ws().await;
    subscribe(&mut flood_sub, "flood.t", 1).await;

    // Short burst over the bucket (burst = 100): errors, but the connection stays.
    let mut burst = srv.ws().await;
    for i in 0..120u64 {
        burst
            .feed(Message::Text(
                json!({"op":"publish","topic":"flood.t","data":i,"id":i})
                    .to_string()
                    .into(),
            ))
            .await
            .expect("feed");
    }
    burst.flush().await.expect("flush");
    let (mut acks, mut limits) = (0, 0);
    while acks + limits < 120 {
        let reply = recv(&mut burst).await;
        // Every request is answered in order, a refused one with its own id.
        assert_eq!(reply["id"], acks + limits, "{reply}");
        match reply["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => {
                assert_eq!(reply["code"], "limit", "{reply}");
                limits += 1;
            }
            _ => panic!("{reply}"),
        }
    }
    assert!(acks >= 100 && limits >= 1, "acks {acks}, limits {limits}");
    // The accepted ones reached the subscriber, in order.
    let mut last = -1i64;
    for _ in 0..acks {
        let m = recv(&mut flood_sub).await;
        let n = m["data"].as_i64().expect("number");
        assert!(n > last, "in order");
        last = n;
    }
    w.tick().await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // let the bucket refill
    publish(&mut burst, "flood.t", json!("calm"), 500).await;
    w.tick().await;

    // Sustained: as fast as possible until the server closes.
    let mut flood = srv.ws().await;
    let start = Instant::now();
    for i in 0..400u64 {
        let frame = json!({"op":"publish","topic":"flood.t","data":i,"id":i}).to_string();
        flood.feed(Message::Text(frame.into())).await.expect("feed");
    }
    flood.flush().await.expect("flush");
    let (mut acks, mut limits) = (0, 0);
    let code = loop {
        match tokio::time::timeout(WAIT, flood.next())
            .await
            .expect("frame")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                match v["type"].as_str() {
                    Some("ack") => acks += 1,
                    Some("error") if v["code"] == "limit" => limits += 1,
                    _ => panic!("{v}"),
                }
            }
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("expected close 1008, got {other:?}"),
        }
    };
    assert_eq!(
        code,
        Some(1008),
        "sustained flood: acks {acks}, limits {limits}"
    );
    // Replies still queued when the close is decided are not written (see
    // the report: acks/limit errors before a server-side close may be lost).
    assert!(acks + limits <= 400);
    assert!(start.elapsed() < Duration::from_secs(10));
    w.tick().await;
    eventually("flooder released", || held(&srv) == 4).await;
    drop(flood_sub);
    w.finish().await;
}

#[tokio::test]
async fn subscriptions_beyond_the_limit_are_refused() {
    let srv = TestServer::start(&[("WSBROKER__CONNECTION__MAX_SUBSCRIPTIONS", "10")]).await;
    let mut w = Watch::new(&srv).await;
    let mut ws = srv.ws().await;
    for i in 0..10 {
        subscribe(&mut ws, &format!("s.{i}.>"), i).await;
    }
    for i in 10..20u64 {
        let reply = ask(
            &mut ws,
            &json!({"op":"subscribe","topic":format!("t.{i}"),"id":i}).to_string(),
        )
        .await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "limit", "{reply}");
        assert_eq!(reply["id"], i, "{reply}");
        w.tick().await;
    }
    // Re-subscribing to a held pattern is not a new subscription.
    subscribe(&mut ws, "s.3.>", 30).await;
    // Unsubscribe frees a slot.
    send(&mut ws, json!({"op":"unsubscribe","topic":"s.0.>","id":31})).await;
    assert_eq!(recv(&mut ws).await, json!({"type":"ack","id":31}));
    subscribe(&mut ws, "t.new", 32).await;
    let reply = ask(&mut ws, r#"{"op":"subscribe","topic":"t.more","id":33}"#).await;
    assert_eq!(reply["code"], "limit");
    assert_eq!(srv.server.shared().broker.subscription_count(), 11);
    drop(ws);
    eventually("subscriptions released", || {
        srv.server.shared().broker.subscription_count() == 1
    })
    .await;
    w.finish().await;
}

#[tokio::test]
async fn sixth_connection_from_one_address_gets_503() {
    let srv = TestServer::start(&[("WSBROKER__SERVER__MAX_CONNECTIONS_PER_IP", "5")]).await;
    // The bystanders come from another address.
    let other = Ipv4Addr::new(127, 0, 0, 2);
    let mut w = Watch::with(ws_from(&srv, other).await, ws_from(&srv, other).await).await;
    let mut held_conns = Vec::new();
    for _ in 0..5 {
        held_conns.push(Raw::open(&srv).await);
    }
    let before = rejected(&srv, "limit").await;
    let resp = srv.raw_http(&upgrade_request("")).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("Retry-After:"), "{resp}");
    assert!(
        resp.contains("too many connections from your address"),
        "{resp}"
    );
    assert!(rejected(&srv, "limit").await > before);
    w.tick().await;
    // A slot frees when a connection ends.
    let mut first = held_conns.remove(0);
    first
        .write(&encode(FIN | CLOSE, &close_payload(1000, b""), true))
        .await;
    first.expect_close().await;
    first.expect_end().await;
    eventually("slot released", || held(&srv) == 2 + 4).await;
    held_conns.push(Raw::open(&srv).await);
    w.tick().await;
    w.finish().await;
}

/// Scaled-down "10,000 connections from one address": 300 from 127.0.0.1
/// with max_connections_per_ip = 200.
#[tokio::test]
async fn hundreds_of_connections_from_one_address() {
    const PER_IP: usize = 200;
    const EXTRA: usize = 100;
    let per_ip = PER_IP.to_string();
    let srv =
        TestServer::start(&[("WSBROKER__SERVER__MAX_CONNECTIONS_PER_IP", per_ip.as_str())]).await;
    let other = Ipv4Addr::new(127, 0, 0, 3);
    let mut w = Watch::with(ws_from(&srv, other).await, ws_from(&srv, other).await).await;
    let start = Instant::now();

    // Fill the address's quota, 25 handshakes at a time.
    let mut open: Vec<Raw> = Vec::new();
    while open.len() < PER_IP {
        let batch = (PER_IP - open.len()).min(25);
        let conns = futures_util::future::join_all((0..batch).map(|_| Raw::open(&srv))).await;
        open.extend(conns);
    }
    assert_eq!(held(&srv), PER_IP + 2);
    w.tick().await;

    // The excess, one at a time: each is answered 503 + Retry-After.
    let before = rejected(&srv, "limit").await;
    for _ in 0..10 {
        let resp = srv.raw_http(&upgrade_request("")).await;
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        assert!(resp.contains("Retry-After:"), "{resp}");
    }
    // And the rest all at once (fewer than the server's MAX_REFUSING): every
    // one answered 503 and counted `limit`.
    let refuse = || async {
        let tcp = TcpStream::connect(srv.addr).await.expect("tcp");
        let name = ServerName::try_from("localhost").expect("name");
        let connect = tokio_rustls::TlsConnector::from(srv.tls.clone()).connect(name, tcp);
        match tokio::time::timeout(WAIT, connect)
            .await
            .expect("TLS in time")
        {
            Err(_) => "closed".to_string(),
            Ok(mut tls) => {
                let sent = tls.write_all(upgrade_request("").as_bytes()).await;
                if sent.and(tls.flush().await).is_err() {
                    return "closed".to_string();
                }
                let (head, _) = read_head(&mut tls).await;
                head.lines().next().unwrap_or("closed").to_string()
            }
        }
    };
    let results = futures_util::future::join_all((10..EXTRA).map(|_| refuse())).await;
    let refused_503 = results
        .iter()
        .filter(|r| r.starts_with("HTTP/1.1 503"))
        .count();
    const { assert!(EXTRA - 10 < wsbroker::server::MAX_REFUSING) };
    assert_eq!(refused_503, EXTRA - 10, "{results:?}");
    let delta = rejected(&srv, "limit").await - before;
    assert!(delta >= EXTRA as f64, "{delta} refusals counted");
    assert_eq!(held(&srv), PER_IP + 2, "refused connections hold no slot");
    w.tick().await;

    // Everyone accepted still works: the last one subscribes and gets an ack.
    let last = open.last_mut().expect("conn");
    last.write(&encode(
        FIN | TEXT,
        br#"{"op":"subscribe","topic":"x","id":1}"#,
        true,
    ))
    .await;
    assert_eq!(last.text().await, r#"{"type":"ack","id":1}"#);

    drop(open);
    eventually("all slots released", || held(&srv) == 2).await;
    // Released slots can be used again.
    let mut again = Raw::open(&srv).await;
    again
        .write(&encode(
            FIN | TEXT,
            br#"{"op":"subscribe","topic":"x","id":2}"#,
            true,
        ))
        .await;
    assert_eq!(again.text().await, r#"{"type":"ack","id":2}"#);
    w.tick().await;
    w.finish().await;
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}
