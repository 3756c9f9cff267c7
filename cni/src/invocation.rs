//! What the runtime gives the plugin: the environment (`CNI_*`) and the
//! network configuration on standard input.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::{Error, SUPPORTED_VERSIONS};

/// The plugin's operation (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The environment of one call.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads the environment through `var` (the process's, or a test's).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some(other) => {
                return Err(Error::Environment(format!(
                    "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                )));
            }
            None => {
                return Err(Error::Environment(
                    "CNI_COMMAND is not set: kanava-cni is run by a container runtime".into(),
                ));
            }
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |name: &str| -> Result<String, Error> {
            match var(name).filter(|v| !v.is_empty()) {
                Some(value) => Ok(value),
                None if per_container => Err(Error::Environment(format!(
                    "{name} is required for {command:?}"
                ))),
                None => Ok(String::new()),
            }
        };
        let container_id = required("CNI_CONTAINERID")?;
        let ifname = required("CNI_IFNAME")?;
        let netns = match var("CNI_NETNS").filter(|v| !v.is_empty()) {
            Some(path) => Some(PathBuf::from(path)),
            // DEL may come after the namespace is gone.
            None if matches!(command, Command::Add | Command::Check) => {
                return Err(Error::Environment(format!(
                    "CNI_NETNS is required for {command:?}"
                )));
            }
            None => None,
        };
        let args = parse_args(var("CNI_ARGS").as_deref().unwrap_or(""))?;
        Ok(Invocation {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    /// The Kubernetes pod this call is for, when the runtime says
    /// (`K8S_POD_NAMESPACE` and `K8S_POD_NAME` in `CNI_ARGS`).
    pub fn pod(&self) -> Option<PodRef> {
        let namespace = self
            .args
            .get("K8S_POD_NAMESPACE")
            .filter(|v| !v.is_empty())?;
        let name = self.args.get("K8S_POD_NAME").filter(|v| !v.is_empty())?;
        Some(PodRef {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: self
                .args
                .get("K8S_POD_UID")
                .filter(|v| !v.is_empty())
                .cloned(),
        })
    }
}

/// A pod as the runtime names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn parse_args(text: &str) -> Result<BTreeMap<String, String>, Error> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    Error::Environment(format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"))
                })
        })
        .collect()
}

/// The plugin's part of the network configuration (unknown keys, such as
/// the runtime's `runtimeConfig`, are ignored).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The result of the plugins before this one in the chain.
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// The ztunnel's handoff socket.
    #[serde(default = "default_socket")]
    pub socket_path: PathBuf,
    /// Where pod records are kept for the ztunnel.
    #[serde(default = "default_records")]
    pub pod_records_dir: PathBuf,
    /// How the plugin reads pods and namespaces from the API server (the
    /// installer writes it). Exactly one of this and `manifestDir`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The lab's stand-in for the API server: a directory of manifests.
    #[serde(default)]
    pub manifest_dir: Option<PathBuf>,
    /// Bound on each exchange with the API server and the ztunnel.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The namespace the mesh itself runs in (the installer writes it).
    /// Its pods (control plane, ztunnel, installer) are never captured and
    /// never wait for the API server or a ztunnel: the mesh must be able to
    /// come back on a node whatever state the node is in.
    #[serde(default = "default_mesh_namespace")]
    pub mesh_namespace: String,
    /// Attachments still in use, for GC (`cni.dev/valid-attachments`).
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/var/run/kanava/ztunnel.sock")
}

fn default_records() -> PathBuf {
    PathBuf::from("/var/run/kanava/pods")
}

fn default_mesh_namespace() -> String {
    "kanava-system".into()
}

fn default_timeout() -> u64 {
    10
}

impl NetConf {
    /// Reads and checks the configuration.
    pub fn parse(stdin: &[u8]) -> Result<Self, Error> {
        if stdin.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::Decode(
                "standard input is empty; the runtime passes the network configuration there"
                    .into(),
            ));
        }
        let conf: NetConf =
            serde_json::from_slice(stdin).map_err(|e| Error::Decode(e.to_string()))?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(Error::IncompatibleVersion(conf.cni_version));
        }
        if conf.kubeconfig.is_some() == conf.manifest_dir.is_some() {
            return Err(Error::Config(
                "set exactly one of `kubeconfig` (on a Kubernetes node; the installer writes it) and `manifestDir` (the lab)".into(),
            ));
        }
        if conf.timeout_seconds == 0 {
            return Err(Error::Config("`timeoutSeconds` must be at least 1".into()));
        }
        Ok(conf)
    }

    /// The previous plugin's result, which a chained plugin needs for ADD
    /// and CHECK.
    pub fn require_prev_result(&self) -> Result<&serde_json::Value, Error> {
        self.prev_result.as_ref().ok_or_else(|| {
            Error::Config(
                "no prevResult: kanava-cni is a chained plugin and must come after the primary \
                 plugin in a conflist"
                    .into(),
            )
        })
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_seconds)
    }
}

/// The pod's IPs in a CNI result (`ips[].address`, without the prefix).
pub fn result_ips(result: &serde_json::Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next())
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_environment_is_checked_per_command() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=u-1",
            ),
        ];
        let invocation = Invocation::from_env(env(&add)).unwrap();
        assert_eq!(
            invocation.pod(),
            Some(PodRef {
                namespace: "shop".into(),
                name: "web".into(),
                uid: Some("u-1".into())
            })
        );
        let no_netns: Vec<_> = add
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        let without_netns = Invocation::from_env(env(&no_netns))
            .map(|_| ())
            .unwrap_err();
        assert!(
            without_netns.to_string().contains("CNI_NETNS"),
            "{without_netns}"
        );
        assert_eq!(without_netns.code(), 4);
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert!(
            Invocation::from_env(env(&del)).is_ok(),
            "DEL without a namespace"
        );
        assert!(Invocation::from_env(env(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert!(Invocation::from_env(env(&[("CNI_COMMAND", "ATTACH")])).is_err());
        assert!(Invocation::from_env(env(&[])).is_err());
        let bad_args = [("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "K8S_POD_NAME")];
        assert!(Invocation::from_env(env(&bad_args)).is_err());
    }

    #[test]
    fn configurations_are_checked() {
        let ok = br#"{"cniVersion":"1.0.0","name":"k8s","type":"kanava-cni","kubeconfig":"/etc/cni/net.d/kanava-cni.kubeconfig","runtimeConfig":{}}"#;
        let conf = NetConf::parse(ok).unwrap();
        assert_eq!(
            conf.socket_path,
            PathBuf::from("/var/run/kanava/ztunnel.sock")
        );
        assert!(conf.require_prev_result().is_err());
        let cases: [(&[u8], u32); 5] = [
            (b"", 6),
            (b"{garbage", 6),
            (br#"{"cniVersion":"9.9.9","kubeconfig":"/k"}"#, 1),
            (br#"{"cniVersion":"1.0.0"}"#, 7),
            (
                br#"{"cniVersion":"1.0.0","kubeconfig":"/k","manifestDir":"/m"}"#,
                7,
            ),
        ];
        for (input, code) in cases {
            let error = NetConf::parse(input).unwrap_err();
            assert_eq!(
                error.code(),
                code,
                "{}: {error}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn ips_come_from_the_previous_result() {
        let result = serde_json::json!({"ips": [
            {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 2},
            {"address": "fd00::5/64"},
            {"address": "nonsense"}
        ]});
        assert_eq!(result_ips(&result), vec!["10.244.1.5", "fd00::5"]);
        assert!(result_ips(&serde_json::json!({})).is_empty());
    }
}
