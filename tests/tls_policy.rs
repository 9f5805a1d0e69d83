//! TLS policy (issue 7): TLS 1.2+ only with rustls' AEAD, forward-secret
//! suites; `tls.min_version = "1.3"`; mutual TLS with `tls.client_ca`.
//!
//! Clients that rustls cannot impersonate (TLS 1.0/1.1, CBC-only, RSA key
//! exchange) are hand-made ClientHello records; the server must answer with a
//! fatal alert and close, and count the refusal as `tls`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ProtocolVersion, SupportedCipherSuite};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

// ---------------------------------------------------------------------------
// Hand-made ClientHello records.
// ---------------------------------------------------------------------------

const TLS10: [u8; 2] = [0x03, 0x01];
const TLS11: [u8; 2] = [0x03, 0x02];
const TLS12: [u8; 2] = [0x03, 0x03];

/// Alert descriptions (RFC 8446 §6).
const HANDSHAKE_FAILURE: u8 = 40;
const PROTOCOL_VERSION: u8 = 70;

fn u16be(n: usize) -> [u8; 2] {
    (n as u16).to_be_bytes()
}

fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
    [&kind.to_be_bytes()[..], &u16be(body.len()), body].concat()
}

/// A ClientHello: `version` in the record and hello, the given suites, SNI
/// `localhost`, P-256/X25519 groups, and optionally `supported_versions`.
fn client_hello(
    version: [u8; 2],
    suites: &[u16],
    supported_versions: Option<&[[u8; 2]]>,
) -> Vec<u8> {
    let mut exts = Vec::new();
    let name = b"localhost";
    let sni = [&[0x00][..], &u16be(name.len()), name].concat();
    exts.extend(extension(0x0000, &[&u16be(sni.len())[..], &sni].concat()));
    // supported_groups: secp256r1, x25519.
    exts.extend(extension(0x000a, &[0x00, 0x04, 0x00, 0x17, 0x00, 0x1d]));
    // ec_point_formats: uncompressed.
    exts.extend(extension(0x000b, &[0x01, 0x00]));
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pkcs1_sha256, rsa_pss_rsae_sha256.
    exts.extend(extension(
        0x000d,
        &[0x00, 0x06, 0x04, 0x03, 0x04, 0x01, 0x08, 0x04],
    ));
    if let Some(versions) = supported_versions {
        let list: Vec<u8> = versions.iter().flatten().copied().collect();
        exts.extend(extension(
            0x002b,
            &[&[list.len() as u8][..], &list].concat(),
        ));
    }
    let suites: Vec<u8> = suites.iter().flat_map(|s| s.to_be_bytes()).collect();
    let body = [
        &version[..],
        &[0x5a; 32],          // random (fixed: deterministic)
        &[0x00],              // no session id
        &u16be(suites.len()), // cipher suites
        &suites,
        &[0x01, 0x00], // compression: null only
        &u16be(exts.len()),
        &exts,
    ]
    .concat();
    let len = body.len().to_be_bytes();
    let handshake = [&[0x01][..], &len[len.len() - 3..], &body].concat();
    [&[0x16][..], &version, &u16be(handshake.len()), &handshake].concat()
}

/// Suites of the TLS 1.0/1.1 era (CBC with SHA-1).
const OLD_SUITES: &[u16] = &[0xc013, 0xc009, 0xc014, 0xc00a, 0x002f, 0x0035];

/// Sends `hello` on a fresh TCP connection; returns everything the server
/// wrote before closing.
async fn send_hello(srv: &TestServer, hello: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(srv.addr).await.expect("connect");
    tcp.write_all(hello).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .ok();
    out
}

/// The response is exactly one fatal alert record with description `want`.
fn assert_fatal_alert(resp: &[u8], want: u8, what: &str) {
    assert!(resp.len() >= 7, "{what}: expected an alert, got {resp:?}");
    assert_eq!(resp[0], 0x15, "{what}: record type alert: {resp:?}");
    assert_eq!(&resp[3..5], &[0x00, 0x02], "{what}: {resp:?}");
    assert_eq!(resp[5], 2, "{what}: fatal: {resp:?}");
    assert_eq!(resp[6], want, "{what}: alert description: {resp:?}");
    assert_eq!(resp.len(), 7, "{what}: nothing after the alert: {resp:?}");
}

async fn tls_rejections(srv: &TestServer) -> f64 {
    metric(
        &srv.metrics().await,
        r#"wsbroker_handshake_rejected_total{reason="tls"}"#,
    )
}

