//! The pods this ztunnel captures.
//!
//! A pod arrives over the [`handoff`] socket with its network namespace.
//! Adding it installs the [`capture`] rules in that namespace and opens the
//! three listeners there; only then is the add acknowledged, so a pod never
//! runs uncaptured. Removing it closes the listeners (open connections run
//! to their end) and removes the rules.
//!
//! Two more ways in, both through the pod records the CNI plugin keeps on
//! the node ([`kanava_handoff::records`]):
//! - [`PodRegistry::restore`] at start-up: a pod whose namespace still
//!   holds our rules was captured by an earlier ztunnel (crash, upgrade).
//!   The rules stayed while no ztunnel ran, so its traffic failed closed;
//!   now its listeners open again.
//! - [`PodRegistry::follow_discovery`]: a running pod whose namespace joins
//!   the mesh is captured, one that leaves is released, without a restart.
//!   Pods that discovery does not know (yet) are left as they are: a pod
//!   handed over by the CNI plugin may reach the ztunnel before its workload
//!   does. A pod without a record (it started before Kanava was installed)
//!   is looked for among the node's namespaces by its addresses
//!   ([`discover`]).

pub mod capture;
pub mod discover;
pub mod guard;
pub mod handoff;
pub mod nft_counters;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kanava_handoff::records::{PodRecord, RecordDir};
use kanava_mesh::{Identity, TunnelProtocol, Workload, names, ports};
use kanava_netns::NetNs;
use kanava_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::metrics::DroppedLabels;
use crate::proxy::{CapturedPod, PodInfo, PodListeners, Proxy, socket};
use crate::workloads::WorkloadStore;

struct Entry {
    pod: Arc<CapturedPod>,
    /// The sandbox (CNI container id) whose namespace is captured; empty
    /// when unknown (a pod found on the node, or handed over by an older
    /// plugin).
    sandbox: String,
    stop: CancellationToken,
    /// The non-TCP guard in place in the pod ([`guard`]); `None` while it
    /// is the one a predecessor left (an upgrade or a restart keeps it, so
    /// no opened port closes meanwhile) and discovery has not said yet.
    guard: Option<guard::Opened>,
    /// Its rules are being removed: it is still held until they are gone.
    releasing: bool,
}

pub struct PodRegistry {
    proxy: Arc<Proxy>,
    pods: Mutex<HashMap<String, Entry>>,
    records: RecordDir,
    /// Where the node keeps pods' network namespaces.
    netns_dir: PathBuf,
    /// Workloads (`uid@resourceVersion`) that joined the mesh and that this
    /// ztunnel already tried to capture from discovery: tried again only
    /// when the workload changes, not on every update of the mesh (a pod
    /// whose capture fails would otherwise cost a namespace search or an
    /// iptables run per update). Pruned to the workloads that still exist.
    attempted: Mutex<HashSet<String>>,
    /// Held across every add and remove: a pod handed over by the CNI
    /// plugin may at the same moment be found by [`Self::follow_discovery`],
    /// and setting one pod up twice would open its listeners twice.
    changing: tokio::sync::Mutex<()>,
}

