//! The bounded per-connection outbound queue ("outbox") and its overflow
//! policy. Publishers push without ever awaiting; the connection's writer
//! takes everything queued in one swap and writes it as one batch.
//!
//! Replies to the connection's own requests (acks, errors) share the queue so
//! they stay in order with messages, but they are never dropped and do not
//! count against the data bounds; the reader waits when too many are pending
//! (a client that floods requests without reading only slows itself).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::Overflow;

/// A one-way latch: set once, awaited by any number of tasks. Unlike a
/// `CancellationToken` it needs no allocation of its own, which matters at
/// three per connection.
#[derive(Default)]
pub struct Flag {
    set: AtomicBool,
    notify: Notify,
}

impl Flag {
    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        if !self.set.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    /// True once set.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Completes once the flag is set.
    pub async fn wait(&self) {
        loop {
            // Created before the check: notify_waiters reaches a Notified
            // from its creation on, so a set() in between is not missed.
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

/// Replies pending before the reader waits for the writer.
pub const MAX_PENDING_REPLIES: usize = 256;

/// Bounds of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most data messages queued.
    pub capacity: usize,
    /// Most data bytes queued (encoded frame length).
    pub max_bytes: usize,
    /// What to do when a push would exceed either bound.
    pub overflow: Overflow,
}

/// One queued frame.
#[derive(Debug, Clone)]
pub struct Queued {
    /// A complete WebSocket frame (header + payload); a message's frame is
    /// shared between all its subscribers.
    pub frame: Bytes,
    /// When the publish was accepted (for the delivery latency histogram).
    pub enqueued: Instant,
    /// Replies and control frames are never dropped.
    pub reply: bool,
}

impl CloseRequest {
    /// The graceful close of a server shutdown (queued messages are still sent).
    pub fn shutdown() -> Self {
        CloseRequest {
            code: 1001,
            reason: "server shutting down",
            label: crate::metrics::CloseReason::Shutdown,
        }
    }

    /// The peer closed (or vanished): finish the handshake, send no Close
    /// of our own; `label` is the reason it is counted under.
    pub fn peer_closed(label: crate::metrics::CloseReason) -> Self {
        CloseRequest {
            code: PEER_CLOSED,
            reason: "",
            label,
        }
    }
}

/// Outcome of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued without loss.
    Queued,
    /// Queued, and one older message was dropped for it.
    DroppedOldest,
    /// The new message was dropped.
    DroppedNewest,
    /// The queue overflowed under `disconnect`: the connection is being closed.
    Disconnect,
    /// The connection is closing; nothing was queued.
    Closed,
}

/// The close code of a [`CloseRequest`] for a connection the peer closed (or
/// lost): the writer sends no Close of its own.
pub const PEER_CLOSED: u16 = 0;

/// Why the writer should close the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason text.
    pub reason: &'static str,
    /// The metrics reason label.
    pub label: crate::metrics::CloseReason,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Queued>,
    data_len: usize,
    data_bytes: usize,
    replies: usize,
    /// Control frames sit at the front, in arrival order: this many.
    controls: usize,
    close: Option<CloseRequest>,
}

/// A connection's outbound queue.
pub struct Outbox {
    inner: Mutex<Inner>,
    writer: Notify,
    reply_space: Notify,
    closing: Flag,
    aborted: Flag,
    limits: QueueLimits,
}

/// Occupancy snapshot, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    /// Data messages queued.
    pub messages: usize,
    /// Data bytes queued.
    pub bytes: usize,
    /// Replies queued.
    pub replies: usize,
}

impl Outbox {
    /// An empty outbox with these bounds.
    pub fn new(limits: QueueLimits) -> Self {
        Outbox {
            inner: Mutex::new(Inner::default()),
            writer: Notify::new(),
            reply_space: Notify::new(),
            closing: Flag::default(),
            aborted: Flag::default(),
            limits,
        }
    }

