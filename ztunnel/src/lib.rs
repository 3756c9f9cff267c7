//! Kanava's node proxy.
//!
//! One ztunnel runs on every node, in the node's network namespace. It
//! carries the TCP traffic of the node's enrolled pods over HBONE (mutual
//! TLS + HTTP/2 CONNECT), proving each pod's SPIFFE identity.
//!
//! - [`pods`]: pods handed over through the [`pods::handoff`] socket, the
//!   [`pods::capture`] rules in their namespaces.
//! - [`proxy`]: the data path: outbound, inbound HBONE, inbound plaintext,
//!   the connection pool, the byte copying.
//! - [`workloads`] and [`discovery`]: what the mesh contains, kept current
//!   from the control plane.
//! - [`certs`]: workload certificates from the mesh CA, renewed at half-life.
//! - [`admin`] and [`metrics`]: configuration dump, Prometheus metrics,
//!   readiness.

pub mod admin;
mod backoff;
pub mod certs;
mod config;
pub mod control_plane;
pub mod discovery;
mod error;
pub mod metrics;
pub mod pods;
pub mod proxy;
pub mod workloads;

use std::sync::Arc;

pub use config::Config;
pub use error::Error;
use kanava_tls::MeshRoots;
use tokio_util::sync::CancellationToken;

/// Runs the ztunnel until `shutdown` is cancelled.
///
/// On shutdown the capture rules stay in the pods: their traffic fails
/// closed until a new ztunnel takes over, instead of bypassing the mesh.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let config = Arc::new(config);
    let roots_pem = std::fs::read(&config.ca_root_file).map_err(Error::io(format!(
        "read mesh root {}",
        config.ca_root_file.display()
    )))?;
    let roots = MeshRoots::from_pem(&roots_pem)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let control_plane = control_plane::ControlPlane::new(&config, &roots)?;
    let workloads = Arc::new(workloads::WorkloadStore::new());
    let certs = Arc::new(certs::CertManager::new(
        control_plane.clone(),
        config.cert_ttl,
        metrics.clone(),
    ));
    let proxy = Arc::new(proxy::Proxy::new(
        config.clone(),
        workloads.clone(),
        certs,
        roots,
        metrics.clone(),
    )?);
    let pods = Arc::new(pods::PodRegistry::new(
        proxy.clone(),
        kanava_handoff::records::RecordDir::new(&config.pod_records_dir),
        config.netns_dir.clone(),
    ));
    // Before anything else: the pods an earlier ztunnel served have had
    // their traffic blocked since it went away.
    pods.restore().await;

    tokio::spawn(pods.clone().follow_discovery(
        workloads.clone(),
        config.node_name.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(discovery::run(
        control_plane,
        workloads,
        metrics,
        config.node_name.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(proxy.clone().evict_idle_connections(shutdown.clone()));
    tokio::spawn(proxy.clone().recheck_on_changes(shutdown.clone()));

    let state = Arc::new(admin::State {
        node: config.node_name.clone(),
        proxy: proxy.clone(),
        pods: pods.clone(),
    });
    for (address, endpoint) in [
        (config.admin_address, admin::Endpoint::Admin),
        (config.metrics_address, admin::Endpoint::Metrics),
        (config.readiness_address, admin::Endpoint::Readiness),
    ] {
        admin::serve(address, endpoint, state.clone(), shutdown.clone()).await?;
    }
    pods::handoff::serve(
        &config.handoff_socket,
        config.handoff_allowed_uid,
        pods,
        tokio::runtime::Handle::current(),
    )?;

    shutdown.cancelled().await;
    Ok(())
}
