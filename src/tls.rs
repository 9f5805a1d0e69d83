//! TLS: building the rustls `ServerConfig` from PEM files (or a generated dev
//! certificate), with exactly one crypto provider (ring), the cipher-suite
//! preference of each handshake, and the swappable handle that lets SIGHUP
//! replace the certificate for new handshakes.
//!
//! Suite preference: AES-128-GCM first, in the server's order, unless the
//! client lists ChaCha20 ahead of every AES-GCM suite (devices without AES
//! hardware), whose order is then honoured: BoringSSL's "equal preference
//! group" behaviour, which rustls has no switch for. OpenSSL-based clients
//! (Node, Python, curl) list AES-256-GCM-SHA384 first; their handshakes then
//! hash with SHA-384, which has no CPU instructions, where SHA-256 has them
//! (SHA-NI). Serving them AES-128-GCM-SHA256 cut the server's CPU per
//! handshake by 15-20 % (docs/benchmarks.md, "Connection rate").
//!
//! PEM parsing uses rustls-pki-types' `PemObject` (re-exported by rustls):
//! rustls-pemfile is unmaintained (RUSTSEC-2025-0134) and its code lives on there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, NoServerSessionStorage, ProducesTickets, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, RootCertStore, ServerConfig};

use crate::config::{TlsMinVersion, TlsSettings};

/// Errors building TLS material; each names the file (and config key) at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key}: {reason}: {}", path.display())]
    File {
        /// Config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The contents are not what the key requires.
    #[error("{key}: {reason} ({})", path.display())]
    Content {
        /// Config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The development certificate could not be generated or written.
    #[error("tls: dev certificate: {0}")]
    Dev(String),
}

/// The single crypto provider used across the whole process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default, so no library can pick another at run time.
pub fn install_default_provider() {
    // Err only means it was installed already (tests start many servers).
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        key,
        path: path.to_path_buf(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".into(),
            std::io::ErrorKind::PermissionDenied => "permission denied".into(),
            _ => format!("cannot read ({e})"),
        },
    })
}

/// Reads a PEM certificate chain (leaf first).
pub fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(key, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| TlsError::Content {
        key,
        path: path.to_path_buf(),
        reason: format!("malformed PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            key,
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Content {
        key,
        path: path.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY block found (PKCS#8, PKCS#1 or SEC1 PEM expected)".into()
            }
            other => format!("malformed PEM: {other}"),
        },
    })
}

/// Loads a chain + key and checks that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs("tls.cert", cert)?;
    let der = load_key("tls.key", key)?;
    certified_key(chain, der, cert, key)
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    der: PrivateKeyDer<'static>,
    cert: &Path,
    key: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| TlsError::Content {
            key: "tls.key",
            path: key.to_path_buf(),
            reason: format!("unsupported private key: {e}"),
        })?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) => Ok(Arc::new(ck)),
        // Unknown means the key type cannot be compared; rustls will still
        // fail the handshake if they differ, so let it through.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(ck)),
        Err(e) => Err(TlsError::Content {
            key: "tls.key",
            path: key.to_path_buf(),
            reason: format!(
                "does not match the certificate in tls.cert {}: {e}",
                cert.display()
            ),
        }),
    }
}

/// A generated self-signed certificate for `localhost` and `127.0.0.1`.
pub struct DevCert {
    /// The certificate in PEM, for clients to trust.
    pub cert_pem: String,
    /// Chain + key for the server.
    pub certified: Arc<CertifiedKey>,
}

/// Generates the `--dev` certificate.
pub fn generate_dev_cert() -> Result<DevCert, TlsError> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let dev = |e: rcgen::Error| TlsError::Dev(e.to_string());
    let mut params = rcgen::CertificateParams::new(names).map_err(dev)?;
    // rcgen's default validity (1975 to 4096) is flagged by TLS scanners; a
    // year from a day ago covers any dev run and clock skew.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    let signing_key = rcgen::KeyPair::generate().map_err(dev)?;
    let cert = params.self_signed(&signing_key).map_err(dev)?;
    let cert_der = cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
    let certified = certified_key(
        vec![cert_der],
        key_der,
        Path::new("(generated)"),
        Path::new("(generated)"),
    )?;
    Ok(DevCert {
        cert_pem: cert.pem(),
        certified,
    })
}

/// Everything a config's `[tls]` section resolves to.
pub struct TlsMaterial {
    /// Server chain + key.
    pub certified: Arc<CertifiedKey>,
    /// Roots for client certificates, when mTLS is on.
    pub client_roots: Option<Arc<RootCertStore>>,
    /// Lowest version offered.
    pub min_version: TlsMinVersion,
    /// `tls.session_tickets`.
    pub session_tickets: bool,
}

