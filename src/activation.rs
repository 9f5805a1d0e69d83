//! systemd socket activation (CONTRACT §12): the listening sockets a service
//! manager passes as fds 3, 4, … with `LISTEN_FDS` / `LISTEN_PID` (and
//! optionally `LISTEN_FDNAMES`), read with `sd_listen_fds(1)` semantics, and
//! checked against `server.listen`. Served instead of binding: the sockets
//! stay open in the manager across a restart, so clients wait in the backlog
//! instead of being refused.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use parking_lot::Mutex;

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Why the inherited sockets cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` / `LISTEN_PID` are malformed.
    #[error("socket activation: {0}")]
    Env(String),
    /// The sockets do not match `server.listen` (count, address, kind).
    #[error("server.listen: {0}")]
    Mismatch(String),
}

/// Sockets passed by the service manager, in order, with their names.
#[derive(Debug)]
pub struct Inherited {
    fds: Vec<OwnedFd>,
    names: Vec<String>,
}

static CAPTURED: Mutex<Option<Result<Inherited, ActivationError>>> = Mutex::new(None);

/// Takes the sockets from the environment, as `sd_listen_fds(1)` does, and
/// keeps them for [`take`]: only when `LISTEN_PID` is this process, marking
/// them close-on-exec; the three variables are removed in every case, so no
/// child inherits them. Call it before any other thread exists (it edits
/// the environment), i.e. first thing in `main`.
pub fn capture_from_env() {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let result = parse(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    );
    let captured = match result {
        Ok(None) => None,
        Ok(Some(count)) => Some(adopt(count, names.as_deref())),
        Err(e) => Some(Err(e)),
    };
    *CAPTURED.lock() = captured;
}

/// The sockets [`capture_from_env`] found (once); `None` without activation.
pub fn take() -> Option<Result<Inherited, ActivationError>> {
    CAPTURED.lock().take()
}

/// How many descriptors are ours: `None` when not activated (no
/// `LISTEN_PID`, or another process's).
fn parse(
    pid: Option<&str>,
    fds: Option<&str>,
    _names: Option<&str>,
    own_pid: u32,
) -> Result<Option<usize>, ActivationError> {
    let Some(pid) = pid else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::Env(format!("LISTEN_PID={pid:?} is not a process id")))?;
    if pid != own_pid {
        // Meant for another process (inherited environment): not ours.
        return Ok(None);
    }
    let fds =
        fds.ok_or_else(|| ActivationError::Env("LISTEN_PID set without LISTEN_FDS".into()))?;
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::Env(format!("LISTEN_FDS={fds:?} is not a number")))?;
    if count > 1024 {
        return Err(ActivationError::Env(format!(
            "LISTEN_FDS={count} is implausibly large"
        )));
    }
    Ok(Some(count))
}

/// Takes ownership of fds 3 … 3+count-1 and marks them close-on-exec.
fn adopt(count: usize, names: Option<&str>) -> Result<Inherited, ActivationError> {
    let mut fds = Vec::with_capacity(count);
    for i in 0..count {
        let fd = LISTEN_FDS_START + i as RawFd;
        // SAFETY: fcntl on a descriptor number only queries/sets its flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(ActivationError::Env(format!(
                "LISTEN_FDS={count} but fd {fd} is not open"
            )));
        }
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        // SAFETY: the protocol hands these descriptors to this process
        // (LISTEN_PID matched), and they are adopted exactly once: the
        // variables were removed from the environment before this runs.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let names = names
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    Ok(Inherited { fds, names })
}

impl Inherited {
    /// How a socket is named in errors: index, fd and `LISTEN_FDNAMES` name.
    fn describe(&self, i: usize) -> String {
        let fd = self.fds[i].as_raw_fd();
        match self.names.get(i).filter(|n| !n.is_empty()) {
            Some(name) => format!("inherited socket {} (fd {fd}, {name:?})", i + 1),
            None => format!("inherited socket {} (fd {fd})", i + 1),
        }
    }

    /// Number of sockets passed.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// True when the manager passed none.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The sockets as non-blocking listeners, one per `server.listen`
    /// address in order; each must be a listening TCP socket bound to
    /// exactly that address.
    pub fn listeners(
        self,
        listen: &[SocketAddr],
    ) -> Result<Vec<std::net::TcpListener>, ActivationError> {
        if self.fds.len() != listen.len() {
            let listed: Vec<String> = listen.iter().map(|a| a.to_string()).collect();
            return Err(ActivationError::Mismatch(format!(
                "{} address(es) listed ({}) but the service manager passed {} socket(s) (LISTEN_FDS={}); make the socket unit's ListenStream= lines and server.listen the same, in the same order",
                listen.len(),
                listed.join(", "),
                self.fds.len(),
                self.fds.len()
            )));
        }
        let descriptions: Vec<String> = (0..self.fds.len()).map(|i| self.describe(i)).collect();
        let mut out = Vec::with_capacity(listen.len());
        for ((fd, want), what) in self.fds.into_iter().zip(listen).zip(descriptions) {
            let sock = socket2::Socket::from(fd);
            let mismatch = |reason: String| ActivationError::Mismatch(format!("{what}: {reason}"));
            match sock.r#type() {
                Ok(t) if t == socket2::Type::STREAM => {}
                Ok(_) => return Err(mismatch("not a stream (TCP) socket".into())),
                Err(e) => return Err(mismatch(format!("not a socket ({e})"))),
            }
            if !is_listening(&sock) {
                return Err(mismatch("not a listening socket".into()));
            }
            let got = sock
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| mismatch("not an IPv4/IPv6 socket".into()))?;
            if got != *want {
                return Err(mismatch(format!(
                    "bound to {got}, but server.listen lists {want} in its place"
                )));
            }
            sock.set_nonblocking(true)
                .map_err(|e| mismatch(format!("cannot make it non-blocking: {e}")))?;
            out.push(std::net::TcpListener::from(sock));
        }
        Ok(out)
    }
}

/// SO_ACCEPTCONN: the socket is in the listening state.
fn is_listening(sock: &socket2::Socket) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && value != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_listen_fds_semantics() {
        assert!(matches!(parse(None, Some("2"), None, 7), Ok(None)));
        assert!(matches!(parse(Some("8"), Some("2"), None, 7), Ok(None)));
        assert!(matches!(parse(Some("7"), Some("2"), None, 7), Ok(Some(2))));
        assert!(matches!(
            parse(Some(" 7 "), Some("0"), None, 7),
            Ok(Some(0))
        ));
        for (pid, fds) in [("x", Some("1")), ("7", None), ("7", Some("two"))] {
            let e = parse(Some(pid), fds, None, 7).expect_err("malformed");
            assert!(e.to_string().starts_with("socket activation: "), "{e}");
        }
    }

    #[test]
    fn listeners_are_checked_against_server_listen() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = a.local_addr().expect("addr");
        let inherited = |l: &std::net::TcpListener| Inherited {
            fds: vec![OwnedFd::from(l.try_clone().expect("dup"))],
            names: vec!["wsbroker.socket".into()],
        };
        let ok = inherited(&a).listeners(&[addr]).expect("matches");
        assert_eq!(ok[0].local_addr().expect("addr"), addr);

        let other: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let e = inherited(&a).listeners(&[other]).expect_err("address");
        let text = e.to_string();
        assert!(
            text.starts_with("server.listen: inherited socket 1 (fd "),
            "{text}"
        );
        assert!(
            text.contains(&addr.to_string()) && text.contains("127.0.0.1:1"),
            "{text}"
        );
        assert!(text.contains("\"wsbroker.socket\""), "{text}");

        let e = inherited(&a).listeners(&[addr, other]).expect_err("count");
        assert!(e.to_string().contains("passed 1 socket(s)"), "{e}");

        // Bound but not listening.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("a").into())
            .expect("bind");
        let bound = s.local_addr().expect("a").as_socket().expect("inet");
        let e = Inherited {
            fds: vec![OwnedFd::from(s)],
            names: vec![],
        }
        .listeners(&[bound])
        .expect_err("not listening");
        assert!(e.to_string().ends_with("not a listening socket"), "{e}");
    }
}
