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
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use crate::broker::{Broker, Subscriber};
use crate::config::ConnectionSettings;
use crate::metrics::{CloseReason, Metrics};
use crate::protocol::{self, Command, ErrorCode};
use crate::queue::{CloseRequest, Outbox, QueueLimits, Queued};

/// WebSocket read buffer per connection: enough for typical commands without
/// the 128 KiB library default (and its per-read memset). Larger messages
/// grow it on demand; this is what every idle connection pays.
pub const READ_BUFFER: usize = 1024;
/// Write buffer target: about one TLS record, so batches go out in full records.
pub const WRITE_BUFFER: usize = 16 * 1024;
/// Longest wait for a peer's close reply (or for a stuck write) after we close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// tungstenite settings for a server connection.
pub fn ws_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + max_message_size + 1024)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
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
}

fn close_request(code: u16, reason: &'static str, label: CloseReason) -> CloseRequest {
    CloseRequest {
        code,
        reason,
        label,
    }
}

/// The peer started the close (or vanished): finish the handshake, nothing more.
const PEER_CLOSED: u16 = 0;

/// Runs a connection to its end. The writer is a task of its own, so a
/// publish wakes only the writer (not the reader) of each subscriber.
///
/// Not an `async fn`: the stream is split (moved to the heap) before the
/// future is built, so the long-lived future does not reserve room for it.
pub fn run<S>(ws: WebSocketStream<S>, ctx: Context) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("conn", id = ctx.id, peer = %ctx.peer);
    let ctx = Arc::new(ctx);
    let (sink, stream) = ws.split();
    async move {
        let (mut sink, mut stream) = (sink, stream);
        let m = ctx.metrics;
        m.connections_opened.increment(1);
        m.connections_active.increment(1.0);
        info!("connection opened");
        let outbox = Arc::new(Outbox::new(QueueLimits {
            capacity: ctx.settings.queue_capacity,
            max_bytes: ctx.settings.queue_max_bytes,
            overflow: ctx.settings.overflow,
        }));
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
        let reader_done = CancellationToken::new();
        let stop_reader = CancellationToken::new();
        let writer = {
            let ctx = ctx.clone();
            let reader_done = reader_done.clone();
            let stop_reader = stop_reader.clone();
            tokio::spawn(
                async move {
                    let reason =
                        write_loop(&mut sink, &ctx, &outbox, &reader_done, &stop_reader).await;
                    stop_reader.cancel();
                    (sink, reason)
                }
                .in_current_span(),
            )
        };
        let mut patterns: HashSet<Box<str>> = HashSet::new();
        read_loop(&mut stream, &ctx, &sub, &mut patterns, &stop_reader).await;
        reader_done.cancel();
        ctx.broker
            .unsubscribe_all(patterns.iter().map(|p| p.as_ref()), ctx.id);
        ctx.broker.deregister(ctx.id);
        let reason = match writer.await {
            Ok((sink, reason)) => {
                let aborted = sub.outbox.is_aborted();
                if let (false, Ok(ws)) = (aborted, sink.reunite(stream)) {
                    // close_notify, so TLS clients see a clean end of stream.
                    // Boxed so the connection's future keeps no room for it.
                    let close = Box::pin(async move {
                        let mut ws = ws;
                        let _ = timeout(CLOSE_WAIT, ws.get_mut().shutdown()).await;
                    });
                    close.await;
                }
                reason
            }
            Err(_) => CloseReason::Error,
        };
        m.connections_active.decrement(1.0);
        m.closed(reason).increment(1);
        info!(reason = reason.as_str(), "connection closed");
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

    fn check(&mut self) -> Rate {
        if self.rate == 0.0 {
            return Rate::Ok;
        }
        let now = Instant::now();
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
    outbox.reply(Utf8Bytes::from(text)).await
}

async fn read_loop<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    ctx: &Context,
    sub: &Arc<Subscriber>,
    patterns: &mut HashSet<Box<str>>,
    stop: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let m = ctx.metrics;
    let outbox = &sub.outbox;
    let idle_timeout = ctx.settings.idle_timeout;
    let mut idle = pin!(sleep(idle_timeout));
    let mut rate = RateLimiter::new(ctx.settings.max_inbound_rate);
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = &mut idle, if !outbox.is_closing() => {
                debug!("idle timeout");
                outbox.close(close_request(1001, "idle timeout", CloseReason::IdleTimeout));
                continue;
            }
            next = stream.next() => next,
        };
        let msg = match next {
            Some(Ok(msg)) => msg,
            None => {
                outbox.close(close_request(PEER_CLOSED, "", CloseReason::Client));
                return;
            }
            Some(Err(e)) => {
                let request = match &e {
                    WsError::Utf8(_) => close_request(1007, "invalid UTF-8", CloseReason::Error),
                    WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                        close_request(1009, "message too big", CloseReason::Error)
                    }
                    WsError::Capacity(_) => close_request(1009, "too big", CloseReason::Error),
                    WsError::Protocol(_) => {
                        close_request(1002, "protocol error", CloseReason::Error)
                    }
                    WsError::ConnectionClosed | WsError::AlreadyClosed => {
                        close_request(PEER_CLOSED, "", CloseReason::Client)
                    }
                    _ => close_request(PEER_CLOSED, "", CloseReason::Error),
                };
                debug!(error = %e, "read error");
                outbox.close(request);
                return;
            }
        };
        idle.as_mut().reset(Instant::now() + idle_timeout);
        if outbox.is_closing() {
            // Waiting for the peer's close reply; discard anything else.
            if let Message::Close(_) = msg {
                return;
            }
            continue;
        }
        if matches!(msg, Message::Close(_)) {
            outbox.close(close_request(PEER_CLOSED, "", CloseReason::Client));
            return;
        }
        match rate.check() {
            Rate::Ok => {}
            Rate::Excess => {
                if matches!(msg, Message::Text(_) | Message::Binary(_))
                    && !reply(
                        outbox,
                        protocol::encode_error(
                            None,
                            ErrorCode::Limit,
                            "inbound rate limit exceeded",
                        ),
                    )
                    .await
                {
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
                if !handle_text(text.as_str(), ctx, sub, patterns).await {
                    return;
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

/// Handles one command; false when the connection is closing.
async fn handle_text(
    text: &str,
    ctx: &Context,
    sub: &Arc<Subscriber>,
    patterns: &mut HashSet<Box<str>>,
) -> bool {
    let outbox = &sub.outbox;
    let answer = match protocol::parse_command(text) {
        Err(rejection) => Some(protocol::encode_error(
            rejection.id,
            rejection.code,
            &rejection.message,
        )),
        Ok(Command::Publish { topic, data, id }) => {
            let frame = Utf8Bytes::from(protocol::encode_message(&topic, data.get()));
            ctx.broker.publish(&topic, &frame);
            ctx.metrics.published_ws.increment(1);
            id.map(protocol::encode_ack)
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
    };
    match answer {
        Some(text) => reply(outbox, text).await,
        None => true,
    }
}

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Writes one batch: feed every frame, flush once.
async fn write_batch<S>(
    sink: &mut Sink<S>,
    batch: &mut VecDeque<Queued>,
    m: &Metrics,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let oldest = batch.iter().find(|q| !q.reply).map(|q| q.enqueued);
    let mut delivered = 0u64;
    let mut bytes = 0u64;
    for q in batch.drain(..) {
        bytes += q.frame.len() as u64;
        delivered += u64::from(!q.reply);
        sink.feed(Message::Text(q.frame)).await?;
    }
    sink.flush().await?;
    m.bytes_sent.increment(bytes);
    if delivered > 0 {
        m.delivered.increment(delivered);
    }
    if let Some(t) = oldest {
        crate::metrics::observe_latency(m, t.elapsed());
    }
    Ok(())
}

async fn write_loop<S>(
    sink: &mut Sink<S>,
    ctx: &Context,
    outbox: &Outbox,
    reader_done: &CancellationToken,
    stop_reader: &CancellationToken,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let m = ctx.metrics;
    let mut batch: VecDeque<Queued> = VecDeque::new();
    let ping_every = ctx.settings.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let closing = outbox.closing_token();
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
                    r = write_batch(sink, &mut batch, m) => r,
                    _ = closing.cancelled() => Ok(()),
                };
                batch.clear();
                if let Err(e) = written {
                    debug!(error = %e, "write failed");
                    outbox.close(close_request(PEER_CLOSED, "", CloseReason::Error));
                }
            }
            _ = ping.tick() => {
                let sent = tokio::select! {
                    biased;
                    r = sink.send(Message::Ping(Bytes::new())) => r,
                    _ = closing.cancelled() => Ok(()),
                };
                if let Err(e) = sent {
                    debug!(error = %e, "ping failed");
                    outbox.close(close_request(PEER_CLOSED, "", CloseReason::Error));
                }
            }
        }
    };
    if outbox.is_aborted() {
        // The shutdown grace is over: no goodbyes.
        stop_reader.cancel();
        return request.label;
    }
    // Replies (and, on shutdown, queued messages) still go out first.
    if !batch.is_empty() && request.code != PEER_CLOSED {
        let _ = timeout(CLOSE_WAIT, write_batch(sink, &mut batch, m)).await;
    }
    batch.clear();
    if request.code == PEER_CLOSED {
        // Completes a close the peer started (tungstenite queued the echo).
        let _ = timeout(CLOSE_WAIT, sink.close()).await;
    } else {
        let frame = CloseFrame {
            code: CloseCode::from(request.code),
            reason: Utf8Bytes::from_static(request.reason),
        };
        let _ = timeout(CLOSE_WAIT, sink.send(Message::Close(Some(frame)))).await;
        // Give the peer a moment to answer the close, then cut.
        let _ = timeout(CLOSE_WAIT, reader_done.cancelled()).await;
    }
    stop_reader.cancel();
    request.label
}
