//! In-process benchmarks of the hot path: topic match with many
//! subscriptions, message encoding, and outbox push/take.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wsbroker::config::Overflow;
use wsbroker::protocol;
use wsbroker::queue::{Outbox, QueueLimits};
use wsbroker::topics::TopicIndex;

fn index_with(subscriptions: usize) -> TopicIndex<u64> {
    let mut index = TopicIndex::new();
    for i in 0..subscriptions {
        // Mostly distinct concrete topics plus some wildcard patterns.
        let pattern = match i % 10 {
            0 => format!("bench.t{}.*", i / 10),
            1 => format!("bench.t{}.>", i / 10),
            _ => format!("bench.t{}.x", i),
        };
        index.insert(&pattern, i as u64, i as u64);
    }
    index.insert("bench.>", u64::MAX, 0);
    index
}

fn topic_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_match");
    for subs in [1_000usize, 10_000, 100_000] {
        let index = index_with(subs);
        group.bench_with_input(BenchmarkId::from_parameter(subs), &index, |b, index| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 7919) % subs;
                let topic = format!("bench.t{i}.x");
                let mut n = 0u64;
                index.for_each_match(&topic, |id, _| n = n.wrapping_add(id));
                black_box(n)
            })
        });
    }
    group.finish();
}

fn fanout_encode(c: &mut Criterion) {
    let data = format!("\"{}\"", "x".repeat(62));
    let text = format!(r#"{{"op":"publish","topic":"chat.room1","data":{data},"id":1}}"#);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_and_encode_publish", |b| {
        b.iter(|| match protocol::parse_command(black_box(&text)) {
            Ok(protocol::Command::Publish { topic, data, .. }) => {
                black_box(protocol::message_frame(&topic, data.get()))
            }
            _ => unreachable!("valid publish"),
        })
    });
    group.finish();
}

fn queue_push_take(c: &mut Criterion) {
    let frame = protocol::message_frame(
        "chat.room1",
        "\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab\"",
    );
    let mut group = c.benchmark_group("outbox");
    group.throughput(Throughput::Elements(64));
    group.bench_function("push64_take", |b| {
        let outbox = Outbox::new(QueueLimits {
            capacity: 1024,
            max_bytes: 1 << 20,
            overflow: Overflow::DropOldest,
        });
        let mut out = VecDeque::new();
        b.iter(|| {
            let now = Instant::now();
            for _ in 0..64 {
                black_box(outbox.push(&frame, now));
            }
            outbox.take(&mut out);
            out.clear();
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("push_drop_oldest_full", |b| {
        let outbox = Outbox::new(QueueLimits {
            capacity: 1024,
            max_bytes: 1 << 20,
            overflow: Overflow::DropOldest,
        });
        let now = Instant::now();
        for _ in 0..1024 {
            outbox.push(&frame, now);
        }
        b.iter(|| black_box(outbox.push(&frame, now)))
    });
    group.finish();
}

criterion_group!(benches, topic_match, fanout_encode, queue_push_take);
criterion_main!(benches);
