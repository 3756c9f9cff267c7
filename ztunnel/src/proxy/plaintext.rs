//! Inbound plaintext (:15006): a peer reached an enrolled pod without the
//! mesh. Enrolled pods accept only mutual TLS, so the connection is reset
//! and the refusal logged.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::access_log::AccessLog;
use super::{CapturedPod, Proxy, socket};
use crate::metrics::{Direction, Outcome};

pub async fn handle(proxy: Arc<Proxy>, pod: Arc<CapturedPod>, tcp: TcpStream, peer: SocketAddr) {
    let destination = socket::original_destination(&tcp)
        .or_else(|_| tcp.local_addr().map(socket::canonical))
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let log = AccessLog::start(
        &proxy.metrics,
        Direction::Inbound,
        pod.display_name(),
        peer,
        destination,
    );
    socket::reset(tcp);
    log.finish(
        &proxy.metrics,
        Outcome::Denied,
        (0, 0),
        Some("plaintext connection to an enrolled pod; mutual TLS is required"),
    );
}
