//! The bench's subscriber side: subscribers are opened on the async runtime
//! (TCP, TLS, upgrade, subscribe), then handed to a few receiver threads that
//! each drive their sockets with one `epoll` (mio), decrypt with rustls and
//! parse the server's frames by hand.
//!
//! Why not one tokio-tungstenite task per subscriber: the bench shares the
//! machine with the broker, and a receive path of task wake-up, tokio-rustls
//! adapter, tungstenite framing and `BytesMut` bookkeeping cost ~5 µs of CPU
//! per delivery across two worker threads. That made the bench, not the
//! broker, the larger part of the measured latency tail (docs/benchmarks.md).
//! A receiver thread reads each ready socket once (a short read means it is
//! drained), and one thread for 1,000 subscribers never competes with itself.

use std::io::{self, Read as _, Write as _};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite;

use super::{extract_ts, new_histogram, Counter, Ctx, SUB_ACK_TIMEOUT};
use crate::client::{self, ClientError, SubscribeAcks};

/// Largest frame a subscriber accepts (the server's own limit is far lower).
const MAX_FRAME: usize = 16 << 20;
/// How long stopping receivers wait for the servers' close replies.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// TCP + TLS + upgrade must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// The waker's token; connection tokens are slot indices.
const WAKE: Token = Token(usize::MAX);

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A frame that breaks RFC 6455 for a client to receive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum FrameError {
    /// RSV bits without a negotiated extension.
    #[error("reserved bits set")]
    Reserved,
    /// Servers must not mask.
    #[error("masked frame from the server")]
    Masked,
    /// Longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is too large")]
    TooLarge(u64),
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("invalid control frame")]
    BadControl,
}

/// One complete frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
struct Frame<'a> {
    fin: bool,
    opcode: u8,
    payload: &'a [u8],
    /// Header plus payload length: where the next frame starts.
    len: usize,
}

/// Parses the frame at the start of `buf`; `None` until all of it arrived.
fn next_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (len, start) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(FrameError::BadControl);
    }
    let Some(len) = usize::try_from(len).ok().filter(|&l| l <= MAX_FRAME) else {
        return Err(FrameError::TooLarge(len));
    };
    let end = start + len;
    Ok(buf.get(start..end).map(|payload| Frame {
        fin,
        opcode,
        payload,
        len: end,
    }))
}

/// Appends one masked (client-to-server) frame with FIN set.
fn encode_masked(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = fastrand::u32(..).to_ne_bytes();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// The close code and reason of a close frame's payload.
fn close_status(payload: &[u8]) -> (u16, String) {
    match payload {
        [a, b, reason @ ..] => (
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason).into_owned(),
        ),
        _ => (1005, "no status".into()),
    }
}

fn protocol_error(e: FrameError) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// An open, subscribed connection on its way to a receiver thread.
pub(super) struct Opened {
    sock: std::net::TcpStream,
    tls: rustls::ClientConnection,
    /// Plaintext read past the last subscribe ack.
    buf: Vec<u8>,
}

