//! The HTTP side of the WebSocket handshake (CONTRACT §3), done by hand so
//! every refusal is an HTTP status with a reason body, decided before the
//! upgrade: path (404), upgrade validity (426/400/431), Origin (403) and
//! connection limits (503 + Retry-After). A valid request gets the 101.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::metrics::RejectReason;
use crate::origin::OriginPolicy;

/// Largest request head accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 64;

/// A refused handshake: what to answer and how to count it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status code.
    pub status: u16,
    /// Body text (the reason).
    pub reason: String,
    /// Metric label.
    pub label: RejectReason,
    /// Extra response headers.
    pub headers: Vec<(&'static str, String)>,
}

impl Refusal {
    fn new(status: u16, label: RejectReason, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
            label,
            headers: Vec::new(),
        }
    }

    /// 401 for a token that does not verify (CONTRACT §3, §10): the body
    /// says why; the token itself is never echoed.
    pub fn auth(reason: impl Into<String>) -> Self {
        let mut r = Refusal::new(401, RejectReason::Auth, reason);
        r.headers
            .push(("WWW-Authenticate", r#"Bearer error="invalid_token""#.into()));
        r
    }

    /// 503 for a connection limit.
    pub fn limit(reason: impl Into<String>) -> Self {
        let mut r = Refusal::new(503, RejectReason::Limit, reason);
        r.headers.push(("Retry-After", "5".into()));
        r
    }
}

/// Failures while reading the request (the connection is simply closed).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Socket or TLS error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed before sending a full request.
    #[error("connection closed before the request was complete")]
    Eof,
}

/// A request that passed the path, upgrade and Origin checks.
#[derive(Debug)]
pub struct Accepted {
    /// `Sec-WebSocket-Accept` value to answer with.
    pub accept_key: String,
    /// Bytes the client sent after the request head (early frames).
    pub leftover: Vec<u8>,
    /// The Origin header, if any (for logs).
    pub origin: Option<String>,
    /// The subprotocol to select, when the client offered one we speak.
    pub protocol: Option<&'static str>,
    /// Tokens on the request (header, subprotocol, query), checked by the server.
    pub presented: crate::auth::Presented,
}

/// The subprotocol of CONTRACT §10: selected whenever offered, so browsers
/// (which fail a handshake that offered subprotocols and got none back)
/// can offer it beside `wsbroker.bearer.<jwt>`.
pub const SUBPROTOCOL: &str = "wsbroker.v1";

/// Prefix of the subprotocol entry that carries a token (CONTRACT §10).
pub const BEARER_PROTOCOL_PREFIX: &str = "wsbroker.bearer.";

/// What `evaluate` took from an acceptable request.
#[derive(Debug)]
pub struct Verdict {
    /// `Sec-WebSocket-Accept` value.
    pub accept_key: String,
    /// The Origin header, if any.
    pub origin: Option<String>,
    /// The subprotocol to select.
    pub protocol: Option<&'static str>,
    /// Tokens on the request.
    pub presented: crate::auth::Presented,
}

/// The rules a request is checked against.
pub struct Rules<'a> {
    /// Endpoint path.
    pub path: &'a str,
    /// Origin allowlist.
    pub origins: &'a OriginPolicy,
}

