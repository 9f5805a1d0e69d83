//! A hand-written WebSocket client over any stream (normally the harness's
//! real TLS): masked frames built byte by byte, the upgrade written by hand,
//! and [`close_code_while_sending`], which keeps sending while it waits for
//! the server's Close and checks that the connection then ends cleanly
//! (CONTRACT §5: a server close never turns into a reset).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ORIGIN, WAIT};

/// Opcodes (RFC 6455 §5.2).
pub const CONTINUATION: u8 = 0x0;
/// Text frame.
pub const TEXT: u8 = 0x1;
/// Close frame.
pub const CLOSE: u8 = 0x8;
/// Ping frame.
pub const PING: u8 = 0x9;

/// The header of a masked client frame whose payload is `len` bytes long
/// (the caller sends the payload, masked with [`MASK`], itself).
pub fn frame_header(first_byte: u8, len: u64) -> Vec<u8> {
    let mut out = vec![first_byte];
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out
}

/// The masking key of every frame built here.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A complete masked client frame; `fin` false starts or continues a
/// fragmented message.
pub fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    frame_raw(opcode | if fin { 0x80 } else { 0 }, payload)
}

/// A complete masked frame with the first byte (FIN, RSV bits, opcode) as given.
pub fn frame_raw(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_header(first_byte, payload.len() as u64);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// A text frame carrying `json` (a complete message).
pub fn text(json: &str) -> Vec<u8> {
    frame(TEXT, true, json.as_bytes())
}

/// Writes the upgrade request for `/ws` with the harness origin and reads
/// the response head; Err with the head when it is not a 101.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<(), String> {
    upgrade_with(stream, "").await
}

/// [`upgrade`] with `extra` header lines (each ending in `\r\n`), e.g. an
/// `Authorization: Bearer` header.
pub async fn upgrade_with<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    extra: &str,
) -> Result<(), String> {
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n{extra}\r\n"
    );
    let io = |e: std::io::Error| format!("upgrade: {e}");
    stream.write_all(req.as_bytes()).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    // Byte by byte: nothing after the head may be consumed here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match tokio::time::timeout(WAIT, stream.read(&mut b)).await {
            Err(_) => return Err("upgrade: no response in time".into()),
            Ok(Err(e)) => return Err(io(e)),
            Ok(Ok(0)) => {
                return Err(format!(
                    "upgrade: EOF after {:?}",
                    String::from_utf8_lossy(&head)
                ))
            }
            Ok(Ok(_)) => head.push(b[0]),
        }
    }
    if head.starts_with(b"HTTP/1.1 101") {
        Ok(())
    } else {
        Err(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&head)
        ))
    }
}

/// What the server sent before its stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerClose {
    /// The Close frame's code (1005 when it had none).
    pub code: u16,
    /// Its reason text.
    pub reason: String,
}

/// Sends `first`, then `junk` over and over (every `pace`, or back to back
/// when zero) until the server's Close frame arrives, skipping every other
/// frame; then, as a browser does, finishes the chunk in progress, answers
/// with a Close of its own, reads until the server ends the stream and only
/// then closes its side.
///
/// Ok only when the Close arrived *and* the connection ended cleanly (TLS
/// close_notify / EOF), with no reset on either direction: a reset is what
/// makes a browser report 1006 instead of the code. Err describes what
/// happened otherwise. Bounded by [`WAIT`] and by 256 MiB of junk.
pub async fn close_code_while_sending<S>(
    stream: S,
    first: Vec<u8>,
    junk: Vec<u8>,
    pace: Duration,
) -> Result<ServerClose, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match tokio::time::timeout(WAIT, exchange(stream, first, junk, pace)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no clean end within {WAIT:?}")),
    }
}

async fn exchange<S>(
    stream: S,
    first: Vec<u8>,
    junk: Vec<u8>,
    pace: Duration,
) -> Result<ServerClose, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let got_close = Arc::new(AtomicBool::new(false));
    let stop = got_close.clone();
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel::<u16>();
    let writer = tokio::spawn(async move {
        let io = |what: &str, e: std::io::Error| format!("{what}: {e} ({:?})", e.kind());
        wr.write_all(&first)
            .await
            .map_err(|e| io("first write", e))?;
        wr.flush().await.map_err(|e| io("first flush", e))?;
        let mut sent = first.len();
        while !stop.load(Ordering::Acquire) && sent < 256 << 20 && !junk.is_empty() {
            wr.write_all(&junk)
                .await
                .map_err(|e| io("sending while the close came", e))?;
            wr.flush().await.map_err(|e| io("flush", e))?;
            sent += junk.len();
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
        // The reply to the server's Close, with its code.
        let code = reply_rx.await.unwrap_or(1000);
        wr.write_all(&frame(CLOSE, true, &code.to_be_bytes()))
            .await
            .map_err(|e| io("close reply", e))?;
        wr.flush().await.map_err(|e| io("close reply flush", e))?;
        Ok::<_, String>(wr)
    });
    let mut reply_tx = Some(reply_tx);
    let mut buf: Vec<u8> = Vec::new();
    let mut close: Option<ServerClose> = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Parse what is buffered.
        while let Some((opcode, start, end)) = parse(&buf) {
            if end > buf.len() {
                break;
            }
            if opcode == CLOSE && close.is_none() {
                let p = &buf[start..end];
                let code = if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                };
                close = Some(ServerClose {
                    code,
                    reason: String::from_utf8_lossy(p.get(2..).unwrap_or(&[])).into_owned(),
                });
                got_close.store(true, Ordering::Release);
                if let Some(tx) = reply_tx.take() {
                    let _ = tx.send(code);
                }
            }
            buf.drain(..end);
        }
        match rd.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                if close.is_some() {
                    // Nothing may follow a Close (RFC 6455 §5.5.1).
                    return Err(format!("{n} bytes after the server's Close"));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) => {
                let when = if close.is_some() {
                    "after the Close frame"
                } else {
                    "before any Close frame"
                };
                return Err(format!("read error {when}: {e} ({:?})", e.kind()));
            }
        }
    }
    let Some(close) = close else {
        return Err("the stream ended without a Close frame".into());
    };
    if !buf.is_empty() {
        return Err(format!("stream ended inside a frame ({} bytes)", buf.len()));
    }
    // The server closed its side; the client (browser-like) closes its own.
    let mut wr = match writer.await {
        Ok(Ok(wr)) => wr,
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(format!("writer task: {e}")),
    };
    let _ = wr.shutdown().await;
    Ok(close)
}

/// A complete-or-not server frame at the start of `buf`: (opcode, payload
/// start, payload end); None while the header is incomplete.
fn parse(buf: &[u8]) -> Option<(u8, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, at) = match buf[1] & 0x7f {
        126 => {
            let b = buf.get(2..4)?;
            (u16::from_be_bytes([b[0], b[1]]) as usize, 4)
        }
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    // Server frames are never masked.
    Some((opcode, at, at + len))
}
