//! Settings: the types of CONTRACT §2, loading (TOML file, then
//! `WSBROKER__SECTION__KEY` environment overrides, via the `config` crate) and
//! validation that reports every problem as one line naming its key.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Map, Value, ValueKind};

/// Every problem found while loading, one line each (`key: what is wrong`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

/// What happens when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Discard the oldest queued message to make room.
    DropOldest,
    /// Discard the new message.
    DropNewest,
    /// Close the connection with 1008 "slow consumer".
    Disconnect,
}

/// Lowest TLS protocol version offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMinVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Addresses to listen on for wss.
    pub listen: Vec<SocketAddr>,
    /// The WebSocket endpoint path.
    pub path: String,
    /// Connection limit across all listeners.
    pub max_connections: usize,
    /// Per source address limit; 0 disables it.
    pub max_connections_per_ip: usize,
    /// Budget for TCP accept -> TLS -> HTTP upgrade.
    pub handshake_timeout: Duration,
    /// Largest accepted WebSocket message (and frame) in bytes.
    pub max_message_size: usize,
    /// Window over which shutdown closes are spread.
    pub shutdown_grace: Duration,
}

/// `tls.cert` when the file does not set it (outside `--dev`).
pub const DEFAULT_CERT: &str = "/etc/wsbroker/tls/cert.pem";
/// `tls.key` when the file does not set it (outside `--dev`).
pub const DEFAULT_KEY: &str = "/etc/wsbroker/tls/key.pem";

/// `[tls]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first; `None` only in dev mode (generated)
    /// when the file sets neither path.
    pub cert: Option<PathBuf>,
    /// PEM private key; `None` only in dev mode (generated) when the file
    /// sets neither path.
    pub key: Option<PathBuf>,
    /// Lowest protocol version offered.
    pub min_version: TlsMinVersion,
    /// CA for client certificates (mTLS); `None` disables client auth.
    pub client_ca: Option<PathBuf>,
    /// Stateless session tickets (TLS 1.3 and 1.2) for resumption (CONTRACT §12).
    pub session_tickets: bool,
}

/// `[origins]`.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginSettings {
    /// Allowlist patterns.
    pub allow: Vec<String>,
    /// Whether a request without an Origin header is accepted.
    pub allow_missing: bool,
}

/// `[connection]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionSettings {
    /// Outbound messages buffered per connection.
    pub queue_capacity: usize,
    /// Outbound payload bytes buffered per connection.
    pub queue_max_bytes: usize,
    /// Policy when the outbound queue is full.
    pub overflow: Overflow,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Client frames per second (token bucket, burst 2x); 0 disables the limit.
    pub max_inbound_rate: u32,
    /// Interval between server Pings.
    pub ping_interval: Duration,
    /// Silence after which a connection is closed.
    pub idle_timeout: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    /// Plain-HTTP admin address; `None` (empty string) disables the listener.
    pub listen: Option<SocketAddr>,
    /// Bearer token for POST /publish; empty disables the endpoint.
    pub publish_token: String,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    /// tracing filter directive, e.g. `info,wsbroker=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// `auth.mode` (CONTRACT §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Anyone admitted by `[origins]` may subscribe and publish anything.
    None,
    /// Permissions come from JWTs.
    Jwt,
}

/// `[auth]` (CONTRACT §10). Key files are read by `crate::auth`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthSettings {
    /// `none` or `jwt`.
    pub mode: AuthMode,
    /// HMAC secret for HS256/384/512.
    pub hmac_secret_file: Option<PathBuf>,
    /// PEM files: SPKI public keys or X.509 certificates.
    pub public_keys: Vec<PathBuf>,
    /// A JWKS document on disk.
    pub jwks_file: Option<PathBuf>,
    /// https URL of a JWKS.
    pub jwks_url: Option<String>,
    /// How often `jwks_url` is fetched again.
    pub jwks_refresh: Duration,
    /// CA for `jwks_url` (default: the system trust store).
    pub jwks_ca: Option<PathBuf>,
    /// Accept `?token=` on the WebSocket URL.
    pub allow_query_token: bool,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` member, when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Time a connection without permissions has to send a valid `auth` op.
    pub auth_timeout: Duration,
    /// Patterns a connection without a token may subscribe to.
    pub anonymous_subscribe: Vec<String>,
    /// Topic patterns a connection without a token may publish to.
    pub anonymous_publish: Vec<String>,
    /// Granted to every valid token in addition to its claims.
    pub default_subscribe: Vec<String>,
    /// Granted to every valid token in addition to its claims.
    pub default_publish: Vec<String>,
}

/// `[cluster]` (CONTRACT §11): several nodes as one broker over NATS.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// NATS server URLs (`nats://` or `tls://`); empty: single node.
    pub nats_url: Vec<String>,
    /// Topic `T` travels on the NATS subject `<subject_prefix>.T`.
    pub subject_prefix: String,
    /// This node's name (logs, `/readyz`, the NATS client name).
    pub node_name: String,
    /// A NATS `.creds` file (JWT + NKey seed).
    pub nats_creds: Option<PathBuf>,
    /// NATS user (with `nats_password`).
    pub nats_user: String,
    /// NATS password.
    pub nats_password: String,
    /// NATS token.
    pub nats_token: String,
    /// PEM CA for `tls://` URLs; `None`: the system trust store.
    pub nats_ca: Option<PathBuf>,
    /// `/readyz` answers 503 once the NATS link has been down this long; zero: never.
    pub unready_after: Duration,
}

