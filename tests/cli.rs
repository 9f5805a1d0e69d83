//! The command line end to end: `serve --dev` writes its certificate, `sub`
//! prints what `pub` sends, and failures exit non-zero with the reason.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, KillOnDrop as Kill};

const BIN: &str = env!("CARGO_BIN_EXE_wsbroker");

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {port}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `serve --dev` in `dir`, with ports moved off the defaults by a config file.
fn dev_server(dir: &Path) -> (Kill, u16) {
    let port = free_port();
    let admin = free_port();
    let config = dir.join("ports.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        ),
    )
    .expect("config");
    let child = Command::new(BIN)
        .args(["serve", "--dev", "--config"])
        .arg(&config)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let guard = Kill(child);
    wait_listening(port);
    (guard, port)
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run wsbroker")
}

#[test]
fn dev_mode_sub_and_pub_from_two_terminals() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_server, port) = dev_server(dir.path());
    let cert = dir.path().join("wsbroker-dev-cert.pem");
    let pem = std::fs::read_to_string(&cert).expect("dev cert written");
    assert!(pem.contains("BEGIN CERTIFICATE") && !pem.contains("PRIVATE KEY"));
    let url = format!("wss://localhost:{port}/ws");

    let sub = Command::new(BIN)
        .args(["sub", "--url", &url, "--ca", "wsbroker-dev-cert.pem"])
        .args([
            "--origin",
            "http://localhost:3000",
            "--topic",
            "chat.>",
            "--topic",
            "other",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sub");
    let mut sub = Kill(sub);
    let stdout = sub.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // The subscriber may still be subscribing: publish until a line arrives.
    let deadline = Instant::now() + Duration::from_secs(15);
    let line = loop {
        let out = run(
            dir.path(),
            &[
                "pub",
                "--url",
                &url,
                "--ca",
                "wsbroker-dev-cert.pem",
                "--origin",
                "http://localhost:3000",
                "--topic",
                "chat.room1",
                "--data",
                r#"{"text": "hi"}"#,
            ],
        );
        assert!(
            out.status.success(),
            "pub failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            break line;
        }
        assert!(Instant::now() < deadline, "sub printed nothing");
    };
    assert_eq!(
        line,
        r#"{"type":"message","topic":"chat.room1","data":{"text": "hi"}}"#
    );

    // --insecure works (with a warning on stderr), by IP address too.
    let out = run(
        dir.path(),
        &[
            "pub",
            "--url",
            &format!("wss://127.0.0.1:{port}/ws"),
            "--insecure",
            "--origin",
            "http://127.0.0.1:1",
            "--topic",
            "other",
            "--data",
            "[1,2]",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("insecure"));
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("second line");
    assert_eq!(line, r#"{"type":"message","topic":"other","data":[1,2]}"#);
}

#[test]
fn failures_exit_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_server, port) = dev_server(dir.path());
    let url = format!("wss://localhost:{port}/ws");
    let base = ["--url", url.as_str(), "--ca", "wsbroker-dev-cert.pem"];

    // A forbidden origin: the 403 reason reaches the user.
    let mut args = vec!["pub"];
    args.extend(base);
    args.extend([
        "--origin",
        "https://evil.example",
        "--topic",
        "t",
        "--data",
        "1",
    ]);
    let out = run(dir.path(), &args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403") && err.contains("origin not allowed"),
        "{err}"
    );

    // A wildcard publish: the server's error code is shown.
    let mut args = vec!["pub"];
    args.extend(base);
    args.extend([
        "--origin",
        "http://localhost:1",
        "--topic",
        "a.*",
        "--data",
        "1",
    ]);
    let out = run(dir.path(), &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad_request"));

    // Not JSON: a usage error, exit 2.
    let mut args = vec!["pub"];
    args.extend(base);
    args.extend([
        "--origin",
        "http://localhost:1",
        "--topic",
        "t",
        "--data",
        "{nope",
    ]);
    let out = run(dir.path(), &args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without --ca or --insecure the system trust store is used; the
    // self-signed dev certificate is not in it: a TLS failure, exit 1.
    let stranger = rcgen::generate_simple_self_signed(vec!["other.example".to_string()])
        .expect("unrelated certificate");
    let store = dir.path().join("store.pem");
    std::fs::write(&store, stranger.cert.pem()).expect("store");
    let out = Command::new(BIN)
        .args(["pub", "--url", &url, "--origin", "http://localhost:1"])
        .args(["--topic", "t", "--data", "1"])
        .current_dir(dir.path())
        .env("SSL_CERT_FILE", &store)
        .env_remove("SSL_CERT_DIR")
        .output()
        .expect("run wsbroker");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("certificate"), "{err}");
    // A store holding the dev certificate (SSL_CERT_FILE, as with OpenSSL)
    // is trusted without any flag.
    let out = Command::new(BIN)
        .args(["pub", "--url", &url, "--origin", "http://localhost:1"])
        .args(["--topic", "t", "--data", "1"])
        .current_dir(dir.path())
        .env("SSL_CERT_FILE", dir.path().join("wsbroker-dev-cert.pem"))
        .env_remove("SSL_CERT_DIR")
        .output()
        .expect("run wsbroker");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An empty store: nothing to trust, say what to pass (usage, exit 2).
    let out = Command::new(BIN)
        .args(["pub", "--url", &url, "--topic", "t", "--data", "1"])
        .current_dir(dir.path())
        .env("SSL_CERT_FILE", dir.path().join("no-such-store.pem"))
        .env("SSL_CERT_DIR", dir.path().join("no-such-dir"))
        .output()
        .expect("run wsbroker");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca") && err.contains("--insecure"), "{err}");

    // Usage errors from clap exit 2 as well.
    let out = run(dir.path(), &["pub", "--url", &url]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(dir.path(), &["serve"]);
    assert_eq!(out.status.code(), Some(2));
}
