//! Inbound plaintext (:15006): a peer reached an enrolled pod without the
//! mesh. [`decide`] judges it: in strict mode (the default) it is refused;
//! in permissive mode the peer is admitted as an unauthenticated client,
//! subject to authorization. A refused connection is reset; an admitted one
//! is connected to the app with the peer's own address as source.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use kanava_mesh::policy::Decision;
use kanava_mesh::{MtlsMode, ports};
use tokio::net::TcpStream;

use super::access_log::{AccessLog, Ending};
use super::chunks::copy_tcp;
use super::{CapturedPod, PodInfo, Proxy, authz, socket};
use crate::metrics::Direction;
use crate::workloads::WorkloadStore;

pub async fn handle(proxy: Arc<Proxy>, pod: Arc<CapturedPod>, client: TcpStream, peer: SocketAddr) {
    let destination = socket::original_destination(&client)
        .or_else(|_| client.local_addr().map(socket::canonical))
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut log = AccessLog::start(&proxy.metrics, Direction::Inbound, &pod, peer, destination);
    log.workloads(
        proxy.workloads.find_by_ip(peer.ip()),
        proxy.workloads.find_by_uid(&pod.info.uid),
    );
    let max = proxy.config.max_connections_per_pod;
    let Some(_opened) = pod.connections.inbound.try_open(max) else {
        socket::reset(client);
        log.finish(
            &proxy.metrics,
            Ending::denied(super::limits::over_limit(&pod, "inbound", max))
                .code("connection_limit"),
        );
        return;
    };
    let ending = match decide(&proxy.workloads, &pod.info, peer.ip(), destination) {
        Err(reason) => {
            socket::reset(client);
            Ending::denied(reason).code("plaintext_refused")
        }
        Ok(()) => Box::pin(carry(&proxy, &pod, client, peer, destination, &mut log)).await,
    };
    log.finish(&proxy.metrics, ending);
}

/// Judges a plaintext connection from `peer` to `destination` in `pod`: the
/// reason it is refused, if it is.
pub fn decide(
    store: &WorkloadStore,
    pod: &PodInfo,
    peer: IpAddr,
    destination: SocketAddr,
) -> Result<(), String> {
    if !store.is_ready() {
        return Err(super::inbound::NOT_CONFIGURED.into());
    }
    if ports::is_pod_listener(destination.port()) {
        return Err(format!(
            "plaintext connection for {destination}, the ztunnel's own listener; proxying it would loop"
        ));
    }
    let mode = store
        .find_by_uid(&pod.uid)
        .map(|w| w.mtls_mode)
        .unwrap_or_default();
    match mode {
        MtlsMode::Strict => {
            Err("plaintext connection to an enrolled pod; mutual TLS is required".into())
        }
        MtlsMode::Permissive if !pod.owns(destination.ip()) => Err(format!(
            "plaintext connection for {destination}, which is not this pod's"
        )),
        MtlsMode::Permissive => {
            match authz::authorize(store, pod, None, peer, destination.port()) {
                Decision::Allow => Ok(()),
                Decision::Deny { reason, .. } => Err(reason),
            }
        }
    }
}

/// Connects to the app as the peer and copies until both sides are done, or
/// until a policy change refuses the connection.
async fn carry(
    proxy: &Proxy,
    pod: &Arc<CapturedPod>,
    mut client: TcpStream,
    peer: SocketAddr,
    destination: SocketAddr,
    log: &mut AccessLog,
) -> Ending {
    let upstream = socket::connect_in(
        &proxy.netns,
        &pod.netns,
        destination,
        Some(peer.ip()),
        proxy.config.connect_timeout,
    )
    .await;
    let mut upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            socket::reset(client);
            return Ending::failed(error).code("no_upstream");
        }
    };
    log.opened(&proxy.metrics);
    let registration = proxy
        .open
        .register(pod.clone(), None, peer.ip(), destination.port());
    tokio::select! {
        (bytes, result) = copy_tcp(&mut client, &mut upstream) => Ending::carried(bytes, result),
        _ = registration.closed.cancelled() => {
            socket::reset(client);
            Ending::denied("closed: refused by a policy change").code("policy_change")
        }
    }
}

#[cfg(test)]
mod tests {
    use kanava_mesh::policy::{Action, Rule};

    use super::*;
    use crate::proxy::test_support::{pod_info, policy, store, workload};

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("IP")
    }

    fn to(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn plaintext_is_reset_before_the_first_snapshot() {
        let verdict = decide(
            &WorkloadStore::new(),
            &pod_info("web", "10.244.2.3"),
            ip("10.244.1.9"),
            to("10.244.2.3:80"),
        );
        assert!(matches!(verdict, Err(reason) if reason.contains("first snapshot")));
    }

    #[test]
    fn strict_pods_refuse_plaintext() {
        let store = store(&[workload("web", "10.244.2.3")], &[], &[]);
        let verdict = decide(
            &store,
            &pod_info("web", "10.244.2.3"),
            ip("10.244.1.9"),
            to("10.244.2.3:80"),
        );
        assert!(matches!(verdict, Err(reason) if reason.contains("mutual TLS is required")));
    }

    #[test]
    fn a_pod_discovery_has_not_described_yet_is_strict() {
        let store = store(&[], &[], &[]);
        assert!(
            decide(
                &store,
                &pod_info("web", "10.244.2.3"),
                ip("10.244.1.9"),
                to("10.244.2.3:80")
            )
            .is_err()
        );
    }

    #[test]
    fn permissive_pods_admit_plaintext_subject_to_policy() {
        let mut web = workload("web", "10.244.2.3");
        web.mtls_mode = MtlsMode::Permissive;
        let pod = pod_info("web", "10.244.2.3");
        let open = store(std::slice::from_ref(&web), &[], &[]);
        assert_eq!(
            decide(&open, &pod, ip("10.244.1.9"), to("10.244.2.3:80")),
            Ok(())
        );
        // Not for another address than the pod's own.
        assert!(decide(&open, &pod, ip("10.244.1.9"), to("10.244.2.4:80")).is_err());
        // Never for the ztunnel's own listeners: that would loop.
        for port in [15001, 15006, 15008] {
            let verdict = decide(
                &open,
                &pod,
                ip("10.244.1.9"),
                SocketAddr::new(ip("10.244.2.3"), port),
            );
            assert!(
                matches!(&verdict, Err(reason) if reason.contains("loop")),
                "{port}: {verdict:?}"
            );
        }
        // An ALLOW naming principals never matches an unauthenticated peer.
        let principals_only = policy(
            "shop",
            "mtls-clients",
            Action::Allow,
            vec![Rule {
                from: vec![crate::proxy::test_support::from_principals(&["*"])],
                to: vec![],
            }],
        );
        let guarded = store(&[web], &[], &[principals_only]);
        let verdict = decide(&guarded, &pod, ip("10.244.1.9"), to("10.244.2.3:80"));
        assert!(matches!(verdict, Err(reason) if reason.contains("mtls-clients")));
    }
}
