//! The subscription index (publish hot path): maps NATS-style topic patterns
//! (`*` = exactly one segment, trailing `>` = one or more segments, contract §4)
//! to subscribers, and finds every subscriber of a published topic.
//!
//! Design: a segment trie as in nats-server's `sublist.go`. Each node has its
//! literal children, an optional `*` child, the subscribers whose pattern ends
//! at the node, and the subscribers of `<path to node>.>`.
//!
//! Complexity, for a topic of `d` segments: matching follows at most two
//! children per visited node (the literal one and `*`) and visits each node at
//! most once, so O(d) for literal patterns and at worst min(2^d, trie size) with
//! `*` at every level; plus O(m·k) to report `m` subscriptions found in `k`
//! matched subscriber sets (the dedup). It never depends on the total number of
//! subscriptions. `insert`/`remove` are O(d). A publish allocates nothing
//! unless more than `INLINE_MATCHES` (8) subscriber sets match.

use std::collections::HashMap;

use indexmap::map::Entry;
use indexmap::IndexMap;

/// Matched subscriber sets kept on the stack before spilling to a `Vec`.
const INLINE_MATCHES: usize = 8;

/// Most segments a pattern may have; [`TopicIndex::insert`] ignores deeper ones.
// Valid topics (≤ 256 bytes) have at most 128 segments; bounding the trie depth
// bounds the recursion in `remove`, in matching and in `Drop`.
pub const MAX_SEGMENTS: usize = 256;

/// Subscribers of one pattern, by connection id: dense to iterate, O(1) removal.
type Subs<V> = IndexMap<u64, V>;

/// One trie node, reached by a sequence of pattern segments.
struct Node<V> {
    literals: HashMap<Box<str>, Node<V>>,
    star: Option<Box<Node<V>>>,
    /// Subscribers whose pattern ends exactly here.
    subs: Subs<V>,
    /// Subscribers of `<path to here>.>`.
    full: Subs<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            literals: HashMap::new(),
            star: None,
            subs: IndexMap::new(),
            full: IndexMap::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.literals.is_empty()
            && self.star.is_none()
            && self.subs.is_empty()
            && self.full.is_empty()
    }
}

/// Splits off the first `.`-separated segment; the tail is `None` after the last one.
fn split_first(rest: &str) -> (&str, Option<&str>) {
    match rest.split_once('.') {
        Some((seg, tail)) => (seg, Some(tail)),
        None => (rest, None),
    }
}

/// Outcome of a removal below a node.
enum Removed {
    /// The subscription was not there.
    Absent,
    /// Removed; `emptied` when its subscriber set became empty.
    Yes { emptied: bool },
}

/// Removes `id` from the pattern `rest` below `node`, pruning emptied children.
fn remove_below<V>(node: &mut Node<V>, rest: &str, id: u64) -> Removed {
    let (seg, tail) = split_first(rest);
    let swap_remove = |subs: &mut Subs<V>| match subs.swap_remove(&id) {
        Some(_) => Removed::Yes {
            emptied: subs.is_empty(),
        },
        None => Removed::Absent,
    };
    if seg == ">" && tail.is_none() {
        return swap_remove(&mut node.full);
    }
    let child = if seg == "*" {
        node.star.as_deref_mut()
    } else {
        node.literals.get_mut(seg)
    };
    let Some(child) = child else {
        return Removed::Absent;
    };
    let outcome = match tail {
        None => swap_remove(&mut child.subs),
        Some(tail) => remove_below(child, tail, id),
    };
    if matches!(outcome, Removed::Yes { .. }) && child.is_empty() {
        if seg == "*" {
            node.star = None;
        } else {
            node.literals.remove(seg);
        }
    }
    outcome
}

/// The subscriber sets matched by one topic, on the stack while few.
struct Matched<'a, V> {
    inline: [Option<&'a Subs<V>>; INLINE_MATCHES],
    len: usize,
    /// Used instead of `inline` (which is then all `None`) beyond `INLINE_MATCHES`.
    spill: Vec<&'a Subs<V>>,
}