/// Polls until the `tls` rejection counter reaches `at_least`.
async fn tls_rejections_reach(srv: &TestServer, at_least: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = tls_rejections(srv).await;
        if now >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tls rejections stuck at {now}, want >= {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// rustls clients.
// ---------------------------------------------------------------------------

fn roots(ca: &CertificateDer<'static>) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    roots
}

fn client(
    versions: &[&'static rustls::SupportedProtocolVersion],
    server_ca: &CertificateDer<'static>,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots(server_ca));
    let mut cfg = match cert {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("client cert"),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

async fn connect(
    srv: &TestServer,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(srv.addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("TLS handshake finishes or fails in time")
}

/// Upgrade + subscribe + publish over an established TLS stream.
async fn ws_round_trip(tls: TlsStream<TcpStream>, port: u16) {
    let mut req = format!("wss://localhost:{port}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", ORIGIN.parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade");
    subscribe(&mut ws, "tls.t", 1).await;
    send(
        &mut ws,
        json!({"op":"publish","topic":"tls.t","data":"over tls","id":2}),
    )
    .await;
    let mut got = vec![recv(&mut ws).await, recv(&mut ws).await];
    got.sort_by_key(|v| v["type"].as_str().map(str::to_string));
    assert_eq!(
        got,
        vec![
            json!({"type":"ack","id":2}),
            json!({"type":"message","topic":"tls.t","data":"over tls"})
        ]
    );
}

/// True when the connection was refused: the TLS handshake failed, or the
/// server ended the session (TLS 1.3 verifies the client certificate after
/// the client considers the handshake done) without answering the upgrade.
async fn refused(srv: &TestServer, cfg: Arc<rustls::ClientConfig>) -> bool {
    let mut tls = match connect(srv, cfg).await {
        Err(_) => return true,
        Ok(tls) => tls,
    };
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n\r\n"
    );
    if tls.write_all(req.as_bytes()).await.is_err() || tls.flush().await.is_err() {
        return true;
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(WAIT, tls.read(&mut chunk))
            .await
            .expect("the server answers or ends the session");
        match n {
            Ok(0) | Err(_) => return true,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
        if out.windows(4).any(|w| w == b"\r\n\r\n") {
            return !out.starts_with(b"HTTP/1.1 101");
        }
    }
}

fn suite_is_aead_with_forward_secrecy(suite: SupportedCipherSuite) -> bool {
    let name = format!("{:?}", suite.suite());
    let aead = name.contains("GCM") || name.contains("CHACHA20_POLY1305");
    // TLS 1.3 suites always use (EC)DHE; TLS 1.2 ones must say so.
    let fs = name.starts_with("TLS13_") || name.contains("ECDHE");
    aead && fs
}

// ---------------------------------------------------------------------------
// Protocol versions and suites.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn old_protocol_versions_and_weak_suites_are_refused_with_an_alert() {
    let srv = TestServer::start(&[]).await;
    let before = tls_rejections(&srv).await;
    let cases: Vec<(Vec<u8>, u8, &str)> = vec![
        (
            client_hello(TLS11, OLD_SUITES, None),
            PROTOCOL_VERSION,
            "TLS 1.1 ClientHello",
        ),
        (
            client_hello(TLS10, OLD_SUITES, None),
            PROTOCOL_VERSION,
            "TLS 1.0 ClientHello",
        ),
        (
            client_hello(TLS12, &[0x1301, 0xc02b, 0xc02f], Some(&[TLS11, TLS10])),
            PROTOCOL_VERSION,
            "supported_versions listing only 1.1 and 1.0",
        ),
        (
            client_hello(TLS12, OLD_SUITES, None),
            HANDSHAKE_FAILURE,
            "TLS 1.2 with CBC suites only",
        ),
        (
            client_hello(TLS12, &[0x009c, 0x009d, 0x003c], None),
            HANDSHAKE_FAILURE,
            "TLS 1.2 with RSA key exchange only (no forward secrecy)",
        ),
    ];
    for (hello, alert, what) in &cases {
        let resp = send_hello(&srv, hello).await;
        assert_fatal_alert(&resp, *alert, what);
    }
    tls_rejections_reach(&srv, before + cases.len() as f64).await;
    // The daemon keeps serving.
    let tls = srv.tls().await;
    ws_round_trip(tls, srv.addr.port()).await;
}

/// Control with the system's OpenSSL when present: `-tls1_1` is refused,
/// `-tls1_2` completes. Skipped (passes) when `openssl` is not installed.
#[tokio::test]
async fn openssl_s_client_tls1_1_is_refused() {
    let Ok(out) = std::process::Command::new("openssl")
        .arg("version")
        .output()
    else {
        eprintln!("openssl not installed: skipped");
        return;
    };
    if !out.status.success() {
        eprintln!("openssl not usable: skipped");
        return;
    }
    let srv = TestServer::start(&[]).await;
    let port = srv.addr.port();
    let run = move |version: &'static str| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("openssl")
                .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
                .args(["-servername", "localhost", version])
                // OpenSSL 3 refuses TLS 1.1 itself at the default level.
                .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run openssl")
        })
    };
    let before = tls_rejections(&srv).await;
    let old = run("-tls1_1").await.expect("join");
    let text =
        String::from_utf8_lossy(&old.stderr).into_owned() + &String::from_utf8_lossy(&old.stdout);
    assert!(!old.status.success(), "TLS 1.1 must fail: {text}");
    // openssl either reaches the server (which answers protocol_version) or,
    // if built without TLS 1.1, fails locally ("no protocols available").
    // rustls answers OpenSSL's TLS 1.1 hello with handshake_failure (40) or
    // protocol_version (70) depending on what the hello offers.
    if text.contains("alert protocol version") || text.contains("alert handshake failure") {
        assert!(text.contains("Cipher is (NONE)"), "no session: {text}");
        tls_rejections_reach(&srv, before + 1.0).await;
    } else {
        assert!(
            text.contains("no protocols available") || text.contains("unsupported"),
            "{text}"
        );
    }
    let ok = run("-tls1_2").await.expect("join");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("Protocol  : TLSv1.2") || text.contains("TLSv1.2"),
        "{text}"
    );
    assert!(!text.contains("Cipher is (NONE)"), "{text}");
}

#[tokio::test]
async fn tls12_only_and_tls13_clients_work_with_aead_forward_secret_suites() {
    let srv = TestServer::start(&[]).await;
    for (versions, want) in [
        (&[&rustls::version::TLS12][..], ProtocolVersion::TLSv1_2),
        (&[&rustls::version::TLS13][..], ProtocolVersion::TLSv1_3),
    ] {
        let tls = connect(&srv, client(versions, &srv.cert.cert_der, None))
            .await
            .expect("handshake");
        let conn = tls.get_ref().1;
        assert_eq!(conn.protocol_version(), Some(want));
        let suite = conn.negotiated_cipher_suite().expect("suite");
        assert!(suite_is_aead_with_forward_secrecy(suite), "{suite:?}");
        assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        ws_round_trip(tls, srv.addr.port()).await;
    }
    // Every TLS 1.2 suite the server accepts is AEAD + ECDHE.
    for suite in rustls::crypto::ring::DEFAULT_CIPHER_SUITES {
        assert!(suite_is_aead_with_forward_secrecy(*suite), "{suite:?}");
    }
}

/// A TLS client offering exactly `suites`, in this order.
fn client_offering(
    suites: &[rustls::CipherSuite],
    versions: &[&'static rustls::SupportedProtocolVersion],
    server_ca: &CertificateDer<'static>,
) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = suites
        .iter()
        .map(|want| {
            *rustls::crypto::ring::ALL_CIPHER_SUITES
                .iter()
                .find(|s| s.suite() == *want)
                .expect("ring has the suite")
        })
        .collect();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots(server_ca))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn aes_128_is_preferred_unless_the_client_puts_chacha20_first() {
    use rustls::CipherSuite::*;
    let srv = TestServer::start(&[]).await;
    let tls13 = &[&rustls::version::TLS13][..];
    let tls12 = &[&rustls::version::TLS12][..];
    let cases = [
        // OpenSSL's default order (Node, Python, curl): AES-256 first.
        (
            tls13,
            vec![
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_128_GCM_SHA256,
            ],
            TLS13_AES_128_GCM_SHA256,
        ),
        // A device without AES hardware: ChaCha20 first is honoured.
        (
            tls13,
            vec![
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_AES_128_GCM_SHA256,
            ],
            TLS13_CHACHA20_POLY1305_SHA256,
        ),
        // Only AES-256 offered: still served.
        (
            tls13,
            vec![TLS13_AES_256_GCM_SHA384],
            TLS13_AES_256_GCM_SHA384,
        ),
        (
            tls12,
            vec![
                TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            tls12,
            vec![
                TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (versions, offered, want) in cases {
        let tls = connect(
            &srv,
            client_offering(&offered, versions, &srv.cert.cert_der),
        )
        .await
        .unwrap_or_else(|e| panic!("handshake offering {offered:?}: {e}"));
        let got = tls.get_ref().1.negotiated_cipher_suite().expect("suite");
        assert_eq!(got.suite(), want, "offered {offered:?}");
        ws_round_trip(tls, srv.addr.port()).await;
    }
}

/// A harness server whose config file also sets `min_version = "1.3"`.
async fn start_tls13_only() -> TestServer {
    let cert = make_cert();
    let file = cert.dir.path().join("wsbroker.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nmin_version = \"1.3\"\n\
         [origins]\nallow = [\"{ORIGIN}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n",
        cert.cert_path.display(),
        cert.key_path.display()
    );
    std::fs::write(&file, toml).expect("write config");
    let settings = wsbroker::config::Settings::load(&wsbroker::config::LoadOptions {
        path: Some(file),
        dev: false,
        env: Some(Default::default()),
    })
    .expect("valid settings");
    assert_eq!(
        settings.tls.min_version,
        wsbroker::config::TlsMinVersion::Tls13
    );
    let server = wsbroker::server::start(settings).await.expect("start");
    let addr = server.local_addrs()[0];
    TestServer {
        tls: client_config(&cert.cert_der),
        server,
        addr,
        cert,
    }
}

/// CONTRACT §2: every key can be overridden from the environment, so
/// `WSBROKER__TLS__MIN_VERSION=1.3` must work (it looks like a number).
#[test]
fn min_version_can_be_set_from_the_environment() {
    let cert = make_cert();
    let s = settings(&cert, &[("WSBROKER__TLS__MIN_VERSION", "1.3")]);
    assert_eq!(s.tls.min_version, wsbroker::config::TlsMinVersion::Tls13);
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls12_only_client() {
    let srv = start_tls13_only().await;
    let before = tls_rejections(&srv).await;
    let old = client(&[&rustls::version::TLS12], &srv.cert.cert_der, None);
    let err = connect(&srv, old).await.expect_err("TLS 1.2 refused");
    assert!(
        err.to_string().to_lowercase().contains("protocolversion")
            || err.to_string().to_lowercase().contains("protocol version")
            || err.to_string().contains("PeerIncompatible"),
        "{err}"
    );
    // The hand-made TLS 1.2 ClientHello gets the alert too.
    let resp = send_hello(&srv, &client_hello(TLS12, &[0xc02b, 0xc02f], None)).await;
    assert_fatal_alert(
        &resp,
        PROTOCOL_VERSION,
        "TLS 1.2 hello with min_version 1.3",
    );
    tls_rejections_reach(&srv, before + 2.0).await;
    let tls = connect(
        &srv,
        client(&[&rustls::version::TLS13], &srv.cert.cert_der, None),
    )
    .await
    .expect("TLS 1.3 works");
    ws_round_trip(tls, srv.addr.port()).await;
}

// ---------------------------------------------------------------------------
// Mutual TLS.
// ---------------------------------------------------------------------------

struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

fn make_ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed CA");
    Ca {
        pem: cert.pem(),
        params,
        key,
    }
}

/// A client certificate signed by `ca`, with the given EKU and validity.
fn client_cert(
    ca: &Ca,
    eku: rcgen::ExtendedKeyUsagePurpose,
    expired: bool,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["client.test".to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client-1");
    params.extended_key_usages = vec![eku];
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_valid_cert_and_admits_signed_ones() {
    let ca = make_ca("wsbroker test client CA");
    let other_ca = make_ca("someone else's CA");
    let dir = tempfile::tempdir().expect("tmp");
    let ca_path = dir.path().join("client-ca.pem");
    std::fs::write(&ca_path, &ca.pem).expect("write CA");
    let ca_path = ca_path.to_str().expect("utf-8 path").to_string();
    let srv = TestServer::start(&[("WSBROKER__TLS__CLIENT_CA", ca_path.as_str())]).await;
    let server_ca = srv.cert.cert_der.clone();
    let before = tls_rejections(&srv).await;

    let tls12 = &[&rustls::version::TLS12][..];
    let tls13 = &[&rustls::version::TLS13][..];
    let use_client_auth = rcgen::ExtendedKeyUsagePurpose::ClientAuth;
    let refusals: Vec<(Arc<rustls::ClientConfig>, &str)> = vec![
        (
            client(tls13, &server_ca, None),
            "TLS 1.3, no client certificate",
        ),
        (
            client(tls12, &server_ca, None),
            "TLS 1.2, no client certificate",
        ),
        (
            client(
                tls13,
                &server_ca,
                Some(client_cert(&other_ca, use_client_auth.clone(), false)),
            ),
            "certificate from another CA",
        ),
        (
            client(
                tls13,
                &server_ca,
                Some(client_cert(&ca, use_client_auth.clone(), true)),
            ),
            "expired certificate",
        ),
        (
            client(
                tls13,
                &server_ca,
                Some(client_cert(
                    &ca,
                    rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                    false,
                )),
            ),
            "certificate for server authentication only",
        ),
    ];
    for (cfg, what) in &refusals {
        assert!(refused(&srv, cfg.clone()).await, "{what}: must be refused");
    }
    tls_rejections_reach(&srv, before + refusals.len() as f64).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while srv.server.shared().limiter.current() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refused clients hold no slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A certificate signed by the configured CA is admitted, over 1.3 and 1.2.
    for versions in [tls13, tls12] {
        let cfg = client(
            versions,
            &server_ca,
            Some(client_cert(&ca, use_client_auth.clone(), false)),
        );
        let tls = connect(&srv, cfg).await.expect("mTLS handshake");
        ws_round_trip(tls, srv.addr.port()).await;
    }
}