impl ClusterSettings {
    /// True when at least one NATS URL is configured.
    pub fn enabled(&self) -> bool {
        !self.nats_url.is_empty()
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `[server]`
    pub server: ServerSettings,
    /// `[tls]`
    pub tls: TlsSettings,
    /// `[origins]`
    pub origins: OriginSettings,
    /// `[connection]`
    pub connection: ConnectionSettings,
    /// `[admin]`
    pub admin: AdminSettings,
    /// `[log]`
    pub log: LogSettings,
    /// `[auth]`
    pub auth: AuthSettings,
    /// `[cluster]`
    pub cluster: ClusterSettings,
    /// True when started with `--dev` (generated certificate when none is configured).
    pub dev: bool,
}

/// Where settings come from.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// TOML file; optional only with `dev`.
    pub path: Option<PathBuf>,
    /// Start from the built-in development defaults.
    pub dev: bool,
    /// Environment to read overrides from; `None` reads the process environment.
    pub env: Option<HashMap<String, String>>,
}

/// A parse error as one line (`config: FILE: TOML parse error at line 1,
/// column 8: unclosed table, expected ]`): the TOML parser's message spans
/// several lines with a source excerpt, and check-config promises one line
/// per problem.
fn one_line_error(message: &str, path: Option<&Path>) -> String {
    let parts: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| {
            // Drop the excerpt (`1 | [server`, `|   ^`) and the crate's own
            // relative-path suffix when the path is known.
            let excerpt = l.starts_with('|')
                || l.split_once(" |")
                    .is_some_and(|(n, _)| n.trim().parse::<u32>().is_ok());
            let suffix = path.is_some() && l.starts_with("in ");
            !(l.is_empty() || excerpt || suffix)
        })
        .collect();
    match path {
        Some(p) => format!("config: {}: {}", p.display(), parts.join(": ")),
        None => format!("config: {}", parts.join(": ")),
    }
}

/// Every key the file may contain, by section.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "server",
        &[
            "listen",
            "path",
            "max_connections",
            "max_connections_per_ip",
            "handshake_timeout",
            "max_message_size",
            "shutdown_grace",
        ],
    ),
    (
        "tls",
        &["cert", "key", "min_version", "client_ca", "session_tickets"],
    ),
    ("origins", &["allow", "allow_missing"]),
    (
        "connection",
        &[
            "queue_capacity",
            "queue_max_bytes",
            "overflow",
            "max_subscriptions",
            "max_inbound_rate",
            "ping_interval",
            "idle_timeout",
        ],
    ),
    ("admin", &["listen", "publish_token"]),
    ("log", &["level", "format"]),
    (
        "auth",
        &[
            "mode",
            "hmac_secret_file",
            "public_keys",
            "jwks_file",
            "jwks_url",
            "jwks_refresh",
            "jwks_ca",
            "allow_query_token",
            "issuer",
            "audience",
            "leeway",
            "auth_timeout",
            "anonymous_subscribe",
            "anonymous_publish",
            "default_subscribe",
            "default_publish",
        ],
    ),
    (
        "cluster",
        &[
            "nats_url",
            "subject_prefix",
            "node_name",
            "nats_creds",
            "nats_user",
            "nats_password",
            "nats_token",
            "nats_ca",
            "unready_after",
        ],
    ),
];

/// The longest duration any key accepts (100 years).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Origins allowed by `--dev`.
pub const DEV_ORIGINS: &[&str] = &[
    "http://localhost:*",
    "http://127.0.0.1:*",
    "https://localhost:*",
    "https://127.0.0.1:*",
];

impl Settings {
    /// Loads file + environment and validates everything, TLS files included.
    pub fn load(opts: &LoadOptions) -> Result<Settings, ConfigErrors> {
        Self::load_with(opts, true)
    }

    /// Settings that are valid but probably not what the operator meant,
    /// one line each naming the key (logged by `serve`, printed by
    /// `check-config`, neither fails).
    pub fn warnings(&self) -> Vec<String> {
        let c = &self.connection;
        let mut out = Vec::new();
        if c.idle_timeout <= c.ping_interval {
            out.push(format!(
                "connection.idle_timeout: {} is not longer than connection.ping_interval ({}): \
                 a client that only answers pings is closed as idle",
                humantime::format_duration(c.idle_timeout),
                humantime::format_duration(c.ping_interval)
            ));
        }
        out
    }

