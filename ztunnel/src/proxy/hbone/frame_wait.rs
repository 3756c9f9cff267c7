//! Sleep until the HTTP/2 frame being received can complete.
//!
//! HTTP/2 hands a DATA frame to its stream only once the whole frame has
//! arrived, and a bulk sender's frames are up to 256 KiB (one read from its
//! app). The kernel, though, wakes a reader for every few segments, so the
//! receiving ztunnel used to wake, decrypt a record or four, find the frame
//! still incomplete and sleep again, ten times a frame: on the receiving
//! node of one bulk stream that was most of its context switches.
//!
//! [`FrameWait`] sits between TLS and HTTP/2 and follows the frame headers
//! in the plaintext that HTTP/2 reads. Before the connection sleeps, it sets
//! the socket's `SO_RCVLOWAT` to what must still arrive before the current
//! frame can complete, less what TLS may already hold of it; nothing could
//! be delivered before then anyway, so no byte waits longer. Between frames,
//! and for small frames, it is 1, the default: a request of a few bytes is
//! read at once. The kernel still wakes the reader early when its receive
//! buffer fills or the window closes, and at a FIN or an error.
//!
//! It also hands HTTP/2 at most one HEADERS frame per poll of the
//! connection. HTTP/2 keeps each stream whose request (or response) it has
//! read but not yet handed over in a buffer that grows to the largest such
//! burst and never shrinks: read whole, a burst of new streams (a client
//! opening a hundred connections at once) cost every HBONE connection tens
//! of KiB for the rest of its life. Handed one at a time, each stream is
//! taken by its task before the next is read; what was read past the
//! frame (at most one read from TLS, about one record) waits in a buffer
//! of its own until HTTP/2 reads again after the yield.
//!
//! Neither changes anything on the wire.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most of a frame TLS may hold read but not yet decrypted: one record
/// on the wire (16 KiB of plaintext, its padding allowance, its header).
const TLS_HELD: usize = 16 * 1024 + 2048 + 5;

/// Below this, waking once more costs less than a system call each sleep.
const WORTH_WAITING_FOR: usize = 32 * 1024;

/// At most this: the kernel sizes its receive buffer to twice the mark, so
/// a larger one would grow a connection's buffer beyond need.
const MOST: usize = 256 * 1024;

/// The client's connection preface (RFC 9113, 3.4): what a server reads
/// before the first frame header.
const PREFACE_LEN: usize = 24;

const HEADER_LEN: usize = 9;

/// The type of a HEADERS frame (RFC 9113, 6.2).
const HEADERS: u8 = 0x1;

/// Where the byte stream is in HTTP/2's framing.
#[derive(Debug)]
struct Frames {
    /// Bytes of the client's preface still to skip.
    preface: usize,
    /// The next frame's header, as far as it has been read.
    header: [u8; HEADER_LEN],
    header_read: usize,
    /// Bytes of the current frame's payload still to come.
    payload: usize,
    /// The current frame's type.
    kind: u8,
}

impl Frames {
    fn new(preface: usize) -> Frames {
        Frames {
            preface,
            header: [0; HEADER_LEN],
            header_read: 0,
            payload: 0,
            kind: 0,
        }
    }

    /// Follows `bytes`, the next ones read, up to the end of the first
    /// HEADERS frame that ends among them, and returns how many bytes that
    /// took; `None` if it followed all of them.
    fn observe(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            if self.preface > 0 {
                let skip = self.preface.min(rest.len());
                self.preface -= skip;
                at += skip;
                continue;
            }
            if self.payload > 0 {
                let skip = self.payload.min(rest.len());
                self.payload -= skip;
                at += skip;
            } else {
                let take = (HEADER_LEN - self.header_read).min(rest.len());
                self.header[self.header_read..self.header_read + take]
                    .copy_from_slice(&rest[..take]);
                self.header_read += take;
                at += take;
                if self.header_read < HEADER_LEN {
                    continue;
                }
                self.header_read = 0;
                self.payload = usize::from(self.header[0]) << 16
                    | usize::from(self.header[1]) << 8
                    | usize::from(self.header[2]);
                self.kind = self.header[3];
            }
            if self.payload == 0 && self.kind == HEADERS {
                return Some(at);
            }
        }
        None
    }

    /// The low-water mark to sleep with: what must still reach the socket
    /// before the current frame can complete, or 1.
    fn low_water(&self) -> usize {
        let waiting = self.payload.saturating_sub(TLS_HELD).min(MOST);
        if waiting >= WORTH_WAITING_FOR {
            waiting
        } else {
            1
        }
    }
}

