//! The mesh state served to ztunnels: a versioned snapshot plus the change
//! from each version to the next.
//!
//! A change is computed once, when the state is replaced, and shared by every
//! discovery stream; streams never diff state themselves.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use prost::Message;
use smallvec::SmallVec;

use kanava_mesh::Identity;
use kanava_proto::v1 as pb;
use tokio::sync::{broadcast, watch};

use kanava_cluster::MeshState;

pub mod on_demand;
mod served;

use on_demand::{AddressIndex, OnDemandParts};
pub use served::{Item, Served};

/// How many changes a slow stream may fall behind before it is sent a fresh
/// snapshot instead.
const CHANGE_BACKLOG: usize = 256;
/// Resources per part of a full snapshot: small enough that a hundred
/// streams sending at once hold megabytes, not gigabytes.
pub(crate) const SNAPSHOT_PART: usize = 1000;

/// All resources at one version. Made when a stream first needs it after
/// a change (a copy of the store's map, resources shared), so that changes
/// alone never copy the whole state.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub resources: BTreeMap<Arc<str>, Arc<Served>>,
    /// What ztunnels trust; on the first part of every full snapshot.
    pub trust_bundle: Option<pb::TrustBundle>,
    /// The full-snapshot responses (parts), encoded on first use.
    encoded: OnceLock<Arc<[Outgoing]>>,
    /// The same parts compressed, on first use by a stream that accepts
    /// compression; made from the resources, so the plain parts are never
    /// built when no stream needs them.
    compressed: OnceLock<Arc<[Outgoing]>>,
    /// What on-demand streams are sent of it.
    pub(crate) on_demand: OnDemandParts,
}

impl Snapshot {
    /// This snapshot as full `DiscoveryResponse` parts, encoded once and
    /// shared by every stream; compressed ones for streams that accept it
    /// (compressed once per part, not once per stream).
    pub fn encoded(&self, compressed: bool) -> Arc<[Outgoing]> {
        if compressed {
            self.compressed
                .get_or_init(|| self.parts().map(|part| Outgoing::compress(&part)).collect())
                .clone()
        } else {
            self.encoded
                .get_or_init(|| self.parts().map(Outgoing::plain).collect())
                .clone()
        }
    }

    fn parts(&self) -> impl Iterator<Item = Bytes> + '_ {
        let resources: Vec<&Arc<Served>> = self.resources.values().collect();
        let mut chunks: Vec<Vec<&Arc<Served>>> =
            resources.chunks(SNAPSHOT_PART).map(<[_]>::to_vec).collect();
        if chunks.is_empty() {
            // An empty mesh is still a snapshot: one part, no resources.
            chunks.push(Vec::new());
        }
        let last = chunks.len() - 1;
        chunks.into_iter().enumerate().map(move |(part, chunk)| {
            let rest = pb::DiscoveryResponse {
                version_info: self.version.to_string(),
                nonce: format!("{}-full-{part}", self.version),
                full_snapshot: true,
                resources: Vec::new(),
                removed: Vec::new(),
                more: part < last,
                trust_bundle: if part == 0 {
                    self.trust_bundle.clone()
                } else {
                    None
                },
                ..Default::default()
            };
            encode(&rest, chunk.iter().map(|r| &r.encoded()[..]))
        })
    }
}

/// An encoded `DiscoveryResponse` as it leaves for a stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    pub bytes: Bytes,
    /// Compressed with zstd: only for a stream that accepts it, which
    /// gRPC's per-message flag then tells.
    pub compressed: bool,
}

/// Below this, compression saves too little to be worth a ztunnel's work.
const COMPRESS_FROM: usize = 1024;
/// zstd's level: at 3 (its default) a part of 1,000 resources compresses
/// in about a millisecond, once, for every stream.
const COMPRESSION_LEVEL: i32 = 3;

impl Outgoing {
    pub fn plain(bytes: Bytes) -> Self {
        Outgoing {
            bytes,
            compressed: false,
        }
    }

    /// `bytes` compressed, or as they are when small or incompressible.
    pub(crate) fn compress(bytes: &Bytes) -> Self {
        if bytes.len() >= COMPRESS_FROM
            && let Ok(compressed) = zstd::bulk::compress(bytes, COMPRESSION_LEVEL)
            && compressed.len() < bytes.len()
        {
            return Outgoing {
                bytes: compressed.into(),
                compressed: true,
            };
        }
        Outgoing::plain(bytes.clone())
    }
}

