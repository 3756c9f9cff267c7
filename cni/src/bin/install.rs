//! `kanava-cni-install`: the companion container of the ztunnel DaemonSet
//! that puts `kanava-cni` on its node and keeps it there.
//!
//! Every `--interval` it makes sure the plugin binary, its kubeconfig and
//! its entry in the node's primary conflist are in place (see
//! `kanava_cni::install`). On SIGTERM it asks the API server whether its
//! DaemonSet still exists: if it does, this is a restart or an upgrade, and
//! everything stays (pods keep being captured by whichever ztunnel runs). If
//! the DaemonSet is gone (`helm uninstall`), it removes the entry first (no
//! new pod is handed over), releases every pod on the node through the
//! ztunnel's handoff socket (their rules go), and removes the binary, the
//! kubeconfig and the pod records.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use kanava_cni::install::{self, Install};
use kanava_handoff::client;
use kanava_handoff::records::RecordDir;
use kanava_runtime::LogFormat;
use tokio::signal::unix::{SignalKind, signal};

/// Installs the kanava-cni plugin on this node and keeps it installed.
#[derive(Debug, Parser)]
#[command(name = "kanava-cni-install", version)]
struct Config {
    /// The plugin binary to install.
    #[arg(
        long,
        env = "KANAVA_CNI_PLUGIN",
        default_value = "/usr/local/bin/kanava-cni"
    )]
    plugin: PathBuf,
    /// The host's CNI bin directory, as mounted here.
    #[arg(long, env = "KANAVA_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The host's CNI configuration directory, as mounted here.
    #[arg(
        long,
        env = "KANAVA_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    cni_conf_dir: PathBuf,
    /// The same directory as the host sees it (written into the conflist).
    #[arg(
        long,
        env = "KANAVA_HOST_CNI_CONF_DIR",
        default_value = "/etc/cni/net.d"
    )]
    host_cni_conf_dir: PathBuf,
    /// The ztunnel's handoff socket (the same path here and on the host).
    #[arg(
        long,
        env = "KANAVA_HANDOFF_SOCKET",
        default_value = "/var/run/kanava/ztunnel.sock"
    )]
    handoff_socket: PathBuf,
    /// The pod records (the same path here and on the host).
    #[arg(
        long,
        env = "KANAVA_POD_RECORDS_DIR",
        default_value = "/var/run/kanava/pods"
    )]
    pod_records_dir: PathBuf,
    /// This pod's service account, whose token the plugin uses.
    #[arg(
        long,
        env = "KANAVA_SERVICE_ACCOUNT_DIR",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount"
    )]
    service_account_dir: PathBuf,
    /// The DaemonSet this container belongs to; its absence on SIGTERM
    /// means uninstall.
    #[arg(long, env = "KANAVA_DAEMONSET", default_value = "ztunnel")]
    daemonset: String,
    /// Its namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kanava-system")]
    namespace: String,
    /// How often the node's configuration is checked.
    #[arg(long, env = "KANAVA_CNI_CHECK_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// The API server, for this installer and the plugin. Default, in a
    /// pod: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    #[arg(long, env = "KANAVA_API_SERVER")]
    api_server: Option<String>,
    /// Log format (the level comes from `RUST_LOG`).
    #[arg(long, env = "KANAVA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    kanava_runtime::init(config.log_format);
    tracing::info!(?config, "kanava-cni-install starting");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let install = Install {
        plugin: config.plugin.clone(),
        bin_dir: config.cni_bin_dir.clone(),
        conf_dir: config.cni_conf_dir.clone(),
        host_conf_dir: config.host_cni_conf_dir.clone(),
        socket_path: config.handoff_socket.clone(),
        pod_records_dir: config.pod_records_dir.clone(),
        mesh_namespace: config.namespace.clone(),
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // Polled rather than watched with inotify: the directory may not exist
    // until the primary plugin is installed, files are replaced by rename,
    // and a check every few seconds costs nothing.
    let mut ticker = tokio::time::interval(config.interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        match kubeconfig(&config).and_then(|k| Ok(install::ensure(&install, &k)?)) {
            Ok(changes) if changes != install::Changes::default() => {
                tracing::info!(?changes, "kanava-cni installed");
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "kanava-cni is not installed on this node"),
        }
    }
    if daemonset_remains(&config).await {
        tracing::info!("stopping for a restart or an upgrade; kanava-cni stays installed");
        return Ok(());
    }
    tracing::info!("the DaemonSet is gone: uninstalling kanava-cni from this node");
    install::uninstall(&install)?;
    release_pods(&config);
    Ok(())
}