/// A transport whose TCP socket can be reached.
pub trait OverTcp {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl OverTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Plain TCP, for the tests: HBONE always runs over TLS.
#[cfg(test)]
impl OverTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// An HBONE connection's transport (TLS over TCP) that, read by HTTP/2,
/// sleeps until the frame being received can complete and hands over one
/// HEADERS frame per poll.
#[derive(Debug)]
pub struct FrameWait<T> {
    inner: T,
    frames: Frames,
    /// The socket's `SO_RCVLOWAT` as last set (1, the kernel's default, at
    /// first).
    low_water: usize,
    /// Read past a HEADERS frame: handed to HTTP/2 at its next read but one.
    /// Empty, holding no memory, almost always.
    held: BytesMut,
    /// The next read yields: HTTP/2 has just been handed a HEADERS frame.
    yield_next: bool,
}

impl<T: OverTcp> FrameWait<T> {
    /// The client's end: frames start at once.
    pub fn client(inner: T) -> FrameWait<T> {
        FrameWait::new(inner, 0)
    }

    /// The server's end: frames start after the client's preface.
    pub fn server(inner: T) -> FrameWait<T> {
        FrameWait::new(inner, PREFACE_LEN)
    }

    fn new(inner: T, preface: usize) -> FrameWait<T> {
        FrameWait {
            inner,
            frames: Frames::new(preface),
            low_water: 1,
            held: BytesMut::new(),
            yield_next: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Sets the socket's low-water mark for the sleep ahead. Setting it
    /// signals the reader at once if the socket already holds that much,
    /// so no wake-up is lost between the read that found too little and
    /// this.
    fn before_sleep(&mut self) {
        let mut wanted = self.frames.low_water();
        if wanted > 1 && wanted != self.low_water {
            let buffer = socket2::SockRef::from(self.inner.tcp())
                .recv_buffer_size()
                .unwrap_or(0);
            wanted = within_receive_buffer(wanted, buffer);
        }
        if wanted != self.low_water {
            // If the option cannot be set the connection merely wakes as
            // often as it did without it.
            if set_receive_low_water(self.inner.tcp(), wanted).is_ok() {
                self.low_water = wanted;
            }
        }
    }
}

/// The mark `wanted`, kept within what the socket's receive buffer
/// (`SO_RCVBUF`, `buffer` bytes) already holds. A mark beyond it makes the
/// kernel grow the buffer and clamp the receive window to the mark, and
/// autotuning, which grows the window only as the reader takes more per
/// round trip, may then keep a long path below its bandwidth. A quarter of
/// the buffer is a window's worth at any ratio of payload to buffer
/// overhead the kernel assumes; a bulk connection's buffer grows to
/// megabytes within its first round trips, and its mark with it.
fn within_receive_buffer(wanted: usize, buffer: usize) -> usize {
    let room = buffer / 4;
    if wanted <= room {
        wanted
    } else if room >= WORTH_WAITING_FOR {
        room
    } else {
        1
    }
}

/// `SO_RCVLOWAT`. By hand: neither socket2 nor rustix exposes it.
fn set_receive_low_water(tcp: &TcpStream, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    super::super::socket::set_int_option(
        tcp.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVLOWAT,
        value,
    )
}

impl<T: AsyncRead + OverTcp + Unpin> AsyncRead for FrameWait<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.yield_next {
            // HTTP/2 returns to the task, which takes the stream it just
            // read; the task runs again at once.
            this.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if !this.held.is_empty() {
            let offered = this.held.len().min(buf.remaining());
            let stop = this.frames.observe(&this.held[..offered]);
            let handed = stop.unwrap_or(offered);
            buf.put_slice(&this.held[..handed]);
            if handed == this.held.len() {
                this.held = BytesMut::new();
            } else {
                this.held.advance(handed);
            }
            this.yield_next = stop.is_some();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if let Some(end) = this.frames.observe(read) {
                    this.held.extend_from_slice(&read[end..]);
                    buf.set_filled(before + end);
                    this.yield_next = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                this.before_sleep();
                Poll::Pending
            }
            failed => failed,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FrameWait<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(length: usize, kind: u8) -> Vec<u8> {
        let mut header = vec![
            (length >> 16) as u8,
            (length >> 8) as u8,
            length as u8,
            kind,
            0,
        ];
        header.extend_from_slice(&1u32.to_be_bytes());
        header
    }

    #[test]
    fn a_large_frame_is_waited_for_whole_and_a_small_one_not() {
        let mut frames = Frames::new(0);
        assert_eq!(frames.low_water(), 1, "between frames");
        frames.observe(&header(256 * 1024, 0));
        assert_eq!(frames.low_water(), 256 * 1024 - TLS_HELD);
        frames.observe(&[0; 100 * 1024]);
        assert_eq!(frames.low_water(), 156 * 1024 - TLS_HELD);
        frames.observe(&vec![0; 156 * 1024 - 20 * 1024]);
        assert_eq!(frames.low_water(), 1, "what is left TLS may hold");
        frames.observe(&[0; 20 * 1024]);
        assert_eq!(frames.low_water(), 1, "the frame is complete");
        frames.observe(&header(40, 0));
        assert_eq!(frames.low_water(), 1, "a small frame");
    }

    #[test]
    fn the_mark_stays_within_the_receive_buffer() {
        assert_eq!(within_receive_buffer(200 * 1024, 4 << 20), 200 * 1024);
        assert_eq!(within_receive_buffer(200 * 1024, 400 * 1024), 100 * 1024);
        assert_eq!(
            within_receive_buffer(200 * 1024, 64 * 1024),
            1,
            "a fresh socket's buffer leaves no room worth waiting for"
        );
    }

    #[test]
    fn the_mark_is_bounded() {
        let mut frames = Frames::new(0);
        frames.observe(&header(1 << 20, 0));
        assert_eq!(frames.low_water(), MOST);
    }

    #[test]
    fn headers_split_across_reads_and_frames_sharing_one_are_followed() {
        let mut stream = header(4, 8); // WINDOW_UPDATE
        stream.extend_from_slice(&[0, 0, 1, 0]);
        stream.extend(header(100 * 1024, 0));
        stream.extend_from_slice(&[7; 10]);
        let mut frames = Frames::new(0);
        for byte in &stream {
            frames.observe(std::slice::from_ref(byte));
        }
        assert_eq!(frames.payload, 100 * 1024 - 10);
        let mut at_once = Frames::new(0);
        at_once.observe(&stream);
        assert_eq!(at_once.payload, frames.payload);
    }

    #[test]
    fn a_server_skips_the_clients_preface() {
        let mut frames = Frames::new(PREFACE_LEN);
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        assert_eq!(stream.len(), PREFACE_LEN);
        stream.extend(header(64 * 1024, 0));
        frames.observe(&stream);
        assert_eq!(frames.payload, 64 * 1024);
    }

    #[test]
    fn each_headers_frame_ends_what_is_followed_at_once() {
        let mut stream = header(4, 8); // WINDOW_UPDATE
        stream.extend_from_slice(&[0, 0, 1, 0]);
        stream.extend(header(20, HEADERS));
        stream.extend_from_slice(&[1; 20]);
        let first = stream.len();
        stream.extend(header(10, 0));
        stream.extend_from_slice(&[2; 10]);
        stream.extend(header(0, HEADERS));
        let second = stream.len() - first;
        stream.extend(header(5, 0));
        stream.extend_from_slice(&[3; 5]);
        let mut frames = Frames::new(0);
        assert_eq!(frames.observe(&stream), Some(first));
        assert_eq!(frames.observe(&stream[first..]), Some(second));
        assert_eq!(frames.observe(&stream[first + second..]), None);
        assert_eq!(frames.payload, 0);

        let mut split = Frames::new(0);
        let mut stops = Vec::new();
        for (at, byte) in stream.iter().enumerate() {
            if split.observe(std::slice::from_ref(byte)).is_some() {
                stops.push(at + 1);
            }
        }
        assert_eq!(stops, [first, first + second], "one byte at a time");
    }

    /// Both ends of a TCP connection over loopback: (sender, receiver).
    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (receiver, _) = listener.accept().await.unwrap();
        (sender, receiver)
    }

    /// A waker that counts its wakes.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for Wakes {
        fn wake_by_ref(arc_self: &std::sync::Arc<Self>) {
            arc_self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Two requests and some data read at once: HTTP/2 gets the first
    /// request, then a yield that wakes the task at once, then the second,
    /// another yield, then the rest; the bytes held in between are given
    /// back.
    #[tokio::test]
    async fn http2_reads_one_headers_frame_per_poll() {
        use tokio::io::AsyncWriteExt;
        let (mut sender, receiver) = connected_pair().await;
        let mut sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        sent.extend(header(30, HEADERS));
        sent.extend_from_slice(&[1; 30]);
        let first = sent.len();
        sent.extend(header(40, HEADERS));
        sent.extend_from_slice(&[2; 40]);
        let second = sent.len();
        sent.extend(header(50, 0));
        sent.extend_from_slice(&[3; 50]);
        sender.write_all(&sent).await.unwrap();
        receiver.readable().await.unwrap();
        let mut receiver = FrameWait::server(receiver);

        let wakes = std::sync::Arc::new(Wakes(0.into()));
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut storage = vec![0; 64 * 1024];
        let mut read = || {
            let mut buf = ReadBuf::new(&mut storage);
            match Pin::new(&mut receiver).poll_read(&mut cx, &mut buf) {
                Poll::Ready(result) => {
                    result.unwrap();
                    Some(buf.filled().to_vec())
                }
                Poll::Pending => None,
            }
        };
        let woken = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        // The first read may come before all the bytes have.
        let mut got = read().expect("bytes waiting");
        while got.len() < first {
            got.extend(read().expect("bytes waiting"));
        }
        assert_eq!(got, sent[..first], "up to the end of the first request");
        assert_eq!(read(), None, "a yield");
        assert_eq!(woken(), 1, "that wakes the task at once");
        let mut rest = read().expect("the bytes held");
        while rest.len() < second - first {
            rest.extend(read().expect("bytes waiting"));
        }
        assert_eq!(rest, sent[first..second], "the second request");
        assert_eq!(read(), None, "a yield");
        assert_eq!(woken(), 2);
        let mut data = Vec::new();
        while data.len() < sent.len() - second {
            data.extend(read().expect("bytes waiting"));
        }
        assert_eq!(data, sent[second..]);
        assert_eq!(read(), None, "nothing more was sent");
        assert_eq!(woken(), 2, "a real sleep is not a yield");
        assert_eq!(receiver.held.capacity(), 0, "nothing held");
    }

    /// With HTTP/2 on both ends: a burst of requests read at once is
    /// accepted whole, one stream at a time.
    #[tokio::test]
    async fn a_burst_of_streams_is_accepted_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        const STREAMS: usize = 100;
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(FrameWait::server(tcp)).await.unwrap();
            let mut accepted = 0;
            while let Some(stream) = connection.accept().await {
                let (_request, mut respond) = stream.unwrap();
                respond
                    .send_response(http::Response::new(()), true)
                    .unwrap();
                accepted += 1;
            }
            accepted
        });
        let tcp = TcpStream::connect(address).await.unwrap();
        let (client, connection) = h2::client::handshake(FrameWait::client(tcp)).await.unwrap();
        let driver = tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let mut responses = Vec::new();
        // Sent before any is answered: the server reads them in bursts.
        for _ in 0..STREAMS {
            let request = http::Request::get("http://x/").body(()).unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            responses.push(response);
            client = client.ready().await.unwrap();
        }
        for response in responses {
            assert_eq!(response.await.unwrap().status(), 200);
        }
        drop(client);
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the server ends with the client")
            .unwrap();
        assert_eq!(accepted, STREAMS);
        driver.await.unwrap().unwrap();
    }

