//! The Origin allowlist (contract §2 `[origins]`, §3): parses `origins.allow`
//! patterns once, then checks the `Origin` header of each WebSocket upgrade
//! against them without allocating on the allowed path.

use std::fmt;
use std::net::Ipv6Addr;

/// Longest prefix of a rejected value echoed in messages, so a huge header
/// cannot bloat a 403 body or a log line.
const MAX_ECHO: usize = 128;

/// Copies `s` for an error message: truncated, control characters escaped.
fn echo(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_ECHO));
    for (i, c) in s.chars().enumerate() {
        if i == MAX_ECHO {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A pattern or Origin header value that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    /// Not of the form `scheme://host[:port]` (nor the literal `null`).
    #[error("`{value}` is not scheme://host[:port]: {reason}")]
    Syntax {
        /// The offending value (truncated, control characters escaped).
        value: String,
        /// Which part is wrong.
        reason: &'static str,
    },
    /// A pattern uses `*` other than as a leading `*.` label or the `:*` port.
    #[error(
        "`{value}`: `*` is only allowed as a leading `*.` label of the host or as the port `:*`"
    )]
    Wildcard {
        /// The offending pattern (truncated, control characters escaped).
        value: String,
    },
    /// A `*.` pattern over a public suffix (`*.com`, `*.co.uk`, `*.github.io`):
    /// it would admit every site anyone can register there.
    #[error(
        "`{value}`: `*.{suffix}` would allow every site under the public suffix `{suffix}`; list the sites, or use a wildcard under a domain you control (`*.yours.{suffix}`)"
    )]
    PublicSuffix {
        /// The offending pattern (truncated, control characters escaped).
        value: String,
        /// The public suffix, lowercased.
        suffix: String,
    },
    /// An `origins.allow` entry is invalid.
    #[error("origins.allow[{index}]: {error}")]
    Entry {
        /// Position of the entry in `origins.allow`.
        index: usize,
        /// What is wrong with it.
        error: Box<OriginError>,
    },
}

/// Why an upgrade request was refused; `Display` is the 403 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginDenied {
    /// No `Origin` header and `allow_missing = false`.
    #[error("missing Origin header")]
    Missing,
    /// The header is not a serialized origin; carries the parse error.
    #[error("malformed Origin header: {0}")]
    Malformed(String),
    /// Well-formed but matching no pattern; carries the header value.
    #[error("origin not allowed: {0}")]
    NotAllowed(String),
}

/// The port implied by a scheme without an explicit port, when it has one.
fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
        Some(443)
    } else {
        None
    }
}

/// A host as written in a pattern or header, before lowercasing.
enum RawHost<'a> {
    Name(&'a str),
    /// `*.suffix`: the suffix, without the `*.`.
    Subdomains(&'a str),
    V6(Ipv6Addr),
}

/// A port as written: absent, `*`, or a number.
enum RawPort {
    Absent,
    Any,
    Num(u16),
}

/// The syntactic pieces of `scheme://host[:port]`, borrowed from the input.
struct Parts<'a> {
    scheme: &'a str,
    host: RawHost<'a>,
    port: RawPort,
}

/// Checks a registered name: non-empty dot-separated labels of `[A-Za-z0-9_-]`
/// (`_` because browsers accept it in hostnames).
fn check_name(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("empty host");
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err("empty label in host");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("invalid character in host");
        }
    }
    Ok(())
}

/// True when `name` is itself a suffix on the Public Suffix List (ICANN or
/// private section: `com`, `co.uk`, `github.io`). Names the list does not
/// know (`localhost`, `internal`) are not: the list's implicit `*` rule
/// would make every unknown TLD one, and `*.localhost` is a fine pattern.
fn is_public_suffix(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    psl::suffix(lower.as_bytes()).is_some_and(|s| s.is_known() && s.as_bytes() == lower.as_bytes())
}

