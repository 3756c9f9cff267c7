//! What `kanava check` needs to know of a node, gathered on the node by a
//! probe pod on the host's network (`labapp node-facts`), with the host's
//! CNI directories, netns directory and kernel modules mounted read-only.
//!
//! Gathering never fails: what cannot be read is reported as unknown, and
//! the judging ([`NodeFacts::findings`]) says what that means.

use std::path::{Path, PathBuf};

use kanava_netns::mount::NetnsMount;
use serde::{Deserialize, Serialize};

/// The plugin type the mesh chains after the node's primary CNI plugin.
pub const PLUGIN_TYPE: &str = "kanava-cni";

/// Where the host's directories are mounted in the probe pod.
#[derive(Clone, Debug)]
pub struct Paths {
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub netns_dir: PathBuf,
}

/// Kernel modules the ztunnel's iptables rules need (the nf_tables backend
/// of the ztunnel image, with the xtables matches and targets it uses).
pub const MODULES: &[&str] = &[
    "nf_tables",
    "nft_compat",
    "xt_mark",
    "xt_connmark",
    "xt_conntrack",
    "xt_REDIRECT",
    "nf_nat",
];

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeFacts {
    pub kernel: String,
    /// `net.ipv4.tcp_migrate_req` exists (Linux 5.14+): a restarting ztunnel
    /// hands over its listeners' queued connections.
    pub tcp_migrate_req: bool,
    /// Why a socket may not take `IP_TRANSPARENT` (the ztunnel's spoofed
    /// sources); `None` when it may.
    pub ip_transparent_refused: Option<String>,
    /// IPv6 is enabled on the node.
    pub ipv6: bool,
    /// For each of [`MODULES`]: `loaded`, `built in`, `loadable`, `missing`
    /// or `unknown` (no module list to read).
    pub modules: Vec<(String, String)>,
    /// How the netns directory is mounted: `propagating`, `private`,
    /// `not a mount point` or `missing`.
    pub netns_mount: String,
    pub cni: CniFacts,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CniFacts {
    pub conf_dir_exists: bool,
    /// The configuration files, in the order the runtime reads them.
    pub files: Vec<String>,
    /// The first of them, which the runtime uses.
    pub primary: Option<String>,
    /// Plugin types of the primary configuration, in chain order.
    pub plugins: Vec<String>,
    /// A reason the primary configuration could not be read.
    pub unreadable: Option<String>,
    pub bin_dir_exists: bool,
    /// Plugin types of the chain with no binary in the bin directory.
    pub missing_binaries: Vec<String>,
}

impl CniFacts {
    /// Whether the chain names kanava-cni.
    pub fn chains_the_mesh(&self) -> bool {
        self.plugins.iter().any(|p| p == PLUGIN_TYPE)
    }
}

/// Reads the facts of the node this runs on.
pub fn gather(paths: &Paths) -> NodeFacts {
    NodeFacts {
        kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
        tcp_migrate_req: Path::new("/proc/sys/net/ipv4/tcp_migrate_req").exists(),
        ip_transparent_refused: ip_transparent().err(),
        ipv6: read_trimmed("/proc/sys/net/ipv6/conf/all/disable_ipv6").is_some_and(|v| v == "0"),
        modules: MODULES
            .iter()
            .map(|m| ((*m).to_string(), module_state(m)))
            .collect(),
        netns_mount: if paths.netns_dir.exists() {
            match kanava_netns::mount::netns_mount(&paths.netns_dir) {
                NetnsMount::Propagating => "propagating",
                NetnsMount::Private => "private",
                NetnsMount::NotAMountPoint => "not a mount point",
            }
        } else {
            "missing"
        }
        .into(),
        cni: cni(paths),
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn ip_transparent() -> Result<(), String> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    socket2::SockRef::from(&socket)
        .set_ip_transparent_v4(true)
        .map_err(|e| e.to_string())
}

/// Whether a kernel module is there: loaded (`/sys/module`), built in, or
/// loadable (named in the module lists under `/lib/modules`, mounted from
/// the host at `/host/lib/modules` or seen directly).
fn module_state(name: &str) -> String {
    if Path::new("/sys/module").join(name).exists() {
        return "loaded".into();
    }
    let release = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dirs = [
        Path::new("/host/lib/modules").join(&release),
        Path::new("/lib/modules").join(&release),
    ];
    let Some(dir) = dirs.iter().find(|d| d.join("modules.dep").exists()) else {
        return "unknown".into();
    };
    let listed = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .any(|line| {
                let path = line.split(':').next().unwrap_or_default();
                let base = path.rsplit('/').next().unwrap_or_default();
                let stem = base.split(".ko").next().unwrap_or_default();
                stem.replace('-', "_") == name.replace('-', "_")
            })
    };
    if listed("modules.builtin") {
        "built in".into()
    } else if listed("modules.dep") {
        "loadable".into()
    } else {
        "missing".into()
    }
}

fn cni(paths: &Paths) -> CniFacts {
    let mut facts = CniFacts {
        conf_dir_exists: paths.cni_conf_dir.is_dir(),
        bin_dir_exists: paths.cni_bin_dir.is_dir(),
        ..Default::default()
    };
    let mut files: Vec<String> = std::fs::read_dir(&paths.cni_conf_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| {
                    [".conf", ".conflist", ".json"]
                        .iter()
                        .any(|ext| name.ends_with(ext))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    facts.primary = files.first().cloned();
    facts.files = files;
    if let Some(primary) = &facts.primary {
        match std::fs::read(paths.cni_conf_dir.join(primary))
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| e.to_string())
            }) {
            Ok(conf) => {
                facts.plugins = match conf.get("plugins").and_then(|p| p.as_array()) {
                    Some(plugins) => plugins
                        .iter()
                        .filter_map(|p| p.get("type")?.as_str().map(str::to_string))
                        .collect(),
                    None => conf
                        .get("type")
                        .and_then(|t| t.as_str())
                        .map(|t| vec![t.to_string()])
                        .unwrap_or_default(),
                }
            }
            Err(error) => facts.unreadable = Some(error),
        }
    }
    facts.missing_binaries = facts
        .plugins
        .iter()
        .filter(|plugin| !paths.cni_bin_dir.join(plugin).exists())
        .cloned()
        .collect();
    facts
}

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    Ok,
    Warning,
    Error,
}

