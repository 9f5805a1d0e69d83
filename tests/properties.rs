//! Property tests (issue 7): the broker's topic routing against a naive
//! reference, the Origin matcher, and the protocol parser/encoder.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::Value;
use wsbroker::broker::{Broker, Subscriber};
use wsbroker::config::Overflow;
use wsbroker::origin::{Origin, OriginError, OriginPattern, OriginPolicy};
use wsbroker::protocol::{self, Command, ErrorCode};
use wsbroker::queue::{Outbox, QueueLimits, Queued};
use wsbroker::topics::TopicIndex;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Deterministic in CI (fixed seed, no regression files written);
        // set PROPTEST_RNG_SEED to explore other seeds locally.
        failure_persistence: None,
        rng_seed: match std::env::var("PROPTEST_RNG_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            Some(seed) => proptest::test_runner::RngSeed::Fixed(seed),
            None => proptest::test_runner::RngSeed::Fixed(0x5eed_7e57),
        },
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Topics: Broker (and TopicIndex) against a naive matcher.
// ---------------------------------------------------------------------------

/// Reference semantics of CONTRACT §4: `*` one segment, final `>` one or more.
fn naive_match(pattern: &str, topic: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    for (i, seg) in p.iter().enumerate() {
        if *seg == ">" && i + 1 == p.len() {
            return t.len() > i;
        }
        match t.get(i) {
            Some(ts) if *seg == "*" || seg == ts => {}
            _ => return false,
        }
    }
    p.len() == t.len()
}

fn segment() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("a"), Just("b"), Just("c-1"), Just("D_:")]
}

fn topic_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec(segment(), 1..5).prop_map(|s| s.join("."))
}

fn pattern_strategy() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(prop_oneof![3 => segment(), 1 => Just("*")], 0..4),
        any::<bool>(),
    )
        .prop_filter_map("non-empty", |(segs, full)| {
            let mut segs: Vec<&str> = segs;
            if full || segs.is_empty() {
                segs.push(">");
            }
            Some(segs.join("."))
        })
}

#[derive(Debug, Clone)]
enum Op {
    Subscribe(usize, String),
    Unsubscribe(usize, String),
    /// Unsubscribe from a pattern the connection holds (picked by index).
    UnsubscribeHeld(usize, usize),
    Publish(String),
}

const CONNS: usize = 6;

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CONNS, pattern_strategy()).prop_map(|(c, p)| Op::Subscribe(c, p)),
        1 => (0..CONNS, pattern_strategy()).prop_map(|(c, p)| Op::Unsubscribe(c, p)),
        2 => (0..CONNS, any::<usize>()).prop_map(|(c, i)| Op::UnsubscribeHeld(c, i)),
        4 => topic_strategy().prop_map(Op::Publish),
    ]
}

fn subscriber(id: u64) -> Arc<Subscriber> {
    Arc::new(Subscriber {
        id,
        outbox: Arc::new(Outbox::new(QueueLimits {
            capacity: 1024,
            max_bytes: 1 << 20,
            overflow: Overflow::DropOldest,
        })),
        peer: SocketAddr::from(([127, 0, 0, 1], 1000 + id as u16)),
        subscriptions: AtomicUsize::new(0),
    })
}

fn drain(outbox: &Outbox) -> Vec<Queued> {
    let mut batch = VecDeque::new();
    assert!(outbox.take(&mut batch).is_none(), "no close requested");
    batch.into_iter().collect()
}

