//! The STRICT guard's drop counters are read from nf_tables over netlink,
//! without starting a process: checked against counters the kernel holds,
//! set with `iptables-restore -c` in a network namespace of the test's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use kanava_netns::NetNs;
use kanava_ztunnel::pods::guard::{self, Dropped};
use kanava_ztunnel::pods::nft_counters;

/// A network namespace removed when the test ends, also on panic.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn restore(namespace: &str, restore: &str, rules: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", namespace, restore, "--counters"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{restore} of\n{rules}");
}

#[test]
fn drop_counters_are_read_over_netlink_in_both_families() {
    assert!(
        rustix::process::geteuid().is_root(),
        "THIS TEST NEEDS ROOT: it makes a network namespace and iptables rules in it. \
         Run it as root (CI does); it is not skipped."
    );
    let name = format!("kanava-guard-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success()
    );
    let namespace = Namespace(name);
    let netns = NetNs::named(&namespace.0).unwrap();

    // No guard yet: nf_tables has nothing to say (the caller would ask
    // iptables-save, as on the legacy backend), and nothing is made up.
    let read = || {
        netns
            .run(|| nft_counters::dropped("KANAVA_INPUT"))
            .unwrap()
            .unwrap()
    };
    assert_eq!(read(), None);
    assert_eq!(guard::dropped(&netns).unwrap(), Dropped::default());

    // The rules `guard_rules` writes for a STRICT pod with one UDP port
    // open, with counters the test chooses.
    let rules = |udp: u64, sctp: u64| {
        format!(
            "*filter\n:KANAVA_INPUT - [0:0]\n[9:900] -A INPUT -j KANAVA_INPUT\n\
             [4:400] -A KANAVA_INPUT -i lo -j RETURN\n\
             [3:300] -A KANAVA_INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN\n\
             [2:200] -A KANAVA_INPUT -p udp -m udp --dport 5353 -j RETURN\n\
             [{udp}:{}] -A KANAVA_INPUT -p udp -j DROP\n\
             [{sctp}:{}] -A KANAVA_INPUT -p sctp -j DROP\nCOMMIT\n",
            udp * 100,
            sctp * 100
        )
    };
    restore(&namespace.0, "iptables-restore", &rules(17, 5));
    // ip6tables-restore (nf_tables) leaves a new rule's counters at zero
    // whatever it is given: the IPv6 rules are read, and add nothing.
    restore(&namespace.0, "ip6tables-restore", &rules(3, 1));
    let expected = Dropped { udp: 17, sctp: 5 };
    assert_eq!(
        read(),
        Some(expected),
        "each DROP rule's own counter, over netlink"
    );
    assert_eq!(guard::dropped(&netns).unwrap(), expected);
}
