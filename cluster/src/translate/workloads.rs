//! A Pod (with its Namespace) → the workload the data plane knows.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kanava_mesh::{
    Identity, MtlsMode, OpenPort, PLAINTEXT_INBOUND_PORTS_ANNOTATION, TunnelProtocol, Workload,
    is_enrolled, names,
};

use super::TranslateConfig;

/// The workload a pod stands for, or `None` when the pod is not (yet) part
/// of the data plane: not scheduled, no IP, finished, or on the host network.
pub fn workload_of(
    pod: &Pod,
    namespace: Option<&Namespace>,
    config: &TranslateConfig,
) -> Result<Option<Workload>, String> {
    let meta = &pod.metadata;
    let Some(spec) = pod.spec.as_ref() else {
        return Err("missing spec".into());
    };
    if spec.host_network == Some(true) {
        return Ok(None);
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let Some(node) = spec.node_name.clone() else {
        return Ok(None);
    };
    let mut ip_texts: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.as_str()).collect())
        .unwrap_or_default();
    if let (true, Some(ip)) = (
        ip_texts.is_empty(),
        status.and_then(|s| s.pod_ip.as_deref()),
    ) {
        ip_texts.push(ip);
    }
    if ip_texts.is_empty() {
        return Ok(None);
    }
    let ips = ip_texts
        .iter()
        .map(|text| {
            text.parse::<IpAddr>()
                .map_err(|_| format!("status.podIP {text:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let uid = meta.uid.clone().ok_or("missing metadata.uid")?;
    let name = meta.name.clone().ok_or("missing metadata.name")?;
    let namespace_name = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| names::DEFAULT_SERVICE_ACCOUNT.into());
    let identity = Identity::new(&config.trust_domain, &namespace_name, &service_account)
        .map_err(|e| e.to_string())?;
    let namespace_labels = namespace.and_then(|ns| ns.metadata.labels.as_ref());
    let enrolled = is_enrolled(namespace_labels, meta.labels.as_ref());
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
        labels: meta.labels.clone().unwrap_or_default(),
        mtls_mode,
        plaintext_inbound_ports: plaintext_inbound_ports(pod, namespace).unwrap_or_default(),
        resource_version: newest_version(
            meta.resource_version.as_deref(),
            namespace.and_then(|ns| ns.metadata.resource_version.as_deref()),
        ),
    }))
}

/// The non-TCP ports the pod and its namespace open
/// ([`PLAINTEXT_INBOUND_PORTS_ANNOTATION`]), together. A value that does
/// not parse opens nothing (and is reported by
/// [`plaintext_inbound_ports_problem`]): a typo must not open a port.
fn plaintext_inbound_ports(
    pod: &Pod,
    namespace: Option<&Namespace>,
) -> Result<Vec<OpenPort>, String> {
    let mut ports = Vec::new();
    for (what, annotations) in [
        ("Pod", pod.metadata.annotations.as_ref()),
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
pub fn plaintext_inbound_ports_problem(pod: &Pod, namespace: Option<&Namespace>) -> Option<String> {
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

pub(super) fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}
