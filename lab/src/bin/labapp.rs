//! `labapp`: the small workload program lab pods run.
//!
//! | command | does |
//! | --- | --- |
//! | `labapp http --port 80` | HTTP server answering `hello from <ns>/<pod>` and the peer address it saw |
//! | `labapp echo --port 7` | TCP echo; a half-close from the client is echoed as a half-close |
//! | `labapp sink --port 9` | reads until the client half-closes, then answers `<bytes> <sha256>` |
//! | `labapp send --to ADDR --bytes N` | sends N pseudo-random bytes to a sink, checks its answer |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(name = "labapp", about = "Workload program for Kanava lab pods")]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Serve HTTP: every request gets who answered and who asked.
    Http {
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
    /// Echo every byte back.
    Echo {
        #[arg(long, default_value_t = 7)]
        port: u16,
    },
    /// Read everything, then answer with its length and SHA-256.
    Sink {
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
    /// Send bytes to a sink and check its answer.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        /// Seed of the pseudo-random bytes sent.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Send this text over and over instead of pseudo-random bytes
        /// (easy to look for in a packet capture).
        #[arg(long)]
        text: Option<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Mode::Http { port } => http(port).await,
        Mode::Echo { port } => serve(port, echo).await,
        Mode::Sink { port } => serve(port, sink).await,
        Mode::Send {
            to,
            bytes,
            seed,
            text,
        } => send(to, bytes, seed, text).await,
    }
}

fn whoami() -> String {
    format!(
        "{}/{}",
        std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "?".into()),
        std::env::var("POD_NAME").unwrap_or_else(|_| "?".into())
    )
}

async fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .with_context(|| format!("listen on port {port}"))?;
    eprintln!("{} listening on port {port}", whoami());
    Ok(listener)
}

async fn http(port: u16) -> anyhow::Result<()> {
    let listener = listen(port).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        eprintln!("http: connection from {peer}");
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| async move {
                let body = format!("hello from {}\npeer {peer}\n", whoami());
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn serve<F, Fut>(port: u16, handle: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = listen(port).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let work = handle(stream, peer);
        tokio::spawn(async move {
            if let Err(error) = work.await {
                eprintln!("connection from {peer}: {error:#}");
            }
        });
    }
}

async fn echo(mut stream: TcpStream, _peer: SocketAddr) -> anyhow::Result<()> {
    let (mut read, mut write) = stream.split();
    tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await?;
    Ok(())
}

async fn sink(mut stream: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
    let answer = format!("{total} {}\n", hex::encode(hasher.finalize()));
    eprintln!("sink: {peer} sent {answer}");
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn send(to: SocketAddr, bytes: u64, seed: u64, text: Option<String>) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(to))
        .await
        .context("connect timed out")??;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    if let Some(text) = text.as_deref().filter(|t| !t.is_empty()) {
        for (byte, fill) in buffer.iter_mut().zip(text.bytes().cycle()) {
            *byte = fill;
        }
    }
    let mut left = bytes;
    let mut block = seed;
    while left > 0 {
        let n = left.min(buffer.len() as u64) as usize;
        if text.is_none() {
            kanava_lab::pattern(block, &mut buffer[..n]);
            block += 1;
        }
        hasher.update(&buffer[..n]);
        stream.write_all(&buffer[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let expected = format!("{bytes} {}", hex::encode(hasher.finalize()));
    let elapsed = started.elapsed();
    if answer.trim() != expected {
        bail!("sink answered {:?}, expected {expected:?}", answer.trim());
    }
    println!(
        "sent {bytes} bytes to {to} in {:.2}s; the sink confirmed length and SHA-256 {}",
        elapsed.as_secs_f64(),
        &expected[expected.len() - 64..]
    );
    Ok(())
}
