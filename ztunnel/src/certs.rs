//! Workload certificates: one key pair and certificate per identity that
//! runs on this node.
//!
//! A certificate is requested when the first pod of an identity arrives and
//! dropped when the last one leaves. Each is renewed when half of its
//! remaining lifetime has passed, with a new key; a failed renewal is
//! retried with backoff and logged. An expired certificate is never handed
//! out, even if renewal keeps failing: the connections that need it fail
//! instead.
//!
//! A certificate is also replaced as soon as discovery says the mesh signs
//! under another certificate (a root rotation), spread over a few seconds
//! so a node's identities do not all ask at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kanava_mesh::Identity;
use kanava_proto::v1 as pb;
use kanava_tls::rustls::server::{ClientHello, ResolvesServerCert};
use kanava_tls::rustls::sign::CertifiedKey;
use kanava_tls::{CertificateRequest, WorkloadCert};
use tokio::sync::watch;

use crate::Error;
use crate::backoff::Backoff;
use crate::control_plane::ControlPlane;
use crate::metrics::{IdentityLabels, Metrics, ResultLabels};
use crate::trust::Trust;
use crate::workloads::WorkloadStore;

/// Longest wait before replacing a certificate whose signer the mesh no
/// longer signs with: each waits a random part of it.
const REISSUE_SPREAD: Duration = Duration::from_secs(3);

/// Longest wait, before a pod's first certificate request, for discovery to
/// know the pod: the control plane refuses to sign for a pod it does not
/// know on this node, so asking earlier only earns a refusal.
const DISCOVERY_WAIT: Duration = Duration::from_secs(10);

/// A certificate and the signer it was issued under.
#[derive(Clone)]
struct Issued {
    cert: WorkloadCert,
    /// Fingerprint of the certificate that signed it; empty from a control
    /// plane that does not say.
    signer: String,
}

struct Entry {
    users: usize,
    cert: watch::Receiver<Option<Issued>>,
    renewal: tokio::task::JoinHandle<()>,
}

/// One identity's certificate, as `config_dump` shows it.
pub struct CertificateInfo {
    pub identity: Identity,
    pub not_after: Option<SystemTime>,
    pub signer: Option<String>,
}

