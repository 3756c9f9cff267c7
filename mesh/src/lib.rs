//! The words every Kanava component shares.
//!
//! - [`Identity`]: a workload's SPIFFE identity, the thing mTLS proves.
//! - [`Workload`]: a pod as the data plane sees it.
//! - [`Service`]: a ClusterIP Service and its ready endpoints.
//! - [`OpenPort`]: a UDP or SCTP port a STRICT pod opens outside the mesh.
//! - [`policy`]: authorization policies and how they decide.
//! - [`names`], [`ports`], [`marks`]: values fixed for users and for
//!   compatibility with Istio ambient (the README's tables list them;
//!   `ARCHITECTURE.md` says where each is used).
//!
//! Conversions to and from the wire types of [`kanava_proto`] live beside the
//! types, so each component validates what it receives the same way.

mod error;
mod identity;
mod open_port;
pub mod policy;
mod service;
mod workload;

pub use error::Error;
pub use identity::{DEFAULT_TRUST_DOMAIN, Identity};
pub use open_port::{OpenPort, PLAINTEXT_INBOUND_PORTS_ANNOTATION, PortProtocol};
pub use service::{Endpoint, Service, ServicePort};
pub use workload::{Labels, MtlsMode, TunnelProtocol, Workload};

/// Labels and other names users see.
pub mod names {
    /// Label on a Namespace that enrolls its pods (value [`AMBIENT`]), or on a
    /// Pod that opts it out (value [`NONE`]).
    pub const DATAPLANE_MODE_LABEL: &str = "kanava.io/dataplane-mode";
    /// Value of [`DATAPLANE_MODE_LABEL`] that enrolls a namespace.
    pub const AMBIENT: &str = "ambient";
    /// Value of [`DATAPLANE_MODE_LABEL`] that opts a pod out.
    pub const NONE: &str = "none";
    /// Label on a Namespace: `strict` (the default) refuses plaintext inbound
    /// to its enrolled pods, `permissive` admits it as an unauthenticated
    /// peer, subject to policy.
    pub const MTLS_MODE_LABEL: &str = "kanava.io/mtls-mode";
    /// Namespace whose policies apply to the whole mesh, by default.
    pub const ROOT_NAMESPACE: &str = "kanava-system";
    /// Namespace the mesh's own components run in.
    pub const SYSTEM_NAMESPACE: &str = "kanava-system";
    /// Service account assumed when a pod names none.
    pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
    /// The mesh root's certificate (PEM) in the control plane's CA
    /// directory (`--ca-dir`), also what ztunnels trust.
    pub const CA_ROOT_CERT_FILE: &str = "root-cert.pem";
    /// The mesh root's private key (PEM) in the control plane's CA directory.
    pub const CA_ROOT_KEY_FILE: &str = "root-key.pem";
    /// DNS name in the control plane's serving certificate, and the name a
    /// ztunnel verifies by default.
    pub const CONTROL_PLANE_SERVER_NAME: &str = "kanava-control-plane.kanava-system.svc";

    /// Secret (in the control plane's namespace) holding the root the control
    /// plane generated on its first start.
    pub const CA_SECRET: &str = "kanava-ca";
    /// Secret of a plug-in CA: the operator's intermediate, which the
    /// control plane signs with instead of generating a root.
    pub const PLUGIN_CA_SECRET: &str = "cacerts";
    /// ConfigMap publishing the roots ztunnels and users trust.
    pub const ROOT_CERT_CONFIGMAP: &str = "kanava-root-cert";
    /// The control plane's Service; it owns the CA Secret and the roots'
    /// ConfigMap, so that uninstalling the chart takes them along.
    pub const CONTROL_PLANE_SERVICE: &str = "kanava-control-plane";
    /// Keys of the CA Secrets (the names Istio's users know). The signing
    /// certificate and its key:
    pub const CA_CERT_KEY: &str = "ca-cert.pem";
    pub const CA_KEY_KEY: &str = "ca-key.pem";
    /// The trusted roots (one or more PEM certificates); also the key of
    /// [`ROOT_CERT_CONFIGMAP`].
    pub const ROOT_CERT_KEY: &str = "root-cert.pem";
    /// The signing certificate's chain up to the root, served with every
    /// workload certificate.
    pub const CERT_CHAIN_KEY: &str = "cert-chain.pem";
    /// Service account of the ztunnel DaemonSet.
    pub const ZTUNNEL_SERVICE_ACCOUNT: &str = "ztunnel";
    /// Audience of the projected token a ztunnel authenticates with.
    pub const TOKEN_AUDIENCE: &str = "kanava";
}

