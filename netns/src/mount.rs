//! How a directory is mounted into this process: whether mounts made on
//! the host later (the runtime's network namespaces) appear in it. The
//! ztunnel checks its netns directory at start; `kanava check` checks the
//! same on every node.

use std::path::Path;

/// How the node's namespace directory is mounted into this process.
#[derive(Debug, PartialEq, Eq)]
pub enum NetnsMount {
    /// Not a mount of its own (the lab: the ztunnel shares the host's view).
    NotAMountPoint,
    /// A shared or slave mount: namespaces the runtime creates after this
    /// process started appear in it.
    Propagating,
    /// A private mount: only the namespaces that existed when it was made
    /// are visible; later pods are neither restored nor found.
    Private,
}

/// Reads how `dir` is mounted from `/proc/self/mountinfo`.
pub fn netns_mount(dir: &Path) -> NetnsMount {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mount_propagation(&mountinfo, &dir)
}

/// The propagation of the last mount on `dir` in a `mountinfo` text (see
/// proc(5): the fifth field is the mount point, the optional fields after
/// the sixth carry `shared:N` or `master:N`, up to a lone `-`).
pub fn mount_propagation(mountinfo: &str, dir: &Path) -> NetnsMount {
    let mut found = NetnsMount::NotAMountPoint;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(4).map(Path::new) != Some(dir) {
            continue;
        }
        let optional = fields.iter().skip(6).take_while(|field| **field != "-");
        found = if optional
            .clone()
            .any(|f| f.starts_with("shared:") || f.starts_with("master:"))
        {
            NetnsMount::Propagating
        } else {
            NetnsMount::Private
        };
    }
    found
}
