//! Where an outbound connection goes, decided before any socket is opened.
//!
//! [`route`] is a pure function of what the mesh knows (the
//! [`WorkloadStore`]), the pod that opened the connection and the address it
//! dialled. The outbound handler then carries out the [`Route`]; keeping the
//! two apart lets every routing rule be tested without a network.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use kanava_mesh::{Identity, Workload, ports};

use super::PodInfo;
use crate::metrics::{Outcome, Transport};
use crate::workloads::WorkloadStore;

/// The decision for one outbound connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// To one of a Service's ready endpoints, tried in turn until one
    /// accepts (the service port already mapped to each endpoint's port).
    Service {
        /// `namespace/name`
        service: String,
        endpoints: Vec<Hop>,
    },
    /// Straight to the dialled address.
    Direct(Hop),
    /// Not carried at all.
    Refused(Refusal),
}

/// One way to reach one destination address.
#[derive(Clone, Debug, PartialEq)]
pub enum Hop {
    /// Over HBONE, from the source pod's identity; the destination must prove
    /// the identity its workload has.
    Hbone {
        address: SocketAddr,
        workload: Arc<Workload>,
    },
    /// Plain TCP from inside the source pod's namespace: the destination is
    /// not in the mesh (`workload` says which pod it is, when the mesh knows).
    Passthrough {
        address: SocketAddr,
        workload: Option<Arc<Workload>>,
    },
}

impl Hop {
    /// Where the connection is finally sent.
    pub fn address(&self) -> SocketAddr {
        match self {
            Hop::Hbone { address, .. } | Hop::Passthrough { address, .. } => *address,
        }
    }

    pub fn transport(&self) -> Transport {
        match self {
            Hop::Hbone { .. } => Transport::Hbone,
            Hop::Passthrough { .. } => Transport::Passthrough,
        }
    }

    /// The pod at the destination, if the mesh knows it.
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Hop::Hbone { workload, .. } => Some(workload),
            Hop::Passthrough { workload, .. } => workload.as_ref(),
        }
    }

    /// The identity the destination must prove (HBONE only).
    pub fn expected_identity(&self) -> Option<&Identity> {
        match self {
            Hop::Hbone { workload, .. } => Some(&workload.identity),
            Hop::Passthrough { .. } => None,
        }
    }

    fn to(address: SocketAddr, workload: Option<Arc<Workload>>) -> Hop {
        match workload {
            Some(workload) if workload.in_mesh() => Hop::Hbone { address, workload },
            workload => Hop::Passthrough { address, workload },
        }
    }
}

/// Why a connection is not carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The pod dialled one of the ztunnel's own listeners in it (directly,
    /// on its own IP or on loopback): proxying would loop back into it.
    ZtunnelListener(SocketAddr),
    /// A loopback or unspecified destination, which only reaches the ztunnel
    /// when a pod dials its listeners directly: never proxied.
    LocalAddress(SocketAddr),
    /// The Service has no such port.
    NoServicePort { service: String, port: u16 },
    /// The Service has no ready endpoint serving that port.
    NoReadyEndpoint { service: String, port: u16 },
}

impl Refusal {
    /// The refusal as a metric label.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::ZtunnelListener(_) | Refusal::LocalAddress(_) => "loop",
            Refusal::NoServicePort { .. } => "no_service_port",
            Refusal::NoReadyEndpoint { .. } => "no_ready_endpoint",
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::ZtunnelListener(_) | Refusal::LocalAddress(_) => Outcome::Denied,
            Refusal::NoServicePort { .. } | Refusal::NoReadyEndpoint { .. } => Outcome::Failed,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ZtunnelListener(address) => write!(
                f,
                "{address} is the ztunnel's own listener in this pod; proxying it would loop"
            ),
            Refusal::LocalAddress(address) => write!(
                f,
                "{address} is a loopback or unspecified address; only a pod dialling the \
                 ztunnel's listeners directly sends one here, and it is never proxied"
            ),
            Refusal::NoServicePort { service, port } => {
                write!(f, "service {service} has no port {port}")
            }
            Refusal::NoReadyEndpoint { service, port } => write!(
                f,
                "service {service} has no ready endpoint for port {port} (are its pods Ready?)"
            ),
        }
    }
}