    /// Loads and validates the syntax and values, without reading the TLS files.
    pub fn load_unchecked(opts: &LoadOptions) -> Result<Settings, ConfigErrors> {
        Self::load_with(opts, false)
    }

    /// Every problem in one pass: with `check_files`, the TLS files are
    /// checked even when other keys are wrong too.
    fn load_with(opts: &LoadOptions, check_files: bool) -> Result<Settings, ConfigErrors> {
        let mut builder = Config::builder();
        match &opts.path {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigErrors(vec![format!(
                        "config: file not found: {}",
                        path.display()
                    )]));
                }
                builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
            }
            None if !opts.dev => {
                return Err(ConfigErrors(vec![
                    "config: no --config FILE given (or use --dev)".to_string(),
                ]))
            }
            None => {}
        }
        let mut env = Environment::with_prefix("WSBROKER")
            .prefix_separator("__")
            .separator("__")
            // Values stay strings: typed keys parse strings themselves, and a
            // string key that looks like a number (tls.min_version = 1.3, a
            // numeric publish_token) must not become a float. Lists are split
            // on commas by `strings()`.
            .try_parsing(false);
        if let Some(map) = &opts.env {
            env = env.source(Some(map.clone()));
        }
        let one_line = |e: config::ConfigError| {
            ConfigErrors(vec![one_line_error(&e.to_string(), opts.path.as_deref())])
        };
        let cfg = builder.add_source(env).build().map_err(one_line)?;
        let root = cfg
            .try_deserialize::<Map<String, Value>>()
            .map_err(one_line)?;
        from_tree(root, opts.dev, check_files)
    }

    /// The defaults, as `serve --dev` starts (no file).
    pub fn dev_defaults() -> Settings {
        // Infallible by construction: the dev tree is empty.
        match from_tree(Map::new(), true, false) {
            Ok(s) => s,
            Err(e) => unreachable!("dev defaults are valid: {e}"),
        }
    }
}

/// Reads one section's values, recording each problem with its key.
struct Section<'a> {
    name: &'static str,
    values: Map<String, Value>,
    errors: &'a mut Vec<String>,
}

