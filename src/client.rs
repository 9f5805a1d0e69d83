//! The `wsbroker sub` / `wsbroker pub` client, also used by the tests and by
//! `wsbroker bench`.
//!
//! It speaks the wire protocol of the contract (§4) over `wss://` only: TLS is
//! done with rustls (ring provider), the WebSocket upgrade with
//! tokio-tungstenite. Trust comes from `--ca FILE` or is switched off with
//! `--insecure`; there are no built-in web roots, so one of the two is needed.

use std::borrow::Cow;
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION, ORIGIN};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

/// How long connect (TCP + TLS + upgrade) may take before giving up; matches
/// the server's default `handshake_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `sub` waits for its subscribe acks and `pub` for its publish ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for the server to answer our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connection options shared by `sub`, `pub` and `bench`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientOptions {
    /// wss:// URL of the broker endpoint, e.g. wss://localhost:8443/ws
    /// (`bench` takes several: subscribers round-robin over them)
    #[arg(long = "url", value_name = "URL", required = true)]
    pub urls: Vec<String>,
    /// The first `--url` (set by [`ClientOptions::take_urls`]).
    #[arg(skip)]
    pub url: String,
    /// Sent as the Origin header
    #[arg(long)]
    pub origin: Option<String>,
    /// Trust this PEM certificate / CA bundle (e.g. ./wsbroker-dev-cert.pem)
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Skip certificate verification (prints a warning on stderr)
    #[arg(long)]
    pub insecure: bool,
    /// Bearer token (sent as Authorization: Bearer …)
    #[arg(long)]
    pub token: Option<String>,
}

impl ClientOptions {
    /// Sets `url` to the first `--url`; more than one is a usage error
    /// unless `several` (bench).
    pub fn take_urls(&mut self, several: bool) -> Result<(), ClientError> {
        if let Some(first) = self.urls.first() {
            self.url = first.clone();
        }
        if self.urls.len() > 1 && !several {
            return Err(ClientError::Url {
                url: self.urls.join(" "),
                reason: "--url given more than once (only bench takes several)".into(),
            });
        }
        Ok(())
    }

    /// The URL to connect to: `url`, or the first `--url` when `url` is unset.
    pub fn primary_url(&self) -> &str {
        match self.urls.first() {
            Some(first) if self.url.is_empty() => first,
            _ => &self.url,
        }
    }

    /// Every URL given (the single `url` when set directly).
    pub fn all_urls(&self) -> Vec<String> {
        if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        }
    }
}

/// A client WebSocket over TLS over TCP.
pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The `--url` could not be used.
    #[error("invalid --url {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it is unusable.
        reason: String,
    },
    /// Neither `--ca` nor `--insecure` was given and the system trust store
    /// has no usable certificate.
    #[error("no trusted certificate: the system trust store (SSL_CERT_FILE, SSL_CERT_DIR or the OS store) has none; pass --ca FILE (the server's certificate or CA in PEM, e.g. ./wsbroker-dev-cert.pem) or --insecure")]
    NoTrust,
    /// The `--ca` file could not be used.
    #[error("--ca {}: {reason}", path.display())]
    Ca {
        /// The file given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// Host part of the URL.
        host: String,
        /// Resolver message.
        reason: String,
    },
    /// The TCP connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address tried last.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {host} failed: {source}{hint}")]
    Tls {
        /// Server name used for verification.
        host: String,
        /// rustls' error, wrapped in io::Error by tokio-rustls.
        source: io::Error,
        /// A hint for certificate problems (empty otherwise).
        hint: &'static str,
    },
    /// The server answered the upgrade with something other than 101.
    #[error("handshake rejected: {status} {reason}{}", body_suffix(body))]
    Rejected {
        /// HTTP status code.
        status: u16,
        /// Canonical reason phrase of the status.
        reason: String,
        /// Response body (the server says why), possibly empty.
        body: String,
    },
    /// A header value (`--origin`, `--token`) is not valid in HTTP.
    #[error("invalid value for the {0} header")]
    Header(&'static str),
    /// `--data` is not valid JSON.
    #[error("--data is not valid JSON: {0}")]
    BadData(serde_json::Error),
    /// The server answered a request with an error frame.
    #[error("server error {code}: {message}")]
    Server {
        /// Error code (`bad_request`, `limit`, …).
        code: String,
        /// Human readable message.
        message: String,
    },
    /// The server closed the connection with an abnormal code.
    #[error("connection closed by the server: {code} {reason}")]
    Closed {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// The server broke the WebSocket protocol.
    #[error("websocket protocol error: {0}")]
    Protocol(String),
    /// The connection ended without a close frame.
    #[error("connection lost without a close frame")]
    ConnectionLost,
    /// Something did not happen in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// WebSocket-level failure after the upgrade.
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// Local I/O failure (stdout, …).
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

impl ClientError {
    /// True for mistakes in the command line (bad URL, flag or file), which
    /// the contract reports with exit code 2 rather than 1.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ClientError::Url { .. }
                | ClientError::NoTrust
                | ClientError::Ca { .. }
                | ClientError::Header(_)
                | ClientError::BadData(_)
        )
    }
}

