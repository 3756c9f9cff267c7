//! The pods this ztunnel captures.
//!
//! A pod arrives over the [`handoff`] socket with its network namespace.
//! Adding it installs the [`capture`] rules in that namespace and opens the
//! three listeners there; only then is the add acknowledged, so a pod never
//! runs uncaptured. Removing it closes the listeners (open connections run
//! to their end) and removes the rules.

pub mod capture;
pub mod handoff;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use kanava_mesh::{Identity, names, ports};
use kanava_netns::NetNs;
use kanava_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::proxy::{CapturedPod, PodInfo, PodListeners, Proxy, socket};

struct Entry {
    pod: Arc<CapturedPod>,
    stop: CancellationToken,
}

pub struct PodRegistry {
    proxy: Arc<Proxy>,
    pods: Mutex<HashMap<String, Entry>>,
}

impl PodRegistry {
    pub fn new(proxy: Arc<Proxy>) -> Self {
        PodRegistry {
            proxy,
            pods: Mutex::new(HashMap::new()),
        }
    }

    /// The trust domain handed-over pods' identities are in.
    pub fn trust_domain(&self) -> &str {
        &self.proxy.config.trust_domain
    }

    /// Captures a pod. Adding a pod that is already captured succeeds
    /// without doing anything.
    pub async fn add(&self, pod: HandedPod, netns: NetNs) -> Result<(), Error> {
        let HandedPod {
            info,
            uid,
            identity,
            ips,
        } = pod;
        if self.lock().contains_key(&uid) {
            tracing::info!(pod = %format!("{}/{}", info.namespace, info.name), "pod already captured");
            return Ok(());
        }
        let netns = Arc::new(netns);
        let for_setup = netns.clone();
        let listeners = tokio::task::spawn_blocking(move || -> Result<PodListeners, Error> {
            capture::install(&for_setup)?;
            let listeners = for_setup.run(|| -> std::io::Result<PodListeners> {
                Ok(PodListeners {
                    outbound: socket::bind_pod_listener(ports::OUTBOUND)?,
                    inbound_plaintext: socket::bind_pod_listener(ports::INBOUND_PLAINTEXT)?,
                    hbone: socket::bind_pod_listener(ports::HBONE)?,
                })
            })?;
            listeners.map_err(Error::io("open listeners in the pod"))
        })
        .await
        .map_err(|source| Error::TaskFailed {
            task: "setting up the pod's capture",
            source,
        })??;

        self.proxy.certs.track(&identity);
        let hbone_tls = match kanava_tls::hbone_server_config(
            self.proxy.certs.resolver(&identity),
            &self.proxy.roots,
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
        if let Err(error) = self.proxy.serve_pod(pod.clone(), listeners, stop.clone()) {
            self.proxy.certs.untrack(&identity);
            return Err(error);
        }
        self.lock().insert(
            uid,
            Entry {
                pod: pod.clone(),
                stop,
            },
        );
        self.proxy.metrics.pods_captured.inc();
        tracing::info!(pod = %pod.info.display_name(), %identity, ips = ?pod.info.ips, "pod captured");
        Ok(())
    }

    /// Releases a pod. Unknown pods succeed.
    pub async fn remove(&self, uid: &str) -> Result<(), Error> {
        let Some(entry) = self.lock().remove(uid) else {
            return Ok(());
        };
        entry.stop.cancel();
        self.proxy.certs.untrack(&entry.pod.info.identity);
        self.proxy.metrics.pods_captured.dec();
        let netns = entry.pod.netns.clone();
        let result = tokio::task::spawn_blocking(move || capture::remove(&netns))
            .await
            .map_err(|source| Error::TaskFailed {
                task: "releasing the pod's capture",
                source,
            })?;
        if let Err(error) = result {
            // The namespace may be gone with the pod; nothing is left to undo.
            tracing::info!(pod = %entry.pod.info.display_name(), %error, "capture rules not removed");
        }
        tracing::info!(pod = %entry.pod.info.display_name(), "pod released");
        Ok(())
    }

    /// Every captured pod.
    pub fn list(&self) -> Vec<Arc<CapturedPod>> {
        let mut pods: Vec<_> = self.lock().values().map(|e| e.pod.clone()).collect();
        pods.sort_by_key(|p| p.info.display_name());
        pods
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }
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