    /// The socket's `SO_RCVLOWAT`, read back from the kernel.
    fn kernel_low_water(tcp: &TcpStream) -> usize {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a live socket, and a c_int with its size to read into.
        #[allow(unsafe_code)]
        let result = unsafe {
            libc::getsockopt(
                tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(result, 0);
        usize::try_from(value).unwrap()
    }

    /// Reads what the socket holds until a read would sleep; returns the
    /// bytes read.
    fn drain(receiver: &mut FrameWait<TcpStream>) -> usize {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; 64 * 1024];
        let mut total = 0;
        loop {
            match futures::FutureExt::now_or_never(receiver.read(&mut buf)) {
                Some(read) => {
                    let read = read.unwrap();
                    assert!(read > 0, "the sender did not close");
                    total += read;
                }
                None => return total,
            }
        }
    }

    /// Over a real socket: the mark is raised while a large frame is short
    /// of its end, a few more bytes of it do not wake the reader, the rest
    /// does, and the mark is back at 1 between frames, where one byte
    /// wakes the reader.
    #[tokio::test]
    async fn the_reader_sleeps_until_the_frame_can_complete() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sender, receiver) = connected_pair().await;
        // A buffer of its own, so the mark is not bounded by what
        // autotuning happened to give a fresh socket (the kernel doubles
        // the 200 KiB asked for: room for a mark of 100 KiB).
        socket2::SockRef::from(&receiver)
            .set_recv_buffer_size(200 * 1024)
            .unwrap();
        let mut receiver = FrameWait::client(receiver);
        let mut buf = vec![0; 64 * 1024];

