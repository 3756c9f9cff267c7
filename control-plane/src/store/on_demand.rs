//! On-demand discovery: what a ztunnel that learns workloads when it needs
//! them is sent.
//!
//! Its snapshot is its own node's workloads (to capture and serve them),
//! every Service without its endpoints (so that it knows a virtual IP when
//! it sees one) and every policy. Of a cluster of 100,000 pods, that is
//! about a hundred workloads instead of all of them: most of a full
//! snapshot's bytes are the uids of pods, random and incompressible, once
//! in each workload and again in the endpoints of its Services.
//!
//! The rest it asks for by address (or by name) on its stream
//! (`DiscoveryRequest.learn`): the answer carries the workload at an
//! address, or the Service at it with the workloads of its endpoints.
//! Changes are the same for every stream; the ztunnel keeps those of what
//! it holds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use kanava_proto::v1 as pb;
use prost::Message;
use smallvec::SmallVec;

use super::{Item, Outgoing, SNAPSHOT_PART, Served, Snapshot, encode};

/// The parts of a snapshot that every on-demand stream shares, and the
/// workloads of each node, made on first use.
#[derive(Debug, Default)]
pub struct OnDemandParts {
    shared: OnceLock<Arc<[Outgoing]>>,
    shared_compressed: OnceLock<Arc<[Outgoing]>>,
    by_node: OnceLock<HashMap<String, Vec<Arc<Served>>>>,
}

impl Snapshot {
    /// The on-demand snapshot for `node`: its own workloads first (with the
    /// trust bundle), then the Services without endpoints and the policies,
    /// encoded once for every stream.
    pub fn on_demand(&self, node: &str, compressed: bool) -> Vec<Outgoing> {
        let by_node = self.on_demand.by_node.get_or_init(|| {
            let mut by_node: HashMap<String, Vec<Arc<Served>>> = HashMap::new();
            for resource in self.resources.values() {
                if let Item::Workload(workload) = resource.item() {
                    by_node
                        .entry(workload.node.clone())
                        .or_default()
                        .push(resource.clone());
                }
            }
            by_node
        });
        let own = by_node.get(node).map(Vec::as_slice).unwrap_or_default();
        let first = pb::DiscoveryResponse {
            version_info: self.version.to_string(),
            nonce: format!("{}-full-node", self.version),
            full_snapshot: true,
            more: true,
            trust_bundle: self.trust_bundle.clone(),
            on_demand: true,
            ..Default::default()
        };
        let first = encode(&first, own.iter().map(|r| &r.encoded()[..]));
        let shared = if compressed {
            self.on_demand.shared_compressed.get_or_init(|| {
                self.shared_parts()
                    .map(|part| Outgoing::compress(&part))
                    .collect()
            })
        } else {
            self.on_demand
                .shared
                .get_or_init(|| self.shared_parts().map(Outgoing::plain).collect())
        };
        let first = if compressed {
            Outgoing::compress(&first)
        } else {
            Outgoing::plain(first)
        };
        std::iter::once(first)
            .chain(shared.iter().cloned())
            .collect()
    }

    /// Every Service, without its endpoints, and every policy.
    fn shared_parts(&self) -> impl Iterator<Item = Bytes> + '_ {
        let resources: Vec<Bytes> = self
            .resources
            .values()
            .filter_map(|resource| match resource.item() {
                Item::Workload(_) => None,
                Item::Service(service) => Some(Bytes::from(
                    pb::Resource {
                        name: resource.name().to_string(),
                        kind: Some(pb::resource::Kind::Service(pb::Service {
                            endpoints: Vec::new(),
                            ..service.to_proto()
                        })),
                    }
                    .encode_to_vec(),
                )),
                Item::Policy(_) => Some(resource.encoded().clone()),
            })
            .collect();
        let chunks: Vec<Vec<Bytes>> = if resources.is_empty() {
            vec![Vec::new()]
        } else {
            resources.chunks(SNAPSHOT_PART).map(<[_]>::to_vec).collect()
        };
        let last = chunks.len() - 1;
        let version = self.version;
        chunks.into_iter().enumerate().map(move |(part, chunk)| {
            let rest = pb::DiscoveryResponse {
                version_info: version.to_string(),
                nonce: format!("{version}-full-shared-{part}"),
                full_snapshot: true,
                more: part < last,
                on_demand: true,
                ..Default::default()
            };
            encode(&rest, chunk.iter().map(|r| &r[..]))
        })
    }
}

/// The resources served, by the addresses they hold (a workload's IPs, a
/// Service's virtual IPs): how a `learn` by address is answered. Two may
/// hold one address for a while (a pod gone, its address reused); nearly
/// always one does, and its name is held inline.
#[derive(Debug, Default)]
pub struct AddressIndex {
    by_ip: HashMap<IpAddr, SmallVec<[Arc<str>; 1]>>,
}

impl AddressIndex {
    pub fn add(&mut self, resource: &Served) {
        for ip in resource.addresses() {
            let names = self.by_ip.entry(ip).or_default();
            if !names.iter().any(|name| **name == *resource.name()) {
                names.push(resource.shared_name().clone());
            }
        }
    }

