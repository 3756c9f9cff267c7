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

use std::future::{Future, poll_fn};
use std::io;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, ReadHalf};

use super::access_log::Transferred;

/// Bytes read at a time: small for a connection that trickles, doubling
/// while reads fill the buffer, up to the most worth reading at once in a
/// bulk transfer.
const FIRST_READ: usize = 4 * 1024;
const LARGEST_READ: usize = 256 * 1024;

/// The reading side of a TCP connection, owned or borrowed.
pub trait TcpRead: AsyncRead + Unpin {
    /// Waits until the socket may have data or has been closed.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl TcpRead for OwnedReadHalf {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        OwnedReadHalf::readable(self)
    }
}

impl TcpRead for ReadHalf<'_> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        ReadHalf::readable(self)
    }
}

/// Reads one connection chunk by chunk.
pub struct ChunkReader {
    size: usize,
    /// The buffer of a busy connection; empty (no memory) while it is quiet.
    buffer: BytesMut,
}

impl ChunkReader {
    pub fn new() -> Self {
        ChunkReader {
            size: FIRST_READ,
            buffer: BytesMut::new(),
        }
    }

    /// The next bytes the peer sent; empty once it has finished sending.
    pub async fn next(&mut self, from: &mut impl TcpRead) -> io::Result<Bytes> {
        loop {
            if poll_once(from.readable()).await.is_none() {
                // Nothing waiting: the connection may stay quiet for hours,
                // so it holds no buffer while it does.
                self.buffer = BytesMut::new();
                from.readable().await?;
            }
            // Reclaims the memory of earlier chunks once they are gone.
            self.buffer.reserve(self.size);
            // One attempt, through the runtime's read path: after a short
            // read it knows the socket is drained, and the next wait costs
            // no system call. It may not get anything: readiness can come
            // without data (a freshly accepted socket often reports it), and
            // a task that has used up its share of the runtime is told to
            // wait. Either way the task yields before trying again — without
            // that, a spent share would spin here forever and starve every
            // task on this thread.
            let Some(read) = poll_once(from.read_buf(&mut self.buffer)).await else {
                tokio::task::yield_now().await;
                continue;
            };
            if read? >= self.size {
                self.size = (self.size * 2).min(LARGEST_READ);
            }
            return Ok(self.buffer.split().freeze());
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
    from: &mut impl TcpRead,
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

/// Polls `future` once: its output if it is ready, `None` if it would wait.
async fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{ChunkReader, Transferred, copy_tcp};

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