impl Section<'_> {
    fn take(&mut self, key: &str) -> Option<Value> {
        self.values.remove(key)
    }

    fn err(&mut self, key: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{}.{key}: {msg}", self.name));
    }

    fn string(&mut self, key: &str, default: &str) -> String {
        match self.take(key) {
            None => default.to_string(),
            Some(v) => match v.kind {
                ValueKind::String(s) => s,
                other => {
                    self.err(key, format!("expected a string, got {}", describe(&other)));
                    default.to_string()
                }
            },
        }
    }

    fn int(&mut self, key: &str, default: u64) -> u64 {
        match self.take(key) {
            None => default,
            Some(v) => {
                let parsed = match &v.kind {
                    ValueKind::I64(n) => u64::try_from(*n).ok(),
                    ValueKind::I128(n) => u64::try_from(*n).ok(),
                    ValueKind::U64(n) => Some(*n),
                    ValueKind::U128(n) => u64::try_from(*n).ok(),
                    ValueKind::String(s) => s.trim().parse::<u64>().ok(),
                    _ => None,
                };
                match parsed {
                    Some(n) => n,
                    None => {
                        self.err(
                            key,
                            format!("expected a non-negative integer, got {}", describe(&v.kind)),
                        );
                        default
                    }
                }
            }
        }
    }

    fn usize(&mut self, key: &str, default: usize) -> usize {
        let n = self.int(key, default as u64);
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    fn positive(&mut self, key: &str, default: usize) -> usize {
        let n = self.usize(key, default);
        if n == 0 {
            self.err(key, "must be greater than 0");
            return default;
        }
        n
    }

    fn bool(&mut self, key: &str, default: bool) -> bool {
        match self.take(key) {
            None => default,
            Some(v) => match v.kind {
                ValueKind::Boolean(b) => b,
                ValueKind::String(ref s) if s.eq_ignore_ascii_case("true") => true,
                ValueKind::String(ref s) if s.eq_ignore_ascii_case("false") => false,
                other => {
                    self.err(
                        key,
                        format!("expected true or false, got {}", describe(&other)),
                    );
                    default
                }
            },
        }
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        match self.take(key) {
            None => default,
            Some(v) => {
                match v.kind {
                    ValueKind::String(s) => match humantime::parse_duration(s.trim()) {
                        Ok(d) if d > MAX_DURATION => {
                            // Deadlines are `Instant + duration`: an absurd
                            // value would overflow there, at run time.
                            self.err(key, "must be at most 100 years");
                            default
                        }
                        Ok(d) if !d.is_zero() => d,
                        Ok(_) => {
                            self.err(key, "must be greater than 0");
                            default
                        }
                        Err(e) => {
                            self.err(
                            key,
                            format!("invalid duration `{s}` ({e}); use e.g. \"250ms\", \"20s\", \"5m\""),
                        );
                            default
                        }
                    },
                    other => {
                        self.err(
                            key,
                            format!(
                                "expected a duration string like \"20s\", got {}",
                                describe(&other)
                            ),
                        );
                        default
                    }
                }
            }
        }
    }

    fn strings(&mut self, key: &str, default: &[&str]) -> Vec<String> {
        match self.take(key) {
            None => default.iter().map(|s| s.to_string()).collect(),
            Some(v) => match v.kind {
                ValueKind::String(s) => split_list(&s),
                ValueKind::Array(items) => {
                    let mut out = Vec::new();
                    for (i, item) in items.into_iter().enumerate() {
                        match item.kind {
                            ValueKind::String(s) => out.push(s),
                            other => self.err(
                                &format!("{key}[{i}]"),
                                format!("expected a string, got {}", describe(&other)),
                            ),
                        }
                    }
                    out
                }
                other => {
                    self.err(
                        key,
                        format!("expected a list of strings, got {}", describe(&other)),
                    );
                    default.iter().map(|s| s.to_string()).collect()
                }
            },
        }
    }

    fn path(&mut self, key: &str) -> Option<PathBuf> {
        let s = self.string(key, "");
        if s.trim().is_empty() {
            None
        } else {
            Some(PathBuf::from(s))
        }
    }

    /// Like `duration`, but "0s" is allowed (it means "never" for the key).
    fn duration_or_zero(&mut self, key: &str, default: Duration) -> Duration {
        match self.take(key) {
            Some(v)
                if matches!(&v.kind, ValueKind::String(s)
                    if humantime::parse_duration(s.trim()).is_ok_and(|d| d.is_zero())) =>
            {
                Duration::ZERO
            }
            Some(v) => {
                self.values.insert(key.to_string(), v);
                self.duration(key, default)
            }
            None => default,
        }
    }

    /// Reports every key left over: unknown keys must not pass silently.
    fn finish(self) {
        let mut left: Vec<_> = self.values.into_keys().collect();
        left.sort();
        for key in left {
            self.errors
                .push(format!("{}.{key}: unknown key", self.name));
        }
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn describe(kind: &ValueKind) -> String {
    match kind {
        ValueKind::Nil => "nothing".into(),
        ValueKind::Boolean(b) => format!("boolean {b}"),
        ValueKind::I64(n) => format!("integer {n}"),
        ValueKind::I128(n) => format!("integer {n}"),
        ValueKind::U64(n) => format!("integer {n}"),
        ValueKind::U128(n) => format!("integer {n}"),
        ValueKind::Float(f) => format!("float {f}"),
        ValueKind::String(s) => format!("string \"{s}\""),
        ValueKind::Table(_) => "a table".into(),
        ValueKind::Array(_) => "a list".into(),
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        format!("`{s}` is not an address:port (e.g. \"0.0.0.0:8443\" or \"[::]:8443\")")
    })
}

fn from_tree(
    mut root: Map<String, Value>,
    dev: bool,
    check_files: bool,
) -> Result<Settings, ConfigErrors> {
    let mut errors = Vec::new();
    let mut sections: HashMap<&'static str, Map<String, Value>> = HashMap::new();
    for (name, _) in KNOWN {
        if let Some(v) = root.remove(*name) {
            match v.kind {
                ValueKind::Table(t) => {
                    sections.insert(name, t);
                }
                other => errors.push(format!(
                    "{name}: expected a table [{name}], got {}",
                    describe(&other)
                )),
            }
        }
    }
    let mut unknown: Vec<_> = root.into_keys().collect();
    unknown.sort();
    for key in unknown {
        errors.push(format!("{key}: unknown section or key"));
    }
    let mut section = |name: &'static str| sections.remove(name).unwrap_or_default();

    let server = {
        let values = section("server");
        let mut s = Section {
            name: "server",
            values,
            errors: &mut errors,
        };
        let default_listen = if dev {
            "127.0.0.1:8443"
        } else {
            "0.0.0.0:8443"
        };
        let listen_raw = s.strings("listen", &[default_listen]);
        let mut listen = Vec::new();
        for (i, a) in listen_raw.iter().enumerate() {
            match parse_addr(a) {
                Ok(addr) => listen.push(addr),
                Err(e) => {
                    let key = if listen_raw.len() > 1 {
                        format!("listen[{i}]")
                    } else {
                        "listen".to_string()
                    };
                    s.err(&key, e)
                }
            }
        }
        if listen_raw.is_empty() {
            s.err("listen", "at least one address is required");
        }
        let path = s.string("path", "/ws");
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            s.err(
                "path",
                format!("`{path}` must start with `/` and contain no spaces"),
            );
        }
        let max_connections = s.positive("max_connections", 100_000);
        let max_connections_per_ip = s.usize("max_connections_per_ip", 0);
        let handshake_timeout = s.duration("handshake_timeout", Duration::from_secs(10));
        let max_message_size = s.usize("max_message_size", 65_536);
        if max_message_size < 64 {
            s.err("max_message_size", "must be at least 64 bytes");
        }
        let shutdown_grace = s.duration("shutdown_grace", Duration::from_secs(10));
        s.finish();
        ServerSettings {
            listen,
            path,
            max_connections,
            max_connections_per_ip,
            handshake_timeout,
            max_message_size: max_message_size.max(64),
            shutdown_grace,
        }
    };

    let tls = {
        let values = section("tls");
        let mut s = Section {
            name: "tls",
            values,
            errors: &mut errors,
        };
        let mut cert = s.path("cert");
        let mut key = s.path("key");
        if !dev {
            // The contract's paths are the defaults; a missing file is then
            // reported as `tls.cert: file not found: /etc/wsbroker/tls/…`.
            cert.get_or_insert_with(|| PathBuf::from(DEFAULT_CERT));
            key.get_or_insert_with(|| PathBuf::from(DEFAULT_KEY));
        }
        // Only `--dev` can leave them unset (outside it both have defaults).
        if cert.is_some() != key.is_some() {
            s.err("cert", "tls.cert and tls.key must be given together");
        }
        let min_version = match s.string("min_version", "1.2").as_str() {
            "1.2" => TlsMinVersion::Tls12,
            "1.3" => TlsMinVersion::Tls13,
            other => {
                s.err(
                    "min_version",
                    format!("`{other}` is not \"1.2\" or \"1.3\""),
                );
                TlsMinVersion::Tls12
            }
        };
        let client_ca = s.path("client_ca");
        let session_tickets = s.bool("session_tickets", true);
        s.finish();
        TlsSettings {
            cert,
            key,
            min_version,
            client_ca,
            session_tickets,
        }
    };

    let origins = {
        let values = section("origins");
        let mut s = Section {
            name: "origins",
            values,
            errors: &mut errors,
        };
        let default_allow: &[&str] = if dev { DEV_ORIGINS } else { &[] };
        let allow = s.strings("allow", default_allow);
        let allow_missing = s.bool("allow_missing", false);
        // Each error already names its entry (`origins.allow[i]: …`).
        for e in crate::origin::OriginPolicy::problems(&allow) {
            s.errors.push(e.to_string());
        }
        s.finish();
        OriginSettings {
            allow,
            allow_missing,
        }
    };

    let connection = {
        let values = section("connection");
        let mut s = Section {
            name: "connection",
            values,
            errors: &mut errors,
        };
        let queue_capacity = s.positive("queue_capacity", 1024);
        let queue_max_bytes = s.positive("queue_max_bytes", 1_048_576);
        let overflow = match s.string("overflow", "drop_oldest").as_str() {
            "drop_oldest" => Overflow::DropOldest,
            "drop_newest" => Overflow::DropNewest,
            "disconnect" => Overflow::Disconnect,
            other => {
                s.err(
                    "overflow",
                    format!("`{other}` is not \"drop_oldest\", \"drop_newest\" or \"disconnect\""),
                );
                Overflow::DropOldest
            }
        };
        let max_subscriptions = s.positive("max_subscriptions", 1000);
        let rate = s.int("max_inbound_rate", 1000);
        let max_inbound_rate = u32::try_from(rate).unwrap_or_else(|_| {
            s.err("max_inbound_rate", "too large");
            1000
        });
        let ping_interval = s.duration("ping_interval", Duration::from_secs(20));
        // idle_timeout <= ping_interval is legal (the contract sets no
        // bound, and a short idle cut is a fair choice); it is reported by
        // Settings::warnings instead.
        let idle_timeout = s.duration("idle_timeout", Duration::from_secs(60));
        s.finish();
        ConnectionSettings {
            queue_capacity,
            queue_max_bytes,
            overflow,
            max_subscriptions,
            max_inbound_rate,
            ping_interval,
            idle_timeout,
        }
    };

    let admin = {
        let values = section("admin");
        let mut s = Section {
            name: "admin",
            values,
            errors: &mut errors,
        };
        let raw = s.string("listen", "127.0.0.1:9090");
        let listen = if raw.trim().is_empty() {
            None
        } else {
            match parse_addr(&raw) {
                Ok(a) => Some(a),
                Err(e) => {
                    s.err("listen", e);
                    None
                }
            }
        };
        let publish_token = s.string("publish_token", "");
        s.finish();
        AdminSettings {
            listen,
            publish_token,
        }
    };

    let log = {
        let values = section("log");
        let mut s = Section {
            name: "log",
            values,
            errors: &mut errors,
        };
        let level = s.string("level", "info");
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
            s.err("level", format!("invalid filter `{level}`: {e}"));
        }
        let format = match s.string("format", "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                s.err("format", format!("`{other}` is not \"text\" or \"json\""));
                LogFormat::Text
            }
        };
        s.finish();
        LogSettings { level, format }
    };

    let auth = auth_section(section("auth"), &mut errors);

    let cluster = {
        let values = section("cluster");
        let mut s = Section {
            name: "cluster",
            values,
            errors: &mut errors,
        };
        let nats_url = s.strings("nats_url", &[]);
        for (i, url) in nats_url.iter().enumerate() {
            if let Err(e) = crate::cluster::check_url(url) {
                let key = if nats_url.len() > 1 {
                    format!("nats_url[{i}]")
                } else {
                    "nats_url".to_string()
                };
                s.err(&key, e);
            }
        }
        let subject_prefix = s.string("subject_prefix", "wsbroker");
        if let Err(e) = crate::protocol::validate_topic(&subject_prefix, false) {
            s.err(
                "subject_prefix",
                format!("`{subject_prefix}` is not a topic without wildcards: {e}"),
            );
        }
        let mut node_name = s.string("node_name", "");
        if node_name.trim().is_empty() {
            node_name = crate::cluster::default_node_name();
        } else if node_name.chars().any(|c| c.is_control()) {
            s.err("node_name", "must not contain control characters");
        }
        let nats_creds = s.path("nats_creds");
        let nats_user = s.string("nats_user", "");
        let nats_password = s.string("nats_password", "");
        let nats_token = s.string("nats_token", "");
        let nats_ca = s.path("nats_ca");
        let methods = [
            nats_creds.is_some(),
            !nats_user.is_empty() || !nats_password.is_empty(),
            !nats_token.is_empty(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            s.err(
                "nats_creds",
                "give one of nats_creds, nats_user/nats_password or nats_token",
            );
        }
        if nats_user.is_empty() != nats_password.is_empty() {
            s.err(
                "nats_user",
                "nats_user and nats_password must be given together",
            );
        }
        let unready_after = s.duration_or_zero("unready_after", Duration::from_secs(10));
        s.finish();
        ClusterSettings {
            nats_url,
            subject_prefix,
            node_name,
            nats_creds,
            nats_user,
            nats_password,
            nats_token,
            nats_ca,
            unready_after,
        }
    };

    if check_files {
        crate::tls::validate(&tls, &mut errors);
        crate::auth::validate(&auth, &mut errors);
        crate::cluster::validate_files(&cluster, &mut errors);
    }
    if errors.is_empty() {
        Ok(Settings {
            server,
            tls,
            origins,
            connection,
            admin,
            log,
            auth,
            cluster,
            dev,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads `[auth]`; pattern syntax is checked here, key files by
/// `crate::auth::validate` (only when files are checked).
fn auth_section(values: Map<String, Value>, errors: &mut Vec<String>) -> AuthSettings {
    let mut s = Section {
        name: "auth",
        values,
        errors,
    };
    let mode = match s.string("mode", "none").as_str() {
        "none" => AuthMode::None,
        "jwt" => AuthMode::Jwt,
        other => {
            s.err("mode", format!("`{other}` is not \"none\" or \"jwt\""));
            AuthMode::None
        }
    };
    let hmac_secret_file = s.path("hmac_secret_file");
    let public_keys = s
        .strings("public_keys", &[])
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let jwks_file = s.path("jwks_file");
    let jwks_url = Some(s.string("jwks_url", "")).filter(|u| !u.trim().is_empty());
    if let Some(url) = &jwks_url {
        if let Err(e) = crate::auth::jwks::parse_https_url(url) {
            s.err("jwks_url", e);
        }
    }
    let jwks_refresh = s.duration("jwks_refresh", Duration::from_secs(300));
    let jwks_ca = s.path("jwks_ca");
    let allow_query_token = s.bool("allow_query_token", false);
    let issuer = Some(s.string("issuer", "")).filter(|v| !v.is_empty());
    let audience = Some(s.string("audience", "")).filter(|v| !v.is_empty());
    // leeway may be zero ("0s").
    let leeway = s.duration_or_zero("leeway", Duration::from_secs(30));
    let auth_timeout = s.duration("auth_timeout", Duration::from_secs(10));
    let mut lists = Vec::new();
    for key in [
        "anonymous_subscribe",
        "anonymous_publish",
        "default_subscribe",
        "default_publish",
    ] {
        let list = s.strings(key, &[]);
        for (i, p) in list.iter().enumerate() {
            // Publish lists are patterns too: a grant may cover many topics.
            if let Err(e) = crate::auth::grants::validate_template(p) {
                s.err(&format!("{key}[{i}]"), format!("bad pattern `{p}`: {e}"));
            }
        }
        lists.push(list);
    }
    let [anonymous_subscribe, anonymous_publish, default_subscribe, default_publish]: [Vec<String>;
        4] = lists.try_into().unwrap_or_default();
    if mode == AuthMode::Jwt
        && hmac_secret_file.is_none()
        && jwks_file.is_none()
        && jwks_url.is_none()
        && Vec::<PathBuf>::is_empty(&public_keys)
    {
        s.err(
            "mode",
            "\"jwt\" needs at least one key: set auth.hmac_secret_file, auth.public_keys, \
             auth.jwks_file or auth.jwks_url",
        );
    }
    s.finish();
    AuthSettings {
        mode,
        hmac_secret_file,
        public_keys,
        jwks_file,
        jwks_url,
        jwks_refresh,
        jwks_ca,
        allow_query_token,
        issuer,
        audience,
        leeway,
        auth_timeout,
        anonymous_subscribe,
        anonymous_publish,
        default_subscribe,
        default_publish,
    }
}

/// Path of the file the settings came from, for reloads.
pub fn display_path(p: Option<&Path>) -> String {
    p.map(|p| p.display().to_string())
        .unwrap_or_else(|| "(built-in defaults)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let dir = tempfile::tempdir().map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        Settings::load_unchecked(&LoadOptions {
            path: Some(path),
            dev: false,
            env: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        })
    }

    const MIN: &str = "[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n";

    #[test]
    fn defaults_follow_the_contract() {
        let s = load_str(MIN, &[]).expect("valid");
        assert_eq!(s.server.listen, vec!["0.0.0.0:8443".parse().unwrap()]);
        assert_eq!(s.server.path, "/ws");
        assert_eq!(s.server.max_connections, 100_000);
        assert_eq!(s.server.handshake_timeout, Duration::from_secs(10));
        assert_eq!(s.connection.queue_capacity, 1024);
        assert_eq!(s.connection.overflow, Overflow::DropOldest);
        assert_eq!(s.connection.ping_interval, Duration::from_secs(20));
        assert_eq!(s.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert!(s.origins.allow.is_empty());
    }

    #[test]
    fn env_overrides_file() {
        let s = load_str(
            &format!("{MIN}[server]\nlisten = \"127.0.0.1:1\"\n"),
            &[
                ("WSBROKER__SERVER__LISTEN", "127.0.0.1:2,[::1]:3"),
                ("WSBROKER__CONNECTION__QUEUE_CAPACITY", "64"),
                ("WSBROKER__CONNECTION__OVERFLOW", "disconnect"),
                ("WSBROKER__ORIGINS__ALLOW", "https://a.com"),
                ("WSBROKER__TLS__MIN_VERSION", "1.3"),
                ("WSBROKER__ADMIN__PUBLISH_TOKEN", "12345"),
                ("WSBROKER__ORIGINS__ALLOW_MISSING", "true"),
            ],
        )
        .expect("valid");
        assert_eq!(
            s.server.listen,
            vec!["127.0.0.1:2".parse().unwrap(), "[::1]:3".parse().unwrap()]
        );
        assert_eq!(s.connection.queue_capacity, 64);
        assert_eq!(s.connection.overflow, Overflow::Disconnect);
        assert_eq!(s.origins.allow, vec!["https://a.com".to_string()]);
        assert_eq!(s.tls.min_version, TlsMinVersion::Tls13);
        assert_eq!(s.admin.publish_token, "12345");
        assert!(s.origins.allow_missing);
    }

    #[test]
    fn every_problem_is_one_line_naming_its_key() {
        let err = load_str(
            "[server]\nlisten = \"nope\"\nmax_conections = 5\nhandshake_timeout = \"ten\"\n\
             [connection]\noverflow = \"explode\"\nqueue_capacity = -1\n[bogus]\nx = 1\n",
            &[],
        )
        .expect_err("invalid");
        let text = err.to_string();
        for key in [
            "server.listen:",
            "server.max_conections: unknown key",
            "server.handshake_timeout:",
            "connection.overflow:",
            "connection.queue_capacity:",
            "bogus:",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(key)),
                "missing `{key}` in:\n{text}"
            );
        }
    }

    /// The contract's example paths are the defaults outside `--dev`.
    #[test]
    fn tls_paths_default_to_the_contracts() {
        let s = load_str("[origins]\nallow = [\"https://a.com\"]\n", &[]).expect("valid");
        assert_eq!(s.tls.cert.as_deref(), Some(Path::new(DEFAULT_CERT)));
        assert_eq!(s.tls.key.as_deref(), Some(Path::new(DEFAULT_KEY)));
        assert_eq!(DEFAULT_CERT, "/etc/wsbroker/tls/cert.pem");
        assert_eq!(DEFAULT_KEY, "/etc/wsbroker/tls/key.pem");
    }

    #[test]
    fn absurd_durations_are_refused_by_key() {
        let e = load_str(
            &format!("{MIN}[connection]\nidle_timeout = \"1000000000y\"\n"),
            &[],
        )
        .expect_err("too long");
        assert!(
            e.0.iter()
                .any(|l| l.starts_with("connection.idle_timeout: ") && l.contains("100 years")),
            "{e}"
        );
        let e = load_str(MIN, &[("WSBROKER__AUTH__LEEWAY", "200y")]).expect_err("too long");
        assert!(e.0.iter().any(|l| l.starts_with("auth.leeway: ")), "{e}");
    }

    #[test]
    fn durations_parse() {
        let s = load_str(
            &format!("{MIN}[connection]\nping_interval = \"250ms\"\nidle_timeout = \"5m\"\n"),
            &[],
        )
        .expect("valid");
        assert_eq!(s.connection.ping_interval, Duration::from_millis(250));
        assert_eq!(s.connection.idle_timeout, Duration::from_secs(300));
    }

    /// `[auth]` defaults are CONTRACT §10's; every key has an env override.
    #[test]
    fn auth_defaults_and_env_overrides() {
        let s = load_str(MIN, &[]).expect("valid");
        let a = &s.auth;
        assert_eq!(a.mode, AuthMode::None);
        assert_eq!(a.jwks_refresh, Duration::from_secs(300));
        assert_eq!(a.leeway, Duration::from_secs(30));
        assert_eq!(a.auth_timeout, Duration::from_secs(10));
        assert!(!a.allow_query_token);
        assert!(a.public_keys.is_empty() && a.anonymous_subscribe.is_empty());
        let s = load_str(
            MIN,
            &[
                ("WSBROKER__AUTH__MODE", "jwt"),
                ("WSBROKER__AUTH__PUBLIC_KEYS", "/a.pem,/b.pem"),
                ("WSBROKER__AUTH__JWKS_URL", "https://idp.example/jwks"),
                ("WSBROKER__AUTH__ALLOW_QUERY_TOKEN", "true"),
                ("WSBROKER__AUTH__LEEWAY", "0s"),
                ("WSBROKER__AUTH__DEFAULT_SUBSCRIBE", "user.{sub}.>,public.>"),
            ],
        )
        .expect("valid");
        assert_eq!(s.auth.mode, AuthMode::Jwt);
        assert_eq!(s.auth.public_keys.len(), 2);
        assert_eq!(s.auth.jwks_url.as_deref(), Some("https://idp.example/jwks"));
        assert!(s.auth.allow_query_token);
        assert_eq!(s.auth.leeway, Duration::ZERO);
        assert_eq!(s.auth.default_subscribe, vec!["user.{sub}.>", "public.>"]);
        let err = load_str(
            &format!("{MIN}[auth]\nmode = \"jwt\"\njwks_url = \"http://x/\"\nanonymous_publish = [\"a..b\"]\n"),
            &[],
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("auth.jwks_url:"), "{text}");
        assert!(
            text.contains("auth.anonymous_publish[0]: bad pattern"),
            "{text}"
        );
    }

    #[test]
    fn dev_defaults_allow_local_origins() {
        let s = Settings::dev_defaults();
        assert_eq!(s.server.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(s.origins.allow.len(), 4);
        assert!(s.tls.cert.is_none());
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let file = format!("[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n{toml}");
        super::tests::load_str(&file, env)
    }

    #[test]
    fn cluster_defaults_follow_the_contract() {
        let c = load("", &[]).expect("valid").cluster;
        assert!(!c.enabled());
        assert_eq!(c.subject_prefix, "wsbroker");
        assert_eq!(c.unready_after, Duration::from_secs(10));
        // Host name and pid.
        assert!(
            c.node_name.ends_with(&format!("-{}", std::process::id())),
            "{}",
            c.node_name
        );
        assert_eq!((c.nats_creds, c.nats_ca), (None, None));
    }

    #[test]
    fn cluster_keys_from_file_and_environment() {
        let s = load(
            "[cluster]\nnats_url = [\"nats://a:4222\"]\nunready_after = \"0s\"\nnode_name = \"n1\"\n",
            &[
                (
                    "WSBROKER__CLUSTER__NATS_URL",
                    "nats://10.0.0.5:4222,tls://10.0.0.6:4222",
                ),
                ("WSBROKER__CLUSTER__SUBJECT_PREFIX", "app.ws"),
                ("WSBROKER__CLUSTER__NATS_TOKEN", "12345"),
            ],
        )
        .expect("valid");
        let c = s.cluster;
        assert_eq!(
            c.nats_url,
            vec!["nats://10.0.0.5:4222", "tls://10.0.0.6:4222"]
        );
        assert_eq!(c.subject_prefix, "app.ws");
        assert_eq!(c.nats_token, "12345");
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.unready_after, Duration::ZERO);
        assert!(c.enabled());
    }

    #[test]
    fn cluster_mistakes_name_their_key() {
        let err = load(
            "[cluster]\nnats_url = \"ws://a:1\"\nsubject_prefix = \"a.>\"\nnats_user = \"u\"\nnats_token = \"t\"\nunready_after = 5\n",
            &[],
        )
        .expect_err("invalid")
        .to_string();
        for key in [
            "cluster.nats_url: ",
            "cluster.subject_prefix: ",
            "cluster.nats_creds: give one of",
            "cluster.nats_user: ",
            "cluster.unready_after: ",
        ] {
            assert!(
                err.lines().any(|l| l.starts_with(key)),
                "no `{key}` in:\n{err}"
            );
        }
    }
}
