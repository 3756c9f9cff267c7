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
        socket.connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
        socket.set_nonblocking(true)?;
        std::io::Result::Ok(std::net::TcpStream::from(socket))
    })
    .await
    .map_err(std::io::Error::other)??;
    TcpStream::from_std(socket)
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
