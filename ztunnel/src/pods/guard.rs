//! What STRICT means for traffic the mesh does not carry: an enrolled
//! STRICT pod receives no UDP or SCTP from outside itself, except on the
//! ports it (or its namespace) opens with `kanava.io/plaintext-inbound-ports`
//! and replies to its own traffic (its DNS answers).
//!
//! ```text
//! filter INPUT → KANAVA_INPUT
//!   -i lo                                    RETURN   (the pod talking to itself)
//!   conntrack ESTABLISHED,RELATED            RETURN   (replies: DNS answers)
//!   -p udp --dport <opened>                  RETURN   (one per opened port)
//!   -p udp                                   DROP     (counted)
//!   -p sctp                                  DROP     (counted)
//! ```
//!
//! ICMP is not touched: the errors TCP and path MTU discovery need pass.
//! PERMISSIVE pods get the chain without rules. The rules exist in both
//! families; like the capture, a pod with IPv6 whose IPv6 rules cannot be
//! installed is an error, not a pod left open over IPv6.
//!
//! The packets dropped are read back from the DROP rules' counters
//! ([`dropped`]) for the per-pod metric, over netlink where the rules live
//! in nf_tables, so that reading them starts no process.

use kanava_mesh::{OpenPort, PortProtocol};
use kanava_netns::NetNs;

use super::capture::{ipv6_enabled, ipv6_outcome, run};
use crate::Error;

const CHAIN: &str = "KANAVA_INPUT";

/// What a pod's guard lets in: `None` everything (PERMISSIVE),
/// `Some(ports)` only the opened ports (STRICT).
pub type Opened = Option<Vec<OpenPort>>;

/// The iptables-restore input for the filter table. `jump`: add the jump
/// from INPUT (it is not there yet). Declaring the chain empties it, so the
/// whole change is one atomic commit.
pub fn guard_rules(opened: &Opened, jump: bool) -> String {
    let mut rules = format!("*filter\n:{CHAIN} - [0:0]\n");
    if jump {
        rules.push_str(&format!("-A INPUT -j {CHAIN}\n"));
    }
    if let Some(ports) = opened {
        rules.push_str(&format!("-A {CHAIN} -i lo -j RETURN\n"));
        rules.push_str(&format!(
            "-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN\n"
        ));
        for port in ports {
            let protocol = port.protocol.as_str();
            rules.push_str(&format!(
                "-A {CHAIN} -p {protocol} -m {protocol} --dport {} -j RETURN\n",
                port.port
            ));
        }
        for protocol in [PortProtocol::Udp, PortProtocol::Sctp] {
            rules.push_str(&format!("-A {CHAIN} -p {} -j DROP\n", protocol.as_str()));
        }
    }
    rules.push_str("COMMIT\n");
    rules
}

/// Puts the pod's guard in place, replacing an earlier one, in both
/// families.
pub fn install(netns: &NetNs, opened: &Opened) -> Result<(), Error> {
    install_family(netns, "iptables-save", "iptables-restore", opened)?;
    let ipv6 = ipv6_enabled(netns);
    let installed = install_family(netns, "ip6tables-save", "ip6tables-restore", opened);
    ipv6_outcome(ipv6, installed, netns.name())
}

fn install_family(netns: &NetNs, save: &str, restore: &str, opened: &Opened) -> Result<(), Error> {
    let saved = run(netns, save, &["-t", "filter"], None)?;
    let jump = format!("-A INPUT -j {CHAIN}");
    let has_jump = saved.lines().any(|line| line.trim() == jump);
    run(
        netns,
        restore,
        &["--noflush", "--wait", "10"],
        Some(&guard_rules(opened, !has_jump)),
    )
    .map(|_| ())
}

/// Whether the pod already has a guard (IPv4's stands for both): one a
/// previous ztunnel on the node installed.
pub fn present(netns: &NetNs) -> bool {
    run(netns, "iptables-save", &["-t", "filter"], None)
        .is_ok_and(|saved| saved.contains(&format!(":{CHAIN} ")))
}

