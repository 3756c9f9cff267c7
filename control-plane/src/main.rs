use std::time::Duration;

use clap::Parser;
use kanava_control_plane::Config;

/// How long open streams and connections get, after SIGTERM, before the
/// process exits with them still open: ztunnels then subscribe to another
/// replica. Discovery streams never end by themselves, so without a bound
/// every deletion of the pod waited for its whole grace and a SIGKILL.
const STOP_WITHIN: Duration = Duration::from_secs(1);

/// jemalloc, not glibc's malloc. The control plane holds a large cluster in
/// millions of small allocations, and when a thousand ztunnels subscribe at
/// once it briefly holds buffers for every stream. glibc kept what those
/// freed as resident memory for good (756 MiB at 100,000 pods and 1,000
/// streams, benches/RESULTS.md); jemalloc gives free pages back to the
/// kernel within a second, from a thread of its own, and spends less CPU on
/// the cluster's churn.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the `_RJEM_MALLOC_CONF`
/// environment variable can still change them): free pages go back to the
/// kernel at once, and a background thread does what purging is left; by
/// default they wait ten seconds, and only while the process allocates.
/// At 100,000 pods and 1,000 streams, purging at once held 479 MiB against
/// 507 after a second (runs one after the other), at no more CPU.
const ALLOCATOR_OPTIONS: &std::ffi::CStr =
    c"background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0";

// jemalloc reads its compiled-in options from this C string pointer (a weak
// symbol of its own, which this definition replaces).
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static ALLOCATOR_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: the pointer is to the first byte of a 'static C string.
    Some(unsafe { &*ALLOCATOR_OPTIONS.as_ptr() });

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
