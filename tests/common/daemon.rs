//! The real `wsbroker` binary as a daemon: a config file for it, the
//! command, start-up (bounded wait for both listeners, from its JSON log),
//! signals and its admin endpoints. Killed and reaped on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{admin_request, TestCert, ORIGIN, WAIT};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_wsbroker");

/// Writes `wsbroker.toml` into the cert's directory: `[server]` with `listen`
/// (a TOML value) and the lines of `server`, the cert, the harness origin,
/// an admin listener on port 0, JSON logs at info; `extra` is appended
/// (whole sections, e.g. `"[tls]\n…"` is not allowed twice: use `tls`).
pub fn config_file(cert: &TestCert, listen: &str, server: &str, tls: &str, extra: &str) -> PathBuf {
    let file = cert.dir.path().join("wsbroker.toml");
    let text = format!(
        "[server]\nlisten = {listen}\n{server}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{tls}\n[origins]\nallow = [\"{ORIGIN}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"info\"\nformat = \"json\"\n{extra}\n",
        cert.cert_path.display(),
        cert.key_path.display(),
    );
    std::fs::write(&file, text).expect("write config");
    file
}

/// `wsbroker serve --config FILE`, without the service-manager variables of
/// the test's own environment.
pub fn serve_command(config: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").arg("--config").arg(config);
    scrub_env(&mut cmd);
    cmd
}

/// `wsbroker serve --config FILE` started the way systemd's socket
/// activation starts it: `listeners` as fds 3, 4, …, `LISTEN_FDS`, the
/// names in `LISTEN_FDNAMES`, and `LISTEN_PID` set to the daemon's own pid
/// (a shell sets it to `$$` and execs the binary, keeping its pid).
pub fn activated_command(
    config: &Path,
    listeners: &[&std::net::TcpListener],
    names: &[&str],
) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES='{}' exec \"$0\" \"$@\"",
            listeners.len(),
            names.join(":")
        ))
        .arg(BIN)
        .arg("serve")
        .arg("--config")
        .arg(config);
    scrub_env(&mut cmd);
    let fds: Vec<i32> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    // SAFETY: only dup2/fcntl/close (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (a source may sit in 3..), then into place;
            // dup2 leaves the copies without FD_CLOEXEC.
            for (i, fd) in fds.iter().enumerate() {
                if libc::dup2(*fd, 200 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..fds.len() as i32 {
                if libc::dup2(200 + i, 3 + i) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(200 + i);
            }
            Ok(())
        });
    }
    cmd
}

/// Removes the service-manager and `WSBROKER__*` variables of the test's
/// own environment.
fn scrub_env(cmd: &mut Command) {
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(var);
    }
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WSBROKER__") {
            cmd.env_remove(k);
        }
    }
}

/// A running daemon.
pub struct Daemon {
    /// The process.
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Its first wss address.
    pub wss: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A string field of a JSON log line.
pub fn field(line: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get(key)?.as_str().map(str::to_string)
}

/// Spawns `cmd` with stderr collected line by line (stdout discarded).
pub fn spawn_logged(mut cmd: Command) -> (Child, Arc<Mutex<Vec<String>>>) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
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
    (child, log)
}

impl Daemon {
    /// Starts `cmd` and waits (bounded) until both listeners are up.
    pub fn start(cmd: Command) -> Daemon {
        match Daemon::try_start(cmd) {
            Ok(d) => d,
            Err((status, log)) => panic!("wsbroker exited with {status} at start-up:\n{log}"),
        }
    }

    /// Starts `cmd`; Err with the exit status and the log when it exits
    /// during start-up.
    pub fn try_start(cmd: Command) -> Result<Daemon, (ExitStatus, String)> {
        let (child, log) = spawn_logged(cmd);
        let mut d = Daemon {
            child,
            log,
            wss: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let deadline = Instant::now() + WAIT;
        let (mut wss, mut admin) = (None, None);
        while wss.is_none() || admin.is_none() {
            for line in d.log.lock().expect("log lock").iter() {
                let addr = field(line, "addr").and_then(|a| a.parse::<SocketAddr>().ok());
                match field(line, "message").as_deref() {
                    Some("listening (wss)") => wss = wss.or(addr),
                    Some("admin listening (http)") => admin = addr,
                    _ => {}
                }
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                // Let the log thread catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Err((status, d.log_text()));
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
        Ok(d)
    }

    /// Its pid.
    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Sends it a signal.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// The lines it logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Log lines containing `needle` so far.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded) until more than `seen` log lines contain `needle`.
    pub async fn wait_for_line(&self, needle: &str, seen: usize) {
        let deadline = Instant::now() + WAIT;
        while self.count_lines(needle) <= seen {
            assert!(
                Instant::now() < deadline,
                "no new log line with {needle:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.http("/metrics").await
    }

    /// `GET path` on the admin listener: the raw response.
    pub async fn http(&self, path: &str) -> String {
        admin_request(
            self.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await
    }
}
