//! One access-log line per proxied connection, written when it ends (target
//! `access`), plus the matching metrics: the node's totals
//! (`kanava_connections_total`, ...) and the traffic between workloads
//! (`kanava_tcp_*`, labelled by source and destination workload).
//!
//! ```text
//! INFO access: connection complete direction=inbound pod=shop/web
//!   src.addr=10.244.1.2 src.identity=spiffe://cluster.local/ns/shop/sa/client
//!   dst.addr=10.244.2.3:80 dst.identity=spiffe://cluster.local/ns/shop/sa/web
//!   transport=hbone bytes_sent=78 bytes_received=512 duration_ms=3 outcome=success
//! ```

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use kanava_mesh::{Identity, Workload};

use super::CapturedPod;
use super::route::{Hop, Route};
use crate::metrics::{
    BytesLabels, ClosedLabels, ConnectionLabels, Direction, Metrics, Outcome, TrafficLabels,
    Transport,
};

/// A label value for what is not known (a plaintext peer's identity, a
/// destination outside the mesh).
const UNKNOWN: &str = "unknown";

/// A workload's name as the traffic metrics use it: its
/// `app.kubernetes.io/name` or `app` label (what its pods share across
/// restarts and scaling), else the pod's.
fn workload_label(workload: &Workload) -> &str {
    ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|key| workload.labels.get(*key))
        .unwrap_or(&workload.name)
}

/// Bytes a proxied connection carried, named by direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the connection's originator towards its destination
    /// (`bytes_sent` in the access log).
    pub to_destination: u64,
    /// From the destination back to the originator (`bytes_received`).
    pub to_source: u64,
}

/// How a proxied connection ended: what its access-log line says.
#[derive(Debug)]
pub struct Ending {
    outcome: Outcome,
    bytes: Transferred,
    reason: Option<String>,
    /// The reason as a metric label: one of a few fixed words.
    code: &'static str,
    /// The authorization policy that refused it (`namespace/name`).
    policy: Option<String>,
}

impl Ending {
    /// Bytes flowed until both sides closed, or until an error cut them off.
    pub fn carried(bytes: Transferred, result: std::io::Result<()>) -> Self {
        match result {
            Ok(()) => Ending {
                outcome: Outcome::Success,
                bytes,
                reason: None,
                code: "-",
                policy: None,
            },
            Err(error) => Ending {
                outcome: Outcome::Failed,
                bytes,
                reason: Some(error.to_string()),
                code: "connection_error",
                policy: None,
            },
        }
    }

    /// Refused on purpose before any byte flowed.
    pub fn denied(reason: impl Display) -> Self {
        Ending::refused(Outcome::Denied, reason)
    }

    /// Could not be carried.
    pub fn failed(reason: impl Display) -> Self {
        Ending::refused(Outcome::Failed, reason)
    }

    /// Refused on purpose (`denied`: policy, a bad request) or could not be
    /// carried; either way before any byte flowed.
    pub fn not_carried(denied: bool, reason: impl Display) -> Self {
        Ending::refused(
            if denied {
                Outcome::Denied
            } else {
                Outcome::Failed
            },
            reason,
        )
    }

    pub fn refused(outcome: Outcome, reason: impl Display) -> Self {
        Ending {
            outcome,
            bytes: Transferred::default(),
            reason: Some(reason.to_string()),
            code: match outcome {
                Outcome::Denied => "denied",
                _ => "failed",
            },
            policy: None,
        }
    }

    /// Names the authorization policy that refused it.
    pub fn policy(mut self, policy: &str) -> Self {
        self.policy = Some(policy.to_string());
        self
    }

    /// Names the reason for the metrics (`connection_limit`, `policy`...).
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
}

/// The record of one connection while it is open. An idle connection's
/// task carries it for the connection's whole life, so it holds only shared
/// references (the pod, the workloads, the identities) and builds the label
/// strings when it counts: it takes no allocation of its own.
pub struct AccessLog {
    direction: Direction,
    transport: Transport,
    /// Counted in the traffic metrics as opened; from then on nothing that
    /// names the labels changes, so the close is counted under the same.
    opened: bool,
    pod: Arc<CapturedPod>,
    src_addr: SocketAddr,
    src_identity: Option<Identity>,
    src_workload: Option<Arc<Workload>>,
    dst_addr: SocketAddr,
    dst_identity: Option<Identity>,
    dst_workload: Option<Arc<Workload>>,
    dst_service: Option<String>,
    started: Instant,
}

impl AccessLog {
    /// Starts the record of a connection of `pod`, counted as open until it
    /// finishes.
    pub fn start(
        metrics: &Metrics,
        direction: Direction,
        pod: &Arc<CapturedPod>,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
    ) -> Self {
        metrics
            .connections_open
            .get_or_create(&BytesLabels { direction })
            .inc();
        AccessLog {
            direction,
            transport: Transport::Passthrough,
            opened: false,
            pod: pod.clone(),
            src_addr,
            src_identity: None,
            src_workload: None,
            dst_addr,
            dst_identity: None,
            dst_workload: None,
            dst_service: None,
            started: Instant::now(),
        }
    }

    /// The workloads at either end, for the traffic metrics.
    pub fn workloads(
        &mut self,
        source: Option<Arc<Workload>>,
        destination: Option<Arc<Workload>>,
    ) -> &mut Self {
        if source.is_some() {
            self.src_workload = source;
        }
        if destination.is_some() {
            self.dst_workload = destination;
        }
        self
    }

