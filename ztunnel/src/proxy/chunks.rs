//! Reading TCP connections chunk by chunk without holding memory while they
//! are quiet, and the plain TCP-to-TCP copy built on it.
//!
//! Most proxied connections are idle most of the time. A copy loop that
//! keeps a read buffer per direction (tokio's `copy_bidirectional` keeps two
//! zeroed 8 KiB+ buffers for the connection's whole life) pays for it on
//! every one of them; here a buffer is taken only once data is waiting and
//! is given back as soon as the connection goes quiet.
//!
//! A busy connection, on the other hand, keeps its buffer between reads:
//! each chunk is split off the front of it and, once the chunk has been
//! passed on and dropped, the next read reclaims the same memory. Taking a
//! fresh buffer of up to 256 KiB per read instead made the allocator hand
//! pages back to the kernel and fault them in again, which cost the proxy a
//! sixth of its CPU in a bulk transfer.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::access_log::Transferred;

/// Bytes read at a time: small for a connection that trickles, doubling
/// while reads fill the buffer, up to the most worth reading at once in a
/// bulk transfer.
const FIRST_READ: u32 = 4 * 1024;
pub(crate) const LARGEST_READ: u32 = 256 * 1024;

/// Reads one connection chunk by chunk.
///
/// Written against the socket's poll functions rather than its `readable()`
/// and `read_buf()` futures: those are stored in the task of every
/// connection for as long as it waits, and the readiness future alone is
/// 360 bytes. Polling leaves nothing behind but the waker the socket keeps
/// anyway.
pub struct ChunkReader {
    /// Bytes to ask for next (32 bits: the reader lives in the task of
    /// every connection).
    size: u32,
    /// Left out of the largest reads for the framing sent in front of
    /// each chunk.
    headroom: u32,
    /// The buffer of a busy connection; empty (no memory) while it is quiet.
    buffer: BytesMut,
}

impl ChunkReader {
    pub fn new() -> Self {
        ChunkReader::with_headroom(0)
    }

    /// A reader whose chunks each go out behind `headroom` bytes of
    /// framing. In a bulk transfer a chunk and its framing together are then
    /// the largest read exactly, a whole number of TLS records; smaller
    /// reads stay powers of two, the sizes applications write in.
    pub fn with_headroom(headroom: u32) -> Self {
        ChunkReader {
            size: FIRST_READ,
            headroom: headroom.min(LARGEST_READ / 2),
            buffer: BytesMut::new(),
        }
    }

    /// Bytes the next read asks for.
    fn read_size(&self) -> usize {
        if self.size == LARGEST_READ {
            (LARGEST_READ - self.headroom) as usize
        } else {
            self.size as usize
        }
    }

    /// The next bytes the peer sent; empty once it has finished sending.
    pub async fn next<R>(&mut self, from: &mut R) -> io::Result<Bytes>
    where
        R: AsyncRead + AsRef<TcpStream> + Unpin,
    {
        poll_fn(|cx| self.poll_next(cx, from)).await
    }

    fn poll_next<R>(&mut self, cx: &mut Context<'_>, from: &mut R) -> Poll<io::Result<Bytes>>
    where
        R: AsyncRead + AsRef<TcpStream> + Unpin,
    {
        loop {
            match from.as_ref().poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    // Nothing waiting: the connection may stay quiet for
                    // hours, so it holds no buffer while it does. (Also
                    // when the task has used up its share of the runtime:
                    // the socket then says Pending and has the task woken
                    // again, so it yields instead of spinning.)
                    self.buffer = BytesMut::new();
                    return Poll::Pending;
                }
            }
            let asked = self.read_size();
            // Reclaims the memory of earlier chunks once they are gone.
            self.buffer.reserve(asked);
            // Readiness can come without data (a freshly accepted socket
            // often reports it): the read then clears it and registers for
            // the next, and the loop finds the socket not ready.
            let mut room = (&mut self.buffer).limit(asked);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *from), cx, &mut room) {
                Poll::Ready(Ok(read)) => {
                    if read >= asked {
                        self.size = (self.size * 2).min(LARGEST_READ);
                    }
                    return Poll::Ready(Ok(self.buffer.split().freeze()));
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => continue,
            }
        }
    }
}

/// Copies both ways between the connection from a `source` and the one to
/// its `destination` until both directions have ended, passing half-closes
/// on. Returns the bytes moved, counted also when the copy ends in an error.
pub async fn copy_tcp(
    source: &mut TcpStream,
    destination: &mut TcpStream,
) -> (Transferred, io::Result<()>) {
    let (mut source_read, mut source_write) = source.split();
    let (mut destination_read, mut destination_write) = destination.split();
    let mut bytes = Transferred::default();
    let result = tokio::try_join!(
        copy_one_way(
            &mut source_read,
            &mut destination_write,
            &mut bytes.to_destination
        ),
        copy_one_way(
            &mut destination_read,
            &mut source_write,
            &mut bytes.to_source
        ),
    )
    .map(|_| ());
    (bytes, result)
}

