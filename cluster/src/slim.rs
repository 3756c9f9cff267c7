//! Objects cut down to what the mesh reads of them.
//!
//! A control plane holds every Pod of the cluster. A Pod as the API server
//! serves it carries its containers' images, commands, environment, probes,
//! volumes and status history, none of which the mesh uses; at 100,000 pods
//! that is most of the control plane's memory. The sources keep only the
//! fields [`translate`](crate::translate) and the control plane's own checks
//! read, listed here in one place. A test translates the test clusters
//! with and without slimming and expects the same mesh, so a field the
//! translation starts to read but this module drops fails it.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kanava_mesh::Labels;

use crate::crd::AuthorizationPolicy;

/// Annotations the mesh reads start with this.
const MESH_ANNOTATIONS: &str = "kanava.io/";

/// The annotations the mesh reads, or `None` when there are none.
fn mesh_annotations(
    annotations: Option<&BTreeMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    let kept: BTreeMap<String, String> = annotations?
        .iter()
        .filter(|(key, _)| key.starts_with(MESH_ANNOTATIONS))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    (!kept.is_empty()).then_some(kept)
}

/// Identity, labels, the mesh's annotations, versions.
fn metadata(meta: ObjectMeta) -> ObjectMeta {
    let annotations = mesh_annotations(meta.annotations.as_ref());
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        generation: meta.generation,
        labels: meta.labels,
        annotations,
        deletion_timestamp: meta.deletion_timestamp,
        ..ObjectMeta::default()
    }
}

/// A Pod as the mesh reads it: where it runs, as whom, its addresses,
/// readiness, labels and named ports.
///
/// Not the API's `Pod` type with fields left empty: that is 2 KiB inline
/// before any content, which at 100,000 pods was most of the control
/// plane's memory. The labels are shared ([`Labels`]): with the workload
/// translated from the pod, and with the pod's siblings of one ReplicaSet
/// ([`ClusterObjects`](crate::ClusterObjects) reuses a neighbour's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPod {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub labels: Labels,
    /// The mesh's own annotations (`kanava.io/...`); usually none.
    pub annotations: Option<Box<BTreeMap<String, String>>>,
    /// Whether the Pod has a spec at all (one without cannot be translated).
    pub has_spec: bool,
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    pub host_network: bool,
    /// Succeeded or Failed: its address may already be someone else's.
    pub finished: bool,
    /// `status.podIPs`, or `status.podIP` when that is all there is.
    pub ips: Vec<String>,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
    /// The named ports of all its containers, in order (a Service's named
    /// `targetPort` is looked up across them).
    pub named_ports: Vec<(String, i32)>,
}

impl MeshPod {
    /// The port called `name`, as a container declares it.
    pub fn named_port(&self, name: &str) -> Option<i32> {
        self.named_ports
            .iter()
            .find(|(port, _)| port == name)
            .map(|&(_, number)| number)
    }
}

/// Takes the pod apart: what the mesh reads is moved, not copied, as
/// every pod of the cluster arrives this way.
impl From<Pod> for MeshPod {
    fn from(pod: Pod) -> Self {
        let meta = pod.metadata;
        let has_spec = pod.spec.is_some();
        let spec = pod.spec.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let mut ips: Vec<String> = status
            .pod_ips
            .unwrap_or_default()
            .into_iter()
            .map(|ip| ip.ip)
            .collect();
        if let (true, Some(ip)) = (ips.is_empty(), status.pod_ip) {
            ips.push(ip);
        }
        MeshPod {
            name: meta.name.unwrap_or_default(),
            namespace: meta.namespace.unwrap_or_else(|| "default".into()),
            uid: meta.uid,
            resource_version: meta.resource_version,
            labels: Arc::new(meta.labels.unwrap_or_default()),
            annotations: mesh_annotations(meta.annotations.as_ref()).map(Box::new),
            has_spec,
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network == Some(true),
            finished: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            ips,
            ready: status.conditions.is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            }),
            named_ports: spec
                .containers
                .into_iter()
                .flat_map(|c| c.ports.unwrap_or_default())
                .filter_map(|p| Some((p.name?, p.container_port)))
                .collect(),
        }
    }
}

/// Its virtual IPs, ports and selector.
pub fn service(service: Service) -> Service {
    Service {
        metadata: metadata(service.metadata),
        spec: service.spec.map(|spec| ServiceSpec {
            type_: spec.type_,
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            ip_families: spec.ip_families,
            selector: spec.selector,
            ports: spec.ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|port| ServicePort {
                        name: port.name,
                        port: port.port,
                        target_port: port.target_port,
                        protocol: port.protocol,
                        ..ServicePort::default()
                    })
                    .collect()
            }),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Its labels (enrollment, mTLS mode) and annotations.
pub fn namespace(namespace: Namespace) -> Namespace {
    Namespace {
        metadata: metadata(namespace.metadata),
        spec: None,
        status: None,
    }
}

/// All of its spec (few, and every field decides who may connect); its
/// status is the control plane's own output.
pub fn policy(policy: AuthorizationPolicy) -> AuthorizationPolicy {
    AuthorizationPolicy {
        metadata: metadata(policy.metadata),
        ..policy
    }
}