/// Decides where a connection that `source` opened to `destination` goes.
///
/// - a Service's virtual IP: its ready endpoints whose pods the mesh knows,
///   each with the service port mapped to the pod's port (named target ports
///   are resolved per pod by the control plane);
/// - a workload in the mesh: HBONE, expecting its identity;
/// - a pod outside the mesh, or an address the mesh does not know: plain TCP.
pub fn route(store: &WorkloadStore, source: &PodInfo, destination: SocketAddr) -> Route {
    let ip = destination.ip().to_canonical();
    if ports::is_pod_listener(destination.port()) && (source.owns(ip) || ip.is_loopback()) {
        return Route::Refused(Refusal::ZtunnelListener(destination));
    }
    if ip.is_loopback() || ip.is_unspecified() {
        return Route::Refused(Refusal::LocalAddress(destination));
    }
    // One read lock for the whole decision: a Service's endpoints are
    // resolved together, and updates never wait behind a lookup for long.
    let view = store.view();
    let Some(service) = view.find_service(destination.ip()) else {
        let workload = view.find_by_ip(destination.ip()).cloned();
        return Route::Direct(Hop::to(destination, workload));
    };
    let port = destination.port();
    if !service.ports.iter().any(|p| p.port == port) {
        return Route::Refused(Refusal::NoServicePort {
            service: service.key(),
            port,
        });
    }
    let endpoints: Vec<Hop> = service
        .endpoints
        .iter()
        .filter_map(|endpoint| {
            let target_port = *endpoint.ports.get(&port)?;
            let workload = view.find_by_uid(&endpoint.workload_uid)?;
            let ip = *workload.ips.first()?;
            Some(Hop::to(
                SocketAddr::new(ip, target_port),
                Some(workload.clone()),
            ))
        })
        .collect();
    if endpoints.is_empty() {
        return Route::Refused(Refusal::NoReadyEndpoint {
            service: service.key(),
            port,
        });
    }
    Route::Service {
        service: service.key(),
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use kanava_mesh::{Endpoint, Service, ServicePort, TunnelProtocol};

    use super::*;
    use crate::proxy::test_support;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("IP")
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    fn workload(name: &str, address: &str, protocol: TunnelProtocol) -> Workload {
        Workload {
            protocol,
            ..test_support::workload(name, address)
        }
    }

    fn store(workloads: &[Workload], services: &[Service]) -> WorkloadStore {
        test_support::store(workloads, services, &[])
    }

    fn client() -> PodInfo {
        test_support::pod_info("client", "10.244.1.2")
    }

    /// Service `shop/web` on 10.96.0.10: port 80 → named port `http`
    /// (8080 on web-a, 9090 on web-b), port 443 → 8443 on web-a only.
    fn web_service() -> Service {
        Service {
            namespace: "shop".into(),
            name: "web".into(),
            addresses: vec![ip("10.96.0.10")],
            ports: vec![
                ServicePort {
                    port: 80,
                    target_port: 0,
                    target_port_name: "http".into(),
                },
                ServicePort {
                    port: 443,
                    target_port: 8443,
                    target_port_name: String::new(),
                },
            ],
            endpoints: vec![
                Endpoint {
                    workload_uid: "web-a".into(),
                    ports: [(80, 8080), (443, 8443)].into(),
                },
                Endpoint {
                    workload_uid: "web-b".into(),
                    ports: [(80, 9090)].into(),
                },
            ],
            resource_version: "1".into(),
        }
    }

    fn mesh() -> WorkloadStore {
        store(
            &[
                workload("client", "10.244.1.2", TunnelProtocol::Hbone),
                workload("web-a", "10.244.2.3", TunnelProtocol::Hbone),
                workload("web-b", "10.244.2.4", TunnelProtocol::None),
                workload("legacy", "10.244.2.9", TunnelProtocol::None),
            ],
            &[web_service()],
        )
    }

    #[test]
    fn a_service_vip_maps_its_port_to_each_endpoints_named_port() {
        let Route::Service { service, endpoints } =
            route(&mesh(), &client(), addr("10.96.0.10:80"))
        else {
            panic!("not routed to the service");
        };
        assert_eq!(service, "shop/web");
        let addresses: Vec<_> = endpoints.iter().map(Hop::address).collect();
        assert_eq!(
            addresses,
            [addr("10.244.2.3:8080"), addr("10.244.2.4:9090")]
        );
        // An enrolled endpoint over HBONE, proving its own identity; one
        // outside the mesh in plain TCP.
        assert_eq!(endpoints[0].transport(), Transport::Hbone);
        assert_eq!(
            endpoints[0].expected_identity().map(ToString::to_string),
            Some("spiffe://cluster.local/ns/shop/sa/web-a".into())
        );
        assert_eq!(endpoints[1].transport(), Transport::Passthrough);
        assert_eq!(endpoints[1].expected_identity(), None);
    }

    #[test]
    fn a_service_port_only_some_endpoints_serve_goes_to_those() {
        let Route::Service { endpoints, .. } = route(&mesh(), &client(), addr("10.96.0.10:443"))
        else {
            panic!("not routed to the service");
        };
        let addresses: Vec<_> = endpoints.iter().map(Hop::address).collect();
        assert_eq!(addresses, [addr("10.244.2.3:8443")]);
    }

    #[test]
    fn a_port_the_service_lacks_is_refused() {
        let decision = route(&mesh(), &client(), addr("10.96.0.10:8080"));
        assert_eq!(
            decision,
            Route::Refused(Refusal::NoServicePort {
                service: "shop/web".into(),
                port: 8080
            })
        );
        let Route::Refused(refusal) = decision else {
            unreachable!()
        };
        assert_eq!(refusal.outcome(), Outcome::Failed);
    }

    #[test]
    fn a_service_without_ready_endpoints_is_refused() {
        let mut service = web_service();
        service.endpoints.clear();
        let store = store(&[], &[service]);
        assert_eq!(
            route(&store, &client(), addr("10.96.0.10:80")),
            Route::Refused(Refusal::NoReadyEndpoint {
                service: "shop/web".into(),
                port: 80
            })
        );
    }

    #[test]
    fn endpoints_whose_pods_are_unknown_are_skipped() {
        // The control plane named web-a and web-b, but this ztunnel knows
        // neither pod yet: no address to send to.
        let store = store(&[], &[web_service()]);
        assert!(matches!(
            route(&store, &client(), addr("10.96.0.10:80")),
            Route::Refused(Refusal::NoReadyEndpoint { .. })
        ));
    }

    #[test]
    fn an_enrolled_pod_is_reached_over_hbone_with_its_identity() {
        let decision = route(&mesh(), &client(), addr("10.244.2.3:8080"));
        let Route::Direct(hop) = decision else {
            panic!("not direct: {decision:?}");
        };
        assert_eq!(hop.transport(), Transport::Hbone);
        assert_eq!(hop.address(), addr("10.244.2.3:8080"));
        assert_eq!(
            hop.workload().map(|w| w.display_name()),
            Some("shop/web-a".into())
        );
    }

    #[test]
    fn an_unenrolled_or_opted_out_pod_is_passed_through_by_name() {
        let Route::Direct(hop) = route(&mesh(), &client(), addr("10.244.2.9:5432")) else {
            panic!("not direct");
        };
        assert_eq!(hop.transport(), Transport::Passthrough);
        assert_eq!(
            hop.workload().map(|w| w.display_name()),
            Some("shop/legacy".into())
        );
    }

    #[test]
    fn an_unknown_address_is_passed_through() {
        assert_eq!(
            route(&mesh(), &client(), addr("192.0.2.7:443")),
            Route::Direct(Hop::Passthrough {
                address: addr("192.0.2.7:443"),
                workload: None
            })
        );
    }

    #[test]
    fn dialling_the_ztunnels_own_listeners_is_refused() {
        for destination in [
            "10.244.1.2:15001",
            "10.244.1.2:15006",
            "10.244.1.2:15008",
            "127.0.0.1:15001",
            "127.0.0.53:15006",
            "[::1]:15008",
            "[::ffff:127.0.0.1]:15001",
        ] {
            let decision = route(&mesh(), &client(), addr(destination));
            assert!(
                matches!(decision, Route::Refused(Refusal::ZtunnelListener(_))),
                "{destination}: {decision:?}"
            );
            let Route::Refused(refusal) = decision else {
                unreachable!()
            };
            assert_eq!(refusal.outcome(), Outcome::Denied);
        }
        // Another pod's port 15001 is an ordinary destination.
        assert!(matches!(
            route(&mesh(), &client(), addr("10.244.2.3:15001")),
            Route::Direct(Hop::Hbone { .. })
        ));
    }

    #[test]
    fn loopback_and_unspecified_destinations_are_never_proxied() {
        for destination in ["127.0.0.1:8080", "[::1]:80", "0.0.0.0:80", "[::]:443"] {
            assert!(
                matches!(
                    route(&mesh(), &client(), addr(destination)),
                    Route::Refused(Refusal::LocalAddress(_))
                ),
                "{destination}"
            );
        }
    }

    #[test]
    fn the_own_pod_is_reached_over_hbone_as_itself() {
        let Route::Direct(hop) = route(&mesh(), &client(), addr("10.244.1.2:8080")) else {
            panic!("not direct");
        };
        assert_eq!(hop.transport(), Transport::Hbone);
        assert_eq!(hop.expected_identity(), Some(&client().identity));
    }

    #[test]
    fn ipv4_mapped_destinations_find_the_same_workload() {
        assert!(matches!(
            route(&mesh(), &client(), addr("[::ffff:10.244.2.3]:8080")),
            Route::Direct(Hop::Hbone { .. })
        ));
    }
}
