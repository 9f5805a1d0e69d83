//! One client's life after the upgrade: a reader (commands in, idle timer,
//! inbound rate limit) and a writer (outbox out in coalesced batches, pings,
//! the close handshake), each a task of its own.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use crate::auth::Session;
use crate::broker::{Broker, Subscriber};
use crate::config::ConnectionSettings;
use crate::metrics::{AuthReason, CloseReason, Metrics};
use crate::protocol::{self, Command, ErrorCode};
use crate::queue::{CloseRequest, Flag, Outbox, QueueLimits, Queued, PEER_CLOSED};

/// WebSocket read buffer per connection: enough for typical commands without
/// the 128 KiB library default (and its per-read memset). Larger messages
/// grow it on demand; this is what every idle connection pays.
pub const READ_BUFFER: usize = 512;
/// Frames of a batch are gathered into writes of about this size: one TLS
/// record each, so a busy connection pays one record per 16 KiB, not per frame.
pub const WRITE_CHUNK: usize = 16 * 1024;
/// Longest wait for a peer's close reply (or for a stuck write) after we close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// tungstenite settings for a server connection. tungstenite only reads (and
/// writes its own Pongs and close echoes); messages bypass it.
pub fn ws_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// The stream tungstenite sees: reads come from the TLS read half; what it
/// writes becomes control frames in the outbox: Pongs go ahead of queued
/// data, the echo of a client's Close goes after the replies already queued
/// and ends the queue. The writer owns
/// the TLS write half, so message frames, built once per publish, go from the
/// outbox to rustls without being framed again per subscriber.
pub struct ReadSide<R> {
    rd: R,
    outbox: Arc<Outbox>,
}

