//! Inbound plaintext (:15006): a peer reached an enrolled pod without the
//! mesh. In strict mode (the default) the connection is reset and the
//! refusal logged. In permissive mode the peer is admitted as an
//! unauthenticated client, subject to authorization, and connected to the
//! app with its own address as source.

use std::net::SocketAddr;
use std::sync::Arc;

use kanava_mesh::MtlsMode;
use kanava_mesh::policy::Decision;
use tokio::net::TcpStream;

use super::access_log::AccessLog;
use super::chunks::copy_tcp;
use super::{CapturedPod, Proxy, authz, socket};
use crate::metrics::{Direction, Outcome};

pub async fn handle(
    proxy: Arc<Proxy>,
    pod: Arc<CapturedPod>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let destination = socket::original_destination(&client)
        .or_else(|_| client.local_addr().map(socket::canonical))
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let log = AccessLog::start(
        &proxy.metrics,
        Direction::Inbound,
        pod.display_name(),
        peer,
        destination,
    );
    let mode = proxy
        .workloads
        .find_by_uid(&pod.uid)
        .map(|w| w.mtls_mode)
        .unwrap_or_default();
    let refusal = match mode {
        MtlsMode::Strict => {
            Some("plaintext connection to an enrolled pod; mutual TLS is required".to_string())
        }
        MtlsMode::Permissive if !pod.owns(destination.ip()) => Some(format!(
            "plaintext connection for {destination}, which is not this pod's"
        )),
        MtlsMode::Permissive => {
            match authz::authorize(&proxy.workloads, &pod, None, peer.ip(), destination.port()) {
                Decision::Allow => None,
                Decision::Deny { reason, .. } => Some(reason),
            }
        }
    };
    if let Some(reason) = refusal {
        socket::reset(client);
        log.finish(&proxy.metrics, Outcome::Denied, (0, 0), Some(&reason));
        return;
    }

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
            log.finish(
                &proxy.metrics,
                Outcome::Failed,
                (0, 0),
                Some(&error.to_string()),
            );
            return;
        }
    };
    let registration = proxy
        .open
        .register(pod.clone(), None, peer.ip(), destination.port());
    tokio::select! {
        (bytes, result) = copy_tcp(&mut client, &mut upstream) => match result {
            Ok(()) => log.finish(&proxy.metrics, Outcome::Success, bytes, None),
            Err(error) => log.finish(&proxy.metrics, Outcome::Failed, bytes, Some(&error.to_string())),
        },
        _ = registration.closed.cancelled() => {
            socket::reset(client);
            log.finish(&proxy.metrics, Outcome::Denied, (0, 0), Some("closed: refused by a policy change"));
        }
    }
}
