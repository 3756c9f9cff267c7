use std::collections::BTreeMap;
use std::net::IpAddr;

use kanava_proto::v1 as pb;

use crate::Error;

/// A Kubernetes Service (ClusterIP) with its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Virtual IPs.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    pub resource_version: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    /// 0 when the target port is named.
    pub target_port: u16,
    pub target_port_name: String,
}

/// A ready pod behind a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_uid: String,
    /// Service port → port on this pod.
    pub ports: BTreeMap<u16, u16>,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn resource_name(&self) -> String {
        format!("service/{}/{}", self.namespace, self.name)
    }

    pub fn to_proto(&self) -> pb::Service {
        pb::Service {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            addresses: self.addresses.iter().map(ToString::to_string).collect(),
            ports: self
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    port: p.port.into(),
                    target_port: p.target_port.into(),
                    target_port_name: p.target_port_name.clone(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| pb::Endpoint {
                    workload_uid: e.workload_uid.clone(),
                    ports: e
                        .ports
                        .iter()
                        .map(|(&k, &v)| (u32::from(k), u32::from(v)))
                        .collect(),
                })
                .collect(),
            resource_version: self.resource_version.clone(),
        }
    }

    /// Validates a Service received over the wire.
    pub fn from_proto(s: &pb::Service) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidService {
            service: format!("{}/{}", s.namespace, s.name),
            reason,
        };
        let port = |p: u32, allow_zero: bool| {
            u16::try_from(p)
                .ok()
                .filter(|&p| allow_zero || p != 0)
                .ok_or_else(|| invalid(format!("port {p} is not in 1-65535")))
        };
        let addresses = s
            .addresses
            .iter()
            .map(|a| {
                a.parse::<IpAddr>()
                    .map(|ip| ip.to_canonical())
                    .map_err(|_| invalid(format!("address {a:?} is not an IP")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ports = s
            .ports
            .iter()
            .map(|p| {
                Ok(ServicePort {
                    port: port(p.port, false)?,
                    target_port: port(p.target_port, true)?,
                    target_port_name: p.target_port_name.clone(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let endpoints = s
            .endpoints
            .iter()
            .map(|e| {
                let ports = e
                    .ports
                    .iter()
                    .map(|(&k, &v)| Ok((port(k, false)?, port(v, false)?)))
                    .collect::<Result<BTreeMap<_, _>, Error>>()?;
                Ok(Endpoint {
                    workload_uid: e.workload_uid.clone(),
                    ports,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Service {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            addresses,
            ports,
            endpoints,
            resource_version: s.resource_version.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_and_validation() {
        let service = Service {
            namespace: "shop".into(),
            name: "web".into(),
            addresses: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                target_port: 0,
                target_port_name: "http".into(),
            }],
            endpoints: vec![Endpoint {
                workload_uid: "u1".into(),
                ports: [(80, 8080)].into(),
            }],
            resource_version: "3".into(),
        };
        assert_eq!(Service::from_proto(&service.to_proto()).unwrap(), service);
        let mut bad = service.to_proto();
        bad.endpoints[0].ports.insert(80, 0);
        assert!(
            Service::from_proto(&bad)
                .unwrap_err()
                .to_string()
                .contains("shop/web")
        );
    }
}
