//! Building the lab's network with `ip`: namespaces, the fabric bridge, the
//! links from nodes to the fabric, and routes between pod subnets. Every
//! command names one of the lab's own namespaces (`ip -n`); nothing runs in
//! the host's namespace except creating and deleting named namespaces.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::Error;
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

/// The fabric: a namespace with a bridge standing for the underlay network.
pub fn create_fabric(layout: &Layout) -> Result<(), Error> {
    let fabric = layout.fabric_netns();
    add_netns(&fabric)?;
    ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
    let address = format!("{}/{}", layout::FABRIC_IP, layout::UNDERLAY_PREFIX);
    ip_in(&fabric, &["addr", "add", &address, "dev", "br0"])?;
    ip_in(&fabric, &["link", "set", "br0", "up"])?;
    Ok(())
}

/// A node: a namespace linked to the fabric bridge, forwarding between its
/// pods and the underlay.
pub fn create_node(layout: &Layout, node: &str, index: usize) -> Result<Ipv4Addr, Error> {
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
    let ip = layout::node_ip(index);
    let address = format!("{ip}/{}", layout::UNDERLAY_PREFIX);
    ip_in(&netns, &["addr", "add", &address, "dev", "eth0"])?;
    ip_in(&netns, &["link", "set", "eth0", "up"])?;
    run(Command::new("ip").args([
        "netns",
        "exec",
        &netns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
    ]))?;
    Ok(ip)
}

/// Routes from every node to every other node's pod subnet.
pub fn route_between_nodes(layout: &Layout, nodes: &[String]) -> Result<(), Error> {
    for (from, node) in nodes.iter().enumerate() {
        for to in (0..nodes.len()).filter(|&to| to != from) {
            let (subnet, prefix) = layout::pod_subnet(to);
            let destination = format!("{subnet}/{prefix}");
            let via = layout::node_ip(to).to_string();
            ip_in(
                &layout.node_netns(node),
                &["route", "add", &destination, "via", &via],
            )?;
        }
    }
    Ok(())
}
