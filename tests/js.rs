//! The JavaScript client library (`clients/js`, CONTRACT §13): its
//! `node --test` suites and its headless-Chromium test, run by `cargo test`
//! against this build's daemon binary (passed as `WSBROKER_BIN`).
//!
//! Each suite starts its own daemons (generated config, fresh certificate,
//! free ports on 127.0.0.1). Node, npm and Chromium are required: a missing
//! one fails the test, naming the Debian packages to install. `npm ci` runs
//! in `clients/js` when its `node_modules` is missing (the npm registry is
//! the only network it needs).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_wsbroker");

/// One suite at a time: their timing assertions are generous, but two
/// daemons' worth of restarts plus a browser at once on 2 shared cores is
/// asking for trouble. Also guards `npm ci`.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long one suite may run before it is killed and failed.
const SUITE_TIMEOUT: Duration = Duration::from_secs(240);

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

fn tool_version(cmd: &str) -> Option<String> {
    let out = Command::new(cmd).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn require_node() {
    let node = tool_version("node").unwrap_or_else(|| {
        panic!(
            "`node` not found: the JavaScript client's tests need Node.js >= 20 and npm \
             (Debian: apt-get install nodejs npm)"
        )
    });
    let major: u32 = node
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "node {node} is too old: the JavaScript client needs Node.js >= 20 (Debian: apt-get install nodejs npm)"
    );
    // Each test daemon gets a fresh self-signed certificate from openssl.
    let openssl = Command::new("openssl").arg("version").output();
    assert!(
        openssl.map(|o| o.status.success()).unwrap_or(false),
        "`openssl` not found: the JavaScript client's tests make their certificates with it \
         (Debian: apt-get install openssl)"
    );
    tool_version("npm").unwrap_or_else(|| {
        panic!(
            "`npm` not found: the JavaScript client's tests need it (Debian: apt-get install npm)"
        )
    });
}

/// The Chromium executable: `$CHROMIUM`, else `/usr/bin/chromium`, else
/// `chromium` on the PATH.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    let debian = PathBuf::from("/usr/bin/chromium");
    if debian.exists() {
        return debian;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("chromium"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "Chromium not found (/usr/bin/chromium or chromium on the PATH): the JavaScript \
                 client's browser test needs it (Debian: apt-get install chromium)"
            )
        })
}

/// `npm ci` when `node_modules` is missing or older than the lockfile.
fn npm_ci(dir: &Path) {
    let marker = dir.join("node_modules/.package-lock.json");
    let fresh = match (marker.metadata(), dir.join("package-lock.json").metadata()) {
        (Ok(m), Ok(l)) => match (m.modified(), l.modified()) {
            (Ok(m), Ok(l)) => m >= l,
            _ => true,
        },
        _ => false,
    };
    if fresh {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .output()
        .expect("run npm ci");
    assert!(
        out.status.success(),
        "npm ci in {} failed:\n{}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `node --test` on the given files of `clients/js/test` and fails
/// unless every test passed and at least `min_tests` ran.
fn run_suite(files: &[&str], min_tests: usize, extra_env: &[(&str, &Path)]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_node();
    let dir = js_dir();
    npm_ci(&dir);
    let mut cmd = Command::new("node");
    // TAP explicitly: its `# pass N` / `# fail N` summary is read below (the
    // default reporter of newer Node versions is `spec`).
    cmd.arg("--test")
        .arg("--test-reporter=tap")
        .args(files.iter().map(|f| format!("test/{f}")))
        .current_dir(&dir)
        .env("WSBROKER_BIN", BIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn node --test");
    // Read both pipes on threads so a chatty suite never blocks on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait node") {
            break Some(status);
        }
        if started.elapsed() > SUITE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out_thread.join().unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    println!("{out}");
    eprintln!("{err}");
    let status = status
        .unwrap_or_else(|| panic!("node --test {files:?} did not finish within {SUITE_TIMEOUT:?}"));
    let count = |key: &str| -> Option<usize> {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("# {key} ")))
            .and_then(|n| n.trim().parse().ok())
    };
    assert!(status.success(), "node --test {files:?} failed ({status})");
    assert_eq!(count("fail"), Some(0), "failures in {files:?}");
    let passed = count("pass").expect("a `# pass N` summary line");
    assert!(
        passed >= min_tests,
        "node --test {files:?}: {passed} tests passed, expected at least {min_tests}"
    );
    assert_eq!(count("skipped"), Some(0), "skipped tests in {files:?}");
}

#[test]
fn js_client_acks_dispatch_errors_close() {
    run_suite(&["client.test.mjs"], 17, &[]);
}

#[test]
fn js_client_reconnects_and_backoff() {
    run_suite(&["reconnect.test.mjs"], 7, &[]);
}

/// Needs the daemon's `[auth] mode = "jwt"` (CONTRACT §10).
#[test]
fn js_client_token_refresh_and_auth_closes() {
    run_suite(&["auth.test.mjs"], 8, &[]);
}

/// Includes the page authenticating against a `mode = "jwt"` daemon.
#[test]
fn js_client_in_headless_chromium() {
    let chromium = chromium();
    run_suite(&["browser.test.mjs"], 4, &[("CHROMIUM", &chromium)]);
}