/// Opens subscriber `idx`: TCP, TLS, upgrade, then subscribes to `topics`
/// and waits for every ack.
pub(super) async fn open(ctx: &Ctx, idx: usize, topics: &[String]) -> Result<Opened, ClientError> {
    let target = ctx.sub_target(idx);
    let request = client::upgrade_request(target, &ctx.opts)?;
    let (mut tls, mut buf) = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut tls = client::connect_tls(target, ctx.tls.clone(), ctx.local_addr(idx)).await?;
        let leftover = upgrade(&mut tls, &request).await?;
        Ok::<_, ClientError>((tls, leftover))
    })
    .await
    .map_err(|_| ClientError::Timeout("connecting (TCP + TLS + upgrade took over 10 s)"))??;

    let mut acks = SubscribeAcks::new(topics);
    let mut out = Vec::new();
    for frame in acks.frames() {
        encode_masked(OP_TEXT, frame.as_bytes(), &mut out);
    }
    let subscribed = async {
        tls.write_all(&out).await?;
        tls.flush().await?;
        let mut chunk = [0u8; 4096];
        while !acks.done() {
            let n = tls.read(&mut chunk).await?;
            if n == 0 {
                return Err(ClientError::ConnectionLost);
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut off = 0;
            // Stop at the last ack: what follows is the receiver's.
            while !acks.done() {
                let Some(f) = next_frame(&buf[off..]).map_err(protocol_error)? else {
                    break;
                };
                match (f.fin, f.opcode) {
                    (true, OP_TEXT) => {
                        let text = std::str::from_utf8(f.payload)
                            .map_err(|_| ClientError::Protocol("text frame is not UTF-8".into()))?;
                        // Nothing is published before every subscriber is in.
                        acks.on_text(text, |_| Ok(()))?;
                    }
                    (_, OP_CLOSE) => {
                        let (code, reason) = close_status(f.payload);
                        return Err(ClientError::Closed { code, reason });
                    }
                    (_, OP_PING) => {
                        let mut pong = Vec::new();
                        encode_masked(OP_PONG, f.payload, &mut pong);
                        tls.write_all(&pong).await?;
                        tls.flush().await?;
                    }
                    (_, OP_PONG) => {}
                    _ => {
                        return Err(ClientError::Protocol(
                            "unexpected frame while subscribing".into(),
                        ))
                    }
                }
                off += f.len;
            }
            buf.drain(..off);
        }
        Ok(())
    };
    tokio::time::timeout(SUB_ACK_TIMEOUT, subscribed)
        .await
        .map_err(|_| ClientError::Timeout("waiting for the subscribe acks"))??;
    let (tcp, tls) = tls.into_inner();
    Ok(Opened {
        sock: tcp.into_std()?,
        tls,
        buf,
    })
}

/// Longest upgrade response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The WebSocket upgrade, by hand so that nothing the server sends right
/// after its 101 is lost: returns those bytes (the start of the frames).
pub(super) async fn upgrade<S>(
    io: &mut S,
    request: &client::UpgradeRequest,
) -> Result<Vec<u8>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("GET {path} HTTP/1.1\r\n").into_bytes();
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    io.write_all(&head).await?;
    io.flush().await?;

    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(ClientError::ConnectionLost);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(ClientError::Protocol(
                    "upgrade response head too large".into(),
                ))
            }
            Err(e) => return Err(ClientError::Protocol(format!("upgrade response: {e}"))),
        };
        let status = response.code.unwrap_or(0);
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        if status != 101 {
            // Whatever of the body came with the head names the reason.
            return Err(ClientError::Rejected {
                status,
                reason: response.reason.unwrap_or("").to_string(),
                body: String::from_utf8_lossy(&buf[head_len..]).trim().to_string(),
            });
        }
        let key = request
            .headers()
            .get("Sec-WebSocket-Key")
            .map(|k| k.as_bytes())
            .unwrap_or_default();
        let expected = tungstenite::handshake::derive_accept_key(key);
        if header("Sec-WebSocket-Accept") != Some(expected.as_bytes()) {
            return Err(ClientError::Protocol(
                "upgrade response has a wrong Sec-WebSocket-Accept".into(),
            ));
        }
        return Ok(buf.split_off(head_len));
    }
}

enum Cmd {
    Add(Box<Opened>, Arc<Counter>),
    Stop,
}

/// The senders into the receiver threads; cheap to share with every
/// subscriber task.
pub(super) struct Inlets {
    inlets: Vec<(mpsc::Sender<Cmd>, Waker)>,
}

impl Inlets {
    /// Hands subscriber `idx` to its thread. If the thread is gone the
    /// bench is being torn down and the connection is simply dropped.
    pub fn add(&self, idx: usize, opened: Opened, counter: Arc<Counter>) {
        let (tx, waker) = &self.inlets[idx % self.inlets.len()];
        if tx.send(Cmd::Add(Box::new(opened), counter)).is_ok() {
            let _ = waker.wake();
        }
    }

