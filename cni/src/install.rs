//! What `kanava-cni-install` does to a node's CNI directories, as plain
//! functions on paths (the binary adds the loop, the signals and the API
//! server).
//!
//! - The plugin binary is copied into the host's CNI bin directory
//!   (temporary file, then rename: a runtime never runs half a binary).
//! - The plugin is appended to the node's primary conflist — the file the
//!   runtime uses, the first `.conflist` / `.conf` / `.json` in name order
//!   — as the last plugin of its chain. Files the primary plugin rewrites
//!   lose the entry; [`ensure`] puts it back, so the installer runs it in a
//!   loop.
//! - A kubeconfig for the plugin, with the installer's own service-account
//!   token (which the kubelet rotates, so it is rewritten when it changes).
//! - [`uninstall`] takes all of it away again.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's `type`, and its binary's name.
pub const PLUGIN: &str = "kanava-cni";
/// The kubeconfig the plugin reads, in the CNI configuration directory.
pub const KUBECONFIG: &str = "kanava-cni.kubeconfig";

/// What goes into the node's CNI configuration.
#[derive(Clone, Debug)]
pub struct Install {
    /// The plugin binary to copy (inside the installer's image).
    pub plugin: PathBuf,
    /// The host's CNI bin directory, as mounted in the installer.
    pub bin_dir: PathBuf,
    /// The host's CNI configuration directory, as mounted in the installer.
    pub conf_dir: PathBuf,
    /// The same directory as the host (and so the plugin) sees it.
    pub host_conf_dir: PathBuf,
    /// The ztunnel's handoff socket and the pod records, host paths.
    pub socket_path: PathBuf,
    pub pod_records_dir: PathBuf,
    /// The namespace the mesh runs in: its pods are left alone.
    pub mesh_namespace: String,
}

/// What could not be done.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Conflist { path: String, reason: String },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let context = context.into();
    move |source| InstallError::Io { context, source }
}

impl Install {
    /// The plugin's entry in the chain.
    pub fn plugin_entry(&self) -> Value {
        json!({
            "type": PLUGIN,
            "socketPath": self.socket_path,
            "podRecordsDir": self.pod_records_dir,
            "kubeconfig": self.host_conf_dir.join(KUBECONFIG),
            "meshNamespace": self.mesh_namespace,
        })
    }
}

/// The configuration file the runtime uses: the first by name with a CNI
/// extension. `None` while the primary plugin has not written one yet.
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = match std::fs::read_dir(conf_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.map_err(io(format!("list {}", conf_dir.display())))?,
    };
    let mut candidates: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    candidates.sort();
    Ok(candidates.into_iter().next())
}

/// `conflist` with our plugin last in its chain, or `None` if it already
/// is, exactly as `entry`.
pub fn with_plugin(conflist: &Value, entry: &Value) -> Result<Option<Value>, String> {
    let plugins = conflist["plugins"].as_array().ok_or(
        "not a network configuration list (no \"plugins\"); a single-plugin .conf is not chained \
         to: convert it to a .conflist",
    )?;
    if plugins.last() == Some(entry) && plugins.iter().filter(|p| p["type"] == PLUGIN).count() == 1
    {
        return Ok(None);
    }
    let mut updated = conflist.clone();
    let mut chain: Vec<Value> = plugins
        .iter()
        .filter(|p| p["type"] != PLUGIN)
        .cloned()
        .collect();
    chain.push(entry.clone());
    updated["plugins"] = Value::Array(chain);
    Ok(Some(updated))
}

/// `conflist` without our plugin, or `None` if it has none.
pub fn without_plugin(conflist: &Value) -> Option<Value> {
    let plugins = conflist["plugins"].as_array()?;
    if !plugins.iter().any(|p| p["type"] == PLUGIN) {
        return None;
    }
    let mut updated = conflist.clone();
    updated["plugins"] = Value::Array(
        plugins
            .iter()
            .filter(|p| p["type"] != PLUGIN)
            .cloned()
            .collect(),
    );
    Some(updated)
}

/// What [`ensure`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub binary: bool,
    pub kubeconfig: bool,
    /// The configuration file our plugin was (re)added to.
    pub chained_into: Option<PathBuf>,
}

/// Brings the node to the installed state; changes only what differs.
/// `kubeconfig` is the file's wanted content.
pub fn ensure(install: &Install, kubeconfig: &str) -> Result<Changes, InstallError> {
    let mut changes = Changes::default();
    let binary = install.bin_dir.join(PLUGIN);
    let wanted =
        std::fs::read(&install.plugin).map_err(io(format!("read {}", install.plugin.display())))?;
    if std::fs::read(&binary).ok().as_deref() != Some(wanted.as_slice()) {
        write_file(&binary, &wanted, 0o755)?;
        changes.binary = true;
    }
    let kubeconfig_path = install.conf_dir.join(KUBECONFIG);
    if std::fs::read_to_string(&kubeconfig_path).ok().as_deref() != Some(kubeconfig) {
        write_file(&kubeconfig_path, kubeconfig.as_bytes(), 0o600)?;
        changes.kubeconfig = true;
    }
    if let Some(path) = primary_config(&install.conf_dir)? {
        let conflist = read_json(&path)?;
        let updated = with_plugin(&conflist, &install.plugin_entry()).map_err(|reason| {
            InstallError::Conflist {
                path: path.display().to_string(),
                reason,
            }
        })?;
        if let Some(updated) = updated {
            write_json(&path, &updated)?;
            changes.chained_into = Some(path);
        }
    }
    Ok(changes)
}

