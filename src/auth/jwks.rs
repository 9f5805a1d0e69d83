//! `auth.jwks_url`: a JWKS fetched over https (hyper over tokio-rustls, ring
//! provider) at start, every `jwks_refresh`, and on an unknown `kid` at most
//! once per [`MISS_INTERVAL`], concurrent misses sharing one fetch. A failed
//! fetch keeps the last good set; it is logged and counted.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{info, warn};

use super::keys::{self, Key};

/// Least time between two fetches caused by unknown `kid`s.
pub const MISS_INTERVAL: Duration = Duration::from_secs(30);
/// Budget of one fetch (connect, TLS, request, body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// A parsed `https://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    /// Host name or IP literal (brackets stripped).
    pub host: String,
    /// Port (443 by default).
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Checks and splits a JWKS URL; only https is accepted (keys over plain
/// HTTP could be swapped by anyone on the path).
pub fn parse_https_url(url: &str) -> Result<HttpsUrl, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("`{url}` is not an https:// URL"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(format!("`{url}`: user info in the URL is not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: bad IPv6 host"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match port {
        None => 443,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("`{url}`: bad port `{p}`"))?,
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok(HttpsUrl {
        host: host.to_string(),
        port,
        path,
    })
}

/// Errors of one fetch.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connection, TLS or HTTP failure.
    #[error("{0}")]
    Transport(String),
    /// Not 200.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The body is not a usable JWKS.
    #[error("invalid JWKS: {0}")]
    Document(String),
    /// Took longer than the budget.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// A remote key set and its fetch state.
pub struct RemoteJwks {
    url: HttpsUrl,
    url_text: String,
    tls: Arc<rustls::ClientConfig>,
    keys: ArcSwap<Vec<Key>>,
    /// Held while fetching because of a miss; the time of the last such fetch.
    miss: tokio::sync::Mutex<Option<Instant>>,
    errors: metrics::Counter,
    fetches: metrics::Counter,
}

/// Trust roots for the JWKS endpoint: `jwks_ca`, or the system store.
pub fn roots(ca: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no CERTIFICATE in the file", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: bad certificate: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    Ok(roots)
}

impl RemoteJwks {
    /// A key set for `url` trusting `roots` (nothing fetched yet).
    pub fn new(url: &str, roots: rustls::RootCertStore) -> Result<RemoteJwks, String> {
        let parsed = parse_https_url(url)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(RemoteJwks {
            url: parsed,
            url_text: url.to_string(),
            tls: Arc::new(tls),
            keys: ArcSwap::from_pointee(Vec::new()),
            miss: tokio::sync::Mutex::new(None),
            errors: metrics::counter!("wsbroker_auth_jwks_fetch_errors_total"),
            fetches: metrics::counter!("wsbroker_auth_jwks_fetches_total"),
        })
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.url_text
    }

    /// The current key set (empty until the first good fetch).
    pub fn keys(&self) -> Arc<Vec<Key>> {
        self.keys.load_full()
    }

    /// Fetches now; on success the set is replaced, on failure kept.
    pub async fn refresh(&self, why: &'static str) -> Result<usize, FetchError> {
        self.fetches.increment(1);
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(FETCH_TIMEOUT)),
        };
        match result {
            Ok(keys) => {
                let n = keys.len();
                self.keys.store(Arc::new(keys));
                info!(url = %self.url_text, keys = n, why, "auth.jwks_url fetched");
                Ok(n)
            }
            Err(e) => {
                self.errors.increment(1);
                warn!(url = %self.url_text, error = %e, why, "auth.jwks_url fetch failed; keeping the last good key set");
                Err(e)
            }
        }
    }

    /// After an unknown `kid`: fetches unless one was done within
    /// [`MISS_INTERVAL`]; callers arriving during a fetch wait for it and
    /// then use its result instead of fetching again.
    pub async fn refresh_on_miss(&self) {
        let mut last = self.miss.lock().await;
        if last.is_some_and(|t| t.elapsed() < MISS_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        let _ = self.refresh("unknown kid").await;
    }

    /// Refetches every `every` until `stop` is cancelled.
    pub async fn refresh_loop(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => { let _ = self.refresh("jwks_refresh").await; }
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, FetchError> {
        let t = |e: &dyn std::fmt::Display| FetchError::Transport(e.to_string());
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| t(&format!("connect {}:{}: {e}", self.url.host, self.url.port)))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.url.host.clone()).map_err(|e| t(&e))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| t(&format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| t(&e))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = if self.url.port == 443 {
            self.url.host.clone()
        } else if self.url.host.contains(':') {
            format!("[{}]:{}", self.url.host, self.url.port)
        } else {
            format!("{}:{}", self.url.host, self.url.port)
        };
        let req = hyper::Request::get(self.url.path.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("wsbroker/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| t(&e))?;
        let result = async {
            let resp = sender.send_request(req).await.map_err(|e| t(&e))?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| t(&format!("reading the body: {e}")))?
                .to_bytes();
            keys::from_jwks(&body).map_err(FetchError::Document)
        }
        .await;
        driver.abort();
        result
    }
}
