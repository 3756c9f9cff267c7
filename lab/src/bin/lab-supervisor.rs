//! `lab-supervisor`: keeps one of the mesh's processes running in a lab,
//! as the kubelet keeps a DaemonSet's or a Deployment's pod running.
//!
//! ```text
//! lab-supervisor --status FILE [--container-capabilities CAP,CAP...] -- PROGRAM [ARGS...]
//! ```
//!
//! With `--container-capabilities` the program runs as the chart runs it in
//! its container (`kanava_lab::container`): pid 1 of a pid namespace of its
//! own, in a mount namespace of its own with `/proc/sys` read-only, with
//! only those capabilities. The status file names its pid as the host sees
//! it.
//!
//! Starts the program, and starts it again whenever it exits, after a
//! back-off that doubles from 250 ms up to 8 s and starts over once the
//! program has run for a minute. After every start it writes FILE (JSON:
//! `pid`, `restarts`, `lastExit`), which `lab status` shows. SIGTERM or
//! SIGINT stops the program (SIGTERM, then SIGKILL after 30 s) and the
//! supervisor with it; a signal that arrives while the program is being
//! restarted stops the restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kanava_lab::container;
use rustix::thread::CapabilitySet;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// A program that ran this long is healthy again: its next back-off is
/// the first one.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Long enough for a ztunnel to hand its connections to a successor (and
/// to drain those that cannot move, within its own termination grace).
const STOP_GRACE: Duration = Duration::from_secs(30);

const USAGE: &str =
    "usage: lab-supervisor --status FILE [--container-capabilities CAP,...] -- PROGRAM [ARGS...]";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(flag), Some(status)) = (args.next(), args.next()) else {
        bail!(USAGE);
    };
    if flag != "--status" {
        bail!(USAGE);
    }
    let container = match args.next().as_deref() {
        Some("--") => None,
        Some(container::FLAG) => {
            let names = args.next().unwrap_or_default();
            let names: Vec<&str> = names.split(',').filter(|n| !n.is_empty()).collect();
            if args.next().as_deref() != Some("--") {
                bail!(USAGE);
            }
            Some(container::capability_set(&names).map_err(anyhow::Error::msg)?)
        }
        _ => bail!(USAGE),
    };
    let argv: Vec<String> = args.collect();
    if argv.is_empty() {
        bail!("no program to supervise");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(supervise(PathBuf::from(status), argv, container))
}

/// Starts the program, in a container of its own when `container` names
/// its capabilities.
fn start(argv: &[String], container: Option<CapabilitySet>) -> anyhow::Result<Child> {
    let Some(capabilities) = container else {
        return Command::new(&argv[0])
            .args(&argv[1..])
            .spawn()
            .with_context(|| format!("start {}", argv[0]));
    };
    // Namespaces are per thread: a thread of its own unshares them, and its
    // child is pid 1 of the new pid namespace with a copy of the mounts.
    let runtime = tokio::runtime::Handle::current();
    let argv = argv.to_vec();
    std::thread::spawn(move || -> anyhow::Result<Child> {
        let _runtime = runtime.enter();
        // SAFETY: this thread exists only to spawn the child and ends
        // right after; nothing else runs in the namespaces it unshares.
        #[allow(unsafe_code)]
        unsafe {
            rustix::thread::unshare_unsafe(
                rustix::thread::UnshareFlags::NEWPID | rustix::thread::UnshareFlags::NEWNS,
            )
        }
        .context("unshare the pid and mount namespaces (needs root)")?;
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        // SAFETY: `enter` makes only raw system calls on constant paths
        // (no allocation, no lock), which is what may run between fork and
        // exec.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || container::enter(capabilities));
        }
        command
            .spawn()
            .with_context(|| format!("start {} in its container", argv[0]))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread starting {} panicked", "the program"))?
}

async fn supervise(
    status: PathBuf,
    argv: Vec<String>,
    container: Option<CapabilitySet>,
) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut restarts = 0u32;
    let mut backoff = FIRST_BACKOFF;
    let mut last_exit = String::new();
    loop {
        let mut child = start(&argv, container)?;
        let started = Instant::now();
        write_status(&status, child.id(), restarts, &last_exit)?;
        let exit = tokio::select! {
            exit = child.wait() => exit?,
            _ = terminate.recv() => return stop(child).await,
            _ = interrupt.recv() => return stop(child).await,
        };
        last_exit = exit.to_string();
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = FIRST_BACKOFF;
        }
        eprintln!(
            "lab-supervisor: {} exited ({exit}); starting it again in {backoff:?}",
            argv[0]
        );
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        restarts += 1;
    }
}

async fn stop(mut child: Child) -> anyhow::Result<()> {
    if let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
    }
    Ok(())
}

fn write_status(
    path: &Path,
    pid: Option<u32>,
    restarts: u32,
    last_exit: &str,
) -> anyhow::Result<()> {
    let text =
        serde_json::json!({"pid": pid, "restarts": restarts, "lastExit": last_exit}).to_string();
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("write {}", path.display()))
}
