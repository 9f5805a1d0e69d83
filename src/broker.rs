//! The shared broker state: the topic index of subscriptions and
//! publish / subscribe / unsubscribe. A publish matches the index under a read
//! lock and pushes one shared frame into each matching outbox; it never waits
//! for a subscriber.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::RwLock;

use crate::metrics::Metrics;
use crate::queue::{Outbox, Push};
use crate::topics::TopicIndex;

/// A subscriber as the index stores it.
pub struct Subscriber {
    /// The connection's id (for logs).
    pub id: u64,
    /// Its outbound queue.
    pub outbox: Arc<Outbox>,
    /// Peer address (for slow-consumer logs).
    pub peer: std::net::SocketAddr,
    /// How many subscriptions the connection holds (for slow-consumer logs).
    pub subscriptions: std::sync::atomic::AtomicUsize,
}

impl Subscriber {
    fn subscription_count(&self) -> usize {
        self.subscriptions
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Result of one publish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fanout {
    /// Connections the message was queued to.
    pub delivered: usize,
    /// Messages dropped (oldest or newest) because a queue was full.
    pub dropped: usize,
    /// Connections disconnected as slow consumers.
    pub disconnected: usize,
}

/// A change in the set of distinct subscribed patterns, reported to the
/// cluster (CONTRACT §11: one NATS subscription per distinct pattern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// The pattern got its first subscriber.
    Added(Box<str>),
    /// The pattern's last subscriber left.
    Removed(Box<str>),
}

/// The cluster's hooks into the broker, set once when the cluster starts.
struct ClusterHooks {
    interest: tokio::sync::mpsc::UnboundedSender<Interest>,
    forward: crate::cluster::Forwarder,
}

/// Subscriptions and message routing.
pub struct Broker {
    /// Unset on a single node: then no cluster code runs on any path.
    cluster: std::sync::OnceLock<ClusterHooks>,
    index: RwLock<TopicIndex<Arc<Subscriber>>>,
    /// Every open connection, for inspection (queue occupancy) and drain.
    registry: parking_lot::Mutex<std::collections::HashMap<u64, Arc<Subscriber>>>,
    metrics: &'static Metrics,
    drop_log: crate::logging::RateLimit,
    /// Its own limit, so a storm of drops never hides a disconnect.
    disconnect_log: crate::logging::RateLimit,
}

impl Broker {
    /// An empty broker reporting into `metrics`.
    pub fn new(metrics: &'static Metrics) -> Self {
        Broker {
            cluster: std::sync::OnceLock::new(),
            index: RwLock::new(TopicIndex::new()),
            registry: parking_lot::Mutex::new(std::collections::HashMap::new()),
            metrics,
            drop_log: crate::logging::RateLimit::new(std::time::Duration::from_secs(1)),
            disconnect_log: crate::logging::RateLimit::new(std::time::Duration::from_secs(1)),
        }
    }

    /// Connects the cluster: from now on pattern changes are sent to
    /// `interest` (in index order, under the index lock) and every publish
    /// is also handed to `forward`. False when a cluster was attached already.
    pub fn attach_cluster(
        &self,
        interest: tokio::sync::mpsc::UnboundedSender<Interest>,
        forward: crate::cluster::Forwarder,
    ) -> bool {
        let index = self.index.read();
        // Patterns subscribed before the cluster started are reported first.
        let mut patterns = Vec::new();
        index.for_each_pattern(|p| patterns.push(Box::<str>::from(p)));
        let attached = self
            .cluster
            .set(ClusterHooks {
                interest: interest.clone(),
                forward,
            })
            .is_ok();
        if attached {
            for p in patterns {
                let _ = interest.send(Interest::Added(p));
            }
        }
        attached
    }

    /// Tells the cluster (if any) about a pattern's first or last subscriber.
    fn interest(&self, change: impl FnOnce() -> Interest) {
        if let Some(hooks) = self.cluster.get() {
            // Err only when the cluster task has ended (shutdown).
            let _ = hooks.interest.send(change());
        }
    }