/// Removes the guard (the pod leaves the mesh).
pub fn remove(netns: &NetNs) {
    let release = format!("*filter\n-D INPUT -j {CHAIN}\n-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n");
    for (save, restore) in [
        ("iptables-save", "iptables-restore"),
        ("ip6tables-save", "ip6tables-restore"),
    ] {
        let present = run(netns, save, &["-t", "filter"], None)
            .is_ok_and(|saved| saved.contains(&format!(":{CHAIN} ")));
        if present
            && let Err(error) = run(
                netns,
                restore,
                &["--noflush", "--wait", "10"],
                Some(&release),
            )
        {
            // The namespace may be on its way out with its pod.
            tracing::debug!(netns = netns.name(), %error, "removing the non-TCP guard");
        }
    }
}

pub use super::nft_counters::Dropped;

/// Read from nf_tables inside the pod's namespace, without starting a
/// process ([`super::nft_counters`]); from `iptables-save -c` on the legacy
/// backend.
pub fn dropped(netns: &NetNs) -> Result<Dropped, Error> {
    match netns.run(|| super::nft_counters::dropped(CHAIN)) {
        Ok(Ok(Some(dropped))) => return Ok(dropped),
        Ok(Ok(None)) => {}
        Ok(Err(error)) => {
            tracing::debug!(%error, "nf_tables counters unreadable; asking iptables-save")
        }
        Err(error) => return Err(error.into()),
    }
    let mut total = Dropped::default();
    for save in ["iptables-save", "ip6tables-save"] {
        match run(netns, save, &["-c", "-t", "filter"], None) {
            Ok(saved) => {
                let counted = drop_counters(&saved);
                total.udp += counted.udp;
                total.sctp += counted.sctp;
            }
            // No IPv6 in the pod: nothing was dropped there.
            Err(error) if save == "ip6tables-save" => {
                tracing::trace!(%error, "no IPv6 counters");
            }
            Err(error) => return Err(error),
        }
    }
    Ok(total)
}

/// Reads `[packets:bytes] -A KANAVA_INPUT -p udp -j DROP` lines of
/// `iptables-save -c`.
fn drop_counters(saved: &str) -> Dropped {
    let mut dropped = Dropped::default();
    for line in saved.lines() {
        let Some((counters, rule)) = line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once("] "))
        else {
            continue;
        };
        let packets = counters
            .split(':')
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0);
        if rule == format!("-A {CHAIN} -p udp -j DROP") {
            dropped.udp += packets;
        } else if rule == format!("-A {CHAIN} -p sctp -j DROP") {
            dropped.sctp += packets;
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_pods_drop_what_they_did_not_open() {
        let opened = Some(OpenPort::parse_list("udp/5353,sctp/3868").expect("ports"));
        let rules = guard_rules(&opened, true);
        for wanted in [
            "-A INPUT -j KANAVA_INPUT",
            "-A KANAVA_INPUT -i lo -j RETURN",
            "-A KANAVA_INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
            "-A KANAVA_INPUT -p udp -m udp --dport 5353 -j RETURN",
            "-A KANAVA_INPUT -p sctp -m sctp --dport 3868 -j RETURN",
            "-A KANAVA_INPUT -p udp -j DROP",
            "-A KANAVA_INPUT -p sctp -j DROP",
        ] {
            assert!(rules.contains(wanted), "{wanted} missing:\n{rules}");
        }
        let last_return = rules.rfind("RETURN").expect("returns");
        assert!(rules.find("DROP").expect("drops") > last_return, "{rules}");
        assert!(!guard_rules(&opened, false).contains("-A INPUT"));
        assert!(!guard_rules(&None, false).contains("DROP"));
    }

    #[test]
    fn counters_are_read_from_the_drop_rules() {
        let saved = "*filter\n:INPUT ACCEPT [0:0]\n:KANAVA_INPUT - [0:0]\n\
             [5:200] -A INPUT -j KANAVA_INPUT\n[1:40] -A KANAVA_INPUT -i lo -j RETURN\n\
             [3:120] -A KANAVA_INPUT -p udp -j DROP\n[2:80] -A KANAVA_INPUT -p sctp -j DROP\nCOMMIT\n";
        assert_eq!(drop_counters(saved), Dropped { udp: 3, sctp: 2 });
        assert_eq!(drop_counters(""), Dropped::default());
    }
}
