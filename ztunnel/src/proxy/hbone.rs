//! HBONE on the wire: HTTP/2 over mutual TLS, one `CONNECT` stream per
//! proxied TCP connection, bytes carried in DATA frames.
//!
//! Settings follow Istio's ztunnel so the two interoperate: 4 MiB stream
//! window, 16 MiB connection window, 1 MiB frames.

use std::future::poll_fn;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;

use super::chunks::ChunkReader;
use crate::Config;

const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;

pub fn client_builder(config: &Config) -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(config.max_header_list_bytes)
        .max_concurrent_streams(config.max_streams_per_connection)
        .enable_push(false);
    builder
}

pub fn server_builder(config: &Config) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(config.max_header_list_bytes)
        .max_concurrent_streams(config.max_streams_per_connection);
    builder
}

/// Bytes moved: `(from the originator, back to the originator)`.
pub type Transferred = (u64, u64);

/// Copies between a TCP connection and an HTTP/2 stream until both
/// directions have ended, and says how many bytes went each way (counted
/// from the TCP side: read from it, written to it).
///
/// End of input on either side is passed on as a half-close (END_STREAM on
/// HTTP/2, FIN on TCP) while the other direction keeps flowing. Flow control
/// gives backpressure both ways: nothing is read from TCP beyond what the
/// peer's window admits, and window is returned to the peer only once its
/// bytes are written to TCP.
pub async fn bridge<W>(
    mut tcp_read: OwnedReadHalf,
    mut tcp_write: W,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> (Transferred, std::io::Result<()>)
where
    W: AsyncWrite + Unpin,
{
    let mut sent = 0u64;
    let mut received = 0u64;
    let to_h2 = async {
        let mut reader = ChunkReader::new();
        loop {
            let mut chunk = reader.next(&mut tcp_read).await?;
            if chunk.is_empty() {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok::<_, std::io::Error>(());
            }
            sent += chunk.len() as u64;
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(granted)) => granted,
                    Some(Err(e)) => return Err(h2_io(e)),
                    None => return Err(std::io::Error::other("HTTP/2 stream closed by peer")),
                };
                if granted == 0 {
                    continue;
                }
                let part = chunk.split_to(granted.min(chunk.len()));
                send.send_data(part, false).map_err(h2_io)?;
            }
        }
    };
    let from_h2 = async {
        while let Some(data) = recv.data().await {
            let data = data.map_err(h2_io)?;
            let len = data.len();
            tcp_write.write_all(&data).await?;
            received += len as u64;
            // Err only when the stream is already gone; the next data() says so.
            let _ = recv.flow_control().release_capacity(len);
        }
        tcp_write.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let result = tokio::try_join!(to_h2, from_h2).map(|_| ());
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    ((sent, received), result)
}

fn h2_io(error: h2::Error) -> std::io::Error {
    if error.is_io() {
        error
            .into_io()
            .unwrap_or_else(|| std::io::Error::other("HTTP/2 I/O error"))
    } else {
        std::io::Error::other(error)
    }
}
