//! A ClusterIP Service and the ready pods it selects → a mesh Service with
//! its endpoints, ports mapped per pod.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kanava_mesh::{Endpoint, Service, ServicePort, Workload};

use crate::slim::MeshPod;

/// The ready workloads of one namespace, indexed by label so that a
/// selector looks at the pods carrying its rarest label, not at all pods.
#[derive(Default)]
pub struct NamespaceWorkloads<'a> {
    workloads: Vec<(&'a Workload, &'a MeshPod)>,
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
}

impl<'a> NamespaceWorkloads<'a> {
    pub fn add(&mut self, workload: &'a Workload, pod: &'a MeshPod) {
        let index = self.workloads.len();
        self.workloads.push((workload, pod));
        for (key, value) in workload.labels.iter() {
            self.by_label
                .entry((key.as_str(), value.as_str()))
                .or_default()
                .push(index);
        }
    }

    /// The workloads carrying every label of `selector` (not empty).
    pub fn select<'s>(
        &'s self,
        selector: &'s BTreeMap<String, String>,
    ) -> impl Iterator<Item = (&'a Workload, &'a MeshPod)> + 's {
        let rarest = selector
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(&(k.as_str(), v.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default()
            })
            .min_by_key(|indexes| indexes.len())
            .unwrap_or_default();
        rarest
            .iter()
            .map(|&i| self.workloads[i])
            .filter(move |(workload, _)| {
                selector
                    .iter()
                    .all(|(k, v)| workload.labels.get(k).is_some_and(|l| l == v))
            })
    }
}

/// A ClusterIP Service with the ready pods it selects. `None` for Services
/// without a virtual IP (headless, ExternalName, not yet allocated).
pub fn service_of(
    service: &KubeService,
    candidates: &NamespaceWorkloads<'_>,
) -> Result<Option<Service>, String> {
    let meta = &service.metadata;
    let Some(spec) = service.spec.as_ref() else {
        return Err("missing spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut vips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if let (true, Some(ip)) = (vips.is_empty(), spec.cluster_ip.as_deref()) {
        vips.push(ip);
    }
    if vips.is_empty() || vips.contains(&"None") {
        return Ok(None);
    }
    let addresses = vips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| format!("clusterIP {ip:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().ok_or("missing metadata.name")?;

    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let number = u16::try_from(port.port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port {} is not in 1-65535", port.port))?;
        let (target_port, target_port_name) = match &port.target_port {
            None => (number, String::new()),
            Some(IntOrString::Int(n)) => (
                u16::try_from(*n)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("targetPort {n} is not in 1-65535"))?,
                String::new(),
            ),
            Some(IntOrString::String(text)) => match text.parse::<u16>() {
                Ok(n) if n != 0 => (n, String::new()),
                _ => (0, text.clone()),
            },
        };
        ports.push(ServicePort {
            port: number,
            target_port,
            target_port_name,
        });
    }

    let mut endpoints = Vec::new();
    if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
        for (workload, pod) in candidates.select(selector) {
            let endpoint_ports = ports
                .iter()
                .filter_map(|p| {
                    let target = if p.target_port != 0 {
                        Some(p.target_port)
                    } else {
                        named_port(pod, &p.target_port_name)
                    };
                    target.map(|t| (p.port, t))
                })
                .collect::<BTreeMap<_, _>>();
            if !endpoint_ports.is_empty() {
                endpoints.push(Endpoint {
                    workload_uid: workload.uid.clone(),
                    ports: endpoint_ports,
                });
            }
        }
    }
    // Held for as long as the Service is: without the room to grow.
    endpoints.shrink_to_fit();
    Ok(Some(Service {
        namespace,
        name,
        addresses,
        ports,
        endpoints,
        resource_version: meta.resource_version.clone().unwrap_or_default(),
    }))
}

/// The number of a pod's container port called `name`.
fn named_port(pod: &MeshPod, name: &str) -> Option<u16> {
    pod.named_port(name)
        .and_then(|number| u16::try_from(number).ok())
}
