//! What this ztunnel knows about the mesh — workloads, services and
//! authorization policies — kept current by discovery.
//!
//! Lookups (by destination IP, once per connection) take a read lock on
//! hash maps. Updates are validated as a whole before anything changes; a
//! full snapshot rebuilds the indexes, an incremental update changes only
//! the entries it names (in a cluster of 100,000 pods, one pod's change
//! must not cost a scan of all of them, nor hold the lock that long).
//!
//! On demand (when the control plane serves this ztunnel so): the snapshot
//! holds this node's workloads, the Services without endpoints and the
//! policies; a destination not known yet is learned before its connection
//! is routed ([`WorkloadStore::learn`]), and changes are kept only for what
//! is held. An address the control plane said it knows nothing of is
//! remembered as such (a destination outside the mesh), until a workload
//! takes it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kanava_mesh::policy::{Policy, PolicySet};
use kanava_mesh::{Service, Workload};
use kanava_proto::v1 as pb;
use tokio::sync::watch;

use crate::learning::Learning;

/// Addresses remembered as outside the mesh, at most.
const MAX_ABSENT: usize = 65_536;

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
    workloads_by_ip: ByAddress<Workload>,
    workloads_by_uid: HashMap<String, Arc<Workload>>,
    services_by_ip: ByAddress<Service>,
    /// The policy entries, by resource name: the set is rebuilt from them
    /// when one changes, without a pass over every entry.
    policy_entries: HashMap<String, Arc<Policy>>,
    policies: Arc<PolicySet>,
    version: String,
    /// The state is this node's share, completed on demand.
    on_demand: bool,
    /// Services whose endpoints are held (learned), by resource name.
    resolved: HashSet<String>,
    /// Addresses the control plane knows nothing of.
    absent: HashSet<IpAddr>,
}

/// An index by address that an incremental update keeps exact. Two
/// resources may claim one address for a while (a pod gone and its address
/// reused before the old one's removal arrives): the latest applied owns
/// it, and the earlier one takes it back if the latest goes first.
struct ByAddress<T> {
    owners: HashMap<IpAddr, Arc<T>>,
    /// Earlier claimants of an owned address, latest last. Almost always
    /// empty: lookups never read it.
    shadowed: HashMap<IpAddr, Vec<Arc<T>>>,
}

impl<T> Default for ByAddress<T> {
    fn default() -> Self {
        ByAddress {
            owners: HashMap::new(),
            shadowed: HashMap::new(),
        }
    }
}

impl<T> ByAddress<T> {
    fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
        self.owners.get(ip)
    }

    fn clear(&mut self) {
        self.owners.clear();
        self.shadowed.clear();
    }

    fn insert(&mut self, ip: IpAddr, value: &Arc<T>) {
        if let Some(earlier) = self.owners.insert(ip, value.clone()) {
            self.shadowed.entry(ip).or_default().push(earlier);
        }
    }

    /// Removes `value`'s claim on `ip` (the same allocation, not an equal
    /// value).
    fn remove(&mut self, ip: IpAddr, value: &Arc<T>) {
        let owned = self.owners.get(&ip).is_some_and(|o| Arc::ptr_eq(o, value));
        let shadowed = self.shadowed.get_mut(&ip);
        if owned {
            match shadowed.and_then(Vec::pop) {
                Some(earlier) => {
                    self.owners.insert(ip, earlier);
                }
                None => {
                    self.owners.remove(&ip);
                }
            }
        } else if let Some(shadowed) = shadowed {
            shadowed.retain(|s| !Arc::ptr_eq(s, value));
        }
        if self.shadowed.get(&ip).is_some_and(Vec::is_empty) {
            self.shadowed.remove(&ip);
        }
    }
}

pub struct WorkloadStore {
    inner: RwLock<Inner>,
    /// Counts applied updates; 0 until the first snapshot. Watchers use it
    /// to react to changes (policy re-evaluation) and to wait for readiness.
    updates: watch::Sender<u64>,
    /// This ztunnel's node: its workloads are kept on demand.
    node: String,
    learning: Learning,
}

impl Default for WorkloadStore {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkloadStore {
    pub fn new() -> Self {
        Self::for_node("")
    }

    /// The store of the ztunnel of `node`.
    pub fn for_node(node: &str) -> Self {
        WorkloadStore {
            inner: RwLock::new(Inner::default()),
            updates: watch::channel(0).0,
            node: node.to_string(),
            learning: Learning::default(),
        }
    }

    /// The questions to the control plane ([`Learning`]).
    pub fn learning(&self) -> &Learning {
        &self.learning
    }

