use clap::Parser;
use kanava_ztunnel::Config;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    kanava_runtime::init(config.log_format);
    let open_files = kanava_runtime::raise_fd_limit();
    tracing::info!(?config, ?open_files, "ztunnel starting");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.max(1))
        .thread_name("ztunnel-worker")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Capture rules stay in the pods on shutdown, so they fail closed.
        let signalled = kanava_runtime::shutdown_on_signal();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let grace = config.termination_grace;
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                signalled.cancelled().await;
                if !grace.is_zero() {
                    tracing::info!(?grace, "terminating: serving on for the grace period");
                    tokio::time::sleep(grace).await;
                }
                shutdown.cancel();
            }
        });
        kanava_ztunnel::run(config, shutdown).await
    })?;
    Ok(())
}
