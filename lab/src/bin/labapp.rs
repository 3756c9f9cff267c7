//! `labapp`: the small workload program lab pods run.
//!
//! | command | does |
//! | --- | --- |
//! | `labapp http --port 80` | HTTP server answering `hello from <ns>/<pod>` and the peer address it saw |
//! | `labapp echo --port 7` | TCP echo; a half-close from the client is echoed as a half-close |
//! | `labapp sink --port 9` | reads until the client half-closes, then answers `<bytes> <sha256>` |
//! | `labapp send --to ADDR --bytes N` | sends N pseudo-random bytes to a sink, checks its answer |
//! | `labapp pingpong --to ADDR --count N [--rate R]` | 1 KiB request/response on one connection to an echo server; prints latency percentiles (JSON) |
//! | `labapp churn --to ADDR --concurrency C --seconds S` | connect, send 1 KiB, read it back, close, over and over; prints connections per second (JSON) |
//! | `labapp hold --to ADDR --connections N --seconds S` | holds N connections to an echo server for S seconds, each sending a chunk and checking it comes back unchanged every 100 ms; prints `{connections, broken, bytes, errors}` and fails if any broke |
//! | `labapp udp-echo --port 5000` | UDP echo |
//! | `labapp udp-send --to ADDR --count N` | datagrams to a UDP echo server, one at a time; fails when none is answered |
//! | `labapp dns --port 53` | DNS server answering every A/AAAA question with 192.0.2.1 / 2001:db8::1 |
//! | `labapp resolve --server ADDR NAME [--ipv6]` | one DNS lookup over UDP; prints the addresses |
//! | `labapp pipe --to ADDR [--spoofed-source IP]` | one TCP connection joined to standard input and output (`kanava verify` on a cluster) |
//! | `labapp capture --seconds S --between IP --between IP` | the TCP packets two addresses exchange, seen on every interface, as JSON (`kanava verify --host-network-capture`) |
//! | `labapp node-facts` | the node's kernel, mounts and CNI configuration as JSON (`kanava check`) |
//! | `labapp first-byte --to ADDR` | connects to an echo server until a byte comes back (at most 10 s); prints when, in Unix nanoseconds (JSON) |
//!
//! Servers listen on `[::]`, which takes both families; peers are printed
//! as their own family spells them (`10.0.0.1`, never `::ffff:10.0.0.1`).

#[path = "labapp/probe.rs"]
mod probe;
#[path = "labapp/udp.rs"]
mod udp;