impl<'a, V> Matched<'a, V> {
    fn new() -> Self {
        Self {
            inline: [None; INLINE_MATCHES],
            len: 0,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, subs: &'a Subs<V>) {
        if subs.is_empty() {
            return;
        }
        if self.len < INLINE_MATCHES {
            self.inline[self.len] = Some(subs);
        } else {
            if self.len == INLINE_MATCHES {
                self.spill.reserve(2 * INLINE_MATCHES);
                self.spill
                    .extend(self.inline.iter_mut().filter_map(Option::take));
            }
            self.spill.push(subs);
        }
        self.len += 1;
    }

    /// The sets in the order they were pushed.
    fn iter(&self) -> impl Iterator<Item = &'a Subs<V>> + '_ {
        self.inline
            .iter()
            .flatten()
            .chain(self.spill.iter())
            .copied()
    }

    /// Collects the sets matched by the remaining topic `rest` below `node`.
    fn walk(&mut self, node: &'a Node<V>, rest: &str) {
        // At least one segment remains, so `<path>.>` matches here.
        self.push(&node.full);
        let (seg, tail) = split_first(rest);
        if let Some(child) = node.literals.get(seg) {
            self.step(child, tail);
        }
        if let Some(child) = node.star.as_deref() {
            self.step(child, tail);
        }
    }

    fn step(&mut self, child: &'a Node<V>, tail: Option<&str>) {
        match tail {
            Some(tail) => self.walk(child, tail),
            None => self.push(&child.subs),
        }
    }
}

/// Subscriptions by topic pattern, each a (pattern, connection id) pair with a value.
pub struct TopicIndex<V> {
    root: Node<V>,
    patterns: usize,
    subscriptions: usize,
}

impl<V> Default for TopicIndex<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> TopicIndex<V> {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            root: Node::default(),
            patterns: 0,
            subscriptions: 0,
        }
    }

    /// Adds a subscription; false when (pattern, id) was already present.
    ///
    /// Assumes a validated pattern; a pattern of more than [`MAX_SEGMENTS`]
    /// segments (never valid) is ignored and also returns false.
    pub fn insert(&mut self, pattern: &str, id: u64, value: V) -> bool {
        if pattern.split('.').nth(MAX_SEGMENTS).is_some() {
            return false;
        }
        let mut node = &mut self.root;
        let mut rest = pattern;
        let subs = loop {
            let (seg, tail) = split_first(rest);
            // A `>` that is not last is not a wildcard; validation rejects it anyway.
            if seg == ">" && tail.is_none() {
                break &mut node.full;
            }
            node = if seg == "*" {
                node.star.get_or_insert_with(Box::default)
            } else {
                node.literals.entry(Box::from(seg)).or_default()
            };
            match tail {
                Some(tail) => rest = tail,
                None => break &mut node.subs,
            }
        };
        match subs.entry(id) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                slot.insert(value);
                if subs.len() == 1 {
                    self.patterns += 1;
                }
                self.subscriptions += 1;
                true
            }
        }
    }

    /// Removes a subscription; false when it was not present. Prunes empty nodes.
    pub fn remove(&mut self, pattern: &str, id: u64) -> bool {
        match remove_below(&mut self.root, pattern, id) {
            Removed::Absent => false,
            Removed::Yes { emptied } => {
                if emptied {
                    self.patterns -= 1;
                }
                self.subscriptions -= 1;
                true
            }
        }
    }

    /// Calls f once per distinct subscriber id whose pattern(s) match `topic`; returns how many were visited.
    ///
    /// A connection matching through several patterns is visited once, with
    /// the value of one of its matching subscriptions.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(u64, &V)) -> usize {
        let mut matched = Matched::new();
        matched.walk(&self.root, topic);
        if matched.len <= 1 {
            let Some(only) = matched.iter().next() else {
                return 0;
            };
            only.iter().for_each(|(&id, v)| f(id, v));
            return only.len();
        }
        // Dedup without a HashSet: the largest set is delivered as is; an id
        // of any other set is skipped if the largest set or an earlier
        // (non-largest) set has it. Costs O(k) lookups per id, k = sets matched.
        let Some((largest_at, largest)) = matched
            .iter()
            .enumerate()
            .max_by_key(|(_, subs)| subs.len())
        else {
            return 0;
        };
        largest.iter().for_each(|(&id, v)| f(id, v));
        let mut visited = largest.len();
        for (i, subs) in matched.iter().enumerate() {
            if i == largest_at {
                continue;
            }
            for (&id, v) in subs {
                let seen = largest.contains_key(&id)
                    || matched
                        .iter()
                        .take(i)
                        .enumerate()
                        .any(|(j, earlier)| j != largest_at && earlier.contains_key(&id));
                if !seen {
                    f(id, v);
                    visited += 1;
                }
            }
        }
        visited
    }

    /// Number of distinct patterns with at least one subscriber.
    pub fn pattern_count(&self) -> usize {
        self.patterns
    }

    /// Total (pattern, id) subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }
}