    fn stop(&self) {
        for (tx, waker) in &self.inlets {
            if tx.send(Cmd::Stop).is_ok() {
                let _ = waker.wake();
            }
        }
    }
}

/// The receiver threads.
pub(super) struct Receivers {
    inlets: Arc<Inlets>,
    threads: Vec<JoinHandle<()>>,
}

impl Receivers {
    /// Starts `n` (at least one) receiver threads recording into `ctx`.
    pub fn start(n: usize, ctx: &Arc<Ctx>) -> io::Result<Self> {
        let mut started = Self {
            inlets: Arc::new(Inlets { inlets: Vec::new() }),
            threads: Vec::new(),
        };
        let mut inlets = Vec::new();
        for i in 0..n.max(1) {
            let spawned = (|| {
                let poll = Poll::new()?;
                let waker = Waker::new(poll.registry(), WAKE)?;
                let (tx, rx) = mpsc::channel();
                let ctx = ctx.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("bench-recv-{i}"))
                    .spawn(move || Thread::new(ctx, i).run(poll, rx))?;
                Ok::<_, io::Error>((thread, tx, waker))
            })();
            match spawned {
                Ok((thread, tx, waker)) => {
                    started.threads.push(thread);
                    inlets.push((tx, waker));
                }
                Err(e) => {
                    // Dropping `started` stops the threads already running.
                    started.inlets = Arc::new(Inlets { inlets });
                    return Err(e);
                }
            }
        }
        started.inlets = Arc::new(Inlets { inlets });
        Ok(started)
    }

    /// Where subscriber tasks hand over their connections.
    pub fn inlets(&self) -> Arc<Inlets> {
        self.inlets.clone()
    }

    /// Closes every connection (close 1000, waiting up to 2 s for the
    /// replies), records the latencies into `ctx` and joins the threads.
    pub async fn finish(mut self) {
        self.inlets.stop();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        // The threads end on their own within CLOSE_WAIT; this is a backstop.
        let _ = tokio::time::timeout(CLOSE_WAIT * 3, joined).await;
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        // Threads must not outlive a bench that ended early.
        self.inlets.stop();
    }
}

/// Scratch space shared by one thread's connections.
struct Scratch {
    raw: Vec<u8>,
    out: Vec<u8>,
}

/// What one thread records.
struct Tally<'a> {
    ctx: &'a Ctx,
    hist: Histogram<u64>,
}

