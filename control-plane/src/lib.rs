//! Kanava's control plane.
//!
//! ```text
//!  source ──► translate ──► store ──► discovery ──► every ztunnel
//!  (manifest    (kanava-     (versioned    (xDS-like gRPC stream)
//!   directory)   cluster)     snapshot +
//!                             deltas)  ──► certificates (the mesh CA)
//! ```
//!
//! - [`source`]: where cluster objects come from: today a directory of
//!   Kubernetes manifests, watched for changes. A Kubernetes API source is to
//!   come and will feed the same [`source::ClusterObjects`].
//! - translation of Kubernetes objects into the mesh model (workloads,
//!   services, policies), and the `AuthorizationPolicy` CRD, live in
//!   [`kanava_cluster`], shared with the lab and the benchmarks.
//! - [`store`]: the current mesh state, its version, and the changes between
//!   versions, computed once and shared by every stream.
//! - [`discovery`]: the gRPC service ztunnels subscribe to.
//! - [`ca`] and [`certificates`]: the certificate authority and the gRPC
//!   service that signs workload certificates for the node that runs them.
//! - [`auth`]: how a ztunnel proves which node it speaks for.
//! - [`server`]: TLS listener and gRPC router.

pub mod auth;
pub mod ca;
pub mod certificates;
pub mod config;
pub mod discovery;
mod error;
pub mod server;
pub mod source;
pub mod store;

use std::sync::Arc;

pub use config::Config;
pub use error::Error;
use kanava_cluster::translate;
use tokio_util::sync::CancellationToken;

/// Runs the control plane until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let mut translator = translate::Translator::new(translate::TranslateConfig {
        trust_domain: config.trust_domain.clone(),
        root_namespace: config.root_namespace.clone(),
    });
    let ca = Arc::new(ca::CertificateAuthority::load_or_create(
        &config.ca_dir,
        &config.trust_domain,
    )?);
    let auth = Arc::new(auth::NodeAuthenticator::from_file(
        &config.node_tokens_file,
    )?);
    let store = Arc::new(store::Store::new());

    // Translate every new view of the cluster into the store, where the
    // source keeps it (no copy of a large cluster per change).
    let translator_store = store.clone();
    let watcher = source::manifests::watch(config.manifest_dir.clone(), move |objects| {
        let started = std::time::Instant::now();
        let state = translator.translate(objects);
        let translated = started.elapsed();
        for problem in translator.new_problems(&state) {
            tracing::error!(%problem, "configuration rejected");
        }
        translator_store.replace(&state);
        tracing::debug!(?translated, total = ?started.elapsed(), "configuration translated");
    })?;

    let server = server::Server::new(&config, ca, auth, store)?;
    let result = server.serve(shutdown).await;
    drop(watcher);
    result
}
