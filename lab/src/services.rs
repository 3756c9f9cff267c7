//! The lab's Services as `lab status` shows them: computed from its
//! manifests by the same translation the control plane runs.

use kanava_cluster::{TranslateConfig, Translator};

use crate::Error;
use crate::manifests::Manifests;
use crate::state::{LabState, PodState};

/// A Service as `lab status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: String,
    /// Every virtual IP, one per family, the primary first.
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// `port` or `port→targetPort`.
    pub ports: Vec<String>,
    /// `namespace/pod` of every ready endpoint.
    pub endpoints: Vec<String>,
}

/// The lab's Services, computed from its manifests the way the control
/// plane computes them.
pub fn services(state: &LabState) -> Result<Vec<ServiceStatus>, Error> {
    let objects = Manifests::new(state.layout().manifest_dir()).read()?;
    let mesh = Translator::new(TranslateConfig {
        trust_domain: kanava_mesh::DEFAULT_TRUST_DOMAIN.into(),
        root_namespace: kanava_mesh::names::ROOT_NAMESPACE.into(),
    })
    .translate(&objects.with_mesh_pods());
    let pod_of = |uid: &str| {
        state
            .pods
            .iter()
            .find(|p| p.uid == uid)
            .map(PodState::key)
            .unwrap_or_else(|| uid.to_string())
    };
    Ok(mesh
        .services
        .iter()
        .map(|service| ServiceStatus {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            cluster_ip: service
                .addresses
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
            cluster_ips: service.addresses.iter().map(ToString::to_string).collect(),
            ports: service
                .ports
                .iter()
                .map(|p| match (p.target_port, p.target_port_name.as_str()) {
                    (0, name) => format!("{}→{name}", p.port),
                    (target, _) if target == p.port => p.port.to_string(),
                    (target, _) => format!("{}→{target}", p.port),
                })
                .collect(),
            endpoints: service
                .endpoints
                .iter()
                .map(|e| pod_of(&e.workload_uid))
                .collect(),
        })
        .collect())
}