impl<V> TopicIndex<V> {
    /// Calls f once per distinct pattern with at least one subscriber (any order).
    pub fn for_each_pattern(&self, mut f: impl FnMut(&str)) {
        fn walk<V>(node: &Node<V>, path: &mut String, f: &mut impl FnMut(&str)) {
            if !node.full.is_empty() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push('>');
                f(path);
                path.truncate(len);
            }
            let children = node
                .literals
                .iter()
                .map(|(seg, child)| (&**seg, child))
                .chain(node.star.as_deref().map(|child| ("*", child)));
            for (seg, child) in children {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(seg);
                if !child.subs.is_empty() {
                    f(path);
                }
                walk(child, path, f);
                path.truncate(len);
            }
        }
        walk(&self.root, &mut String::new(), &mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ids matched by `topic`, sorted, asserting each is visited once with its value.
    fn ids(index: &TopicIndex<u64>, topic: &str) -> Vec<u64> {
        let mut out = Vec::new();
        let n = index.for_each_match(topic, |id, &v| {
            assert_eq!(v, id * 10, "value of {id}");
            out.push(id);
        });
        assert_eq!(n, out.len(), "returned count for {topic}");
        out.sort_unstable();
        let before = out.len();
        out.dedup();
        assert_eq!(before, out.len(), "an id was visited twice for {topic}");
        out
    }

    fn index(subs: &[(&str, u64)]) -> TopicIndex<u64> {
        let mut index = TopicIndex::new();
        for &(pattern, id) in subs {
            assert!(index.insert(pattern, id, id * 10), "{pattern} {id}");
        }
        index
    }

    fn is_pruned(index: &TopicIndex<u64>) -> bool {
        index.root.is_empty() && index.pattern_count() == 0 && index.subscription_count() == 0
    }

    #[test]
    fn exact() {
        let ix = index(&[("a.b", 1), ("a", 2), ("a.b.c", 3)]);
        assert_eq!(ids(&ix, "a.b"), [1]);
        assert_eq!(ids(&ix, "a"), [2]);
        assert_eq!(ids(&ix, "a.b.c"), [3]);
        assert_eq!(ids(&ix, "b"), [0u64; 0]);
        assert_eq!(ids(&ix, "a.c"), [0u64; 0]);
        assert_eq!(ids(&ix, "a.b.c.d"), [0u64; 0]);
        assert_eq!(ids(&ix, "A.b"), [0u64; 0], "case-sensitive");
    }

    #[test]
    fn star_is_exactly_one_segment() {
        let ix = index(&[("a.*", 1), ("*.b", 2), ("*", 3), ("a.*.c", 4)]);
        assert_eq!(ids(&ix, "a.b"), [1, 2]);
        assert_eq!(ids(&ix, "a.x"), [1]);
        assert_eq!(ids(&ix, "x.b"), [2]);
        assert_eq!(ids(&ix, "a"), [3]);
        assert_eq!(ids(&ix, "a.b.c"), [4]);
        assert_eq!(ids(&ix, "a.b.d"), [0u64; 0]);
        assert_eq!(ids(&ix, "x.y.b"), [0u64; 0]);
    }

    #[test]
    fn full_wildcard_is_one_or_more_trailing_segments() {
        let ix = index(&[("a.>", 1), (">", 2), ("a.*.>", 3), ("*.>", 4)]);
        assert_eq!(ids(&ix, "a"), [2]);
        assert_eq!(ids(&ix, "a.b"), [1, 2, 4]);
        assert_eq!(ids(&ix, "a.b.c"), [1, 2, 3, 4]);
        assert_eq!(ids(&ix, "a.b.c.d.e"), [1, 2, 3, 4]);
        assert_eq!(ids(&ix, "b"), [2]);
        assert_eq!(ids(&ix, "b.c"), [2, 4]);
    }

    #[test]
    fn overlapping_patterns_deliver_once() {
        let ix = index(&[
            ("a.b", 1),
            ("a.*", 1),
            ("a.>", 1),
            (">", 1),
            ("*.b", 1),
            ("a.b", 2),
            ("*.*", 2),
            ("a.>", 3),
        ]);
        assert_eq!(ids(&ix, "a.b"), [1, 2, 3]);
        assert_eq!(ix.subscription_count(), 8);
        assert_eq!(ix.pattern_count(), 6);
    }

    #[test]
    fn more_matched_sets_than_inline() {
        // 2^4 = 16 matching patterns over 4 segments, plus `>` sets: spills.
        let mut ix = TopicIndex::new();
        let mut n = 0;
        for mask in 0..16u32 {
            let p: Vec<&str> = (0..4)
                .map(|i| {
                    if mask & (1 << i) != 0 {
                        "*"
                    } else {
                        ["a", "b", "c", "d"][i]
                    }
                })
                .collect();
            let p = p.join(".");
            assert!(ix.insert(&p, u64::from(mask % 5), u64::from(mask % 5) * 10));
            assert!(ix.insert(&p, 100 + u64::from(mask), (100 + u64::from(mask)) * 10));
            n += 2;
        }
        assert!(ix.insert("a.>", 3, 30));
        assert!(ix.insert("a.b.>", 7, 70));
        assert_eq!(ix.subscription_count(), n + 2);
        let got = ids(&ix, "a.b.c.d");
        let mut want: Vec<u64> = (0..5).chain(7..8).chain(100..116).collect();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn duplicate_insert_returns_false() {
        let mut ix = TopicIndex::new();
        assert!(ix.insert("a.*", 1, 10));
        assert!(!ix.insert("a.*", 1, 10));
        assert!(ix.insert("a.*", 2, 20));
        assert!(ix.insert("a.b", 1, 10));
        assert_eq!(ix.subscription_count(), 3);
        assert_eq!(ix.pattern_count(), 2);
    }

    #[test]
    fn remove_stops_matching_and_prunes() {
        let mut ix = index(&[
            ("a.b.c", 1),
            ("a.*.c", 2),
            ("a.>", 3),
            (">", 4),
            ("a.b.c", 5),
        ]);
        assert_eq!(ix.pattern_count(), 4);
        assert!(!ix.remove("a.b.c", 9));
        assert!(!ix.remove("a.b", 1));
        assert!(!ix.remove("x.y.z", 1));
        assert!(!ix.remove("a.b.c.>", 1));
        assert!(ix.remove("a.b.c", 1));
        assert!(!ix.remove("a.b.c", 1));
        assert_eq!(ids(&ix, "a.b.c"), [2, 3, 4, 5]);
        assert_eq!(ix.pattern_count(), 4);
        assert!(ix.remove("a.b.c", 5));
        assert_eq!(ix.pattern_count(), 3);
        assert!(ix.remove("a.*.c", 2));
        assert!(ix.remove("a.>", 3));
        assert_eq!(ids(&ix, "a.b.c"), [4]);
        assert!(ix.remove(">", 4));
        assert_eq!(ids(&ix, "a.b.c"), [0u64; 0]);
        assert!(is_pruned(&ix), "nodes left behind");
    }

    #[test]
    fn odd_input_does_not_panic() {
        let mut ix = TopicIndex::new();
        for p in [
            "", ".", "..", "a..b", ">.a", ">.>", "a.>.b", ".>", "*.", "**", "a.b.",
        ] {
            assert!(ix.insert(p, 1, 10), "{p}");
            assert!(!ix.insert(p, 1, 10), "{p}");
        }
        for t in ["", ".", "a..b", ">", "*", "a.>.b", "a.b.", "é.ü"] {
            ids(&ix, t);
        }
        let deep = format!("{}a", "a.".repeat(MAX_SEGMENTS));
        let deepest = format!("{}a", "a.".repeat(MAX_SEGMENTS - 1));
        assert!(!ix.insert(&deep, 1, 10));
        assert!(!ix.remove(&deep, 1));
        ids(&ix, &deep);
        assert!(ix.insert(&deepest, 1, 10));
        ids(&ix, &deep);
        for p in [
            "", ".", "..", "a..b", ">.a", ">.>", "a.>.b", ".>", "*.", "**", "a.b.",
        ] {
            assert!(ix.remove(p, 1), "{p}");
        }
        assert!(ix.remove(&deepest, 1));
        assert!(is_pruned(&ix));
    }

    /// Reference semantics: does `pattern` match `topic`, segment by segment?
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

    #[derive(Debug, Clone)]
    enum Op {
        Insert(String, u64),
        Remove(String, u64),
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let segments = (
            proptest::collection::vec(
                prop_oneof![Just("a"), Just("b"), Just("c"), Just("*")],
                1..4,
            ),
            any::<bool>(),
        )
            .prop_map(|(segs, full)| {
                let mut p = segs.join(".");
                if full {
                    p.push_str(".>");
                }
                p
            });
        prop_oneof![9 => segments, 1 => Just(">".to_string())]
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..6)
            .prop_map(|segs| segs.join("."))
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (pattern_strategy(), 0..6u64).prop_map(|(p, id)| Op::Insert(p, id)),
            2 => (pattern_strategy(), 0..6u64).prop_map(|(p, id)| Op::Remove(p, id)),
        ]
    }

