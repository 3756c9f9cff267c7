//! The mesh state served to ztunnels: a versioned snapshot plus the change
//! from each version to the next.
//!
//! A change is computed once, when the state is replaced, and shared by every
//! discovery stream; streams never diff state themselves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use prost::Message;

use kanava_mesh::{Identity, Workload};
use kanava_proto::v1 as pb;
use tokio::sync::{broadcast, watch};

use kanava_cluster::MeshState;

/// How many changes a slow stream may fall behind before it is sent a fresh
/// snapshot instead.
const CHANGE_BACKLOG: usize = 256;
/// Resources per part of a full snapshot: small enough that a hundred
/// streams sending at once hold megabytes, not gigabytes.
const SNAPSHOT_PART: usize = 1000;

/// All resources at one version.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub resources: BTreeMap<String, Arc<pb::Resource>>,
    /// What ztunnels trust; on the first part of every full snapshot.
    pub trust_bundle: Option<pb::TrustBundle>,
    /// Identities of the enrolled pods scheduled on each node (for the CA).
    identities_by_node: HashMap<String, HashSet<Identity>>,
    /// The full-snapshot responses (parts), encoded on first use.
    encoded: OnceLock<Arc<[Bytes]>>,
}

impl Snapshot {
    /// Whether a pod with `identity` is scheduled on `node`.
    pub fn node_runs(&self, node: &str, identity: &Identity) -> bool {
        self.identities_by_node
            .get(node)
            .is_some_and(|ids| ids.contains(identity))
    }

    /// This snapshot as full `DiscoveryResponse` parts, encoded once and
    /// shared by every stream.
    pub fn encoded(&self) -> Arc<[Bytes]> {
        self.encoded
            .get_or_init(|| {
                let resources: Vec<&Arc<pb::Resource>> = self.resources.values().collect();
                let mut chunks: Vec<&[&Arc<pb::Resource>]> =
                    resources.chunks(SNAPSHOT_PART).collect();
                if chunks.is_empty() {
                    // An empty mesh is still a snapshot: one part, no resources.
                    chunks.push(&[]);
                }
                let last = chunks.len() - 1;
                chunks
                    .iter()
                    .enumerate()
                    .map(|(part, chunk)| {
                        encode(&pb::DiscoveryResponse {
                            version_info: self.version.to_string(),
                            nonce: format!("{}-full-{part}", self.version),
                            full_snapshot: true,
                            resources: chunk.iter().map(|r| (***r).clone()).collect(),
                            removed: Vec::new(),
                            more: part < last,
                            trust_bundle: if part == 0 {
                                self.trust_bundle.clone()
                            } else {
                                None
                            },
                        })
                    })
                    .collect()
            })
            .clone()
    }
}

fn encode(response: &pb::DiscoveryResponse) -> Bytes {
    Bytes::from(response.encode_to_vec())
}

/// What changed from `version - 1` to `version`.
#[derive(Debug)]
pub struct Delta {
    pub version: u64,
    /// When it entered the store (for the push delay).
    pub created: std::time::Instant,
    pub upserts: Vec<Arc<pb::Resource>>,
    pub removed: Vec<String>,
    /// The incremental `DiscoveryResponse`, encoded once.
    pub encoded: Bytes,
}

/// Workload uid → the resource made from it, marked with the last
/// `replace` that saw it.
#[derive(Default)]
struct WorkloadResources {
    generation: u64,
    entries: HashMap<String, WorkloadResource>,
}

struct WorkloadResource {
    seen: u64,
    workload: Arc<Workload>,
    resource: Arc<pb::Resource>,
}

pub struct Store {
    current: Mutex<Arc<Snapshot>>,
    /// The resource made from each workload last time: a workload that is
    /// the same (shared) object again reuses it without being compared.
    workload_resources: Mutex<WorkloadResources>,
    changes: broadcast::Sender<Arc<Delta>>,
    /// Becomes true once the source has been read for the first time, so no
    /// ztunnel is ever told "the mesh is empty" during start-up.
    loaded: watch::Sender<bool>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Store {
            current: Mutex::new(Arc::new(Snapshot::default())),
            workload_resources: Mutex::new(WorkloadResources::default()),
            changes: broadcast::channel(CHANGE_BACKLOG).0,
            loaded: watch::channel(false).0,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    /// The control plane's metrics (every part of it holds the store).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Whether the source has been read in full at least once (the control
    /// plane is ready).
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.lock().clone()
    }

