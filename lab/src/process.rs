//! The lab's processes: the mesh's components and the pods' commands, each
//! started inside its network namespace, in a session of its own (so a
//! Ctrl-C at the terminal after `lab up` returned does not reach them), with
//! output appended to a log file.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, kill_process_group};

use crate::Error;

/// Exit statuses of processes this process started and reaped.
fn exits() -> &'static Mutex<HashMap<u32, ExitStatus>> {
    static EXITS: OnceLock<Mutex<HashMap<u32, ExitStatus>>> = OnceLock::new();
    EXITS.get_or_init(Default::default)
}

/// Starts `argv` inside `netns` and returns its pid.
///
/// A thread waits for the child, so it never lingers as a zombie while this
/// process lives, and records its exit status for [`exit_status`].
pub fn spawn_in(
    netns: &str,
    argv: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<u32, Error> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| Error::Spec("empty command".into()))?;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(Error::io(format!("open {}", log.display())))?;
    let err = out.try_clone().map_err(Error::io("duplicate log file"))?;
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", netns])
        .arg(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    new_session(&mut command);
    let mut child = command
        .spawn()
        .map_err(Error::io(format!("start {program} in {netns}")))?;
    let pid = child.id();
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            exits()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(pid, status);
        }
    });
    Ok(pid)
}

fn new_session(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec and only calls setsid,
    // which is async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// How a process this process started has exited, if it has.
pub fn exit_status(pid: u32) -> Option<ExitStatus> {
    exits()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&pid)
        .copied()
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends SIGTERM to one process alone (a supervisor passes it on to its
/// child).
pub fn signal_term(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::TERM);
    }
}

/// Sends SIGTERM to each process (and its process group), waits up to
/// `grace` for all to exit, then sends SIGKILL to whatever remains.
pub fn terminate(pids: &[u32], grace: Duration) {
    let signal_all = |signal: Signal| {
        for &pid in pids {
            if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = kill_process_group(pid, signal);
                let _ = kill_process(pid, signal);
            }
        }
    };
    signal_all(Signal::TERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|&pid| alive(pid)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if pids.iter().any(|&pid| alive(pid)) {
        signal_all(Signal::KILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && pids.iter().any(|&pid| alive(pid)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Shared flag a caller sets to interrupt a long operation.
pub type Cancel = Arc<std::sync::atomic::AtomicBool>;