impl<R: AsyncRead + Unpin> AsyncRead for ReadSide<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for ReadSide<R> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        // tungstenite writes whole frames from its buffer, so each write is
        // one or more complete frames: Pongs and the echo of a Close, all
        // control frames (payload <= 125, so a 2-byte header).
        let mut rest = buf;
        while rest.len() >= 2 {
            let len = usize::from(rest[1] & 0x7f);
            if len > 125 || rest.len() < 2 + len {
                // Not a control frame as expected: pass it on whole.
                self.outbox.control(Bytes::copy_from_slice(rest));
                break;
            }
            let (frame, tail) = rest.split_at(2 + len);
            if frame[0] & 0x0f == 0x8 {
                // The echo goes after the replies already queued, and
                // nothing goes after it.
                self.outbox.close_echo(Bytes::copy_from_slice(frame));
            } else {
                self.outbox.control(Bytes::copy_from_slice(frame));
            }
            rest = tail;
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Everything a connection needs from the server.
pub struct Context {
    /// Connection id (for logs).
    pub id: u64,
    /// Peer address.
    pub peer: SocketAddr,
    /// The broker.
    pub broker: Arc<Broker>,
    /// Per-connection settings.
    pub settings: Arc<ConnectionSettings>,
    /// Metric handles.
    pub metrics: &'static Metrics,
    /// Cancelled when the server starts draining. Checked once, right after
    /// the connection registers; afterwards the drain reaches it through the
    /// broker's registry (hot loops never poll a token shared by everyone).
    pub drain: CancellationToken,
    /// Largest accepted message (and frame), `server.max_message_size`.
    pub max_message_size: usize,
    /// `auth.mode = "jwt"`: the configuration (for `auth` ops) and this
    /// connection's session; `None` in mode none.
    pub auth: Option<(AuthHandle, Box<Session>)>,
}

/// The current `[auth]` configuration, shared (read only by `auth` ops).
pub type AuthHandle = Arc<arc_swap::ArcSwap<crate::auth::Authenticator>>;

/// What a connection's reader and writer share: the context and the two
/// signals between them (the reader has finished; the reader must stop).
struct Conn {
    ctx: Context,
    reader_done: Flag,
    stop_reader: Flag,
}

fn close_request(code: u16, reason: &'static str, label: CloseReason) -> CloseRequest {
    CloseRequest {
        code,
        reason,
        label,
    }
}

/// Runs a connection to its end, from the first byte after the 101. The
/// writer is a task of its own, so a publish wakes only the writers (never
/// the readers) of the subscribers.
///
/// `guard` (the server's connection-limit slot) is dropped when the
/// connection ends. Spawn the returned future itself rather than awaiting it
/// inside another async block: that block would store the ~1 KiB future
/// twice (once captured, once being awaited), costing ~1.2 KiB per idle
/// connection.
///
/// Not an `async fn`: the stream is split (moved to the heap) before the
/// future is built, so the long-lived future does not reserve room for it.
pub fn run<S, G>(
    stream: S,
    leftover: Vec<u8>,
    ctx: Context,
    guard: G,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    G: Send + 'static,
{
    let span = tracing::info_span!("conn", id = ctx.id, peer = %ctx.peer);
    let mut ctx = ctx;
    // The session is the reader's alone (a refresh changes it); the handle
    // to the configuration goes with it.
    let mut auth = ctx.auth.take();
    let conn = Arc::new(Conn {
        ctx,
        reader_done: Flag::default(),
        stop_reader: Flag::default(),
    });
    let (rd, wr) = tokio::io::split(stream);
    let outbox = Arc::new(Outbox::new(QueueLimits {
        capacity: conn.ctx.settings.queue_capacity,
        max_bytes: conn.ctx.settings.queue_max_bytes,
        overflow: conn.ctx.settings.overflow,
    }));
    let side = ReadSide {
        rd,
        outbox: outbox.clone(),
    };
    async move {
        let ctx = &conn.ctx;
        let config = ws_config(ctx.max_message_size);
        let mut ws = if leftover.is_empty() {
            WebSocketStream::from_raw_socket(side, Role::Server, Some(config)).await
        } else {
            WebSocketStream::from_partially_read(side, leftover, Role::Server, Some(config)).await
        };
        let m = ctx.metrics;
        m.connections_opened.increment(1);
        m.connections_active.increment(1.0);
        info!("connection opened");
        let sub = Arc::new(Subscriber {
            id: ctx.id,
            outbox: outbox.clone(),
            peer: ctx.peer,
            subscriptions: AtomicUsize::new(0),
        });
        ctx.broker.register(&sub);
        if ctx.drain.is_cancelled() {
            // Upgraded while the drain was starting: it may have missed us.
            outbox.close(crate::queue::CloseRequest::shutdown());
        }
        let writer = tokio::spawn(writer(wr, conn.clone(), outbox));
        let mut patterns: HashSet<Box<str>> = HashSet::new();
        read_loop(
            &mut ws,
            ctx,
            &sub,
            &mut patterns,
            &conn.stop_reader,
            &mut auth,
        )
        .await;
        conn.reader_done.set();
        ctx.broker
            .unsubscribe_all(patterns.iter().map(|p| p.as_ref()), ctx.id);
        ctx.broker.deregister(ctx.id);
        let reason = writer.await.unwrap_or(CloseReason::Error);
        // Counted as closed before it leaves the gauge: the counter never lags
        // the gauge (a scrape still reads series one by one; docs/metrics.md).
        m.closed(reason).increment(1);
        m.connections_active.decrement(1.0);
        info!(reason = reason.as_str(), "connection closed");
        drop(guard);
    }
    .instrument(span)
}

/// Token bucket for `max_inbound_rate` (burst = 2 x rate).
struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
    window_start: Instant,
    excess_in_window: u32,
}

enum Rate {
    Ok,
    Excess,
    Sustained,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        let now = Instant::now();
        RateLimiter {
            rate: rate as f64,
            tokens: 2.0 * rate as f64,
            last: now,
            window_start: now,
            excess_in_window: 0,
        }
    }

    fn check(&mut self, now: Instant) -> Rate {
        if self.rate == 0.0 {
            return Rate::Ok;
        }
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Rate::Ok;
        }
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.excess_in_window = 0;
        }
        self.excess_in_window += 1;
        // More than a second's worth of excess within one second: sustained.
        if self.excess_in_window as f64 > self.rate {
            Rate::Sustained
        } else {
            Rate::Excess
        }
    }
}

