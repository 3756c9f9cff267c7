//! The byte bridge between a TCP connection and an HBONE stream.

use std::future::poll_fn;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;

use crate::proxy::chunks::ChunkReader;

/// Bytes a bridge moved, named from the TCP side. Which of them went to the
/// destination depends on where the bridge stands: on the client's node the
/// TCP side is the client, on the server's node it is the app.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Read from the TCP connection and sent on the stream.
    pub from_tcp: u64,
    /// Received on the stream and written to the TCP connection.
    pub to_tcp: u64,
}

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
) -> (Copied, std::io::Result<()>)
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
                    None => {
                        return Err(std::io::Error::other(
                            "the peer closed the HBONE stream while data was waiting to be sent",
                        ));
                    }
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
    (
        Copied {
            from_tcp: sent,
            to_tcp: received,
        },
        result,
    )
}

/// An HTTP/2 error as an I/O error, keeping the socket's own error where
/// there is one and saying which layer failed where there is not.
fn h2_io(error: h2::Error) -> std::io::Error {
    if error.is_io() {
        match error.into_io() {
            Some(io) => io,
            None => std::io::Error::other("HBONE connection failed at the socket"),
        }
    } else if let Some(reason) = error.reason() {
        std::io::Error::other(format!("HBONE stream reset by the peer ({reason})"))
    } else {
        std::io::Error::other(format!("HBONE stream: {error}"))
    }
}
