//! The lab runs each ztunnel the way the chart's container runs it, so that
//! what a node would refuse the lab refuses too:
//!
//! - in a pid namespace of its own, as pid 1 (the CNI plugin, run from the
//!   host's, is then a peer whose pid the ztunnel cannot see; two ztunnels
//!   of one node have the same pid);
//! - in a mount namespace of its own, every mount a slave of the host's
//!   (`mountPropagation: HostToContainer`: pods' network namespaces made
//!   after it started appear), with a `/proc` of its own and `/proc/sys`
//!   read-only, as a container runtime mounts them;
//! - with only the capabilities the chart grants (bounding, permitted and
//!   effective sets; none inheritable) and no way to gain more
//!   (`allowPrivilegeEscalation: false` is `no_new_privs`).
//!
//! [`ZTUNNEL`] is what the chart says; a chart test renders the chart and
//! checks the two agree, so they cannot drift. What the lab does not copy:
//! the read-only root file system, the seccomp profile, and cgroup limits.

use rustix::thread::CapabilitySet;

/// How one container of the chart runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContainerSpec {
    /// `securityContext.capabilities.add` (everything else is dropped).
    pub capabilities: &'static [&'static str],
    /// `securityContext.allowPrivilegeEscalation`.
    pub allow_privilege_escalation: bool,
    /// The pod's `hostPID`.
    pub host_pid: bool,
    /// The `mountPropagation` of the node's network-namespace directory.
    pub netns_mount_propagation: &'static str,
}

/// The ztunnel's container, as `deploy/charts/kanava/templates/ztunnel.yaml`
/// renders it.
pub const ZTUNNEL: ContainerSpec = ContainerSpec {
    capabilities: &["NET_ADMIN", "SYS_ADMIN", "NET_RAW"],
    allow_privilege_escalation: false,
    host_pid: false,
    netns_mount_propagation: "HostToContainer",
};

/// The flag `lab-supervisor` takes to run its program in such a container,
/// followed by the capabilities (comma-separated).
pub const FLAG: &str = "--container-capabilities";

/// The capability set of `names` (`NET_ADMIN`, as Kubernetes spells them).
pub fn capability_set(names: &[&str]) -> Result<CapabilitySet, String> {
    names.iter().try_fold(CapabilitySet::empty(), |set, name| {
        CapabilitySet::from_name(name)
            .map(|flag| set | flag)
            .ok_or_else(|| format!("unknown capability {name:?}"))
    })
}

/// Run in the child between fork and exec (`pre_exec`), after the parent
/// thread unshared the pid and mount namespaces: the child is pid 1 of the
/// new pid namespace and has a copy of the mount namespace. Only raw system
/// calls on constant paths: nothing that allocates or takes a lock.
pub fn enter(capabilities: CapabilitySet) -> std::io::Result<()> {
    use rustix::mount::{
        MountFlags, MountPropagationFlags, mount, mount_bind, mount_change, mount_remount,
    };
    mount_change(
        c"/",
        MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
    )?;
    let proc_flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount(c"proc", c"/proc", c"proc", proc_flags, None)?;
    mount_bind(c"/proc/sys", c"/proc/sys")?;
    mount_remount(
        c"/proc/sys",
        MountFlags::BIND | MountFlags::RDONLY | proc_flags,
        c"",
    )?;
    for bit in 0..64u32 {
        let capability = CapabilitySet::from_bits_retain(1 << bit);
        if capabilities.contains(capability) {
            continue;
        }
        // EINVAL: past the last capability this kernel knows.
        match rustix::thread::remove_capability_from_bounding_set(capability) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(error) => return Err(error.into()),
        }
    }
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: capabilities,
            permitted: capabilities,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    rustix::thread::set_no_new_privs(true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_named_as_kubernetes_names_them() {
        assert_eq!(
            capability_set(ZTUNNEL.capabilities),
            Ok(CapabilitySet::NET_ADMIN | CapabilitySet::SYS_ADMIN | CapabilitySet::NET_RAW)
        );
        assert!(capability_set(&["NET_ADMIN", "CAP_NET_ADMIN"]).is_err());
    }
}