/// `DiscoveryResponse.resources`.
const RESOURCES_FIELD: u32 = 4;

/// Encodes `rest` with `resources` (each an encoded `pb::Resource`) as its
/// resources. The store keeps resources encoded ([`Served`]), so a
/// response is their bytes, each behind its field's key and length, after
/// the rest: protobuf decoders take fields in any order and join the
/// occurrences of a repeated field.
pub(crate) fn encode<'a>(
    rest: &pb::DiscoveryResponse,
    resources: impl Iterator<Item = &'a [u8]> + Clone,
) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let length = rest.encoded_len()
        + resources
            .clone()
            .map(|r| key_len(RESOURCES_FIELD) + encoded_len_varint(r.len() as u64) + r.len())
            .sum::<usize>();
    let mut buffer = Vec::with_capacity(length);
    rest.encode_raw(&mut buffer);
    for resource in resources {
        encode_key(RESOURCES_FIELD, WireType::LengthDelimited, &mut buffer);
        encode_varint(resource.len() as u64, &mut buffer);
        buffer.extend_from_slice(resource);
    }
    Bytes::from(buffer)
}

/// What changed from `version - 1` to `version`.
#[derive(Debug)]
pub struct Delta {
    pub version: u64,
    /// When it entered the store (for the push delay).
    pub created: std::time::Instant,
    pub upserts: Vec<Arc<Served>>,
    pub removed: Vec<String>,
    trust_bundle: Option<pb::TrustBundle>,
    /// The incremental `DiscoveryResponse`, encoded once, when a stream first
    /// sends it: the first version's change (the whole state) and changes
    /// made while no stream listens never are.
    encoded: OnceLock<Bytes>,
    /// The same, compressed for the streams that accept it.
    compressed: OnceLock<Outgoing>,
}

impl Delta {
    /// This change as an incremental `DiscoveryResponse`, compressed for a
    /// stream that accepts it (a rollout's or a namespace's change can be
    /// large; one pod's stays as it is).
    pub fn outgoing(&self, compressed: bool) -> Outgoing {
        if compressed {
            self.compressed
                .get_or_init(|| Outgoing::compress(&self.encoded()))
                .clone()
        } else {
            Outgoing::plain(self.encoded())
        }
    }

    /// This change as an incremental `DiscoveryResponse`.
    pub fn encoded(&self) -> Bytes {
        self.encoded
            .get_or_init(|| {
                let rest = pb::DiscoveryResponse {
                    version_info: self.version.to_string(),
                    nonce: format!("{}{DELTA_NONCE_SUFFIX}", self.version),
                    full_snapshot: false,
                    resources: Vec::new(),
                    removed: self.removed.clone(),
                    more: false,
                    trust_bundle: self.trust_bundle.clone(),
                    ..Default::default()
                };
                encode(&rest, self.upserts.iter().map(|r| &r.encoded()[..]))
            })
            .clone()
    }
}

/// The state as it is now; [`Snapshot`]s are copies of it.
#[derive(Default)]
struct Current {
    version: u64,
    resources: BTreeMap<Arc<str>, Arc<Served>>,
    trust_bundle: Option<pb::TrustBundle>,
    /// Identities of the enrolled pods scheduled on each node (for the CA),
    /// each counted once per pod.
    identities_by_node: HashMap<String, HashMap<Identity, usize>>,
    /// The snapshot of this version, once a stream asked for it.
    snapshot: Option<Arc<Snapshot>>,
    /// The resources by address, to answer on-demand streams.
    addresses: AddressIndex,
}

impl Current {
    fn snapshot(&mut self) -> Arc<Snapshot> {
        self.snapshot
            .get_or_insert_with(|| {
                Arc::new(Snapshot {
                    version: self.version,
                    resources: self.resources.clone(),
                    trust_bundle: self.trust_bundle.clone(),
                    encoded: OnceLock::new(),
                    compressed: OnceLock::new(),
                    on_demand: OnDemandParts::default(),
                })
            })
            .clone()
    }