    /// Records an open connection.
    pub fn register(&self, sub: &Arc<Subscriber>) {
        self.registry.lock().insert(sub.id, sub.clone());
    }

    /// Forgets a closed connection.
    pub fn deregister(&self, id: u64) {
        self.registry.lock().remove(&id);
    }

    /// Every open connection.
    pub fn subscribers(&self) -> Vec<Arc<Subscriber>> {
        self.registry.lock().values().cloned().collect()
    }

    /// The outbox occupancy of every open connection, by id.
    pub fn occupancies(&self) -> Vec<(u64, crate::queue::Occupancy)> {
        let subs: Vec<Arc<Subscriber>> = self.registry.lock().values().cloned().collect();
        subs.iter().map(|s| (s.id, s.outbox.occupancy())).collect()
    }

    /// Adds `sub` to `pattern`; false when it was already subscribed.
    pub fn subscribe(&self, pattern: &str, sub: &Arc<Subscriber>) -> bool {
        let (added, patterns) = {
            let mut index = self.index.write();
            let before = index.pattern_count();
            let added = index.insert(pattern, sub.id, sub.clone());
            if index.pattern_count() > before {
                self.interest(|| Interest::Added(pattern.into()));
            }
            (added, index.pattern_count())
        };
        if added {
            self.metrics.subscriptions_active.increment(1.0);
            self.metrics.topics_active.set(patterns as f64);
        }
        added
    }

    /// Removes connection `id` from `pattern`; false when it was not subscribed.
    pub fn unsubscribe(&self, pattern: &str, id: u64) -> bool {
        let (removed, patterns) = {
            let mut index = self.index.write();
            let before = index.pattern_count();
            let removed = index.remove(pattern, id);
            if index.pattern_count() < before {
                self.interest(|| Interest::Removed(pattern.into()));
            }
            (removed, index.pattern_count())
        };
        if removed {
            self.metrics.subscriptions_active.decrement(1.0);
            self.metrics.topics_active.set(patterns as f64);
        }
        removed
    }

    /// Removes all of a departing connection's subscriptions in one lock.
    pub fn unsubscribe_all<'a>(&self, patterns: impl IntoIterator<Item = &'a str>, id: u64) {
        let (removed, count) = {
            let mut index = self.index.write();
            let removed = patterns
                .into_iter()
                .filter(|p| {
                    let before = index.pattern_count();
                    let removed = index.remove(p, id);
                    if index.pattern_count() < before {
                        self.interest(|| Interest::Removed((*p).into()));
                    }
                    removed
                })
                .count();
            (removed, index.pattern_count())
        };
        if removed > 0 {
            self.metrics.subscriptions_active.decrement(removed as f64);
            self.metrics.topics_active.set(count as f64);
        }
    }

    /// Queues `frame` (built by `protocol::message_frame`) to every
    /// connection subscribed to `topic`, and hands it to the cluster when
    /// there is one (CONTRACT §11: local subscribers never wait for NATS).
    pub fn publish(&self, topic: &str, frame: &Bytes) -> Fanout {
        let fanout = self.fan_out(topic, frame);
        if let Some(hooks) = self.cluster.get() {
            hooks.forward.forward(topic, frame);
        }
        fanout
    }

    /// Queues a message that came from NATS to this node's subscribers only.
    pub fn deliver_remote(&self, topic: &str, frame: &Bytes) -> Fanout {
        self.fan_out(topic, frame)
    }