proptest! {
    #![proptest_config(config(256))]

    /// Random subscribe/unsubscribe/publish sequences through the public
    /// Broker API: each publish reaches exactly the connections with at least
    /// one matching pattern, once each, and the counts agree with the model.
    #[test]
    fn broker_routes_like_the_naive_matcher(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let broker = Broker::new(wsbroker::metrics::metrics());
        let subs: Vec<Arc<Subscriber>> = (0..CONNS as u64).map(subscriber).collect();
        let mut model: Vec<BTreeSet<String>> = vec![BTreeSet::new(); CONNS];
        let mut index: TopicIndex<u64> = TopicIndex::new();
        for (n, op) in ops.iter().enumerate() {
            match op {
                Op::Subscribe(c, p) => {
                    prop_assert!(protocol::validate_topic(p, true).is_ok(), "{p}");
                    let added = broker.subscribe(p, &subs[*c]);
                    prop_assert_eq!(added, model[*c].insert(p.clone()));
                    prop_assert_eq!(index.insert(p, *c as u64, *c as u64), added);
                }
                Op::Unsubscribe(c, p) => {
                    let removed = broker.unsubscribe(p, *c as u64);
                    prop_assert_eq!(removed, model[*c].remove(p));
                    prop_assert_eq!(index.remove(p, *c as u64), removed);
                }
                Op::UnsubscribeHeld(c, i) => {
                    if model[*c].is_empty() {
                        continue;
                    }
                    let p = model[*c].iter().nth(i % model[*c].len()).cloned().expect("held");
                    prop_assert!(broker.unsubscribe(&p, *c as u64));
                    prop_assert!(model[*c].remove(&p));
                    prop_assert!(index.remove(&p, *c as u64));
                }
                Op::Publish(topic) => {
                    prop_assert!(protocol::validate_topic(topic, false).is_ok());
                    let frame = protocol::message_frame(topic, &n.to_string());
                    let fanout = broker.publish(topic, &frame);
                    let expected: BTreeSet<usize> = (0..CONNS)
                        .filter(|&c| model[c].iter().any(|p| naive_match(p, topic)))
                        .collect();
                    let mut got = BTreeSet::new();
                    for (c, sub) in subs.iter().enumerate() {
                        let queued = drain(&sub.outbox);
                        prop_assert!(queued.len() <= 1, "conn {c} got {} copies", queued.len());
                        if let Some(q) = queued.first() {
                            prop_assert_eq!(&q.frame, &frame);
                            got.insert(c);
                        }
                    }
                    prop_assert_eq!(&got, &expected, "topic {}", topic);
                    prop_assert_eq!(fanout.delivered, expected.len());
                    prop_assert_eq!(fanout.dropped, 0);
                    let mut visited = BTreeSet::new();
                    let n_visited = index.for_each_match(topic, |id, v| {
                        assert_eq!(id, *v);
                        assert!(visited.insert(id as usize), "visited {id} twice");
                    });
                    prop_assert_eq!(n_visited, expected.len());
                    prop_assert_eq!(&visited, &expected);
                }
            }
            let total: usize = model.iter().map(BTreeSet::len).sum();
            let distinct: BTreeSet<&String> = model.iter().flatten().collect();
            prop_assert_eq!(broker.subscription_count(), total);
            prop_assert_eq!(broker.pattern_count(), distinct.len());
            prop_assert_eq!(index.subscription_count(), total);
            prop_assert_eq!(index.pattern_count(), distinct.len());
        }
    }

    /// The naive matcher agrees with a regex-free second formulation:
    /// a pattern without wildcards matches only itself.
    #[test]
    fn literal_patterns_match_only_themselves(p in topic_strategy(), t in topic_strategy()) {
        prop_assert_eq!(naive_match(&p, &t), p == t);
        let mut index = TopicIndex::new();
        index.insert(&p, 1, ());
        prop_assert_eq!(index.for_each_match(&t, |_, _| {}), usize::from(p == t));
    }
}

// ---------------------------------------------------------------------------
// Origins.
// ---------------------------------------------------------------------------

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
}

fn domain() -> impl Strategy<Value = String> {
    proptest::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
}