impl PodRegistry {
    pub fn new(proxy: Arc<Proxy>, records: RecordDir, netns_dir: PathBuf) -> Self {
        PodRegistry {
            proxy,
            pods: Mutex::new(HashMap::new()),
            records,
            netns_dir,
            attempted: Mutex::new(HashSet::new()),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// The trust domain handed-over pods' identities are in.
    pub fn trust_domain(&self) -> &str {
        &self.proxy.config.trust_domain
    }

    /// Captures a pod. Adding a pod that is already captured succeeds
    /// without doing anything.
    pub async fn add(&self, pod: HandedPod, netns: NetNs) -> Result<(), Error> {
        self.add_pod(pod, netns, FirstCertificate::OnceDiscovered)
            .await
    }

    async fn add_pod(
        &self,
        pod: HandedPod,
        netns: NetNs,
        first_certificate: FirstCertificate,
    ) -> Result<(), Error> {
        let _changing = self.changing.lock().await;
        let HandedPod {
            info,
            uid,
            identity,
            ips,
        } = pod;
        let held = self.lock().get(&uid).map(|entry| entry.sandbox.clone());
        match held {
            Some(held) if !is_other_sandbox(&held, &info.container_id) => {
                tracing::info!(pod = %format!("{}/{}", info.namespace, info.name), "pod already captured");
                return Ok(());
            }
            // The runtime made the pod a new sandbox (the old one died):
            // the new namespace must be captured, not taken for the old.
            Some(held) => {
                tracing::info!(pod = %format!("{}/{}", info.namespace, info.name), old = %held, new = %info.container_id, "pod has a new sandbox; capturing it instead of the old one");
                self.release(&uid).await?;
            }
            None => {}
        }
        let netns = Arc::new(netns);
        let for_setup = netns.clone();
        let known = self.wanted_guard(&uid);
        let setup = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            capture::install(&for_setup)?;
            let guard = match known {
                Some(opened) => {
                    guard::install(&for_setup, &opened)?;
                    Some(opened)
                }
                // Served before (a restart, an upgrade): the guard in place
                // stays until discovery says what it should be.
                None if guard::present(&for_setup) => None,
                // New and not yet described: STRICT with nothing opened,
                // failing closed.
                None => {
                    let strict = Some(Vec::new());
                    guard::install(&for_setup, &strict)?;
                    Some(strict)
                }
            };
            let listeners = for_setup.run(|| -> std::io::Result<PodListeners> {
                socket::migrate_pending_connections();
                Ok(PodListeners {
                    outbound: socket::bind_pod_listener(ports::OUTBOUND)?,
                    inbound_plaintext: socket::bind_pod_listener(ports::INBOUND_PLAINTEXT)?,
                    hbone: socket::bind_pod_listener(ports::HBONE)?,
                })
            })?;
            let listeners = listeners.map_err(Error::io("open listeners in the pod"))?;
            Ok((listeners, guard))
        })
        .await
        .map_err(|source| Error::TaskFailed {
            task: "setting up the pod's capture",
            source,
        })?;
        let (listeners, guard) = setup?;

        self.proxy.certs.track(
            &identity,
            (first_certificate == FirstCertificate::OnceDiscovered).then_some(uid.as_str()),
        );
        let hbone_tls = match kanava_tls::hbone_server_config(
            self.proxy.certs.resolver(&identity),
            &self.proxy.trust.bundle,
        ) {
            Ok(config) => config,
            Err(error) => {
                self.proxy.certs.untrack(&identity);
                return Err(error.into());
            }
        };
        let pod = Arc::new(CapturedPod {
            info: PodInfo {
                uid: uid.clone(),
                name: info.name.clone(),
                namespace: info.namespace.clone(),
                identity: identity.clone(),
                ips,
            },
            netns,
            hbone_tls,
            connections: Default::default(),
        });
        let stop = CancellationToken::new();
        let worker = match self.proxy.serve_pod(pod.clone(), listeners, stop.clone()) {
            Ok(worker) => worker,
            Err(error) => {
                self.proxy.certs.untrack(&identity);
                return Err(error);
            }
        };
        self.lock().insert(
            uid,
            Entry {
                pod: pod.clone(),
                sandbox: info.container_id.clone(),
                stop: stop.clone(),
                guard,
                releasing: false,
            },
        );
        self.proxy.metrics.pods_captured.inc();
        tracing::info!(pod = %pod.info.display_name(), %identity, ips = ?pod.info.ips, "pod captured");
        // On the pod's worker: its first connection most likely runs there,
        // and finds the connections warmed there.
        worker.spawn(crate::proxy::outbound::warm_up(
            self.proxy.clone(),
            pod,
            stop,
        ));
        Ok(())
    }

    /// Releases a pod. Unknown pods succeed. With a `sandbox`, a pod held
    /// for another sandbox is kept: the runtime's DEL of a dead sandbox
    /// (sent again, or for an ADD that failed) must not release the pod's
    /// live one. The pod counts as captured (for [`Self::check`]) until its
    /// rules are gone, so whoever waits for the release sees it done.
    pub async fn remove(&self, uid: &str, sandbox: Option<&str>) -> Result<(), Error> {
        let _changing = self.changing.lock().await;
        if let Some(sandbox) = sandbox
            && let Some(entry) = self.lock().get(uid)
            && is_other_sandbox(&entry.sandbox, sandbox)
        {
            tracing::info!(pod = %entry.pod.info.display_name(), held = %entry.sandbox, asked = %sandbox, "release for another sandbox of the pod ignored");
            return Ok(());
        }
        self.release(uid).await
    }

