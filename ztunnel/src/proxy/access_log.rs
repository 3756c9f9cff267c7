//! One access-log line per proxied connection, written when it ends (target
//! `access`), plus the matching metrics.
//!
//! ```text
//! INFO access: connection complete direction=inbound pod=shop/web
//!   src.addr=10.244.1.2 src.identity=spiffe://cluster.local/ns/shop/sa/client
//!   dst.addr=10.244.2.3:80 dst.identity=spiffe://cluster.local/ns/shop/sa/web
//!   transport=hbone bytes_sent=78 bytes_received=512 duration_ms=3 outcome=success
//! ```

use std::net::SocketAddr;
use std::time::Instant;

use kanava_mesh::Identity;

use crate::metrics::{BytesLabels, ConnectionLabels, Direction, Metrics, Outcome, Transport};

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

    /// The Service the client addressed (by its virtual IP).
    pub fn service(&mut self, service: String) -> &mut Self {
        self.dst_service = Some(service);
        self
    }

    /// Where the connection was finally sent (a Service endpoint).
    pub fn destination_addr(&mut self, addr: SocketAddr) -> &mut Self {
        self.dst_addr = addr;
        self
    }

    pub fn transport(&mut self, transport: Transport) -> &mut Self {
        self.transport = transport;
        self
    }

    /// Writes the line and counts the connection. `reason` says why it was
    /// denied or failed.
    pub fn finish(
        self,
        metrics: &Metrics,
        outcome: Outcome,
        bytes: (u64, u64),
        reason: Option<&str>,
    ) {
        let labels = BytesLabels {
            direction: self.direction,
        };
        metrics.connections_open.get_or_create(&labels).dec();
        metrics.bytes_sent.get_or_create(&labels).inc_by(bytes.0);
        metrics
            .bytes_received
            .get_or_create(&labels)
            .inc_by(bytes.1);
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
            bytes_sent = bytes.0,
            bytes_received = bytes.1,
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome = %outcome,
            reason = reason.unwrap_or("-"),
            "connection complete"
        );
    }
}