    /// Serves `resource` under its name, in place of what was.
    fn serve(&mut self, resource: Arc<Served>) {
        if let Some(previous) = self
            .resources
            .insert(resource.shared_name().clone(), resource.clone())
        {
            self.addresses.remove(&previous);
        }
        self.addresses.add(&resource);
    }

    fn withdraw(&mut self, name: &str) {
        if let Some(previous) = self.resources.remove(name) {
            self.addresses.remove(&previous);
        }
    }

    /// Counts the pods of `resource` (an enrolled workload) on its node.
    fn count_identity(&mut self, resource: &Served, pods: isize) {
        let Some((node, identity)) = resource.runs_as() else {
            return;
        };
        let on_node = match self.identities_by_node.get_mut(node) {
            Some(on_node) => on_node,
            None => self.identities_by_node.entry(node.to_string()).or_default(),
        };
        let count = match on_node.get_mut(identity) {
            Some(count) => count,
            None => on_node.entry(identity.clone()).or_default(),
        };
        *count = count.saturating_add_signed(pods);
        if *count == 0 {
            on_node.remove(identity);
            if on_node.is_empty() {
                self.identities_by_node.remove(node);
            }
        }
    }
}

/// What the mesh state's items (workloads, services, policies) were made
/// into. Keyed by the address of the shared item: the translator hands the
/// very same `Arc` again for what did not change, so a change of one pod in
/// 100,000 costs a pointer lookup per item and the work of one resource.
/// The entry keeps its item alive, so no other item can take its address.
#[derive(Default)]
struct Made {
    generation: u64,
    entries: HashMap<usize, MadeEntry, foldhash::fast::RandomState>,
    /// The entries that make each resource name, oldest first (two pods may
    /// claim one uid): the latest is served; when it goes, the one before it
    /// is served again, and the name leaves only with the last. Nearly
    /// always one, held inline.
    makers: HashMap<Arc<str>, SmallVec<[usize; 1]>, foldhash::fast::RandomState>,
}

struct MadeEntry {
    seen: u64,
    /// Held only to keep the item's address its own.
    _item: Item,
    /// What it makes: its own resource, or an equal one served before it
    /// (see [`Served::same_for_ztunnels`]).
    resource: Arc<Served>,
}

impl Made {
    /// Marks the entry made from `item` as seen, or makes its resource
    /// (then it is returned, as new).
    fn visit(&mut self, item: Item) -> Option<(usize, Arc<Served>)> {
        let generation = self.generation;
        let key = item.address();
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.seen = generation;
            return None;
        }
        let resource = Arc::new(Served::new(item.clone()));
        self.makers
            .entry(resource.shared_name().clone())
            .or_default()
            .push(key);
        self.entries.insert(
            key,
            MadeEntry {
                seen: generation,
                _item: item,
                resource: resource.clone(),
            },
        );
        Some((key, resource))
    }
}

