//! The ztunnel's own ports as a pod sees them: the admin port is bound to
//! the node's localhost, the metrics and readiness ports give away no
//! configuration or key, and a pod that dials the ztunnel's listeners
//! inside its own namespace gets a closed connection, not a loop.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kanava_mesh::ports;
use tokio::io::AsyncWriteExt;

use super::{http, read_to_end};
use crate::{Check, Dial, Ground, Seats, TIMEOUT, short};

/// The addresses of the client's ztunnel, or why there are none.
async fn addresses<G: Ground>(
    ground: &G,
    seats: &Seats,
) -> Result<Vec<std::net::IpAddr>, &'static str> {
    let addresses = ground
        .ztunnel_addresses(&seats.client.node, seats.family)
        .await;
    if addresses.is_empty() {
        Err("no address of the ztunnel")
    } else {
        Ok(addresses)
    }
}

pub async fn admin_port<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let check = Check::new(
        "ztunnel admin port from a pod",
        "no answer (bound to the ztunnel's localhost)",
    );
    let addresses = match addresses(ground, seats).await {
        Ok(addresses) => addresses,
        Err(why) => return check.skip(why),
    };
    let mut seen = Vec::new();
    for address in addresses {
        let to = SocketAddr::from((address, ports::ADMIN));
        let answer = http(ground, &seats.client, to, "/config_dump").await;
        if !answer.is_empty() {
            return check
                .fail(format!("{to}/config_dump answered: {}", short(&answer)))
                .fix_if_failed(
                    "the ztunnel's admin port must listen on 127.0.0.1 only: remove any \
                     --admin-address override from the ztunnel's settings",
                );
        }
        seen.push(format!("{to}/config_dump: no answer"));
    }
    check.pass(seen.join("; "))
}

pub async fn metrics_ports<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let check = Check::new(
        "ztunnel metrics and readiness from a pod",
        "no configuration dump, no key material",
    );
    let addresses = match addresses(ground, seats).await {
        Ok(addresses) => addresses,
        Err(why) => return check.skip(why),
    };
    let mut seen = Vec::new();
    for address in addresses {
        for (port, path) in [
            (ports::METRICS, "/config_dump"),
            (ports::READINESS, "/config_dump"),
            (ports::METRICS, "/metrics"),
        ] {
            let to = SocketAddr::from((address, port));
            let answer = http(ground, &seats.client, to, path).await;
            let leaked = answer.contains("PRIVATE KEY") || answer.contains("\"workloads\"");
            let status = answer.lines().next().unwrap_or("no answer").to_string();
            if leaked || (path == "/config_dump" && status.contains(" 200")) {
                return check.fail(format!("{to}{path}: {status}")).fix_if_failed(
                    "this ztunnel serves its configuration on a public port: upgrade it",
                );
            }
            seen.push(format!("{to}{path}: {}", short(&status)));
        }
    }
    check.pass(seen.join("; "))
}

pub async fn self_loop<G: Ground>(ground: &G, seats: &Seats) -> Check {
    let check = Check::new(
        "a pod dialling its ztunnel's own listeners",
        "closed at once, no loop (open files stable)",
    );
    let node = &seats.client.node;
    let before = ground.ztunnel_open_files(node).await;
    let mut held_longest = Duration::ZERO;
    for to in [
        SocketAddr::from(([127, 0, 0, 1], ports::OUTBOUND)),
        SocketAddr::from((seats.client.ip, ports::INBOUND_PLAINTEXT)),
    ] {
        let started = Instant::now();
        if let Ok(mut stream) = ground.connect(&seats.client, to, Dial::default()).await {
            let _ = stream.write_all(b"loop?").await;
            let _ = stream.flush().await;
            let _ = read_to_end(&mut stream).await;
        }
        held_longest = held_longest.max(started.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = ground.ztunnel_open_files(node).await;
    let files = match (before, after) {
        (Some(before), Some(after)) => Some((before, after)),
        _ => None,
    };
    let stable = files.is_none_or(|(before, after)| after <= before + 10);
    check
        .judge(
            held_longest < TIMEOUT && stable,
            match files {
                Some((before, after)) => {
                    format!(
                        "closed after {held_longest:.1?}; ztunnel open files {before} → {after}"
                    )
                }
                None => format!("closed after {held_longest:.1?}; open files not visible here"),
            },
        )
        .fix_if_failed(
            "the ztunnel proxies its own listeners back to itself: upgrade it; \
             meanwhile such a pod can exhaust its node's ztunnel",
        )
}