impl TlsMaterial {
    /// Loads the files named by `settings`; `dev` supplies the key when none is configured.
    pub fn load(settings: &TlsSettings, dev: Option<&DevCert>) -> Result<Self, TlsError> {
        let certified = match (&settings.cert, &settings.key, dev) {
            (Some(c), Some(k), _) => load_certified_key(c, k)?,
            (_, _, Some(dev)) => dev.certified.clone(),
            (None, _, None) => {
                return Err(TlsError::File {
                    key: "tls.cert",
                    path: PathBuf::new(),
                    reason: "required".into(),
                })
            }
            (_, None, None) => {
                return Err(TlsError::File {
                    key: "tls.key",
                    path: PathBuf::new(),
                    reason: "required".into(),
                })
            }
        };
        let client_roots = match &settings.client_ca {
            None => None,
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in load_certs("tls.client_ca", path)? {
                    roots.add(cert).map_err(|e| TlsError::Content {
                        key: "tls.client_ca",
                        path: path.clone(),
                        reason: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                Some(Arc::new(roots))
            }
        };
        Ok(TlsMaterial {
            certified,
            client_roots,
            min_version: settings.min_version,
            session_tickets: settings.session_tickets,
        })
    }

    /// Builds the two server configurations a handshake chooses from; both
    /// issue and accept tickets of `ticketer` (see [`session_ticketer`]).
    pub fn server_configs(
        &self,
        ticketer: &Arc<dyn ProducesTickets>,
    ) -> Result<Arc<ServerConfigs>, TlsError> {
        Ok(Arc::new(ServerConfigs {
            aes_first: self.server_config(SuiteOrder::AesFirst, ticketer)?,
            client_order: self.server_config(SuiteOrder::Client, ticketer)?,
        }))
    }

    /// Builds one rustls server configuration (ALPN `http/1.1`).
    fn server_config(
        &self,
        order: SuiteOrder,
        ticketer: &Arc<dyn ProducesTickets>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let versions: &[&'static rustls::SupportedProtocolVersion] = match self.min_version {
            TlsMinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let mut suites = Arc::unwrap_or_clone(provider());
        if order == SuiteOrder::AesFirst {
            // Stable: TLS 1.3 before 1.2 and ECDSA before RSA stay as they are.
            suites.cipher_suites.sort_by_key(|s| bulk_rank(s.suite()));
        }
        let builder = ServerConfig::builder_with_provider(Arc::new(suites))
            .with_protocol_versions(versions)?;
        let builder = match &self.client_roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                        .build()
                        .map_err(|e| TlsError::Dev(format!("client verifier: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(self.certified.clone()));
        let mut config = builder.with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.ignore_client_order = order == SuiteOrder::AesFirst;
        self.set_resumption(&mut config, ticketer);
        Ok(Arc::new(config))
    }

    /// Session resumption (CONTRACT §12): stateless tickets only. No
    /// server-side session cache: it would cost memory per client, and each
    /// of the two configurations would have its own.
    fn set_resumption(&self, config: &mut ServerConfig, ticketer: &Arc<dyn ProducesTickets>) {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        if self.session_tickets {
            config.ticketer = ticketer.clone();
        } else {
            config.send_tls13_tickets = 0;
        }
    }
}

/// Whose cipher-suite order a server configuration follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SuiteOrder {
    /// The server's: AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305.
    AesFirst,
    /// The client's.
    Client,
}

/// AES-128-GCM before AES-256-GCM before ChaCha20-Poly1305.
fn bulk_rank(suite: CipherSuite) -> u8 {
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    }
}

fn is_chacha(suite: CipherSuite) -> bool {
    matches!(
        suite,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    )
}

/// The same certificate and policy in two suite orders (see the module docs).
pub struct ServerConfigs {
    aes_first: Arc<ServerConfig>,
    client_order: Arc<ServerConfig>,
}

impl ServerConfigs {
    /// The configuration for this ClientHello: the client's order when it
    /// lists ChaCha20 ahead of every AES-GCM suite, AES-128 first otherwise.
    pub fn for_hello(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        let first_aead = hello
            .cipher_suites()
            .iter()
            .copied()
            .find(|s| is_chacha(*s) || bulk_rank(*s) < 2);
        match first_aead {
            Some(s) if is_chacha(s) => self.client_order.clone(),
            _ => self.aes_first.clone(),
        }
    }
}

/// Validates `[tls]` for check-config, pushing one line per problem.
pub fn validate(settings: &TlsSettings, errors: &mut Vec<String>) {
    if let (Some(c), Some(k)) = (&settings.cert, &settings.key) {
        let chain = load_certs("tls.cert", c);
        let key = load_key("tls.key", k);
        match (chain, key) {
            (Ok(chain), Ok(key)) => {
                if let Err(e) = certified_key(chain, key, c, k) {
                    errors.push(e.to_string());
                }
            }
            (chain, key) => {
                if let Err(e) = chain {
                    errors.push(e.to_string());
                }
                if let Err(e) = key {
                    errors.push(e.to_string());
                }
            }
        }
    }
    if let Some(ca) = &settings.client_ca {
        if let Err(e) = load_certs("tls.client_ca", ca) {
            errors.push(e.to_string());
        }
    }
}

/// The session-ticket keys of the daemon's life (CONTRACT §12): rustls'
/// ring ticketer, ChaCha20-Poly1305 keys generated in memory and rotated
/// every 6 hours (tickets of the previous key stay valid for one more
/// period). Never written anywhere: a restart invalidates every ticket.
pub fn session_ticketer() -> Result<Arc<dyn ProducesTickets>, TlsError> {
    Ok(rustls::crypto::ring::Ticketer::new()?)
}

/// The current server configurations, swapped atomically on reload.
pub struct TlsState {
    current: ArcSwap<ServerConfigs>,
    ticketer: Arc<dyn ProducesTickets>,
}

impl TlsState {
    /// Wraps the initial configurations and the ticketer they share.
    pub fn new(configs: Arc<ServerConfigs>, ticketer: Arc<dyn ProducesTickets>) -> Self {
        TlsState {
            current: ArcSwap::new(configs),
            ticketer,
        }
    }

    /// The session-ticket keys, kept across reloads so tickets stay valid.
    pub fn ticketer(&self) -> &Arc<dyn ProducesTickets> {
        &self.ticketer
    }

    /// The configuration a handshake with this ClientHello uses.
    pub fn config_for(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        self.current.load().for_hello(hello)
    }

    /// Replaces the configurations for all later handshakes.
    pub fn replace(&self, configs: Arc<ServerConfigs>) {
        self.current.store(configs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_builds_a_server_config() {
        let dev = generate_dev_cert().expect("dev cert");
        assert!(dev.cert_pem.contains("BEGIN CERTIFICATE"));
        // Valid for a year from now, not rcgen's 1975..4096.
        let not_after = crate::metrics::cert_not_after(&dev.certified.cert[0]).expect("notAfter");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let year = 365 * 86_400;
        assert!(
            (now + year - 60..=now + year + 60).contains(&not_after),
            "{not_after}"
        );
        let settings = TlsSettings {
            cert: None,
            key: None,
            min_version: TlsMinVersion::Tls12,
            client_ca: None,
            session_tickets: true,
        };
        let m = TlsMaterial::load(&settings, Some(&dev)).expect("material");
        let ticketer = session_ticketer().expect("ticketer");
        for order in [SuiteOrder::AesFirst, SuiteOrder::Client] {
            let cfg = m.server_config(order, &ticketer).expect("config");
            assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
            assert_eq!(cfg.ignore_client_order, order == SuiteOrder::AesFirst);
        }
        let aes_first = m
            .server_config(SuiteOrder::AesFirst, &ticketer)
            .expect("config");
        let names: Vec<CipherSuite> = aes_first
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            names[..3],
            [
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ]
        );
        // Nothing dropped: the same suites as rustls' defaults.
        assert_eq!(
            names.len(),
            rustls::crypto::ring::DEFAULT_CIPHER_SUITES.len()
        );
    }

    /// `tls.session_tickets`: both configurations issue tickets of the one
    /// ticketer when on; nothing is issued or cached when off.
    #[test]
    fn session_tickets_switch_resumption_on_and_off() {
        let dev = generate_dev_cert().expect("dev cert");
        let ticketer = session_ticketer().expect("ticketer");
        for on in [true, false] {
            let settings = TlsSettings {
                cert: None,
                key: None,
                min_version: TlsMinVersion::Tls12,
                client_ca: None,
                session_tickets: on,
            };
            let m = TlsMaterial::load(&settings, Some(&dev)).expect("material");
            for order in [SuiteOrder::AesFirst, SuiteOrder::Client] {
                let cfg = m.server_config(order, &ticketer).expect("config");
                assert_eq!(cfg.ticketer.enabled(), on);
                assert_eq!(cfg.send_tls13_tickets > 0, on);
                assert!(!cfg.session_storage.can_cache());
                if on {
                    assert!(Arc::ptr_eq(&cfg.ticketer, &ticketer));
                }
            }
        }
    }

    #[test]
    fn mismatched_key_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).expect("a");
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).expect("b");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, a.cert.pem()).expect("w");
        std::fs::write(&key, b.signing_key.serialize_pem()).expect("w");
        let mut errors = Vec::new();
        validate(
            &TlsSettings {
                cert: Some(cert),
                key: Some(key),
                min_version: TlsMinVersion::Tls12,
                client_ca: None,
                session_tickets: true,
            },
            &mut errors,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("tls.key: does not match"),
            "{errors:?}"
        );
    }

    #[test]
    fn missing_files_are_named() {
        let mut errors = Vec::new();
        validate(
            &TlsSettings {
                cert: Some("/nonexistent/c.pem".into()),
                key: Some("/nonexistent/k.pem".into()),
                min_version: TlsMinVersion::Tls12,
                client_ca: None,
                session_tickets: true,
            },
            &mut errors,
        );
        assert_eq!(
            errors,
            vec![
                "tls.cert: file not found: /nonexistent/c.pem".to_string(),
                "tls.key: file not found: /nonexistent/k.pem".to_string()
            ]
        );
    }
}
