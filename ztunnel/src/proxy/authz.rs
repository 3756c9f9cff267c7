//! Authorization at the destination, and re-checking open connections
//! whenever the policies (or the workloads they select) change: a connection
//! the new configuration would refuse is closed, and so is a plaintext one
//! when its pod's namespace switched from permissive to strict.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kanava_mesh::policy::{Connection, Decision};
use kanava_mesh::{Identity, MtlsMode};
use tokio_util::sync::CancellationToken;

use super::{CapturedPod, PodInfo};
use crate::workloads::WorkloadStore;

/// Decides whether `identity` (`None`: plaintext) at `source_ip` may connect
/// to `port` of `pod`.
pub fn authorize(
    store: &WorkloadStore,
    pod: &PodInfo,
    identity: Option<&Identity>,
    source_ip: IpAddr,
    port: u16,
) -> Decision {
    let policies = store.policies();
    if policies.is_empty() {
        return Decision::Allow;
    }
    // Labels come from discovery. A pod the control plane has not described
    // yet cannot be matched against selectors: if any policy in its scope
    // has one, refuse rather than guess (it may be the one that denies).
    let workload = store.find_by_uid(&pod.uid);
    if workload.is_none() && policies.has_selector_in_scope(&pod.namespace) {
        return Decision::Deny {
            policy: "-".into(),
            reason: format!(
                "pod {} is not yet described by discovery, and policies with selectors apply in \
                 its namespace; refusing until its labels are known",
                pod.display_name()
            ),
        };
    }
    let no_labels = BTreeMap::new();
    let labels = workload.as_ref().map(|w| &*w.labels).unwrap_or(&no_labels);
    policies.evaluate(
        &pod.namespace,
        labels,
        &Connection {
            identity,
            source_ip,
            destination_port: port,
        },
    )
}

/// Whether `pod` currently takes plaintext peers (its namespace is in
/// permissive mode).
fn admits_plaintext(store: &WorkloadStore, pod: &PodInfo) -> bool {
    store
        .find_by_uid(&pod.uid)
        .is_some_and(|w| w.mtls_mode == MtlsMode::Permissive)
}

struct Open {
    pod: Arc<CapturedPod>,
    identity: Option<Identity>,
    source_ip: IpAddr,
    port: u16,
    close: CancellationToken,
}

/// Inbound connections in progress, with what authorization needs to judge
/// them again.
#[derive(Default)]
pub struct OpenConnections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

/// Keeps a connection registered; dropping it unregisters.
pub struct Registration<'a> {
    id: u64,
    connections: &'a OpenConnections,
    /// Cancelled when a policy change refuses the connection.
    pub closed: CancellationToken,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

impl OpenConnections {
    pub fn register(
        &self,
        pod: Arc<CapturedPod>,
        identity: Option<Identity>,
        source_ip: IpAddr,
        port: u16,
    ) -> Registration<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.lock().insert(
            id,
            Open {
                pod,
                identity,
                source_ip,
                port,
                close: close.clone(),
            },
        );
        Registration {
            id,
            connections: self,
            closed: close,
        }
    }

    /// Judges every open connection against the current configuration and
    /// closes those it refuses. Returns how many were closed.
    pub fn recheck(&self, store: &WorkloadStore) -> usize {
        let open = self.lock();
        let mut closed = 0;
        for connection in open.values() {
            if connection.close.is_cancelled() {
                continue;
            }
            let decision = if connection.identity.is_none()
                && !admits_plaintext(store, &connection.pod.info)
            {
                Decision::Deny {
                    policy: "-".into(),
                    reason: "the pod's namespace now requires mutual TLS".into(),
                }
            } else {
                authorize(
                    store,
                    &connection.pod.info,
                    connection.identity.as_ref(),
                    connection.source_ip,
                    connection.port,
                )
            };
            if let Decision::Deny { policy, reason } = decision {
                tracing::info!(
                    pod = %connection.pod.info.display_name(),
                    src.ip = %connection.source_ip,
                    src.identity = connection.identity.as_ref().map(ToString::to_string).as_deref().unwrap_or("-"),
                    port = connection.port,
                    %policy,
                    %reason,
                    "closing an open connection the new policy refuses"
                );
                connection.close.cancel();
                closed += 1;
            }
        }
        closed
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}