/// Splits `s` into scheme, host and port; `None` for the literal `null`.
/// Wildcards are accepted only when `wildcards` (patterns), else they are
/// plain syntax errors (headers).
fn parse_parts(s: &str, wildcards: bool) -> Result<Option<Parts<'_>>, OriginError> {
    let syntax = |reason| OriginError::Syntax {
        value: echo(s),
        reason,
    };
    let wildcard = || {
        if wildcards {
            OriginError::Wildcard { value: echo(s) }
        } else {
            syntax("`*` is not allowed")
        }
    };
    if s == "null" {
        return Ok(None);
    }
    if let Some(b) = s.bytes().find(|b| !b.is_ascii_graphic()) {
        return Err(syntax(if b.is_ascii_whitespace() {
            "contains whitespace"
        } else if b.is_ascii() {
            "contains a control character"
        } else {
            "contains a non-ASCII character (hosts must be punycode)"
        }));
    }
    // Operators sometimes write one trailing slash in a pattern; tolerate it
    // there. A browser's Origin never has one (RFC 6454 serialization), so
    // in a header it is malformed, like any other path.
    let body = if wildcards {
        s.strip_suffix('/').unwrap_or(s)
    } else {
        s
    };
    let Some((scheme, authority)) = body.split_once("://") else {
        return Err(syntax("missing `://`"));
    };
    if scheme.contains('*') {
        return Err(wildcard());
    }
    let mut sb = scheme.bytes();
    if !sb.next().is_some_and(|b| b.is_ascii_alphabetic())
        || !sb.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return Err(syntax("invalid scheme"));
    }
    for (c, reason) in [
        ('@', "userinfo is not allowed"),
        ('/', "a path is not allowed"),
        ('?', "a query is not allowed"),
        ('#', "a fragment is not allowed"),
    ] {
        if authority.contains(c) {
            return Err(syntax(reason));
        }
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return Err(syntax("unclosed `[` in host"));
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err(syntax("unexpected characters after `]`")),
            },
        };
        let addr = inner
            .parse::<Ipv6Addr>()
            .map_err(|_| syntax("invalid IPv6 address"))?;
        (RawHost::V6(addr), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let host = match host.strip_prefix("*.") {
            Some(suffix) if wildcards => {
                if suffix.contains('*') {
                    return Err(wildcard());
                }
                check_name(suffix).map_err(syntax)?;
                if is_public_suffix(suffix) {
                    return Err(OriginError::PublicSuffix {
                        value: echo(s),
                        suffix: suffix.to_ascii_lowercase(),
                    });
                }
                RawHost::Subdomains(suffix)
            }
            _ if host.contains('*') => return Err(wildcard()),
            _ => {
                check_name(host).map_err(syntax)?;
                RawHost::Name(host)
            }
        };
        (host, port)
    };
    let port = match port {
        None => RawPort::Absent,
        Some("*") if wildcards => RawPort::Any,
        Some(p) if p.contains('*') => return Err(wildcard()),
        Some("") => return Err(syntax("empty port")),
        Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(syntax("port is not a number"))
        }
        Some(p) => RawPort::Num(p.parse().map_err(|_| syntax("port is out of range"))?),
    };
    Ok(Some(Parts { scheme, host, port }))
}

/// A borrowed, parsed origin; scheme and host may be in any case.
enum OriginView<'a> {
    Null,
    Tuple {
        scheme: &'a str,
        host: HostView<'a>,
        /// Explicit or implied by the scheme; `None` for schemes without a default.
        port: Option<u16>,
    },
}

/// A borrowed origin host.
enum HostView<'a> {
    Name(&'a str),
    V6(Ipv6Addr),
}

/// Parses a header value into a view without allocating (except on error).
fn parse_view(s: &str) -> Result<OriginView<'_>, OriginError> {
    let Some(parts) = parse_parts(s, false)? else {
        return Ok(OriginView::Null);
    };
    let host = match parts.host {
        RawHost::Name(h) => HostView::Name(h),
        RawHost::V6(a) => HostView::V6(a),
        // parse_parts never yields this without `wildcards`; refuse rather than panic.
        RawHost::Subdomains(_) => {
            return Err(OriginError::Syntax {
                value: echo(s),
                reason: "`*` is not allowed",
            })
        }
    };
    let port = match parts.port {
        RawPort::Num(p) => Some(p),
        RawPort::Absent | RawPort::Any => default_port(parts.scheme),
    };
    Ok(OriginView::Tuple {
        scheme: parts.scheme,
        host,
        port,
    })
}