    /// Queues a published message, applying the overflow policy. Never waits.
    pub fn push(&self, frame: &Bytes, enqueued: Instant) -> Push {
        let len = frame.len();
        let mut inner = self.inner.lock();
        if inner.close.is_some() {
            return Push::Closed;
        }
        // A lone message always fits, so a message larger than the byte
        // budget (up to max_message_size) is still delivered to a reader
        // that keeps up; the bound is then one message.
        let full = |i: &Inner| {
            i.data_len >= self.limits.capacity
                || (i.data_len > 0 && i.data_bytes + len > self.limits.max_bytes)
        };
        let mut outcome = Push::Queued;
        if full(&inner) {
            match self.limits.overflow {
                Overflow::DropNewest => return Push::DroppedNewest,
                Overflow::Disconnect => {
                    inner.close = Some(CloseRequest {
                        code: 1008,
                        reason: "slow consumer",
                        label: crate::metrics::CloseReason::SlowConsumer,
                    });
                    self.closing.set();
                    // The queued data will never be written: free it now.
                    inner.queue.retain(|q| q.reply);
                    inner.data_len = 0;
                    inner.data_bytes = 0;
                    drop(inner);
                    self.writer.notify_one();
                    return Push::Disconnect;
                }
                Overflow::DropOldest => {
                    while full(&inner) {
                        match inner.queue.iter().position(|q| !q.reply) {
                            Some(pos) => {
                                if let Some(old) = inner.queue.remove(pos) {
                                    inner.data_len -= 1;
                                    inner.data_bytes -= old.frame.len();
                                }
                            }
                            // Larger than the whole byte budget on its own.
                            None => return Push::DroppedNewest,
                        }
                    }
                    outcome = Push::DroppedOldest;
                }
            }
        }
        let was_empty = inner.queue.is_empty();
        inner.queue.push_back(Queued {
            frame: frame.clone(),
            enqueued,
            reply: false,
        });
        inner.data_len += 1;
        inner.data_bytes += len;
        drop(inner);
        // The writer takes everything at once, so it needs waking only when
        // the queue goes from empty to non-empty.
        if was_empty {
            self.writer.notify_one();
        }
        outcome
    }

    /// Queues a reply (ack or error) in order with messages unless too many
    /// are pending: `Ok(true)` queued, `Ok(false)` the connection is
    /// closing, `Err(frame)` no room yet (then [`Outbox::reply`] waits).
    pub fn try_reply(&self, frame: Bytes) -> Result<bool, Bytes> {
        let mut inner = self.inner.lock();
        if inner.close.is_some() {
            return Ok(false);
        }
        if inner.replies >= MAX_PENDING_REPLIES {
            return Err(frame);
        }
        let was_empty = inner.queue.is_empty();
        inner.queue.push_back(Queued {
            frame,
            enqueued: Instant::now(),
            reply: true,
        });
        inner.replies += 1;
        drop(inner);
        if was_empty {
            self.writer.notify_one();
        }
        Ok(true)
    }

    /// Queues a reply (ack or error) in order with messages; waits while too
    /// many replies are pending. Returns false when the connection is closing.
    pub async fn reply(&self, mut frame: Bytes) -> bool {
        loop {
            // Registered before the attempt, so a take() in between is seen.
            let wait = self.reply_space.notified();
            match self.try_reply(frame) {
                Ok(queued) => return queued,
                Err(back) => frame = back,
            }
            wait.await;
        }
    }

    /// Queues a control frame (a Pong) ahead of all data;
    /// never waits and never drops. Control frames only come from the peer's
    /// own frames, which the inbound rate limit bounds.
    pub fn control(&self, frame: Bytes) {
        let mut inner = self.inner.lock();
        let was_empty = inner.queue.is_empty();
        let at = inner.controls;
        inner.queue.insert(
            at,
            Queued {
                frame,
                enqueued: Instant::now(),
                reply: true,
            },
        );
        inner.controls += 1;
        drop(inner);
        if was_empty {
            self.writer.notify_one();
        }
    }

    /// Queues the echo of the peer's Close behind every reply already
    /// queued (they answer requests the peer sent before its Close) and
    /// closes the outbox, so no frame follows the echo (RFC 6455 §5.5.1).
    /// Queued messages are abandoned. Ignored once the connection is
    /// closing: our own Close is then the last frame.
    pub fn close_echo(&self, frame: Bytes) {
        let mut inner = self.inner.lock();
        if inner.close.is_some() {
            return;
        }
        inner.queue.push_back(Queued {
            frame,
            enqueued: Instant::now(),
            reply: true,
        });
        inner.close = Some(CloseRequest::peer_closed(
            crate::metrics::CloseReason::Client,
        ));
        self.closing.set();
        drop(inner);
        self.writer.notify_one();
        self.reply_space.notify_waiters();
    }

