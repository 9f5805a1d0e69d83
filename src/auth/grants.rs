//! Per-connection permissions (CONTRACT §10): compiled patterns, subscribe
//! by coverage, publish by match. A connection owns its `Grants`, so a check
//! takes no lock and allocates nothing.

use crate::protocol::validate_topic;

/// Placeholder replaced by the token's `sub`.
pub const SUB_PLACEHOLDER: &str = "{sub}";

/// One segment of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(Box<str>),
    /// `*`: exactly one segment.
    Star,
    /// `>`: one or more segments (last only).
    Tail,
}

/// A compiled, valid pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segs: Box<[Seg]>,
}

impl Pattern {
    /// Compiles a pattern (wildcards allowed); `Err` names the problem.
    pub fn parse(p: &str) -> Result<Pattern, String> {
        validate_topic(p, true)?;
        let segs = p
            .split('.')
            .map(|s| match s {
                "*" => Seg::Star,
                ">" => Seg::Tail,
                lit => Seg::Lit(lit.into()),
            })
            .collect();
        Ok(Pattern { segs })
    }

    /// Whether this pattern matches the concrete topic `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('.');
        for seg in self.segs.iter() {
            match seg {
                Seg::Tail => return parts.next().is_some(),
                Seg::Star => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Seg::Lit(l) => {
                    if parts.next() != Some(l) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Whether every topic `other` can match is matched by `self`.
    pub fn covers(&self, other: &Pattern) -> bool {
        let mut theirs = other.segs.iter();
        for mine in self.segs.iter() {
            let Some(t) = theirs.next() else {
                // They end first: they match shorter topics than we do.
                return false;
            };
            match (mine, t) {
                (Seg::Tail, _) => return true,
                (_, Seg::Tail) => return false,
                (Seg::Star, _) => {}
                (Seg::Lit(a), Seg::Lit(b)) if a == b => {}
                (Seg::Lit(_), _) => return false,
            }
        }
        theirs.next().is_none()
    }
}

/// Whether `sub` can stand in for `{sub}`: a literal topic segment.
pub fn valid_sub_segment(sub: &str) -> bool {
    !sub.is_empty()
        && sub.len() <= 128
        && sub
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b':'))
}

/// Checks a configured or claimed pattern that may contain `{sub}`.
pub fn validate_template(p: &str) -> Result<(), String> {
    validate_topic(&p.replace(SUB_PLACEHOLDER, "x"), true)
}

/// Expands `{sub}` and compiles; `None` when the pattern uses `{sub}` and
/// `sub` is not a valid segment (such a pattern grants nothing), or the
/// expansion is too long.
pub fn expand(template: &str, sub: Option<&str>) -> Option<Pattern> {
    if !template.contains(SUB_PLACEHOLDER) {
        return Pattern::parse(template).ok();
    }
    let sub = sub.filter(|s| valid_sub_segment(s))?;
    Pattern::parse(&template.replace(SUB_PLACEHOLDER, sub)).ok()
}

/// What a connection may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
}

impl Grants {
    /// Compiles the lists, expanding `{sub}` (`None` for an anonymous connection).
    pub fn new<S: AsRef<str>>(subscribe: &[S], publish: &[S], sub: Option<&str>) -> Grants {
        let compile = |list: &[S]| {
            let mut out: Vec<Pattern> = Vec::with_capacity(list.len());
            for p in list.iter().filter_map(|t| expand(t.as_ref(), sub)) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            out
        };
        Grants {
            subscribe: compile(subscribe),
            publish: compile(publish),
        }
    }

    /// No permission at all (an anonymous connection must authenticate).
    pub fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.publish.is_empty()
    }

    /// Subscribing to `pattern` is allowed: some grant covers it.
    pub fn may_subscribe(&self, pattern: &str) -> bool {
        match Pattern::parse(pattern) {
            Ok(p) => self.subscribe.iter().any(|g| g.covers(&p)),
            Err(_) => false,
        }
    }

    /// Whether the compiled pattern is covered by a subscribe grant.
    pub fn covers(&self, pattern: &Pattern) -> bool {
        self.subscribe.iter().any(|g| g.covers(pattern))
    }

    /// Publishing to the concrete `topic` is allowed: some grant matches it.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|g| g.matches(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).expect("pattern")
    }

    #[test]
    fn coverage_follows_the_contract_examples() {
        let gt = p("chat.>");
        for c in ["chat.a", "chat.*", "chat.*.x", "chat.>"] {
            assert!(gt.covers(&p(c)), "chat.> covers {c}");
        }
        assert!(!gt.covers(&p("chat")));
        assert!(!gt.covers(&p(">")));
        let star = p("chat.*");
        assert!(star.covers(&p("chat.a")));
        assert!(star.covers(&p("chat.*")));
        assert!(!star.covers(&p("chat.>")));
        assert!(!star.covers(&p("chat.a.b")));
        let mid = p("a.*.c");
        assert!(mid.covers(&p("a.b.c")));
        assert!(!mid.covers(&p("a.*.*")));
    }

    #[test]
    fn matching_is_nats_style() {
        assert!(p("a.>").matches("a.b.c"));
        assert!(!p("a.>").matches("a"));
        assert!(p("a.*").matches("a.b"));
        assert!(!p("a.*").matches("a.b.c"));
        assert!(p("a.b").matches("a.b"));
        assert!(!p("a.b").matches("a.bc"));
    }

    #[test]
    fn sub_expansion_grants_nothing_for_a_bad_sub() {
        let g = Grants::new(&["user.{sub}.>"], &["user.{sub}"], Some("u42"));
        assert!(g.may_subscribe("user.u42.inbox"));
        assert!(!g.may_subscribe("user.u43.inbox"));
        assert!(g.may_publish("user.u42"));
        for bad in ["a.b", "*", ">", "", "x y"] {
            let g = Grants::new(&["user.{sub}.>", "public.>"], &[], Some(bad));
            assert!(!g.may_subscribe("user.*.inbox"), "sub {bad:?}");
            assert!(!g.may_subscribe("user.>"), "sub {bad:?}");
            assert!(g.may_subscribe("public.x"));
        }
        assert!(Grants::new(&["user.{sub}"], &[], None).is_empty());
    }
}
