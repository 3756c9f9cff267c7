//! What this ztunnel knows about the mesh — workloads, services and
//! authorization policies — kept current by discovery.
//!
//! Lookups (by destination IP, once per connection) take a read lock on
//! hash maps; updates are rare, validated as a whole before anything
//! changes, and rebuild the indexes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use kanava_mesh::policy::{Policy, PolicySet};
use kanava_mesh::{Service, Workload};
use kanava_proto::v1 as pb;
use tokio::sync::watch;

#[derive(Clone)]
enum Entry {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
    Policy(Arc<Policy>),
}

impl Entry {
    fn resource_version(&self) -> &str {
        match self {
            Entry::Workload(w) => &w.resource_version,
            Entry::Service(s) => &s.resource_version,
            Entry::Policy(p) => &p.resource_version,
        }
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    workloads_by_uid: HashMap<String, Arc<Workload>>,
    services_by_ip: HashMap<IpAddr, Arc<Service>>,
    policies: Arc<PolicySet>,
    version: String,
}

pub struct WorkloadStore {
    inner: RwLock<Inner>,
    /// Counts applied updates; 0 until the first snapshot. Watchers use it
    /// to react to changes (policy re-evaluation) and to wait for readiness.
    updates: watch::Sender<u64>,
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
            updates: watch::channel(0).0,
        }
    }

    /// The workload that owns `ip`, if the mesh knows one.
    pub fn find_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.read().workloads_by_ip.get(&ip.to_canonical()).cloned()
    }

    pub fn find_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.read().workloads_by_uid.get(uid).cloned()
    }

    /// The Service whose virtual IP is `ip`.
    pub fn find_service(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.read().services_by_ip.get(&ip.to_canonical()).cloned()
    }

    /// The authorization policies in force.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.read().policies.clone()
    }

    /// Every workload, sorted by namespace and name (for the admin API).
    pub fn workloads(&self) -> Vec<Arc<Workload>> {
        let mut all: Vec<_> = self.read().workloads_by_uid.values().cloned().collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }

    /// Every service, sorted by namespace and name.
    pub fn services(&self) -> Vec<Arc<Service>> {
        let inner = self.read();
        let mut all: Vec<_> = inner
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Service(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        all.sort_by_key(|s| s.key());
        all
    }

    /// Resource name → resource version of everything known (for the admin
    /// API: whoever changed an object can see when it arrived here).
    pub fn resource_versions(&self) -> std::collections::BTreeMap<String, String> {
        self.read()
            .entries
            .iter()
            .map(|(name, entry)| (name.clone(), entry.resource_version().to_string()))
            .collect()
    }

    /// Version of the last applied discovery response.
    pub fn version(&self) -> String {
        self.read().version.clone()
    }

    pub fn is_ready(&self) -> bool {
        *self.updates.borrow() > 0
    }

    /// Waits until the first snapshot is applied.
    pub async fn wait_ready(&self) {
        let mut updates = self.updates.subscribe();
        let _ = updates.wait_for(|count| *count > 0).await;
    }

    /// Notified after every applied update.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }

    /// Applies a discovery response, all or nothing: if any resource is
    /// invalid, nothing changes and the reason is returned (for the NACK).
    pub fn apply(&self, response: &pb::DiscoveryResponse) -> Result<(), String> {
        let mut upserts = Vec::with_capacity(response.resources.len());
        for resource in &response.resources {
            let entry = match &resource.kind {
                Some(pb::resource::Kind::Workload(w)) => {
                    let workload = Workload::from_proto(w)
                        .map_err(|e| format!("resource {}: {e}", resource.name))?;
                    check_name(&resource.name, &workload.resource_name())?;
                    Entry::Workload(Arc::new(workload))
                }
                Some(pb::resource::Kind::Service(s)) => {
                    let service = Service::from_proto(s)
                        .map_err(|e| format!("resource {}: {e}", resource.name))?;
                    check_name(&resource.name, &service.resource_name())?;
                    Entry::Service(Arc::new(service))
                }
                Some(pb::resource::Kind::Policy(p)) => {
                    let policy = Policy::from_proto(p)
                        .map_err(|e| format!("resource {}: {e}", resource.name))?;
                    check_name(&resource.name, &policy.resource_name())?;
                    Entry::Policy(Arc::new(policy))
                }
                None => return Err(format!("resource {} has no content", resource.name)),
            };
            upserts.push((resource.name.clone(), entry));
        }
        if response.full_snapshot && !response.removed.is_empty() {
            return Err("a full snapshot cannot remove resources".into());
        }

        let mut inner = self.write();
        if response.full_snapshot {
            inner.entries.clear();
        }
        for name in &response.removed {
            inner.entries.remove(name);
        }
        inner.entries.extend(upserts);
        inner.reindex();
        inner.version = response.version_info.clone();
        drop(inner);
        self.updates.send_modify(|count| *count += 1);
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

impl Inner {
    /// Rebuilds every index from the entries, so they never drift from them
    /// whatever an update moved around.
    fn reindex(&mut self) {
        self.workloads_by_ip.clear();
        self.workloads_by_uid.clear();
        self.services_by_ip.clear();
        let mut policies = Vec::new();
        for entry in self.entries.values() {
            match entry {
                Entry::Workload(w) => {
                    for ip in &w.ips {
                        self.workloads_by_ip.insert(ip.to_canonical(), w.clone());
                    }
                    self.workloads_by_uid.insert(w.uid.clone(), w.clone());
                }
                Entry::Service(s) => {
                    for ip in &s.addresses {
                        self.services_by_ip.insert(*ip, s.clone());
                    }
                }
                Entry::Policy(p) => policies.push(p.clone()),
            }
        }
        self.policies = Arc::new(PolicySet::new(policies));
    }
}

fn check_name(name: &str, expected: &str) -> Result<(), String> {
    if name == expected {
        Ok(())
    } else {
        Err(format!("resource {name} carries {expected}"))
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
            mtls_mode: Default::default(),
            resource_version: "1".into(),
            plaintext_inbound_ports: Vec::new(),
        };
        pb::Resource {
            name: w.resource_name(),
            kind: Some(pb::resource::Kind::Workload(w.to_proto())),
        }
    }

    fn service(name: &str, vip: &str, endpoint: &str) -> pb::Resource {
        pb::Resource {
            name: format!("service/ns/{name}"),
            kind: Some(pb::resource::Kind::Service(pb::Service {
                namespace: "ns".into(),
                name: name.into(),
                addresses: vec![vip.into()],
                ports: vec![pb::ServicePort {
                    port: 80,
                    target_port: 8080,
                    target_port_name: String::new(),
                }],
                endpoints: vec![pb::Endpoint {
                    workload_uid: endpoint.into(),
                    ports: [(80, 8080)].into(),
                }],
                resource_version: "2".into(),
            })),
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
                resources: vec![
                    resource("a", "10.0.0.1"),
                    resource("b", "10.0.0.2"),
                    service("web", "10.96.0.1", "a"),
                ],
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
        assert_eq!(
            store
                .find_service("10.96.0.1".parse().unwrap())
                .unwrap()
                .name,
            "web"
        );

        store
            .apply(&pb::DiscoveryResponse {
                version_info: "2".into(),
                resources: vec![resource("a", "10.0.0.3")],
                removed: vec!["workload/b".into(), "service/ns/web".into()],
                ..Default::default()
            })
            .unwrap();
        assert!(store.find_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert!(store.find_by_ip("10.0.0.2".parse().unwrap()).is_none());
        assert!(store.find_service("10.96.0.1".parse().unwrap()).is_none());
        assert_eq!(
            store.find_by_ip("10.0.0.3".parse().unwrap()).unwrap().uid,
            "a"
        );
        assert_eq!(
            store.find_by_uid("a").unwrap().ips[0].to_string(),
            "10.0.0.3"
        );
        assert_eq!(store.version(), "2");
        assert_eq!(*store.subscribe().borrow(), 2);
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
        let bad_policy = pb::Resource {
            name: "policy/ns/p".into(),
            kind: Some(pb::resource::Kind::Policy(pb::Policy {
                namespace: "ns".into(),
                name: "p".into(),
                rules: vec![pb::PolicyRule {
                    from: vec![pb::PolicySource {
                        ip_blocks: vec!["10.0.0.0/99".into()],
                        ..Default::default()
                    }],
                    to: vec![],
                }],
                ..Default::default()
            })),
        };
        for bad in [bad, bad_policy] {
            let err = store
                .apply(&pb::DiscoveryResponse {
                    version_info: "2".into(),
                    resources: vec![resource("c", "10.0.0.3"), bad],
                    removed: vec!["workload/a".into()],
                    ..Default::default()
                })
                .unwrap_err();
            assert!(
                err.contains("not-an-ip") || err.contains("10.0.0.0/99"),
                "{err}"
            );
            assert_eq!(store.version(), "1");
            assert!(store.find_by_ip("10.0.0.1".parse().unwrap()).is_some());
            assert!(store.find_by_ip("10.0.0.3".parse().unwrap()).is_none());
            assert!(store.policies().is_empty());
        }
    }
}
