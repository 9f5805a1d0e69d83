//! The daemon's life under a service manager (CONTRACT §9): start-up
//! (config, logging, file limits, dev certificate), sd_notify, SIGHUP reload
//! and the SIGTERM/SIGINT drain.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::config::{ConfigErrors, LoadOptions, Settings};
use crate::server::{self, RunningServer, ServerError};

/// Where `serve --dev` writes its certificate for clients to trust.
pub const DEV_CERT_PATH: &str = "wsbroker-dev-cert.pem";

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid (exit code 2).
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// Start-up failed (exit code 1).
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Logging could not be set up.
    #[error(transparent)]
    Log(#[from] crate::logging::LogError),
    /// Signal handlers or the dev certificate file failed.
    #[error("{0}")]
    Io(String),
}

fn notify(states: &[NotifyState<'_>]) {
    // Without NOTIFY_SOCKET this is a no-op; a failure is not fatal.
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does) and
/// returns the resulting soft limit.
pub fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only write/read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// `WATCHDOG_USEC` as libsystemd's `sd_watchdog_enabled` reads it: set and
/// non-zero, and `WATCHDOG_PID` either unset or equal to our pid (the
/// sd-notify crate also rejects an unset `WATCHDOG_PID`).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Runs the daemon until SIGTERM/SIGINT, then drains and returns.
pub async fn serve(opts: LoadOptions) -> Result<(), ServeError> {
    // Handlers first: a SIGHUP (systemctl reload right after READY=1) or a
    // SIGTERM during start-up must not hit the default action (terminate).
    let io = |e: std::io::Error| ServeError::Io(format!("signal handler: {e}"));
    let mut hup = signal(SignalKind::hangup()).map_err(io)?;
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    let settings = Settings::load(&opts)?;
    crate::logging::init(&settings.log)?;
    for w in settings.warnings() {
        warn!("{w}");
    }
    if let Some(limit) = raise_nofile_limit() {
        // Each connection costs one fd; keep some for listeners, files, admin.
        let needed = settings.server.max_connections as u64 + 64;
        if limit < needed {
            warn!(
                open_files_limit = limit,
                max_connections = settings.server.max_connections,
                "server.max_connections ({}) does not fit under the open-file limit ({}); raise LimitNOFILE / ulimit -n",
                settings.server.max_connections,
                limit
            );
        }
    }
    let running = server::start(settings).await?;
    if let Some(pem) = running.dev_cert_pem() {
        std::fs::write(DEV_CERT_PATH, pem)
            .map_err(|e| ServeError::Io(format!("cannot write {DEV_CERT_PATH}: {e}")))?;
        info!(
            path = DEV_CERT_PATH,
            "dev mode: self-signed certificate for localhost/127.0.0.1 written; trust it with --ca {DEV_CERT_PATH}"
        );
    }
    notify(&[NotifyState::Ready]);
    if let Some(timeout) = watchdog_interval() {
        let every = timeout / 2;
        let hard = running.shared().hard.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = hard.cancelled() => return,
                    _ = tick.tick() => notify(&[NotifyState::Watchdog]),
                }
            }
        });
    }
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&running, &opts),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("shutting down: draining connections");
    notify(&[NotifyState::Stopping]);
    let drain = running.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {}
        _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
            // A second SIGTERM/SIGINT: stop waiting for the grace window.
            warn!("second signal: cutting the remaining connections");
            running.cut();
            drain.await;
        }
    }
    info!("shutdown complete");
    Ok(())
}

/// Re-reads the file and applies TLS, origins, `[auth]` and log level; a bad file
/// leaves the running settings untouched.
fn reload(running: &RunningServer, opts: &LoadOptions) {
    // MONOTONIC_USEC lets Type=notify-reload match this RELOADING=1 to the
    // reload it asked for; plain Type=notify ignores it.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
    let path = opts.path.as_deref();
    info!(config = %crate::config::display_path(path), "SIGHUP: reloading");
    match Settings::load(opts) {
        Err(errors) => {
            for line in &errors.0 {
                error!(problem = %line, "reload rejected; keeping the running settings");
            }
        }
        Ok(new) => match running.reload(new) {
            Ok(restart) => {
                for key in restart {
                    warn!(key = %key, "changed in the file but needs restart; not applied");
                }
                info!("reload applied (tls, origins, auth keys and lists, log.level)");
            }
            Err(e) => error!(error = %e, "reload rejected; keeping the running settings"),
        },
    }
    notify(&[NotifyState::Ready]);
}