fn body_suffix(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// Builds the rustls client configuration from `--ca` / `--insecure`, else
/// from the system trust store.
pub fn tls_config(opts: &ClientOptions) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if opts.insecure {
        eprintln!("warning: --insecure: the server's certificate is NOT verified; anyone on the path can impersonate it");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert { provider }))
            .with_no_client_auth()
    } else if let Some(path) = &opts.ca {
        let ca_err = |reason: String| ClientError::Ca {
            path: path.clone(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        let iter = CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))?;
        for cert in iter {
            let cert = cert.map_err(|e| ca_err(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ca_err(format!("unusable certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ca_err("no PEM CERTIFICATE found".into()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        // A broker with a publicly trusted certificate needs no flag. The
        // store honours SSL_CERT_FILE / SSL_CERT_DIR, like OpenSSL.
        let found = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _unusable) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(ClientError::NoTrust);
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `--insecure`: accepts any certificate, but still checks that the server
/// owns the key of the certificate it sent (handshake signatures), so the
/// TLS session itself is sound.
#[derive(Debug)]
struct AcceptAnyCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A parsed and resolved `wss://host[:port]/path` URL, reusable for many
/// connections (the bench resolves once, not once per connection).
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given (used for the upgrade request).
    pub url: String,
    /// Host without brackets (used for SNI / certificate verification).
    pub host: String,
    /// TCP port (443 when absent).
    pub port: u16,
    /// Resolved socket addresses, in resolver order.
    pub addrs: Vec<SocketAddr>,
}

impl Target {
    /// Parses `url` (only `wss://` is accepted) and resolves its host.
    pub async fn resolve(url: &str) -> Result<Target, ClientError> {
        let (host, port) = parse_wss_url(url)?;
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            // An IP literal needs no resolver round trip.
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| ClientError::Resolve {
                    host: host.clone(),
                    reason: e.to_string(),
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(ClientError::Resolve {
                host,
                reason: "no addresses".into(),
            });
        }
        Ok(Target {
            url: url.to_string(),
            host,
            port,
            addrs,
        })
    }

    /// True when the first (preferred) address is IPv4 loopback
    /// (127.0.0.0/8), i.e. when binding sources in 127.0.0.x is possible.
    pub fn is_ipv4_loopback(&self) -> bool {
        matches!(self.addrs.first().map(|a| a.ip()), Some(IpAddr::V4(v4)) if v4.is_loopback())
    }
}

/// Splits `wss://host[:port][/path]` into host and port.
fn parse_wss_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = |reason: &str| ClientError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("wss") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("ws") => {
            return Err(bad("plain ws:// is not supported, use wss://"))
        }
        _ => return Err(bad("expected wss://host[:port]/path")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(bad("user info in the URL is not supported (use --token)"));
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        // [v6]:port
        let (h, tail) = after
            .split_once(']')
            .ok_or_else(|| bad("unterminated [IPv6] host"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p),
            None if tail.is_empty() => None,
            None => return Err(bad("garbage after ]")),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad("invalid port"))?,
        None => 443,
    };
    Ok((host.to_string(), port))
}

/// The WebSocket settings used by the CLI clients: modest buffers (a client
/// reads small frames; tungstenite zero-fills the whole read buffer per read).
pub fn default_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(16 << 20))
}

/// Connects to `opts.url`: resolve, TCP (optionally from `local_addr`), TLS,
/// WebSocket upgrade with the Origin / Authorization headers.
pub async fn connect(
    opts: &ClientOptions,
    tls: Arc<rustls::ClientConfig>,
    local_addr: Option<IpAddr>,
) -> Result<WsStream, ClientError> {
    let target = Target::resolve(opts.primary_url()).await?;
    connect_to(&target, opts, tls, local_addr, default_ws_config()).await
}

/// Like [`connect`], but to an already resolved target and with explicit
/// WebSocket settings; gives up after 10 s.
pub async fn connect_to(
    target: &Target,
    opts: &ClientOptions,
    tls: Arc<rustls::ClientConfig>,
    local_addr: Option<IpAddr>,
    ws_config: WebSocketConfig,
) -> Result<WsStream, ClientError> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect_inner(target, opts, tls, local_addr, ws_config),
    )
    .await
    .map_err(|_| ClientError::Timeout("connecting (TCP + TLS + upgrade took over 10 s)"))?
}

