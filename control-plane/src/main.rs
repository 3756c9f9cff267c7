use std::time::Duration;

use clap::Parser;
use kanava_control_plane::Config;

/// How long open streams and connections get, after SIGTERM, before the
/// process exits with them still open: ztunnels then subscribe to another
/// replica. Discovery streams never end by themselves, so without a bound
/// every deletion of the pod waited for its whole grace and a SIGKILL.
const STOP_WITHIN: Duration = Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    kanava_runtime::init(config.log_format);
    let open_files = kanava_runtime::raise_fd_limit();
    tracing::info!(?config, ?open_files, "kanava-control-plane starting");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("control-plane")
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let shutdown = kanava_runtime::shutdown_on_signal();
        let running = kanava_control_plane::run(config, shutdown.clone());
        tokio::pin!(running);
        tokio::select! {
            result = &mut running => result,
            () = shutdown.cancelled() => {
                match tokio::time::timeout(STOP_WITHIN, &mut running).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::info!(after = ?STOP_WITHIN, "stopping with discovery streams still open; their ztunnels subscribe again elsewhere");
                        Ok(())
                    }
                }
            }
        }
    });
    // Tasks still running (streams, watches) are not waited for.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result?;
    tracing::info!("kanava-control-plane stopped");
    Ok(())
}
