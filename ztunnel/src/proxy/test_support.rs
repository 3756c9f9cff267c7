//! Mesh state for the data path's unit tests, fed through the same
//! discovery path a ztunnel uses.

use std::net::IpAddr;
use std::sync::Arc;

use kanava_mesh::policy::{Action, Policy, Rule, Source, SourceBuilder};
use kanava_mesh::{Identity, MtlsMode, Service, TunnelProtocol, Workload};
use kanava_proto::v1 as pb;

use super::PodInfo;
use crate::workloads::WorkloadStore;

pub fn identity(namespace: &str, service_account: &str) -> Identity {
    Identity::new("cluster.local", namespace, service_account).expect("identity")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("IP")
}

/// An enrolled pod `shop/<name>` with service account `<name>`.
pub fn workload(name: &str, address: &str) -> Workload {
    Workload {
        uid: name.into(),
        name: name.into(),
        namespace: "shop".into(),
        service_account: name.into(),
        node: "node-2".into(),
        ips: vec![ip(address)],
        identity: identity("shop", name),
        protocol: TunnelProtocol::Hbone,
        labels: Default::default(),
        mtls_mode: MtlsMode::Strict,
        resource_version: "1".into(),
        plaintext_inbound_ports: Vec::new(),
    }
}

/// The captured pod behind [`workload`]`(name, address)`.
pub fn pod_info(name: &str, address: &str) -> PodInfo {
    PodInfo {
        uid: name.into(),
        name: name.into(),
        namespace: "shop".into(),
        identity: identity("shop", name),
        ips: vec![ip(address)],
    }
}

pub fn policy(namespace: &str, name: &str, action: Action, rules: Vec<Rule>) -> Arc<Policy> {
    Arc::new(Policy {
        namespace: namespace.into(),
        name: name.into(),
        selector: None,
        mesh_wide: false,
        action,
        rules,
        resource_version: "1".into(),
    })
}

pub fn from_principals(principals: &[&str]) -> Source {
    SourceBuilder::<&str> {
        principals,
        not_principals: &[],
        namespaces: &[],
        not_namespaces: &[],
        ip_blocks: &[],
        not_ip_blocks: &[],
    }
    .build()
    .expect("valid source")
}

/// A store fed the way discovery feeds it: one full snapshot.
pub fn store(
    workloads: &[Workload],
    services: &[Service],
    policies: &[Arc<Policy>],
) -> WorkloadStore {
    let mut resources: Vec<pb::Resource> = workloads
        .iter()
        .map(|w| pb::Resource {
            name: w.resource_name(),
            kind: Some(pb::resource::Kind::Workload(w.to_proto())),
        })
        .collect();
    resources.extend(services.iter().map(|s| pb::Resource {
        name: s.resource_name(),
        kind: Some(pb::resource::Kind::Service(s.to_proto())),
    }));
    resources.extend(policies.iter().map(|p| pb::Resource {
        name: p.resource_name(),
        kind: Some(pb::resource::Kind::Policy(p.to_proto())),
    }));
    let store = WorkloadStore::new();
    store
        .apply(&pb::DiscoveryResponse {
            version_info: "1".into(),
            full_snapshot: true,
            resources,
            ..Default::default()
        })
        .expect("valid snapshot");
    store
}
