//! One pod cannot use up its node's ztunnel: its connections are bounded
//! (and the bound says so in the access log) while its neighbours go on,
//! and the legs that cross the network carry TCP keepalive.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kanava_e2e::{MESH_LAB, exec_ok, http_get, log_line, pod_ip, runtime, up_with_ztunnel_args};

const LIMIT: usize = 20;

#[test]
fn a_pod_over_its_connection_bound_is_refused_and_its_neighbours_are_not() {
    let lab = up_with_ztunnel_args(MESH_LAB, &["--max-connections-per-pod", &LIMIT.to_string()]);
    let web = SocketAddr::from((pod_ip(&lab, "shop/web"), 80));
    let held: Vec<TcpStream> = (0..LIMIT)
        .map(|_| {
            lab.connect("shop/client", web, Duration::from_secs(5))
                .expect("within the bound")
        })
        .collect();

    // The next one is accepted by the kernel and reset by the ztunnel (so
    // fast, at times, that the connect itself sees the reset).
    match lab.connect("shop/client", web, Duration::from_secs(5)) {
        Ok(mut over) => {
            over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buffer = [0u8; 16];
            assert!(
                matches!(over.read(&mut buffer), Ok(0) | Err(_)),
                "the connection over the bound is closed"
            );
        }
        Err(error) => assert!(
            error.to_string().contains("reset"),
            "refused, not failed: {error}"
        ),
    }
    let line = log_line(&lab, "ztunnel/node-1", |l| {
        l.contains("--max-connections-per-pod")
    });
    assert!(
        line.contains("pod shop/client already has 20 outbound connections")
            && line.contains("outcome=denied"),
        "{line}"
    );

    // A neighbour on the same node is not affected.
    let rt = runtime();
    assert!(rt.block_on(http_get(&lab, "shop/local-web", web)).is_ok());

    // The HBONE connection to node-2 carries keepalive; the app's own
    // connections to :15001 stay in the pod and carry none (ten thousand of
    // them probed at once overflowed the kernel's backlog in the soak).
    let sockets = exec_ok(&lab, "shop/client", &["ss", "-tno", "state", "established"]);
    let with_keepalive = |needle: &str| {
        sockets
            .lines()
            .filter(|l| l.contains(needle))
            .map(|l| l.contains("timer:(keepalive"))
            .collect::<Vec<bool>>()
    };
    let hbone = with_keepalive(":15008");
    assert!(!hbone.is_empty() && hbone.iter().all(|&k| k), "{sockets}");
    let in_pod = with_keepalive(":15001");
    assert!(
        !in_pod.is_empty() && in_pod.iter().all(|&k| !k),
        "{sockets}"
    );

    // Closing the held connections frees the pod's budget.
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    assert!(rt.block_on(http_get(&lab, "shop/client", web)).is_ok());
}