impl Tally<'_> {
    /// Times one text frame; false when it carries no bench timestamp.
    fn record(&mut self, text: &[u8], now_ns: u64) -> bool {
        match std::str::from_utf8(text).ok().and_then(extract_ts) {
            Some(ts) => {
                self.hist
                    .saturating_record(now_ns.saturating_sub(ts) / 1000);
                true
            }
            None => {
                self.ctx.unexpected_frames.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// The connection is over: close handshake done, EOF, an I/O or TLS error,
/// or a protocol violation.
struct Ended;

/// One subscriber connection inside a receiver thread.
struct Conn {
    sock: TcpStream,
    tls: rustls::ClientConnection,
    /// Plaintext not yet parsed into frames.
    buf: Vec<u8>,
    /// A fragmented data message being reassembled (opcode, bytes).
    partial: Option<(u8, Vec<u8>)>,
    counter: Arc<Counter>,
    delivered: u64,
    /// We sent our close frame.
    closing: bool,
    /// Registered for writability because rustls has bytes the socket refused.
    want_write: bool,
}

impl Conn {
    /// Reads what the socket has, decrypts, handles every complete frame.
    fn read(&mut self, sc: &mut Scratch, tally: &mut Tally<'_>) -> Result<(), Ended> {
        loop {
            let n = match self.sock.read(&mut sc.raw) {
                Ok(0) => return Err(Ended),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(Ended),
            };
            let now_ns = tally.ctx.base.elapsed().as_nanos() as u64;
            let mut rest = &sc.raw[..n];
            let mut peer_closed = false;
            while !rest.is_empty() {
                self.tls.read_tls(&mut rest).map_err(|_| Ended)?;
                peer_closed |= self.take_plaintext()?;
            }
            self.frames(sc, tally, now_ns)?;
            if peer_closed {
                return Err(Ended);
            }
            // A short read drained the socket: epoll reports the next data.
            if n < sc.raw.len() {
                return Ok(());
            }
        }
    }

    /// Processes received TLS records into `buf`; true once the peer sent
    /// close_notify.
    fn take_plaintext(&mut self) -> Result<bool, Ended> {
        let state = self.tls.process_new_packets().map_err(|_| Ended)?;
        let k = state.plaintext_bytes_to_read();
        if k > 0 {
            let len = self.buf.len();
            self.buf.resize(len + k, 0);
            self.tls
                .reader()
                .read_exact(&mut self.buf[len..])
                .map_err(|_| Ended)?;
        }
        Ok(state.peer_has_closed())
    }

    /// Handles every complete frame in `buf`.
    fn frames(
        &mut self,
        sc: &mut Scratch,
        tally: &mut Tally<'_>,
        now_ns: u64,
    ) -> Result<(), Ended> {
        let mut off = 0;
        let mut result = Ok(());
        while let Some(f) = next_frame(&self.buf[off..]).map_err(|_| Ended)? {
            off += f.len;
            match (f.fin, f.opcode) {
                (true, OP_TEXT) if self.partial.is_none() => {
                    if tally.record(f.payload, now_ns) {
                        self.delivered += 1;
                    }
                }
                (_, OP_TEXT | OP_BINARY) if self.partial.is_none() => {
                    if f.fin {
                        // Binary: nothing the broker sends.
                        tally.ctx.unexpected_frames.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.partial = Some((f.opcode, f.payload.to_vec()));
                    }
                }
                (fin, OP_CONTINUATION) if self.partial.is_some() => {
                    if let Some((_, bytes)) = &mut self.partial {
                        bytes.extend_from_slice(f.payload);
                    }
                    if fin {
                        if let Some((op, bytes)) = self.partial.take() {
                            if op == OP_TEXT && tally.record(&bytes, now_ns) {
                                self.delivered += 1;
                            } else if op != OP_TEXT {
                                tally.ctx.unexpected_frames.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                (_, OP_PING) => {
                    sc.out.clear();
                    encode_masked(OP_PONG, f.payload, &mut sc.out);
                    self.tls.writer().write_all(&sc.out).map_err(|_| Ended)?;
                }
                (_, OP_PONG) => {}
                (_, OP_CLOSE) => {
                    if !self.closing {
                        // Echo the status, as RFC 6455 §5.5.1 asks.
                        let echo = f.payload.get(..2).unwrap_or_default();
                        sc.out.clear();
                        encode_masked(OP_CLOSE, echo, &mut sc.out);
                        let _ = self.tls.writer().write_all(&sc.out);
                    }
                    result = Err(Ended);
                    break;
                }
                _ => {
                    result = Err(Ended);
                    break;
                }
            }
        }
        self.counter.set(self.delivered);
        if off == self.buf.len() {
            self.buf.clear();
        } else {
            self.buf.drain(..off);
        }
        result
    }

    /// Sends our close (1000) if not done yet.
    fn start_close(&mut self, sc: &mut Scratch) {
        if !self.closing {
            self.closing = true;
            sc.out.clear();
            encode_masked(OP_CLOSE, &1000u16.to_be_bytes(), &mut sc.out);
            let _ = self.tls.writer().write_all(&sc.out);
        }
    }

    /// Writes what rustls holds; asks for writability if the socket is full.
    fn flush(&mut self, registry: &Registry, token: Token) -> Result<(), Ended> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.want_write {
                        self.want_write = true;
                        registry
                            .reregister(
                                &mut self.sock,
                                token,
                                Interest::READABLE | Interest::WRITABLE,
                            )
                            .map_err(|_| Ended)?;
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Ended),
            }
        }
        if self.want_write {
            self.want_write = false;
            registry
                .reregister(&mut self.sock, token, Interest::READABLE)
                .map_err(|_| Ended)?;
        }
        Ok(())
    }

    /// Best-effort goodbye before the socket is dropped.
    fn finish(&mut self) {
        self.tls.send_close_notify();
        let _ = self.tls.write_tls(&mut self.sock);
    }
}

/// One receiver thread's state.
struct Thread {
    ctx: Arc<Ctx>,
    index: usize,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
    stopping: Option<Instant>,
    sc: Scratch,
}

impl Thread {
    fn new(ctx: Arc<Ctx>, index: usize) -> Self {
        Self {
            ctx,
            index,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            stopping: None,
            sc: Scratch {
                raw: vec![0; READ_CHUNK],
                out: Vec::with_capacity(256),
            },
        }
    }

    fn run(mut self, mut poll: Poll, rx: mpsc::Receiver<Cmd>) {
        let ctx = self.ctx.clone();
        let mut tally = Tally {
            ctx: &ctx,
            hist: new_histogram(),
        };
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.stopping.map(|_| Duration::from_millis(20));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("bench: receiver thread: {e}");
                break;
            }
            for ev in events.iter() {
                let token = ev.token();
                if token == WAKE {
                    self.commands(&rx, poll.registry(), &mut tally);
                    continue;
                }
                let Some(conn) = self.conns.get_mut(token.0).and_then(Option::as_mut) else {
                    continue;
                };
                let mut r = Ok(());
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    r = conn.read(&mut self.sc, &mut tally);
                }
                // Also sends pongs and the echo of a server's close.
                let flushed = conn.flush(poll.registry(), token);
                if r.and(flushed).is_err() {
                    self.remove(token.0, poll.registry());
                }
            }
            if let Some(since) = self.stopping {
                if self.live == 0 || since.elapsed() >= CLOSE_WAIT {
                    break;
                }
            }
        }
        for i in 0..self.conns.len() {
            if self.conns[i].is_some() {
                self.remove(i, poll.registry());
            }
        }
        let shard = &ctx.shards[self.index % ctx.shards.len()];
        let mut h = match shard.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Same bounds everywhere, so adding cannot fail.
        let _ = h.add(&tally.hist);
    }

    fn commands(&mut self, rx: &mpsc::Receiver<Cmd>, registry: &Registry, tally: &mut Tally<'_>) {
        loop {
            match rx.try_recv() {
                Ok(Cmd::Add(opened, counter)) => self.add(opened, counter, registry, tally),
                Ok(Cmd::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.stop(registry);
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => return,
            }
        }
    }

    fn add(
        &mut self,
        opened: Box<Opened>,
        counter: Arc<Counter>,
        registry: &Registry,
        tally: &mut Tally<'_>,
    ) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let token = Token(slot);
        let opened = *opened;
        let mut conn = Conn {
            sock: TcpStream::from_std(opened.sock),
            tls: opened.tls,
            buf: opened.buf,
            partial: None,
            counter,
            delivered: 0,
            closing: false,
            want_write: false,
        };
        // Registering reports data already waiting on the socket; what the
        // subscribe phase left in rustls or in `buf` is handled now.
        let now_ns = self.ctx.base.elapsed().as_nanos() as u64;
        let ready = registry
            .register(&mut conn.sock, token, Interest::READABLE)
            .map_err(|_| Ended)
            .and_then(|()| conn.take_plaintext())
            .and_then(|peer_closed| {
                conn.frames(&mut self.sc, tally, now_ns)?;
                if peer_closed {
                    return Err(Ended);
                }
                if self.stopping.is_some() {
                    conn.start_close(&mut self.sc);
                }
                conn.flush(registry, token)
            });
        self.conns[slot] = Some(conn);
        self.live += 1;
        if ready.is_err() {
            self.remove(slot, registry);
        }
    }

    fn stop(&mut self, registry: &Registry) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Instant::now());
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            conn.start_close(&mut self.sc);
            if conn.flush(registry, Token(slot)).is_err() {
                self.remove(slot, registry);
            }
        }
    }

    fn remove(&mut self, slot: usize, registry: &Registry) {
        let Some(mut conn) = self.conns[slot].take() else {
            return;
        };
        // Ended before we asked it to: the server closed it or it broke.
        if !conn.closing {
            self.ctx
                .subscriber_disconnects
                .fetch_add(1, Ordering::Relaxed);
        }
        conn.finish();
        let _ = registry.deregister(&mut conn.sock);
        self.free.push(slot);
        self.live -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(frame: &[u8], start: usize) -> Vec<u8> {
        let mask = &frame[start..start + 4];
        frame[start + 4..]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect()
    }

    #[test]
    fn masked_frames_carry_the_payload_and_length() {
        for (len, header) in [(5usize, 2usize), (125, 2), (126, 4), (70_000, 10)] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_masked(OP_TEXT, &payload, &mut out);
            assert_eq!(out[0], 0x81);
            assert_eq!(out[1] & 0x80, 0x80, "client frames are masked");
            assert_eq!(out.len(), header + 4 + len);
            assert_eq!(unmask(&out, header), payload);
        }
    }

    #[test]
    fn server_frames_parse_only_when_complete() {
        let mut wire = vec![0x81, 3, b'a', b'b', b'c', 0x89, 0];
        wire.extend_from_slice(&[0x82, 126, 0x01, 0x00]);
        wire.extend(std::iter::repeat_n(7u8, 256));
        let f = next_frame(&wire).unwrap().unwrap();
        assert_eq!(
            (f.fin, f.opcode, f.payload, f.len),
            (true, OP_TEXT, &b"abc"[..], 5)
        );
        let f = next_frame(&wire[5..]).unwrap().unwrap();
        assert_eq!((f.opcode, f.payload.len(), f.len), (OP_PING, 0, 2));
        let f = next_frame(&wire[7..]).unwrap().unwrap();
        assert_eq!((f.opcode, f.payload.len()), (OP_BINARY, 256));
        for cut in 0..wire.len() - 7 {
            assert_eq!(next_frame(&wire[7..7 + cut]).unwrap(), None, "cut at {cut}");
        }
        let mut long = vec![0x81, 127];
        long.extend_from_slice(&70_000u64.to_be_bytes());
        long.extend(std::iter::repeat_n(b'x', 70_000));
        assert_eq!(next_frame(&long).unwrap().unwrap().payload.len(), 70_000);
    }

    #[test]
    fn broken_server_frames_are_refused() {
        assert_eq!(
            next_frame(&[0x81, 0x81, 0, 0, 0, 0, 0]),
            Err(FrameError::Masked)
        );
        assert_eq!(next_frame(&[0xC1, 0]), Err(FrameError::Reserved));
        assert_eq!(next_frame(&[0x09, 0]), Err(FrameError::BadControl));
        assert_eq!(
            next_frame(&[0x89, 126, 0, 126]),
            Err(FrameError::BadControl)
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(next_frame(&huge), Err(FrameError::TooLarge(u64::MAX)));
    }

    #[test]
    fn close_status_reads_code_and_reason() {
        assert_eq!(close_status(&[0x03, 0xF0, b'h', b'i']), (1008, "hi".into()));
        assert_eq!(close_status(&[]), (1005, "no status".into()));
    }
}
