//! The chart (`charts/kanava`) as the test suite sees it: rendered by the
//! real `helm`, validated by `kubernetes-validate`, read back as objects.
//!
//! Both tools are installed by `scripts/setup.sh` into `/opt/kanava-tools`
//! (override with `KANAVA_HELM` / `KANAVA_KUBERNETES_VALIDATE`, or put them
//! on `PATH`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_json::Value;

/// Where `scripts/setup.sh` installs the chart tools.
pub const TOOLS_DIR: &str = "/opt/kanava-tools";

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/kanava")
}

/// A tool: its environment override, then the tools directory, then PATH.
/// Panics with how to install it: these checks are never skipped.
pub fn tool(variable: &str, installed: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    let installed = Path::new(TOOLS_DIR).join(installed);
    if installed.is_file() {
        return installed;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run scripts/setup.sh (or set {variable})")
        })
}

pub fn helm() -> Command {
    let mut command = Command::new(tool("KANAVA_HELM", "bin/helm", "helm"));
    // No cluster, no user configuration: the chart alone.
    command
        .env_remove("KUBECONFIG")
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("kanava-helm-config"),
        )
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("kanava-helm-cache"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("kanava-helm-data"),
        );
    command
}

pub fn kubernetes_validate() -> Command {
    Command::new(tool(
        "KANAVA_KUBERNETES_VALIDATE",
        "venv/bin/kubernetes-validate",
        "kubernetes-validate",
    ))
}

/// Runs a command; panics with its output unless it succeeds.
pub fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// `helm template mesh` of the chart in `kanava-system` with extra args.
pub fn render(args: &[&str]) -> String {
    run_ok(
        helm()
            .args(["template", "mesh"])
            .arg(chart_dir())
            .args(["--namespace", "kanava-system"])
            .args(args),
    )
}

/// The objects of a multi-document YAML stream.
pub fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .filter(|v| !v.is_null())
        .filter_map(|v| serde_json::to_value(v).ok())
        .collect()
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}