pub struct CertManager {
    control_plane: ControlPlane,
    ttl: Option<Duration>,
    metrics: Arc<Metrics>,
    trust: Arc<Trust>,
    workloads: Arc<WorkloadStore>,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl CertManager {
    pub fn new(
        control_plane: ControlPlane,
        ttl: Option<Duration>,
        metrics: Arc<Metrics>,
        trust: Arc<Trust>,
        workloads: Arc<WorkloadStore>,
    ) -> Self {
        CertManager {
            control_plane,
            ttl,
            metrics,
            trust,
            workloads,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Counts the certificates under another signer than the mesh's now
    /// (the metric `kanava_certificates_superseded`).
    pub fn count_superseded(&self) {
        let signer = self.trust.signer();
        let superseded = self
            .lock()
            .values()
            .filter(|entry| {
                entry
                    .cert
                    .borrow()
                    .as_ref()
                    .is_some_and(|issued| superseded(&issued.signer, &signer))
            })
            .count();
        self.metrics
            .certificates_superseded
            .set(i64::try_from(superseded).unwrap_or(i64::MAX));
    }

    /// A pod with `identity` arrived: make sure a certificate is (being)
    /// obtained for it; with `pod_uid`, asked for once discovery knows that
    /// pod.
    pub fn track(&self, identity: &Identity, pod_uid: Option<&str>) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(identity) {
            entry.users += 1;
            return;
        }
        let (tx, rx) = watch::channel(None);
        let first_request =
            pod_uid.map(|uid| wait_for_discovery(self.workloads.clone(), uid.to_string()));
        let renewal = tokio::spawn(keep_fresh(
            first_request,
            self.control_plane.clone(),
            self.ttl,
            self.metrics.clone(),
            self.trust.signer_changes(),
            identity.clone(),
            tx,
        ));
        entries.insert(
            identity.clone(),
            Entry {
                users: 1,
                cert: rx,
                renewal,
            },
        );
    }

    /// A pod with `identity` left; the last one takes the certificate along.
    pub fn untrack(&self, identity: &Identity) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(identity) {
            entry.users -= 1;
            if entry.users == 0 {
                entry.renewal.abort();
                entries.remove(identity);
                self.metrics.certificate_expiry.remove(&IdentityLabels {
                    identity: identity.to_string(),
                });
                tracing::info!(%identity, "no pod of this identity remains; certificate dropped");
            }
        }
    }

    /// Waits until every identity tracked now has a certificate, at most
    /// `timeout`; returns how many still have none.
    pub async fn wait_all_issued(&self, timeout: Duration) -> usize {
        let receivers: Vec<_> = self.lock().values().map(|e| e.cert.clone()).collect();
        let all = async {
            for mut rx in receivers.clone() {
                // Err: the identity left meanwhile; nothing to wait for.
                let _ = rx.wait_for(Option::is_some).await;
            }
        };
        let _ = tokio::time::timeout(timeout, all).await;
        receivers.iter().filter(|rx| rx.borrow().is_none()).count()
    }

    /// The valid certificate for `identity`, if there is one now.
    pub fn current(&self, identity: &Identity) -> Option<WorkloadCert> {
        let entries = self.lock();
        let cert = entries.get(identity)?.cert.borrow().as_ref()?.cert.clone();
        (!cert.expired_at(SystemTime::now())).then_some(cert)
    }

    /// The valid certificate for `identity`, waiting up to `timeout` for one
    /// to be issued.
    pub async fn get(&self, identity: &Identity, timeout: Duration) -> Result<WorkloadCert, Error> {
        let mut rx = self
            .lock()
            .get(identity)
            .map(|entry| entry.cert.clone())
            .ok_or_else(|| Error::NoCertificate {
                identity: identity.to_string(),
                reason: "no pod with this identity is captured on this node".into(),
            })?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = rx
                .borrow_and_update()
                .as_ref()
                .map(|issued| &issued.cert)
                .filter(|cert| !cert.expired_at(SystemTime::now()))
                .cloned();
            if let Some(cert) = current {
                return Ok(cert);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    return Err(Error::NoCertificate {
                        identity: identity.to_string(),
                        reason: "the last pod of this identity left the node".into(),
                    });
                }
                Err(_) => {
                    return Err(Error::NoCertificate {
                        identity: identity.to_string(),
                        reason: format!(
                            "none issued within {timeout:?}; is the control plane reachable from \
                             this node (see the ztunnel's certificate errors)?"
                        ),
                    });
                }
            }
        }
    }

    /// Serves `identity`'s current certificate to TLS handshakes.
    pub fn resolver(self: &Arc<Self>, identity: &Identity) -> Arc<dyn ResolvesServerCert> {
        Arc::new(IdentityResolver {
            manager: self.clone(),
            identity: identity.clone(),
        })
    }

    /// Identities, the end of validity of their current certificate and
    /// its signer.
    pub fn list(&self) -> Vec<CertificateInfo> {
        let entries = self.lock();
        let mut list: Vec<_> = entries
            .iter()
            .map(|(id, entry)| {
                let issued = entry.cert.borrow();
                CertificateInfo {
                    identity: id.clone(),
                    not_after: issued.as_ref().map(|i| i.cert.not_after()),
                    signer: issued
                        .as_ref()
                        .map(|i| i.signer.clone())
                        .filter(|s| !s.is_empty()),
                }
            })
            .collect();
        list.sort_by(|a, b| a.identity.cmp(&b.identity));
        list
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct IdentityResolver {
    manager: Arc<CertManager>,
    identity: Identity,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.manager
            .current(&self.identity)
            .map(|cert| cert.certified_key())
    }
}

/// Whether a certificate issued under `issued_under` must be replaced now
/// that the mesh signs under `mesh_signer` (both known and different).
fn superseded(issued_under: &str, mesh_signer: &str) -> bool {
    !issued_under.is_empty() && !mesh_signer.is_empty() && issued_under != mesh_signer
}

/// Waits until discovery knows the pod `uid`, at most [`DISCOVERY_WAIT`].
async fn wait_for_discovery(workloads: Arc<WorkloadStore>, uid: String) {
    let mut updates = workloads.subscribe();
    let deadline = tokio::time::sleep(DISCOVERY_WAIT);
    tokio::pin!(deadline);
    while workloads.find_by_uid(&uid).is_none() {
        tokio::select! {
            changed = updates.changed() => if changed.is_err() {
                return;
            },
            _ = &mut deadline => {
                tracing::warn!(pod_uid = %uid, wait = ?DISCOVERY_WAIT, "discovery does not know this pod yet; asking for its certificate anyway");
                return;
            }
        }
    }
}

