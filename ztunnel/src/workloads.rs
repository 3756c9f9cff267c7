//! What this ztunnel knows about the mesh, kept current by discovery.
//!
//! Lookups (by destination IP, once per outbound connection) take a read
//! lock on a hash map; updates are rare and replace entries whole.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use kanava_mesh::Workload;
use kanava_proto::v1 as pb;
use tokio::sync::watch;

#[derive(Default)]
struct Inner {
    by_name: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    version: String,
}

pub struct WorkloadStore {
    inner: RwLock<Inner>,
    /// True once the first snapshot has been applied.
    ready: watch::Sender<bool>,
}

impl Default for WorkloadStore {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkloadStore {
    pub fn new() -> Self {
        WorkloadStore {
            inner: RwLock::new(Inner::default()),
            ready: watch::channel(false).0,
        }
    }

    /// The workload that owns `ip`, if the mesh knows one.
    pub fn find_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.read().by_ip.get(&ip.to_canonical()).cloned()
    }

    /// Every workload, sorted by namespace and name (for the admin API).
    pub fn all(&self) -> Vec<Arc<Workload>> {
        let mut all: Vec<_> = self.read().by_name.values().cloned().collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }

    /// Version of the last applied discovery response.
    pub fn version(&self) -> String {
        self.read().version.clone()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the first snapshot is applied.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Applies a discovery response, all or nothing: if any resource is
    /// invalid, nothing changes and the reason is returned (for the NACK).
    pub fn apply(&self, response: &pb::DiscoveryResponse) -> Result<(), String> {
        let mut upserts = Vec::with_capacity(response.resources.len());
        for resource in &response.resources {
            match &resource.kind {
                Some(pb::resource::Kind::Workload(w)) => {
                    let workload = Workload::from_proto(w)
                        .map_err(|e| format!("resource {}: {e}", resource.name))?;
                    if resource.name != workload.resource_name() {
                        return Err(format!(
                            "resource {} carries workload {}",
                            resource.name,
                            workload.resource_name()
                        ));
                    }
                    upserts.push(Arc::new(workload));
                }
                // Services are served from the next protocol version on;
                // knowing about them is harmless.
                Some(pb::resource::Kind::Service(_)) => {}
                None => return Err(format!("resource {} has no content", resource.name)),
            }
        }
        if response.full_snapshot && !response.removed.is_empty() {
            return Err("a full snapshot cannot remove resources".into());
        }

        let mut inner = self.write();
        if response.full_snapshot {
            inner.by_name.clear();
        }
        for name in &response.removed {
            inner.by_name.remove(name);
        }
        for workload in upserts {
            inner.by_name.insert(workload.resource_name(), workload);
        }
        // Rebuilding the IP index from scratch keeps it exactly in step with
        // by_name, whatever the update moved around.
        let by_ip = inner
            .by_name
            .values()
            .flat_map(|w| w.ips.iter().map(move |ip| (ip.to_canonical(), w.clone())))
            .collect();
        inner.by_ip = by_ip;
        inner.version = response.version_info.clone();
        drop(inner);
        self.ready.send_replace(true);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // Writers replace whole entries; a panic mid-write cannot leave a
        // half-built entry, so a poisoned lock still holds usable data.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use kanava_mesh::{Identity, TunnelProtocol};

    use super::*;

    fn resource(uid: &str, ip: &str) -> pb::Resource {
        let w = Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            node: "n".into(),
            ips: vec![ip.parse().unwrap()],
            identity: Identity::new("cluster.local", "ns", "sa").unwrap(),
            protocol: TunnelProtocol::Hbone,
            labels: Default::default(),
        };
        pb::Resource {
            name: w.resource_name(),
            kind: Some(pb::resource::Kind::Workload(w.to_proto())),
        }
    }

    #[test]
    fn applies_snapshots_and_changes() {
        let store = WorkloadStore::new();
        assert!(!store.is_ready());
        store
            .apply(&pb::DiscoveryResponse {
                version_info: "1".into(),
                full_snapshot: true,
                resources: vec![resource("a", "10.0.0.1"), resource("b", "10.0.0.2")],
                ..Default::default()
            })
            .unwrap();
        assert!(store.is_ready());
        assert_eq!(
            store.find_by_ip("10.0.0.1".parse().unwrap()).unwrap().uid,
            "a"
        );
        assert_eq!(
            store
                .find_by_ip("::ffff:10.0.0.2".parse().unwrap())
                .unwrap()
                .uid,
            "b",
            "IPv4-mapped addresses find IPv4 workloads"
        );

        store
            .apply(&pb::DiscoveryResponse {
                version_info: "2".into(),
                resources: vec![resource("a", "10.0.0.3")],
                removed: vec!["workload/b".into()],
                ..Default::default()
            })
            .unwrap();
        assert!(store.find_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(store.find_by_ip("10.0.0.2".parse().unwrap()).is_none());
        assert_eq!(
            store.find_by_ip("10.0.0.3".parse().unwrap()).unwrap().uid,
            "a"
        );
        assert_eq!(store.version(), "2");
    }

    #[test]
    fn an_invalid_update_changes_nothing() {
        let store = WorkloadStore::new();
        store
            .apply(&pb::DiscoveryResponse {
                version_info: "1".into(),
                full_snapshot: true,
                resources: vec![resource("a", "10.0.0.1")],
                ..Default::default()
            })
            .unwrap();
        let mut bad = resource("b", "10.0.0.2");
        if let Some(pb::resource::Kind::Workload(w)) = &mut bad.kind {
            w.ips = vec!["not-an-ip".into()];
        }
        let err = store
            .apply(&pb::DiscoveryResponse {
                version_info: "2".into(),
                resources: vec![resource("c", "10.0.0.3"), bad],
                removed: vec!["workload/a".into()],
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.contains("not-an-ip"), "{err}");
        assert_eq!(store.version(), "1");
        assert!(store.find_by_ip("10.0.0.1".parse().unwrap()).is_some());
        assert!(store.find_by_ip("10.0.0.3".parse().unwrap()).is_none());
    }
}
