//! `kanava lab upgrade`: replaces a node's ztunnel the way a DaemonSet's
//! rolling update does (`maxSurge: 1`, `maxUnavailable: 0`): the new one
//! starts beside the old, and only once it is ready is the old one told to
//! stop, which hands its listeners and connections over to it. With
//! [`UpgradeOptions::stop_first`] it is replaced as a deleted or evicted
//! pod is: the old one is told to stop first and waits for its replacement.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kanava_netns::seqpacket::Conn;
use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::state::{Component, LabState};
use crate::up::{spawn_supervised, upgrade_socket, ztunnel_command};
use crate::{Error, process, state, stop};

/// What to upgrade, and to what.
#[derive(Clone, Debug, Default)]
pub struct UpgradeOptions {
    /// The new ztunnel executable; the lab's own build by default.
    pub ztunnel_binary: Option<PathBuf>,
    /// The nodes to upgrade (all when empty), one after another.
    pub nodes: Vec<String>,
    /// Start every new ztunnel first, then stop every old one at once.
    pub all_at_once: bool,
    /// Stop the old ztunnel first and start the new one this long after, as
    /// when a ztunnel pod is deleted or evicted and its DaemonSet makes a
    /// replacement: the old one waits for it and hands over.
    pub stop_first: Option<Duration>,
}

/// How one node's upgrade went.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeUpgrade {
    pub node: String,
    pub old_pid: Option<u32>,
    pub new_pid: Option<u32>,
    /// Pod listeners the old ztunnel closed beside the new one's.
    pub listeners: u64,
    /// Connections that changed hands.
    pub moved: u64,
    /// Connections that could not move and were drained by the old one.
    pub drained: u64,
    /// From the old ztunnel's SIGTERM to its last connection handed over.
    pub hand_over_ms: u64,
    /// From the new ztunnel's start to the old one's exit.
    pub total_ms: u64,
}

/// How the ztunnel's hand-over summary reads on its upgrade socket.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    listeners: u64,
    moved: u64,
    drained: u64,
    elapsed_ms: u64,
}

/// Who answers on a node's upgrade socket: (pid, ready, last hand-over).
/// The two messages are written here by hand, not taken from the ztunnel's
/// `upgrade::protocol`: the lab runs the ztunnel as a process and links
/// none of its code (ARCHITECTURE, "The crates").
fn ask(socket: &std::path::Path) -> Option<(u32, bool, Option<Summary>)> {
    let conn = Conn::connect(socket).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let hello = serde_json::json!({"kind": "hello", "pid": std::process::id()}).to_string();
    conn.send(hello.as_bytes(), &[]).ok()?;
    let (answer, _) = conn.recv().ok()?;
    let answer: serde_json::Value = serde_json::from_slice(&answer).ok()?;
    if answer.get("kind")?.as_str()? != "status" {
        return None;
    }
    let pid = u32::try_from(answer.get("pid")?.as_u64()?).ok()?;
    let ready = answer.get("ready")?.as_bool()?;
    let last = answer
        .get("lastHandOver")
        .and_then(|summary| serde_json::from_value(summary.clone()).ok());
    Some((pid, ready, last))
}

