//! Packets seen between pods, as the fabric check judges them: TCP
//! segments with their ends and payload, read from a lab's `tcpdump` file
//! or from a probe pod on a cluster node's own network (`labapp capture`).

use std::net::{IpAddr, SocketAddr};

/// A TCP segment seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Packet {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub payload: Vec<u8>,
}

/// The TCP segment in a parsed frame, if it holds one.
pub fn tcp_segment(sliced: &etherparse::SlicedPacket) -> Option<Packet> {
    let (source, destination): (IpAddr, IpAddr) = match &sliced.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(etherparse::NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return None,
    };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = &sliced.transport else {
        return None;
    };
    Some(Packet {
        source: SocketAddr::new(source, tcp.source_port()),
        destination: SocketAddr::new(destination, tcp.destination_port()),
        payload: tcp.payload().to_vec(),
    })
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_segment_is_read_from_an_ip_packet() {
        let builder = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40_000, 15_008, 1, 1024);
        let mut bytes = Vec::new();
        builder.write(&mut bytes, b"secret").expect("packet");
        let sliced = etherparse::SlicedPacket::from_ip(&bytes).expect("parsed");
        let packet = tcp_segment(&sliced).expect("a TCP segment");
        assert_eq!(packet.destination, "10.0.0.2:15008".parse().expect("addr"));
        assert!(contains(&packet.payload, b"secret"));
        assert!(!contains(&packet.payload, b""));
    }
}