use std::collections::BTreeMap;
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
    /// Request/response latency on one kept-open connection to an echo
    /// server.
    Pingpong {
        #[arg(long)]
        to: SocketAddr,
        /// Requests measured (after as many again for warm-up, at most 1000).
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Bytes per request (and response).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Requests per second; 0 sends each as soon as the last is answered.
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Connections per second: connect, send, read back, close.
    Churn {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Seconds measured (after a warm-up of a tenth of that).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Make exactly one connection and print how long it took.
        #[arg(long)]
        once: bool,
        /// New connections per second, all workers together (default: as
        /// many as they manage).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Hold connections to an echo server, checking every byte comes back.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
    },
    /// Echo every datagram back.
    UdpEcho {
        #[arg(long)]
        port: u16,
    },
    /// Send datagrams to a UDP echo server and count the answers.
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3)]
        count: u32,
        /// How long to wait for each answer.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Answer DNS questions.
    Dns {
        #[arg(long, default_value_t = 53)]
        port: u16,
    },
    /// One TCP connection joined to standard input and output; the first
    /// byte says whether it was made (`+`) or not (`-` and the reason).
    Pipe {
        #[arg(long)]
        to: SocketAddr,
        /// Bind to this address with IP_TRANSPARENT (needs CAP_NET_ADMIN).
        #[arg(long)]
        spoofed_source: Option<std::net::IpAddr>,
    },
    /// Capture the TCP packets two addresses exchange, on every interface
    /// of this namespace, for a while; print them as JSON.
    Capture {
        #[arg(long, default_value_t = 6)]
        seconds: u64,
        #[arg(long, required = true)]
        between: Vec<std::net::IpAddr>,
    },
    /// Print the node's kernel features, mounts and CNI configuration as
    /// JSON (run in a pod on the host's network with those paths mounted).
    NodeFacts {
        #[arg(long, default_value = "/host/etc/cni/net.d")]
        cni_conf_dir: String,
        #[arg(long, default_value = "/host/opt/cni/bin")]
        cni_bin_dir: String,
        #[arg(long, default_value = "/host/var/run/netns")]
        netns_dir: String,
    },
    /// Connect to an echo server, over and over, until a byte comes
    /// back; print when (a new pod's first byte through the mesh).
    FirstByte {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Look a name up at a DNS server.
    Resolve {
        #[arg(long)]
        server: SocketAddr,
        name: String,
        /// Ask for AAAA instead of A.
        #[arg(long)]
        ipv6: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    kanava_runtime::raise_fd_limit();
    match Args::parse().command {
        Mode::Http { port } => http(port).await,
        Mode::Echo { port } => serve(port, echo).await,
        Mode::UdpEcho { port } => udp::echo(port).await,
        Mode::UdpSend { to, count, wait } => udp::send(to, count, wait).await,
        Mode::Dns { port } => udp::dns(port).await,
        Mode::Resolve { server, name, ipv6 } => udp::resolve(server, &name, ipv6).await,
        Mode::Pipe { to, spoofed_source } => probe::pipe(to, spoofed_source).await,
        Mode::FirstByte { to } => probe::first_byte(to).await,
        Mode::Capture { seconds, between } => probe::capture(seconds, between).await,
        Mode::NodeFacts {
            cni_conf_dir,
            cni_bin_dir,
            netns_dir,
        } => probe::node_facts(&cni_conf_dir, &cni_bin_dir, &netns_dir),
        Mode::Sink { port } => serve(port, sink).await,
        Mode::Hold {
            to,
            connections,
            seconds,
        } => hold(to, connections, seconds).await,
        Mode::Send {
            to,
            bytes,
            seed,
            text,
        } => send(to, bytes, seed, text).await,
        Mode::Pingpong {
            to,
            count,
            size,
            rate,
        } => tokio::task::spawn_blocking(move || pingpong(to, count, size, rate)).await?,
        Mode::Churn {
            to,
            concurrency,
            seconds,
            size,
            once,
            rate,
        } => {
            tokio::task::spawn_blocking(move || churn(to, concurrency, seconds, size, once, rate))
                .await?
        }
    }
}

/// Holds `connections` connections to an echo server for `seconds`: every
/// 100 ms each sends a 4 KiB chunk (different every time) and checks that
/// exactly it comes back. A connection that fails, closes or returns other
/// bytes counts as broken.
async fn hold(to: SocketAddr, connections: usize, seconds: f64) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let held = Duration::try_from_secs_f64(seconds)
        .map_err(|_| anyhow::anyhow!("--seconds must be a positive number"))?;
    let deadline = tokio::time::Instant::now() + held;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..connections {
        let mut stream =
            tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(to))
                .await
                .map_err(|_| anyhow::anyhow!("connection {index}: connect timed out"))??;
        tasks.spawn(async move {
            let mut carried = 0u64;
            let mut round = 0u64;
            let mut back = vec![0u8; 4096];
            while tokio::time::Instant::now() < deadline {
                let chunk: Vec<u8> = (0..4096u64)
                    .map(|i| (i ^ round.wrapping_mul(31) ^ index as u64) as u8)
                    .collect();
                let exchanged = async {
                    stream.write_all(&chunk).await?;
                    stream.read_exact(&mut back).await?;
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(20), exchanged).await {
                    Ok(Ok(())) if back == chunk => carried += chunk.len() as u64,
                    Ok(Ok(())) => return Err(format!("connection {index}: other bytes came back")),
                    Ok(Err(error)) => return Err(format!("connection {index}: {error}")),
                    Err(_) => return Err(format!("connection {index}: no echo within 20 s")),
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(carried)
        });
    }
    let (mut bytes, mut errors) = (0u64, Vec::new());
    while let Some(result) = tasks.join_next().await {
        match result? {
            Ok(carried) => bytes += carried,
            Err(error) => errors.push(error),
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "connections": connections,
            "broken": errors.len(),
            "bytes": bytes,
            "errors": errors.iter().take(5).collect::<Vec<_>>(),
        })
    );
    if !errors.is_empty() {
        anyhow::bail!("{} of {connections} connections broke", errors.len());
    }
    Ok(())
}

/// One request/response exchange on a blocking socket.
fn exchange(
    stream: &mut std::net::TcpStream,
    request: &[u8],
    response: &mut [u8],
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    stream.write_all(request)?;
    stream.read_exact(response)
}

/// Latency percentiles, in microseconds, of a sorted list of nanoseconds.
fn percentiles(sorted: &[u64]) -> serde_json::Value {
    let at = |q: f64| {
        let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
        sorted.get(index).copied().unwrap_or(0) as f64 / 1000.0
    };
    serde_json::json!({
        "count": sorted.len(),
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": sorted.last().copied().unwrap_or(0) as f64 / 1000.0,
    })
}