async fn connect_inner(
    target: &Target,
    opts: &ClientOptions,
    tls: Arc<rustls::ClientConfig>,
    local_addr: Option<IpAddr>,
    ws_config: WebSocketConfig,
) -> Result<WsStream, ClientError> {
    // Build the request first: a bad header should fail before any network work.
    let request = upgrade_request(target, opts)?;
    let tls_stream = connect_tls(target, tls, local_addr).await?;
    upgrade(request, tls_stream, ws_config).await
}

/// A WebSocket upgrade request (method, URI and headers).
pub type UpgradeRequest = tungstenite::handshake::client::Request;

/// The upgrade request for `target` with the Origin / Authorization headers
/// of `opts`.
pub fn upgrade_request(
    target: &Target,
    opts: &ClientOptions,
) -> Result<UpgradeRequest, ClientError> {
    let mut request = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Url {
            url: target.url.clone(),
            reason: e.to_string(),
        })?;
    if let Some(origin) = &opts.origin {
        let v = HeaderValue::from_str(origin).map_err(|_| ClientError::Header("Origin"))?;
        request.headers_mut().insert(ORIGIN, v);
    }
    if let Some(token) = &opts.token {
        let v = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ClientError::Header("Authorization"))?;
        request.headers_mut().insert(AUTHORIZATION, v);
    }
    Ok(request)
}

/// TCP (optionally from `local_addr`) and TLS to `target`, no timeout.
pub async fn connect_tls(
    target: &Target,
    tls: Arc<rustls::ClientConfig>,
    local_addr: Option<IpAddr>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    let server_name = ServerName::try_from(target.host.clone()).map_err(|e| ClientError::Url {
        url: target.url.clone(),
        reason: format!("host is not a valid TLS server name: {e}"),
    })?;
    let tcp = tcp_connect(&target.addrs, local_addr).await?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|source| {
            let hint = if source.to_string().contains("certificate") {
                " (pass --ca FILE with the server's certificate or CA, or --insecure)"
            } else {
                ""
            };
            ClientError::Tls {
                host: target.host.clone(),
                source,
                hint,
            }
        })
}

/// The WebSocket upgrade over an open stream; a refusal becomes
/// [`ClientError::Rejected`] with the server's status and body.
async fn upgrade<S>(
    request: UpgradeRequest,
    stream: S,
    ws_config: WebSocketConfig,
) -> Result<tokio_tungstenite::WebSocketStream<S>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config)).await {
        Ok((ws, _response)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err(ClientError::Rejected {
                status: status.as_u16(),
                reason: status.canonical_reason().unwrap_or("").to_string(),
                body,
            })
        }
        Err(e) => Err(ClientError::WebSocket(e)),
    }
}