/// Releases every recorded pod (the ztunnel removes its rules) and forgets
/// the records.
fn release_pods(config: &Config) {
    let records = RecordDir::new(&config.pod_records_dir);
    for uid in records.uids().unwrap_or_default() {
        // The record goes first: the ztunnel captures recorded pods that
        // discovery says are in the mesh, and would take this one back.
        let _ = records.remove(&uid);
        match client::delete_pod(&config.handoff_socket, &uid, None, Duration::from_secs(5)) {
            Ok(()) => tracing::info!(%uid, "pod released"),
            Err(error) => tracing::warn!(%uid, %error, "pod not released"),
        }
    }
}

/// Whether the DaemonSet still exists and is not being deleted. When the
/// answer is unknown (API server away), it is assumed to remain: keeping the
/// plugin keeps pods from starting uncaptured.
///
/// Asked with the same credentials the plugin gets (this pod's token and
/// CA, read by name), not through the in-cluster defaults of the client
/// library, which need more of the service-account volume than the chart
/// projects.
async fn daemonset_remains(config: &Config) -> bool {
    let check = async {
        let client = api_client(config).await?;
        let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, &config.namespace);
        Ok::<_, anyhow::Error>(api.get_opt(&config.daemonset).await)
    };
    match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(Ok(Ok(Some(daemonset)))) => daemonset.metadata.deletion_timestamp.is_none(),
        Ok(Ok(Ok(None))) => false,
        // Its RBAC goes with the chart.
        Ok(Ok(Err(kube::Error::Api(status)))) if status.code == 403 || status.code == 401 => false,
        Ok(Ok(Err(error))) => {
            tracing::warn!(%error, "cannot tell whether this is an uninstall; keeping kanava-cni");
            true
        }
        Ok(Err(error)) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot reach the API server to tell whether this is an uninstall; keeping kanava-cni"
            );
            true
        }
        Err(_) => {
            tracing::warn!("the API server did not answer; keeping kanava-cni");
            true
        }
    }
}

/// A client of the API server with the plugin's kubeconfig.
async fn api_client(config: &Config) -> anyhow::Result<kube::Client> {
    let file = kube::config::Kubeconfig::from_yaml(&kubeconfig(config)?)
        .context("the plugin's kubeconfig")?;
    let client_config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .context("the plugin's kubeconfig")?;
    Ok(kube::Client::try_from(client_config)?)
}

/// The plugin's kubeconfig, from this pod's service account.
fn kubeconfig(config: &Config) -> anyhow::Result<String> {
    let server = match &config.api_server {
        Some(server) => server.clone(),
        None => {
            let host = std::env::var("KUBERNETES_SERVICE_HOST")
                .context("KUBERNETES_SERVICE_HOST (or --api-server)")?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            if host.contains(':') {
                format!("https://[{host}]:{port}")
            } else {
                format!("https://{host}:{port}")
            }
        }
    };
    let dir = &config.service_account_dir;
    let token = std::fs::read_to_string(dir.join("token"))
        .with_context(|| format!("read {}", dir.join("token").display()))?;
    let ca = std::fs::read(dir.join("ca.crt"))
        .with_context(|| format!("read {}", dir.join("ca.crt").display()))?;
    Ok(install::kubeconfig(&server, &ca, token.trim()))
}