/// Takes our plugin out of every configuration file and removes the binary
/// and the kubeconfig.
pub fn uninstall(install: &Install) -> Result<(), InstallError> {
    if let Ok(entries) = std::fs::read_dir(&install.conf_dir) {
        for path in entries.flatten().map(|e| e.path()) {
            let Ok(conflist) = read_json(&path) else {
                continue;
            };
            if let Some(updated) = without_plugin(&conflist) {
                write_json(&path, &updated)?;
            }
        }
    }
    for path in [
        install.conf_dir.join(KUBECONFIG),
        install.bin_dir.join(PLUGIN),
    ] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("remove {}", path.display()))(e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A kubeconfig that reaches the API server with `token`.
pub fn kubeconfig(server: &str, ca_pem: &[u8], token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "# Written by kanava-cni-install for the kanava-cni plugin; rewritten when the token rotates.\n\
         apiVersion: v1\nkind: Config\n\
         clusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: kanava-cni\n  user:\n    token: {token}\n\
         contexts:\n- name: kanava-cni\n  context:\n    cluster: local\n    user: kanava-cni\n\
         current-context: kanava-cni\n"
    )
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let bytes = std::fs::read(path).map_err(io(format!("read {}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| InstallError::Conflist {
        path: path.display().to_string(),
        reason: format!("not JSON: {e}"),
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| InstallError::Conflist {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    text.push(b'\n');
    let mode = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0o644);
    write_file(path, &text, mode)
}

/// Writes through a temporary file in the same directory and a rename, so
/// readers see the old file or the new one.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.kanava-tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io(format!("create {}", temporary.display())))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io(format!("write {}", temporary.display())))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", temporary.display())))?;
    std::fs::rename(&temporary, path).map_err(io(format!("rename to {}", path.display())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node() -> (tempfile::TempDir, Install) {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["bin", "net.d", "image"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("image/kanava-cni"), b"\x7fELF plugin v1").unwrap();
        let install = Install {
            plugin: dir.path().join("image/kanava-cni"),
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            host_conf_dir: PathBuf::from("/etc/cni/net.d"),
            socket_path: PathBuf::from("/var/run/kanava/ztunnel.sock"),
            pod_records_dir: PathBuf::from("/var/run/kanava/pods"),
            mesh_namespace: "kanava-system".into(),
        };
        (dir, install)
    }

    fn primary() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "containerd-net",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    #[test]
    fn the_plugin_is_chained_last_once_and_put_back_when_removed() {
        let (_dir, install) = node();
        let conflist = install.conf_dir.join("10-containerd-net.conflist");
        std::fs::write(&conflist, primary().to_string()).unwrap();
        // A later file is not the one the runtime uses.
        std::fs::write(
            install.conf_dir.join("99-other.conflist"),
            primary().to_string(),
        )
        .unwrap();

        let changes = ensure(&install, "kubeconfig v1").unwrap();
        assert!(changes.binary && changes.kubeconfig);
        assert_eq!(changes.chained_into.as_deref(), Some(conflist.as_path()));
        let written: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
        let plugins = written["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[0]["type"], "bridge", "the primary chain is kept");
        assert_eq!(plugins[2], install.plugin_entry());
        assert_eq!(
            plugins[2]["kubeconfig"],
            "/etc/cni/net.d/kanava-cni.kubeconfig"
        );
        assert_eq!(
            std::fs::read(install.bin_dir.join("kanava-cni")).unwrap(),
            b"\x7fELF plugin v1"
        );
        let other = std::fs::read_to_string(install.conf_dir.join("99-other.conflist")).unwrap();
        assert!(!other.contains(PLUGIN));

        assert_eq!(
            ensure(&install, "kubeconfig v1").unwrap(),
            Changes::default(),
            "settled"
        );

        // The primary plugin rewrites its file; the entry comes back.
        std::fs::write(&conflist, primary().to_string()).unwrap();
        let changes = ensure(&install, "kubeconfig v2").unwrap();
        assert_eq!(changes.chained_into.as_deref(), Some(conflist.as_path()));
        assert!(changes.kubeconfig && !changes.binary);

        uninstall(&install).unwrap();
        let restored: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
        assert_eq!(restored, primary(), "the primary conflist as it was");
        assert!(!install.bin_dir.join("kanava-cni").exists());
        assert!(!install.conf_dir.join(KUBECONFIG).exists());
        uninstall(&install).unwrap();
    }

    #[test]
    fn a_single_plugin_conf_is_refused_with_a_reason() {
        let (_dir, install) = node();
        std::fs::write(
            install.conf_dir.join("10-flannel.conf"),
            json!({"cniVersion": "0.3.1", "type": "flannel"}).to_string(),
        )
        .unwrap();
        let error = ensure(&install, "k").unwrap_err().to_string();
        assert!(error.contains("convert it to a .conflist"), "{error}");
    }

    #[test]
    fn nothing_to_chain_into_yet_is_not_an_error() {
        let (_dir, install) = node();
        let changes = ensure(&install, "k").unwrap();
        assert_eq!(changes.chained_into, None);
        assert!(changes.binary);
    }

    #[test]
    fn a_stale_entry_is_replaced_not_duplicated() {
        let (_dir, install) = node();
        let mut conflist = primary();
        conflist["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(1, json!({"type": "kanava-cni", "socketPath": "/old"}));
        let updated = with_plugin(&conflist, &install.plugin_entry())
            .unwrap()
            .unwrap();
        let plugins = updated["plugins"].as_array().unwrap();
        assert_eq!(plugins.iter().filter(|p| p["type"] == PLUGIN).count(), 1);
        assert_eq!(plugins.last().unwrap(), &install.plugin_entry());
    }
}
