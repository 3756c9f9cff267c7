//! The context shared by `up`, `apply`, `delete` and the pod operations:
//! where the binaries and CNI plugins are, how long to wait, who to tell,
//! and whether to stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::process::Cancel;
use crate::{Error, cni};

/// Receives a line per step of `up`.
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// What every operation on a running lab (`up`, `apply`, `delete`, pod
/// changes) needs from its surroundings.
#[derive(Clone)]
pub struct Context {
    /// Where `labapp` and the mesh's binaries are.
    pub bins: PathBuf,
    /// Where the CNI plugins are.
    pub plugins: PathBuf,
    /// Bound on each wait (a component starting, a pod becoming ready).
    pub step_timeout: Duration,
    /// Bound on waiting for the ztunnels to see a change.
    pub propagation_timeout: Duration,
    pub cancel: Option<Cancel>,
    pub progress: Option<Progress>,
}

impl Context {
    /// The defaults, finding binaries and plugins on this machine.
    pub fn discover(bins: Option<&Path>) -> Result<Self, Error> {
        Ok(Context {
            bins: bin_dir(bins)?,
            plugins: cni::plugin_dir()?,
            step_timeout: Duration::from_secs(30),
            propagation_timeout: Duration::from_secs(10),
            cancel: None,
            progress: None,
        })
    }

    pub fn say(&self, message: &str) {
        if let Some(progress) = &self.progress {
            progress(message);
        }
    }

    pub fn check_cancel(&self) -> Result<(), Error> {
        match &self.cancel {
            Some(cancel) if cancel.load(Ordering::SeqCst) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }

    /// Polls `check` until it is true, `what` fails, or the step times out.
    pub fn wait_until(
        &self,
        what: &str,
        mut check: impl FnMut() -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + self.step_timeout;
        loop {
            self.check_cancel()?;
            if check()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    after: self.step_timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

const BINARIES: [&str; 5] = [
    "ztunnel",
    "kanava-control-plane",
    "kanava-cni",
    "labapp",
    "lab-supervisor",
];

/// Where Kanava's binaries are: `KANAVA_BIN_DIR`, or beside the running
/// executable (its parent when that is a Cargo test binary in `deps/`).
pub fn bin_dir(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let candidate = match (explicit, std::env::var_os("KANAVA_BIN_DIR")) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(dir)) => PathBuf::from(dir),
        (None, None) => {
            let exe =
                std::env::current_exe().map_err(Error::io("locate the running executable"))?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.ends_with("deps") {
                dir.parent().map(Path::to_path_buf).unwrap_or(dir)
            } else {
                dir
            }
        }
    };
    match BINARIES.iter().find(|b| !candidate.join(b).is_file()) {
        None => Ok(candidate),
        Some(missing) => Err(Error::Missing(format!(
            "{missing} not found in {}; build everything with `cargo build --workspace` (or set KANAVA_BIN_DIR)",
            candidate.display()
        ))),
    }
}

/// `PATH` for processes in the lab: Kanava's binaries first.
pub fn path_with_bin_dir() -> String {
    let system = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    match bin_dir(None) {
        Ok(dir) => format!("{}:{system}", dir.display()),
        Err(_) => system,
    }
}
