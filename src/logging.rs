//! Logging setup (tracing, text or JSON, to stderr) with a reloadable filter
//! for SIGHUP, and a small rate limiter so floods cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::{LogFormat, LogSettings};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Logging errors.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The filter directive does not parse.
    #[error("log.level: invalid filter `{0}`: {1}")]
    Filter(String, String),
    /// Logging was not initialised by `init`.
    #[error("log.level: logging is not initialised")]
    NotInitialised,
}

fn filter(level: &str) -> Result<EnvFilter, LogError> {
    let filter = EnvFilter::builder()
        .parse(level)
        .map_err(|e| LogError::Filter(level.to_string(), e.to_string()))?;
    // The NATS client logs every event at info, one line per message it
    // drops as a slow consumer; the cluster logs what matters itself
    // (rate-limited). An explicit `async_nats=…` directive still wins.
    if level.contains("async_nats") {
        return Ok(filter);
    }
    Ok(match "async_nats=warn".parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    })
}

/// Installs the global subscriber (once per process; later calls only set the level).
pub fn init(settings: &LogSettings) -> Result<(), LogError> {
    if FILTER.get().is_some() {
        return set_level(&settings.level);
    }
    let (layer, handle) = reload::Layer::new(filter(&settings.level)?);
    let registry = tracing_subscriber::registry().with(layer);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match settings.format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    if result.is_ok() {
        let _ = FILTER.set(handle);
    }
    Ok(())
}

/// Changes the filter of the running subscriber (SIGHUP).
pub fn set_level(level: &str) -> Result<(), LogError> {
    let new = filter(level)?;
    let handle = FILTER.get().ok_or(LogError::NotInitialised)?;
    handle
        .reload(new)
        .map_err(|e| LogError::Filter(level.to_string(), e.to_string()))
}

/// Lets one event through per interval and counts the ones it held back.
pub struct RateLimit {
    interval_ns: u64,
    start: Instant,
    next_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// At most one event per `interval`.
    pub fn new(interval: Duration) -> Self {
        RateLimit {
            interval_ns: interval.as_nanos().min(u64::MAX as u128) as u64,
            start: Instant::now(),
            next_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event may be logged (n = events suppressed since the last one).
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_nanos() as u64;
        let next = self.next_ns.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ns
                .compare_exchange(
                    next,
                    now + self.interval_ns,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}