    /// Waits for the first load, then returns the current snapshot and a
    /// receiver of every later change, with no gap between them.
    pub async fn subscribe(&self) -> (Arc<Snapshot>, broadcast::Receiver<Arc<Delta>>) {
        let mut loaded = self.loaded.subscribe();
        // Err only if the sender is gone, which cannot happen while `self` lives.
        let _ = loaded.wait_for(|loaded| *loaded).await;
        let current = self.lock();
        (current.clone(), self.changes.subscribe())
    }

    /// Replaces the state. Returns the change, or `None` when nothing
    /// changed.
    pub fn replace(&self, state: &MeshState) -> Option<Arc<Delta>> {
        let mut resources = BTreeMap::new();
        let mut identities_by_node: HashMap<String, HashSet<Identity>> = HashMap::new();
        let mut previous = self
            .workload_resources
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let generation = previous.generation + 1;
        previous.generation = generation;
        let mut unchanged = HashSet::new();
        for workload in &state.workloads {
            // Only a pod in the mesh makes its identity requestable: a pod
            // outside it has no use for a certificate.
            if workload.in_mesh() {
                identities_by_node
                    .entry(workload.node.clone())
                    .or_default()
                    .insert(workload.identity.clone());
            }
            let resource = match previous.entries.get_mut(&workload.uid) {
                Some(entry) if Arc::ptr_eq(&entry.workload, workload) => {
                    entry.seen = generation;
                    unchanged.insert(Arc::as_ptr(&entry.resource));
                    entry.resource.clone()
                }
                _ => {
                    let resource = Arc::new(pb::Resource {
                        name: workload.resource_name(),
                        kind: Some(pb::resource::Kind::Workload(workload.to_proto())),
                    });
                    previous.entries.insert(
                        workload.uid.clone(),
                        WorkloadResource {
                            seen: generation,
                            workload: workload.clone(),
                            resource: resource.clone(),
                        },
                    );
                    resource
                }
            };
            resources.insert(resource.name.clone(), resource);
        }
        previous.entries.retain(|_, entry| entry.seen == generation);
        drop(previous);
        let mut add = |name: String, kind: pb::resource::Kind| {
            resources.insert(
                name.clone(),
                Arc::new(pb::Resource {
                    name,
                    kind: Some(kind),
                }),
            );
        };
        for service in &state.services {
            add(
                service.resource_name(),
                pb::resource::Kind::Service(service.to_proto()),
            );
        }
        for policy in &state.policies {
            add(
                policy.resource_name(),
                pb::resource::Kind::Policy(policy.to_proto()),
            );
        }

        let mut current = self.lock();
        let upserts: Vec<_> = resources
            .iter()
            .filter(|(name, resource)| {
                !unchanged.contains(&Arc::as_ptr(resource))
                    && current.resources.get(*name) != Some(*resource)
            })
            .map(|(_, resource)| resource.clone())
            .collect();
        let removed: Vec<_> = current
            .resources
            .keys()
            .filter(|name| !resources.contains_key(*name))
            .cloned()
            .collect();
        self.loaded.send_replace(true);
        self.metrics.source_synced.set(1);
        if upserts.is_empty() && removed.is_empty() && current.version > 0 {
            return None;
        }
        let version = current.version + 1;
        *current = Arc::new(Snapshot {
            version,
            resources,
            trust_bundle: current.trust_bundle.clone(),
            identities_by_node,
            encoded: OnceLock::new(),
        });
        let delta = self.publish(&mut current, upserts, removed, None);
        tracing::info!(
            version,
            resources = current.resources.len(),
            changed = delta.upserts.len(),
            removed = delta.removed.len(),
            "mesh state updated"
        );
        Some(delta)
    }

    /// Serves `bundle` from now on: a new version whose change carries only
    /// the bundle. Before the first version, the bundle simply joins it.
    pub fn set_trust_bundle(&self, bundle: pb::TrustBundle) {
        self.metrics
            .trust_roots
            .set(i64::try_from(bundle.roots.len()).unwrap_or(i64::MAX));
        let mut current = self.lock();
        if current.trust_bundle.as_ref() == Some(&bundle) {
            return;
        }
        // Before the first version the bundle simply joins the snapshot; no
        // stream has been served anything yet.
        let version = match current.version {
            0 => 0,
            served => served + 1,
        };
        *current = Arc::new(Snapshot {
            version,
            resources: current.resources.clone(),
            trust_bundle: Some(bundle.clone()),
            identities_by_node: current.identities_by_node.clone(),
            encoded: OnceLock::new(),
        });
        if version == 0 {
            return;
        }
        self.publish(&mut current, Vec::new(), Vec::new(), Some(bundle));
        tracing::info!(version, "trust bundle updated");
    }

