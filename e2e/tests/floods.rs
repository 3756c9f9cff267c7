//! One pod that floods a node's ztunnel with connections that never finish
//! a handshake must not cut the node's other pods off the mesh. Before
//! handshakes were budgeted per source and per pod, 1,100 idle connections
//! from one pod outside the mesh took every handshake slot of the node, and
//! a client with no pooled connection got nothing through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kanava_e2e::{MESH_LAB, http_get, metric, pod_ip, runtime, up};

/// Idle connections the flood holds open: more than the node's whole budget
/// of pending handshakes (1,024 by default).
const FLOOD: usize = 1_100;

#[test]
fn idle_handshakes_from_one_pod_do_not_starve_the_node() {
    // The flood holds more sockets than the default limit of open files.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )
    .unwrap();

    let lab = up(MESH_LAB);
    let sink = SocketAddr::from((pod_ip(&lab, "shop/sink"), 15008));
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    let attacker = kanava_netns::NetNs::named(&lab.netns("legacy/plain-client").unwrap()).unwrap();

    let started = Instant::now();
    // Every attempt reaches the ztunnel: it is held (up to the source's
    // budget) or reset at once, which a connect can already see.
    let (flood, reset, other) = attacker
        .run(move || {
            let mut opened: Vec<TcpStream> = Vec::new();
            let (mut reset, mut other) = (0usize, Vec::new());
            for _ in 0..FLOOD {
                match TcpStream::connect_timeout(&sink, Duration::from_secs(2)) {
                    Ok(stream) => opened.push(stream),
                    Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => reset += 1,
                    Err(error) => other.push(error.to_string()),
                }
            }
            (opened, reset, other)
        })
        .unwrap();
    assert!(
        flood.len() + reset > 1_024,
        "only {} connections opened and {reset} reset; other failures: {:?}",
        flood.len(),
        other.iter().take(5).collect::<Vec<_>>()
    );

    // While the flood is held (its connections say nothing), a client with
    // no pooled connection to node-2 yet reaches both the attacked pod's
    // neighbour and, over another HBONE connection, the node.
    let rt = runtime();
    let mut answered = 0;
    for _ in 0..5 {
        if rt.block_on(http_get(&lab, "shop/client", web)).is_ok() {
            answered += 1;
        }
    }
    let during = started.elapsed();
    assert!(
        during < Duration::from_secs(10),
        "the requests ran while the flood was held, before a ztunnel without budgets would have timed its handshakes out ({during:?})"
    );
    assert_eq!(
        answered, 5,
        "{answered} of 5 requests got through the flood"
    );
    // The flood's connections beyond its source's share were refused at
    // once, not left to hold slots.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused = 0.0;
    while Instant::now() < deadline {
        refused = metric(&lab, "node-2", "kanava_hbone_handshake_failures_total");
        if refused >= (FLOOD - 64) as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(refused >= (FLOOD - 64) as f64, "only {refused} refused");
    drop(flood);
}

#[test]
fn a_slow_client_cannot_hold_the_metrics_port() {
    use std::io::{Read, Write};
    let lab = up(MESH_LAB);
    let node = lab.state().node("node-1").unwrap().ip().unwrap();
    let metrics = SocketAddr::from((node, 15020));
    // A pod reaches its node's metrics port through the node's address.
    let mut stream = lab
        .connect("legacy/plain-client", metrics, Duration::from_secs(5))
        .unwrap();
    let started = Instant::now();
    stream.write_all(b"GET /metr").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let held = started.elapsed();
    assert!(
        held < Duration::from_secs(8),
        "a request head that never ends held the connection {held:?}"
    );
    // The port still answers others.
    let mut ok = lab
        .connect("legacy/plain-client", metrics, Duration::from_secs(5))
        .unwrap();
    ok.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")
        .unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let _ = ok.read_to_end(&mut answer);
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
