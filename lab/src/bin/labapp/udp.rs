//! The UDP side of `labapp`: an echo server and its client, and a DNS
//! server and resolver, for the tests of what STRICT does to datagrams.
//!
//! DNS messages are built and read with `simple-dns`, not by hand.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use simple_dns::rdata::{A, AAAA, RData};
use simple_dns::{CLASS, Name, Packet, PacketFlag, QTYPE, Question, ResourceRecord, TYPE};
use tokio::net::UdpSocket;

/// What the DNS server answers for every A and AAAA question (addresses
/// reserved for documentation).
pub const DNS_ANSWER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const DNS_ANSWER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// A UDP socket on every address of the pod, both families.
async fn bind(port: u16) -> anyhow::Result<UdpSocket> {
    let socket = crate::dual_stack_socket(socket2::Type::DGRAM, port)?;
    Ok(UdpSocket::from_std(socket.into())?)
}

/// A client socket of `to`'s family, on any address and port.
async fn client_for(to: SocketAddr) -> anyhow::Result<UdpSocket> {
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    Ok(UdpSocket::bind(local).await?)
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
    let socket = client_for(to).await?;
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
        let Ok(query) = Packet::parse(&buffer[..n]) else {
            eprintln!("dns: unreadable query from {}", canonical(peer));
            continue;
        };
        let mut reply = Packet::new_reply(query.id());
        reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
        for question in &query.questions {
            reply.questions.push(question.clone());
            let data = match question.qtype {
                QTYPE::TYPE(TYPE::A) => RData::A(A {
                    address: u32::from(DNS_ANSWER_V4),
                }),
                QTYPE::TYPE(TYPE::AAAA) => RData::AAAA(AAAA {
                    address: u128::from(DNS_ANSWER_V6),
                }),
                _ => continue,
            };
            reply.answers.push(ResourceRecord::new(
                question.qname.clone(),
                CLASS::IN,
                60,
                data,
            ));
        }
        eprintln!(
            "dns: {} question(s) from {}",
            query.questions.len(),
            canonical(peer)
        );
        socket.send_to(&reply.build_bytes_vec()?, peer).await?;
    }
}

/// Asks `server` for the A (or AAAA) record of `name`, three tries, and
/// prints the addresses.
pub async fn resolve(server: SocketAddr, name: &str, ipv6: bool) -> anyhow::Result<()> {
    let socket = client_for(server).await?;
    let kind = if ipv6 { TYPE::AAAA } else { TYPE::A };
    let id: u16 = rand::random();
    let mut query = Packet::new_query(id);
    query.set_flags(PacketFlag::RECURSION_DESIRED);
    query.questions.push(Question::new(
        Name::new(name).context("a DNS name")?,
        kind.into(),
        CLASS::IN.into(),
        false,
    ));
    let bytes = query.build_bytes_vec()?;
    let mut buffer = vec![0u8; 4096];
    for _ in 0..3 {
        socket.send_to(&bytes, server).await?;
        let Ok(received) =
            tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buffer)).await
        else {
            continue;
        };
        let (n, _) = received?;
        let reply = Packet::parse(&buffer[..n])?;
        if reply.id() != id {
            continue;
        }
        let addresses: Vec<IpAddr> = reply
            .answers
            .iter()
            .filter_map(|record| match &record.rdata {
                RData::A(a) => Some(IpAddr::V4(Ipv4Addr::from(a.address))),
                RData::AAAA(aaaa) => Some(IpAddr::V6(Ipv6Addr::from(aaaa.address))),
                _ => None,
            })
            .collect();
        for address in &addresses {
            println!("{name} {address}");
        }
        if addresses.is_empty() {
            bail!("{server} had no {kind:?} record for {name}");
        }
        return Ok(());
    }
    bail!("no answer from {server} after 3 tries")
}