/// Well-known ports.
pub mod ports {
    /// ztunnel admin API (node network namespace, localhost only).
    pub const ADMIN: u16 = 15000;
    /// Outbound capture listener inside each enrolled pod.
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext capture listener inside each enrolled pod.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// HBONE (mTLS tunnel) listener inside each enrolled pod.
    pub const HBONE: u16 = 15008;
    /// Control plane gRPC: discovery and certificates, over TLS.
    pub const CONTROL_PLANE: u16 = 15012;
    /// Control plane readiness (`/ready`), plain HTTP, for the kubelet.
    pub const CONTROL_PLANE_READINESS: u16 = 15014;
    /// ztunnel Prometheus metrics.
    pub const METRICS: u16 = 15020;
    /// ztunnel readiness.
    pub const READINESS: u16 = 15021;

    /// The ports the ztunnel listens on inside every enrolled pod. A
    /// connection aimed at one of them from the pod itself, or proxied to
    /// one of them, would come straight back to the ztunnel: a loop.
    pub const POD_LISTENERS: [u16; 3] = [OUTBOUND, INBOUND_PLAINTEXT, HBONE];

    /// Whether `port` is one of [`POD_LISTENERS`].
    pub fn is_pod_listener(port: u16) -> bool {
        POD_LISTENERS.contains(&port)
    }
}

/// Packet marks shared by the ztunnel's sockets and the capture rules.
pub mod marks {
    /// Mark on every socket the ztunnel opens; capture rules exempt it, so
    /// the proxy's own traffic is never redirected back to itself.
    pub const PROXY: u32 = 0x539;
    /// Connection mark for connections the ztunnel made with a spoofed
    /// source address; replies carrying it are routed back to the ztunnel.
    pub const ORIGINAL_SOURCE: u32 = 0x111;
    /// Bits of the mark that Kanava owns.
    pub const MASK: u32 = 0xfff;
    /// Routing table (in the pod's namespace) that delivers marked replies
    /// locally.
    pub const ROUTE_TABLE: u32 = 100;
}

/// Whether a pod is enrolled in the mesh: its namespace is labelled
/// `kanava.io/dataplane-mode=ambient` and the pod does not opt out with
/// `kanava.io/dataplane-mode=none`.
///
/// The one rule shared by the control plane (which tells peers to use HBONE)
/// and by whoever hands pods to the ztunnel (which captures them).
pub fn is_enrolled(
    namespace_labels: Option<&std::collections::BTreeMap<String, String>>,
    pod_labels: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    fn mode(labels: Option<&std::collections::BTreeMap<String, String>>) -> Option<&str> {
        labels.and_then(|l| l.get(names::DATAPLANE_MODE_LABEL).map(String::as_str))
    }
    mode(namespace_labels) == Some(names::AMBIENT) && mode(pod_labels) != Some(names::NONE)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(value: Option<&str>) -> BTreeMap<String, String> {
        value
            .map(|v| [(names::DATAPLANE_MODE_LABEL.to_string(), v.to_string())].into())
            .unwrap_or_default()
    }

    #[test]
    fn enrollment_follows_namespace_label_and_pod_opt_out() {
        let ambient = labels(Some("ambient"));
        let none = labels(Some("none"));
        let empty = labels(None);
        assert!(is_enrolled(Some(&ambient), Some(&empty)));
        assert!(is_enrolled(Some(&ambient), None));
        assert!(!is_enrolled(Some(&ambient), Some(&none)));
        assert!(
            !is_enrolled(Some(&empty), Some(&ambient)),
            "pods cannot enroll themselves"
        );
        assert!(!is_enrolled(None, None));
        assert!(!is_enrolled(Some(&labels(Some("sidecar"))), None));
    }
}
