//! The taking-over side: the upgrade socket, bound once this ztunnel is
//! ready, where a predecessor hands its connections over and where anyone
//! (the lab, an operator) can ask who serves the node.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kanava_netns::seqpacket::{Conn, Listener};
use tokio::runtime::Handle;

use super::SocketFile;
use super::protocol::{self, Message, MovedServer, Summary};
use crate::Error;
use crate::pods::PodRegistry;
use crate::proxy::Proxy;
use crate::proxy::resumptions::{Binding, Parked};

/// How long after a predecessor is found, or its hand-over starts,
/// resumes of unknown tokens wait for it to hand their streams over (each
/// such resume waits at most the claim's own bound, a few seconds).
pub const INCOMING_FOR: Duration = Duration::from_secs(60);

/// What the upgrade socket serves from.
pub struct Successor {
    pub proxy: Arc<Proxy>,
    pub pods: Arc<PodRegistry>,
    pub runtime: Handle,
    pub allowed_uid: Option<u32>,
    /// The last hand-over this ztunnel received.
    pub last: Mutex<Option<Summary>>,
    /// The upgrade socket's file, once this ztunnel bound it.
    pub bound: OnceLock<SocketFile>,
}

/// Asks the ztunnel on `socket` who it is: its pid (in its own pid
/// namespace: say, not compare), whether it is ready, and its last
/// hand-over, if one answers.
pub fn ask_status(socket: &Path) -> Option<(u32, bool, Option<Summary>)> {
    let conn = Conn::connect(socket).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    conn.send(
        &Message::Hello {
            pid: std::process::id(),
        }
        .encode(),
        &[],
    )
    .ok()?;
    let (answer, _) = conn.recv().ok()?;
    match Message::decode(&answer).ok()? {
        Message::Status {
            pid,
            ready,
            last_hand_over,
        } => Some((pid, ready, last_hand_over)),
        _ => None,
    }
}

/// Binds the upgrade socket at `path` (replacing a predecessor's file: it
/// stays reachable through its open connection) and serves it on threads.
pub fn serve(path: PathBuf, successor: Arc<Successor>) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    }
    let listener =
        Listener::bind(&path, 0o600).map_err(Error::io(format!("bind {}", path.display())))?;
    if let Some(file) = SocketFile::at(&path) {
        let _ = successor.bound.set(file);
    }
    tracing::info!(socket = %path.display(), "ready to take over from a predecessor");
    std::thread::Builder::new()
        .name("upgrade".into())
        .spawn(move || {
            loop {
                match listener.accept() {
                    Ok(conn) => {
                        let uid = conn.peer_uid().unwrap_or(u32::MAX);
                        if uid != 0 && Some(uid) != successor.allowed_uid {
                            tracing::warn!(uid, "upgrade connection refused: not root");
                            continue;
                        }
                        let successor = successor.clone();
                        let spawned = std::thread::Builder::new()
                            .name("upgrade-conn".into())
                            .spawn(move || successor.serve_conn(conn));
                        if let Err(error) = spawned {
                            tracing::error!(%error, "cannot start upgrade thread");
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "upgrade accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(Error::io("start upgrade thread"))?;
    Ok(())
}

impl Successor {
    fn serve_conn(&self, conn: Conn) {
        let mut handing_over = false;
        let mut received = 0u64;
        loop {
            let (bytes, fds) = match conn.recv() {
                Ok((bytes, _)) if bytes.is_empty() => break,
                Ok(received) => received,
                Err(error) => {
                    tracing::warn!(%error, "upgrade connection failed");
                    break;
                }
            };
            let message = match Message::decode(&bytes) {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "upgrade message not understood; closing");
                    break;
                }
            };
            let fd = fds.into_iter().next();
            match message {
                Message::Hello { .. } => {
                    let status = Message::Status {
                        pid: std::process::id(),
                        ready: self.proxy.workloads.is_ready(),
                        last_hand_over: self.last().clone(),
                    };
                    if conn.send(&status.encode(), &[]).is_err() {
                        break;
                    }
                }
                Message::HandOver { pid, pods } => {
                    handing_over = true;
                    tracing::info!(
                        predecessor = pid,
                        pods = pods.len(),
                        "a predecessor hands over"
                    );
                    self.proxy
                        .resumptions
                        .expect_incoming(Some(Instant::now() + INCOMING_FOR));
                    // Pods the predecessor captured after we started.
                    let missing = pods.iter().any(|uid| self.pods.get(uid).is_none());
                    if missing {
                        self.runtime.block_on(self.pods.restore());
                    }
                    let listeners = self.pods.uids().len() as u64 * 3;
                    if conn
                        .send(&Message::Proceed { listeners }.encode(), &[])
                        .is_err()
                    {
                        break;
                    }
                }
                Message::Client(moved) => {
                    received += 1;
                    self.resume_client(moved, fd);
                }
                Message::Server(moved) => {
                    received += 1;
                    if let Err(error) = self.park_server(&moved, fd) {
                        tracing::warn!(pod = %moved.pod_uid, %error, "handed-over connection refused");
                    }
                }
                Message::Done(summary) => {
                    tracing::info!(?summary, received, "hand-over from the predecessor done");
                    *self.last() = Some(summary);
                }
                Message::Status { .. } | Message::Proceed { .. } => {
                    tracing::warn!("unexpected upgrade message; closing");
                    break;
                }
            }
        }
        if handing_over {
            tracing::info!(received, "the predecessor is gone");
            self.proxy.resumptions.expect_incoming(None);
        }
    }

    fn resume_client(&self, moved: protocol::MovedClient, fd: Option<OwnedFd>) {
        let Some(fd) = fd else {
            tracing::warn!(pod = %moved.pod_uid, "handed-over connection without its socket");
            return;
        };
        let tcp = std::net::TcpStream::from(fd);
        let Some(pod) = self.pods.get(&moved.pod_uid) else {
            tracing::warn!(pod = %moved.pod_uid, "handed-over connection of a pod not served here; resetting it");
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            return;
        };
        let proxy = self.proxy.clone();
        let served = self.proxy.workers.serve_handed_over(tcp, move |tcp| {
            crate::proxy::outbound::resume_handed_over(proxy, pod, moved, tcp)
        });
        if let Err(error) = served {
            tracing::warn!(%error, "handed-over socket unusable");
        }
    }

    fn park_server(&self, moved: &MovedServer, fd: Option<OwnedFd>) -> Result<(), String> {
        let fd = fd.ok_or("no socket attached")?;
        let tcp = std::net::TcpStream::from(fd);
        let token = protocol::token(&moved.token)?;
        let client = moved
            .client_identity
            .parse()
            .map_err(|error| format!("client identity: {error}"))?;
        let target: SocketAddr = moved.target;
        self.proxy.resumptions.park(
            token,
            Parked {
                binding: Binding {
                    pod_uid: moved.pod_uid.clone(),
                    client,
                    target,
                },
                tcp,
                client_address: moved.client_address,
                from_app_ended: moved.from_app_ended,
                to_app_ended: moved.to_app_ended,
                since: Instant::now(),
            },
        );
        Ok(())
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Option<Summary>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}
