//! Building the lab's network with `ip`: namespaces, the fabric bridge, the
//! links from nodes to the fabric, and routes between pod subnets. Every
//! command names one of the lab's own namespaces (`ip -n`); nothing runs in
//! the host's namespace except creating and deleting named namespaces.

use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::Error;
use crate::family::{IpFamilies, IpFamily};
use crate::layout::{self, Layout};

/// Runs a command and returns its standard output, or an error carrying its
/// standard error.
pub fn run(command: &mut Command) -> Result<String, Error> {
    let description = describe(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing(format!(
                "{} is not installed (run scripts/setup.sh)",
                command.get_program().to_string_lossy()
            )),
            _ => Error::Io {
                context: description.clone(),
                source: e,
            },
        })?;
    if !output.status.success() {
        return Err(Error::Command {
            command: description,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn ip(args: &[&str]) -> Result<String, Error> {
    run(Command::new("ip").args(args))
}

/// `ip -n <netns> ...`
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String, Error> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

pub fn add_netns(name: &str) -> Result<(), Error> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

pub fn delete_netns(name: &str) -> Result<(), Error> {
    ip(&["netns", "delete", name]).map(|_| ())
}

/// Every named network namespace on the host.
pub fn list_netns() -> Result<Vec<String>, Error> {
    let output = ip(&["netns", "list"])?;
    Ok(output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Processes whose network namespace is `name`.
pub fn netns_pids(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The fabric: a namespace with a bridge standing for the underlay network,
/// with an address of every family of the lab.
pub fn create_fabric(layout: &Layout, families: &IpFamilies) -> Result<(), Error> {
    let fabric = layout.fabric_netns();
    add_netns(&fabric)?;
    ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
    for family in families.iter() {
        let address = format!(
            "{}/{}",
            layout::fabric_ip(family),
            layout::underlay_prefix(family)
        );
        add_address(&fabric, family, &address, "br0")?;
    }
    ip_in(&fabric, &["link", "set", "br0", "up"])?;
    Ok(())
}

/// Adds an address to a device. IPv6 addresses skip duplicate address
/// detection: the lab hands out every address itself, and a tentative
/// address would refuse binds and connections for a second or two.
fn add_address(netns: &str, family: IpFamily, address: &str, device: &str) -> Result<(), Error> {
    let mut args = vec![family.ip_flag(), "addr", "add", address, "dev", device];
    if family == IpFamily::IPv6 {
        args.push("nodad");
    }
    ip_in(netns, &args).map(|_| ())
}

/// Sets a sysctl inside a lab namespace.
fn sysctl_in(netns: &str, setting: &str) -> Result<(), Error> {
    run(Command::new("ip").args(["netns", "exec", netns, "sysctl", "-q", "-w", setting]))
        .map(|_| ())
}

/// A node: a namespace linked to the fabric bridge, forwarding between its
/// pods and the underlay. Returns its underlay addresses, the primary first.
pub fn create_node(
    layout: &Layout,
    families: &IpFamilies,
    node: &str,
    index: usize,
) -> Result<Vec<IpAddr>, Error> {
    let fabric = layout.fabric_netns();
    let netns = layout.node_netns(node);
    add_netns(&netns)?;
    let fabric_side = format!("n{index}");
    ip_in(
        &fabric,
        &[
            "link",
            "add",
            &fabric_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ],
    )?;
    ip_in(
        &fabric,
        &["link", "set", &fabric_side, "master", "br0", "up"],
    )?;
    let mut ips = Vec::new();
    for family in families.iter() {
        let ip = layout::node_ip(family, index);
        let address = format!("{ip}/{}", layout::underlay_prefix(family));
        add_address(&netns, family, &address, "eth0")?;
        ips.push(ip);
    }
    ip_in(&netns, &["link", "set", "eth0", "up"])?;
    sysctl_in(&netns, "net.ipv4.ip_forward=1")?;
    if families.contains(IpFamily::IPv6) {
        sysctl_in(&netns, "net.ipv6.conf.all.forwarding=1")?;
    }
    Ok(ips)
}

/// Routes from every node to every other node's pod subnets, in every
/// family of the lab.
pub fn route_between_nodes(
    layout: &Layout,
    families: &IpFamilies,
    nodes: &[String],
) -> Result<(), Error> {
    for (from, node) in nodes.iter().enumerate() {
        for to in (0..nodes.len()).filter(|&to| to != from) {
            for family in families.iter() {
                let destination = layout::cidr(layout::pod_subnet(family, to));
                let via = layout::node_ip(family, to).to_string();
                ip_in(
                    &layout.node_netns(node),
                    &[family.ip_flag(), "route", "add", &destination, "via", &via],
                )?;
            }
        }
    }
    Ok(())
}