async fn reply(outbox: &Outbox, text: String) -> bool {
    match outbox.try_reply(protocol::text_frame(&text)) {
        Ok(queued) => queued,
        // Only when the client sends requests much faster than it reads the
        // answers. Boxed, so the wait's state is not carried in every idle
        // connection's future.
        Err(frame) => Box::pin(outbox.reply(frame)).await,
    }
}

async fn read_loop<S>(
    stream: &mut WebSocketStream<S>,
    ctx: &Context,
    sub: &Arc<Subscriber>,
    patterns: &mut HashSet<Box<str>>,
    stop: &Flag,
    auth: &mut Option<(AuthHandle, Box<Session>)>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let m = ctx.metrics;
    let outbox = &sub.outbox;
    let idle_timeout = ctx.settings.idle_timeout;
    // One timer for the idle cut and the session's deadline (4001/4003):
    // it fires at the earlier one and re-arms itself.
    let due = |auth: &Option<(AuthHandle, Box<Session>)>| auth.as_ref().and_then(|(_, s)| s.due);
    let first = due(auth).map_or(Instant::now() + idle_timeout, |d| {
        d.at.min(Instant::now() + idle_timeout)
    });
    let mut idle = pin!(tokio::time::sleep_until(first));
    // Frames only move this; the timer catches up when it fires (at most
    // once per idle_timeout) instead of being re-armed on every frame, which
    // cost ~4 % of a publish-heavy broker's CPU.
    let mut last_frame = Instant::now();
    let mut rate = RateLimiter::new(ctx.settings.max_inbound_rate);
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait() => return,
            _ = &mut idle, if !outbox.is_closing() => {
                let now = Instant::now();
                let auth_due = due(auth);
                if let Some(d) = auth_due.filter(|d| d.at <= now) {
                    debug!(reason = d.close.1, "auth deadline");
                    outbox.close(close_request(d.close.0, d.close.1, CloseReason::Auth));
                    continue;
                }
                let deadline = last_frame + idle_timeout;
                if deadline > now {
                    idle.as_mut().reset(auth_due.map_or(deadline, |d| d.at.min(deadline)));
                    continue;
                }
                debug!("idle timeout");
                outbox.close(close_request(1001, "idle timeout", CloseReason::IdleTimeout));
                continue;
            }
            next = stream.next() => next,
        };
        let msg = match next {
            Some(Ok(msg)) => msg,
            None => {
                outbox.close(CloseRequest::peer_closed(CloseReason::Client));
                return;
            }
            Some(Err(e)) => {
                let request = match &e {
                    WsError::Utf8(_) => close_request(1007, "invalid UTF-8", CloseReason::Error),
                    WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                        close_request(1009, "message too big", CloseReason::Error)
                    }
                    WsError::Capacity(_) => close_request(1009, "too big", CloseReason::Error),
                    // The client went away without a close frame (FIN, TLS
                    // close_notify or RST): it left; nobody is there to
                    // read a 1002.
                    WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                        CloseRequest::peer_closed(CloseReason::Client)
                    }
                    WsError::Io(e) if peer_went_away(e) => {
                        CloseRequest::peer_closed(CloseReason::Client)
                    }
                    WsError::Protocol(_) => {
                        close_request(1002, "protocol error", CloseReason::Error)
                    }
                    WsError::ConnectionClosed | WsError::AlreadyClosed => {
                        CloseRequest::peer_closed(CloseReason::Client)
                    }
                    _ => CloseRequest::peer_closed(CloseReason::Error),
                };
                debug!(error = %e, "read error");
                outbox.close(request);
                return;
            }
        };
        let now = Instant::now();
        last_frame = now;
        if outbox.is_closing() {
            // Waiting for the peer's close reply; discard anything else.
            if let Message::Close(_) = msg {
                return;
            }
            continue;
        }
        if matches!(msg, Message::Close(_)) {
            // tungstenite queued the echo; flushing hands it to the outbox
            // (`Outbox::close_echo`: after the replies already queued, and
            // closing it). The request below is the fallback if it did not.
            let _ = futures_util::SinkExt::flush(stream).await;
            outbox.close(CloseRequest::peer_closed(CloseReason::Client));
            return;
        }
        match rate.check(now) {
            Rate::Ok => {}
            Rate::Excess => {
                // The refused request is not parsed, but its `id` is read so
                // the client can tell which request the error answers (§4).
                let id = match &msg {
                    Message::Text(text) => protocol::request_id(text.as_str()),
                    Message::Binary(_) => None,
                    // Control frames count against the budget but get no answer.
                    _ => continue,
                };
                let err =
                    protocol::encode_error(id, ErrorCode::Limit, "inbound rate limit exceeded");
                if !reply(outbox, err).await {
                    return;
                }
                continue;
            }
            Rate::Sustained => {
                outbox.close(close_request(
                    1008,
                    "rate limit exceeded",
                    CloseReason::Error,
                ));
                continue;
            }
        }
        match msg {
            Message::Text(text) => {
                m.bytes_received.increment(text.len() as u64);
                if !handle_text(text.as_str(), ctx, sub, patterns, auth).await {
                    return;
                }
                if let Some((_, session)) = auth.as_mut().filter(|(_, s)| s.rearm) {
                    // A refresh moved the deadline: the timer may be late.
                    session.rearm = false;
                    let deadline = last_frame + idle_timeout;
                    idle.as_mut()
                        .reset(session.due.map_or(deadline, |d| d.at.min(deadline)));
                }
            }
            Message::Binary(data) => {
                m.bytes_received.increment(data.len() as u64);
                let err = protocol::encode_error(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text frames",
                );
                if !reply(outbox, err).await {
                    return;
                }
            }
            // Pings are answered by tungstenite; any frame counts as activity.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) | Message::Close(_) => {}
        }
    }
}