/// One judged fact, with its fix when it is not fine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Finding {
    pub what: String,
    pub severity: Severity,
    pub observed: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(what: &str, observed: impl Into<String>) -> Self {
        Finding {
            what: what.into(),
            severity: Severity::Ok,
            observed: observed.into(),
            fix: None,
        }
    }

    pub fn warning(what: &str, observed: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            what: what.into(),
            severity: Severity::Warning,
            observed: observed.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn error(what: &str, observed: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            what: what.into(),
            severity: Severity::Error,
            observed: observed.into(),
            fix: Some(fix.into()),
        }
    }
}

impl NodeFacts {
    /// The node's facts judged against what the mesh needs. `installed`:
    /// whether a ztunnel runs on the node (a chain naming kanava-cni without
    /// one blocks enrolled pods).
    pub fn findings(&self, installed: Option<bool>) -> Vec<Finding> {
        let mut found = vec![];
        found.push(if self.tcp_migrate_req {
            Finding::ok(
                "tcp_migrate_req",
                format!("present (Linux {})", self.kernel),
            )
        } else {
            Finding::warning(
                "tcp_migrate_req",
                format!("absent (Linux {})", self.kernel),
                "Linux 5.14 or later: without it, connections queued on a ztunnel's \
                 listeners when it restarts are reset",
            )
        });
        found.push(match &self.ip_transparent_refused {
            None => Finding::ok("IP_TRANSPARENT", "accepted"),
            Some(error) => Finding::error(
                "IP_TRANSPARENT",
                error.clone(),
                "a kernel with IP_TRANSPARENT (CONFIG_NETFILTER_XT_TARGET_TPROXY's \
                 socket option): the ztunnel needs it to keep pods' source addresses",
            ),
        });
        found.push(if self.ipv6 {
            Finding::ok("IPv6", "enabled")
        } else {
            Finding::ok("IPv6", "disabled (IPv4 only)")
        });
        let missing: Vec<&str> = self
            .modules
            .iter()
            .filter(|(_, state)| state == "missing")
            .map(|(name, _)| name.as_str())
            .collect();
        let unknown = self.modules.iter().all(|(_, state)| state == "unknown");
        found.push(if !missing.is_empty() {
            Finding::error(
                "iptables (nf_tables) modules",
                format!("missing: {}", missing.join(", ")),
                "a kernel with nf_tables and the xtables matches the ztunnel uses \
                 (mark, connmark, conntrack, REDIRECT)",
            )
        } else if unknown {
            Finding::ok(
                "iptables (nf_tables) modules",
                "no module list on the node: built in or not readable",
            )
        } else {
            Finding::ok(
                "iptables (nf_tables) modules",
                self.modules
                    .iter()
                    .map(|(name, state)| format!("{name} {state}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        });
        found.push(match self.netns_mount.as_str() {
            "propagating" | "missing" | "not a mount point" => Finding::ok(
                "netns mount propagation",
                if self.netns_mount == "propagating" {
                    "shared with the host".to_string()
                } else {
                    format!(
                        "{} (created by the runtime with the first pod)",
                        self.netns_mount
                    )
                },
            ),
            other => Finding::error(
                "netns mount propagation",
                other.to_string(),
                "the host's / must be a shared mount (mount --make-rshared /): the \
                 ztunnel would not see pods created after it started",
            ),
        });
        found.push(self.cni_finding(installed));
        found
    }

    fn cni_finding(&self, installed: Option<bool>) -> Finding {
        let what = "CNI configuration";
        let cni = &self.cni;
        if !cni.conf_dir_exists {
            return Finding::error(
                what,
                "no configuration directory",
                "install the cluster's network (the primary CNI plugin) first, or set \
                 cni.confDir to where the container runtime reads it (--cni-conf-dir here)",
            );
        }
        let Some(primary) = &cni.primary else {
            return Finding::error(
                what,
                "no configuration file",
                "install the cluster's network (the primary CNI plugin) first: kanava-cni \
                 chains onto it",
            );
        };
        if let Some(error) = &cni.unreadable {
            return Finding::error(
                what,
                format!("{primary}: {error}"),
                "fix or remove the broken file: the runtime reads the first one",
            );
        }
        if !cni.missing_binaries.is_empty() {
            return Finding::error(
                what,
                format!(
                    "{primary} names plugins with no binary: {}",
                    cni.missing_binaries.join(", ")
                ),
                "set cni.binDir to where the runtime looks for plugins (--cni-bin-dir here)",
            );
        }
        let chain = format!("{primary}: {}", cni.plugins.join(" → "));
        match (cni.chains_the_mesh(), installed) {
            (true, Some(false)) => Finding::error(
                what,
                format!("{chain}, and no ztunnel on this node"),
                format!(
                    "enrolled pods cannot start here: reinstall the chart, or remove \
                     {PLUGIN_TYPE} from {primary} (a leftover of an uninstall)"
                ),
            ),
            (false, Some(true)) => Finding::error(
                what,
                format!("{chain}, without {PLUGIN_TYPE}"),
                "the installer has not chained the plugin: see the ztunnel pod's \
                 install-cni container log",
            ),
            _ => Finding::ok(what, chain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_configuration_is_the_first_file_and_its_chain_is_read() {
        let dir = std::env::temp_dir().join(format!("kanava-facts-{}", std::process::id()));
        let (conf, bin) = (dir.join("net.d"), dir.join("bin"));
        std::fs::create_dir_all(&conf).expect("dir");
        std::fs::create_dir_all(&bin).expect("dir");
        std::fs::write(
            conf.join("10-bridge.conflist"),
            r#"{"name":"k8s","plugins":[{"type":"bridge"},{"type":"kanava-cni"}]}"#,
        )
        .expect("write");
        std::fs::write(conf.join("99-other.conf"), r#"{"type":"ptp"}"#).expect("write");
        std::fs::write(bin.join("bridge"), "").expect("write");
        let facts = cni(&Paths {
            cni_conf_dir: conf,
            cni_bin_dir: bin,
            netns_dir: dir.join("netns"),
        });
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(facts.primary.as_deref(), Some("10-bridge.conflist"));
        assert_eq!(facts.plugins, ["bridge", "kanava-cni"]);
        assert_eq!(facts.missing_binaries, ["kanava-cni"]);
        assert!(facts.chains_the_mesh());
    }

    #[test]
    fn a_chain_naming_the_plugin_without_a_ztunnel_is_the_uninstall_trap() {
        let facts = NodeFacts {
            cni: CniFacts {
                conf_dir_exists: true,
                bin_dir_exists: true,
                files: vec!["10-bridge.conflist".into()],
                primary: Some("10-bridge.conflist".into()),
                plugins: vec!["bridge".into(), PLUGIN_TYPE.into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let trap = facts.cni_finding(Some(false));
        assert_eq!(trap.severity, Severity::Error);
        assert!(trap.fix.as_deref().unwrap_or_default().contains("leftover"));
        assert_eq!(facts.cni_finding(Some(true)).severity, Severity::Ok);
        assert_eq!(facts.cni_finding(None).severity, Severity::Ok);
    }
}