pub struct Store {
    current: Mutex<Current>,
    /// Held for the whole of a `replace`, so replaces never interleave.
    made: Mutex<Made>,
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
            current: Mutex::new(Current::default()),
            made: Mutex::new(Made::default()),
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
        self.lock().snapshot()
    }

    /// Resources served now (the mesh's size).
    pub fn resource_count(&self) -> usize {
        self.lock().resources.len()
    }

    /// What answers an on-demand stream's `learn` of `keys` now.
    pub fn learn(&self, keys: &[String]) -> Vec<Arc<Served>> {
        let current = self.lock();
        on_demand::answer(keys, &current.resources, &current.addresses)
    }

    /// Whether an enrolled pod with `identity` is scheduled on `node` now.
    pub fn node_runs(&self, node: &str, identity: &Identity) -> bool {
        self.lock()
            .identities_by_node
            .get(node)
            .is_some_and(|ids| ids.contains_key(identity))
    }

    /// Waits for the first load, then returns the current snapshot and a
    /// receiver of every later change, with no gap between them.
    pub async fn subscribe(&self) -> (Arc<Snapshot>, broadcast::Receiver<Arc<Delta>>) {
        let mut loaded = self.loaded.subscribe();
        // Err only if the sender is gone, which cannot happen while `self` lives.
        let _ = loaded.wait_for(|loaded| *loaded).await;
        let mut current = self.lock();
        (current.snapshot(), self.changes.subscribe())
    }

    /// Replaces the state. Returns the change, or `None` when nothing
    /// changed.
    pub fn replace(&self, state: &MeshState) -> Option<Arc<Delta>> {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        made.generation += 1;
        let generation = made.generation;
        let items = (state.workloads.iter().map(|w| Item::Workload(w.clone())))
            .chain(state.services.iter().map(|s| Item::Service(s.clone())))
            .chain(state.policies.iter().map(|p| Item::Policy(p.clone())));
        let new: Vec<(usize, Arc<Served>)> = items.filter_map(|item| made.visit(item)).collect();
        let mut gone = Vec::new();
        made.entries.retain(|key, entry| {
            let seen = entry.seen == generation;
            if !seen {
                gone.push((*key, entry.resource.clone()));
            }
            seen
        });

        let mut current = self.lock();
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        // New first: an item made again (its name still counted by the
        // entry it replaces) is compared with what was served, and its name
        // does not leave with the old entry.
        for (key, resource) in new {
            current.count_identity(&resource, 1);
            // A new item may make what was served already (a pod changed in
            // a way the mesh does not see, such as the kubelet's status
            // updates, which change only its resourceVersion): not a change,
            // and the version served stays the one of the last change.
            match current.resources.get(resource.name()) {
                Some(previous) if previous.same_for_ztunnels(&resource) => {
                    if let Some(entry) = made.entries.get_mut(&key) {
                        entry.resource = previous.clone();
                    }
                }
                _ => {
                    current.serve(resource.clone());
                    upserts.push(resource);
                }
            }
        }
        let Made {
            entries, makers, ..
        } = &mut *made;
        for (key, resource) in gone {
            current.count_identity(&resource, -1);
            let name = resource.name();
            let remaining = makers.get_mut(name).and_then(|of_name| {
                of_name.retain(|maker| *maker != key);
                of_name.last().and_then(|maker| entries.get(maker))
            });
            match remaining {
                None => {
                    makers.remove(name);
                    current.withdraw(name);
                    removed.push(name.to_string());
                }
                // The name stays; if the gone entry's resource was the one
                // served, the latest remaining maker's is served instead.
                Some(remaining) => {
                    let served = current.resources.get(name);
                    if served.is_some_and(|served| Arc::ptr_eq(served, &resource)) {
                        let replacement = remaining.resource.clone();
                        current.serve(replacement.clone());
                        if *replacement != *resource {
                            upserts.retain(|u: &Arc<Served>| u.name() != name);
                            upserts.push(replacement);
                        }
                    }
                }
            }
        }
        drop(made);
        self.loaded.send_replace(true);
        self.metrics.source_synced.set(1);
        if upserts.is_empty() && removed.is_empty() && current.version > 0 {
            return None;
        }
        upserts.sort_by(|a, b| a.name().cmp(b.name()));
        removed.sort();
        current.version += 1;
        current.snapshot = None;
        let delta = self.publish(&mut current, upserts, removed, None);
        tracing::info!(
            version = current.version,
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
        current.trust_bundle = Some(bundle.clone());
        current.snapshot = None;
        // Before the first version the bundle simply joins the snapshot; no
        // stream has been served anything yet.
        if current.version == 0 {
            return;
        }
        current.version += 1;
        let version = current.version;
        self.publish(&mut current, Vec::new(), Vec::new(), Some(bundle));
        tracing::info!(version, "trust bundle updated");
    }

    /// Makes the change to the version now in `current` known to every
    /// stream.
    fn publish(
        &self,
        current: &mut Current,
        upserts: Vec<Arc<Served>>,
        removed: Vec<String>,
        trust_bundle: Option<pb::TrustBundle>,
    ) -> Arc<Delta> {
        let version = current.version;
        let delta = Arc::new(Delta {
            version,
            created: std::time::Instant::now(),
            upserts,
            removed,
            trust_bundle,
            encoded: OnceLock::new(),
            compressed: OnceLock::new(),
        });
        self.metrics
            .configuration_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        // Err only when no stream is listening.
        let _ = self.changes.send(delta.clone());
        delta
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // Nothing in the store panics between the writes to one version, so
        // a poisoned lock still holds a whole one.
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
mod tests;
