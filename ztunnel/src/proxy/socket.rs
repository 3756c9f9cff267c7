//! Sockets the proxy makes inside pods' network namespaces.
//!
//! Every one carries the proxy mark, which the capture rules exempt, so the
//! proxy's own traffic is never captured again.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kanava_mesh::marks;
use kanava_netns::{NetNs, NetNsSwitch};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::Error;

/// Backlog of the listeners in pods.
const LISTEN_BACKLOG: i32 = 1024;

/// Where the other end of a proxied connection's leg is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The pod's own application, in the same network namespace: when it
    /// goes away the kernel closes its end at once, so keepalive would only
    /// add probes.
    Local,
    /// Across the network (another node, a peer outside the mesh): it can
    /// vanish without a FIN, so the leg carries TCP keepalive.
    Remote,
}

/// Idle time before the first keepalive probe, and the random spread added
/// to it per socket.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(180);
const KEEPALIVE_SPREAD_SECS: u64 = 60;

/// TCP keepalive on every leg whose peer is across the network: a peer that
/// vanished without a FIN (a node gone) releases its connection's resources
/// after about five minutes instead of never.
///
/// The first probe comes after 3 to 4 minutes, at random per socket:
/// connections opened together would otherwise be probed together, and ten
/// thousand probes (and their answers) in one instant overflow the kernel's
/// per-CPU backlog (`net.core.netdev_max_backlog`, 1000): the dropped probes
/// then killed live connections in the soak.
pub fn keepalive() -> socket2::TcpKeepalive {
    let spread = rand::random::<u64>() % KEEPALIVE_SPREAD_SECS;
    socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE + Duration::from_secs(spread))
        .with_interval(Duration::from_secs(30))
        .with_retries(4)
}

/// Turns keepalive on for an accepted or connected socket.
pub fn keep_alive(stream: &TcpStream) {
    // Err only for a socket that is already gone; the copy will notice.
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive());
}

/// Creates a listener on `[::]:port` (both IPv4 and IPv6), falling back to
/// `0.0.0.0:port` where IPv6 is disabled. Must run inside the pod's
/// namespace. SO_REUSEPORT lets a new ztunnel listen beside the old one
/// during an upgrade.
pub fn bind_pod_listener(port: u16) -> io::Result<std::net::TcpListener> {
    let socket = match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) {
        Ok(socket) => {
            socket.set_only_v6(false)?;
            socket.set_reuse_port(true)?;
            socket.set_mark(marks::PROXY)?;
            socket.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
            socket
        }
        Err(e) if e.raw_os_error() == Some(libc_eafnosupport()) => {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_port(true)?;
            socket.set_mark(marks::PROXY)?;
            socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            socket
        }
        Err(e) => return Err(e),
    };
    socket.set_reuse_address(true)?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// EAFNOSUPPORT on Linux.
const fn libc_eafnosupport() -> i32 {
    97
}

/// Connects to `destination` from inside `netns`.
///
/// With `source`, the socket is transparent and bound to that address, so
/// the destination sees the original client's IP; the reply routing the
/// capture rules install brings the answers back to this socket. Such a
/// connection reaches the pod's own application ([`Peer::Local`]); without
/// `source` the destination is across the network and the socket carries
/// keepalive.
pub async fn connect_in(
    switch: &NetNsSwitch,
    netns: &Arc<NetNs>,
    destination: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let socket = switch
        .run(netns, || new_socket(destination, source))?
        .map_err(Error::io(format!("create socket for {destination}")))?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(timeout, socket.connect(destination))
        .await
        .map_err(|_| Error::ConnectTimeout {
            destination,
            after: timeout,
        })?
        .map_err(Error::io(format!("connect to {destination}")))?;
    Ok(stream)
}

fn new_socket(destination: SocketAddr, source: Option<IpAddr>) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(destination),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_mark(marks::PROXY)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if source.is_none() {
        socket.set_tcp_keepalive(&keepalive())?;
    }
    if let Some(source) = source {
        match source {
            IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
        // A kernel without the option (before 4.2) binds the slow way;
        // said once, as it holds for every socket of this process.
        if let Err(error) = bind_address_no_port(&socket) {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(%error, "IP_BIND_ADDRESS_NO_PORT unavailable: each connection to an app searches for a free port at bind, which is slow under churn");
            });
        }
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    Ok(socket)
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to an address with port 0
/// gets its port only at `connect`, chosen for the whole 4-tuple.
///
/// Without it, `bind` alone must find a port free for every destination
/// under the client's address: with the connections of a busy client in
/// TIME_WAIT that search took two thirds of the server's ztunnel CPU in the
/// connection-churn benchmark, and a client with tens of thousands of them
/// would run out of ports altogether. With it, the port is chosen the way
/// the client's own kernel chose its port: one lookup of the 4-tuple.
///
/// By hand: neither socket2 nor rustix exposes this option.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    set_int_option(
        socket.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        1,
    )
}