    proptest! {
        #[test]
        fn matches_naive_reference(
            ops in proptest::collection::vec(op_strategy(), 0..60),
            topics in proptest::collection::vec(topic_strategy(), 1..12),
        ) {
            let mut ix = TopicIndex::new();
            let mut reference: Vec<(String, u64)> = Vec::new();
            for op in &ops {
                match op {
                    Op::Insert(p, id) => {
                        let fresh = !reference.iter().any(|(rp, rid)| rp == p && rid == id);
                        prop_assert_eq!(ix.insert(p, *id, id * 10), fresh, "insert {} {}", p, id);
                        if fresh {
                            reference.push((p.clone(), *id));
                        }
                    }
                    Op::Remove(p, id) => {
                        let at = reference.iter().position(|(rp, rid)| rp == p && rid == id);
                        prop_assert_eq!(ix.remove(p, *id), at.is_some(), "remove {} {}", p, id);
                        if let Some(at) = at {
                            reference.swap_remove(at);
                        }
                    }
                }
                prop_assert_eq!(ix.subscription_count(), reference.len());
                let mut distinct: Vec<&str> = reference.iter().map(|(p, _)| p.as_str()).collect();
                distinct.sort_unstable();
                distinct.dedup();
                prop_assert_eq!(ix.pattern_count(), distinct.len());
            }
            for topic in &topics {
                let mut want: Vec<u64> = reference
                    .iter()
                    .filter(|(p, _)| naive_match(p, topic))
                    .map(|&(_, id)| id)
                    .collect();
                want.sort_unstable();
                want.dedup();
                prop_assert_eq!(ids(&ix, topic), want, "topic {}", topic);
            }
            for (p, id) in std::mem::take(&mut reference) {
                prop_assert!(ix.remove(&p, id));
            }
            prop_assert!(is_pruned(&ix));
        }
    }

    #[test]
    fn for_each_pattern_lists_every_distinct_pattern() {
        let idx = index(&[
            ("a.b", 1),
            ("a.*", 2),
            ("a.>", 3),
            (">", 4),
            ("a.b", 5),
            ("*.c.>", 6),
        ]);
        let mut seen = Vec::new();
        idx.for_each_pattern(|p| seen.push(p.to_string()));
        seen.sort();
        assert_eq!(seen, vec!["*.c.>", ">", "a.*", "a.>", "a.b"]);
        assert_eq!(seen.len(), idx.pattern_count());
    }
}