// Blocking sockets on purpose: no runtime between the measurement and the
// system calls, and pacing with a precise sleep.
fn pingpong(to: SocketAddr, count: usize, size: usize, rate: u64) -> anyhow::Result<()> {
    let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    stream.set_nodelay(true)?;
    let request = vec![0x5a; size];
    let mut response = vec![0; size];
    for _ in 0..count.min(1000) {
        exchange(&mut stream, &request, &mut response)?;
    }
    let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let mut samples = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        if let Some(interval) = interval {
            let due = started + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let sent = Instant::now();
        exchange(&mut stream, &request, &mut response)?;
        samples.push(sent.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    println!("{}", percentiles(&samples));
    Ok(())
}

fn churn(
    to: SocketAddr,
    concurrency: usize,
    seconds: f64,
    size: usize,
    once: bool,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    // An error names the step it happened in, so a failed run says why.
    let one = move || -> Result<u64, String> {
        let started = Instant::now();
        let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("connect: {e}"))?;
        let request = vec![0x5a; size];
        let mut response = vec![0; size];
        exchange(&mut stream, &request, &mut response).map_err(|e| format!("exchange: {e}"))?;
        Ok(started.elapsed().as_nanos() as u64)
    };
    if once {
        let nanos = one().map_err(anyhow::Error::msg)?;
        println!(
            "{}",
            serde_json::json!({ "first_connection_us": nanos as f64 / 1000.0 })
        );
        return Ok(());
    }
    let measure = Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--seconds must be a positive number, not {seconds}"))?;
    let warmup = measure / 10;
    let start = Instant::now() + warmup;
    let end = start + measure;
    let workers = concurrency.max(1);
    // Paced: each worker takes every `workers`-th slot of the schedule.
    let interval = match rate {
        Some(rate) if rate.is_finite() && rate > 0.0 => {
            Some(Duration::from_secs_f64(workers as f64 / rate))
        }
        Some(rate) => anyhow::bail!("--rate must be a positive number, not {rate}"),
        None => None,
    };
    let workers: Vec<_> = (0..workers)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut done, mut errors, mut samples) =
                    (0u64, BTreeMap::<String, u64>::new(), Vec::new());
                let mut next = Instant::now();
                while Instant::now() < end {
                    if let Some(interval) = interval {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        // Behind schedule: go on from now, no burst to catch up.
                        next = next.max(now) + interval;
                    }
                    let counted = Instant::now() >= start;
                    match one() {
                        Ok(nanos) if counted => {
                            done += 1;
                            samples.push(nanos);
                        }
                        Ok(_) => {}
                        Err(error) if counted => *errors.entry(error).or_default() += 1,
                        Err(_) => {}
                    }
                }
                (done, errors, samples)
            })
        })
        .collect();
    let (mut done, mut errors, mut samples) = (0, BTreeMap::<String, u64>::new(), Vec::new());
    for worker in workers {
        let (d, e, s) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))?;
        done += d;
        for (error, count) in e {
            *errors.entry(error).or_default() += count;
        }
        samples.extend(s);
    }
    samples.sort_unstable();
    let mut result = percentiles(&samples);
    result["connections"] = done.into();
    result["errors"] = errors.values().sum::<u64>().into();
    result["error_kinds"] = serde_json::json!(errors);
    result["per_second"] = (done as f64 / measure.as_secs_f64()).into();
    println!("{result}");
    Ok(())
}

fn whoami() -> String {
    format!(
        "{}/{}",
        std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "?".into()),
        std::env::var("POD_NAME").unwrap_or_else(|_| "?".into())
    )
}

/// A socket bound to `[::]:port`, which takes both families (in an
/// IPv4-only pod IPv6 exists on loopback only, and `[::]` still takes IPv4).
fn dual_stack_socket(kind: socket2::Type, port: u16) -> anyhow::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, kind, None)?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())
        .with_context(|| format!("bind port {port}"))?;
    Ok(socket)
}

/// A listener on every address of the pod, both families.
async fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let socket = dual_stack_socket(socket2::Type::STREAM, port)?;
    socket
        .listen(1024)
        .with_context(|| format!("listen on port {port}"))?;
    let listener = TcpListener::from_std(socket.into())?;
    eprintln!("{} listening on port {port}", whoami());
    Ok(listener)
}

/// `::ffff:10.0.0.1:80` → `10.0.0.1:80`.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

async fn http(port: u16) -> anyhow::Result<()> {
    let listener = listen(port).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let peer = canonical(peer);
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
        let peer = canonical(peer);
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