    /// The connection reached its destination: counted as opened.
    pub fn opened(&mut self, metrics: &Metrics) {
        metrics
            .tcp_opened
            .get_or_create(&self.traffic_labels())
            .inc();
        self.opened = true;
    }

    fn traffic_labels(&self) -> TrafficLabels {
        let party = |workload: &Option<Arc<Workload>>| {
            workload.as_deref().map_or_else(
                || (UNKNOWN.to_string(), UNKNOWN.to_string()),
                |w| (workload_label(w).to_string(), w.namespace.clone()),
            )
        };
        let principal = |identity: &Option<Identity>| {
            identity
                .as_ref()
                .map_or_else(|| UNKNOWN.to_string(), ToString::to_string)
        };
        let (source_workload, source_workload_namespace) = party(&self.src_workload);
        let (destination_workload, destination_workload_namespace) = party(&self.dst_workload);
        TrafficLabels {
            reporter: match self.direction {
                Direction::Outbound => "source",
                Direction::Inbound => "destination",
            },
            source_workload,
            source_workload_namespace,
            source_principal: principal(&self.src_identity),
            destination_workload,
            destination_workload_namespace,
            destination_principal: principal(&self.dst_identity),
            destination_service: self.dst_service.clone().unwrap_or_else(|| UNKNOWN.into()),
            transport: self.transport,
        }
    }

    pub fn source_identity(&mut self, identity: Option<Identity>) -> &mut Self {
        self.src_identity = identity;
        self
    }

    pub fn destination_identity(&mut self, identity: Option<Identity>) -> &mut Self {
        self.dst_identity = identity;
        self
    }

    /// What the routing decided: the Service the client addressed by its
    /// virtual IP, or the one destination.
    pub fn route(&mut self, route: &Route) -> &mut Self {
        match route {
            Route::Service { service, .. } => self.dst_service = Some(service.clone()),
            Route::Direct(hop) => {
                self.hop(hop);
            }
            Route::Refused(_) => {}
        }
        self
    }

    /// Where the connection is being sent (for a Service, the endpoint being
    /// tried) and how.
    pub fn hop(&mut self, hop: &Hop) -> &mut Self {
        debug_assert!(!self.opened, "the labels of an opened connection change");
        self.dst_addr = hop.address();
        self.transport = hop.transport();
        self.dst_workload = hop.workload().cloned();
        self.dst_identity = hop.expected_identity().cloned();
        self
    }

    pub fn transport(&mut self, transport: Transport) -> &mut Self {
        debug_assert!(!self.opened, "the labels of an opened connection change");
        self.transport = transport;
        self
    }

    /// The `dst.workload` of the line: the destination workload, or on the
    /// inbound side the pod itself when the mesh does not know it yet.
    fn destination_name(&self) -> Option<String> {
        match (&self.dst_workload, self.direction) {
            (Some(workload), _) => Some(workload.display_name()),
            (None, Direction::Inbound) => Some(self.pod.info.display_name()),
            (None, Direction::Outbound) => None,
        }
    }

    /// Writes the line and counts the connection.
    pub fn finish(self, metrics: &Metrics, ending: Ending) {
        let Ending {
            outcome,
            bytes,
            reason,
            code,
            policy,
        } = ending;
        let traffic = self.traffic_labels();
        if self.opened {
            metrics
                .tcp_sent_bytes
                .get_or_create(&traffic)
                .inc_by(bytes.to_destination);
            metrics
                .tcp_received_bytes
                .get_or_create(&traffic)
                .inc_by(bytes.to_source);
            metrics
                .tcp_duration
                .get_or_create(&traffic)
                .observe(self.started.elapsed().as_secs_f64());
        }
        metrics
            .tcp_closed
            .get_or_create(&ClosedLabels {
                traffic,
                outcome,
                reason: code,
                policy: policy.unwrap_or_else(|| "-".into()),
            })
            .inc();
        let labels = BytesLabels {
            direction: self.direction,
        };
        metrics.connections_open.get_or_create(&labels).dec();
        metrics
            .bytes_sent
            .get_or_create(&labels)
            .inc_by(bytes.to_destination);
        metrics
            .bytes_received
            .get_or_create(&labels)
            .inc_by(bytes.to_source);
        metrics
            .connections
            .get_or_create(&ConnectionLabels {
                direction: self.direction,
                transport: self.transport,
                outcome,
            })
            .inc();
        let src_identity = self.src_identity.as_ref().map(ToString::to_string);
        let dst_identity = self.dst_identity.as_ref().map(ToString::to_string);
        let dst_workload = self.destination_name();
        tracing::info!(
            target: "access",
            direction = %self.direction,
            pod = %self.pod.info.display_name(),
            src.addr = %self.src_addr,
            src.identity = src_identity.as_deref().unwrap_or("-"),
            dst.addr = %self.dst_addr,
            dst.service = self.dst_service.as_deref().unwrap_or("-"),
            dst.workload = dst_workload.as_deref().unwrap_or("-"),
            dst.identity = dst_identity.as_deref().unwrap_or("-"),
            transport = %self.transport,
            bytes_sent = bytes.to_destination,
            bytes_received = bytes.to_source,
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome = %outcome,
            reason = reason.as_deref().unwrap_or("-"),
            "connection complete"
        );
    }
}
