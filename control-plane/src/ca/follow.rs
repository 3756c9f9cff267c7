//! The CA in force, and following its material while the control plane
//! runs: a root rotation is three edits of the CA's directory or Secret
//! (see the README), each picked up within `--ca-reload-interval`.
//!
//! Polling, not watching: it needs only `get` on two named Secrets (no
//! `list`/`watch` on Secrets, which would let the control plane read every
//! Secret's changes in its namespace), costs one small request per interval,
//! and works the same for a directory. Material that cannot be used (a key
//! that does not match its certificate, half of an edit) is refused and
//! logged, and the CA in force stays until the material is whole again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{CertificateAuthority, SigningMaterial, files, secret};
use crate::Error;
use crate::metrics::ResultLabels;
use crate::store::Store;

/// The CA that signs now. Every signature loads it once, so a certificate
/// and the signer reported with it always match.
pub struct Authority {
    current: ArcSwap<CertificateAuthority>,
    signer: watch::Sender<String>,
}

impl Authority {
    pub fn new(ca: CertificateAuthority) -> Self {
        Authority {
            signer: watch::channel(ca.signer().to_string()).0,
            current: ArcSwap::from_pointee(ca),
        }
    }

    pub fn current(&self) -> Arc<CertificateAuthority> {
        self.current.load_full()
    }

    /// Notified when another certificate starts signing.
    pub fn signer_changes(&self) -> watch::Receiver<String> {
        self.signer.subscribe()
    }

    fn replace(&self, ca: CertificateAuthority) {
        let signer = ca.signer().to_string();
        self.current.store(Arc::new(ca));
        self.signer.send_if_modified(|current| {
            let changed = *current != signer;
            *current = signer;
            changed
        });
    }
}

/// Where the CA's material is kept.
pub enum MaterialSource {
    /// A directory (`--ca-dir`).
    Files(PathBuf),
    /// The plug-in CA's Secret, else `kanava-ca`, in `namespace`; the
    /// trusted roots are published to the roots ConfigMap on every change.
    Secrets {
        client: Client,
        namespace: String,
        plugin_ca_secret: String,
    },
}

impl MaterialSource {
    async fn read(&self) -> Result<(SigningMaterial, String), Error> {
        match self {
            MaterialSource::Files(dir) => files::read_material(dir),
            MaterialSource::Secrets {
                client,
                namespace,
                plugin_ca_secret,
            } => secret::read_material(client, namespace, plugin_ca_secret).await,
        }
    }

    async fn publish(&self, ca: &CertificateAuthority) -> Result<(), Error> {
        match self {
            MaterialSource::Files(_) => Ok(()),
            MaterialSource::Secrets {
                client, namespace, ..
            } => secret::publish_trusted_roots(client, namespace, &ca.root_pem()).await,
        }
    }
}

/// Whether two CAs would sign and be trusted alike.
fn same(a: &CertificateAuthority, b: &CertificateAuthority) -> bool {
    a.signer == b.signer && a.roots_pem == b.roots_pem && a.chain_pem == b.chain_pem
}

/// Reads the material every `every` until `shutdown`; a change becomes the
/// CA in force and the trust bundle every ztunnel is sent.
pub async fn follow(
    source: MaterialSource,
    authority: Arc<Authority>,
    store: Arc<Store>,
    trust_domain: String,
    every: Duration,
    shutdown: CancellationToken,
) {
    let metrics = || store.metrics();
    // The last material seen, so unchanged material is not parsed again.
    let mut last: Option<SigningMaterial> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let (material, origin) = match source.read().await {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(%error, "cannot read the CA's material; the CA in force stays");
                continue;
            }
        };
        if last.as_ref() == Some(&material) {
            continue;
        }
        let ca = match CertificateAuthority::from_material(&material, &trust_domain, &origin) {
            Ok(ca) => ca,
            Err(error) => {
                // Possibly half of an edit: the next read may find it whole.
                metrics()
                    .ca_reloads
                    .get_or_create(&ResultLabels { result: "refused" })
                    .inc();
                tracing::warn!(%error, "the CA's material changed but cannot be used; the CA in force stays");
                continue;
            }
        };
        last = Some(material);
        if same(&ca, &authority.current()) {
            continue;
        }
        if let Err(error) = source.publish(&ca).await {
            tracing::warn!(%error, "cannot publish the new trusted roots; ztunnels get them through discovery");
        }
        let bundle = ca.trust_bundle();
        tracing::info!(
            %origin,
            roots = bundle.roots.len(),
            signer = %bundle.signer,
            "the CA changed: signing and trusting what it holds now"
        );
        metrics()
            .ca_reloads
            .get_or_create(&ResultLabels { result: "changed" })
            .inc();
        authority.replace(ca);
        store.set_trust_bundle(bundle);
    }
}