    /// Moves everything queued into `out` (which must be empty) and returns
    /// the close request, if any. Called by the writer only.
    pub fn take(&self, out: &mut VecDeque<Queued>) -> Option<CloseRequest> {
        let mut inner = self.inner.lock();
        if let Some(close) = inner.close.clone() {
            // Replies still go out before the close frame (the client learns
            // which of its requests were accepted); so does queued data on a
            // graceful shutdown. Otherwise data is abandoned.
            let keep_data = close.label == crate::metrics::CloseReason::Shutdown;
            out.extend(inner.queue.drain(..).filter(|q| q.reply || keep_data));
            inner.controls = 0;
            inner.data_len = 0;
            inner.data_bytes = 0;
            inner.replies = 0;
            return Some(close);
        }
        std::mem::swap(&mut inner.queue, out);
        inner.controls = 0;
        let had_replies = inner.replies > 0;
        inner.data_len = 0;
        inner.data_bytes = 0;
        inner.replies = 0;
        drop(inner);
        if had_replies {
            self.reply_space.notify_waiters();
        }
        None
    }

    /// Waits until there is something to take (or a close request).
    pub async fn ready(&self) {
        self.writer.notified().await
    }

    /// Asks the writer to close the connection; the first request wins.
    pub fn close(&self, request: CloseRequest) {
        let mut inner = self.inner.lock();
        if inner.close.is_none() {
            inner.close = Some(request);
            self.closing.set();
        }
        drop(inner);
        self.writer.notify_one();
        self.reply_space.notify_waiters();
    }

    /// Ends the connection without a close handshake (shutdown grace over).
    pub fn abort(&self) {
        self.aborted.set();
        // Sets `closing` too (every close request does).
        self.close(CloseRequest::shutdown());
    }

    /// True after [`Outbox::abort`].
    pub fn is_aborted(&self) -> bool {
        self.aborted.is_set()
    }

    /// Completes once [`Outbox::abort`] was called: ends the goodbyes (the
    /// last writes, the wait for a close reply) at the end of the grace.
    pub async fn aborted(&self) {
        self.aborted.wait().await
    }

    /// True once a close was requested.
    pub fn is_closing(&self) -> bool {
        self.closing.is_set()
    }

    /// Completes once a close was requested (interrupts a stuck write).
    pub async fn closing(&self) {
        self.closing.wait().await
    }

    /// Current occupancy.
    pub fn occupancy(&self) -> Occupancy {
        let inner = self.inner.lock();
        Occupancy {
            messages: inner.data_len,
            bytes: inner.data_bytes,
            replies: inner.replies,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flag_wakes_waiters_set_before_or_after_they_wait() {
        let flag = std::sync::Arc::new(Flag::default());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let f = flag.clone();
                tokio::spawn(async move { f.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(!flag.is_set());
        flag.set();
        flag.set(); // idempotent
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("woken")
                .expect("joined");
        }
        // Already set: returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), flag.wait())
            .await
            .expect("immediate");
    }

    #[tokio::test]
    async fn close_completes_closing() {
        let o = std::sync::Arc::new(outbox(4, 1024, Overflow::DropOldest));
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.closing().await })
        };
        tokio::task::yield_now().await;
        assert!(!o.is_closing());
        o.close(CloseRequest::shutdown());
        assert!(o.is_closing());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }

    fn frame(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    fn outbox(capacity: usize, max_bytes: usize, overflow: Overflow) -> Outbox {
        Outbox::new(QueueLimits {
            capacity,
            max_bytes,
            overflow,
        })
    }

    fn drain(o: &Outbox) -> Vec<String> {
        let mut out = VecDeque::new();
        assert!(o.take(&mut out).is_none());
        out.into_iter()
            .map(|q| String::from_utf8_lossy(&q.frame).into_owned())
            .collect()
    }

    #[test]
    fn drop_oldest_keeps_the_newest() {
        let o = outbox(3, 1000, Overflow::DropOldest);
        let now = Instant::now();
        for i in 0..5 {
            let r = o.push(&frame(&i.to_string()), now);
            assert_eq!(
                r,
                if i < 3 {
                    Push::Queued
                } else {
                    Push::DroppedOldest
                }
            );
        }
        assert_eq!(drain(&o), vec!["2", "3", "4"]);
    }

    #[test]
    fn drop_newest_keeps_the_oldest() {
        let o = outbox(2, 1000, Overflow::DropNewest);
        let now = Instant::now();
        for i in 0..4 {
            o.push(&frame(&i.to_string()), now);
        }
        assert_eq!(drain(&o), vec!["0", "1"]);
    }

    #[test]
    fn byte_bound_applies() {
        let o = outbox(100, 10, Overflow::DropOldest);
        let now = Instant::now();
        for _ in 0..5 {
            o.push(&frame("abcd"), now);
        }
        let occ = o.occupancy();
        assert_eq!(occ.messages, 2);
        assert!(occ.bytes <= 10);
        // Larger than the whole budget: it replaces everything queued...
        assert_eq!(
            o.push(&frame("this is far too long"), now),
            Push::DroppedOldest
        );
        assert_eq!(o.occupancy().messages, 1);
        // ...and alone it fits.
        let mut out = VecDeque::new();
        assert!(o.take(&mut out).is_none());
        assert_eq!(o.push(&frame("this is far too long"), now), Push::Queued);
    }

    #[test]
    fn disconnect_requests_a_close_and_frees_data() {
        let o = outbox(1, 1000, Overflow::Disconnect);
        let now = Instant::now();
        assert_eq!(o.push(&frame("a"), now), Push::Queued);
        assert_eq!(o.push(&frame("b"), now), Push::Disconnect);
        assert_eq!(o.occupancy().messages, 0);
        assert_eq!(o.push(&frame("c"), now), Push::Closed);
        let mut out = VecDeque::new();
        let close = o.take(&mut out).expect("close requested");
        assert_eq!(close.code, 1008);
        assert_eq!(close.reason, "slow consumer");
    }

    #[test]
    fn control_frames_go_first_in_arrival_order() {
        let o = outbox(10, 1000, Overflow::DropOldest);
        let now = Instant::now();
        o.push(&frame("m1"), now);
        o.control(frame("pong"));
        o.control(frame("pong2"));
        o.push(&frame("m2"), now);
        assert_eq!(drain(&o), vec!["pong", "pong2", "m1", "m2"]);
        o.control(frame("pong3"));
        assert_eq!(drain(&o), vec!["pong3"]);
    }

    /// RFC 6455 §5.5.1: after the echo of the peer's Close nothing may be
    /// sent; the replies the peer asked for before closing still go first.
    #[tokio::test]
    async fn a_close_echo_follows_the_replies_and_ends_the_queue() {
        let o = outbox(10, 1000, Overflow::DropOldest);
        let now = Instant::now();
        assert!(o.reply(frame("ack1")).await);
        o.push(&frame("m1"), now);
        o.control(frame("pong"));
        assert!(o.reply(frame("ack2")).await);
        o.close_echo(frame("close-echo"));
        assert!(o.is_closing());
        // Nothing is queued after the echo.
        assert_eq!(o.push(&frame("m2"), now), Push::Closed);
        assert!(!o.reply(frame("ack3")).await);
        o.close_echo(frame("second echo"));
        let mut out = VecDeque::new();
        let close = o.take(&mut out).expect("closing");
        assert_eq!(close.code, PEER_CLOSED);
        assert_eq!(close.label, crate::metrics::CloseReason::Client);
        let frames: Vec<_> = out.iter().map(|q| q.frame.clone()).collect();
        assert_eq!(
            frames,
            vec![
                frame("pong"),
                frame("ack1"),
                frame("ack2"),
                frame("close-echo")
            ]
        );
    }

    #[tokio::test]
    async fn replies_are_never_dropped_and_stay_in_order() {
        let o = outbox(1, 1000, Overflow::DropOldest);
        let now = Instant::now();
        o.push(&frame("m1"), now);
        assert!(o.reply(frame("ack")).await);
        o.push(&frame("m2"), now);
        assert_eq!(drain(&o), vec!["ack", "m2"]);
    }
}