/// The file at a socket's path (device, inode), to tell whose it is.
fn socket_file(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Upgrades the ztunnels of the lab `name`.
pub fn upgrade(
    name: &str,
    options: &UpgradeOptions,
    env: &Context,
) -> Result<Vec<NodeUpgrade>, Error> {
    let _lock = state::lock(&state::LabState::load(name)?.layout())?;
    let mut state = LabState::load(name)?;
    for node in &options.nodes {
        if state.node(node).is_none() {
            return Err(Error::Spec(format!("no node {node} in lab {name}")));
        }
    }
    let binary = options
        .ztunnel_binary
        .clone()
        .or_else(|| state.ztunnel_binary.clone())
        .unwrap_or_else(|| env.bins.join("ztunnel"));
    if !binary.exists() {
        return Err(Error::Spec(format!(
            "no ztunnel executable at {}",
            binary.display()
        )));
    }
    let chosen: Vec<usize> = (0..state.nodes.len())
        .filter(|&i| options.nodes.is_empty() || options.nodes.contains(&state.nodes[i].name))
        .collect();
    let mut done = Vec::new();
    let batches: Vec<Vec<usize>> = if options.all_at_once {
        vec![chosen]
    } else {
        chosen.into_iter().map(|i| vec![i]).collect()
    };
    for batch in batches {
        if let Some(delay) = options.stop_first {
            for &index in &batch {
                env.say(&format!(
                    "stopping the ztunnel on {} before its replacement starts",
                    state.nodes[index].name
                ));
                signal_old(&state.nodes[index].ztunnel);
            }
            std::thread::sleep(delay);
        }
        let mut started = Vec::new();
        for &index in &batch {
            env.say(&format!(
                "starting the new ztunnel on {} beside the old one",
                state.nodes[index].name
            ));
            match start_beside(&mut state, index, &binary, env) {
                Ok(beside) => started.push((index, beside)),
                Err(error) => {
                    // Leave the batch as it was: the old ones serve on.
                    for (index, (old, _)) in started {
                        stop(&state.nodes[index].ztunnel);
                        state.nodes[index].ztunnel = old;
                    }
                    return Err(error);
                }
            }
        }
        // From here on the new ones are the lab's: `lab down` stops them
        // even if an old one does not go away.
        state.save()?;
        let mut handed = Vec::new();
        for (index, (old, began)) in started {
            if options.stop_first.is_none() {
                env.say(&format!(
                    "stopping the old ztunnel on {}: it hands over",
                    state.nodes[index].name
                ));
                signal_old(&old);
            }
            handed.push((index, old, began));
        }
        for (index, old, began) in handed {
            let result = finish(&state, index, &old, began, env)?;
            env.say(&format!(
                "{}: {} connections moved, {} drained, {} listeners, hand-over {} ms",
                result.node, result.moved, result.drained, result.listeners, result.hand_over_ms
            ));
            done.push(result);
        }
        if options.ztunnel_binary.is_some() {
            state.ztunnel_binary = options.ztunnel_binary.clone();
        }
        state.save()?;
    }
    Ok(done)
}

/// Starts the new ztunnel of `state.nodes[index]` under a supervisor of its
/// own and waits until it is ready to take over. The node's component is
/// the new one from then on; the old one is returned.
fn start_beside(
    state: &mut LabState,
    index: usize,
    binary: &std::path::Path,
    env: &Context,
) -> Result<(Component, Instant), Error> {
    let began = Instant::now();
    let (argv, vars) = ztunnel_command(state, index, binary);
    let layout = state.layout();
    let node = &mut state.nodes[index];
    let old = node.ztunnel.clone();
    let mut new = old.clone();
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let status = layout
        .log_dir()
        .join(format!("ztunnel-{}.{generation}.status.json", node.name));
    let netns = node.netns.clone();
    let socket = upgrade_socket(node);
    // The new one is ready once it has bound the socket in the old one's
    // place: a new file there. Not told by pid: each ztunnel may be pid 1
    // of a namespace of its own, as in its container.
    let old_socket = socket_file(&socket);
    spawn_supervised(
        env,
        &mut new,
        &netns,
        &argv,
        &vars,
        status,
        Some(&crate::container::ZTUNNEL),
    )?;
    let new_pid = new.pid;
    let waited = env.wait_until(
        &format!("the new ztunnel on {} to be ready", node.name),
        || {
            let pid = new_pid.unwrap_or_default();
            if !process::alive(pid) {
                return Err(Error::Spec(format!(
                    "the new ztunnel on {} exited; see {}",
                    node.name,
                    new.log.display()
                )));
            }
            let rebound = socket_file(&socket).is_some_and(|file| Some(file) != old_socket);
            Ok(rebound && matches!(ask(&socket), Some((_, true, _))))
        },
    );
    if let Err(error) = waited {
        // Leave the node as it was: the old one serves on.
        stop(&new);
        return Err(error);
    }
    node.ztunnel = new;
    Ok((old, began))
}

/// SIGTERM to the old ztunnel's supervisor, which passes it on.
fn signal_old(old: &Component) {
    if let Some(supervisor) = old.supervisor {
        process::signal_term(supervisor);
    }
}

/// How long the new ztunnel may take to report the old one's summary after
/// the old one exited.
const SUMMARY_WITHIN: Duration = Duration::from_secs(5);

/// Waits for the old ztunnel to be gone and reads the hand-over's summary
/// from the new one.
fn finish(
    state: &LabState,
    index: usize,
    old: &Component,
    began: Instant,
    env: &Context,
) -> Result<NodeUpgrade, Error> {
    let node = &state.nodes[index];
    let pids: Vec<u32> = old.supervisor.into_iter().chain(old.pid).collect();
    let gone = Instant::now() + Duration::from_secs(60);
    while pids.iter().any(|&pid| process::alive(pid)) {
        if Instant::now() >= gone {
            process::terminate(&pids, Duration::from_secs(1));
            return Err(Error::Timeout {
                what: format!("the old ztunnel on {} to exit", node.name),
                after: Duration::from_secs(60),
            });
        }
        env.check_cancel()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let total_ms = began.elapsed().as_millis() as u64;
    // The old one's last message (its summary) may still be on its way into
    // the new one when the old one is gone: wait a moment for that summary,
    // not any earlier one. None comes if the old one drained instead.
    // The new ztunnel has had no predecessor but the old one: any summary
    // it reports is this hand-over's.
    let socket = upgrade_socket(node);
    let reported = Instant::now() + SUMMARY_WITHIN;
    let summary = loop {
        let last = ask(&socket).and_then(|(_, _, last)| last);
        if last.is_some() || Instant::now() >= reported {
            break last.unwrap_or_default();
        }
        env.check_cancel()?;
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(NodeUpgrade {
        node: node.name.clone(),
        old_pid: old.pid,
        new_pid: node.ztunnel.pid,
        listeners: summary.listeners,
        moved: summary.moved,
        drained: summary.drained,
        hand_over_ms: summary.elapsed_ms,
        total_ms,
    })
}