/// Tries each address in turn (only those of `local_addr`'s family when one
/// is given) and returns the first TCP connection, with TCP_NODELAY set.
async fn tcp_connect(
    addrs: &[SocketAddr],
    local_addr: Option<IpAddr>,
) -> Result<TcpStream, ClientError> {
    let mut last: Option<ClientError> = None;
    for &addr in addrs {
        if let Some(local) = local_addr {
            if local.is_ipv4() != addr.is_ipv4() {
                continue;
            }
        }
        let attempt = async {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(local) = local_addr {
                bind_no_port(&socket);
                socket.bind(SocketAddr::new(local, 0))?;
            }
            let stream = socket.connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok::<_, io::Error>(stream)
        };
        match attempt.await {
            Ok(stream) => return Ok(stream),
            Err(source) => last = Some(ClientError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Resolve {
        host: format!("{addrs:?}"),
        reason: "no address of the local address' family".into(),
    }))
}

/// Lets the kernel pick the source port at connect() time instead of bind()
/// time, so many sockets bound to one source IP can share ports across
/// different destinations. Best effort: failure only costs port space.
#[cfg(target_os = "linux")]
fn bind_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: valid fd owned by `socket`, pointer/len describe a live c_int.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_no_port(_socket: &TcpSocket) {}

/// The fields of a server frame the client looks at.
#[derive(Debug, Deserialize)]
pub struct ServerFrame<'a> {
    /// `message`, `ack` or `error`.
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// Request id echoed by `ack` / `error`, as raw JSON.
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    /// Error code of an `error` frame.
    #[serde(borrow, default)]
    pub code: Option<Cow<'a, str>>,
    /// Error message of an `error` frame.
    #[serde(borrow, default)]
    pub message: Option<Cow<'a, str>>,
}

impl ServerFrame<'_> {
    /// The server error this frame carries, if it is an error frame.
    fn to_error(&self) -> ClientError {
        ClientError::Server {
            code: self.code.as_deref().unwrap_or("unknown").to_string(),
            message: self.message.as_deref().unwrap_or("").to_string(),
        }
    }

    /// The numeric request id, when it is one.
    fn numeric_id(&self) -> Option<u64> {
        self.id.and_then(|raw| raw.get().parse().ok())
    }
}

