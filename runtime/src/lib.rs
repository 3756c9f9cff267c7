//! What every Kanava binary does at start-up.
//!
//! - [`init`]: logging (human-readable text by default, one JSON object per
//!   line with `--log-format json`, filtered by `RUST_LOG` — a level, or
//!   `target=level` pairs such as `info,kanava_ztunnel::proxy=debug`;
//!   default `info` — written to standard error) and the one TLS crypto
//!   provider.
//! - [`shutdown_on_signal`]: a token cancelled on SIGTERM or Ctrl-C.
//! - [`raise_fd_limit`]: as many open files as the system allows; a proxy
//!   holds two sockets per connection and the default soft limit (1024) is
//!   far too low.

use std::io::IsTerminal;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs logging and the crypto provider. Call first thing in `main`.
pub fn init(format: LogFormat) {
    // `Targets` understands the `level` and `target=level` directives of
    // RUST_LOG without pulling a regular-expression engine into every binary.
    let directives = std::env::var("RUST_LOG").ok();
    let parsed = directives.as_deref().map(str::parse::<Targets>);
    let filter = match &parsed {
        Some(Ok(targets)) => targets.clone(),
        _ => Targets::new().with_default(LevelFilter::INFO),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    // Err only when a subscriber is already installed (e.g. in tests).
    let _ = match format {
        LogFormat::Text => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
    };
    if let (Some(text), Some(Err(error))) = (directives, parsed) {
        tracing::warn!(rust_log = %text, %error, "RUST_LOG not understood; logging at info");
    }
    kanava_tls::install_default_provider();
}

/// Raises the soft limit on open files to the hard limit. Returns the new
/// soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        // Keep the old limit if the system refuses; the process still works.
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current
}

/// A token cancelled when the process receives SIGTERM or SIGINT. Must be
/// called inside a Tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("termination signal received; shutting down");
        cancel.cancel();
    });
    token
}

/// The standard `process_*` metrics of this process (CPU time, resident
/// memory, open descriptors), in OpenMetrics text, read from `/proc/self`
/// at each scrape. Written by hand: the metrics library has no process
/// collector, and these are three numbers.
pub fn process_metrics() -> String {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of those (14th and 15th of the line).
    let after_name: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| {
        after_name
            .get(index)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    let cpu_seconds = (ticks(11) + ticks(12)) as f64 / per_second as f64;
    let resident_pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let resident_bytes = resident_pages * rustix::param::page_size() as u64;
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    format!(
        "# HELP process_cpu_seconds Total user and system CPU time spent in seconds.\n\
         # TYPE process_cpu_seconds counter\n\
         process_cpu_seconds_total {cpu_seconds}\n\
         # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
         # TYPE process_resident_memory_bytes gauge\n\
         process_resident_memory_bytes {resident_bytes}\n\
         # HELP process_open_fds Number of open file descriptors.\n\
         # TYPE process_open_fds gauge\n\
         process_open_fds {open_fds}\n"
    )
}

/// `metrics` (an OpenMetrics text ending in `# EOF`) with the process
/// metrics added before its end.
pub fn with_process_metrics(mut metrics: String) -> String {
    let process = process_metrics();
    match metrics.rfind("# EOF") {
        Some(end) => metrics.insert_str(end, &process),
        None => metrics.push_str(&process),
    }
    metrics
}

#[cfg(test)]
mod process_tests {
    use super::*;

    #[test]
    fn process_metrics_come_before_the_end_marker() {
        let text = with_process_metrics("# TYPE a counter\na_total 1\n# EOF\n".into());
        assert!(text.ends_with("# EOF\n"), "{text}");
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(
            rss > 1_000_000.0,
            "a test process has over 1 MB resident: {rss}"
        );
        assert!(text.contains("process_open_fds "));
        assert!(text.contains("process_cpu_seconds_total "));
    }
}
