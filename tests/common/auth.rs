//! Token minting for the auth tests (CONTRACT §10): real keys of every type
//! (HMAC bytes; EC and Ed25519 from rcgen/ring; RSA from `openssl genpkey`,
//! since ring cannot generate RSA keys), compact JWS signed with ring, and
//! the upgrade requests that present them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{TestServer, Ws};

enum Kind {
    Hmac(Vec<u8>),
    Ecdsa(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// A signing key and the JWS algorithm it signs with.
pub struct Signer {
    /// `alg` header value.
    pub alg: String,
    /// `kid` header value, if any.
    pub kid: Option<String>,
    kind: Kind,
    /// SPKI PEM of the public key (none for HMAC).
    pub public_pem: String,
    /// A self-signed X.509 certificate of the key (EC/Ed only).
    pub cert_pem: Option<String>,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// One RSA key pair per test process (2048 bits, `openssl genpkey`):
/// (PKCS#8 private PEM, SPKI public PEM).
pub fn rsa_pems() -> &'static (String, String) {
    static RSA: OnceLock<(String, String)> = OnceLock::new();
    RSA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("rsa.pem");
        let st = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl must be installed (CI installs it)");
        assert!(st.success(), "openssl genpkey");
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .output()
            .expect("openssl pkey");
        assert!(out.status.success(), "openssl pkey -pubout");
        (
            std::fs::read_to_string(&key).expect("read rsa key"),
            String::from_utf8(out.stdout).expect("pem"),
        )
    })
}

impl Signer {
    /// HS256/384/512 with `secret`.
    pub fn hmac(alg: &str, secret: &[u8]) -> Signer {
        Signer {
            alg: alg.into(),
            kid: None,
            kind: Kind::Hmac(secret.to_vec()),
            public_pem: String::new(),
            cert_pem: None,
        }
    }

    fn from_rcgen(alg: &str, params: &'static rcgen::SignatureAlgorithm) -> Signer {
        let kp = rcgen::KeyPair::generate_for(params).expect("keygen");
        let pkcs8 = kp.serialize_der();
        let rng = SystemRandom::new();
        let kind = match alg {
            "ES256" => Kind::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
                    .expect("p256"),
            ),
            "ES384" => Kind::Ecdsa(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &pkcs8, &rng)
                    .expect("p384"),
            ),
            _ => Kind::Ed(Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).expect("ed25519")),
        };
        let cert = rcgen::CertificateParams::new(vec!["token-signer".into()])
            .expect("params")
            .self_signed(&kp)
            .expect("cert");
        Signer {
            alg: alg.into(),
            kid: None,
            kind,
            public_pem: kp.public_key_pem(),
            cert_pem: Some(cert.pem()),
        }
    }

    /// ES256 (P-256), fresh key.
    pub fn es256() -> Signer {
        Signer::from_rcgen("ES256", &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// ES384 (P-384), fresh key.
    pub fn es384() -> Signer {
        Signer::from_rcgen("ES384", &rcgen::PKCS_ECDSA_P384_SHA384)
    }

    /// EdDSA (Ed25519), fresh key.
    pub fn ed25519() -> Signer {
        Signer::from_rcgen("EdDSA", &rcgen::PKCS_ED25519)
    }

    /// RS*/PS* with the process' RSA key.
    pub fn rsa(alg: &str) -> Signer {
        let (private, public) = rsa_pems();
        let der = PrivatePkcs8KeyDer::from_pem_slice(private.as_bytes()).expect("pkcs8 pem");
        let kp = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("rsa key");
        Signer {
            alg: alg.into(),
            kid: None,
            kind: Kind::Rsa(kp),
            public_pem: public.clone(),
            cert_pem: None,
        }
    }

    /// The same key under another `alg` header (for confusion tests).
    pub fn with_kid(mut self, kid: &str) -> Signer {
        self.kid = Some(kid.into());
        self
    }

    /// The public key as a JWK (with `kid` when set).
    pub fn jwk(&self) -> Value {
        let mut jwk = match &self.kind {
            Kind::Hmac(_) => panic!("no JWK for HMAC in these tests"),
            Kind::Ecdsa(kp) => {
                let point = kp.public_key().as_ref();
                let size = (point.len() - 1) / 2;
                json!({"kty":"EC","crv": if size == 32 {"P-256"} else {"P-384"},
                       "x": b64(&point[1..1 + size]), "y": b64(&point[1 + size..])})
            }
            Kind::Ed(kp) => json!({"kty":"OKP","crv":"Ed25519","x": b64(kp.public_key().as_ref())}),
            Kind::Rsa(kp) => {
                let pk = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(kp.public());
                json!({"kty":"RSA", "n": b64(&pk.n), "e": b64(&pk.e)})
            }
        };
        if let Some(kid) = &self.kid {
            jwk["kid"] = json!(kid);
        }
        jwk
    }

    /// Signs `header.payload` bytes.
    pub fn sign_bytes(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.kind {
            Kind::Hmac(secret) => {
                let algo = match self.alg.as_str() {
                    "HS384" => ring::hmac::HMAC_SHA384,
                    "HS512" => ring::hmac::HMAC_SHA512,
                    _ => ring::hmac::HMAC_SHA256,
                };
                ring::hmac::sign(&ring::hmac::Key::new(algo, secret), msg)
                    .as_ref()
                    .to_vec()
            }
            Kind::Ecdsa(kp) => kp.sign(&rng, msg).expect("sign").as_ref().to_vec(),
            Kind::Ed(kp) => kp.sign(msg).as_ref().to_vec(),
            Kind::Rsa(kp) => {
                let enc: &'static dyn signature::RsaEncoding = match self.alg.as_str() {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    _ => &signature::RSA_PSS_SHA512,
                };
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(enc, &rng, msg, &mut sig).expect("rsa sign");
                sig
            }
        }
    }

    /// A compact JWS of `claims` with this key's `alg` and `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = json!({"alg": self.alg, "typ": "JWT"});
        if let Some(kid) = &self.kid {
            header["kid"] = json!(kid);
        }
        self.sign_with_header(&header, claims)
    }

    /// A compact JWS with an explicit header.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign_bytes(signed.as_bytes());
        format!("{signed}.{}", b64(&sig))
    }
}