    /// Releases a pod; the caller holds `changing`.
    async fn release(&self, uid: &str) -> Result<(), Error> {
        let Some((pod, stop)) = self.lock().get_mut(uid).map(|entry| {
            entry.releasing = true;
            (entry.pod.clone(), entry.stop.clone())
        }) else {
            return Ok(());
        };
        stop.cancel();
        self.proxy.pool.remove_pod(uid);
        self.proxy.certs.untrack(&pod.info.identity);
        let netns = pod.netns.clone();
        let result = tokio::task::spawn_blocking(move || {
            guard::remove(&netns);
            capture::remove(&netns)
        })
        .await;
        self.lock().remove(uid);
        self.proxy.metrics.pods_captured.dec();
        let result = result.map_err(|source| Error::TaskFailed {
            task: "releasing the pod's capture",
            source,
        })?;
        if let Err(error) = result {
            // The namespace may be gone with the pod; nothing is left to undo.
            tracing::info!(pod = %pod.info.display_name(), %error, "capture rules not removed");
        }
        tracing::info!(pod = %pod.info.display_name(), "pod released");
        Ok(())
    }

    /// Succeeds when the pod is captured and its rules are in place.
    pub async fn check(&self, uid: &str) -> Result<(), Error> {
        let not_captured = |reason: &str| Error::NotCaptured {
            uid: uid.to_string(),
            reason: reason.to_string(),
        };
        let netns = match self.lock().get(uid) {
            // Held until its release is done.
            Some(entry) if entry.releasing => return Ok(()),
            Some(entry) => entry.pod.netns.clone(),
            None => return Err(not_captured("this ztunnel does not hold it")),
        };
        let present = tokio::task::spawn_blocking(move || capture::rules_in_place(&netns))
            .await
            .map_err(|source| Error::TaskFailed {
                task: "checking the pod's capture",
                source,
            })??;
        if present {
            Ok(())
        } else {
            Err(not_captured("its capture rules are gone"))
        }
    }

