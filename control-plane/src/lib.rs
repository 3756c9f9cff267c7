//! Kanava's control plane.
//!
//! ```text
//!  source ──► translate ──► store ──► discovery ──► every ztunnel
//!  (Kubernetes  (kanava-     (versioned    (xDS-like gRPC stream)
//!   API, or      cluster)     snapshot +
//!   manifests)                deltas)  ──► certificates (the mesh CA)
//! ```
//!
//! - [`source`]: where cluster objects come from: the Kubernetes API, or a
//!   directory of manifests; both feed the same [`translate_into`].
//! - translation of Kubernetes objects into the mesh model (workloads,
//!   services, policies), and the `AuthorizationPolicy` CRD, live in
//!   [`kanava_cluster`], shared with the lab and the benchmarks.
//! - [`store`]: the current mesh state, its version, and the changes between
//!   versions, computed once and shared by every stream.
//! - [`discovery`]: the gRPC service ztunnels subscribe to.
//! - [`ca`] and [`certificates`]: the certificate authority and the gRPC
//!   service that signs workload certificates for the node that runs them.
//! - [`auth`]: how a ztunnel proves which node it speaks for.
//! - [`server`]: TLS listener and gRPC router; [`readiness`]: `/ready`.

pub mod auth;
pub mod ca;
pub mod certificates;
pub mod config;
pub mod discovery;
mod error;
pub mod metrics;
pub mod policy_status;
pub mod readiness;
pub mod server;
pub mod source;
pub mod store;

use std::path::Path;
use std::sync::Arc;

pub use config::{Config, Source};
pub use error::Error;
use kanava_cluster::{SlimObjects, translate};
use tokio_util::sync::CancellationToken;

/// Runs the control plane until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let source = config.source()?;
    let store = Arc::new(store::Store::new());
    let readiness = match config.readiness_address(&source) {
        Some(address) => Some(readiness::serve(address, store.clone(), shutdown.clone()).await?),
        None => None,
    };
    // `watch` keeps the source's watch running until it is dropped.
    let (ca, material, auth, watch) = match &source {
        Source::Manifests {
            dir,
            ca_dir,
            node_tokens_file,
        } => {
            let ca = ca::files::load_or_create(ca_dir, &config.trust_domain)?;
            let auth = auth::Authenticator::NodeTokens(auth::NodeAuthenticator::from_file(
                node_tokens_file,
            )?);
            let mut translate = translate_into(&config, store.clone(), None);
            let translated = store.clone();
            let watch = source::manifests::watch(dir.clone(), move |reader| {
                translate(reader.objects());
                translated
                    .metrics()
                    .source_resource_version
                    .set(reader.newest_resource_version());
            })?;
            let material = ca::MaterialSource::Files(ca_dir.clone());
            (ca, material, auth, Box::new(watch) as Box<dyn Send>)
        }
        Source::Kubernetes { kubeconfig } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let ca = ca::secret::load_or_create(
                &client,
                &config.namespace,
                &config.plugin_ca_secret,
                &config.trust_domain,
            )
            .await?;
            let jwks = auth::jwks::Jwks::new(client.clone());
            tokio::spawn(
                jwks.clone()
                    .keep_fresh(config.jwks_refresh_interval, shutdown.clone()),
            );
            let ztunnel_pods = auth::jwks::ZtunnelPods::default();
            let auth = auth::Authenticator::TokenReview(
                auth::TokenReviewer::new(
                    client.clone(),
                    &config.token_audience,
                    &config.namespace,
                    &config.ztunnel_service_account,
                )
                .with_local_keys(jwks, ztunnel_pods.clone()),
            );
            let statuses = policy_status::StatusWriter::start(client.clone(), &config.pod_name);
            let mut translate = translate_into(&config, store.clone(), Some(statuses));
            let (namespace, account) = (
                config.namespace.clone(),
                config.ztunnel_service_account.clone(),
            );
            // The ztunnels' pods, for checking locally verified tokens.
            let translate = move |objects: &SlimObjects| {
                // Objects are keyed by (namespace, name): only the
                // control plane's namespace is read, not the whole cluster.
                let in_namespace = objects
                    .pods
                    .range((namespace.clone(), String::new())..)
                    .take_while(|((ns, _), _)| *ns == namespace)
                    .map(|(_, pod)| &**pod);
                ztunnel_pods.update(&namespace, &account, in_namespace);
                translate(objects)
            };
            let material = ca::MaterialSource::Secrets {
                client: client.clone(),
                namespace: config.namespace.clone(),
                plugin_ca_secret: config.plugin_ca_secret.clone(),
            };
            let watch = source::kubernetes::watch(client, translate);
            (ca, material, auth, Box::new(watch) as Box<dyn Send>)
        }
    };
    store.set_trust_bundle(ca.trust_bundle());
    let ca = Arc::new(ca::Authority::new(ca));
    tokio::spawn(ca::follow(
        material,
        ca.clone(),
        store.clone(),
        config.trust_domain.clone(),
        config.ca_reload_interval,
        shutdown.clone(),
    ));
    let server = server::Server::new(&config, ca, Arc::new(auth), store)?;
    let result = server.serve(shutdown).await;
    drop(watch);
    drop(readiness);
    result
}

/// Translates every new view of the cluster into the store, where the
/// source keeps it (no copy of a large cluster per change). Every source
/// feeds this one function. With a `statuses` writer, policies' statuses
/// follow their verdicts.
pub fn translate_into(
    config: &Config,
    store: Arc<store::Store>,
    statuses: Option<policy_status::StatusWriter>,
) -> impl FnMut(&SlimObjects) + Send + 'static {
    let mut translator = translate::Translator::new(translate::TranslateConfig {
        trust_domain: config.trust_domain.clone(),
        root_namespace: config.root_namespace.clone(),
    });
    move |objects| {
        let started = std::time::Instant::now();
        let state = translator.translate(objects);
        let translated = started.elapsed();
        for problem in translator.new_problems(&state) {
            tracing::error!(%problem, "configuration rejected");
        }
        store.replace(&state);
        let metrics = store.metrics();
        let rejected = state
            .policy_verdicts
            .iter()
            .filter(|v| v.rejection.is_some())
            .count();
        metrics
            .policies_rejected
            .set(i64::try_from(rejected).unwrap_or(i64::MAX));
        metrics.source_last_change.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
        );
        if let Some(statuses) = &statuses {
            statuses.submit(policy_status::updates(objects, &state.policy_verdicts));
        }
        tracing::debug!(?translated, total = ?started.elapsed(), "configuration translated");
    }
}

/// A client of the API server: from `kubeconfig`, or the in-cluster
/// configuration.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::KubeConfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::KubeConfig(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| {
            Error::KubeConfig(format!(
                "in-cluster configuration: {e} (outside a cluster, pass --kubeconfig)"
            ))
        })?,
    };
    let mut config = config;
    // No blanket retries of 429/503/504: the watches back off by
    // themselves, the CA is read again on its own schedule, and a ztunnel
    // waiting on a TokenReview is better told UNAVAILABLE now (it retries)
    // than held for minutes while the API server is away.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| Error::KubeConfig(e.to_string()))
}
