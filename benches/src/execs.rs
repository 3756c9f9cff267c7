//! Programs started on the machine, counted as the kernel reports them: the
//! process events connector (netlink), which announces every `exec`. Threads
//! and forks without an `exec` are not counted (`/proc/stat`'s `processes`
//! counts every thread too).
//!
//! Written by hand: one subscription message and one event layout, for
//! which no crate is worth a dependency.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, netlink};

/// `CN_IDX_PROC` and `CN_VAL_PROC`: the process events connector.
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr` and `struct cn_msg`.
const NLMSG_HEADER: usize = 16;
const CN_MSG_HEADER: usize = 20;

/// Counts `exec`s on the whole machine for `window`.
pub fn count_for(window: Duration) -> anyhow::Result<u64> {
    let socket = subscribe()?;
    rustix::net::sockopt::set_socket_timeout(
        &socket,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_millis(100)),
    )?;
    let deadline = Instant::now() + window;
    let mut execs = 0;
    let mut buffer = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        let read = match rustix::net::recv(&socket, &mut buffer, RecvFlags::empty()) {
            Ok((read, _)) => read.min(buffer.len()),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            Err(error) => return Err(error.into()),
        };
        // One event per message: nlmsghdr, cn_msg, then the event's
        // `what` (u32).
        let what = NLMSG_HEADER + CN_MSG_HEADER;
        if let Some(bytes) = buffer[..read].get(what..what + 4)
            && u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == PROC_EVENT_EXEC
        {
            execs += 1;
        }
    }
    Ok(execs)
}

fn subscribe() -> anyhow::Result<OwnedFd> {
    let socket = rustix::net::socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::CONNECTOR),
    )?;
    rustix::net::bind(&socket, &netlink::SocketAddrNetlink::new(0, CN_IDX_PROC))?;
    let mut message = Vec::with_capacity(NLMSG_HEADER + CN_MSG_HEADER + 4);
    let length = (NLMSG_HEADER + CN_MSG_HEADER + 4) as u32;
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    message.extend_from_slice(&0u16.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&std::process::id().to_ne_bytes());
    // cn_msg: id {idx, val}, seq, ack, len, flags.
    message.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    message.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&4u16.to_ne_bytes());
    message.extend_from_slice(&0u16.to_ne_bytes());
    message.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    rustix::net::sendto(
        &socket,
        &message,
        SendFlags::empty(),
        &netlink::SocketAddrNetlink::new(0, 0),
    )?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_is_counted() {
        if !rustix::process::geteuid().is_root() {
            panic!("THIS TEST NEEDS ROOT (the process events connector); CI runs it as root");
        }
        let counting = std::thread::spawn(|| count_for(Duration::from_millis(800)));
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..3 {
            std::process::Command::new("true").status().unwrap();
        }
        let execs = counting.join().unwrap().unwrap();
        assert!(execs >= 3, "{execs} execs seen");
    }
}
