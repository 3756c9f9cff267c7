use clap::Parser;
use kanava_ztunnel::Config;

fn main() -> anyhow::Result<()> {
    keep_buffers_mapped();
    let config = Config::parse();
    kanava_runtime::init(config.log_format);
    let open_files = kanava_runtime::raise_fd_limit();
    tracing::info!(?config, ?open_files, "ztunnel starting");

    // The control path (discovery, certificates, admin, pods coming and
    // going) runs here, on the main thread; connections run on the data
    // path's own workers (`--worker-threads`, see `workers`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Capture rules stay in the pods on shutdown, so they fail closed.
        let signalled = kanava_runtime::shutdown_on_signal();
        kanava_ztunnel::run(config, signalled).await
    })?;
    Ok(())
}

/// Keeps glibc's malloc from handing the memory of freed buffers back to
/// the kernel at once. A bulk transfer frees and takes buffers of hundreds
/// of KiB at a high rate; with glibc's defaults those above 128 KiB were
/// mapped and unmapped each time, and the heap was trimmed after each burst,
/// so their pages were faulted in again and again: a sixth of the ztunnel's
/// CPU (benches/RESULTS.md). Buffers up to 1 MiB now come from the heap,
/// and up to 8 MiB of free heap is kept.
fn keep_buffers_mapped() {
    const MMAP_THRESHOLD: libc::c_int = 1024 * 1024;
    const TRIM_THRESHOLD: libc::c_int = 8 * 1024 * 1024;
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