    /// Whether the state is this node's share, completed on demand.
    pub fn is_on_demand(&self) -> bool {
        self.read().on_demand
    }

    /// Whether a connection to `ip` must wait for the control plane to
    /// say what it is: on demand, an address neither held (a workload, a
    /// Service with its endpoints) nor known to be outside the mesh.
    pub fn needs_learning(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let inner = self.read();
        inner.on_demand
            && !ip.is_loopback()
            && !ip.is_unspecified()
            && inner.workloads_by_ip.get(&ip).is_none()
            && !inner.absent.contains(&ip)
            && !inner
                .services_by_ip
                .get(&ip)
                .is_some_and(|service| inner.resolved.contains(&service.resource_name()))
    }

    /// Asks the control plane what `ip` is and waits, at most `within`,
    /// for the answer. False when none came: the caller refuses the
    /// connection rather than guess (an unknown address may be a pod of the
    /// mesh that must not be reached in plaintext).
    pub async fn learn(&self, ip: IpAddr, within: Duration) -> bool {
        let mut updates = self.updates.subscribe();
        if !self.needs_learning(ip) {
            return true;
        }
        if !self.learning.ask(ip.to_canonical().to_string()) {
            return false;
        }
        tokio::time::timeout(within, async {
            while self.needs_learning(ip) {
                if updates.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }

    /// The workload that owns `ip`, if the mesh knows one.
    pub fn find_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.view().find_by_ip(ip).cloned()
    }

    pub fn find_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.view().find_by_uid(uid).cloned()
    }

    /// The Service whose virtual IP is `ip`.
    pub fn find_service(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.view().find_service(ip).cloned()
    }

    /// A consistent view for several lookups under one read lock (a
    /// Service's endpoints are resolved together): hold it briefly.
    pub fn view(&self) -> View<'_> {
        View(self.read())
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

        // The answer to a question: it adds to the state, at no new version.
        let learned = !response.learned.is_empty();
        let mut inner = self.write();
        let mut to_learn = Vec::new();
        if response.full_snapshot {
            inner.entries.clear();
            inner.entries.extend(upserts);
            inner.on_demand = response.on_demand;
            inner.resolved.clear();
            inner.absent.clear();
            inner.reindex();
        } else {
            if learned {
                // A Service learned comes with its endpoints.
                for (name, entry) in &upserts {
                    if let Entry::Service(_) = entry {
                        inner.resolved.insert(name.clone());
                    }
                }
            } else if inner.on_demand {
                upserts = inner.keep_held(upserts, &self.node);
            }
            let resolved_now: Vec<String> = upserts
                .iter()
                .filter(|(name, entry)| {
                    matches!(entry, Entry::Service(_)) && inner.resolved.contains(name)
                })
                .map(|(name, _)| name.clone())
                .collect();
            let mut policies_changed = false;
            for name in &response.removed {
                inner.resolved.remove(name);
                if let Some(entry) = inner.entries.remove(name) {
                    policies_changed |= inner.unindex(name, &entry);
                }
            }
            for (name, entry) in upserts {
                if let Some(earlier) = inner.entries.remove(&name) {
                    policies_changed |= inner.unindex(&name, &earlier);
                }
                policies_changed |= inner.index(&name, &entry);
                inner.entries.insert(name, entry);
            }
            if policies_changed {
                inner.rebuild_policies();
            }
            if learned {
                // What holds no address the control plane knows is outside
                // the mesh.
                for ip in response
                    .learned
                    .iter()
                    .filter_map(|key| key.parse::<IpAddr>().ok())
                {
                    let ip = ip.to_canonical();
                    if inner.workloads_by_ip.get(&ip).is_none()
                        && inner.services_by_ip.get(&ip).is_none()
                    {
                        // Bounded: a pod scanning addresses must not grow
                        // this without end. Forgotten, an address is asked
                        // about again.
                        if inner.absent.len() >= MAX_ABSENT {
                            inner.absent.clear();
                        }
                        inner.absent.insert(ip);
                    }
                }
            }
            // An endpoint of a held Service that is not held yet (a pod that
            // became ready, its workload unchanged) is learned at once.
            if inner.on_demand {
                to_learn = inner.unknown_endpoints(&resolved_now);
            }
        }
        if !learned {
            inner.version = response.version_info.clone();
        }
        drop(inner);
        if learned {
            self.learning.answered(&response.learned);
        }
        for name in to_learn {
            // Unasked when too many questions are outstanding: a
            // connection to the Service asks again.
            let _ = self.learning.ask(name);
        }
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

/// Lookups under one read lock ([`WorkloadStore::view`]).
pub struct View<'a>(std::sync::RwLockReadGuard<'a, Inner>);

impl View<'_> {
    /// The workload that owns `ip`, if the mesh knows one.
    pub fn find_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.0.workloads_by_ip.get(&ip.to_canonical())
    }

