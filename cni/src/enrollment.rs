//! Whether a pod belongs in the mesh, decided when its network is made.
//!
//! The decision reads the pod and its namespace from the API server at the
//! moment of ADD (the lab: from its manifest directory, the same objects).
//! It does not ask the ztunnel: a pod outside the mesh must start even when
//! the ztunnel is down, and a pod created right after its namespace was
//! labelled may not be in the ztunnel's discovery state yet. The API server
//! is where the label is written, so no later reader can see an older
//! answer. A namespace labelled after its pods started is the ztunnel's
//! business: it captures them from their pod records
//! ([`kanava_handoff::records`]).

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kanava_mesh::{is_enrolled, names};

use crate::invocation::{NetConf, PodRef};

/// What the plugin needs to know about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub service_account: String,
    pub enrolled: bool,
}

/// Where pods and namespaces are read from.
#[derive(Clone, Debug)]
pub enum Source {
    Kubernetes {
        kubeconfig: PathBuf,
        timeout: Duration,
    },
    Manifests(PathBuf),
}

impl Source {
    pub fn from_conf(conf: &NetConf) -> Self {
        match (&conf.kubeconfig, &conf.manifest_dir) {
            (_, Some(dir)) => Source::Manifests(dir.clone()),
            (Some(kubeconfig), None) => Source::Kubernetes {
                kubeconfig: kubeconfig.clone(),
                timeout: conf.timeout(),
            },
            // NetConf::parse refuses this; default to the node's file.
            (None, None) => Source::Kubernetes {
                kubeconfig: PathBuf::from("/etc/cni/net.d/kanava-cni.kubeconfig"),
                timeout: conf.timeout(),
            },
        }
    }

    /// Reads the pod and its namespace. An error means: cannot tell (the
    /// runtime retries).
    pub fn lookup(&self, pod: &PodRef) -> Result<PodFacts, LookupError> {
        let (namespace, found) = match self {
            Source::Manifests(dir) => {
                let objects = kanava_cluster::read_manifest_dir(dir)
                    .map_err(|e| LookupError::Other(e.to_string()))?;
                let namespace = objects
                    .namespaces
                    .get(&pod.namespace)
                    .map(|n| (**n).clone());
                let found = objects
                    .pods
                    .get(&(pod.namespace.clone(), pod.name.clone()))
                    .map(|p| (**p).clone());
                (namespace, found)
            }
            Source::Kubernetes {
                kubeconfig,
                timeout,
            } => read_from_api_server(kubeconfig, *timeout, pod)?,
        };
        let found =
            found.ok_or_else(|| LookupError::Other("the pod does not exist (yet)".to_string()))?;
        Ok(facts(namespace.as_ref(), &found))
    }
}

/// Why a pod's enrollment could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The API server refused the plugin's credentials (401): they are dead,
    /// as after an uninstall that could not clean the node.
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Other(String),
}

/// The decision, from the two objects.
pub fn facts(namespace: Option<&Namespace>, pod: &Pod) -> PodFacts {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    PodFacts {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| names::DEFAULT_SERVICE_ACCOUNT.into()),
        enrolled: !host_network
            && is_enrolled(
                namespace.and_then(|n| n.metadata.labels.as_ref()),
                pod.metadata.labels.as_ref(),
            ),
    }
}

fn read_from_api_server(
    kubeconfig: &std::path::Path,
    timeout: Duration,
    pod: &PodRef,
) -> Result<(Option<Namespace>, Option<Pod>), LookupError> {
    let failed = |what: String| {
        move |error: kube::Error| match &error {
            kube::Error::Api(status) if status.code == 401 => {
                LookupError::Unauthorized(format!("{what}: {error}"))
            }
            _ => LookupError::Other(format!("{what}: {error}")),
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LookupError::Other(format!("start the async runtime: {e}")))?;
    runtime.block_on(async {
        let file = kube::config::Kubeconfig::read_from(kubeconfig)
            .map_err(|e| LookupError::Other(format!("read {}: {e}", kubeconfig.display())))?;
        let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .map_err(|e| LookupError::Other(format!("use {}: {e}", kubeconfig.display())))?;
        config.connect_timeout = Some(timeout);
        config.read_timeout = Some(timeout);
        let client = kube::Client::try_from(config).map_err(failed("connect".into()))?;
        let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
        let pods: kube::Api<Pod> = kube::Api::namespaced(client, &pod.namespace);
        let get = async {
            let namespace = namespaces
                .get_opt(&pod.namespace)
                .await
                .map_err(failed(format!("get namespace {}", pod.namespace)))?;
            let found = pods
                .get_opt(&pod.name)
                .await
                .map_err(failed(format!("get pod {pod}")))?;
            Ok::<_, LookupError>((namespace, found))
        };
        tokio::time::timeout(timeout * 2, get).await.map_err(|_| {
            LookupError::Other(format!(
                "the API server did not answer within {:?}",
                timeout * 2
            ))
        })?
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn enrollment_follows_the_namespace_label_and_the_pod_opt_out() {
        let ambient: Namespace = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {kanava.io/dataplane-mode: ambient}}\n",
        );
        let plain: Namespace = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
        let pod: Pod = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, uid: u-1}\nspec: {serviceAccountName: web, containers: [{name: c}]}\n",
        );
        let opted_out: Pod = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {kanava.io/dataplane-mode: none}}\nspec: {containers: [{name: c}]}\n",
        );
        let host: Pod = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {hostNetwork: true, containers: [{name: c}]}\n",
        );
        assert_eq!(
            facts(Some(&ambient), &pod),
            PodFacts {
                uid: "u-1".into(),
                service_account: "web".into(),
                enrolled: true
            }
        );
        assert!(!facts(Some(&plain), &pod).enrolled);
        assert!(!facts(None, &pod).enrolled);
        assert!(!facts(Some(&ambient), &opted_out).enrolled);
        assert_eq!(facts(Some(&ambient), &opted_out).service_account, "default");
        assert!(!facts(Some(&ambient), &host).enrolled);
    }
}
