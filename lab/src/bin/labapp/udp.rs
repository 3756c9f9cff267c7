//! The UDP side of `labapp`: an echo server and its client, and a DNS
//! server and resolver, for the tests of what STRICT does to datagrams.
//!
//! DNS messages are built and read with `hickory-proto`, not by hand.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};
use tokio::net::UdpSocket;

/// What the DNS server answers for every A and AAAA question (addresses
/// reserved for documentation).
pub const DNS_ANSWER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const DNS_ANSWER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// A UDP socket on every address of the pod, both families.
async fn bind(port: u16) -> anyhow::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // An IPv4-only pod has IPv6 on loopback only; [::] still takes IPv4.
    socket.set_only_v6(false)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())
        .with_context(|| format!("bind UDP port {port}"))?;
    Ok(UdpSocket::from_std(socket.into())?)
}

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// Sends every datagram back to where it came from.
pub async fn echo(port: u16) -> anyhow::Result<()> {
    let socket = bind(port).await?;
    eprintln!("udp-echo listening on port {port}");
    let mut buffer = vec![0u8; 65_536];
    loop {
        let (n, peer) = socket.recv_from(&mut buffer).await?;
        eprintln!("udp-echo: {n} bytes from {}", canonical(peer));
        socket.send_to(&buffer[..n], peer).await?;
    }
}

/// Sends `count` datagrams to an echo server, one at a time, and counts
/// the answers. Fails when none came back.
pub async fn send(to: SocketAddr, count: u32, wait: Duration) -> anyhow::Result<()> {
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    let mut answered = 0;
    let mut buffer = [0u8; 64];
    for sequence in 0..count {
        let datagram = format!("labapp udp-send {sequence}");
        socket.send_to(datagram.as_bytes(), to).await?;
        if let Ok(Ok((n, _))) = tokio::time::timeout(wait, socket.recv_from(&mut buffer)).await
            && &buffer[..n] == datagram.as_bytes()
        {
            answered += 1;
        }
    }
    println!("{answered} of {count} answered");
    if answered == 0 {
        bail!("no answer from {to}");
    }
    Ok(())
}

/// A DNS server that answers every A question with [`DNS_ANSWER_V4`] and
/// every AAAA question with [`DNS_ANSWER_V6`].
pub async fn dns(port: u16) -> anyhow::Result<()> {
    let socket = bind(port).await?;
    eprintln!("dns listening on port {port}");
    let mut buffer = vec![0u8; 4096];
    loop {
        let (n, peer) = socket.recv_from(&mut buffer).await?;
        let Ok(query) = Message::from_vec(&buffer[..n]) else {
            eprintln!("dns: unreadable query from {}", canonical(peer));
            continue;
        };
        let mut reply = Message::new();
        reply
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true)
            .set_authoritative(true);
        for question in query.queries() {
            reply.add_query(question.clone());
            let data = match question.query_type() {
                RecordType::A => RData::A(rdata::A(DNS_ANSWER_V4)),
                RecordType::AAAA => RData::AAAA(rdata::AAAA(DNS_ANSWER_V6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(question.name().clone(), 60, data));
        }
        eprintln!(
            "dns: {} question(s) from {}",
            query.queries().len(),
            canonical(peer)
        );
        socket.send_to(&reply.to_vec()?, peer).await?;
    }
}

/// Asks `server` for the A (or AAAA) record of `name`, three tries, and
/// prints the addresses.
pub async fn resolve(server: SocketAddr, name: &str, ipv6: bool) -> anyhow::Result<()> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    let kind = if ipv6 {
        RecordType::AAAA
    } else {
        RecordType::A
    };
    let mut query = Message::new();
    query
        .set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).context("a DNS name")?,
            kind,
        ));
    let bytes = query.to_vec()?;
    let mut buffer = vec![0u8; 4096];
    for _ in 0..3 {
        socket.send_to(&bytes, server).await?;
        let Ok(received) =
            tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buffer)).await
        else {
            continue;
        };
        let (n, _) = received?;
        let reply = Message::from_vec(&buffer[..n])?;
        if reply.id() != query.id() {
            continue;
        }
        let addresses: Vec<IpAddr> = reply
            .answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect();
        for address in &addresses {
            println!("{name} {address}");
        }
        if addresses.is_empty() {
            bail!("{server} had no {kind} record for {name}");
        }
        return Ok(());
    }
    bail!("no answer from {server} after 3 tries")
}
