//! A Pod (with its Namespace) → the workload the data plane knows.

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Namespace;
use kanava_mesh::{
    Identity, MtlsMode, OpenPort, PLAINTEXT_INBOUND_PORTS_ANNOTATION, TunnelProtocol, Workload,
    is_enrolled, names,
};

use super::TranslateConfig;
use crate::slim::MeshPod;

/// The workload a pod stands for, or `None` when the pod is not (yet) part
/// of the data plane: not scheduled, no IP, finished, or on the host network.
pub fn workload_of(
    pod: &MeshPod,
    namespace: Option<&Namespace>,
    config: &TranslateConfig,
    identities: &mut Identities,
) -> Result<Option<Workload>, String> {
    if !pod.has_spec {
        return Err("missing spec".into());
    }
    if pod.host_network || pod.finished {
        return Ok(None);
    }
    let Some(node) = pod.node_name.clone() else {
        return Ok(None);
    };
    if pod.ips.is_empty() {
        return Ok(None);
    }
    let ips = pod
        .ips
        .iter()
        .map(|text| {
            text.parse::<IpAddr>()
                .map_err(|_| format!("status.podIP {text:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let uid = pod.uid.clone().ok_or("missing metadata.uid")?;
    if pod.name.is_empty() {
        return Err("missing metadata.name".into());
    }
    let name = pod.name.clone();
    let namespace_name = pod.namespace.clone();
    let service_account = pod
        .service_account_name
        .clone()
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| names::DEFAULT_SERVICE_ACCOUNT.into());
    let identity = identities
        .get(&config.trust_domain, &namespace_name, &service_account)
        .map_err(|e| e.to_string())?;
    let namespace_labels = namespace.and_then(|ns| ns.metadata.labels.as_ref());
    let enrolled = is_enrolled(namespace_labels, Some(&pod.labels));
    let mtls_mode = match namespace_labels
        .and_then(|l| l.get(names::MTLS_MODE_LABEL))
        .map(String::as_str)
    {
        Some("permissive") => MtlsMode::Permissive,
        // Anything but an explicit `permissive` is strict: a typo must not
        // open the door to plaintext.
        _ => MtlsMode::Strict,
    };
    Ok(Some(Workload {
        uid,
        name,
        namespace: namespace_name,
        service_account,
        node,
        ips,
        identity,
        protocol: if enrolled {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        labels: pod.labels.clone(),
        mtls_mode,
        plaintext_inbound_ports: plaintext_inbound_ports(pod, namespace).unwrap_or_default(),
        resource_version: newest_version(
            pod.resource_version.as_deref(),
            namespace.and_then(|ns| ns.metadata.resource_version.as_deref()),
        ),
    }))
}

/// The identities of the pods translated, one copy shared by all pods of a
/// namespace and service account (the replicas of a Deployment, usually):
/// each pod held a copy of its own, a fifth of the translator's memory.
#[derive(Debug, Default)]
pub struct Identities {
    by_namespace: HashMap<String, HashMap<String, Identity>>,
}

impl Identities {
    /// The identity of `service_account` in `namespace`, shared.
    fn get(
        &mut self,
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, kanava_mesh::Error> {
        if let Some(known) = self
            .by_namespace
            .get(namespace)
            .and_then(|accounts| accounts.get(service_account))
        {
            return Ok(known.clone());
        }
        let identity = Identity::new(trust_domain, namespace, service_account)?;
        self.by_namespace
            .entry(namespace.to_string())
            .or_default()
            .insert(service_account.to_string(), identity.clone());
        Ok(identity)
    }

    /// Forgets the identities no workload holds any more.
    pub fn forget_unused(&mut self) {
        self.by_namespace.retain(|_, accounts| {
            accounts.retain(|_, identity| !identity.is_only_copy());
            !accounts.is_empty()
        });
    }
}

/// The non-TCP ports the pod and its namespace open
/// ([`PLAINTEXT_INBOUND_PORTS_ANNOTATION`]), together. A value that does
/// not parse opens nothing (and is reported by
/// [`plaintext_inbound_ports_problem`]): a typo must not open a port.
fn plaintext_inbound_ports(
    pod: &MeshPod,
    namespace: Option<&Namespace>,
) -> Result<Vec<OpenPort>, String> {
    let mut ports = Vec::new();
    for (what, annotations) in [
        ("Pod", pod.annotations.as_deref()),
        (
            "Namespace",
            namespace.and_then(|ns| ns.metadata.annotations.as_ref()),
        ),
    ] {
        if let Some(value) = annotations.and_then(|a| a.get(PLAINTEXT_INBOUND_PORTS_ANNOTATION)) {
            ports.extend(OpenPort::parse_list(value).map_err(|e| {
                format!(
                    "{what} annotation {PLAINTEXT_INBOUND_PORTS_ANNOTATION}: {e}; no port is opened"
                )
            })?);
        }
    }
    ports.sort();
    ports.dedup();
    Ok(ports)
}

/// Why the pod's or its namespace's open-ports annotation was ignored.
pub fn plaintext_inbound_ports_problem(
    pod: &MeshPod,
    namespace: Option<&Namespace>,
) -> Option<String> {
    plaintext_inbound_ports(pod, namespace).err()
}

/// A workload derives from its pod and its namespace (labels decide its
/// mode), so its version is the newer of the two. Resource versions are
/// opaque to clients but numeric in practice (etcd revisions, the lab's
/// counter); a non-numeric one is passed through as it is.
fn newest_version(pod: Option<&str>, namespace: Option<&str>) -> String {
    match (pod.map(str::parse::<u64>), namespace.map(str::parse::<u64>)) {
        (Some(Ok(pod)), Some(Ok(namespace))) => pod.max(namespace).to_string(),
        _ => pod.unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_of_one_service_account_share_one_identity() {
        let mut identities = Identities::default();
        let web = identities.get("cluster.local", "shop", "web").unwrap();
        let web_again = identities.get("cluster.local", "shop", "web").unwrap();
        let db = identities.get("cluster.local", "shop", "db").unwrap();
        assert_eq!(web.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
        assert!(identities.get("cluster.local", "shop", "No/Good").is_err());

        drop(db);
        identities.forget_unused();
        assert_eq!(identities.by_namespace["shop"].len(), 1, "db is forgotten");
        drop(identities);
        assert!(!web.is_only_copy(), "one copy, shared by both pods");
        drop(web_again);
        assert!(web.is_only_copy());
    }
}
