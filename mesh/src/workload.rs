use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use kanava_proto::v1 as pb;

use crate::{Error, Identity, OpenPort};

/// How peers reach a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TunnelProtocol {
    /// Plain TCP: the workload is not in the mesh.
    None,
    /// HBONE: mTLS + HTTP/2 CONNECT to port 15008 of the workload's IP.
    Hbone,
}

/// Whether an enrolled workload accepts plaintext inbound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Only mutual TLS; plaintext is refused.
    #[default]
    Strict,
    /// Plaintext is admitted as an unauthenticated peer, subject to policy.
    Permissive,
}

/// A pod's labels. Shared: a control plane holds the same map for the pod,
/// its workload and the pod's ReplicaSet siblings.
pub type Labels = Arc<BTreeMap<String, String>>;

/// A pod, as the data plane needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    pub protocol: TunnelProtocol,
    pub labels: Labels,
    pub mtls_mode: MtlsMode,
    /// `metadata.resourceVersion` of the pod.
    pub resource_version: String,
    /// UDP/SCTP ports that take packets from outside the pod in STRICT
    /// mode; every other non-TCP packet from outside is dropped.
    pub plaintext_inbound_ports: Vec<OpenPort>,
}

impl Workload {
    /// Name of this workload's discovery resource.
    pub fn resource_name(&self) -> String {
        format!("workload/{}", self.uid)
    }

    /// `namespace/name`, the way people refer to a pod.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether peers must reach this workload through the mesh.
    pub fn in_mesh(&self) -> bool {
        self.protocol == TunnelProtocol::Hbone
    }

    pub fn to_proto(&self) -> pb::Workload {
        pb::Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            node: self.node.clone(),
            ips: self.ips.iter().map(ToString::to_string).collect(),
            identity: self.identity.to_string(),
            protocol: match self.protocol {
                TunnelProtocol::None => pb::TunnelProtocol::None,
                TunnelProtocol::Hbone => pb::TunnelProtocol::Hbone,
            } as i32,
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            mtls_mode: match self.mtls_mode {
                MtlsMode::Strict => pb::MtlsMode::Strict,
                MtlsMode::Permissive => pb::MtlsMode::Permissive,
            } as i32,
            resource_version: self.resource_version.clone(),
            plaintext_inbound_ports: self
                .plaintext_inbound_ports
                .iter()
                .map(|p| p.to_proto())
                .collect(),
        }
    }

    /// The non-TCP ports open to traffic from outside the pod, or `None`
    /// when all are (PERMISSIVE, or not in the mesh).
    pub fn non_tcp_guard(&self) -> Option<&[OpenPort]> {
        (self.in_mesh() && self.mtls_mode == MtlsMode::Strict)
            .then_some(self.plaintext_inbound_ports.as_slice())
    }

    /// Validates a workload received over the wire.
    pub fn from_proto(w: &pb::Workload) -> Result<Self, Error> {
        let what = format!("workload {}/{} ({})", w.namespace, w.name, w.uid);
        if w.uid.is_empty() {
            return Err(Error::MissingField { what, field: "uid" });
        }
        let ips = w
            .ips
            .iter()
            .map(|ip| {
                ip.parse::<IpAddr>().map_err(|_| Error::InvalidIp {
                    workload: what.clone(),
                    input: ip.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let protocol = match pb::TunnelProtocol::try_from(w.protocol) {
            Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
            Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
            Err(_) => {
                return Err(Error::UnknownProtocol {
                    what,
                    value: w.protocol,
                });
            }
        };
        let mtls_mode = match pb::MtlsMode::try_from(w.mtls_mode) {
            Ok(pb::MtlsMode::Strict) => MtlsMode::Strict,
            Ok(pb::MtlsMode::Permissive) => MtlsMode::Permissive,
            Err(_) => {
                return Err(Error::UnknownProtocol {
                    what: format!("{what}: mTLS mode"),
                    value: w.mtls_mode,
                });
            }
        };
        Ok(Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            ips,
            identity: w.identity.parse()?,
            protocol,
            labels: Arc::new(
                w.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            mtls_mode,
            resource_version: w.resource_version.clone(),
            plaintext_inbound_ports: w
                .plaintext_inbound_ports
                .iter()
                .map(OpenPort::from_proto)
                .collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Workload {
        Workload {
            uid: "0b7c".into(),
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "node-1".into(),
            ips: vec!["10.244.1.2".parse().unwrap()],
            identity: Identity::new("cluster.local", "shop", "web").unwrap(),
            protocol: TunnelProtocol::Hbone,
            labels: Arc::new([("app".to_string(), "web".to_string())].into()),
            mtls_mode: MtlsMode::Permissive,
            resource_version: "12".into(),
            plaintext_inbound_ports: OpenPort::parse_list("udp/53,sctp/3868").unwrap(),
        }
    }

    #[test]
    fn proto_round_trip() {
        let w = sample();
        assert_eq!(Workload::from_proto(&w.to_proto()).unwrap(), w);
    }

    #[test]
    fn rejects_bad_wire_values() {
        let mut p = sample().to_proto();
        p.ips.push("10.244.1.300".into());
        let err = Workload::from_proto(&p).unwrap_err();
        assert!(err.to_string().contains("10.244.1.300"), "{err}");

        let mut p = sample().to_proto();
        p.protocol = 7;
        assert!(matches!(
            Workload::from_proto(&p),
            Err(Error::UnknownProtocol { value: 7, .. })
        ));

        let mut p = sample().to_proto();
        p.identity = "spiffe://cluster.local/ns/shop".into();
        assert!(matches!(
            Workload::from_proto(&p),
            Err(Error::InvalidIdentity { .. })
        ));
    }
}
