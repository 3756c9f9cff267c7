//! Clients of the lab's mesh made the way its own components make them:
//! the mesh root to trust, and a channel to the control plane from inside
//! any of the lab's namespaces. Used by `kanava verify` and the tests.

use std::net::{SocketAddr, TcpStream};

use kanava_mesh::ports;

use crate::{Error, Lab};

/// Bound on connecting to the control plane.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The mesh root certificate(s) of `lab`.
pub fn mesh_roots(lab: &Lab) -> Result<kanava_tls::MeshRoots, String> {
    let path = lab.state().layout().root_cert();
    let pem = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    kanava_tls::MeshRoots::from_pem(&pem).map_err(|e| e.to_string())
}

/// A blocking stream from the lab, made usable by Tokio.
pub fn tokio_stream_from(
    stream: Result<TcpStream, Error>,
) -> Result<tokio::net::TcpStream, String> {
    let stream = stream.map_err(|e| e.to_string())?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())
}

/// A gRPC channel to the lab's control plane from `from`'s namespace, over
/// TLS verified against the mesh root.
pub async fn control_plane_channel(
    lab: &Lab,
    from: &str,
) -> Result<tonic::transport::Channel, String> {
    let address = SocketAddr::new(
        lab.state().control_plane_address().ip(),
        ports::CONTROL_PLANE,
    );
    let tcp = tokio_stream_from(lab.connect(from, address, CONNECT_TIMEOUT))?;
    kanava_verify::checks::control_plane::channel_over(Box::new(tcp), mesh_roots(lab)?).await
}

/// `GET path` over HTTP/1.0 from inside `target`'s namespace (the mesh's
/// admin, readiness and metrics ports): the status code and the body.
pub fn http_get(
    lab: &Lab,
    target: &str,
    to: SocketAddr,
    path: &str,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut stream = lab
        .connect(target, to, CONNECT_TIMEOUT)
        .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n").as_bytes())
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {to}: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{to} answered no HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{to} answered an unreadable status line"))?;
    Ok((status, body.to_string()))
}