fn has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value)
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// Checks a parsed request head against the rules.
pub fn evaluate(req: &httparse::Request<'_, '_>, rules: &Rules<'_>) -> Result<Verdict, Refusal> {
    let target = req.path.unwrap_or("");
    let path = target.split(['?', '#']).next().unwrap_or("");
    // Absolute form (`GET https://host/ws`, RFC 9112 §3.2.2), which servers
    // must accept: the path is what follows the authority.
    let path = match path.split_once("://") {
        Some((_, rest)) if !path.starts_with('/') => rest.find('/').map_or("/", |i| &rest[i..]),
        _ => path,
    };
    if path != rules.path {
        return Err(Refusal::new(
            404,
            RejectReason::Path,
            format!(
                "not found: {path}; the WebSocket endpoint is {}",
                rules.path
            ),
        ));
    }
    if req.method != Some("GET") {
        return Err(Refusal::new(
            400,
            RejectReason::BadRequest,
            "a WebSocket upgrade must use GET",
        ));
    }
    if req.version != Some(1) {
        return Err(Refusal::new(
            400,
            RejectReason::BadRequest,
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut version = None;
    let mut keys = Vec::new();
    let mut origins = Vec::new();
    let mut host = 0usize;
    let mut protocol = None;
    let mut presented = crate::auth::Presented::default();
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            keys.push(h.value);
        } else if name.eq_ignore_ascii_case("origin") {
            origins.push(h.value);
        } else if name.eq_ignore_ascii_case("host") {
            host += 1;
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            // Subprotocol names are case-sensitive (RFC 6455 §4.1).
            let offered = std::str::from_utf8(h.value).unwrap_or("");
            if offered.split(',').any(|p| p.trim() == SUBPROTOCOL) {
                protocol = Some(SUBPROTOCOL);
            }
            for p in offered.split(',') {
                if let Some(t) = p.trim().strip_prefix(BEARER_PROTOCOL_PREFIX) {
                    presented
                        .tokens
                        .push((crate::auth::TokenSource::Subprotocol, t.to_string()));
                }
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            if let Some(t) = bearer(h.value) {
                presented
                    .tokens
                    .push((crate::auth::TokenSource::Header, t.to_string()));
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refusal::new(
                400,
                RejectReason::BadRequest,
                "Transfer-Encoding is not allowed on an upgrade request",
            ));
        } else if name.eq_ignore_ascii_case("content-length") && h.value.iter().any(|b| *b != b'0')
        {
            return Err(Refusal::new(
                400,
                RejectReason::BadRequest,
                "a body is not allowed on an upgrade request",
            ));
        }
    }
    if !upgrade || !connection_upgrade {
        let mut r = Refusal::new(
            426,
            RejectReason::BadRequest,
            "this endpoint only speaks WebSocket: send Connection: Upgrade and Upgrade: websocket",
        );
        r.headers.push(("Upgrade", "websocket".into()));
        // One Connection header: the upgrade offer, and we close after it.
        r.headers.push(("Connection", "Upgrade, close".into()));
        return Err(r);
    }
    if host != 1 {
        return Err(Refusal::new(
            400,
            RejectReason::BadRequest,
            "exactly one Host header is required",
        ));
    }
    if version != Some(b"13".as_slice()) {
        let mut r = Refusal::new(
            426,
            RejectReason::BadRequest,
            "unsupported Sec-WebSocket-Version (13 is supported)",
        );
        r.headers.push(("Sec-WebSocket-Version", "13".into()));
        return Err(r);
    }
    let key = match keys.as_slice() {
        [k] if valid_key(k) => *k,
        [] => {
            return Err(Refusal::new(
                400,
                RejectReason::BadRequest,
                "missing Sec-WebSocket-Key",
            ))
        }
        [_] => {
            return Err(Refusal::new(
                400,
                RejectReason::BadRequest,
                "Sec-WebSocket-Key must be 16 bytes in base64",
            ))
        }
        _ => {
            return Err(Refusal::new(
                400,
                RejectReason::BadRequest,
                "duplicate Sec-WebSocket-Key",
            ))
        }
    };
    let origin = match origins.as_slice() {
        [] => None,
        [o] => Some(std::str::from_utf8(o).map_err(|_| {
            Refusal::new(
                403,
                RejectReason::Origin,
                "malformed Origin header: not UTF-8",
            )
        })?),
        _ => {
            return Err(Refusal::new(
                403,
                RejectReason::Origin,
                "more than one Origin header",
            ))
        }
    };
    rules
        .origins
        .check(origin)
        .map_err(|denied| Refusal::new(403, RejectReason::Origin, denied.to_string()))?;
    if let Some(t) = query_token(target) {
        presented
            .tokens
            .push((crate::auth::TokenSource::Query, t.to_string()));
    }
    Ok(Verdict {
        accept_key: derive_accept_key(key),
        origin: origin.map(str::to_string),
        protocol,
        presented,
    })
}

/// The token of an `Authorization: Bearer <token>` value (scheme
/// case-insensitive, RFC 6750 §2.1); other schemes are not tokens.
fn bearer(value: &[u8]) -> Option<&str> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The `token` query parameter of the request target, if any. JWS
/// characters need no percent-decoding.
fn query_token(target: &str) -> Option<&str> {
    let query = target.split('#').next()?.split_once('?')?.1;
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some(("token", v)) => Some(v),
        None if kv == "token" => Some(""),
        _ => None,
    })
}

/// A key is 16 random bytes in base64: 24 characters ending in `==`.
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Reads one request head (bounded) and checks it. `Ok(Err(refusal))` means
/// a well-formed refusal that should be answered with [`respond`].
pub async fn read_and_evaluate<S: AsyncRead + Unpin>(
    stream: &mut S,
    rules: &Rules<'_>,
) -> Result<Result<Accepted, Refusal>, HandshakeError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HandshakeError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let verdict = evaluate(&req, rules).map(|v| Accepted {
                    accept_key: v.accept_key,
                    leftover: buf[head_len..].to_vec(),
                    origin: v.origin,
                    protocol: v.protocol,
                    presented: v.presented,
                });
                return Ok(verdict);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => continue,
            Ok(httparse::Status::Partial) => {
                return Ok(Err(Refusal::new(
                    431,
                    RejectReason::BadRequest,
                    format!("request head larger than {MAX_HEAD_BYTES} bytes"),
                )))
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Ok(Err(Refusal::new(
                    431,
                    RejectReason::BadRequest,
                    format!("more than {MAX_HEADERS} request headers"),
                )))
            }
            Err(e) => {
                return Ok(Err(Refusal::new(
                    400,
                    RejectReason::BadRequest,
                    format!("malformed HTTP request: {e}"),
                )))
            }
        }
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Writes the refusal response and closes the TLS session.
pub async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    refusal: &Refusal,
) -> std::io::Result<()> {
    let body = format!("{}\n", refusal.reason);
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        refusal.status,
        status_text(refusal.status),
        body.len()
    );
    if !refusal
        .headers
        .iter()
        .any(|(name, _)| *name == "Connection")
    {
        head.push_str("Connection: close\r\n");
    }
    for (name, value) in &refusal.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.push_str(&body);
    stream.write_all(head.as_bytes()).await?;
    stream.flush().await?;
    stream.shutdown().await
}

/// Writes the 101 Switching Protocols response.
pub async fn switch<S: AsyncWrite + Unpin>(
    stream: &mut S,
    accept_key: &str,
    protocol: Option<&str>,
) -> std::io::Result<()> {
    let protocol = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n{protocol}\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    stream.flush().await
}
