//! Prometheus metrics of the control plane, served on `/metrics` beside
//! `/ready` (port 15014). Labels are small fixed sets: no node, pod or
//! identity names, so their number does not grow with the cluster.
//!
//! | metric | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `kanava_control_plane_ztunnels_connected` | gauge | | discovery streams open now |
//! | `kanava_control_plane_discovery_pushes_total` | counter | `kind` (`snapshot`, `update`) | responses sent to ztunnels |
//! | `kanava_control_plane_discovery_sent_bytes_total` | counter | `kind` (`snapshot`, `update`) | bytes of the responses sent, as sent (compressed for a ztunnel that accepts it) |
//! | `kanava_control_plane_discovery_push_delay_seconds` | histogram | | from a change entering the store to its update leaving for a ztunnel |
//! | `kanava_control_plane_discovery_learned_total` | counter | | addresses and names on-demand ztunnels asked for (`kind="learned"` in the sent bytes is their answers) |
//! | `kanava_control_plane_discovery_nacks_total` | counter | | responses ztunnels refused |
//! | `kanava_control_plane_certificate_requests_total` | counter | `result` (`signed`, `refused`), `reason` | signing requests |
//! | `kanava_control_plane_policies_rejected` | gauge | | AuthorizationPolicies rejected as invalid now |
//! | `kanava_control_plane_configuration_version` | gauge | | version of the state served |
//! | `kanava_control_plane_source_synced` | gauge | | 1 once every kind has been read in full |
//! | `kanava_control_plane_source_resource_version` | gauge | | newest `resourceVersion` read from a manifest directory, once served (the lab waits on it; 0 on Kubernetes) |
//! | `kanava_control_plane_source_last_change_timestamp_seconds` | gauge | | when the source last delivered a view (age: `time() - this`) |
//! | `kanava_control_plane_ca_reloads_total` | counter | `result` (`changed`, `refused`) | CA material read again and found changed, or unusable (the CA in force stays) |
//! | `kanava_control_plane_trust_roots` | gauge | | roots in the trust bundle served (2 during a rotation) |

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub ca_reloads: Family<ResultLabels, Counter>,
    pub trust_roots: Gauge,
    pub ztunnels_connected: Gauge,
    pub pushes: Family<PushLabels, Counter>,
    pub sent_bytes: Family<PushLabels, Counter>,
    pub push_delay: Histogram,
    pub nacks: Counter,
    pub learned: Counter,
    pub certificate_requests: Family<CertificateLabels, Counter>,
    pub policies_rejected: Gauge,
    pub configuration_version: Gauge,
    pub source_synced: Gauge,
    pub source_last_change: Gauge<f64, AtomicU64>,
    pub source_resource_version: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kanava_control_plane");
        let metrics = Metrics {
            registry: Registry::default(),
            ca_reloads: Family::default(),
            trust_roots: Gauge::default(),
            ztunnels_connected: Gauge::default(),
            pushes: Family::default(),
            sent_bytes: Family::default(),
            // 0.5 ms to about 4 s.
            push_delay: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            nacks: Counter::default(),
            learned: Counter::default(),
            certificate_requests: Family::default(),
            policies_rejected: Gauge::default(),
            configuration_version: Gauge::default(),
            source_synced: Gauge::default(),
            source_last_change: Gauge::default(),
            source_resource_version: Gauge::default(),
        };
        registry.register(
            "ztunnels_connected",
            "Discovery streams open now",
            metrics.ztunnels_connected.clone(),
        );
        registry.register(
            "discovery_pushes",
            "Discovery responses sent, by kind (snapshot, update)",
            metrics.pushes.clone(),
        );
        registry.register(
            "discovery_sent_bytes",
            "Bytes of the discovery responses sent, as sent (compressed for a ztunnel that accepts it), by kind",
            metrics.sent_bytes.clone(),
        );
        registry.register(
            "discovery_push_delay_seconds",
            "From a change entering the store to its update leaving for a ztunnel",
            metrics.push_delay.clone(),
        );
        registry.register(
            "discovery_nacks",
            "Discovery responses ztunnels refused",
            metrics.nacks.clone(),
        );
        registry.register(
            "discovery_learned",
            "Addresses and names on-demand ztunnels asked for",
            metrics.learned.clone(),
        );
        registry.register(
            "certificate_requests",
            "Certificate signing requests, by result and reason",
            metrics.certificate_requests.clone(),
        );
        registry.register(
            "policies_rejected",
            "AuthorizationPolicies rejected as invalid now",
            metrics.policies_rejected.clone(),
        );
        registry.register(
            "configuration_version",
            "Version of the mesh state served",
            metrics.configuration_version.clone(),
        );
        registry.register(
            "source_synced",
            "1 once every kind has been read in full from the source",
            metrics.source_synced.clone(),
        );
        registry.register(
            "source_last_change_timestamp_seconds",
            "When the source last delivered a view of the cluster (Unix time)",
            metrics.source_last_change.clone(),
        );
        registry.register(
            "source_resource_version",
            "Newest resourceVersion read from a manifest directory, once served (0 on Kubernetes)",
            metrics.source_resource_version.clone(),
        );
        registry.register(
            "ca_reloads",
            "CA material read again and found changed, or unusable (the CA in force stays)",
            metrics.ca_reloads.clone(),
        );
        registry.register(
            "trust_roots",
            "Roots in the trust bundle served to ztunnels",
            metrics.trust_roots.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        kanava_runtime::with_process_metrics(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        metrics
            .certificate_requests
            .get_or_create(&CertificateLabels {
                result: "refused",
                reason: "not_on_node",
            })
            .inc();
        metrics.push_delay.observe(0.002);
        let text = metrics.encode();
        for expected in [
            "kanava_control_plane_certificate_requests_total{result=\"refused\",reason=\"not_on_node\"} 1",
            "kanava_control_plane_discovery_push_delay_seconds_count 1",
            "# TYPE kanava_control_plane_ztunnels_connected gauge",
            "# TYPE kanava_control_plane_source_last_change_timestamp_seconds gauge",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
    }
}