/// A parsed `Origin` header value (RFC 6454 serialized origin, or `null`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    kind: OriginKind,
}

/// Owned, lowercased form of [`OriginView`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginKind {
    Null,
    Tuple {
        scheme: Box<str>,
        host: OwnedHost,
        port: Option<u16>,
    },
}

/// Owned, lowercased form of [`HostView`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum OwnedHost {
    Name(Box<str>),
    V6(Ipv6Addr),
}

impl Origin {
    /// Parses an `Origin` header value; anything but `scheme://host[:port][/]` or `null` is an error.
    pub fn parse(s: &str) -> Result<Self, OriginError> {
        let kind = match parse_view(s)? {
            OriginView::Null => OriginKind::Null,
            OriginView::Tuple { scheme, host, port } => OriginKind::Tuple {
                scheme: scheme.to_ascii_lowercase().into(),
                host: match host {
                    HostView::Name(h) => OwnedHost::Name(h.to_ascii_lowercase().into()),
                    HostView::V6(a) => OwnedHost::V6(a),
                },
                port,
            },
        };
        Ok(Self { kind })
    }

    /// Borrows this origin in the form the matcher works on.
    fn view(&self) -> OriginView<'_> {
        match &self.kind {
            OriginKind::Null => OriginView::Null,
            OriginKind::Tuple { scheme, host, port } => OriginView::Tuple {
                scheme,
                host: match host {
                    OwnedHost::Name(h) => HostView::Name(h),
                    OwnedHost::V6(a) => HostView::V6(*a),
                },
                port: *port,
            },
        }
    }
}

/// The host part of a pattern, lowercased once at parse time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(Box<str>),
    V6(Ipv6Addr),
    /// `*.example.com`, stored as `.example.com` so one `ends_with` both
    /// anchors at a label boundary and excludes the bare domain.
    Subdomains(Box<str>),
}

impl HostPattern {
    fn matches(&self, host: &HostView<'_>) -> bool {
        match (self, host) {
            (Self::Exact(p), HostView::Name(h)) => p.eq_ignore_ascii_case(h),
            (Self::V6(p), HostView::V6(a)) => p == a,
            (Self::Subdomains(dot_suffix), HostView::Name(h)) => h
                .len()
                .checked_sub(dot_suffix.len())
                // > 0: at least one label before the dot (never the bare domain).
                .filter(|&start| start > 0)
                .and_then(|start| h.get(start..))
                .is_some_and(|tail| tail.eq_ignore_ascii_case(dot_suffix)),
            _ => false,
        }
    }
}

/// The port part of a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    /// `:*`.
    Any,
    /// Explicit or implied by the scheme; `None` for schemes without a default.
    Exact(Option<u16>),
}

/// The parsed form of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternKind {
    Null,
    Tuple {
        scheme: Box<str>,
        host: HostPattern,
        port: PortPattern,
    },
}

/// One parsed `origins.allow` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    raw: Box<str>,
    kind: PatternKind,
}

impl OriginPattern {
    /// Parses `scheme://host[:port]`, `scheme://*.host[:port]`, `…:*` or `null`.
    pub fn parse(s: &str) -> Result<Self, OriginError> {
        let kind = match parse_parts(s, true)? {
            None => PatternKind::Null,
            Some(parts) => PatternKind::Tuple {
                scheme: parts.scheme.to_ascii_lowercase().into(),
                host: match parts.host {
                    RawHost::Name(h) => HostPattern::Exact(h.to_ascii_lowercase().into()),
                    RawHost::V6(a) => HostPattern::V6(a),
                    RawHost::Subdomains(suffix) => {
                        HostPattern::Subdomains(format!(".{}", suffix.to_ascii_lowercase()).into())
                    }
                },
                port: match parts.port {
                    RawPort::Any => PortPattern::Any,
                    RawPort::Num(p) => PortPattern::Exact(Some(p)),
                    RawPort::Absent => PortPattern::Exact(default_port(parts.scheme)),
                },
            },
        };
        Ok(Self {
            raw: s.into(),
            kind,
        })
    }