    pub fn remove(&mut self, resource: &Served) {
        for ip in resource.addresses() {
            if let Some(names) = self.by_ip.get_mut(&ip) {
                names.retain(|name| **name != *resource.name());
                if names.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    /// Names of the resources at `ip`.
    pub fn at(&self, ip: IpAddr) -> &[Arc<str>] {
        self.by_ip
            .get(&ip)
            .map(|names| &names[..])
            .unwrap_or_default()
    }
}

/// What answers `keys` (addresses or resource names) in `resources`: each
/// resource found, and for a Service the workloads of its endpoints.
pub fn answer(
    keys: &[String],
    resources: &std::collections::BTreeMap<Arc<str>, Arc<Served>>,
    index: &AddressIndex,
) -> Vec<Arc<Served>> {
    let mut found: Vec<Arc<Served>> = Vec::new();
    let add = |name: &str, found: &mut Vec<Arc<Served>>| {
        if found.iter().any(|r| r.name() == name) {
            return;
        }
        if let Some(resource) = resources.get(name) {
            found.push(resource.clone());
        }
    };
    for key in keys {
        match key.parse::<IpAddr>() {
            Ok(ip) => {
                for name in index.at(ip.to_canonical()) {
                    add(name, &mut found);
                }
            }
            Err(_) => add(key, &mut found),
        }
    }
    let endpoints: Vec<String> = found
        .iter()
        .filter_map(|resource| match resource.item() {
            Item::Service(service) => Some(service),
            _ => None,
        })
        .flat_map(|service| &service.endpoints)
        .map(|endpoint| format!("workload/{}", endpoint.workload_uid))
        .collect();
    for name in endpoints {
        add(&name, &mut found);
    }
    found
}

/// The answer to a `learn` as a response of the stream's `version`.
pub fn encode_answer(
    version: u64,
    keys: Vec<String>,
    found: &[Arc<Served>],
    compressed: bool,
) -> Outgoing {
    let rest = pb::DiscoveryResponse {
        version_info: version.to_string(),
        nonce: format!("{version}-learned"),
        learned: keys,
        ..Default::default()
    };
    let encoded = encode(&rest, found.iter().map(|r| &r.encoded()[..]));
    if compressed {
        Outgoing::compress(&encoded)
    } else {
        Outgoing::plain(encoded)
    }
}

#[cfg(test)]
mod tests {
    use kanava_cluster::MeshState;
    use kanava_mesh::{Endpoint, Identity, Service, ServicePort, TunnelProtocol, Workload};
    use prost::Message;

    use super::*;
    use crate::store::Store;

    fn workload(uid: &str, node: &str, ip: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            service_account: "sa".into(),
            node: node.into(),
            ips: vec![ip.parse().unwrap()],
            identity: Identity::new("cluster.local", "shop", "sa").unwrap(),
            protocol: TunnelProtocol::Hbone,
            labels: Default::default(),
            mtls_mode: Default::default(),
            resource_version: "1".into(),
            plaintext_inbound_ports: Vec::new(),
        })
    }

    fn store() -> Store {
        let store = Store::new();
        store.replace(&MeshState {
            workloads: vec![
                workload("mine", "n1", "10.0.0.1"),
                workload("far", "n2", "10.0.0.2"),
            ],
            services: vec![Arc::new(Service {
                namespace: "shop".into(),
                name: "api".into(),
                addresses: vec!["10.96.0.1".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                    target_port_name: String::new(),
                }],
                endpoints: vec![Endpoint {
                    workload_uid: "far".into(),
                    ports: [(80, 8080)].into(),
                }],
                resource_version: "1".into(),
            })],
            ..Default::default()
        });
        store
    }

    fn names(response: &pb::DiscoveryResponse) -> Vec<&str> {
        response.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn a_node_is_sent_its_workloads_and_the_services_without_endpoints() {
        let store = store();
        let snapshot = store.snapshot();
        for compressed in [false, true] {
            let parts: Vec<pb::DiscoveryResponse> = snapshot
                .on_demand("n1", compressed)
                .into_iter()
                .map(|part| {
                    let bytes = if part.compressed {
                        zstd::bulk::decompress(&part.bytes, 1 << 20).unwrap().into()
                    } else {
                        part.bytes
                    };
                    pb::DiscoveryResponse::decode(bytes).unwrap()
                })
                .collect();
            assert_eq!(parts.len(), 2);
            assert!(parts.iter().all(|p| p.on_demand && p.full_snapshot));
            assert!(parts[0].more && !parts[1].more);
            assert_eq!(names(&parts[0]), ["workload/mine"]);
            assert_eq!(names(&parts[1]), ["service/shop/api"]);
            let Some(pb::resource::Kind::Service(api)) = &parts[1].resources[0].kind else {
                panic!("a service");
            };
            assert!(api.endpoints.is_empty());
        }
    }

    #[test]
    fn an_address_is_answered_with_what_holds_it() {
        let store = store();
        let answer = |keys: &[&str]| {
            let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
            let found = store.learn(&keys);
            let response =
                pb::DiscoveryResponse::decode(encode_answer(7, keys.clone(), &found, false).bytes)
                    .unwrap();
            assert_eq!(response.learned, keys);
            assert_eq!(response.version_info, "7");
            names(&response)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(answer(&["10.0.0.2"]), ["workload/far"]);
        assert_eq!(
            answer(&["10.96.0.1"]),
            ["service/shop/api", "workload/far"],
            "a Service with the workloads of its endpoints"
        );
        assert_eq!(answer(&["workload/mine"]), ["workload/mine"]);
        assert!(answer(&["10.9.9.9"]).is_empty(), "nothing there");
        // An address that changes hands follows the change.
        store.replace(&MeshState {
            workloads: vec![
                workload("mine", "n1", "10.0.0.1"),
                workload("far", "n2", "10.0.0.3"),
            ],
            ..Default::default()
        });
        assert!(answer(&["10.0.0.2"]).is_empty());
        assert_eq!(answer(&["10.0.0.3"]), ["workload/far"]);
    }
}