/// Subscribes `ws` to `topics` (ids 1..=n) and waits for every ack.
///
/// Message frames that arrive meanwhile are handed to `on_message` verbatim;
/// an error frame answering one of the subscriptions fails the call.
pub async fn subscribe(
    ws: &mut WsStream,
    topics: &[String],
    timeout: Duration,
    mut on_message: impl FnMut(&str) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let mut acks = SubscribeAcks::new(topics);
    for frame in acks.frames() {
        ws.feed(Message::text(frame)).await?;
    }
    ws.flush().await?;
    let wait = async {
        while !acks.done() {
            let msg = match ws.next().await {
                Some(msg) => msg?,
                None => return Err(ClientError::ConnectionLost),
            };
            match msg {
                Message::Text(text) => acks.on_text(&text, &mut on_message)?,
                Message::Close(frame) => return Err(close_error(frame)),
                _ => {}
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| ClientError::Timeout("waiting for the subscribe acks"))?
}

/// The acks still due for subscriptions sent with ids 1..=n, one per topic.
pub struct SubscribeAcks<'t> {
    topics: &'t [String],
    pending: Vec<bool>,
    left: usize,
}

impl<'t> SubscribeAcks<'t> {
    /// Nothing acked yet.
    pub fn new(topics: &'t [String]) -> Self {
        Self {
            topics,
            pending: vec![true; topics.len()],
            left: topics.len(),
        }
    }

    /// The subscribe commands to send, ids 1..=n.
    pub fn frames(&self) -> impl Iterator<Item = String> + 't {
        self.topics.iter().enumerate().map(|(i, topic)| {
            serde_json::json!({"op": "subscribe", "topic": topic, "id": i + 1}).to_string()
        })
    }

    /// Every subscription was acked.
    pub fn done(&self) -> bool {
        self.left == 0
    }

    /// Takes one text frame from the server: counts an ack, fails on an error
    /// answering one of the subscriptions, hands message frames to
    /// `on_message` and ignores anything else.
    pub fn on_text(
        &mut self,
        text: &str,
        mut on_message: impl FnMut(&str) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let Ok(frame) = serde_json::from_str::<ServerFrame<'_>>(text) else {
            tracing::debug!(frame = %text, "ignoring unparsable frame");
            return Ok(());
        };
        match frame.kind.as_ref() {
            "message" => on_message(text),
            "ack" | "error" => {
                let slot = frame
                    .numeric_id()
                    .and_then(|id| usize::try_from(id).ok())
                    .and_then(|id| id.checked_sub(1))
                    .filter(|&i| i < self.pending.len() && self.pending[i]);
                match (slot, frame.kind.as_ref()) {
                    (Some(i), "ack") => {
                        self.pending[i] = false;
                        self.left -= 1;
                        Ok(())
                    }
                    (Some(i), _) => Err(match frame.to_error() {
                        ClientError::Server { code, message } => ClientError::Server {
                            code,
                            message: format!("subscribe {:?}: {message}", self.topics[i]),
                        },
                        other => other,
                    }),
                    (None, _) => {
                        tracing::debug!(frame = %text, "ignoring unexpected frame");
                        Ok(())
                    }
                }
            }
            _ => {
                tracing::debug!(frame = %text, "ignoring unknown frame type");
                Ok(())
            }
        }
    }
}

/// Turns a close frame received from the server into an error (for callers
/// that did not expect the connection to end).
fn close_error(frame: Option<CloseFrame>) -> ClientError {
    match frame {
        Some(f) => ClientError::Closed {
            code: u16::from(f.code),
            reason: f.reason.to_string(),
        },
        None => ClientError::Closed {
            code: 1005,
            reason: "no status".into(),
        },
    }
}

/// Sends a normal close (1000) and waits briefly for the server's answer so
/// the close handshake completes instead of resetting the connection.
pub async fn close_gracefully(ws: &mut WsStream) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        // Reading until the end lets tungstenite see the echoed close.
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// `wsbroker sub`: subscribe to `topics` and print every message frame as one
/// line on stdout until the server closes or Ctrl-C.
pub async fn run_sub(opts: &ClientOptions, topics: &[String]) -> Result<(), ClientError> {
    if topics.is_empty() {
        return Err(ClientError::Url {
            url: opts.primary_url().to_string(),
            reason: "no --topic given".into(),
        });
    }
    let tls = tls_config(opts)?;
    let mut ws = connect(opts, tls, None).await?;
    let stdout = io::stdout();
    let print = |line: &str| -> Result<(), ClientError> {
        let mut out = stdout.lock();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        // Scripts read us through a pipe: each message must appear at once.
        out.flush()?;
        Ok(())
    };
    match subscribe(&mut ws, topics, ACK_TIMEOUT, print).await {
        Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            close_gracefully(&mut ws).await;
            return Ok(());
        }
        other => other?,
    }
    tracing::info!(topics = ?topics, "subscribed");

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                close_gracefully(&mut ws).await;
                return Ok(());
            }
            msg = ws.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(ClientError::ConnectionLost),
                };
                match msg {
                    Message::Text(text) => {
                        if is_message_frame(&text) {
                            match print(&text) {
                                Ok(()) => {}
                                Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                                    close_gracefully(&mut ws).await;
                                    return Ok(());
                                }
                                Err(e) => return Err(e),
                            }
                        } else if let Ok(frame) = serde_json::from_str::<ServerFrame<'_>>(&text) {
                            if frame.kind == "error" {
                                eprintln!("server error: {}", frame.to_error());
                            }
                        }
                    }
                    Message::Close(frame) => return finish_after_close(&mut ws, frame).await,
                    _ => {}
                }
            }
        }
    }
}