    pub fn find_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.0.workloads_by_uid.get(uid)
    }

    /// The Service whose virtual IP is `ip`.
    pub fn find_service(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.0.services_by_ip.get(&ip.to_canonical())
    }
}

impl Inner {
    /// On demand: what of a change this node holds. Its own workloads, the
    /// workloads it held already, the endpoints of the Services it holds
    /// whole, a workload at an address known to be empty until now, every
    /// policy; every Service, without its endpoints unless held whole.
    fn keep_held(&mut self, upserts: Vec<(String, Entry)>, node: &str) -> Vec<(String, Entry)> {
        let endpoints: HashSet<String> = upserts
            .iter()
            .filter_map(|(name, entry)| match entry {
                Entry::Service(service) if self.resolved.contains(name) => Some(service),
                _ => None,
            })
            .flat_map(|service| service.endpoints.iter().map(|e| e.workload_uid.clone()))
            .collect();
        let mut kept = Vec::with_capacity(upserts.len());
        for (name, entry) in upserts {
            let keep = match &entry {
                Entry::Service(service) if !self.resolved.contains(&name) => {
                    let bare = Service {
                        endpoints: Vec::new(),
                        ..(**service).clone()
                    };
                    kept.push((name, Entry::Service(Arc::new(bare))));
                    continue;
                }
                Entry::Workload(workload) => {
                    let mut took_an_empty_address = false;
                    for ip in &workload.ips {
                        took_an_empty_address |= self.absent.remove(&ip.to_canonical());
                    }
                    workload.node == node
                        || self.entries.contains_key(&name)
                        || endpoints.contains(&workload.uid)
                        || took_an_empty_address
                }
                Entry::Service(_) | Entry::Policy(_) => true,
            };
            if keep {
                kept.push((name, entry));
            }
        }
        kept
    }

    /// `workload/<uid>` of the endpoints of `services` not held.
    fn unknown_endpoints(&self, services: &[String]) -> Vec<String> {
        services
            .iter()
            .filter_map(|name| match self.entries.get(name) {
                Some(Entry::Service(service)) => Some(service),
                _ => None,
            })
            .flat_map(|service| &service.endpoints)
            .filter(|endpoint| !self.workloads_by_uid.contains_key(&endpoint.workload_uid))
            .map(|endpoint| format!("workload/{}", endpoint.workload_uid))
            .collect()
    }

    /// Rebuilds every index from the entries (after a full snapshot).
    fn reindex(&mut self) {
        self.workloads_by_ip.clear();
        self.workloads_by_uid.clear();
        self.services_by_ip.clear();
        self.policy_entries.clear();
        let entries = std::mem::take(&mut self.entries);
        for (name, entry) in &entries {
            self.index(name, entry);
        }
        self.entries = entries;
        self.rebuild_policies();
    }

    /// Adds one entry to the indexes; true if it is a policy (the policy
    /// set then needs rebuilding).
    fn index(&mut self, name: &str, entry: &Entry) -> bool {
        match entry {
            Entry::Workload(w) => {
                for ip in &w.ips {
                    self.workloads_by_ip.insert(ip.to_canonical(), w);
                }
                self.workloads_by_uid.insert(w.uid.clone(), w.clone());
                false
            }
            Entry::Service(s) => {
                for ip in &s.addresses {
                    self.services_by_ip.insert(ip.to_canonical(), s);
                }
                false
            }
            Entry::Policy(p) => {
                self.policy_entries.insert(name.to_string(), p.clone());
                true
            }
        }
    }

    /// Takes one entry out of the indexes; true if it was a policy.
    fn unindex(&mut self, name: &str, entry: &Entry) -> bool {
        match entry {
            Entry::Workload(w) => {
                for ip in &w.ips {
                    self.workloads_by_ip.remove(ip.to_canonical(), w);
                }
                if self
                    .workloads_by_uid
                    .get(&w.uid)
                    .is_some_and(|indexed| Arc::ptr_eq(indexed, w))
                {
                    self.workloads_by_uid.remove(&w.uid);
                }
                false
            }
            Entry::Service(s) => {
                for ip in &s.addresses {
                    self.services_by_ip.remove(ip.to_canonical(), s);
                }
                false
            }
            Entry::Policy(_) => {
                self.policy_entries.remove(name);
                true
            }
        }
    }

    fn rebuild_policies(&mut self) {
        self.policies = Arc::new(PolicySet::new(self.policy_entries.values().cloned()));
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
mod tests;
