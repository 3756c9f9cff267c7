use clap::Parser;
use kanava_control_plane::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    kanava_telemetry::init_logging(config.log_format);
    kanava_tls::install_default_provider();
    tracing::info!(?config, "kanava-control-plane starting");

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_termination().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    kanava_control_plane::run(config, shutdown).await?;
    Ok(())
}

async fn wait_for_termination() {
    use tokio::signal::unix::{SignalKind, signal};
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
}
