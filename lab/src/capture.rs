//! A packet capture of the lab's underlay (tcpdump on the fabric bridge):
//! what really crossed between the nodes, for tests and `kanava verify`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{Error, Lab};

/// A TCP packet seen on the fabric (IPv4 or IPv6).
pub use kanava_verify::packets::Packet;

/// tcpdump on the fabric bridge, writing to a file in the lab's directory
/// until stopped.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing every TCP packet crossing the lab's underlay, and
    /// returns once tcpdump captures.
    pub fn start(lab: &Lab) -> Result<Capture, Error> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let file = lab.state().layout().dir.join(format!(
            "capture-{}-{}.pcap",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let netns = lab.netns("fabric")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &netns])
            .args(["tcpdump", "-i", "br0", "-s", "0", "-B", "131072", "-U"])
            .args(["--immediate-mode", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::io("start tcpdump (installed by scripts/setup.sh)"))?;
        let mut capture = Capture { child, file };
        // tcpdump writes the file header once it is capturing.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&capture.file)
            .map(|m| m.len())
            .unwrap_or(0)
            == 0
        {
            if Instant::now() > deadline {
                let _ = capture.child.kill();
                return Err(Error::Missing("tcpdump did not start capturing".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        Ok(capture)
    }

    /// Stops tcpdump and returns the TCP packets it saw. A capture that lost
    /// packets proves nothing about what it lost: that is an error.
    pub fn stop(mut self) -> Result<Vec<Packet>, Error> {
        std::thread::sleep(Duration::from_millis(200));
        // SIGINT lets tcpdump write out what it holds and report drops.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let mut report = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            use std::io::Read;
            let _ = stderr.read_to_string(&mut report);
        }
        let _ = self.child.wait();
        let dropped = report
            .lines()
            .find_map(|line| line.strip_suffix(" packets dropped by kernel"))
            .and_then(|count| count.trim().parse::<u64>().ok());
        if dropped != Some(0) {
            return Err(Error::Missing(format!(
                "tcpdump lost packets; the capture is incomplete:\n{report}"
            )));
        }
        let bytes = std::fs::read(&self.file)
            .map_err(Error::io(format!("read {}", self.file.display())))?;
        read_pcap(&bytes)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

fn read_pcap(bytes: &[u8]) -> Result<Vec<Packet>, Error> {
    let bad = |e: pcap_file::PcapError| Error::Missing(format!("unreadable capture: {e}"));
    let mut reader = pcap_file::pcap::PcapReader::new(bytes).map_err(bad)?;
    let mut packets = Vec::new();
    while let Some(packet) = reader.next_packet() {
        let packet = packet.map_err(bad)?;
        if let Some(segment) = etherparse::SlicedPacket::from_ethernet(&packet.data)
            .ok()
            .as_ref()
            .and_then(kanava_verify::packets::tcp_segment)
        {
            packets.push(segment);
        }
    }
    Ok(packets)
}

pub use kanava_verify::packets::contains;
