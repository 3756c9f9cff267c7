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
//! - [`upgrade`]: handing listeners and open connections to a successor.

pub mod admin;
mod backoff;
pub mod certs;
mod config;
pub mod control_plane;
pub mod discovery;
mod error;
pub mod learning;
pub mod metrics;
pub mod pods;
pub mod proxy;
pub mod trust;
pub mod upgrade;
pub mod workers;
pub mod workloads;

use std::sync::Arc;

pub use config::Config;
pub use error::Error;
use kanava_tls::MeshRoots;
use tokio_util::sync::CancellationToken;

/// Longest a new ztunnel waits for its pods' certificates before offering
/// to take over from a predecessor.
const CERTIFICATES_BEFORE_TAKEOVER: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest a leaving ztunnel waits, before it exits, for the messages still
/// queued for its successor to go out.
const FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);
/// How often a terminating ztunnel looks for a successor to hand over to.
const SUCCESSOR_LOOKED_FOR_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// How often the drop counters of STRICT pods' non-TCP guards are read
/// for `kanava_non_tcp_dropped_packets_total` (two `iptables-save` runs per
/// guarded pod).
const GUARD_COUNTERS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the ztunnel until `terminate` is cancelled (SIGTERM), then hands
/// over to a successor as soon as one is ready within the termination grace
/// (serving on meanwhile), and returns.
///
/// On shutdown the capture rules stay in the pods: their traffic fails
/// closed until a new ztunnel takes over, instead of bypassing the mesh.
pub async fn run(config: Config, terminate: CancellationToken) -> Result<(), Error> {
    let config = Arc::new(config);
    let roots_pem = std::fs::read(&config.ca_root_file).map_err(Error::io(format!(
        "read mesh root {}",
        config.ca_root_file.display()
    )))?;
    let roots = MeshRoots::from_pem(&roots_pem)?;
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(metrics::Metrics::new());
    let trust = Arc::new(trust::Trust::new(roots, &metrics)?);
    let control_plane = control_plane::ControlPlane::new(&config, &trust.bundle)?;
    let workloads = Arc::new(workloads::WorkloadStore::for_node(&config.node_name));
    let certs = Arc::new(certs::CertManager::new(
        control_plane.clone(),
        config.cert_ttl,
        metrics.clone(),
        trust.clone(),
        workloads.clone(),
    ));
    let proxy = Arc::new(proxy::Proxy::new(
        config.clone(),
        workloads.clone(),
        certs,
        trust.clone(),
        metrics.clone(),
    )?);
    let pods = Arc::new(pods::PodRegistry::new(
        proxy.clone(),
        kanava_handoff::records::RecordDir::new(&config.pod_records_dir),
        config.netns_dir.clone(),
    ));
    // A ztunnel that answers on the upgrade socket is our predecessor: we
    // start beside it and take over when it leaves.
    // Nothing here has bound the socket yet, so whoever answers is another
    // process (its pid is in its own namespace: said, never compared).
    let predecessor = upgrade::successor::ask_status(&config.upgrade_socket).map(|(pid, _, _)| pid);
    if let Some(pid) = predecessor {
        tracing::info!(
            predecessor = pid,
            "starting beside a running ztunnel; taking over when it leaves"
        );
        // Clients may come back for streams it has not handed over yet
        // (it is told to leave as soon as we are ready, in seconds).
        proxy.resumptions.expect_incoming(Some(
            std::time::Instant::now() + upgrade::successor::INCOMING_FOR,
        ));
    }
    if pods::discover::netns_mount(&config.netns_dir) == pods::discover::NetnsMount::Private {
        tracing::error!(
            netns_dir = %config.netns_dir.display(),
            "the node's network namespace directory is mounted here without propagation: namespaces made after this start are invisible, so their pods are neither served again after a restart nor found when their namespace joins the mesh; mount it with mountPropagation: HostToContainer, which needs the node's / to be a shared or slave mount (README, \"Install on a cluster\")"
        );
    }
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
        workloads.clone(),
        trust,
        metrics,
        config.node_name.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(
        pods.clone()
            .count_guard_drops(GUARD_COUNTERS_EVERY, shutdown.clone()),
    );
    tokio::spawn(proxy.clone().evict_idle_connections(shutdown.clone()));
    tokio::spawn(proxy.clone().recheck_on_changes(shutdown.clone()));

    let state = Arc::new(admin::State {
        node: config.node_name.clone(),
        proxy: proxy.clone(),
        pods: pods.clone(),
    });
    let stop_admin = shutdown.child_token();
    for (address, endpoint) in [
        (config.admin_address, admin::Endpoint::Admin),
        (config.metrics_address, admin::Endpoint::Metrics),
        (config.readiness_address, admin::Endpoint::Readiness),
    ] {
        if predecessor.is_none() {
            admin::serve(address, endpoint, state.clone(), stop_admin.clone()).await?;
            continue;
        }
        // The predecessor holds these ports (the lab runs both in one
        // network namespace) until it leaves.
        let (state, stop) = (state.clone(), stop_admin.clone());
        tokio::spawn(async move {
            let mut said = false;
            while !stop.is_cancelled() {
                match admin::serve(address, endpoint, state.clone(), stop.clone()).await {
                    Ok(()) => return,
                    Err(error) => {
                        if !said {
                            tracing::info!(%error, "waiting for the predecessor to free the port");
                            said = true;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    pods::handoff::serve(
        &config.handoff_socket,
        config.handoff_allowed_uid,
        pods.clone(),
        tokio::runtime::Handle::current(),
    )?;
    // Ready to take over once configured (pods restored above).
    let successor = Arc::new(upgrade::successor::Successor {
        proxy: proxy.clone(),
        pods: pods.clone(),
        runtime: tokio::runtime::Handle::current(),
        allowed_uid: config.handoff_allowed_uid,
        last: Default::default(),
        bound: Default::default(),
    });
    let own_upgrade_socket = successor.clone();
    tokio::spawn({
        let path = config.upgrade_socket.clone();
        let stop = shutdown.clone();
        async move {
            tokio::select! {
                () = workloads.wait_ready() => {}
                () = stop.cancelled() => return,
            }
            // And certified: a predecessor that leaves before this ztunnel
            // has its pods' certificates would leave their new inbound
            // connections to fail their handshakes here.
            let waiting = successor
                .proxy
                .certs
                .wait_all_issued(CERTIFICATES_BEFORE_TAKEOVER)
                .await;
            if waiting > 0 {
                tracing::warn!(waiting, wait = ?CERTIFICATES_BEFORE_TAKEOVER, "ready to take over without every certificate");
            }
            if let Err(error) = upgrade::successor::serve(path, successor) {
                tracing::error!(%error, "cannot serve the upgrade socket; an upgrade will drain this ztunnel's connections");
            }
        }
    });

    terminate.cancelled().await;
    let grace = config.termination_grace;
    let terminated_at = std::time::Instant::now();
    // A successor may come after the SIGTERM: a deleted or evicted ztunnel
    // pod gets its DaemonSet's replacement a second or two later. Until the
    // grace runs out this one serves on and looks for it, and hands over
    // when it comes.
    let mut waiting_said = false;
    let handed_over = loop {
        let found = upgrade::predecessor::leave(
            proxy.clone(),
            pods.clone(),
            config.upgrade_socket.clone(),
            own_upgrade_socket.bound.get().copied(),
            grace,
            stop_admin.clone(),
        )
        .await;
        if found.is_some() || terminated_at.elapsed() + SUCCESSOR_LOOKED_FOR_EVERY >= grace {
            break found;
        }
        if !waiting_said {
            tracing::info!(
                ?grace,
                "terminating: serving on and waiting for a successor to hand over to"
            );
            waiting_said = true;
        }
        tokio::time::sleep(SUCCESSOR_LOOKED_FOR_EVERY).await;
    };
    match handed_over {
        Some(summary) if summary.drained > 0 => {
            tracing::info!(
                drained = summary.drained,
                ?grace,
                "draining the connections that could not move"
            );
            let left = proxy
                .departure
                .drained(std::time::Instant::now() + grace)
                .await;
            if left > 0 {
                tracing::warn!(
                    left,
                    "connections still open at the end of the grace are closed"
                );
            }
        }
        Some(_) => {}
        None => {
            let left = grace.saturating_sub(terminated_at.elapsed());
            if !left.is_zero() {
                tracing::info!(
                    ?left,
                    "no successor came: serving on for the rest of the grace period"
                );
                tokio::time::sleep(left).await;
            }
        }
    }
    // HBONE connections told to go away close once their clients have
    // answered, and keep their sockets open a moment after
    // (`proxy::inbound::CLOSE_LINGER`): exiting before would reset them under
    // requests whose answers are still on their way.
    let closing = proxy
        .departure
        .closed(std::time::Instant::now() + proxy::inbound::CLOSE_WITHIN)
        .await;
    if closing > 0 {
        tracing::warn!(
            closing,
            within = ?proxy::inbound::CLOSE_WITHIN,
            "HBONE connections still closing are reset"
        );
    }
    // Messages still queued for the successor carry sockets (and the
    // summary): they go out before this process exits.
    if !proxy.departure.close_outbox(FLUSH_WITHIN).await {
        tracing::warn!(within = ?FLUSH_WITHIN, "the last messages to the successor may not have gone out");
    }
    shutdown.cancel();
    Ok(())
}
