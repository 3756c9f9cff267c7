//! Workload certificates: one key pair and certificate per identity that
//! runs on this node.
//!
//! A certificate is requested when the first pod of an identity arrives and
//! dropped when the last one leaves. Each is renewed when half of its
//! remaining lifetime has passed, with a new key; a failed renewal is retried with backoff and logged. An expired
//! certificate is never handed out, even if renewal keeps failing: the
//! connections that need it fail instead.

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

struct Entry {
    users: usize,
    cert: watch::Receiver<Option<WorkloadCert>>,
    renewal: tokio::task::JoinHandle<()>,
}

pub struct CertManager {
    control_plane: ControlPlane,
    ttl: Option<Duration>,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl CertManager {
    pub fn new(control_plane: ControlPlane, ttl: Option<Duration>, metrics: Arc<Metrics>) -> Self {
        CertManager {
            control_plane,
            ttl,
            metrics,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A pod with `identity` arrived: make sure a certificate is (being)
    /// obtained for it.
    pub fn track(&self, identity: &Identity) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(identity) {
            entry.users += 1;
            return;
        }
        let (tx, rx) = watch::channel(None);
        let renewal = tokio::spawn(keep_fresh(
            self.control_plane.clone(),
            self.ttl,
            self.metrics.clone(),
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

    /// The valid certificate for `identity`, if there is one now.
    pub fn current(&self, identity: &Identity) -> Option<WorkloadCert> {
        let entries = self.lock();
        let cert = entries.get(identity)?.cert.borrow().clone()?;
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

    /// Identities and the end of validity of their current certificate.
    pub fn list(&self) -> Vec<(Identity, Option<SystemTime>)> {
        let entries = self.lock();
        let mut list: Vec<_> = entries
            .iter()
            .map(|(id, entry)| {
                (
                    id.clone(),
                    entry.cert.borrow().as_ref().map(|c| c.not_after()),
                )
            })
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
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

/// Obtains a certificate for `identity`, then renews it at every half-life.
async fn keep_fresh(
    control_plane: ControlPlane,
    ttl: Option<Duration>,
    metrics: Arc<Metrics>,
    identity: Identity,
    cert: watch::Sender<Option<WorkloadCert>>,
) {
    // A pod waits for its certificate: capped low, like discovery.
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match fetch(&control_plane, ttl, &identity).await {
            Ok(fresh) => {
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
                cert.send_replace(Some(fresh));
                tokio::time::sleep(renew_in).await;
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
                    .is_none_or(|c| c.expired_at(SystemTime::now()));
                if expired {
                    cert.send_replace(None);
                } else if let Some(current) = cert.borrow().as_ref() {
                    // Try again before the current one runs out.
                    delay = delay.min(until(current.not_after()) / 2 + Duration::from_millis(100));
                }
                tracing::warn!(%identity, %error, retry_in = ?delay, "certificate request failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn fetch(
    control_plane: &ControlPlane,
    ttl: Option<Duration>,
    identity: &Identity,
) -> Result<WorkloadCert, Error> {
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
    Ok(request.into_cert(&response.cert_chain)?)
}

fn until(moment: SystemTime) -> Duration {
    moment
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}