/// A JWS signed with an arbitrary HMAC key and `alg` header (confusion tests).
pub fn hmac_token(alg: &str, key: &[u8], claims: &Value) -> String {
    Signer::hmac(alg, key).sign(claims)
}

/// An unsigned `alg: none` token.
pub fn none_token(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(json!({"alg":"none","typ":"JWT"}).to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Claims for `sub`, expiring in `exp_in` seconds, with permissions.
pub fn claims(sub: &str, exp_in: i64, subscribe: &[&str], publish: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() + exp_in,
           "wsbroker": {"subscribe": subscribe, "publish": publish}})
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

/// A 32+ byte HMAC secret.
pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

/// Upgrade with extra headers (e.g. Authorization, Sec-WebSocket-Protocol)
/// and a path (which may carry `?token=`); returns the socket and the
/// response's selected subprotocol.
pub async fn ws_with(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Option<String>), tokio_tungstenite::tungstenite::Error> {
    ws_at(server.addr, &server.tls, path, headers).await
}

/// [`ws_with`] for any wss address (e.g. the real binary's).
pub async fn ws_at(
    addr: std::net::SocketAddr,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Option<String>), tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("wss://localhost:{}{}", addr.port(), path)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", super::ORIGIN.parse().expect("origin"));
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                .expect("name"),
            v.parse().expect("value"),
        );
    }
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("tcp connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .expect("tls connect");
    tokio_tungstenite::client_async(req, tls)
        .await
        .map(|(ws, resp)| {
            let proto = resp
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (ws, proto)
        })
}

/// Upgrade with `Authorization: Bearer <token>`.
pub async fn ws_bearer(server: &TestServer, token: &str) -> Ws {
    ws_with(
        server,
        "/ws",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect("upgrade with a valid token")
    .0
}

/// The raw HTTP response to an upgrade carrying `extra` header lines.
pub async fn raw_upgrade(server: &TestServer, target: &str, extra: &str) -> String {
    server
        .raw_http(&format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Origin: {}\r\n{extra}\r\n",
            super::ORIGIN
        ))
        .await
}

/// A local https endpoint serving a JWKS that the test can change (status
/// and body), counting requests: the identity provider of the rotation tests.
pub struct JwksServer {
    /// `https://localhost:PORT/jwks`.
    pub url: String,
    /// The CA (its own certificate) to put in `auth.jwks_ca`.
    pub ca_path: PathBuf,
    state: std::sync::Arc<std::sync::Mutex<(u16, String)>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _cert: super::TestCert,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    /// Starts serving `body` with status 200.
    pub async fn start(body: &str) -> JwksServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cert = super::make_cert();
        let certs = vec![cert.cert_der.clone()];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.key_path).expect("key");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = std::sync::Arc::new(std::sync::Mutex::new((200u16, body.to_string())));
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (st, h) = (state.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, st, h) = (acceptor.clone(), st.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (status, body) = st.lock().expect("state").clone();
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.flush().await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        JwksServer {
            url: format!("https://localhost:{port}/jwks"),
            ca_path: cert.cert_path.clone(),
            state,
            hits,
            _cert: cert,
            task,
        }
    }

    /// Serves `body` with `status` from now on.
    pub fn set(&self, status: u16, body: &str) {
        *self.state.lock().expect("state") = (status, body.to_string());
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}