    /// True when `origin` is allowed by this pattern.
    pub fn matches(&self, origin: &Origin) -> bool {
        self.matches_view(&origin.view())
    }

    /// Matching on the borrowed form; shared by [`Self::matches`] and [`OriginPolicy::check`].
    fn matches_view(&self, origin: &OriginView<'_>) -> bool {
        match (&self.kind, origin) {
            (PatternKind::Null, OriginView::Null) => true,
            (
                PatternKind::Tuple {
                    scheme: ps,
                    host: ph,
                    port: pp,
                },
                OriginView::Tuple { scheme, host, port },
            ) => {
                (*pp == PortPattern::Any || *pp == PortPattern::Exact(*port))
                    && ps.eq_ignore_ascii_case(scheme)
                    && ph.matches(host)
            }
            _ => false,
        }
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// The `[origins]` section: the parsed allowlist and `allow_missing`.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    patterns: Vec<OriginPattern>,
    allow_missing: bool,
}

impl OriginPolicy {
    /// Parses every entry of `origins.allow`; the error names the first bad entry by index.
    pub fn new(allow: &[String], allow_missing: bool) -> Result<Self, OriginError> {
        let patterns = allow
            .iter()
            .enumerate()
            .map(|(index, s)| {
                OriginPattern::parse(s).map_err(|e| OriginError::Entry {
                    index,
                    error: Box::new(e),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            patterns,
            allow_missing,
        })
    }

    /// Every bad entry of `origins.allow`, each named by index (check-config
    /// reports them all at once).
    pub fn problems(allow: &[String]) -> Vec<OriginError> {
        allow
            .iter()
            .enumerate()
            .filter_map(|(index, s)| {
                OriginPattern::parse(s).err().map(|e| OriginError::Entry {
                    index,
                    error: Box::new(e),
                })
            })
            .collect()
    }

    /// Decides on an upgrade request given its `Origin` header, if any.
    pub fn check(&self, origin: Option<&str>) -> Result<(), OriginDenied> {
        let Some(raw) = origin else {
            return if self.allow_missing {
                Ok(())
            } else {
                Err(OriginDenied::Missing)
            };
        };
        let view = parse_view(raw).map_err(|e| OriginDenied::Malformed(e.to_string()))?;
        if self.patterns.iter().any(|p| p.matches_view(&view)) {
            Ok(())
        } else {
            Err(OriginDenied::NotAllowed(echo(raw)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pat(s: &str) -> OriginPattern {
        OriginPattern::parse(s).unwrap_or_else(|e| panic!("pattern {s}: {e}"))
    }

    fn org(s: &str) -> Origin {
        Origin::parse(s).unwrap_or_else(|e| panic!("origin {s}: {e}"))
    }

    fn m(p: &str, o: &str) -> bool {
        pat(p).matches(&org(o))
    }

    fn policy(allow: &[&str], allow_missing: bool) -> OriginPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(&allow, allow_missing).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn exact_match() {
        assert!(m("https://app.example.com", "https://app.example.com"));
        assert!(!m("https://app.example.com", "https://other.example.com"));
        assert!(!m(
            "https://app.example.com",
            "https://app.example.com.evil.net"
        ));
        assert!(!m("https://app.example.com", "https://xapp.example.com"));
    }

    #[test]
    fn scheme_must_match() {
        assert!(!m("https://a.com", "http://a.com"));
        assert!(!m("http://a.com", "https://a.com"));
        assert!(!m("https://a.com:443", "wss://a.com:443"));
    }

    #[test]
    fn subdomain_wildcard() {
        let p = "https://*.example.com";
        assert!(m(p, "https://a.example.com"));
        assert!(m(p, "https://a.b.example.com"));
        assert!(m(p, "https://A.Example.COM"));
        assert!(m(p, "https://a.example.com:443"));
        assert!(!m(p, "https://example.com"));
        assert!(!m(p, "https://example.com.evil.net"));
        assert!(!m(p, "https://badexample.com"));
        assert!(!m(p, "https://a.example.com.evil.net"));
        assert!(!m(p, "https://a.badexample.com"));
        assert!(!m(p, "http://a.example.com"));
        assert!(!m(p, "https://a.example.com:8443"));
        assert!(!m(p, "https://[::1]"));
        assert!(!m(p, "null"));
    }

    #[test]
    fn port_wildcard() {
        let p = "http://localhost:*";
        assert!(m(p, "http://localhost"));
        assert!(m(p, "http://localhost:80"));
        assert!(m(p, "http://localhost:3000"));
        assert!(m(p, "http://localhost:65535"));
        assert!(!m(p, "https://localhost:3000"));
        assert!(!m(p, "http://localhost.evil.net:3000"));
        assert!(m("https://*.example.com:*", "https://a.example.com:1234"));
        assert!(!m("https://*.example.com:*", "https://example.com:1234"));
    }

    #[test]
    fn default_ports_are_implied() {
        assert!(m("https://a.com", "https://a.com:443"));
        assert!(m("https://a.com:443", "https://a.com"));
        assert!(m("http://a.com", "http://a.com:80"));
        assert!(m("http://a.com:80", "http://a.com"));
        assert!(m("wss://a.com", "wss://a.com:443"));
        assert!(m("ws://a.com:80", "ws://a.com"));
        assert!(!m("https://a.com:8443", "https://a.com"));
        assert!(!m("https://a.com", "https://a.com:8443"));
        assert!(!m("http://a.com", "http://a.com:443"));
        assert!(!m("https://a.com", "https://a.com:80"));
        // No default port for unknown schemes: only an identical port matches.
        assert!(m("app://x", "app://x"));
        assert!(!m("app://x", "app://x:1"));
        assert!(m("app://x:*", "app://x:1"));
    }

    #[test]
    fn case_insensitive_scheme_and_host() {
        assert!(m("https://App.Example.com", "HTTPS://app.EXAMPLE.com"));
        assert!(m("HTTPS://*.EXAMPLE.COM", "https://a.example.com"));
        assert_eq!(org("HTTPS://A.COM"), org("https://a.com:443"));
    }

    #[test]
    fn ipv6_hosts() {
        assert!(m("http://[::1]", "http://[::1]"));
        assert!(m("http://[::1]", "http://[::1]:80"));
        assert!(m("http://[::1]:8080", "http://[::1]:8080"));
        assert!(m("http://[::1]:*", "http://[::1]:8080"));
        assert!(m("http://[::1]", "http://[0:0::1]"));
        assert!(m("http://[2001:DB8::1]", "http://[2001:db8::1]"));
        assert!(!m("http://[::1]", "http://[::2]"));
        assert!(!m("http://[::1]:8080", "http://[::1]"));
        assert!(!m("http://[::1]", "http://localhost"));
        for bad in [
            "http://[::1",
            "http://[zz::1]",
            "http://[::1]x",
            "http://[::1]:",
            "http://[]",
            "http://[fe80::1%25eth0]",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
        assert!(OriginPattern::parse("http://*.[::1]").is_err());
    }

    #[test]
    fn null_origin() {
        assert!(m("null", "null"));
        assert!(!m("null", "https://a.com"));
        assert!(!m("https://a.com", "null"));
        let without = policy(&["https://a.com"], false);
        assert_eq!(
            without.check(Some("null")),
            Err(OriginDenied::NotAllowed("null".into()))
        );
        assert_eq!(policy(&["null"], false).check(Some("null")), Ok(()));
        // Only the exact lowercase literal is the null origin.
        assert!(Origin::parse("NULL").is_err());
        assert!(Origin::parse("null/").is_err());
    }

    #[test]
    fn trailing_slash_tolerated_once_in_patterns_only() {
        assert!(m("https://a.com/", "https://a.com"));
        assert!(OriginPattern::parse("https://a.com//").is_err());
        // An Origin header is a serialized origin: no path, not even "/".
        assert!(Origin::parse("https://a.com/").is_err());
        let p = policy(&["https://a.com"], false);
        assert!(p.check(Some("https://a.com/")).is_err());
        assert!(p.check(Some("https://a.com")).is_ok());
    }

    #[test]
    fn malformed_origins() {
        for bad in [
            "",
            "a.com",
            "https//a.com",
            "://a.com",
            "1http://a.com",
            "ht tp://a.com",
            "https://",
            "https://:443",
            "https://a.com/path",
            "https://a.com/?q",
            "https://a.com?q=1",
            "https://a.com#frag",
            "https://user@a.com",
            "https://user:pw@a.com",
            "https://a.com:",
            "https://a.com:http",
            "https://a.com:-1",
            "https://a.com:+1",
            "https://a.com:65536",
            "https://a.com:99999999999",
            "https://a.com:1:2",
            "https://a..com",
            "https://.a.com",
            "https://a.com.",
            "https://*.a.com",
            "https://a.com:*",
            " https://a.com",
            "https://a.com ",
            "https://a .com",
            "https://a.com\t",
            "https://a.com\r\n",
            "https://a.com, https://b.com",
            "https://bücher.de",
            "https://a$b.com",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad:?} parsed");
            let denied = policy(&["https://a.com:*", "https://*.a.com"], true).check(Some(bad));
            assert!(
                matches!(denied, Err(OriginDenied::Malformed(_))),
                "{bad:?}: {denied:?}"
            );
        }
        assert!(Origin::parse("https://a.com:65535").is_ok());
        assert!(Origin::parse("chrome-extension://abcdef").is_ok());
        assert!(Origin::parse("https://my_host.a.com").is_ok());
    }

    #[test]
    fn bad_wildcards_are_errors() {
        for bad in [
            "https://*",
            "https://*.",
            "https://*example.com",
            "https://a.*.com",
            "https://*.*.com",
            "https://**.a.com",
            "https://a.com*",
            "*://a.com",
            "http*://a.com",
            "https://a.com:8*",
            "https://a.com:**",
            "*",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad} parsed");
        }
        assert!(matches!(
            OriginPattern::parse("https://a.*.com"),
            Err(OriginError::Wildcard { .. })
        ));
    }

    #[test]
    fn wildcards_over_a_public_suffix_are_errors() {
        for (bad, suffix) in [
            ("https://*.com", "com"),
            ("https://*.CO.UK", "co.uk"),
            ("https://*.github.io:*", "github.io"),
            ("http://*.uk", "uk"),
        ] {
            let err = OriginPattern::parse(bad).expect_err(bad);
            assert_eq!(
                err,
                OriginError::PublicSuffix {
                    value: bad.to_string(),
                    suffix: suffix.to_string()
                }
            );
            assert!(err.to_string().contains("public suffix"), "{err}");
        }
        // A registrable domain under them, and names the list does not know.
        for ok in [
            "https://*.example.com",
            "https://*.example.co.uk",
            "https://*.me.github.io",
            "http://*.localhost:*",
            "https://*.corp.internal",
            // Exact hosts are never wildcards, whatever they are.
            "https://github.io",
        ] {
            assert!(OriginPattern::parse(ok).is_ok(), "{ok} refused");
        }
    }

    #[test]
    fn bad_patterns_are_errors() {
        for bad in [
            "",
            "htp//x",
            "https://a.com/x",
            "https://u@a.com",
            "https://a.com:70000",
            "https:// a.com",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn display_is_as_written() {
        for s in [
            "https://*.Example.com",
            "http://localhost:*",
            "null",
            "http://[::1]:8080/",
        ] {
            assert_eq!(pat(s).to_string(), s);
        }
    }

    #[test]
    fn policy_error_names_the_entry() {
        let allow = vec!["https://a.com".to_string(), "null".into(), "htp//x".into()];
        let err = OriginPolicy::new(&allow, false).map(|_| ()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("origins.allow[2]: `htp//x` is not scheme://host[:port]"),
            "{msg}"
        );
        assert!(matches!(err, OriginError::Entry { index: 2, .. }));
    }

    #[test]
    fn policy_check() {
        let p = policy(
            &[
                "https://app.example.com",
                "https://*.example.com",
                "http://localhost:*",
            ],
            false,
        );
        assert_eq!(p.check(Some("https://app.example.com")), Ok(()));
        assert_eq!(p.check(Some("https://x.y.example.com")), Ok(()));
        assert_eq!(p.check(Some("http://localhost:5173")), Ok(()));
        assert_eq!(p.check(None), Err(OriginDenied::Missing));
        assert_eq!(
            p.check(Some("https://evil.example")),
            Err(OriginDenied::NotAllowed("https://evil.example".into()))
        );
        assert_eq!(
            p.check(Some("https://example.com.evil.net")),
            Err(OriginDenied::NotAllowed(
                "https://example.com.evil.net".into()
            ))
        );
        assert!(matches!(
            p.check(Some("https://a.example.com/x")),
            Err(OriginDenied::Malformed(_))
        ));
        assert_eq!(policy(&[], true).check(None), Ok(()));
        assert_eq!(
            policy(&[], true).check(Some("https://a.com")),
            Err(OriginDenied::NotAllowed("https://a.com".into()))
        );
    }

    #[test]
    fn denial_messages() {
        assert_eq!(OriginDenied::Missing.to_string(), "missing Origin header");
        assert_eq!(
            OriginDenied::NotAllowed("https://evil.example".into()).to_string(),
            "origin not allowed: https://evil.example"
        );
        let p = policy(&["https://a.com"], false);
        let msg = p.check(Some("https://a.com/x")).map_err(|e| e.to_string());
        assert_eq!(
            msg,
            Err("malformed Origin header: `https://a.com/x` is not scheme://host[:port]: a path is not allowed".into())
        );
        // Long or hostile values are truncated and escaped in the message.
        let long = format!("https://{}.com\u{1}", "a".repeat(500));
        let Err(OriginDenied::Malformed(msg)) = p.check(Some(&long)) else {
            panic!("not malformed")
        };
        assert!(
            msg.len() < 300 && msg.contains('…') && !msg.contains('\u{1}'),
            "{msg}"
        );
    }

    proptest! {
        #[test]
        fn check_never_panics(s in any::<String>()) {
            let p = policy(&["https://*.example.com", "http://[::1]:*", "null", "app://x"], false);
            let _ = p.check(Some(&s));
            let _ = OriginPattern::parse(&s);
        }

        #[test]
        fn check_never_panics_on_origin_like(s in "[a-zA-Z0-9:/\\[\\]*.@?#% _-]{0,40}") {
            let p = policy(&["https://*.example.com", "http://[::1]:*", "null", "http://a:*"], false);
            let _ = p.check(Some(&s));
            if let Ok(pattern) = OriginPattern::parse(&s) {
                prop_assert_eq!(pattern.to_string(), s.clone());
                if let Ok(o) = Origin::parse(&s) {
                    // A wildcard-free pattern matches its own origin.
                    prop_assert!(pattern.matches(&o));
                }
            }
        }

        #[test]
        fn subdomain_wildcard_is_anchored(
            h in "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}",
            s in "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?",
        ) {
            // `s.h.evil` is a genuine subdomain of h when h ends with `.evil`.
            prop_assume!(h.rsplit('.').next() != Some("evil"));
            // `*.com` and the like are refused (wildcards_over_a_public_suffix_are_errors).
            prop_assume!(!is_public_suffix(&h));
            let p = pat(&format!("https://*.{h}"));
            let subdomain = format!("https://{s}.{h}");
            let nested = format!("https://{s}.{s}.{h}");
            let bare = format!("https://{h}");
            let suffixed = format!("https://{s}.{h}.evil");
            let glued = format!("https://x{h}");
            prop_assert!(p.matches(&org(&subdomain)));
            prop_assert!(p.matches(&org(&nested)));
            prop_assert!(!p.matches(&org(&bare)));
            prop_assert!(!p.matches(&org(&suffixed)));
            prop_assert!(!p.matches(&org(&glued)));
        }

        #[test]
        fn exact_host_is_case_insensitive(
            h in "[a-z]{1,8}(\\.[a-z0-9]{1,8}){0,3}",
            mask in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let mixed: String = h
                .chars()
                .zip(mask.iter().cycle())
                .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
                .collect();
            let lower = format!("https://{h}");
            let upper = format!("https://{mixed}");
            let longer = format!("https://{mixed}x");
            prop_assert!(m(&lower, &upper));
            prop_assert!(m(&upper, &lower));
            prop_assert!(!m(&lower, &longer));
        }
    }
}
