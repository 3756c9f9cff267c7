//! Where the checks act from: the pods they use (the [`Seats`]) and the few
//! things a check does there (connect, send a datagram, read a ztunnel's
//! log, change a policy). A lab and a cluster each implement [`Ground`];
//! the checks never ask which one they run on.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncWrite};

/// One IP family, named as Kubernetes names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Family {
    IPv4,
    IPv6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::IPv4,
            IpAddr::V6(_) => Family::IPv6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::IPv4 => "IPv4",
            Family::IPv6 => "IPv6",
        })
    }
}

/// A place to act from: a pod, or (in a lab) a node.
#[derive(Clone, Debug)]
pub struct Seat {
    /// How the ground names it (`shop/web`, `node/node-1`).
    pub name: String,
    pub node: String,
    pub namespace: String,
    /// Its address in the family of the [`Seats`] it belongs to.
    pub ip: IpAddr,
    /// Its SPIFFE identity, when it is enrolled.
    pub identity: Option<String>,
    /// A port where it answers HTTP.
    pub http_port: Option<u16>,
}

/// The pods of one IP family that the checks use.
#[derive(Clone, Debug)]
pub struct Seats {
    pub family: Family,
    /// An enrolled pod, in a STRICT namespace where there is one: the
    /// attacker's seat and the target of plaintext.
    pub client: Seat,
    pub client_is_strict: bool,
    /// Enrolled pods the traffic checks reach through the mesh
    /// ([`Ground::listener`]): on another node, and on the client's where
    /// the ground has them; none when there is no such pod.
    pub servers: Vec<Seat>,
    /// A pod with another identity, whose address the spoofing check
    /// borrows.
    pub impostor: Option<Seat>,
    /// Where plaintext comes from: somewhere outside the mesh.
    pub outsider: Seat,
    /// Where the client's node reaches the control plane from, to present
    /// that node's credential (the node itself in a lab; the client pod on
    /// a cluster, whose pods reach the control plane's Service).
    pub node_side: Seat,
    /// An enrolled pod of a PERMISSIVE namespace, which plaintext reaches.
    pub permissive: Option<Seat>,
}

/// How to open a connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dial {
    /// Bind to this source address with `IP_TRANSPARENT` (a spoofed source;
    /// needs `CAP_NET_ADMIN` in the pod, which an attacker may have).
    pub spoofed_source: Option<IpAddr>,
}

/// A blocking connection to `to` from `source`, an address of another
/// host or pod, bound with `IP_TRANSPARENT` (needs `CAP_NET_ADMIN`): what a
/// pod forging another's address does. Made in the caller's namespace.
pub fn connect_spoofed(
    source: IpAddr,
    to: SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    match source {
        IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}

/// A byte stream from inside a seat to a destination.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}
pub type Stream = Box<dyn Duplex>;

/// A listener in a server pod for the traffic checks; stopped when
/// dropped (where the ground started it).
pub struct Listener {
    pub address: SocketAddr,
    pub guard: Option<Box<dyn Send>>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("address", &self.address)
            .finish()
    }
}

/// A capture of the traffic between two pods, running until stopped.
#[allow(async_fn_in_trait)]
pub trait FabricCapture {
    async fn stop(self) -> Result<Vec<crate::Packet>, String>;
}

/// Why there is no capture of the fabric.
#[derive(Debug)]
pub enum CaptureUnavailable {
    /// This ground cannot see the fabric (a cluster): the check is skipped.
    NoVantage(String),
    /// It should have started and did not: the check fails.
    Failed(String),
}

/// Where the checks run. Implemented by the lab and the cluster.
///
/// Futures are used in place on one thread (`block_on`), never spawned,
/// so they need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Ground {
    /// The IP families the pods have, the primary one first.
    fn families(&self) -> Vec<Family>;
    /// The pods to act from in `family`, or `None` when there is no
    /// enrolled pod with an address of it.
    fn seats(&self, family: Family) -> Option<Seats>;
    /// The addresses of `node`'s ztunnel in `family` a pod might try: the
    /// node's own, and the ztunnel pod's where it has one of its own.
    async fn ztunnel_addresses(&self, node: &str, family: Family) -> Vec<IpAddr>;
    /// The control plane's address as pods reach it.
    fn control_plane(&self) -> SocketAddr;
    /// The mesh's root certificates (to know the ztunnel and control plane
    /// are real, so a refusal means what it says).
    fn mesh_roots(&self) -> Result<kanava_tls::MeshRoots, String>;
    /// An identity that runs on other nodes and not on `node`, if any.
    fn identity_only_elsewhere(&self, node: &str) -> Option<String>;

    /// The credential `node`'s ztunnel presents to the control plane.
    async fn node_credential(&self, node: &str) -> Result<String, String>;
    /// A TCP connection from inside `from` to `to`; an error when it was
    /// not made.
    async fn connect(&self, from: &Seat, to: SocketAddr, dial: Dial) -> Result<Stream, String>;
    /// Sends three datagrams from `from` to a UDP port of `to` that no
    /// annotation opened; what arrived at the app, if anything.
    async fn udp_reaches(&self, from: &Seat, to: &Seat) -> Result<Option<String>, String>;
    /// A listener (a sink: it answers what it read) on [`crate::PROBE_PORT`]
    /// in `at`.
    async fn listener(&self, at: &Seat) -> Result<Listener, String>;
    /// Recent lines of `node`'s ztunnel log.
    async fn ztunnel_log(&self, node: &str) -> Result<String, String>;
    /// How many files `node`'s ztunnel holds open, when the ground can see.
    async fn ztunnel_open_files(&self, node: &str) -> Option<usize>;
    /// Applies a mesh object (an AuthorizationPolicy) given as YAML.
    async fn apply(&self, yaml: &str) -> Result<(), String>;
    /// Deletes what [`Ground::apply`] applied.
    async fn delete(&self, yaml: &str) -> Result<(), String>;
    /// How this ground captures the fabric.
    type Capture: FabricCapture;
    /// Starts capturing the traffic between nodes that `between` exchange.
    async fn fabric_capture(
        &self,
        between: [IpAddr; 2],
    ) -> Result<Self::Capture, CaptureUnavailable>;
}
