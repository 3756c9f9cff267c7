//! What this ztunnel trusts, as discovery says: the roots a peer's
//! certificate may chain to, and the certificate that signs workload
//! certificates now. Both change during a root rotation, without a
//! restart: the roots for every next handshake, the signer by having every
//! workload certificate replaced (see [`crate::certs`]).

use kanava_proto::v1 as pb;
use kanava_tls::{MeshRoots, TrustBundle};
use tokio::sync::watch;

use crate::Error;
use crate::metrics::Metrics;

pub struct Trust {
    /// Shared by every TLS configuration of the data path and of the
    /// connection to the control plane.
    pub bundle: TrustBundle,
    /// Fingerprint of the mesh's signer; empty until discovery says.
    signer: watch::Sender<String>,
}

impl Trust {
    /// Trusts `roots` (the mounted root file) until discovery says more.
    pub fn new(roots: MeshRoots, metrics: &Metrics) -> Result<Self, Error> {
        metrics
            .trust_roots
            .set(i64::try_from(roots.fingerprints().len()).unwrap_or(i64::MAX));
        Ok(Trust {
            bundle: TrustBundle::new(roots)?,
            signer: watch::channel(String::new()).0,
        })
    }

    /// The roots in `bundle`, or why it cannot be taken (for the NACK).
    pub fn check(bundle: &pb::TrustBundle) -> Result<MeshRoots, String> {
        MeshRoots::from_pem(bundle.roots.concat().as_bytes())
            .map_err(|e| format!("trust bundle: {e}"))
    }

    /// Takes a bundle [`check`](Self::check) accepted.
    pub fn apply(&self, roots: MeshRoots, signer: &str, metrics: &Metrics) {
        let count = roots.fingerprints().len();
        match self.bundle.replace(roots) {
            Ok(changed) => {
                if changed {
                    tracing::info!(roots = count, "trust bundle changed");
                }
                metrics
                    .trust_roots
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            Err(error) => {
                // The roots in force stay, and so does their count.
                tracing::error!(%error, "cannot build verifiers for the new trust bundle; keeping the current one")
            }
        }
        self.signer.send_if_modified(|current| {
            let changed = current != signer;
            if changed {
                tracing::info!(
                    signer,
                    "the mesh signs under another certificate; replacing workload certificates"
                );
                *current = signer.to_string();
            }
            changed
        });
    }

    pub fn signer(&self) -> String {
        self.signer.borrow().clone()
    }

    pub fn signer_changes(&self) -> watch::Receiver<String> {
        self.signer.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> String {
        kanava_tls::MeshRootKey::generate("cluster.local")
            .expect("root")
            .cert_pem
    }

    #[test]
    fn a_bundle_replaces_the_roots_and_announces_a_new_signer() {
        let metrics = Metrics::new();
        let (old, new) = (root(), root());
        let trust = Trust::new(
            MeshRoots::from_pem(old.as_bytes()).expect("roots"),
            &metrics,
        )
        .expect("trust");
        let mut signer = trust.signer_changes();
        let bundle = pb::TrustBundle {
            roots: vec![old.clone(), new.clone()],
            signer: "ab".repeat(32),
        };
        let roots = Trust::check(&bundle).expect("a good bundle");
        trust.apply(roots, &bundle.signer, &metrics);
        assert_eq!(trust.bundle.roots().fingerprints().len(), 2);
        assert!(signer.has_changed().expect("open"));
        assert_eq!(*signer.borrow_and_update(), "ab".repeat(32));
        assert!(metrics.encode().contains("kanava_trust_roots 2"));

        // The same signer again is no news.
        trust.apply(
            Trust::check(&bundle).expect("good"),
            &bundle.signer,
            &metrics,
        );
        assert!(!signer.has_changed().expect("open"));
    }

    #[test]
    fn a_bundle_without_usable_roots_is_refused() {
        for roots in [vec![], vec!["not a certificate".to_string()]] {
            let bundle = pb::TrustBundle {
                roots,
                signer: String::new(),
            };
            assert!(Trust::check(&bundle).is_err());
        }
    }
}
