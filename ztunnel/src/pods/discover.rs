//! Finding the network namespace of a running pod that has no record: one
//! that started before Kanava was installed on its node, so no CNI plugin
//! of ours saw it. Its namespace is among the node's (`/var/run/netns`,
//! where containerd and CRI-O keep them): the one that holds every address
//! discovery gives the pod.
//!
//! "Holds" is tested by binding a socket to each address inside the
//! namespace, which the kernel allows only for local addresses: no process
//! is started and nothing is changed. A namespace that claims another pod's
//! address (a pod with `NET_ADMIN` can add any address to its interface) makes
//! two candidates, and then none is chosen: such a pod can delay another's
//! capture, never take its identity.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use kanava_netns::NetNs;

/// What a search of the node's namespaces found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<T> {
    /// Exactly one namespace holds every address.
    One(T),
    None,
    /// More than one does: nothing is chosen.
    Ambiguous(Vec<PathBuf>),
}

/// Decides from the namespaces that hold every address.
pub fn decide<T>(mut matches: Vec<(PathBuf, T)>) -> Found<(PathBuf, T)> {
    match matches.len() {
        0 => Found::None,
        1 => matches.pop().map_or(Found::None, Found::One),
        _ => Found::Ambiguous(matches.into_iter().map(|(path, _)| path).collect()),
    }
}

/// Searches `dir` for the namespace holding every one of `ips`. Namespaces
/// that cannot be opened are skipped, and so is the caller's own.
pub fn find_netns(dir: &Path, ips: &[IpAddr]) -> Found<(PathBuf, NetNs)> {
    if ips.is_empty() {
        return Found::None;
    }
    let own = NetNs::current().and_then(|ns| ns.inode()).ok();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Found::None;
    };
    let mut matches = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        let Ok(netns) = NetNs::open(&path) else {
            continue;
        };
        let inode = netns.inode().ok();
        if inode.is_none() || inode == own {
            continue;
        }
        let holds = netns
            .run(|| {
                ips.iter()
                    .all(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)).is_ok())
            })
            .unwrap_or(false);
        if holds {
            matches.push((path, netns));
        }
    }
    decide(matches)
}

pub use kanava_netns::mount::{NetnsMount, mount_propagation, netns_mount};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_holder_is_chosen() {
        assert_eq!(decide::<()>(vec![]), Found::None);
        assert_eq!(
            decide(vec![(PathBuf::from("/var/run/netns/cni-1"), 1)]),
            Found::One((PathBuf::from("/var/run/netns/cni-1"), 1))
        );
        assert_eq!(
            decide(vec![
                (PathBuf::from("/var/run/netns/cni-1"), 1),
                (PathBuf::from("/var/run/netns/cni-2"), 2)
            ]),
            Found::Ambiguous(vec![
                PathBuf::from("/var/run/netns/cni-1"),
                PathBuf::from("/var/run/netns/cni-2")
            ])
        );
    }

    #[test]
    fn a_missing_directory_or_no_address_finds_nothing() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
        assert!(matches!(
            find_netns(Path::new("/nonexistent"), &[ip]),
            Found::None
        ));
        assert!(matches!(
            find_netns(Path::new("/proc/self/ns"), &[]),
            Found::None
        ));
    }

    #[test]
    fn the_netns_mount_is_told_shared_or_slave_from_private() {
        let dir = Path::new("/var/run/netns");
        let line = |optional: &str| {
            format!(
                "812 790 0:25 /netns /var/run/netns rw,nosuid,nodev {optional}- tmpfs tmpfs rw\n"
            )
        };
        let info = |optional: &str| {
            format!(
                "790 700 0:50 / / ro shared:1 - overlay overlay rw\n{}",
                line(optional)
            )
        };
        assert_eq!(
            mount_propagation(&info("master:12 "), dir),
            NetnsMount::Propagating
        );
        assert_eq!(
            mount_propagation(&info("shared:3 "), dir),
            NetnsMount::Propagating
        );
        assert_eq!(mount_propagation(&info(""), dir), NetnsMount::Private);
        assert_eq!(
            mount_propagation(&info(""), Path::new("/run/other")),
            NetnsMount::NotAMountPoint
        );
        // The last mount on the point is the one seen.
        let stacked = format!("{}{}", info("master:12 "), line(""));
        assert_eq!(mount_propagation(&stacked, dir), NetnsMount::Private);
    }
}
