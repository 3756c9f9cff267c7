//! Traffic that does not come through the mesh: plaintext TCP and UDP from
//! outside it. A STRICT pod refuses both (UDP unless an annotation opened
//! the port); a PERMISSIVE pod answers plaintext, which also shows that the
//! refusals above come from the mesh and not from a broken network.

use std::net::SocketAddr;

use super::http;
use crate::{Check, Ground, Seats, short};

const NOT_CAPTURED: &str = "the pod is not captured: check that the ztunnel runs on its node \
     (kanava status) and that the kanava-cni plugin is chained in the node's CNI \
     configuration (kanava check)";

pub async fn to_strict<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let check = Check::new(
        "plaintext to a STRICT pod",
        "refused (reset, nothing answered)",
    );
    if !seats.client_is_strict {
        return check.skip("no enrolled pod in a strict namespace");
    }
    let to = SocketAddr::from((seats.client.ip, seats.client.http_port.unwrap_or(80)));
    let answer = http(ground, &seats.outsider, to, "/").await;
    check
        .judge(
            answer.is_empty(),
            if answer.is_empty() {
                format!("{to} from {}: no answer", seats.outsider.name)
            } else {
                format!("{to} answered: {}", short(&answer))
            },
        )
        .fix_if_failed(NOT_CAPTURED)
}

pub async fn to_permissive<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let check = Check::new("plaintext to a PERMISSIVE pod", "answered");
    let Some(pod) = &seats.permissive else {
        return check.skip("no enrolled pod in a permissive namespace");
    };
    let to = SocketAddr::from((pod.ip, pod.http_port.unwrap_or(80)));
    let answer = http(ground, &seats.outsider, to, "/").await;
    check
        .judge(
            answer.starts_with("HTTP/"),
            if answer.is_empty() {
                format!("{to} from {}: no answer", seats.outsider.name)
            } else {
                format!("{to} answered: {}", short(&answer))
            },
        )
        .fix_if_failed(
            "plaintext does not reach a PERMISSIVE pod: a NetworkPolicy or the \
             network between the nodes blocks it, or the ztunnel treats the \
             namespace as STRICT (check its kanava.io/mtls-mode label)",
        )
}

/// UDP from outside the pod to a port it has not opted in: dropped before
/// the app (see `kanava_mesh::names::INBOUND_UDP_PORTS_ANNOTATION`).
pub async fn udp_to_strict<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let check = Check::new(
        "UDP to a STRICT pod",
        "dropped before the app (not opted in)",
    );
    if !seats.client_is_strict {
        return check.skip("no enrolled pod in a strict namespace");
    }
    match ground.udp_reaches(&seats.outsider, &seats.client).await {
        Ok(None) => check.pass(format!(
            "3 datagrams from {} to {}: none arrived",
            seats.outsider.name, seats.client.ip
        )),
        Ok(Some(arrived)) => check.fail(arrived).fix_if_failed(NOT_CAPTURED),
        Err(error) => check.fail(error),
    }
}
