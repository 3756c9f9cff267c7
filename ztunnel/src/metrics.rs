//! Prometheus metrics of the ztunnel, served on `/metrics` (port 15020).

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which way a proxied connection goes, seen from the pod.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Leaving an enrolled pod.
    Outbound,
    /// Arriving at an enrolled pod.
    Inbound,
}

/// How a proxied connection ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Bytes flowed until both sides closed.
    Success,
    /// Refused on purpose (bad request, policy, plaintext to a strict pod).
    Denied,
    /// Could not be carried (upstream unreachable, TLS failure, reset).
    Failed,
}

/// How the bytes travel.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Transport {
    /// HBONE: mTLS + HTTP/2 CONNECT.
    Hbone,
    /// Plain TCP (destination outside the mesh, or inbound plaintext).
    Passthrough,
}

/// Lowercase names for label values and log fields (`outbound`, not
/// `Outbound`), as Prometheus conventions have it.
macro_rules! lowercase_names {
    ($($type:ident { $($variant:ident => $name:literal),* $(,)? })*) => {$(
        impl $type {
            pub fn as_str(self) -> &'static str {
                match self { $($type::$variant => $name),* }
            }
        }
        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl EncodeLabelValue for $type {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
                fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}

lowercase_names! {
    Direction { Outbound => "outbound", Inbound => "inbound" }
    Outcome { Success => "success", Denied => "denied", Failed => "failed" }
    Transport { Hbone => "hbone", Passthrough => "passthrough" }
}

/// Who a connection is between, as the `kanava_tcp_*` metrics label it
/// (names close to Istio's, so dashboards map over). Every value is bounded
/// by the mesh's workloads, never by connections or client ports.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    /// `source` (the client's ztunnel, outbound) or `destination` (the
    /// server's, inbound): each connection is reported by both.
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// SPIFFE identity, or `unknown` (plaintext).
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// `namespace/name` of the Service the client addressed, or `unknown`.
    pub destination_service: String,
    pub transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    pub outcome: Outcome,
    /// Why it was refused or failed: one of a few fixed words (`-` on
    /// success).
    pub reason: &'static str,
    /// The authorization policy (`namespace/name`) that refused it, or `-`.
    pub policy: String,
}

/// Buckets of connection durations: 1 ms to about 9 hours.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 15))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: Direction,
    pub transport: Transport,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `namespace/name`.
    pub pod: String,
    /// `udp` or `sctp`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

pub struct Metrics {
    registry: Registry,
    /// Connections running on each data-path worker thread.
    pub worker_connections: Family<WorkerLabels, Gauge>,
    /// Proxied connections, counted when they end.
    pub connections: Family<ConnectionLabels, Counter>,
    /// Proxied connections open now.
    pub connections_open: Family<BytesLabels, Gauge>,
    /// Bytes sent by the connection's originator.
    pub bytes_sent: Family<BytesLabels, Counter>,
    /// Bytes sent back to the connection's originator.
    pub bytes_received: Family<BytesLabels, Counter>,
    /// Outbound HBONE (TLS) connections opened.
    pub hbone_connections_opened: Counter,
    /// Outbound HBONE connections open now.
    pub hbone_connections_open: Gauge,
    /// Inbound HBONE (TLS) connections accepted after a successful handshake.
    pub hbone_connections_accepted: Counter,
    /// Inbound HBONE connections refused before or during the TLS
    /// handshake, by reason (`handshake_budget`, `no_certificate`, `tls`).
    pub hbone_handshake_failures: Family<ReasonLabels, Counter>,
    /// Moved streams continued on a new `CONNECT` (client side).
    pub resumed_streams: Counter,
    /// Resume requests answered (server side), by result (`resumed`, or why
    /// refused: `unknown`, `replayed`, `foreign`, `not_parked`).
    pub resumes: Family<ResultLabels, Counter>,
    /// Certificate signing requests, by result.
    pub certificate_requests: Family<ResultLabels, Counter>,
    /// Discovery responses, by result (`ack`, `nack`).
    pub discovery_responses: Family<ResultLabels, Counter>,
    /// Addresses and names learned on demand.
    pub learned: Counter,
    /// Pods captured now.
    pub pods_captured: Gauge,
    /// UDP and SCTP packets from outside a STRICT pod dropped before its
    /// app (read from its rules' counters every few seconds).
    pub non_tcp_dropped: Family<DroppedLabels, Counter>,
    /// When each identity's current certificate expires (Unix time).
    pub certificate_expiry: Family<IdentityLabels, Gauge<f64, AtomicU64>>,
    /// Workload certificates issued under a signer other than the mesh's
    /// current one (being replaced during a root rotation).
    pub certificates_superseded: Gauge,
    /// Roots in the trust bundle held.
    pub trust_roots: Gauge,
    /// Version of the discovery state held.
    pub discovery_version: Gauge,
    /// When the last discovery update was applied (Unix time).
    pub discovery_last_update: Gauge<f64, AtomicU64>,
    /// Connections established to their destination.
    pub tcp_opened: Family<TrafficLabels, Counter>,
    /// Connections ended, established or refused, by outcome and reason.
    pub tcp_closed: Family<ClosedLabels, Counter>,
    pub tcp_sent_bytes: Family<TrafficLabels, Counter>,
    pub tcp_received_bytes: Family<TrafficLabels, Counter>,
    /// How long established connections lasted.
    pub tcp_duration: Family<TrafficLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kanava");
        let metrics = Metrics {
            worker_connections: Family::default(),
            connections: Family::default(),
            connections_open: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            hbone_connections_opened: Counter::default(),
            hbone_connections_open: Gauge::default(),
            hbone_connections_accepted: Counter::default(),
            hbone_handshake_failures: Family::default(),
            resumed_streams: Counter::default(),
            resumes: Family::default(),
            certificate_requests: Family::default(),
            discovery_responses: Family::default(),
            learned: Counter::default(),
            pods_captured: Gauge::default(),
            non_tcp_dropped: Family::default(),
            certificate_expiry: Family::default(),
            certificates_superseded: Gauge::default(),
            trust_roots: Gauge::default(),
            discovery_version: Gauge::default(),
            discovery_last_update: Gauge::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent_bytes: Family::default(),
            tcp_received_bytes: Family::default(),
            tcp_duration: Family::new_with_constructor(duration_histogram),
            registry: Registry::default(),
        };
        registry.register(
            "worker_connections",
            "Connections running on each data-path worker thread (a new one goes to the worker with the fewest)",
            metrics.worker_connections.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each identity's current workload certificate expires (Unix time)",
            metrics.certificate_expiry.clone(),
        );
        registry.register(
            "certificates_superseded",
            "Workload certificates issued under a signer other than the mesh's current one",
            metrics.certificates_superseded.clone(),
        );
        registry.register(
            "trust_roots",
            "Roots in the trust bundle this ztunnel holds",
            metrics.trust_roots.clone(),
        );
        registry.register(
            "discovery_version",
            "Version of the discovery state this ztunnel holds",
            metrics.discovery_version.clone(),
        );
        registry.register(
            "discovery_last_update_timestamp_seconds",
            "When the last discovery update was applied (Unix time)",
            metrics.discovery_last_update.clone(),
        );
        registry.register(
            "tcp_connections_opened",
            "Connections established to their destination, by source and destination workload",
            metrics.tcp_opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "Connections ended (established or refused), by workloads, outcome and reason",
            metrics.tcp_closed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes from the source to the destination, by workloads",
            metrics.tcp_sent_bytes.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes from the destination back to the source, by workloads",
            metrics.tcp_received_bytes.clone(),
        );
        registry.register(
            "tcp_connection_duration_seconds",
            "How long established connections lasted, by workloads",
            metrics.tcp_duration.clone(),
        );
        registry.register(
            "connections",
            "Proxied TCP connections, counted when they end",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_open",
            "Proxied TCP connections open now",
            metrics.connections_open.clone(),
        );
        registry.register(
            "bytes_sent",
            "Bytes sent by connection originators",
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "bytes_received",
            "Bytes sent back to connection originators",
            metrics.bytes_received.clone(),
        );
        registry.register(
            "hbone_connections_opened",
            "Outbound HBONE (TLS) connections opened",
            metrics.hbone_connections_opened.clone(),
        );
        registry.register(
            "hbone_connections_open",
            "Outbound HBONE (TLS) connections open now",
            metrics.hbone_connections_open.clone(),
        );
        registry.register(
            "hbone_connections_accepted",
            "Inbound HBONE connections past the TLS handshake",
            metrics.hbone_connections_accepted.clone(),
        );
        registry.register(
            "hbone_handshake_failures",
            "Inbound HBONE connections refused before or during the TLS handshake, by reason",
            metrics.hbone_handshake_failures.clone(),
        );
        registry.register(
            "hbone_resumed_streams",
            "Moved HBONE streams continued on a new CONNECT (client side)",
            metrics.resumed_streams.clone(),
        );
        registry.register(
            "hbone_resumes",
            "Resume requests of moved HBONE streams, by result (server side)",
            metrics.resumes.clone(),
        );
        registry.register(
            "certificate_requests",
            "Certificate signing requests by result",
            metrics.certificate_requests.clone(),
        );
        registry.register(
            "discovery_responses",
            "Discovery responses by result (ack, nack)",
            metrics.discovery_responses.clone(),
        );
        registry.register(
            "discovery_learned",
            "Addresses and names learned from the control plane on demand (a first connection to each waited for it)",
            metrics.learned.clone(),
        );
        registry.register(
            "pods_captured",
            "Pods whose traffic this ztunnel captures",
            metrics.pods_captured.clone(),
        );
        registry.register(
            "non_tcp_dropped_packets",
            "UDP and SCTP packets from outside a STRICT pod dropped before its app, by pod and protocol",
            metrics.non_tcp_dropped.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Seconds since the Unix epoch of `time`, for `_timestamp_seconds`
    /// gauges.
    pub fn unix_seconds(time: SystemTime) -> f64 {
        time.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        kanava_runtime::with_process_metrics(text)
    }
}
