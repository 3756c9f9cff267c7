//! One access-log line per proxied connection, written when it ends (target
//! `access`), plus the matching metrics.
//!
//! ```text
//! INFO access: connection complete direction=inbound pod=shop/web
//!   src.addr=10.244.1.2 src.identity=spiffe://cluster.local/ns/shop/sa/client
//!   dst.addr=10.244.2.3:80 dst.identity=spiffe://cluster.local/ns/shop/sa/web
//!   transport=hbone bytes_sent=78 bytes_received=512 duration_ms=3 outcome=success
//! ```

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Instant;

use kanava_mesh::Identity;

use super::route::{Hop, Route};
use crate::metrics::{BytesLabels, ConnectionLabels, Direction, Metrics, Outcome, Transport};

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
}

impl Ending {
    /// Bytes flowed until both sides closed, or until an error cut them off.
    pub fn carried(bytes: Transferred, result: std::io::Result<()>) -> Self {
        match result {
            Ok(()) => Ending {
                outcome: Outcome::Success,
                bytes,
                reason: None,
            },
            Err(error) => Ending {
                outcome: Outcome::Failed,
                bytes,
                reason: Some(error.to_string()),
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
        }
    }
}

pub struct AccessLog {
    direction: Direction,
    pod: String,
    src_addr: SocketAddr,
    src_identity: Option<Identity>,
    dst_addr: SocketAddr,
    dst_identity: Option<Identity>,
    dst_workload: Option<String>,
    dst_service: Option<String>,
    transport: Transport,
    started: Instant,
}

impl AccessLog {
    /// Starts the record of a connection, counted as open until it finishes.
    pub fn start(
        metrics: &Metrics,
        direction: Direction,
        pod: String,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
    ) -> Self {
        metrics
            .connections_open
            .get_or_create(&BytesLabels { direction })
            .inc();
        AccessLog {
            direction,
            pod,
            src_addr,
            src_identity: None,
            dst_addr,
            dst_identity: None,
            dst_workload: None,
            dst_service: None,
            transport: Transport::Passthrough,
            started: Instant::now(),
        }
    }

    pub fn source_identity(&mut self, identity: Option<Identity>) -> &mut Self {
        self.src_identity = identity;
        self
    }

    pub fn destination(
        &mut self,
        workload: Option<String>,
        identity: Option<Identity>,
    ) -> &mut Self {
        self.dst_workload = workload;
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
        self.dst_addr = hop.address();
        self.transport = hop.transport();
        self.dst_workload = hop.workload().map(|w| w.display_name());
        self.dst_identity = hop.expected_identity().cloned();
        self
    }

    pub fn transport(&mut self, transport: Transport) -> &mut Self {
        self.transport = transport;
        self
    }

    /// Writes the line and counts the connection.
    pub fn finish(self, metrics: &Metrics, ending: Ending) {
        let Ending {
            outcome,
            bytes,
            reason,
        } = ending;
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
        tracing::info!(
            target: "access",
            direction = %self.direction,
            pod = %self.pod,
            src.addr = %self.src_addr,
            src.identity = src_identity.as_deref().unwrap_or("-"),
            dst.addr = %self.dst_addr,
            dst.service = self.dst_service.as_deref().unwrap_or("-"),
            dst.workload = self.dst_workload.as_deref().unwrap_or("-"),
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