/// Cheap check that a text frame is a `message` frame, falling back to a
/// parse when the server's field order or spacing differs from ours.
fn is_message_frame(text: &str) -> bool {
    if text.starts_with(r#"{"type":"message""#) {
        return true;
    }
    matches!(serde_json::from_str::<ServerFrame<'_>>(text), Ok(f) if f.kind == "message")
}

/// After the server's close frame: let tungstenite send the echo, then map
/// 1000/1001 (and no status) to success and anything else to an error.
async fn finish_after_close(
    ws: &mut WsStream,
    frame: Option<CloseFrame>,
) -> Result<(), ClientError> {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    match frame {
        None => Ok(()),
        Some(f) if matches!(f.code, CloseCode::Normal | CloseCode::Away) => {
            if f.code == CloseCode::Away {
                eprintln!("server closed the connection: 1001 {}", f.reason);
            }
            Ok(())
        }
        other => Err(close_error(other)),
    }
}

/// `wsbroker pub`: publish `data` (verbatim JSON) to `topic`, wait for the ack
/// (up to 10 s), then close cleanly.
pub async fn run_pub(opts: &ClientOptions, topic: &str, data: &str) -> Result<(), ClientError> {
    let raw: &RawValue = serde_json::from_str(data).map_err(ClientError::BadData)?;
    // Built by hand so `data` goes out byte-for-byte as the user wrote it: a
    // serde_json::Value would re-encode it (number forms, key order, escapes).
    let topic_json = serde_json::to_string(topic).map_err(ClientError::BadData)?;
    let frame = format!(
        r#"{{"op":"publish","topic":{topic_json},"data":{},"id":1}}"#,
        raw.get()
    );
    let tls = tls_config(opts)?;
    let mut ws = connect(opts, tls, None).await?;
    ws.send(Message::text(frame)).await?;
    let wait = async {
        loop {
            let msg = match ws.next().await {
                Some(msg) => msg?,
                None => return Err(ClientError::ConnectionLost),
            };
            match msg {
                Message::Text(text) => {
                    let Ok(frame) = serde_json::from_str::<ServerFrame<'_>>(&text) else {
                        continue;
                    };
                    if frame.numeric_id() != Some(1) {
                        continue;
                    }
                    match frame.kind.as_ref() {
                        "ack" => return Ok(()),
                        "error" => return Err(frame.to_error()),
                        _ => {}
                    }
                }
                Message::Close(frame) => return Err(close_error(frame)),
                _ => {}
            }
        }
    };
    let result = match tokio::time::timeout(ACK_TIMEOUT, wait).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout("waiting for the publish ack (10 s)")),
    };
    if !matches!(
        result,
        Err(ClientError::Closed { .. } | ClientError::ConnectionLost | ClientError::WebSocket(_))
    ) {
        close_gracefully(&mut ws).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_wss_url("wss://localhost:8443/ws").ok(),
            Some(("localhost".to_string(), 8443))
        );
        assert_eq!(
            parse_wss_url("wss://example.com/ws?x=1").ok(),
            Some(("example.com".to_string(), 443))
        );
        assert_eq!(
            parse_wss_url("WSS://[::1]:9/").ok(),
            Some(("::1".to_string(), 9))
        );
        assert!(parse_wss_url("ws://localhost/ws").is_err());
        assert!(parse_wss_url("https://localhost/ws").is_err());
        assert!(parse_wss_url("wss://:80/ws").is_err());
        assert!(parse_wss_url("wss://h:99999/ws").is_err());
    }

    #[test]
    fn rejected_message_carries_status_and_body() {
        let e = ClientError::Rejected {
            status: 403,
            reason: "Forbidden".into(),
            body: "origin not allowed: http://evil\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "handshake rejected: 403 Forbidden: origin not allowed: http://evil"
        );
    }
}
