use clap::Parser;
use kanava_control_plane::Config;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    kanava_runtime::init(config.log_format);
    let open_files = kanava_runtime::raise_fd_limit();
    tracing::info!(?config, ?open_files, "kanava-control-plane starting");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("control-plane")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = kanava_runtime::shutdown_on_signal();
        kanava_control_plane::run(config, shutdown).await
    })?;
    Ok(())
}
