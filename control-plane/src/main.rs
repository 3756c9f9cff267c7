use clap::Parser;
use kanava_control_plane::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    kanava_runtime::init(config.log_format);
    let open_files = kanava_runtime::raise_fd_limit();
    tracing::info!(?config, ?open_files, "kanava-control-plane starting");
    let shutdown = kanava_runtime::shutdown_on_signal();
    kanava_control_plane::run(config, shutdown).await?;
    Ok(())
}