fn random_case(s: &str, mask: u64) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(config(512))]

    /// Parsing and checking never panic, whatever the header or pattern.
    #[test]
    fn origin_matcher_never_panics(header in any::<String>(), pattern in any::<String>(), allow_missing: bool) {
        let _ = Origin::parse(&header);
        let _ = OriginPattern::parse(&pattern);
        let policy = OriginPolicy::new(
            &["https://*.example.com".to_string(), "http://localhost:*".to_string(), "null".to_string()],
            allow_missing,
        )
        .expect("valid policy");
        let _ = policy.check(Some(&header));
        if let Ok(p) = OriginPolicy::new(std::slice::from_ref(&pattern), allow_missing) {
            let _ = p.check(Some(&header));
            let _ = p.check(None);
        }
    }

    /// Headers shaped like origins, with odd bytes spliced in: no panic, and
    /// never allowed unless they are a well-formed subdomain origin.
    #[test]
    fn origin_lookalikes_never_panic(
        prefix in "(https?|wss?|HTTPS|ftp)://",
        host in "[a-zA-Z0-9.\\-_\\[\\]:*%@/?#\\u{0}-\\u{20}\\u{80}-\\u{10ffff}]{0,40}",
    ) {
        let header = format!("{prefix}{host}");
        let policy = OriginPolicy::new(&["https://*.example.com".to_string()], false).expect("policy");
        let allowed = policy.check(Some(&header)).is_ok();
        if allowed {
            let lower = header.to_ascii_lowercase();
            prop_assert!(lower.starts_with("https://"), "{header}");
            let rest = lower.trim_start_matches("https://").trim_end_matches('/');
            let hostpart = rest.strip_suffix(":443").unwrap_or(rest);
            prop_assert!(hostpart.ends_with(".example.com") && hostpart.len() > ".example.com".len(), "{header}");
        }
    }

    /// `https://*.D` matches every subdomain of D (any case, default port
    /// implied) and never D itself, a look-alike, a suffix trick or another
    /// scheme or port.
    #[test]
    fn subdomain_patterns_are_anchored(
        d in domain(),
        sub in domain(),
        evil in label(),
        glue in label(),
        mask: u64,
    ) {
        let policy = OriginPolicy::new(&[format!("https://*.{d}")], false);
        // `*.tw`, `*.co.uk`: refused at load (origin.rs unit tests); the
        // property is about the patterns that load.
        if let Err(OriginError::Entry { error, .. }) = &policy {
            prop_assume!(!matches!(**error, OriginError::PublicSuffix { .. }));
        }
        let policy = policy.expect("policy");
        let ok = |o: String| policy.check(Some(&o)).is_ok();
        let check = ok(format!("https://{sub}.{d}"));
        prop_assert!(check);
        let check = ok(format!("https://{sub}.{d}:443"));
        prop_assert!(check);
        let check = ok(random_case(&format!("https://{sub}.{d}"), mask));
        prop_assert!(check);
        let check = !ok(format!("https://{d}"));
        prop_assert!(check, "bare domain");
        // The "evil" suffix must not itself end in .D (then it is a subdomain).
        prop_assume!(!format!(".{evil}").ends_with(&format!(".{d}")));
        prop_assume!(!format!("{d}.{evil}").ends_with(&format!(".{d}")));
        let check = !ok(format!("https://{glue}{d}"));
        prop_assert!(check, "glued look-alike {glue}{d}");
        let check = !ok(format!("https://{sub}.{d}.{evil}"));
        prop_assert!(check, "suffix trick");
        let check = !ok(format!("https://{d}.{evil}"));
        prop_assert!(check);
        let check = !ok(format!("http://{sub}.{d}"));
        prop_assert!(check, "other scheme");
        let check = !ok(format!("https://{sub}.{d}:8443"));
        prop_assert!(check, "other port");
        let check = !ok(format!("wss://{sub}.{d}"));
        prop_assert!(check);
        prop_assert!(!ok("null".to_string()));
        prop_assert!(policy.check(None).is_err());
    }

    /// Exact patterns: case-insensitive hosts, the scheme's default port.
    #[test]
    fn exact_patterns_imply_the_default_port(h in domain(), mask: u64, port in 1u16..) {
        let policy = OriginPolicy::new(&[format!("https://{h}"), format!("http://{h}:*")], false).expect("policy");
        let ok = |o: String| policy.check(Some(&o)).is_ok();
        let check = ok(format!("https://{h}"));
        prop_assert!(check);
        let check = ok(format!("https://{h}:443"));
        prop_assert!(check);
        let check = ok(random_case(&format!("https://{h}"), mask));
        prop_assert!(check);
        let check = ok(format!("https://{h}:{port}"));
        prop_assert_eq!(check, port == 443);
        let check = ok(format!("http://{h}:{port}"));
        prop_assert!(check);
        let check = ok(format!("http://{h}"));
        prop_assert!(check);
        let check = !ok(format!("https://x{h}"));
        prop_assert!(check);
        let check = !ok(format!("https://{h}x"));
        prop_assert!(check);
    }
}

