//! Taking labs down: every process inside the lab's namespaces is stopped,
//! every namespace deleted, the lab's directory removed. Works from the
//! namespaces themselves (found by name prefix), so a lab that crashed
//! halfway, or whose state file is gone, is removed just as completely.

use std::time::Duration;

use crate::layout::{Layout, NETNS_PREFIX, is_inside_root};
use crate::names::check_lab_name;
use crate::{Error, network, process, state};

/// How long processes get to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

/// Removes the lab `name`.
pub fn down(name: &str) -> Result<(), Error> {
    check_lab_name(name)?;
    let layout = Layout::new(name);
    let prefix = layout.netns_prefix();
    let namespaces: Vec<String> = network::list_netns()?
        .into_iter()
        .filter(|ns| ns.starts_with(&prefix))
        .collect();
    let dir_exists = layout.dir.exists();
    if namespaces.is_empty() && !dir_exists {
        return Err(Error::NoSuchLab(name.to_string()));
    }

    // Everything running inside the lab's namespaces: pods first would be
    // nicer for their logs, but a single SIGTERM round keeps this bounded.
    let pids: Vec<u32> = namespaces
        .iter()
        .flat_map(|ns| network::netns_pids(ns))
        .filter_map(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid != std::process::id())
        .collect();
    process::terminate(&pids, GRACE);

    let mut failures = Vec::new();
    for ns in &namespaces {
        if let Err(error) = network::delete_netns(ns) {
            failures.push(error.to_string());
        }
    }
    if dir_exists
        && is_inside_root(&layout.dir)
        && let Err(error) = std::fs::remove_dir_all(&layout.dir)
    {
        failures.push(format!("remove {}: {error}", layout.dir.display()));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Spec(format!(
            "lab {name} not fully removed: {}",
            failures.join("; ")
        )))
    }
}

/// Removes every lab, including leftovers whose directory is gone. Returns
/// the names of the labs removed.
pub fn clean() -> Result<Vec<String>, Error> {
    let mut names = state::list_labs();
    for ns in network::list_netns()? {
        if let Some((lab, _)) = ns
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            && !names.iter().any(|n| n == lab)
        {
            names.push(lab.to_string());
        }
    }
    names.retain(|name| check_lab_name(name).is_ok());
    let mut failures = Vec::new();
    for name in &names {
        match down(name) {
            Ok(()) | Err(Error::NoSuchLab(_)) => {}
            Err(error) => failures.push(error.to_string()),
        }
    }
    if failures.is_empty() {
        Ok(names)
    } else {
        Err(Error::Spec(failures.join("; ")))
    }
}