async fn copy_one_way(
    from: &mut (impl AsyncRead + AsRef<TcpStream> + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    moved: &mut u64,
) -> io::Result<()> {
    let mut reader = ChunkReader::new();
    loop {
        let chunk = reader.next(from).await?;
        if chunk.is_empty() {
            return to.shutdown().await;
        }
        to.write_all(&chunk).await?;
        *moved += chunk.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{ChunkReader, LARGEST_READ, Transferred, copy_tcp};

    /// Both ends of a loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    type Copy = tokio::task::JoinHandle<(Transferred, std::io::Result<()>)>;

    /// A client and a server connected through `copy_tcp`.
    async fn proxied() -> (TcpStream, TcpStream, Copy) {
        let (client, mut proxy_client_side) = pair().await;
        let (mut proxy_server_side, server) = pair().await;
        let proxy =
            tokio::spawn(
                async move { copy_tcp(&mut proxy_client_side, &mut proxy_server_side).await },
            );
        (client, server, proxy)
    }

    #[tokio::test]
    async fn copies_both_ways_passes_half_closes_on_and_counts_bytes() {
        let (mut client, mut server, proxy) = proxied().await;
        // More than the largest read, in a pattern that shows reordering.
        let request: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let reply = b"thanks".repeat(1000);

        let server_task = tokio::spawn({
            let reply = reply.clone();
            async move {
                let mut received = Vec::new();
                // Ends only when the client's half-close came through.
                server.read_to_end(&mut received).await.unwrap();
                server.write_all(&reply).await.unwrap();
                server.shutdown().await.unwrap();
                received
            }
        });
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();

        assert!(server_task.await.unwrap() == request);
        assert_eq!(answer, reply);
        let (bytes, result) = proxy.await.unwrap();
        result.unwrap();
        assert_eq!(
            bytes,
            Transferred {
                to_destination: request.len() as u64,
                to_source: reply.len() as u64
            }
        );
    }

    #[tokio::test]
    async fn an_idle_connection_copies_nothing_until_data_comes() {
        let (mut client, mut server, proxy) = proxied().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        client.write_all(b"late").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"late");
        drop(client);
        drop(server);
        let (bytes, _) = proxy.await.unwrap();
        assert_eq!(
            bytes,
            Transferred {
                to_destination: 4,
                to_source: 0
            }
        );
    }

    #[test]
    fn bulk_chunks_leave_room_for_their_frame_header() {
        let mut reader = ChunkReader::with_headroom(9);
        let mut sizes = Vec::new();
        for _ in 0..10 {
            sizes.push(reader.read_size());
            reader.size = (reader.size * 2).min(LARGEST_READ);
        }
        assert_eq!(
            sizes[..7],
            [4096, 8192, 16384, 32768, 65536, 131072, 262135],
            "powers of two, the sizes applications write in, until the largest"
        );
        assert!(sizes[6..].iter().all(|&size| size == 262135));
        assert_eq!((262135 + 9) % (16 * 1024), 0, "whole TLS records");
        assert_eq!(ChunkReader::new().read_size(), 4096);
        reader = ChunkReader::new();
        reader.size = LARGEST_READ;
        assert_eq!(reader.read_size(), 256 * 1024, "plain TCP has no framing");
    }

    /// A task that has used up its runtime budget is told to wait by the
    /// read itself while the socket still says it has data. The reader must
    /// yield then, not try again in the same poll forever (which froze a
    /// whole ztunnel thread under a bulk transfer).
    #[test]
    fn a_reader_out_of_budget_yields_instead_of_spinning() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let chunk = runtime.block_on(async {
                let (mut writer, reader_side) = pair().await;
                writer.write_all(b"waiting").await.unwrap();
                let (mut read, _write) = reader_side.into_split();
                read.readable().await.unwrap();
                // Spend this task's whole budget in the current poll.
                std::future::poll_fn(|cx| {
                    loop {
                        match tokio::task::coop::poll_proceed(cx) {
                            std::task::Poll::Ready(restore) => restore.made_progress(),
                            std::task::Poll::Pending => return std::task::Poll::Ready(()),
                        }
                    }
                })
                .await;
                ChunkReader::new().next(&mut read).await.unwrap()
            });
            let _ = done.send(chunk);
        });
        let chunk = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the reader never returned: it spins without yielding");
        assert_eq!(&chunk[..], b"waiting");
    }
}
