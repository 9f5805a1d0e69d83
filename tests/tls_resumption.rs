//! TLS session resumption (CONTRACT §12, issue 15): stateless tickets for
//! TLS 1.3 and 1.2, on by default, counted in `wsbroker_tls_resumed_total`,
//! still valid after a SIGHUP certificate reload; `tls.session_tickets =
//! false` turns them off. Against the real binary, so the counter is the
//! daemon's own.

mod common;

use std::sync::Arc;

use common::daemon::{config_file, serve_command, Daemon};
use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::HandshakeKind;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A client that keeps the sessions it is given (rustls' in-memory store,
/// shared by every connection made with this config).
fn client(
    roots: &[&CertificateDer<'static>],
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One connection: TLS, the upgrade (reading the 101 also takes in the TLS
/// 1.3 tickets sent after the handshake), a Close; returns how the TLS
/// handshake went, as the client saw it.
async fn visit(d: &Daemon, cfg: &Arc<rustls::ClientConfig>) -> HandshakeKind {
    let tcp = TcpStream::connect(d.wss).await.expect("tcp");
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .expect("tls handshake");
    raw::upgrade(&mut tls).await.expect("upgrade");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    let _ = tls
        .write_all(&raw::frame(raw::CLOSE, true, &1000u16.to_be_bytes()))
        .await;
    let _ = tls.shutdown().await;
    kind
}

async fn resumed_total(d: &Daemon) -> f64 {
    metric(&d.metrics().await, "wsbroker_tls_resumed_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_resume_tls13_and_tls12_and_survive_a_certificate_reload() {
    let cert = make_cert();
    let file = config_file(&cert, "\"127.0.0.1:0\"", "", "", "");
    let mut d = Daemon::start(serve_command(&file));
    assert_eq!(resumed_total(&d).await, 0.0);

    let tls13 = client(&[&cert.cert_der], &rustls::version::TLS13);
    let tls12 = client(&[&cert.cert_der], &rustls::version::TLS12);
    let mut resumed = 0.0;
    for (name, cfg) in [("TLS 1.3", &tls13), ("TLS 1.2", &tls12)] {
        assert_eq!(visit(&d, cfg).await, HandshakeKind::Full, "{name} first");
        for i in 0..3 {
            assert_eq!(
                visit(&d, cfg).await,
                HandshakeKind::Resumed,
                "{name} reconnect {i}"
            );
            resumed += 1.0;
        }
        assert_eq!(resumed_total(&d).await, resumed, "{name}: counted");
    }

    // A new certificate and key at the same paths, then SIGHUP.
    let fresh = make_cert();
    std::fs::copy(&fresh.cert_path, &cert.cert_path).expect("copy cert");
    std::fs::copy(&fresh.key_path, &cert.key_path).expect("copy key");
    let seen = d.count_lines("reload applied");
    d.signal(libc::SIGHUP);
    d.wait_for_line("reload applied", seen).await;
    // A client that never came before sees the new certificate...
    let newcomer = client(&[&fresh.cert_der], &rustls::version::TLS13);
    assert_eq!(visit(&d, &newcomer).await, HandshakeKind::Full);
    // ...and the tickets issued before the reload still resume.
    for (name, cfg) in [("TLS 1.3", &tls13), ("TLS 1.2", &tls12)] {
        assert_eq!(
            visit(&d, cfg).await,
            HandshakeKind::Resumed,
            "{name} after the reload"
        );
        resumed += 1.0;
    }
    assert_eq!(resumed_total(&d).await, resumed);

    // Without a saved session every handshake is full, and not counted.
    let mut fresh_cfg = (*newcomer).clone();
    fresh_cfg.resumption = rustls::client::Resumption::disabled();
    let fresh_cfg = Arc::new(fresh_cfg);
    for _ in 0..2 {
        assert_eq!(visit(&d, &fresh_cfg).await, HandshakeKind::Full);
    }
    assert_eq!(resumed_total(&d).await, resumed);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_tickets_false_turns_resumption_off() {
    let cert = make_cert();
    let file = config_file(&cert, "\"127.0.0.1:0\"", "", "session_tickets = false", "");
    let mut d = Daemon::start(serve_command(&file));
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let cfg = client(&[&cert.cert_der], version);
        for i in 0..3 {
            assert_eq!(
                visit(&d, &cfg).await,
                HandshakeKind::Full,
                "{version:?} visit {i}"
            );
        }
    }
    assert_eq!(resumed_total(&d).await, 0.0);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).await.success());
}
