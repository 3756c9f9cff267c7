//! The probe side of `labapp`, for `kanava verify` and `kanava check` on a
//! cluster: they run it in their probe pods through the API server.
//!
//! `pipe` joins the exec session's standard input and output to one TCP
//! connection made from inside the pod. Its first byte tells the caller
//! whether the connection was made: `+` (then the connection's bytes), or
//! `-` and the reason on one line. A tiny protocol, written here by hand
//! because an exec session carries bytes and nothing else.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, stdin, stdout};
use tokio::net::TcpStream;

/// How long a connection may take to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the echo server at `to` until a byte sent comes back,
/// trying every 2 ms for at most 10 s; prints `{"unix_ns": …}` of that
/// moment.
pub async fn first_byte(to: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(to).await?;
            stream.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(())
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
            let unix_ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos();
            println!("{}", serde_json::json!({ "unix_ns": unix_ns.to_string() }));
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("no byte back from {to} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn pipe(to: SocketAddr, spoofed_source: Option<IpAddr>) -> anyhow::Result<()> {
    let mut out = stdout();
    let stream = match connect(to, spoofed_source).await {
        Ok(stream) => stream,
        Err(error) => {
            out.write_all(format!("-{error}\n").as_bytes()).await?;
            out.flush().await?;
            std::process::exit(1);
        }
    };
    out.write_all(b"+").await?;
    out.flush().await?;
    let (mut from_peer, mut to_peer) = stream.into_split();
    // The caller's end: forwarded, then a half-close. The peer's end: once
    // it closes, the pipe is done, whatever the caller still holds.
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut stdin(), &mut to_peer).await;
        let _ = to_peer.shutdown().await;
    });
    let _ = tokio::io::copy(&mut from_peer, &mut out).await;
    let _ = out.flush().await;
    Ok(())
}

async fn connect(to: SocketAddr, spoofed_source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = spoofed_source else {
        return tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
            .await
            .map_err(|_| std::io::Error::other(format!("connect to {to}: timed out")))?;
    };
    let socket = tokio::task::spawn_blocking(move || {
        let socket = kanava_verify::connect_spoofed(source, to, CONNECT_TIMEOUT)?;
        socket.set_nonblocking(true)?;
        std::io::Result::Ok(socket)
    })
    .await
    .map_err(std::io::Error::other)??;
    TcpStream::from_std(socket)
}

/// Captures, on every interface of this network namespace, the TCP
/// packets exchanged between the addresses `between`, for `seconds`; then
/// prints them as JSON. Its first byte, `+`, says the capture runs (or `-`
/// and the reason). Needs `CAP_NET_RAW`.
pub async fn capture(seconds: u64, between: Vec<IpAddr>) -> anyhow::Result<()> {
    let mut out = stdout();
    let socket = match packet_socket() {
        Ok(socket) => socket,
        Err(error) => {
            out.write_all(format!("-a packet socket: {error}\n").as_bytes())
                .await?;
            out.flush().await?;
            std::process::exit(1);
        }
    };
    out.write_all(b"+").await?;
    out.flush().await?;
    let packets = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
        let mut packets = Vec::new();
        let mut buffer = vec![0u8; 65_536];
        while std::time::Instant::now() < deadline && packets.len() < MAX_PACKETS {
            let Ok(n) = (&socket).read(&mut buffer) else {
                continue;
            };
            let Some(packet) = etherparse::SlicedPacket::from_ip(&buffer[..n])
                .ok()
                .as_ref()
                .and_then(kanava_verify::packets::tcp_segment)
            else {
                continue;
            };
            if between.contains(&packet.source.ip()) && between.contains(&packet.destination.ip()) {
                packets.push(packet);
            }
        }
        packets
    })
    .await?;
    out.write_all(serde_json::to_string(&packets)?.as_bytes())
        .await?;
    out.flush().await?;
    Ok(())
}

/// At most this many packets are kept (a check exchanges a few dozen).
const MAX_PACKETS: usize = 10_000;

/// A packet socket for every protocol on every interface, giving each
/// packet from its IP header on (`SOCK_DGRAM`), waking every 100 ms.
fn packet_socket() -> std::io::Result<socket2::Socket> {
    // ETH_P_ALL, in network byte order as packet(7) wants it.
    let every_protocol = i32::from(0x0003u16.to_be());
    let socket = socket2::Socket::new(
        socket2::Domain::PACKET,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(every_protocol)),
    )?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(socket)
}

/// Prints what `kanava check` needs to know of the node this pod runs on
/// (a pod on the host's network, with the host's directories mounted).
pub fn node_facts(cni_conf_dir: &str, cni_bin_dir: &str, netns_dir: &str) -> anyhow::Result<()> {
    let facts = kanava_verify::node_facts::gather(&kanava_verify::node_facts::Paths {
        cni_conf_dir: cni_conf_dir.into(),
        cni_bin_dir: cni_bin_dir.into(),
        netns_dir: netns_dir.into(),
    });
    println!("{}", serde_json::to_string(&facts)?);
    Ok(())
}