// ---------------------------------------------------------------------------
// Protocol.
// ---------------------------------------------------------------------------

/// Arbitrary JSON values (strings with any Unicode, nested up to 4 levels).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m: BTreeMap<String, Value>| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn valid_command() -> impl Strategy<Value = String> {
    prop_oneof![
        (pattern_strategy(), any::<u32>())
            .prop_map(|(t, id)| format!(r#"{{"op":"subscribe","topic":"{t}","id":{id}}}"#)),
        pattern_strategy().prop_map(|t| format!(r#"{{"op":"unsubscribe","topic":"{t}"}}"#)),
        (topic_strategy(), json_value())
            .prop_map(|(t, v)| format!(r#"{{"op":"publish","topic":"{t}","data":{v},"id":"x"}}"#)),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Insert(usize, char),
    Replace(usize, char),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just('"'),
        Just('\\'),
        Just('{'),
        Just('}'),
        Just('['),
        Just(','),
        Just(':'),
        Just('\u{0}'),
        Just('\u{feff}'),
        Just('é'),
        any::<char>(),
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), interesting.clone()).prop_map(|(i, c)| Mutation::Insert(i, c)),
        (any::<usize>(), interesting).prop_map(|(i, c)| Mutation::Replace(i, c)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Duplicate(a, b)),
    ]
}

fn mutate(s: &str, m: &[Mutation]) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    for m in m {
        let n = chars.len().max(1);
        match *m {
            Mutation::Delete(i) if !chars.is_empty() => {
                chars.remove(i % n);
            }
            Mutation::Insert(i, c) => chars.insert(i % (chars.len() + 1), c),
            Mutation::Replace(i, c) if !chars.is_empty() => chars[i % n] = c,
            Mutation::Truncate(i) => chars.truncate(i % (chars.len() + 1)),
            Mutation::Duplicate(a, b) if !chars.is_empty() => {
                let (a, b) = (a % n, b % n);
                let (lo, hi) = (a.min(b), a.max(b));
                let piece: Vec<char> = chars[lo..=hi].to_vec();
                chars.splice(hi + 1..hi + 1, piece);
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// Whatever `parse_command` returns must be self-consistent; an error frame
/// built from a rejection must be valid JSON.
fn check_parse(text: &str) -> Result<(), TestCaseError> {
    match protocol::parse_command(text) {
        Ok(Command::Subscribe { topic, .. }) | Ok(Command::Unsubscribe { topic, .. }) => {
            prop_assert!(protocol::validate_topic(&topic, true).is_ok());
        }
        Ok(Command::Publish { topic, data, id }) => {
            prop_assert!(protocol::validate_topic(&topic, false).is_ok());
            let frame = protocol::encode_message(&topic, data.get());
            let v: Result<Value, _> = serde_json::from_str(&frame);
            // Valid JSON, except that serde_json's Value refuses two things the
            // JSON grammar allows and the broker passes through verbatim: a
            // number beyond f64 (1e400) and an unpaired surrogate escape.
            if let Err(e) = &v {
                let e = e.to_string();
                // ("... hex escape": serde_json's words for a lead surrogate not
                // followed by a trail one; the hex digits were already checked.)
                let check = e.contains("number out of range")
                    || e.contains("surrogate")
                    || e.contains("hex escape");
                prop_assert!(check, "{}: {}", e, frame);
            }
            if let Some(id) = id {
                let ack = protocol::encode_ack(id);
                let check = ack.starts_with(r#"{"type":"ack","id":"#);
                prop_assert!(check, "{}", ack);
            }
        }
        Ok(Command::Auth { id, .. }) => {
            if let Some(id) = id {
                let ack = protocol::encode_auth_ack(id, Some(1));
                let check =
                    ack.starts_with(r#"{"type":"ack","id":"#) && ack.ends_with(r#","exp":1}"#);
                prop_assert!(check, "{}", ack);
            }
        }
        Err(r) => {
            let frame = protocol::encode_error(r.id, r.code, &r.message);
            let v: Result<Value, _> = serde_json::from_str(&frame);
            if let Ok(v) = v {
                prop_assert_eq!(v["type"].as_str(), Some("error"));
                prop_assert_eq!(v["code"].as_str(), Some(r.code.as_str()));
            } else {
                // Only an echoed id may be a JSON number serde_json refuses.
                prop_assert!(r.id.is_some(), "{frame}");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn parse_command_never_panics_on_arbitrary_text(text in any::<String>()) {
        check_parse(&text)?;
    }

    #[test]
    fn parse_command_never_panics_on_json_shaped_text(
        text in r#"[{}\[\]",:0-9a-z\\ .*>-]{0,80}"#,
    ) {
        check_parse(&text)?;
        check_parse(&format!(r#"{{"op":"publish","topic":"a","data":{text}}}"#))?;
        check_parse(&format!(r#"{{"op":"subscribe","topic":"{text}"}}"#))?;
    }

    #[test]
    fn parse_command_never_panics_on_mutated_commands(
        cmd in valid_command(),
        muts in proptest::collection::vec(mutation(), 1..6),
    ) {
        prop_assert!(protocol::parse_command(&cmd).is_ok(), "{cmd}");
        check_parse(&mutate(&cmd, &muts))?;
    }

    /// `data` is delivered byte-for-byte: compact, pretty or padded, the
    /// message frame carries exactly the publisher's bytes, and parses back
    /// to the same value.
    #[test]
    fn publish_data_round_trips_byte_for_byte(
        topic in topic_strategy(),
        v in json_value(),
        pretty: bool,
        id in prop_oneof![Just(None), any::<i32>().prop_map(|i| Some(i.to_string())), "[a-z]{0,5}".prop_map(|s| Some(format!("\"{s}\"")))],
    ) {
        let data = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.expect("json");
        let id_field = id.as_ref().map(|i| format!(r#","id":{i}"#)).unwrap_or_default();
        let cmd = format!(r#"{{"op":"publish","topic":"{topic}","data":{data}{id_field}}}"#);
        match protocol::parse_command(&cmd) {
            Ok(Command::Publish { topic: t, data: raw, id: got_id }) => {
                prop_assert_eq!(t.as_ref(), topic.as_str());
                prop_assert_eq!(raw.get(), data.as_str());
                prop_assert_eq!(got_id.map(|i| i.get().to_string()), id.clone());
                let frame = protocol::encode_message(&t, raw.get());
                let prefix = format!(r#"{{"type":"message","topic":"{topic}","data":"#);
                let check = frame.starts_with(&prefix);
                prop_assert!(check, "{}", frame);
                prop_assert_eq!(&frame[prefix.len()..frame.len() - 1], data.as_str());
                let parsed: Value = serde_json::from_str(&frame).expect("message frame is JSON");
                prop_assert_eq!(&parsed["type"], "message");
                prop_assert_eq!(&parsed["topic"], topic.as_str());
                // Same parser on both sides (serde_json's float parsing is
                // not exact without `float_roundtrip`).
                let direct: Value = serde_json::from_str(&data).expect("data is JSON");
                prop_assert_eq!(&parsed["data"], &direct);
                if let Some(i) = got_id {
                    let ack: Value = serde_json::from_str(&protocol::encode_ack(i)).expect("ack is JSON");
                    prop_assert_eq!(&ack["type"], "ack");
                }
            }
            other => prop_assert!(false, "valid publish refused: {:?} for {}", other.err().map(|r| r.message), cmd),
        }
    }

    /// Error frames are JSON for any message text (quotes, control chars...).
    #[test]
    fn error_frames_are_json(msg in any::<String>(), id in any::<Option<u32>>()) {
        let raw = id.map(|i| serde_json::value::RawValue::from_string(i.to_string()).expect("raw"));
        let frame = protocol::encode_error(raw.as_deref(), ErrorCode::BadRequest, &msg);
        let v: Value = serde_json::from_str(&frame).expect("error frame is JSON");
        prop_assert_eq!(&v["message"], msg.as_str());
        prop_assert_eq!(&v["code"], "bad_request");
        prop_assert_eq!(v.get("id").and_then(Value::as_u64), id.map(u64::from));
    }

    /// Topics: anything validate_topic accepts is safe to splice into JSON
    /// unescaped (encode_message relies on it).
    #[test]
    fn valid_topics_need_no_json_escaping(t in any::<String>()) {
        if protocol::validate_topic(&t, true).is_ok() {
            let quoted = serde_json::to_string(&t).expect("json");
            prop_assert_eq!(quoted, format!("\"{t}\""));
            prop_assert!(t.len() <= protocol::MAX_TOPIC_LEN);
        }
    }
}

/// Deterministic companions to the properties (quick regressions).
#[test]
fn naive_matcher_examples() {
    let cases: HashMap<(&str, &str), bool> = [
        (("a.*", "a.b"), true),
        (("a.*", "a.b.c"), false),
        (("a.>", "a"), false),
        (("a.>", "a.b.c"), true),
        ((">", "a"), true),
        (("*.b", "a.b"), true),
        (("*", "a.b"), false),
    ]
    .into_iter()
    .collect();
    for ((p, t), want) in cases {
        assert_eq!(naive_match(p, t), want, "{p} vs {t}");
    }
}

// ---------------------------------------------------------------------------
// Auth (issue 13): subscribe coverage and publish matching of grants against
// a brute-force reference over every topic of up to 5 segments.
// ---------------------------------------------------------------------------

/// Pattern segments over a small alphabet: literals `a`, `b`, and `*`;
/// a final `>` sometimes. Up to 4 segments.
fn small_pattern() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("*")], 1..5),
        any::<bool>(),
    )
        .prop_map(|(mut segs, tail)| {
            if tail {
                let last = segs.len() - 1;
                segs[last] = ">";
            }
            segs.join(".")
        })
}

/// Every topic of 1..=5 segments over `a`, `b`, `c` (`c` stands for any
/// other literal): one longer than the longest pattern, so a topic that
/// separates two patterns, if any exists, is among them.
fn all_small_topics() -> &'static [String] {
    static TOPICS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    TOPICS.get_or_init(|| {
        let mut out: Vec<String> = Vec::new();
        let mut level: Vec<String> = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for prefix in &level {
                for seg in ["a", "b", "c"] {
                    let t = if prefix.is_empty() {
                        seg.to_string()
                    } else {
                        format!("{prefix}.{seg}")
                    };
                    next.push(t);
                }
            }
            out.extend(next.iter().cloned());
            level = next;
        }
        out
    })
}

proptest! {
    #![proptest_config(config(2000))]

    /// Grant G covers P exactly when every topic P matches is matched by G.
    #[test]
    fn subscribe_coverage_is_topic_set_inclusion(g in small_pattern(), p in small_pattern()) {
        let grants = wsbroker::auth::Grants::new(&[g.as_str()], &[], None);
        let reference = all_small_topics()
            .iter()
            .all(|t| !naive_match(&p, t) || naive_match(&g, t));
        prop_assert_eq!(grants.may_subscribe(&p), reference, "grant {} pattern {}", g, p);
    }

    /// Publishing is allowed exactly when a grant matches the topic.
    #[test]
    fn publish_grants_match_like_the_reference(
        gs in proptest::collection::vec(small_pattern(), 1..4),
        t in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..6),
    ) {
        let topic = t.join(".");
        let grants = wsbroker::auth::Grants::new(&[] as &[String], &gs, None);
        let reference = gs.iter().any(|g| naive_match(g, &topic));
        prop_assert_eq!(grants.may_publish(&topic), reference, "grants {:?} topic {}", gs, topic);
    }
}
