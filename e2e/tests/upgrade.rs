//! Upgrading ztunnels under live traffic: long-lived connections keep
//! every byte, in order, once; new connections meanwhile all succeed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kanava_e2e::{MESH_LAB, churn, connect, hold, pod_ip, runtime, up};
use kanava_lab::UpgradeOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Held connections through every upgrade.
const HELD: usize = 200;
/// New connections a second meanwhile.
const NEW_PER_SECOND: u32 = 200;

#[test]
fn held_connections_survive_upgrades_of_either_node_and_both_and_new_ones_never_fail() {
    // The chart's termination grace (ztunnel.drainSeconds): how long a
    // deleted ztunnel waits for its replacement.
    let mut lab = kanava_e2e::up_with_ztunnel_args(MESH_LAB, &["--termination-grace", "10s"]);
    let echo = SocketAddr::new(pod_ip(&lab, "shop/echo"), 7000);
    // "Another build": another executable file, a new process of it.
    let other_build = tempfile::tempdir().unwrap();
    let binary = other_build.path().join("ztunnel");
    std::fs::copy(kanava_lab::bin_dir(None).unwrap().join("ztunnel"), &binary).unwrap();

    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let held: Vec<_> = (0..HELD)
        .map(|i| {
            let tcp = rt.block_on(connect(&lab, "shop/client", echo));
            rt.spawn(hold(tcp, i as u64, stop.clone()))
        })
        .collect();
    let before = (
        lab.ztunnel("node-1").unwrap().pid,
        lab.ztunnel("node-2").unwrap().pid,
    );
    let churn = churn(&lab, "shop/client", echo, 18, NEW_PER_SECOND, 16);
    std::thread::sleep(Duration::from_secs(1));
    // The last phase is a deleted (or evicted) ztunnel pod: SIGTERM first,
    // the DaemonSet's replacement a second later.
    let replaced_after = Some(Duration::from_secs(1));
    let phases: [(&str, Vec<String>, bool, Option<Duration>); 4] = [
        ("node-1", vec!["node-1".into()], false, None),
        ("node-2", vec!["node-2".into()], false, None),
        ("both at once", vec![], true, None),
        (
            "node-2 deleted, then replaced",
            vec!["node-2".into()],
            false,
            replaced_after,
        ),
    ];
    for (phase, nodes, all_at_once, stop_first) in phases {
        let upgraded = lab
            .upgrade(&UpgradeOptions {
                ztunnel_binary: Some(binary.clone()),
                nodes,
                all_at_once,
                stop_first,
            })
            .expect("upgrade");
        for node in &upgraded {
            assert!(
                node.moved >= HELD as u64,
                "{phase}: every held connection changed hands on {}: {node:?}",
                node.node
            );
            assert!(
                node.listeners >= 6 && node.listeners.is_multiple_of(3),
                "{phase}: three listeners per captured pod changed hands: {node:?}"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let after = (
        lab.ztunnel("node-1").unwrap().pid,
        lab.ztunnel("node-2").unwrap().pid,
    );
    assert_ne!(before.0, after.0, "node-1 runs a new ztunnel");
    assert_ne!(before.1, after.1, "node-2 runs a new ztunnel");

    let churned = churn.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    let mut carried = 0;
    for (i, task) in held.into_iter().enumerate() {
        let (sent, received, bytes) = rt.block_on(task).expect("held connection task");
        assert_eq!(
            sent, received,
            "connection {i}: what came back is what was sent"
        );
        carried += bytes;
    }
    assert!(carried > 0);
    assert_eq!(churned["errors"], 0, "no new connection failed: {churned}");
    assert!(
        churned["connections"].as_u64().unwrap_or(0) > 1000,
        "the churn ran: {churned}"
    );
}

/// A raw HBONE client of the echo pod, proving `identity`.
struct Hbone {
    sender: h2::client::SendRequest<bytes::Bytes>,
    target: SocketAddr,
}

impl Hbone {
    async fn open(lab: &kanava_lab::Lab, identity: &str) -> Hbone {
        let identity: kanava_mesh::Identity = identity.parse().unwrap();
        let stream = kanava_e2e::tls_to_echo_hbone(
            lab,
            &kanava_e2e::mesh_cert(lab, &identity),
            &kanava_e2e::mesh_roots(lab),
        )
        .await
        .unwrap();
        let echo_ip = pod_ip(lab, "shop/echo");
        let (sender, connection) = h2::client::handshake(stream).await.unwrap();
        tokio::spawn(connection);
        Hbone {
            sender,
            target: SocketAddr::from((echo_ip, 7000)),
        }
    }

    /// `CONNECT` to the echo app with the hand-over headers given.
    async fn connect(
        &mut self,
        headers: &[(&str, String)],
    ) -> (
        http::StatusCode,
        http::HeaderMap,
        h2::SendStream<bytes::Bytes>,
        h2::RecvStream,
    ) {
        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(self.target.to_string());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let sender = self.sender.clone().ready().await.unwrap();
        let mut sender = sender;
        let (response, send) = sender
            .send_request(request.body(()).unwrap(), false)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(15), response)
            .await
            .expect("an answer")
            .unwrap();
        let (parts, recv) = response.into_parts();
        (parts.status, parts.headers, send, recv)
    }
}

async fn echo_through(
    send: &mut h2::SendStream<bytes::Bytes>,
    recv: &mut h2::RecvStream,
    message: &'static [u8],
) {
    send.send_data(bytes::Bytes::from_static(message), false)
        .unwrap();
    let mut got = Vec::new();
    while got.len() < message.len() {
        let chunk = tokio::time::timeout(Duration::from_secs(10), recv.data())
            .await
            .expect("echoed")
            .expect("more data")
            .unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, message);
}

#[test]
fn resume_tokens_are_single_use_bound_to_their_client_and_refused_when_forged() {
    let lab = up(MESH_LAB);
    const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
    const INTRUDER: &str = "spiffe://cluster.local/ns/legacy/sa/intruder";
    let offer = ("kanava-handover", "v1".to_string());
    runtime().block_on(async {
        let mut client = Hbone::open(&lab, CLIENT).await;
        let (status, headers, mut send, mut recv) =
            client.connect(std::slice::from_ref(&offer)).await;
        assert_eq!(status, http::StatusCode::OK);
        let token = headers
            .get("kanava-handover")
            .expect("the extension is granted")
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(token.len(), 32);
        echo_through(&mut send, &mut recv, b"hello").await;

        // A token whose stream still runs cannot be taken over, not even
        // by its own client.
        let resume = |token: &str| [offer.clone(), ("kanava-resume", token.to_string())];
        let (status, ..) = client.connect(&resume(&token)).await;
        assert_eq!(status, http::StatusCode::UNAUTHORIZED, "a running stream");

        // We move: our direction ends with the moving trailer; the server
        // answers with its own and parks the app connection.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("kanava-moving", http::HeaderValue::from(5u64));
        send.send_trailers(trailers).unwrap();
        while let Some(data) = recv.data().await {
            let data = data.unwrap();
            assert!(data.is_empty(), "nothing more was echoed: {data:?}");
        }
        let theirs = recv
            .trailers()
            .await
            .unwrap()
            .expect("the server's trailers");
        assert_eq!(theirs.get("kanava-moving").unwrap(), "5");

        // Forged: a token nobody issued.
        let forged = "0123456789abcdef0123456789abcdef";
        let (status, ..) = client.connect(&resume(forged)).await;
        assert_eq!(status, http::StatusCode::UNAUTHORIZED, "a forged token");
        // Foreign: another identity of the mesh presents the real token.
        let mut intruder = Hbone::open(&lab, INTRUDER).await;
        let (status, ..) = intruder.connect(&resume(&token)).await;
        assert_eq!(status, http::StatusCode::UNAUTHORIZED, "a foreign client");

        // The rightful client resumes: the same app connection goes on.
        let (status, headers, mut send, mut recv) = client.connect(&resume(&token)).await;
        assert_eq!(status, http::StatusCode::OK, "the rightful client resumes");
        let fresh = headers.get("kanava-handover").expect("a fresh token");
        assert_ne!(fresh.to_str().unwrap(), token, "tokens are single-use");
        echo_through(&mut send, &mut recv, b"again").await;

        // Replayed: the token was used.
        let (status, ..) = client.connect(&resume(&token)).await;
        assert_eq!(status, http::StatusCode::UNAUTHORIZED, "a replayed token");
    });
    for (reason, what) in [
        ("unknown", "forged"),
        (
            "issued to spiffe://cluster.local/ns/shop/sa/client",
            "foreign",
        ),
        ("already used", "replayed"),
        ("not parked", "running"),
    ] {
        let line = kanava_e2e::log_line(&lab, "ztunnel/node-2", |l| {
            l.contains("resume refused") && l.contains(reason)
        });
        assert!(line.contains("peer="), "{what}: {line}");
    }
}

#[test]
fn a_peer_that_does_not_answer_the_move_gets_a_drain_and_the_connection_lives_on() {
    // A termination grace, so that the old ztunnel drains what could not
    // move instead of exiting at once.
    let mut lab = kanava_e2e::up_with_ztunnel_args(MESH_LAB, &["--termination-grace", "20s"]);
    let echo = SocketAddr::new(pod_ip(&lab, "shop/echo"), 7000);
    let rt = runtime();
    let mut tcp = rt.block_on(connect(&lab, "shop/client", echo));
    let round_trip = |tcp: &mut tokio::net::TcpStream, message: &[u8]| {
        rt.block_on(async {
            tcp.write_all(message).await.unwrap();
            let mut back = vec![0; message.len()];
            tokio::time::timeout(Duration::from_secs(20), tcp.read_exact(&mut back))
                .await
                .expect("echoed")
                .unwrap();
            assert_eq!(back, message);
        })
    };
    round_trip(&mut tcp, b"before");

    // node-2's ztunnel stops answering anything.
    let frozen = lab.ztunnel("node-2").unwrap().pid.unwrap();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &frozen.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let upgrading = {
        let name = lab.name().to_string();
        std::thread::spawn(move || {
            let mut lab = kanava_lab::Lab::attach(Some(&name)).unwrap();
            lab.upgrade(&UpgradeOptions {
                nodes: vec!["node-1".into()],
                ..Default::default()
            })
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !lab
        .logs("ztunnel/node-1")
        .unwrap_or_default()
        .contains("did not answer the move; draining")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the old ztunnel never fell back to draining"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The hand-over is done without it: nothing moved, one drained.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !lab
        .logs("ztunnel/node-1")
        .unwrap_or_default()
        .contains("draining the connections that could not move")
    {
        assert!(std::time::Instant::now() < deadline, "no summary");
        std::thread::sleep(Duration::from_millis(100));
    }
    signal("-CONT");
    let upgraded = upgrading.join().unwrap().expect("upgrade");
    assert_eq!(upgraded[0].moved, 0, "{upgraded:?}");
    assert!(upgraded[0].drained >= 1, "{upgraded:?}");
    // The peer came back within the grace: the move completed late, and
    // the connection goes on with the new ztunnel.
    round_trip(&mut tcp, b"after");
    lab.refresh().unwrap();
}

/// A leaving ztunnel tells each HBONE client to go away and closes the
/// connection once the client has answered and its last requests have had
/// their answers. A client slow to read (its task busy, its CPU shared)
/// may still be sending requests then. The ztunnel must neither exit nor
/// close under them: the kernel would reset the connection, and the client
/// would fail its streams with a broken connection, which it cannot retry
/// since it cannot tell whether they were served. Its requests get answers.
#[test]
fn a_client_slow_to_read_the_goaway_gets_answers_not_a_reset() {
    let lab = up(MESH_LAB);
    let identity: kanava_mesh::Identity =
        "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
    let echo = SocketAddr::new(pod_ip(&lab, "shop/echo"), 7000);
    let rt = runtime();
    let (ears, mut sender) = rt.block_on(async {
        let tls = kanava_e2e::tls_to_echo_hbone(
            &lab,
            &kanava_e2e::mesh_cert(&lab, &identity),
            &kanava_e2e::mesh_roots(&lab),
        )
        .await
        .unwrap();
        let ears = Arc::new(Ears::default());
        let (sender, connection) = h2::client::handshake(Deafenable {
            inner: tls,
            ears: ears.clone(),
        })
        .await
        .unwrap();
        tokio::spawn(connection);
        (ears, sender.ready().await.unwrap())
    });
    ears.state.lock().unwrap().armed = true;
    let name = lab.name().to_string();
    let upgrading = std::thread::spawn(move || {
        kanava_lab::Lab::attach(Some(&name))
            .unwrap()
            .upgrade(&UpgradeOptions {
                nodes: vec!["node-2".into()],
                ..Default::default()
            })
    });
    let outcomes = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), ears.deaf.notified())
            .await
            .expect("the leaving ztunnel sent a GOAWAY");
        // Everything else of the hand-over is done well within this.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Two requests, sent as a client that has not read the GOAWAY
        // would: against a closed socket the first would meet a reset and
        // the second a broken pipe.
        let mut streams = Vec::new();
        for _ in 0..2 {
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(echo.to_string())
                .body(())
                .unwrap();
            let (response, send) = sender.send_request(request, false).unwrap();
            streams.push((tokio::spawn(response), send));
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        ears.hear();
        let mut outcomes = Vec::new();
        for (response, _send) in streams {
            let outcome = tokio::time::timeout(Duration::from_secs(10), response)
                .await
                .expect("an outcome")
                .unwrap();
            outcomes.push(outcome.map(|response| response.status()));
        }
        outcomes
    });
    for outcome in outcomes {
        assert!(
            outcome.is_ok(),
            "an answer, not a broken connection: {outcome:?}"
        );
    }
    let upgraded = upgrading.join().unwrap().expect("upgrade");
    assert_eq!(upgraded.len(), 1, "{upgraded:?}");
}

/// What [`Deafenable`] hears, shared with the test.
#[derive(Default)]
struct Ears {
    state: std::sync::Mutex<EarsState>,
    /// Told once a GOAWAY arrived and is held back.
    deaf: tokio::sync::Notify,
}

#[derive(Default)]
struct EarsState {
    /// Go deaf at the next GOAWAY.
    armed: bool,
    deaf: bool,
    /// Read from the server but not handed to HTTP/2 yet.
    held: Vec<u8>,
    waker: Option<std::task::Waker>,
}

impl Ears {
    /// Hands HTTP/2 what was held back, and what comes after.
    fn hear(&self) {
        let mut state = self.state.lock().unwrap();
        state.deaf = false;
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }
}

/// An HBONE client's transport that, once armed, stops handing HTTP/2 what
/// it reads from the server's next GOAWAY on, as a client that is slow to
/// read would, while its writes still go out.
struct Deafenable<T> {
    inner: T,
    ears: Arc<Ears>,
}

/// Where a GOAWAY frame (RFC 9113, 6.8) without debug data, as HTTP/2
/// servers send to shut down gracefully, starts in `bytes`.
fn goaway(bytes: &[u8]) -> Option<usize> {
    const HEADER: [u8; 9] = [0, 0, 8, 7, 0, 0, 0, 0, 0];
    bytes
        .windows(HEADER.len())
        .position(|frame| frame == HEADER)
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Deafenable<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        {
            let mut state = this.ears.state.lock().unwrap();
            if state.deaf {
                state.waker = Some(cx.waker().clone());
                return std::task::Poll::Pending;
            }
            if !state.held.is_empty() {
                let handed = state.held.len().min(buf.remaining());
                buf.put_slice(&state.held[..handed]);
                state.held.drain(..handed);
                return std::task::Poll::Ready(Ok(()));
            }
        }
        let before = buf.filled().len();
        std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let mut state = this.ears.state.lock().unwrap();
        if state.armed
            && let Some(at) = goaway(&buf.filled()[before..])
        {
            state.held = buf.filled()[before + at..].to_vec();
            buf.set_filled(before + at);
            state.armed = false;
            state.deaf = true;
            this.ears.deaf.notify_one();
            if at == 0 {
                // An empty read would say the server finished.
                state.waker = Some(cx.waker().clone());
                return std::task::Poll::Pending;
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Deafenable<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