/// Read errors that mean the peer closed or dropped the connection.
fn peer_went_away(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Handles one command; false when the connection is closing.
async fn handle_text(
    text: &str,
    ctx: &Context,
    sub: &Arc<Subscriber>,
    patterns: &mut HashSet<Box<str>>,
    auth: &mut Option<(AuthHandle, Box<Session>)>,
) -> bool {
    let outbox = &sub.outbox;
    let answer = match protocol::parse_command(text) {
        Err(rejection) => Some(protocol::encode_error(
            rejection.id,
            rejection.code,
            &rejection.message,
        )),
        Ok(Command::Publish { topic, id, .. })
            if auth
                .as_ref()
                .is_some_and(|(_, s)| !s.grants.may_publish(&topic)) =>
        {
            Some(forbidden(ctx, id, "publish", &topic))
        }
        Ok(Command::Subscribe { topic, id })
            if auth
                .as_ref()
                .is_some_and(|(_, s)| !s.grants.may_subscribe(&topic)) =>
        {
            Some(forbidden(ctx, id, "subscribe", &topic))
        }
        Ok(Command::Auth { token, id }) if auth.is_some() => {
            // Boxed: verification (and a JWKS fetch on an unknown kid) would
            // otherwise enlarge every idle connection's future.
            return Box::pin(handle_auth(&token, id, ctx, sub, patterns, auth)).await;
        }
        Ok(Command::Publish { topic, data, id }) => {
            // The ack is queued first, so a publisher subscribed to its own
            // topic reads the answer to its request before the message (as
            // NATS' verbose +OK). Nothing can fail between the two: the
            // fan-out below never waits.
            if let Some(id) = id {
                if !reply(outbox, protocol::encode_ack(id)).await {
                    return false;
                }
            }
            let frame = protocol::message_frame(&topic, data.get());
            ctx.broker.publish(&topic, &frame);
            ctx.metrics.published_ws.increment(1);
            None
        }
        Ok(Command::Subscribe { topic, id }) => {
            if patterns.contains(topic.as_ref()) {
                id.map(protocol::encode_ack)
            } else if patterns.len() >= ctx.settings.max_subscriptions {
                Some(protocol::encode_error(
                    id,
                    ErrorCode::Limit,
                    &format!(
                        "subscription limit reached ({} per connection)",
                        ctx.settings.max_subscriptions
                    ),
                ))
            } else {
                ctx.broker.subscribe(&topic, sub);
                patterns.insert(topic.as_ref().into());
                sub.subscriptions.store(patterns.len(), Ordering::Relaxed);
                id.map(protocol::encode_ack)
            }
        }
        Ok(Command::Unsubscribe { topic, id }) => {
            if patterns.remove(topic.as_ref()) {
                ctx.broker.unsubscribe(&topic, ctx.id);
                sub.subscriptions.store(patterns.len(), Ordering::Relaxed);
            }
            id.map(protocol::encode_ack)
        }
        // `auth.mode = "none"`: acked unchecked, so a client written for an
        // authenticating broker works against an open one (CONTRACT §10).
        Ok(Command::Auth { token: _, id }) => id.map(|id| protocol::encode_auth_ack(id, None)),
    };
    match answer {
        Some(text) => reply(outbox, text).await,
        None => true,
    }
}

/// The error for a subscribe or publish the session does not permit
/// (counted, logged rate-limited, never the token).
fn forbidden(
    ctx: &Context,
    id: Option<&serde_json::value::RawValue>,
    op: &str,
    topic: &str,
) -> String {
    ctx.metrics
        .auth_rejected(AuthReason::Forbidden)
        .increment(1);
    crate::auth::log_rejection(ctx.id, ctx.peer, AuthReason::Forbidden.as_str(), op);
    protocol::encode_error(
        id,
        ErrorCode::Forbidden,
        &format!("not permitted to {op} `{topic}`"),
    )
}

/// An `auth` op in mode jwt: the first authenticates, a later one
/// refreshes. Invalid: `unauthorized`, nothing changes; another `sub`:
/// `forbidden`, nothing changes; valid: subscriptions the new grants do not
/// cover are removed (one `unsubscribed` frame each), then the ack with `exp`.
async fn handle_auth(
    token: &str,
    id: Option<&serde_json::value::RawValue>,
    ctx: &Context,
    sub: &Arc<Subscriber>,
    patterns: &mut HashSet<Box<str>>,
    auth: &mut Option<(AuthHandle, Box<Session>)>,
) -> bool {
    let Some((handle, session)) = auth.as_mut() else {
        return true;
    };
    let m = ctx.metrics;
    let authenticator = handle.load_full();
    let identity = match authenticator.verify(token).await {
        Ok(identity) => identity,
        Err(e) => {
            m.auth_rejected(e.reason()).increment(1);
            crate::auth::log_rejection(ctx.id, ctx.peer, e.reason().as_str(), &e.to_string());
            let err = protocol::encode_error(id, ErrorCode::Unauthorized, &e.to_string());
            return reply(&sub.outbox, err).await;
        }
    };
    let outcome = authenticator.refresh(session, identity, patterns.iter().map(|p| p.as_ref()));
    let (exp, removed) = match outcome {
        Ok((exp, removed)) => (
            exp,
            removed
                .into_iter()
                .map(Box::<str>::from)
                .collect::<Vec<_>>(),
        ),
        Err(crate::auth::SubMismatch) => {
            m.auth_rejected(AuthReason::Forbidden).increment(1);
            crate::auth::log_rejection(ctx.id, ctx.peer, "forbidden", "refresh with another sub");
            let err = protocol::encode_error(
                id,
                ErrorCode::Forbidden,
                "a refresh must carry the same `sub` as the connection's token",
            );
            return reply(&sub.outbox, err).await;
        }
    };
    for topic in removed {
        patterns.remove(&topic);
        ctx.broker.unsubscribe(&topic, ctx.id);
        sub.subscriptions.store(patterns.len(), Ordering::Relaxed);
        if !reply(
            &sub.outbox,
            protocol::encode_unsubscribed(&topic, "forbidden"),
        )
        .await
        {
            return false;
        }
    }
    match id {
        Some(id) => reply(&sub.outbox, protocol::encode_auth_ack(id, Some(exp))).await,
        None => true,
    }
}

/// Writes one batch of complete frames: gathered into ~16 KiB writes (one
/// TLS record each, one syscall for the lot), flushed once.
async fn write_batch<W>(
    wr: &mut W,
    batch: &mut VecDeque<Queued>,
    buf: &mut Vec<u8>,
    m: &Metrics,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let oldest = batch.iter().find(|q| !q.reply).map(|q| q.enqueued);
    let mut delivered = 0u64;
    let mut bytes = 0u64;
    if let [only] = batch.make_contiguous() {
        // The common case at low rates: no copy at all.
        bytes = protocol::text_payload_len(&only.frame) as u64;
        delivered = u64::from(!only.reply);
        wr.write_all(&only.frame).await?;
    } else {
        buf.clear();
        for q in batch.iter() {
            bytes += protocol::text_payload_len(&q.frame) as u64;
            delivered += u64::from(!q.reply);
            if !buf.is_empty() && buf.len() + q.frame.len() > WRITE_CHUNK {
                wr.write_all(buf).await?;
                buf.clear();
            }
            if q.frame.len() >= WRITE_CHUNK {
                wr.write_all(&q.frame).await?;
            } else {
                buf.extend_from_slice(&q.frame);
            }
        }
        if !buf.is_empty() {
            wr.write_all(buf).await?;
            buf.clear();
        }
    }
    wr.flush().await?;
    batch.clear();
    m.bytes_sent.increment(bytes);
    if delivered > 0 {
        m.delivered.increment(delivered);
    }
    if let Some(t) = oldest {
        crate::metrics::observe_latency(m, t.elapsed());
    }
    Ok(())
}

/// Writes one control frame and flushes.
async fn write_frame<W: AsyncWrite + Unpin>(wr: &mut W, frame: &[u8]) -> std::io::Result<()> {
    wr.write_all(frame).await?;
    wr.flush().await
}

/// The writer task: everything queued for the connection, pings, and the
/// close handshake; returns why the connection ended.
async fn writer<W>(mut wr: W, conn: Arc<Conn>, outbox: Arc<Outbox>) -> CloseReason
where
    W: AsyncWrite + Unpin,
{
    let (reason, flushed) = write_loop(&mut wr, &conn, &outbox).await;
    conn.stop_reader.set();
    if flushed {
        // close_notify, so TLS clients see a clean end of stream (boxed for
        // the same reason as the goodbye in write_loop).
        Box::pin(goodbye(&outbox, wr.shutdown())).await;
    }
    reason
}

/// Runs until the connection closes; returns why, and whether the goodbye
/// writes went out (false when the peer stopped reading or the grace ended:
/// then nothing more is worth writing). The caller stops the reader.
async fn write_loop<W>(wr: &mut W, conn: &Conn, outbox: &Outbox) -> (CloseReason, bool)
where
    W: AsyncWrite + Unpin,
{
    let ctx = &conn.ctx;
    let m = ctx.metrics;
    let mut batch: VecDeque<Queued> = VecDeque::new();
    let mut buf: Vec<u8> = Vec::new();
    let ping_bytes = protocol::ping_frame();
    let ping_every = ctx.settings.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let request = loop {
        tokio::select! {
            biased;
            _ = outbox.ready() => {
                if let Some(request) = outbox.take(&mut batch) {
                    break request;
                }
                if batch.is_empty() {
                    continue;
                }
                // Biased: the write usually completes at once, and then the
                // close token is never polled.
                let written = tokio::select! {
                    biased;
                    r = write_batch(wr, &mut batch, &mut buf, m) => r,
                    _ = outbox.closing() => Ok(()),
                };
                batch.clear();
                if let Err(e) = written {
                    // No span on the writer task (entering one on every poll
                    // cost ~1.5% of fan-out CPU): name the connection here.
                    debug!(id = ctx.id, peer = %ctx.peer, error = %e, "write failed");
                    outbox.close(CloseRequest::peer_closed(CloseReason::Error));
                }
            }
            _ = ping.tick() => {
                let sent = tokio::select! {
                    biased;
                    r = write_frame(wr, &ping_bytes) => r,
                    _ = outbox.closing() => Ok(()),
                };
                if let Err(e) = sent {
                    debug!(id = ctx.id, peer = %ctx.peer, error = %e, "ping failed");
                    outbox.close(CloseRequest::peer_closed(CloseReason::Error));
                }
            }
        }
    };
    if outbox.is_aborted() {
        // The shutdown grace is over: no goodbyes.
        return (request.label, false);
    }
    // Boxed: the goodbye runs once per connection, and inline its state
    // would enlarge every idle connection's writer task by ~300 B.
    let flushed = Box::pin(async {
        // Replies and control frames (the echo of a client's close among
        // them) still go out first, and on shutdown the queued messages too.
        let mut flushed = true;
        if !batch.is_empty() {
            flushed = goodbye(outbox, write_batch(wr, &mut batch, &mut buf, m)).await;
        }
        batch.clear();
        // A peer that stopped reading (a stalled slow consumer) will neither
        // take the close frame nor answer it: cut now, not after 3 timeouts.
        if flushed && request.code != PEER_CLOSED {
            let frame = protocol::close_frame(request.code, request.reason);
            flushed = goodbye(outbox, write_frame(wr, &frame)).await;
            if flushed {
                // Give the peer a moment to answer the close, then cut.
                goodbye(outbox, conn.reader_done.wait()).await;
            }
        }
        flushed
    })
    .await;
    (request.label, flushed)
}

/// One step of a connection's goodbye, bounded by [`CLOSE_WAIT`] and cut
/// short when the shutdown grace ends ([`Outbox::abort`]), so the daemon
/// exits within `shutdown_grace` even when peers never answer. True when
/// the step finished in time.
async fn goodbye<F: std::future::Future>(outbox: &Outbox, step: F) -> bool {
    tokio::select! {
        biased;
        r = timeout(CLOSE_WAIT, step) => r.is_ok(),
        _ = outbox.aborted() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LoadOptions, Settings};

    fn context() -> Context {
        let settings = Settings::load(&LoadOptions {
            path: None,
            dev: true,
            env: Some(Default::default()),
        })
        .expect("dev settings");
        let metrics = crate::metrics::metrics();
        Context {
            id: 1,
            peer: "127.0.0.1:1".parse().expect("addr"),
            broker: Arc::new(Broker::new(metrics)),
            settings: Arc::new(settings.connection.clone()),
            metrics,
            drain: CancellationToken::new(),
            max_message_size: settings.server.max_message_size,
            auth: None,
        }
    }

    /// Every idle connection pays for this future in its task: it is the
    /// largest part of the per-connection budget (docs/benchmarks.md, idle
    /// memory) after rustls' own buffers. A future that grows past this
    /// (say, by awaiting a big sub-future captured by value) fails here
    /// rather than in a benchmark nobody reruns.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let (stream, _peer) = tokio::io::duplex(64);
        let fut = run(stream, Vec::new(), context(), ());
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1350, "connection future is {size} bytes");
    }

    /// The writer task's future, the other per-connection task.
    #[tokio::test]
    async fn the_writer_future_stays_small() {
        let (stream, _peer) = tokio::io::duplex(64);
        let (_rd, wr) = tokio::io::split(stream);
        let conn = Arc::new(Conn {
            ctx: context(),
            reader_done: Flag::default(),
            stop_reader: Flag::default(),
        });
        let outbox = Arc::new(Outbox::new(QueueLimits {
            capacity: 1,
            max_bytes: 1,
            overflow: crate::config::Overflow::DropOldest,
        }));
        let fut = writer(wr, conn, outbox);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 640, "writer future is {size} bytes");
    }
}
