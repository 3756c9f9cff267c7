//! A TCP connection made from inside a probe pod: `labapp pipe` run there
//! through the API server's `exec`, its standard input and output joined
//! into one byte stream. The bytes leave from the pod's own network
//! namespace, so the mesh treats them as the pod's own.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{AttachParams, AttachedProcess};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf, ReadHalf, SimplexStream, WriteHalf};

use crate::{Dial, Stream, TIMEOUT};

/// The program in the probe image.
pub const PROBE_PROGRAM: &str = "/usr/local/bin/labapp";
/// The probe pods' container that connections are made from.
pub const CONTAINER: &str = "app";

/// The joined stream; it holds the exec session, which ends when dropped.
struct Piped {
    from_pod: ReadHalf<SimplexStream>,
    to_pod: WriteHalf<SimplexStream>,
    _session: AttachedProcess,
}

impl AsyncRead for Piped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.from_pod).poll_read(cx, buf)
    }
}

impl AsyncWrite for Piped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.to_pod).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.to_pod).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.to_pod).poll_shutdown(cx)
    }
}

/// Connects from inside pod `name` of `pods` to `to`.
pub async fn connect(
    pods: &kube::Api<Pod>,
    name: &str,
    to: SocketAddr,
    dial: Dial,
) -> Result<Stream, String> {
    let mut command = vec![
        PROBE_PROGRAM.to_string(),
        "pipe".into(),
        "--to".into(),
        to.to_string(),
    ];
    if let Some(source) = dial.spoofed_source {
        command.extend(["--spoofed-source".into(), source.to_string()]);
    }
    let (mut session, from_pod) = start(pods, name, command, true)
        .await
        .map_err(|e| format!("from {name} to {to}: {e}"))?;
    let to_pod = session
        .stdin()
        .ok_or_else(|| format!("exec in {name}: no standard input"))?;
    Ok(Box::new(Piped {
        from_pod,
        to_pod,
        _session: session,
    }))
}

/// Runs `command` (a `labapp` mode that answers `+` once it works, or `-`
/// and the reason) in pod `name`; the session and its output after the `+`.
async fn start(
    pods: &kube::Api<Pod>,
    name: &str,
    command: Vec<String>,
    stdin: bool,
) -> Result<(AttachedProcess, ReadHalf<SimplexStream>), String> {
    let params = AttachParams::default()
        .container(CONTAINER)
        .stdin(stdin)
        .stdout(true)
        .stderr(false);
    let mut session = tokio::time::timeout(TIMEOUT * 2, pods.exec(name, command, &params))
        .await
        .map_err(|_| format!("exec in {name}: no answer"))?
        .map_err(|e| format!("exec in {name}: {e}"))?;
    let Some(mut from_pod) = session.stdout() else {
        return Err(format!("exec in {name}: no standard output"));
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(TIMEOUT * 2, from_pod.read_exact(&mut first)).await {
        Ok(Ok(_)) if first[0] == b'+' => Ok((session, from_pod)),
        Ok(Ok(_)) => {
            let mut reason = String::new();
            let _ = tokio::time::timeout(TIMEOUT, from_pod.read_to_string(&mut reason)).await;
            Err(reason.trim().to_string())
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// How long `labapp capture` listens: long enough for a check's exchange.
const CAPTURE_SECONDS: u64 = 6;

/// A packet capture running in a probe pod on a node's own network.
pub struct ExecCapture {
    from_pod: ReadHalf<SimplexStream>,
    _session: AttachedProcess,
}

/// Starts `labapp capture` in pod `name`: the TCP packets `between`
/// exchange, seen on every interface of its node.
pub async fn capture(
    pods: &kube::Api<Pod>,
    name: &str,
    between: [std::net::IpAddr; 2],
) -> Result<ExecCapture, String> {
    let command = vec![
        PROBE_PROGRAM.to_string(),
        "capture".into(),
        "--seconds".into(),
        CAPTURE_SECONDS.to_string(),
        "--between".into(),
        between[0].to_string(),
        "--between".into(),
        between[1].to_string(),
    ];
    let (session, from_pod) = start(pods, name, command, false)
        .await
        .map_err(|e| format!("capture in {name}: {e}"))?;
    Ok(ExecCapture {
        from_pod,
        _session: session,
    })
}

impl crate::FabricCapture for ExecCapture {
    async fn stop(mut self) -> Result<Vec<crate::Packet>, String> {
        let mut report = String::new();
        let within = std::time::Duration::from_secs(CAPTURE_SECONDS) + TIMEOUT;
        tokio::time::timeout(within, self.from_pod.read_to_string(&mut report))
            .await
            .map_err(|_| "the capture did not end".to_string())?
            .map_err(|e| format!("the capture: {e}"))?;
        serde_json::from_str(report.trim()).map_err(|e| format!("the capture's report: {e}"))
    }
}
