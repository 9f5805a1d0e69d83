//! The real binary as a daemon: `wsbroker serve --config FILE` with JSON
//! logs on stderr collected line by line, the listeners' addresses read from
//! the log, signals by pid, killed and reaped on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_wsbroker");

/// A running `wsbroker serve`.
pub struct Daemon {
    /// The process.
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The wss listener.
    pub wss: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get(key)?.as_str().map(str::to_string)
}

impl Daemon {
    /// Starts `serve --config config` (the file must set `log.format =
    /// "json"` and port-0 listeners) and waits until both listen.
    pub fn start(config: &Path) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg("--config").arg(config);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WSBROKER__") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("spawn wsbroker");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("log lock").push(line);
            }
        });
        let mut d = Daemon {
            child,
            log,
            wss: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let deadline = Instant::now() + super::WAIT;
        let (mut wss, mut admin) = (None, None);
        while wss.is_none() || admin.is_none() {
            for line in d.log.lock().expect("log lock").iter() {
                let addr = field(line, "addr").and_then(|a| a.parse::<SocketAddr>().ok());
                match field(line, "message").as_deref() {
                    Some("listening (wss)") => wss = addr,
                    Some("admin listening (http)") => admin = addr,
                    _ => {}
                }
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!(
                    "wsbroker exited with {status} at start-up:\n{}",
                    d.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon not listening:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d.wss = wss.expect("wss addr");
        d.admin = admin.expect("admin addr");
        d
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Lines logged so far that contain `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded) until more than `seen` lines contain `needle`.
    pub async fn wait_for_line(&self, needle: &str, seen: usize) {
        let deadline = Instant::now() + super::WAIT;
        while self.count_lines(needle) <= seen {
            assert!(
                Instant::now() < deadline,
                "no new `{needle}` line in:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