    /// Queues `frame` to every connection subscribed to `topic`.
    fn fan_out(&self, topic: &str, frame: &Bytes) -> Fanout {
        let now = Instant::now();
        let mut fanout = Fanout::default();
        {
            let index = self.index.read();
            index.for_each_match(topic, |_, sub| match sub.outbox.push(frame, now) {
                Push::Queued => fanout.delivered += 1,
                Push::DroppedOldest => {
                    fanout.delivered += 1;
                    fanout.dropped += 1;
                    self.log_drop(sub);
                }
                Push::DroppedNewest => {
                    fanout.dropped += 1;
                    self.log_drop(sub);
                }
                Push::Disconnect => {
                    fanout.dropped += 1;
                    fanout.disconnected += 1;
                    if let Some(suppressed) = self.disconnect_log.allow() {
                        tracing::warn!(
                            conn = sub.id,
                            peer = %sub.peer,
                            subscriptions = sub.subscription_count(),
                            suppressed,
                            "slow consumer: outbound queue full, disconnecting"
                        );
                    }
                }
                Push::Closed => {}
            });
        }
        if fanout.dropped > 0 {
            self.metrics
                .dropped_queue_full
                .increment(fanout.dropped as u64);
        }
        fanout
    }

    fn log_drop(&self, sub: &Subscriber) {
        if let Some(suppressed) = self.drop_log.allow() {
            let occ = sub.outbox.occupancy();
            tracing::warn!(
                conn = sub.id,
                peer = %sub.peer,
                subscriptions = sub.subscription_count(),
                queued = occ.messages,
                queued_bytes = occ.bytes,
                suppressed,
                "slow consumer: outbound queue full, dropping messages"
            );
        }
    }

    /// Distinct subscribed patterns.
    pub fn pattern_count(&self) -> usize {
        self.index.read().pattern_count()
    }

    /// Total subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.index.read().subscription_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overflow;
    use crate::queue::QueueLimits;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// Collects what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn subscriber(id: u64, overflow: Overflow) -> Arc<Subscriber> {
        Arc::new(Subscriber {
            id,
            outbox: Arc::new(Outbox::new(QueueLimits {
                capacity: 1,
                max_bytes: 1 << 20,
                overflow,
            })),
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 40_000 + id as u16)),
            subscriptions: AtomicUsize::new(2),
        })
    }

    /// CONTRACT §5: drops and slow-consumer disconnects are logged with the
    /// connection's id, peer address and subscription count, rate-limited.
    #[test]
    fn slow_consumer_logs_name_the_connection_and_are_rate_limited() {
        let capture = Capture::default();
        let writer = capture.clone();
        let logger = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let broker = Broker::new(crate::metrics::metrics());
        let dropping = subscriber(7, Overflow::DropOldest);
        broker.subscribe("t", &dropping);
        let cut: Vec<_> = (100..150)
            .map(|id| subscriber(id, Overflow::Disconnect))
            .collect();
        for sub in &cut {
            broker.subscribe("t", sub);
        }
        let frame = Bytes::from_static(b"frame");
        let (mut dropped, mut disconnected) = (0, 0);
        tracing::subscriber::with_default(logger, || {
            for _ in 0..100 {
                let f = broker.publish("t", &frame);
                dropped += f.dropped;
                disconnected += f.disconnected;
            }
        });
        assert_eq!(disconnected, 50, "each full Disconnect queue is cut once");
        assert!(dropped >= 99 + 50, "dropped {dropped}");
        let text = String::from_utf8(capture.0.lock().expect("capture").clone()).expect("utf-8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json log line"))
            .collect();
        let with = |msg: &str| -> Vec<&serde_json::Value> {
            lines
                .iter()
                .filter(|l| {
                    l["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.ends_with(msg))
                })
                .collect()
        };
        // Within one second, one line each, however many events.
        let drops = with("dropping messages");
        assert_eq!(drops.len(), 1, "{text}");
        assert_eq!(drops[0]["fields"]["conn"], 7);
        assert_eq!(drops[0]["fields"]["peer"], "127.0.0.1:40007");
        assert_eq!(drops[0]["fields"]["subscriptions"], 2);
        let cuts = with("disconnecting");
        assert_eq!(cuts.len(), 1, "{text}");
        assert_eq!(cuts[0]["fields"]["conn"], 100);
        assert_eq!(cuts[0]["fields"]["peer"], "127.0.0.1:40100");
        assert_eq!(cuts[0]["fields"]["subscriptions"], 2);
        assert_eq!(cuts[0]["fields"]["suppressed"], 0);
    }
}