    /// Captures again every recorded pod whose namespace still holds our
    /// rules: the pods an earlier ztunnel on this node served. Returns how
    /// many.
    pub async fn restore(&self) -> usize {
        let uids = match self.records.uids() {
            Ok(uids) => uids,
            Err(error) => {
                tracing::error!(%error, "cannot read the pod records; pods captured before this start are not served");
                return 0;
            }
        };
        let mut restored = 0;
        for uid in uids {
            let record = match self.records.read(&uid) {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, "pod record skipped");
                    continue;
                }
            };
            let netns = match open_netns(&record) {
                Ok(netns) => netns,
                // Its pod is gone (or going): nothing to serve.
                Err(error) => {
                    tracing::info!(pod = %record_name(&record), %error, "recorded pod not restored");
                    continue;
                }
            };
            let netns = Arc::new(netns);
            let probe = netns.clone();
            let captured_before =
                tokio::task::spawn_blocking(move || capture::has_rules(&probe, "iptables-save"))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(false);
            if !captured_before {
                continue;
            }
            let Ok(netns) = Arc::try_unwrap(netns) else {
                continue;
            };
            match self.add_recorded(&record, netns).await {
                Ok(()) => restored += 1,
                Err(error) => {
                    tracing::error!(pod = %record_name(&record), %error, "pod captured before this start not restored; its traffic stays blocked");
                }
            }
        }
        tracing::info!(restored, "pods captured before this start served again");
        restored
    }

    /// Keeps the captured pods of this node in step with discovery until
    /// `shutdown`: captures recorded pods that joined the mesh and releases
    /// pods that left it.
    pub async fn follow_discovery(
        self: Arc<Self>,
        workloads: Arc<WorkloadStore>,
        node: String,
        shutdown: CancellationToken,
    ) {
        let mut updates = workloads.subscribe();
        tokio::select! {
            () = workloads.wait_ready() => {}
            () = shutdown.cancelled() => return,
        }
        loop {
            self.reconcile(&workloads, &node).await;
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn reconcile(&self, workloads: &WorkloadStore, node: &str) {
        let mine: Vec<_> = workloads
            .workloads()
            .into_iter()
            .filter(|w| w.node == node)
            .collect();
        let attempt_key = |w: &Workload| format!("{}@{}", w.uid, w.resource_version);
        let current: HashSet<String> = mine.iter().map(|w| attempt_key(w)).collect();
        self.attempted_lock().retain(|key| current.contains(key));
        for workload in mine {
            let wanted = workload.protocol == TunnelProtocol::Hbone;
            if !wanted {
                // Out of the mesh: joining again is a new attempt, even at
                // the same version (a namespace label is not the pod's).
                self.attempted_lock().remove(&attempt_key(&workload));
            }
            let held = self.lock().contains_key(&workload.uid);
            let pod = workload.display_name();
            if wanted && !held {
                if !self.attempted_lock().insert(attempt_key(&workload)) {
                    continue;
                }
                let record = match self.records.read(&workload.uid) {
                    Ok(Some(record)) => record,
                    Ok(None) => match self.discover(&workload).await {
                        Some(record) => record,
                        None => continue,
                    },
                    Err(error) => {
                        tracing::warn!(%pod, %error, "pod joined the mesh but its record is unusable");
                        continue;
                    }
                };
                let result = match open_netns(&record) {
                    Ok(netns) => self.add_recorded(&record, netns).await,
                    Err(error) => Err(error),
                };
                match result {
                    Ok(()) => tracing::info!(%pod, "running pod joined the mesh"),
                    Err(error) => {
                        tracing::warn!(%pod, %error, "running pod joined the mesh but cannot be captured");
                    }
                }
            } else if wanted && held {
                self.follow_guard(&workload).await;
            } else if !wanted && held {
                match self.remove(&workload.uid, None).await {
                    Ok(()) => tracing::info!(%pod, "pod left the mesh"),
                    Err(error) => {
                        tracing::warn!(%pod, %error, "pod left the mesh but release failed")
                    }
                }
            }
        }
    }

    /// The guard discovery asks for the pod, if discovery knows it.
    fn wanted_guard(&self, uid: &str) -> Option<guard::Opened> {
        let workload = self.proxy.workloads.find_by_uid(uid)?;
        Some(workload.non_tcp_guard().map(<[_]>::to_vec))
    }

    /// Puts the guard the workload asks for in place, when it changed (its
    /// namespace's mode, its annotation) or is still a predecessor's. Runs
    /// for every held pod on every discovery update: the common case, no
    /// change, costs one look at the table.
    async fn follow_guard(&self, workload: &Workload) {
        let wanted = workload.non_tcp_guard();
        let differs = || match self.lock().get(&workload.uid) {
            Some(entry)
                if !entry.releasing
                    && entry.guard.as_ref().map(Option::as_deref) != Some(wanted) =>
            {
                Some(entry.pod.netns.clone())
            }
            _ => None,
        };
        if differs().is_none() {
            return;
        }
        let _changing = self.changing.lock().await;
        let Some(netns) = differs() else {
            return;
        };
        let wanted = wanted.map(<[_]>::to_vec);
        let rules = wanted.clone();
        let result = tokio::task::spawn_blocking(move || guard::install(&netns, &rules)).await;
        let pod = workload.display_name();
        match result {
            Ok(Ok(())) => {
                tracing::info!(%pod, opened = %describe_guard(&wanted), "non-TCP inbound guard changed");
                if let Some(entry) = self.lock().get_mut(&workload.uid) {
                    entry.guard = Some(wanted);
                }
            }
            // Tried again on the next discovery update.
            Ok(Err(error)) => {
                tracing::warn!(%pod, %error, "non-TCP inbound guard not changed; the one in place stays")
            }
            Err(error) => tracing::warn!(%pod, %error, "non-TCP inbound guard not changed"),
        }
    }

    /// Packets each captured pod's guard dropped so far.
    pub async fn guard_drops(&self) -> Vec<(Arc<CapturedPod>, guard::Dropped)> {
        let guarded: Vec<Arc<CapturedPod>> = self
            .lock()
            .values()
            // Everything but PERMISSIVE: an inherited guard may drop too.
            .filter(|entry| entry.guard != Some(None))
            .map(|entry| entry.pod.clone())
            .collect();
        let mut counts = Vec::with_capacity(guarded.len());
        for pod in guarded {
            let netns = pod.netns.clone();
            match tokio::task::spawn_blocking(move || guard::dropped(&netns)).await {
                Ok(Ok(dropped)) => counts.push((pod, dropped)),
                Ok(Err(error)) => {
                    tracing::debug!(pod = %pod.info.display_name(), %error, "guard counters unreadable")
                }
                Err(_) => {}
            }
        }
        counts
    }

    /// Adds what each STRICT pod's guard dropped to
    /// `kanava_non_tcp_dropped_packets_total` every `every`, until
    /// `shutdown`. The rules count; this reads their counters (a new rule
    /// set starts again from zero, which is taken as a reset).
    pub async fn count_guard_drops(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        // Per (uid, protocol): the counter last read, and the labels it is
        // reported under (removed with the pod, so pods that come and go
        // do not pile up in the metric).
        let mut last: HashMap<(String, &'static str), (u64, DroppedLabels)> = HashMap::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let mut seen = HashSet::new();
            let metric = &self.proxy.metrics.non_tcp_dropped;
            for (pod, dropped) in self.guard_drops().await {
                for (protocol, count) in [("udp", dropped.udp), ("sctp", dropped.sctp)] {
                    let key = (pod.info.uid.clone(), protocol);
                    let labels = DroppedLabels {
                        pod: pod.info.display_name(),
                        protocol,
                    };
                    let previous = last
                        .insert(key.clone(), (count, labels.clone()))
                        .map_or(0, |(previous, _)| previous);
                    seen.insert(key);
                    // Fewer than last time: the rules were replaced, and
                    // their counters started again.
                    let added = count.checked_sub(previous).unwrap_or(count);
                    if added > 0 {
                        metric.get_or_create(&labels).inc_by(added);
                    }
                }
            }
            last.retain(|key, (_, labels)| {
                let keep = seen.contains(key);
                if !keep {
                    metric.remove(labels);
                }
                keep
            });
        }
    }

    /// Looks for the namespace of a pod without a record and records it.
    async fn discover(&self, workload: &Workload) -> Option<PodRecord> {
        let pod = workload.display_name();
        let (dir, ips) = (self.netns_dir.clone(), workload.ips.clone());
        let found =
            match tokio::task::spawn_blocking(move || discover::find_netns(&dir, &ips)).await {
                Ok(found) => found,
                Err(error) => {
                    tracing::error!(%pod, %error, "searching the node's network namespaces failed");
                    return None;
                }
            };
        let (path, netns) = match found {
            discover::Found::One(found) => found,
            discover::Found::None => {
                tracing::info!(%pod, dir = %self.netns_dir.display(), "pod joined the mesh, but no record and no network namespace of this node holds its addresses");
                return None;
            }
            discover::Found::Ambiguous(paths) => {
                tracing::warn!(%pod, ?paths, "several network namespaces hold the pod's addresses; it is not captured");
                return None;
            }
        };
        let record = PodRecord {
            uid: workload.uid.clone(),
            container_id: String::new(),
            name: workload.name.clone(),
            namespace: workload.namespace.clone(),
            service_account: workload.service_account.clone(),
            ips: workload.ips.iter().map(ToString::to_string).collect(),
            netns_inode: match netns.inode() {
                Ok(inode) => inode,
                Err(error) => {
                    tracing::warn!(%pod, netns = %path.display(), %error, "cannot identify the pod's network namespace");
                    return None;
                }
            },
            netns: path,
        };
        tracing::info!(%pod, netns = %record.netns.display(), "found the network namespace of a pod without a record (it started before Kanava was installed)");
        // Recorded, so that a restart finds it like any other pod.
        if let Err(error) = self.records.write(&record) {
            tracing::warn!(%pod, %error, "cannot record the pod");
        }
        Some(record)
    }

    async fn add_recorded(&self, record: &PodRecord, netns: NetNs) -> Result<(), Error> {
        let info = pb::PodInfo {
            uid: record.uid.clone(),
            name: record.name.clone(),
            namespace: record.namespace.clone(),
            service_account: record.service_account.clone(),
            ips: record.ips.clone(),
            container_id: record.container_id.clone(),
        };
        let pod = validate(info, self.trust_domain())?;
        // Captured before this start: the control plane knew it then.
        self.add_pod(pod, netns, FirstCertificate::Now).await
    }

    /// Every captured pod.
    pub fn list(&self) -> Vec<Arc<CapturedPod>> {
        let mut pods: Vec<_> = self.lock().values().map(|e| e.pod.clone()).collect();
        pods.sort_by_key(|p| p.info.display_name());
        pods
    }

    fn attempted_lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.attempted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The uids of the pods captured now.
    pub fn uids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// A captured pod.
    pub fn get(&self, uid: &str) -> Option<Arc<CapturedPod>> {
        self.lock().get(uid).map(|entry| entry.pod.clone())
    }

    /// Closes every pod's listeners (leaving for a successor, whose
    /// listeners of the same ports take over; the rules stay). Returns how
    /// many listeners were closed.
    pub fn stop_listening(&self) -> u64 {
        let pods = self.lock();
        for entry in pods.values() {
            entry.stop.cancel();
        }
        pods.len() as u64 * 3
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `udp/53,udp/5353`, `none`, or `all (not STRICT)`.
fn describe_guard(opened: &guard::Opened) -> String {
    match opened {
        None => "all (not STRICT)".into(),
        Some(ports) if ports.is_empty() => "none".into(),
        Some(ports) => ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// Whether two sandbox ids name different sandboxes; an unknown (empty)
/// one is taken to be the same, as before sandboxes were told apart.
fn is_other_sandbox(held: &str, other: &str) -> bool {
    !held.is_empty() && !other.is_empty() && held != other
}

fn open_netns(record: &PodRecord) -> Result<NetNs, Error> {
    let file = record.open_netns()?;
    Ok(NetNs::from_fd(
        file.into(),
        format!("pod {}", record_name(record)),
    )?)
}

fn record_name(record: &PodRecord) -> String {
    format!("{}/{}", record.namespace, record.name)
}

/// When a newly served pod's certificate is first asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FirstCertificate {
    /// Once this ztunnel's discovery knows the pod: a pod the CNI plugin
    /// just handed over may be newer than the control plane's view of the
    /// cluster, which refuses to sign for a pod it does not know.
    OnceDiscovered,
    /// At once: a pod served before this start, which the control plane
    /// knew then (a restart, or an upgrade, where every moment without a
    /// certificate is a refused connection).
    Now,
}

/// A pod as handed over, checked: what it says it is, and the identity and
/// addresses that follow from it.
#[derive(Debug)]
pub struct HandedPod {
    pub info: pb::PodInfo,
    pub uid: String,
    pub identity: Identity,
    pub ips: Vec<IpAddr>,
}

/// Checks a handoff's pod description and derives its identity.
pub fn validate(info: pb::PodInfo, trust_domain: &str) -> Result<HandedPod, Error> {
    let (uid, identity, ips) = check(&info, trust_domain)?;
    Ok(HandedPod {
        info,
        uid,
        identity,
        ips,
    })
}

fn check(info: &pb::PodInfo, trust_domain: &str) -> Result<(String, Identity, Vec<IpAddr>), Error> {
    let bad = |reason: String| Error::InvalidPod {
        pod: format!("{}/{} (uid {:?})", info.namespace, info.name, info.uid),
        reason,
    };
    if info.uid.is_empty() || info.name.is_empty() || info.namespace.is_empty() {
        return Err(bad("pod uid, name and namespace are required".into()));
    }
    let service_account = if info.service_account.is_empty() {
        names::DEFAULT_SERVICE_ACCOUNT
    } else {
        &info.service_account
    };
    let identity = Identity::new(trust_domain, &info.namespace, service_account)
        .map_err(|e| bad(e.to_string()))?;
    let ips = info
        .ips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map(|ip| ip.to_canonical())
                .map_err(|_| bad(format!("pod IP {ip:?} is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ips.is_empty() {
        return Err(bad("it has no IP".into()));
    }
    Ok((info.uid.clone(), identity, ips))
}
