//! The checks, grouped by what they look at. Each takes a [`Ground`] and
//! the [`Seats`] and returns one [`crate::Check`].

pub mod certificates;
pub mod control_plane;
pub mod plaintext;
pub mod traffic;
pub mod ztunnel_ports;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Dial, Ground, Seat, Stream, TIMEOUT};

/// A GET from `from` to `to`: the whole answer, or empty when nothing
/// answered (refused, reset, or silent until [`TIMEOUT`]).
pub(crate) async fn http<G: Ground>(ground: &G, from: &Seat, to: SocketAddr, path: &str) -> String {
    let Ok(mut stream) = ground.connect(from, to, Dial::default()).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: verify\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() || stream.flush().await.is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&read_to_end(&mut stream).await).into_owned()
}

/// Everything `stream` carries until it ends or falls silent for
/// [`TIMEOUT`].
pub(crate) async fn read_to_end(stream: &mut Stream) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 8192];
    while let Ok(Ok(n)) = tokio::time::timeout(TIMEOUT, stream.read(&mut buffer)).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    answer
}