/// Sets a socket option whose value is a C `int`, for the options neither
/// socket2 nor rustix exposes.
pub fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the caller's descriptor is a live socket it holds for the
    // call, and the option value is a c_int whose size is passed with it.
    #[allow(unsafe_code)]
    let result = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where a redirected connection was going before the capture rules sent it
/// to the proxy.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = SockRef::from(stream);
    let local = stream.local_addr()?;
    let ipv4 = match local.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
    };
    // IPv4 connections to the dual-stack listener still keep their original
    // destination in the IPv4 conntrack entry.
    let original = if ipv4 {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    original
        .as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// `::ffff:10.0.0.1` → `10.0.0.1`.
pub fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// Closes with a reset instead of an orderly close, so a refused client sees
/// "connection reset" rather than an empty response.
/// Has the kernel move connections waiting in a closing listener's queue
/// to another listener of the same port (`SO_REUSEPORT`) instead of
/// resetting them: a ztunnel leaving for its successor closes its pod
/// listeners while the successor's listen beside them. Called inside the
/// pod's namespace (the setting is per namespace). In a container `/proc/sys`
/// is read-only, so on a cluster kanava-cni, which runs on the host, sets it
/// at ADD and this finds it set; a pod it could not set (a kernel before
/// Linux 5.14, a pod captured from discovery) is said once in the log:
/// its pending connections are reset at a hand-over.
pub fn migrate_pending_connections() {
    const SETTING: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    static WARNED: std::sync::Once = std::sync::Once::new();
    if std::fs::read(SETTING).is_ok_and(|value| value.trim_ascii() == b"1") {
        return;
    }
    if let Err(error) = std::fs::write(SETTING, b"1") {
        WARNED.call_once(|| {
            tracing::warn!(%error, "net.ipv4.tcp_migrate_req is not set in a pod and cannot be set from here: its connections waiting to be accepted are reset when a ztunnel hands over to its successor (said once)");
        });
    }
}

pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The port of a socket towards the app is chosen at `connect`, for
    /// the whole 4-tuple, not searched for at `bind` (which, with a busy
    /// client's connections in TIME_WAIT, took most of the CPU). Needs root
    /// (a transparent socket), as CI has.
    #[test]
    fn a_transparent_socket_gets_its_port_only_at_connect() {
        let socket = new_socket(
            "127.0.0.1:9".parse().expect("address"),
            Some("127.0.0.1".parse().expect("address")),
        )
        .expect("a transparent socket (this test needs root)");
        let bound = socket
            .local_addr()
            .expect("bound")
            .as_socket()
            .expect("an IP socket");
        assert_eq!(bound.ip(), "127.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(bound.port(), 0, "bind chose a port: {bound}");
    }

    #[test]
    fn keepalive_probes_start_at_a_random_point_of_a_minute() {
        let firsts: Vec<Duration> = (0..200)
            .map(|_| {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                socket.set_tcp_keepalive(&keepalive()).unwrap();
                socket.tcp_keepalive_time().unwrap()
            })
            .collect();
        let spread = KEEPALIVE_IDLE..KEEPALIVE_IDLE + Duration::from_secs(KEEPALIVE_SPREAD_SECS);
        assert!(
            firsts.iter().all(|first| spread.contains(first)),
            "{firsts:?}"
        );
        let distinct: std::collections::BTreeSet<_> = firsts.iter().collect();
        assert!(distinct.len() > 20, "spread out: {distinct:?}");
    }

    #[test]
    fn only_legs_across_the_network_carry_keepalive() {
        let remote = new_socket(SocketAddr::from(([127, 0, 0, 1], 9)), None).unwrap();
        assert!(remote.keepalive().unwrap());
        // A socket to the pod's own application is transparent (bound to
        // the client's address), which needs root, as the whole suite does.
        let local = new_socket(
            SocketAddr::from(([127, 0, 0, 1], 9)),
            Some(IpAddr::from([127, 0, 0, 2])),
        )
        .expect("a transparent socket (the tests run as root)");
        assert!(!local.keepalive().unwrap());
    }
}