/// Once `first_request` is done, obtains a certificate for `identity`, then
/// renews it at every half-life, or soon after the mesh starts signing
/// under another certificate.
async fn keep_fresh(
    first_request: Option<impl std::future::Future<Output = ()>>,
    control_plane: ControlPlane,
    ttl: Option<Duration>,
    metrics: Arc<Metrics>,
    mut mesh_signer: watch::Receiver<String>,
    identity: Identity,
    cert: watch::Sender<Option<Issued>>,
) {
    if let Some(first_request) = first_request {
        first_request.await;
    }
    // A pod waits for its certificate: capped low, like discovery.
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match fetch(&control_plane, ttl, &identity).await {
            Ok((fresh, signer)) => {
                metrics
                    .certificate_requests
                    .get_or_create(&ResultLabels { result: "issued" })
                    .inc();
                backoff.reset();
                // Half of the lifetime left from now: the CA backdates
                // certificates for clock skew, so the certificate's own
                // midpoint can lie in the past.
                let renew_in = until(fresh.not_after()) / 2;
                tracing::info!(
                    %identity,
                    not_after = %humantime::format_rfc3339_seconds(fresh.not_after()),
                    renew_in = ?renew_in,
                    "workload certificate issued"
                );
                metrics
                    .certificate_expiry
                    .get_or_create(&IdentityLabels {
                        identity: identity.to_string(),
                    })
                    .set(Metrics::unix_seconds(fresh.not_after()));
                cert.send_replace(Some(Issued {
                    cert: fresh,
                    signer: signer.clone(),
                }));
                let rotated = async {
                    // The guard it returns must not live across an await.
                    mesh_signer
                        .wait_for(|now| superseded(&signer, now))
                        .await
                        .map(|_| ())
                };
                tokio::select! {
                    _ = tokio::time::sleep(renew_in) => {}
                    rotated = rotated => {
                        if rotated.is_err() {
                            return;
                        }
                        let spread = REISSUE_SPREAD.mul_f64(rand::random::<f64>());
                        tracing::info!(%identity, replace_in = ?spread, "certificate issued under the previous signer");
                        tokio::time::sleep(spread).await;
                    }
                }
            }
            Err(error) => {
                metrics
                    .certificate_requests
                    .get_or_create(&ResultLabels { result: "failed" })
                    .inc();
                let mut delay = backoff.next_delay();
                let expired = cert
                    .borrow()
                    .as_ref()
                    .is_none_or(|c| c.cert.expired_at(SystemTime::now()));
                if expired {
                    cert.send_replace(None);
                } else if let Some(current) = cert.borrow().as_ref() {
                    // Try again before the current one runs out.
                    delay =
                        delay.min(until(current.cert.not_after()) / 2 + Duration::from_millis(100));
                }
                tracing::warn!(%identity, %error, retry_in = ?delay, "certificate request failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// A new certificate for `identity`, and the signer it was issued under.
async fn fetch(
    control_plane: &ControlPlane,
    ttl: Option<Duration>,
    identity: &Identity,
) -> Result<(WorkloadCert, String), Error> {
    let request = CertificateRequest::generate(identity)?;
    let response = control_plane
        .certificates()
        .sign(control_plane.request(pb::SignRequest {
            csr: request.csr_der().to_vec(),
            identity: identity.to_string(),
            ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
        }))
        .await?
        .into_inner();
    Ok((request.into_cert(&response.cert_chain)?, response.signer))
}

fn until(moment: SystemTime) -> Duration {
    moment
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use kanava_proto::v1 as pb;

    use super::{superseded, wait_for_discovery};
    use crate::proxy::test_support::workload;
    use crate::workloads::WorkloadStore;

    #[tokio::test]
    async fn a_pods_first_certificate_is_asked_for_once_discovery_knows_the_pod() {
        let store = Arc::new(WorkloadStore::new());
        let waiting = tokio::spawn(wait_for_discovery(store.clone(), "web".into()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "asked before discovery knew the pod"
        );
        let web = workload("web", "10.244.2.3");
        store
            .apply(&pb::DiscoveryResponse {
                version_info: "1".into(),
                full_snapshot: true,
                resources: vec![pb::Resource {
                    name: web.resource_name(),
                    kind: Some(pb::resource::Kind::Workload(web.to_proto())),
                }],
                ..Default::default()
            })
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("asked once discovery knows the pod")
            .unwrap();
    }

    #[test]
    fn only_a_known_other_signer_supersedes_a_certificate() {
        assert!(superseded("aa", "bb"));
        assert!(!superseded("aa", "aa"));
        // An older control plane says nothing of signers: nothing to do.
        assert!(!superseded("", "bb"));
        assert!(!superseded("aa", ""));
    }
}