        let length = 100 * 1024;
        sender.write_all(&header(length, 0)).await.unwrap();
        sender.write_all(&[1; 1024]).await.unwrap();
        let mut read = receiver.read(&mut buf).await.unwrap();
        read += drain(&mut receiver);
        assert_eq!(read, HEADER_LEN + 1024);
        assert_eq!(receiver.low_water, length - 1024 - TLS_HELD);
        assert_eq!(kernel_low_water(receiver.get_ref()), receiver.low_water);

        sender.write_all(&[1; 8 * 1024]).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), receiver.read(&mut buf)).await;
        assert!(early.is_err(), "woken before the frame could complete");

        sender.write_all(&vec![1; length - 9 * 1024]).await.unwrap();
        sender.write_all(&header(4, 8)).await.unwrap();
        sender.write_all(&[0, 0, 1, 0]).await.unwrap();
        let mut rest = 0;
        while rest < length - 1024 + HEADER_LEN + 4 {
            rest += tokio::time::timeout(Duration::from_secs(5), receiver.read(&mut buf))
                .await
                .expect("woken once the frame could complete")
                .unwrap();
        }
        assert_eq!(drain(&mut receiver), 0);
        assert_eq!(receiver.frames.payload, 0);
        assert_eq!(receiver.low_water, 1);
        assert_eq!(kernel_low_water(receiver.get_ref()), 1);

        sender.write_all(&[0]).await.unwrap();
        let small = tokio::time::timeout(Duration::from_secs(5), receiver.read(&mut buf))
            .await
            .expect("one byte wakes the reader between frames")
            .unwrap();
        assert_eq!(small, 1);
    }
}
