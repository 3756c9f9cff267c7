//! Pod networks made the way a container runtime makes them: the plugins of
//! a conflist run one after the other in the node's namespace, each given
//! the previous one's result — the reference `bridge` plugin (with
//! `host-local` IPAM), then Kanava's chained `kanava-cni`, which hands
//! enrolled pods to the node's ztunnel. The environment is what containerd
//! sets, `CNI_ARGS` with the Kubernetes pod's namespace, name and uid.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;
use crate::family::IpFamilies;
use crate::layout::{self, Layout};

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

/// The network configuration list of node `index`: what a node's
/// `/etc/cni/net.d/*.conflist` holds once Kanava's installer has added its
/// plugin to the primary one.
pub fn conflist(
    layout: &Layout,
    families: &IpFamilies,
    node: &str,
    index: usize,
) -> serde_json::Value {
    // One range set per family, the primary first: host-local gives the
    // pod one address from each, in this order.
    let ranges: Vec<serde_json::Value> = families
        .iter()
        .map(|family| {
            serde_json::json!([{
                "subnet": layout::cidr(layout::pod_subnet(family, index)),
                "gateway": layout::pod_gateway(family, index).to_string(),
            }])
        })
        .collect();
    let routes: Vec<serde_json::Value> = families
        .iter()
        .map(|family| serde_json::json!({"dst": family.any()}))
        .collect();
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "kanava-lab",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": layout.ipam_dir(node),
                }
            },
            {
                "type": "kanava-cni",
                "socketPath": layout.handoff_socket(index),
                "podRecordsDir": layout.pod_records_dir(node),
                "manifestDir": layout.manifest_dir(),
            }
        ]
    })
}

/// Who a call is for.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// Where the plugin binaries are, searched in order (`CNI_PATH`).
    pub plugin_path: &'a [PathBuf],
    pub node_netns: &'a str,
    /// Empty: the pod's namespace is gone (a late DEL).
    pub pod_netns: &'a str,
    pub container_id: &'a str,
    /// The Kubernetes pod: namespace, name, uid.
    pub pod: (&'a str, &'a str, &'a str),
}

/// Runs ADD through the whole list and returns the final result (which the
/// runtime caches and passes to CHECK and DEL) and the pod's addresses, one
/// per family, the primary first. If a plugin fails, the whole chain is
/// undone (DEL, every plugin, no result), as a runtime does.
pub fn add(
    call: &Call<'_>,
    conflist: &serde_json::Value,
    families: &IpFamilies,
) -> Result<(serde_json::Value, Vec<IpAddr>), Error> {
    let plugins = plugins(conflist);
    let mut result: Option<serde_json::Value> = None;
    for plugin in &plugins {
        let config = plugin_config(conflist, plugin, result.as_ref());
        match invoke(call, "ADD", &config) {
            Ok(output) => {
                result = Some(serde_json::from_str(&output).map_err(|e| {
                    Error::Spec(format!(
                        "CNI plugin {} returned unreadable output ({e}): {output}",
                        plugin_type(plugin)
                    ))
                })?);
            }
            Err(error) => {
                // A runtime tears down the whole chain of a sandbox whose ADD
                // failed, the failed plugin included, and without a result.
                let _ = delete(call, conflist, None);
                return Err(error);
            }
        }
    }
    let result = result.unwrap_or_default();
    let given: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .collect();
    let ips = families.order(&given);
    if ips.len() != families.iter().count() {
        // Undone as a runtime undoes a failed ADD: the pod never starts.
        let _ = delete(call, conflist, Some(&result));
        return Err(Error::Spec(format!(
            "the CNI chain did not return an address of every family {families}: {result}"
        )));
    }
    Ok((result, ips))
}

/// Runs CHECK through the list with the cached result of ADD.
pub fn check(
    call: &Call<'_>,
    conflist: &serde_json::Value,
    result: &serde_json::Value,
) -> Result<(), Error> {
    for plugin in plugins(conflist) {
        invoke(
            call,
            "CHECK",
            &plugin_config(conflist, &plugin, Some(result)),
        )?;
    }
    Ok(())
}

/// Runs DEL through the list in reverse order, with the cached result of
/// ADD when there is one: the chained plugin releases the pod, then the
/// bridge plugin returns its address.
pub fn delete(
    call: &Call<'_>,
    conflist: &serde_json::Value,
    result: Option<&serde_json::Value>,
) -> Result<(), Error> {
    let mut first_error = None;
    for plugin in plugins(conflist).iter().rev() {
        if let Err(error) = invoke(call, "DEL", &plugin_config(conflist, plugin, result)) {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn plugins(conflist: &serde_json::Value) -> Vec<serde_json::Value> {
    conflist["plugins"].as_array().cloned().unwrap_or_default()
}

fn plugin_type(plugin: &serde_json::Value) -> &str {
    plugin["type"].as_str().unwrap_or("")
}

/// One plugin's configuration as a runtime builds it from the list.
fn plugin_config(
    conflist: &serde_json::Value,
    plugin: &serde_json::Value,
    prev_result: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut config = plugin.clone();
    config["cniVersion"] = conflist["cniVersion"].clone();
    config["name"] = conflist["name"].clone();
    if let Some(result) = prev_result {
        config["prevResult"] = result.clone();
    }
    config
}

/// Runs one plugin inside the node's namespace (`ip netns exec` also mounts
/// the namespace's own /sys, which the bridge plugin reads).
fn invoke(call: &Call<'_>, command: &str, config: &serde_json::Value) -> Result<String, Error> {
    let kind = config["type"].as_str().unwrap_or_default();
    let plugin = call
        .plugin_path
        .iter()
        .map(|dir| dir.join(kind))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            Error::Missing(format!(
                "CNI plugin {kind:?} is in none of {:?}",
                call.plugin_path
            ))
        })?;
    let (namespace, name, uid) = call.pod;
    let cni_path = std::env::join_paths(call.plugin_path)
        .map_err(|e| Error::Spec(format!("CNI_PATH: {e}")))?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", call.node_netns])
        .arg(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", call.container_id)
        // Empty for a DEL after the pod's namespace is gone, as runtimes send it.
        .env(
            "CNI_NETNS",
            if call.pod_netns.is_empty() {
                String::new()
            } else {
                format!("/run/netns/{}", call.pod_netns)
            },
        )
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={uid}",
                call.container_id
            ),
        )
        .env("CNI_PATH", cni_path)
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
            command: format!("CNI {command} ({kind}) for pod {namespace}/{name}"),
            status: output.status.to_string(),
            stderr: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr))
                .trim()
                .to_string(),
        });
    }
    Ok(stdout)
}

/// The plugin search path of the lab: the reference plugins, then Kanava's.
pub fn plugin_path(reference: &Path, kanava: &Path) -> Vec<PathBuf> {
    vec![reference.to_path_buf(), kanava.to_path_buf()]
}
