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

use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodCondition, PodSpec, PodStatus, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::AuthorizationPolicy;
use crate::objects::Object;

/// Annotations the mesh reads start with this.
const MESH_ANNOTATIONS: &str = "kanava.io/";

impl Object {
    /// This object with only what the mesh reads of it.
    pub fn slimmed(self) -> Object {
        match self {
            Object::Namespace(o) => Object::Namespace(namespace(Arc::unwrap_or_clone(o)).into()),
            Object::Pod(o) => Object::Pod(pod(Arc::unwrap_or_clone(o)).into()),
            Object::Service(o) => Object::Service(service(Arc::unwrap_or_clone(o)).into()),
            Object::AuthorizationPolicy(o) => {
                Object::AuthorizationPolicy(policy(Arc::unwrap_or_clone(o)).into())
            }
        }
    }
}

/// Identity, labels, the mesh's annotations, versions.
fn metadata(meta: ObjectMeta) -> ObjectMeta {
    let annotations = meta.annotations.map(|annotations| {
        annotations
            .into_iter()
            .filter(|(key, _)| key.starts_with(MESH_ANNOTATIONS))
            .collect()
    });
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        generation: meta.generation,
        labels: meta.labels,
        annotations: annotations.filter(|a: &std::collections::BTreeMap<_, _>| !a.is_empty()),
        deletion_timestamp: meta.deletion_timestamp,
        ..ObjectMeta::default()
    }
}

/// Where it runs, as whom, its addresses, readiness and named ports.
///
/// A `Container` is 2 KiB before any of its content: the named ports of all
/// containers move into one, in order (a Service's named `targetPort` is
/// looked up across them), and a pod without named ports keeps none.
pub fn pod(pod: Pod) -> Pod {
    Pod {
        metadata: metadata(pod.metadata),
        spec: pod.spec.map(|spec| {
            let named_ports: Vec<ContainerPort> = spec
                .containers
                .into_iter()
                .flat_map(|container| container.ports.unwrap_or_default())
                .filter(|port| port.name.is_some())
                .map(|port| ContainerPort {
                    name: port.name,
                    container_port: port.container_port,
                    protocol: port.protocol,
                    ..ContainerPort::default()
                })
                .collect();
            PodSpec {
                node_name: spec.node_name,
                service_account_name: spec.service_account_name,
                host_network: spec.host_network,
                containers: if named_ports.is_empty() {
                    Vec::new()
                } else {
                    vec![Container {
                        ports: Some(named_ports),
                        ..Container::default()
                    }]
                },
                ..PodSpec::default()
            }
        }),
        status: pod.status.map(|status| PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            // Only readiness is read (and its times change without it).
            conditions: status.conditions.map(|conditions| {
                conditions
                    .into_iter()
                    .filter(|condition| condition.type_ == "Ready")
                    .map(|condition| PodCondition {
                        type_: condition.type_,
                        status: condition.status,
                        ..PodCondition::default()
                    })
                    .collect()
            }),
            ..PodStatus::default()
        }),
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
