//! The guard's DROP counters, read from nf_tables over netlink inside the
//! pod's namespace: one dump per family, no process started. With 110
//! STRICT pods on a node, `iptables-save -c` every few seconds was about 44
//! process starts a second on an idle node.
//!
//! Written by hand: the well-kept nf_tables crates link libnftnl, and this
//! needs one request and four attributes. It reads the rules of the
//! guard's chain in table `filter` as `iptables-nft` wrote them (each rule
//! carries a `counter` expression) and takes the packets of the rules whose
//! verdict is DROP, in order: UDP, then SCTP (see `guard_rules`). A node on
//! the legacy backend has no such chain in nf_tables: `None`, and the caller
//! reads `iptables-save -c` instead.

use std::os::fd::OwnedFd;

/// Packets dropped so far by the pod's guard, per protocol, both families
/// together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub udp: u64,
    pub sctp: u64,
}

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWRULE: u16 = 6;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NF_DROP: i32 = 0;

/// Attribute types carry two flag bits (nested, byte order).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The packets the DROP rules of `chain` counted in the current network
/// namespace, both families; `None` when nf_tables has no such rules in
/// IPv4 (the legacy backend, or no guard).
pub fn dropped(chain: &str) -> std::io::Result<Option<Dropped>> {
    let Some(v4) = drops_of_family(libc::AF_INET as u8, chain)? else {
        return Ok(None);
    };
    // No IPv6 in the pod, or no IPv6 guard: nothing dropped there.
    let v6 = drops_of_family(libc::AF_INET6 as u8, chain)?.unwrap_or_default();
    Ok(Some(Dropped {
        udp: v4.udp + v6.udp,
        sctp: v4.sctp + v6.sctp,
    }))
}

fn drops_of_family(family: u8, chain: &str) -> std::io::Result<Option<Dropped>> {
    let socket = open()?;
    send(&socket, &request(family, chain))?;
    let mut drops: Vec<u64> = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    'receiving: loop {
        let (read, _) = rustix::net::recv(&socket, &mut buffer, rustix::net::RecvFlags::empty())?;
        let mut messages = &buffer[..read.min(buffer.len())];
        while messages.len() >= 16 {
            let length =
                u32::from_ne_bytes([messages[0], messages[1], messages[2], messages[3]]) as usize;
            let kind = u16::from_ne_bytes([messages[4], messages[5]]);
            if length < 16 || length > messages.len() {
                return Err(invalid("a netlink message's length"));
            }
            let payload = &messages[16..length];
            match kind {
                NLMSG_DONE => break 'receiving,
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(-libc::EINVAL);
                    if code == -libc::ENOENT {
                        return Ok(None);
                    }
                    if code != 0 {
                        return Err(std::io::Error::from_raw_os_error(-code));
                    }
                }
                kind if kind == (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE) => {
                    // After the 4-byte nfgenmsg.
                    if let Some((packets, Some(NF_DROP))) = payload.get(4..).map(rule) {
                        drops.push(packets.unwrap_or(0));
                    }
                }
                _ => {}
            }
            messages = &messages[align(length).min(messages.len())..];
        }
    }
    Ok(match drops.as_slice() {
        [] => None,
        [udp] => Some(Dropped { udp: *udp, sctp: 0 }),
        [udp, sctp, ..] => Some(Dropped {
            udp: *udp,
            sctp: *sctp,
        }),
    })
}

/// A rule's counted packets and its verdict code.
fn rule(attributes: &[u8]) -> (Option<u64>, Option<i32>) {
    let (mut packets, mut verdict) = (None, None);
    for (kind, value) in attributes_of(attributes) {
        if kind != NFTA_RULE_EXPRESSIONS {
            continue;
        }
        for (kind, element) in attributes_of(value) {
            if kind != NFTA_LIST_ELEM {
                continue;
            }
            let mut name: &[u8] = &[];
            let mut data: &[u8] = &[];
            for (kind, value) in attributes_of(element) {
                match kind {
                    NFTA_EXPR_NAME => name = value.split(|b| *b == 0).next().unwrap_or(&[]),
                    NFTA_EXPR_DATA => data = value,
                    _ => {}
                }
            }
            match name {
                b"counter" => {
                    packets = attributes_of(data)
                        .find(|(kind, _)| *kind == NFTA_COUNTER_PACKETS)
                        .and_then(|(_, v)| v.get(..8))
                        .map(|b| {
                            u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                        });
                }
                b"immediate" => {
                    verdict = attributes_of(data)
                        .filter(|(kind, _)| *kind == NFTA_IMMEDIATE_DATA)
                        .flat_map(|(_, v)| attributes_of(v))
                        .filter(|(kind, _)| *kind == NFTA_DATA_VERDICT)
                        .flat_map(|(_, v)| attributes_of(v))
                        .find(|(kind, _)| *kind == NFTA_VERDICT_CODE)
                        .and_then(|(_, v)| v.get(..4))
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                }
                _ => {}
            }
        }
    }
    (packets, verdict)
}

/// The attributes in `bytes`: (type without flags, value).
fn attributes_of(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let length = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if length < 4 || length > bytes.len() {
            return None;
        }
        let value = &bytes[4..length];
        bytes = &bytes[align(length).min(bytes.len())..];
        Some((kind, value))
    })
}

fn align(length: usize) -> usize {
    (length + 3) & !3
}

fn request(family: u8, chain: &str) -> Vec<u8> {
    let mut body = vec![family, 0, 0, 0];
    for (kind, text) in [(NFTA_RULE_TABLE, "filter"), (NFTA_RULE_CHAIN, chain)] {
        let mut value = text.as_bytes().to_vec();
        value.push(0);
        let length = 4 + value.len();
        body.extend_from_slice(&(length as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(&value);
        body.resize(align(body.len()), 0);
    }
    let mut message = Vec::with_capacity(16 + body.len());
    message.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    message.extend_from_slice(&(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETRULE).to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&body);
    message
}

fn open() -> std::io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, netlink, sockopt};
    let socket = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )?;
    // A dump that never ends must not hold a thread.
    sockopt::set_socket_timeout(
        &socket,
        sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(2)),
    )?;
    Ok(socket)
}

fn send(socket: &OwnedFd, message: &[u8]) -> std::io::Result<()> {
    let kernel = rustix::net::netlink::SocketAddrNetlink::new(0, 0);
    rustix::net::sendto(socket, message, rustix::net::SendFlags::empty(), &kernel)?;
    Ok(())
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{what} does not parse"),
    )
}
