//! Pod networks made the way a container runtime makes them: by running the
//! standard CNI reference plugins (`bridge` with `host-local` IPAM) in the
//! node's namespace. Kanava's own chained plugin can later be added to the
//! configuration exactly as on a real node.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;
use crate::layout;

/// Where distributions install the reference plugins.
const PLUGIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// The directory holding the `bridge` and `host-local` plugins.
pub fn plugin_dir() -> Result<PathBuf, Error> {
    PLUGIN_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("bridge").exists() && dir.join("host-local").exists())
        .ok_or_else(|| {
            Error::Missing(format!(
                "the CNI reference plugins (bridge, host-local) are not installed in {} (Debian package containernetworking-plugins; run scripts/setup.sh)",
                PLUGIN_DIRS.join(" or ")
            ))
        })
}

/// The network configuration for pods of node `index`.
pub fn network_config(index: usize, ipam_dir: &Path) -> serde_json::Value {
    let (subnet, prefix) = layout::pod_subnet(index);
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "kanava-lab",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{
                "subnet": format!("{subnet}/{prefix}"),
                "gateway": layout::pod_gateway(index).to_string(),
            }]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": ipam_dir,
        }
    })
}

/// Runs `CNI_COMMAND=ADD` for a pod and returns the IPv4 address it got.
pub fn add(
    plugins: &Path,
    node_netns: &str,
    pod_netns: &str,
    container_id: &str,
    config: &serde_json::Value,
) -> Result<Ipv4Addr, Error> {
    let output = invoke(plugins, "ADD", node_netns, pod_netns, container_id, config)?;
    let result: serde_json::Value = serde_json::from_str(&output).map_err(|e| {
        Error::Spec(format!(
            "CNI bridge plugin returned unreadable output ({e}): {output}"
        ))
    })?;
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next())
        .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| {
            Error::Spec(format!(
                "CNI bridge plugin returned no IPv4 address: {output}"
            ))
        })
}

/// Runs `CNI_COMMAND=DEL` for a pod, releasing its address.
pub fn delete(
    plugins: &Path,
    node_netns: &str,
    pod_netns: &str,
    container_id: &str,
    config: &serde_json::Value,
) -> Result<(), Error> {
    invoke(plugins, "DEL", node_netns, pod_netns, container_id, config).map(|_| ())
}

/// Runs one plugin command inside the node's namespace (`ip netns exec`
/// also mounts the namespace's own /sys, which the plugin reads).
fn invoke(
    plugins: &Path,
    command: &str,
    node_netns: &str,
    pod_netns: &str,
    container_id: &str,
    config: &serde_json::Value,
) -> Result<String, Error> {
    let plugin = plugins.join("bridge");
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_netns])
        .arg(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", format!("/run/netns/{pod_netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugins)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io(format!("run {}", plugin.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(config.to_string().as_bytes())
            .map_err(Error::io("write CNI configuration"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(Error::io(format!("wait for {}", plugin.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(Error::Command {
            command: format!("CNI {command} for {pod_netns}"),
            status: output.status.to_string(),
            stderr: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr))
                .trim()
                .to_string(),
        });
    }
    Ok(stdout)
}