    /// Makes the change to the snapshot now in `current` known to every
    /// stream.
    fn publish(
        &self,
        current: &mut Arc<Snapshot>,
        upserts: Vec<Arc<pb::Resource>>,
        removed: Vec<String>,
        trust_bundle: Option<pb::TrustBundle>,
    ) -> Arc<Delta> {
        let version = current.version;
        let encoded = encode(&pb::DiscoveryResponse {
            version_info: version.to_string(),
            nonce: format!("{version}{DELTA_NONCE_SUFFIX}"),
            full_snapshot: false,
            resources: upserts.iter().map(|r| (**r).clone()).collect(),
            removed: removed.clone(),
            more: false,
            trust_bundle,
        });
        let delta = Arc::new(Delta {
            version,
            created: std::time::Instant::now(),
            upserts,
            removed,
            encoded,
        });
        self.metrics
            .configuration_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        // Err only when no stream is listening.
        let _ = self.changes.send(delta.clone());
        delta
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<Snapshot>> {
        // The lock guards a pointer swap; a panic while holding it cannot
        // leave the snapshot half-written, so a poisoned lock is still good.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How the nonce of an incremental update ends (`<version>-delta`); full
/// snapshots are `<version>-full-<part>`.
const DELTA_NONCE_SUFFIX: &str = "-delta";

/// Whether a response nonce names an incremental update.
pub fn is_delta_nonce(nonce: &str) -> bool {
    nonce.ends_with(DELTA_NONCE_SUFFIX)
}

#[cfg(test)]
mod tests {
    use kanava_mesh::{TunnelProtocol, Workload};

    use super::*;

    fn state(workloads: Vec<Workload>) -> MeshState {
        MeshState {
            workloads: workloads.into_iter().map(Arc::new).collect(),
            ..Default::default()
        }
    }

    fn workload(uid: &str, node: &str, sa: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
            node: node.into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            identity: Identity::new("cluster.local", "shop", sa).unwrap(),
            protocol: TunnelProtocol::Hbone,
            labels: Default::default(),
            mtls_mode: Default::default(),
            resource_version: "1".into(),
            plaintext_inbound_ports: Vec::new(),
        }
    }

    #[tokio::test]
    async fn changes_are_computed_once_and_in_order() {
        let store = Store::new();
        let first = store
            .replace(&state(vec![
                workload("a", "n1", "web"),
                workload("b", "n2", "db"),
            ]))
            .unwrap();
        assert_eq!(first.version, 1);
        assert_eq!(first.upserts.len(), 2);

        let (snapshot, mut changes) = store.subscribe().await;
        assert_eq!(snapshot.version, 1);
        assert!(snapshot.node_runs(
            "n1",
            &Identity::new("cluster.local", "shop", "web").unwrap()
        ));
        assert!(!snapshot.node_runs(
            "n2",
            &Identity::new("cluster.local", "shop", "web").unwrap()
        ));

        assert!(
            store
                .replace(&state(vec![
                    workload("a", "n1", "web"),
                    workload("b", "n2", "db")
                ]))
                .is_none(),
            "no change, no new version"
        );
        let mut moved = workload("a", "n2", "web");
        moved.ips = vec!["10.0.0.2".parse().unwrap()];
        store.replace(&state(vec![moved])).unwrap();
        let delta = changes.recv().await.unwrap();
        assert_eq!(delta.version, 2);
        assert_eq!(delta.upserts.len(), 1);
        assert_eq!(delta.removed, vec!["workload/b".to_string()]);
        assert!(store.snapshot().node_runs(
            "n2",
            &Identity::new("cluster.local", "shop", "web").unwrap()
        ));
    }

    #[tokio::test]
    async fn subscribers_wait_for_the_first_load() {
        let store = Arc::new(Store::new());
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.subscribe().await.0.version }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        store.replace(&MeshState::default());
        assert_eq!(
            waiting.await.unwrap(),
            1,
            "an empty but loaded mesh is version 1"
        );
    }
}
