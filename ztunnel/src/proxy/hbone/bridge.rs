//! The byte bridge between a TCP connection and an HBONE stream.

use std::future::{Future, poll_fn};
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::Error;
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

/// How a bridge ended, when it did not end well.
#[derive(Debug)]
pub enum BridgeError {
    /// The destination did not accept the stream (refused the `CONNECT`, or
    /// never answered): nothing was carried, and the TCP side was reset.
    NotAccepted(Box<Error>),
    /// A connection broke while bytes were being carried.
    Io(std::io::Error),
}

impl BridgeError {
    pub fn into_io(self) -> std::io::Error {
        match self {
            BridgeError::NotAccepted(error) => std::io::Error::other(*error),
            BridgeError::Io(error) => error,
        }
    }
}

/// Copies between a TCP connection and an HTTP/2 stream until both
/// directions have ended, and says how many bytes went each way (counted
/// from the TCP side: read from it, written to it).
///
/// `accepted` yields the stream's receiving half once the destination has
/// accepted it. Bytes from TCP flow from the start, without waiting for it:
/// on a `CONNECT` just sent, the client's first bytes ride right behind the
/// request instead of a round trip later.
///
/// End of input on either side is passed on as a half-close (END_STREAM on
/// HTTP/2, FIN on TCP) while the other direction keeps flowing. Flow control
/// gives backpressure both ways: nothing is read from TCP beyond what the
/// peer's window admits, and window is returned to the peer only once its
/// bytes are written to TCP.
///
/// A function returning an `async move` block rather than an `async fn`,
/// which would keep its arguments twice in the connection's task
/// (rust-lang/rust#62958).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task (rust-lang/rust#62958)"
)]
pub fn bridge<A>(
    mut tcp_read: OwnedReadHalf,
    mut tcp_write: OwnedWriteHalf,
    mut send: SendStream<Bytes>,
    accepted: A,
) -> impl Future<Output = (Copied, Result<(), BridgeError>)>
where
    A: Future<Output = Result<RecvStream, Box<Error>>>,
{
    async move {
        let mut sent = 0u64;
        let mut received = 0u64;
        let to_h2 = async {
            let mut reader = ChunkReader::new();
            loop {
                let mut chunk = reader.next(&mut tcp_read).await.map_err(BridgeError::Io)?;
                if chunk.is_empty() {
                    send.send_data(Bytes::new(), true).map_err(h2_io)?;
                    return Ok::<_, BridgeError>(());
                }
                sent += chunk.len() as u64;
                while !chunk.is_empty() {
                    send.reserve_capacity(chunk.len());
                    let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(granted)) => granted,
                        Some(Err(e)) => return Err(h2_io(e)),
                        None => {
                            return Err(BridgeError::Io(std::io::Error::other(
                                "the peer closed the HBONE stream while data was waiting to be sent",
                            )));
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
            let mut recv = accepted.await.map_err(BridgeError::NotAccepted)?;
            while let Some(data) = recv.data().await {
                let data = data.map_err(h2_io)?;
                let len = data.len();
                tcp_write.write_all(&data).await.map_err(BridgeError::Io)?;
                received += len as u64;
                // Err only when the stream is already gone; the next data() says so.
                let _ = recv.flow_control().release_capacity(len);
            }
            tcp_write.shutdown().await.map_err(BridgeError::Io)?;
            Ok::<_, BridgeError>(())
        };
        let result = tokio::try_join!(to_h2, from_h2).map(|_| ());
        match &result {
            Ok(()) => {}
            Err(BridgeError::NotAccepted(_)) => {
                send.send_reset(h2::Reason::CANCEL);
                // A reset, not a clean close the client could take for an
                // empty answer; its bytes went nowhere. (A write half that is
                // dropped sends a FIN first; forgotten, it leaves the close to
                // the read half, which resets.)
                let _ = socket2::SockRef::from(tcp_read.as_ref()).set_linger(Some(Duration::ZERO));
                tcp_write.forget();
                sent = 0;
            }
            Err(BridgeError::Io(_)) => send.send_reset(h2::Reason::CANCEL),
        }
        (
            Copied {
                from_tcp: sent,
                to_tcp: received,
            },
            result,
        )
    }
}

/// An HTTP/2 error as an I/O error, keeping the socket's own error where
/// there is one and saying which layer failed where there is not.
fn h2_io(error: h2::Error) -> BridgeError {
    BridgeError::Io(h2_io_error(error))
}

fn h2_io_error(error: h2::Error) -> std::io::Error {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use bytes::Bytes;
    use http::{Method, Request, Response, StatusCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{BridgeError, bridge};
    use crate::Error;
    use crate::proxy::hbone::Refusal;

    /// Both ends of a loopback TCP connection.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// An HTTP/2 server that reads a stream's first bytes before it answers
    /// the CONNECT with `status`, then echoes what it read.
    fn answer_after_first_bytes(io: tokio::io::DuplexStream, status: StatusCode) {
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(io).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let mut body = request.into_body();
            let first = body.data().await.unwrap().unwrap();
            let mut send = respond
                .send_response(Response::builder().status(status).body(()).unwrap(), false)
                .unwrap();
            if status == StatusCode::OK {
                send.send_data(first, false).unwrap();
                // The rest of the request, to its end, then the end of the answer.
                while let Some(more) = body.data().await {
                    send.send_data(more.unwrap(), false).unwrap();
                }
                send.send_data(Bytes::new(), true).unwrap();
            }
        });
    }

    /// Sends a CONNECT and bridges a client's TCP connection to its stream
    /// without waiting for the answer.
    async fn bridged(
        status: StatusCode,
    ) -> (
        TcpStream,
        tokio::task::JoinHandle<(super::Copied, Result<(), BridgeError>)>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        answer_after_first_bytes(server_io, status);
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, send) = sender.send_request(request, false).unwrap();
        let accepted = async move {
            let response = response.await.expect("an answer");
            match Refusal::from_status(response.status()) {
                None => Ok(response.into_body()),
                Some(refusal) => Err(Box::new(Error::ConnectRefused {
                    peer: "10.0.0.1:15008".parse().unwrap(),
                    target: "10.0.0.1:80".parse().unwrap(),
                    refusal,
                })),
            }
        };
        let (client, proxy_side) = tcp_pair().await;
        let (read, write) = proxy_side.into_split();
        let task = tokio::spawn(bridge(read, write, send, accepted));
        (client, task)
    }

    #[tokio::test]
    async fn the_first_bytes_go_out_before_the_answer() {
        // The destination answers only once it has the client's bytes:
        // a bridge that waited for the answer first would never finish.
        let (mut client, task) = bridged(StatusCode::OK).await;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut echoed))
            .await
            .expect("the bridge waited for the answer before sending")
            .unwrap();
        assert_eq!(echoed, b"hello");
        let (copied, result) = task.await.unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert_eq!((copied.from_tcp, copied.to_tcp), (5, 5));
    }

    #[tokio::test]
    async fn a_refused_stream_resets_the_client_and_carries_nothing() {
        let (mut client, task) = bridged(StatusCode::UNAUTHORIZED).await;
        client.write_all(b"hello").await.unwrap();
        let (copied, result) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the bridge ended")
            .unwrap();
        match result {
            Err(BridgeError::NotAccepted(error)) => match *error {
                Error::ConnectRefused { refusal, .. } => {
                    assert!(refusal.is_denial(), "{refusal:?}");
                }
                other => panic!("expected a refusal, got {other:?}"),
            },
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!((copied.from_tcp, copied.to_tcp), (0, 0));
        let mut rest = Vec::new();
        let read = client.read_to_end(&mut rest).await;
        assert_eq!(
            read.expect_err("a reset, not a clean close").kind(),
            std::io::ErrorKind::ConnectionReset
        );
    }
}
