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
