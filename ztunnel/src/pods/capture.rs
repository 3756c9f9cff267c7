//! The redirection rules installed inside an enrolled pod's namespace.
//!
//! ```text
//! nat OUTPUT      TCP leaving the pod, not to loopback, not the proxy's own → :15001
//! nat PREROUTING  TCP arriving, not for :15008, not the proxy's own         → :15006
//! mangle          the proxy's spoofed-source connections get connmark 0x111;
//!                 replies restore it and `ip rule fwmark 0x111 lookup 100`
//!                 (a local route for everything) delivers them to the proxy
//! ```
//!
//! Rules go into chains of our own (`KANAVA_*`), installed atomically with
//! `iptables-restore`, and nothing is touched outside the pod's namespace.
//! The tools run as child processes that enter the namespace before exec.

use std::io::Write;
use std::process::{Command, Stdio};

use kanava_mesh::{marks, ports};
use kanava_netns::NetNs;

use crate::Error;

const CHAIN_PREROUTING: &str = "KANAVA_PRERT";
const CHAIN_OUTPUT: &str = "KANAVA_OUTPUT";
/// Priority of the `ip rule` for marked replies (just before `main`).
const RULE_PRIORITY: u32 = 32764;

/// The iptables-restore input that captures a pod's traffic.
pub fn capture_rules(loopback: &str) -> String {
    let proxy = format!("{:#x}/{:#x}", marks::PROXY, marks::MASK);
    let original_source = format!("{:#x}/{:#x}", marks::ORIGINAL_SOURCE, marks::MASK);
    let pre = CHAIN_PREROUTING;
    let out = CHAIN_OUTPUT;
    let outbound = ports::OUTBOUND;
    let inbound = ports::INBOUND_PLAINTEXT;
    let hbone = ports::HBONE;
    format!(
        "*mangle
:{pre} - [0:0]
:{out} - [0:0]
-A PREROUTING -j {pre}
-A OUTPUT -j {out}
-A {pre} -m mark --mark {proxy} -j CONNMARK --set-xmark {original_source}
-A {out} -m connmark --mark {original_source} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:{pre} - [0:0]
:{out} - [0:0]
-A PREROUTING -j {pre}
-A OUTPUT -j {out}
-A {pre} ! -d {loopback} -p tcp ! --dport {hbone} -m mark ! --mark {proxy} -j REDIRECT --to-ports {inbound}
-A {out} -p tcp -m mark --mark {original_source} -j ACCEPT
-A {out} ! -d {loopback} -o lo -j ACCEPT
-A {out} ! -d {loopback} -p tcp -m mark ! --mark {proxy} -j REDIRECT --to-ports {outbound}
COMMIT
"
    )
}

/// The iptables-restore input that removes what [`capture_rules`] added.
pub fn release_rules() -> String {
    let mut rules = String::new();
    for table in ["mangle", "nat"] {
        rules.push_str(&format!(
            "*{table}
-D PREROUTING -j {CHAIN_PREROUTING}
-D OUTPUT -j {CHAIN_OUTPUT}
-F {CHAIN_PREROUTING}
-F {CHAIN_OUTPUT}
-X {CHAIN_PREROUTING}
-X {CHAIN_OUTPUT}
COMMIT
"
        ));
    }
    rules
}

/// Captures the pod's traffic. Replaces earlier rules of ours if present
/// (e.g. after a ztunnel restart) in one atomic step, so it can be repeated
/// safely and a captured pod is never without its rules meanwhile.
pub fn install(netns: &NetNs) -> Result<(), Error> {
    replace_rules(netns, "iptables-save", "iptables-restore", "127.0.0.0/8")?;
    route_replies(netns, "-4", true)?;

    let ipv6 = ipv6_enabled(netns);
    let captured = replace_rules(netns, "ip6tables-save", "ip6tables-restore", "::1/128")
        .and_then(|()| route_replies(netns, "-6", true));
    ipv6_outcome(ipv6, captured, netns.name())
}

fn replace_rules(netns: &NetNs, save: &str, program: &str, loopback: &str) -> Result<(), Error> {
    let saved = run(netns, save, &[], None)?;
    match refresh_input(&saved, loopback) {
        Some(input) => restore(netns, program, &input),
        None => {
            if saved.contains(&format!(":{CHAIN_PREROUTING} ")) {
                // Our chains without both jumps to them: start over.
                restore(netns, program, &release_rules())?;
            }
            restore(netns, program, &capture_rules(loopback))
        }
    }
}

/// When `saved` (iptables-save output) already holds our chains and the
/// jumps to them in both tables: the input that rewrites the chains' rules
/// in place. With `--noflush`, declaring an existing chain flushes it, and
/// each table's change is committed atomically.
fn refresh_input(saved: &str, loopback: &str) -> Option<String> {
    let jumps = [
        format!("-A PREROUTING -j {CHAIN_PREROUTING}"),
        format!("-A OUTPUT -j {CHAIN_OUTPUT}"),
    ];
    let complete = jumps
        .iter()
        .all(|jump| saved.lines().filter(|line| line.trim() == jump).count() == 2);
    complete.then(|| {
        capture_rules(loopback)
            .lines()
            .filter(|line| !jumps.iter().any(|jump| line == jump))
            .map(|line| format!("{line}\n"))
            .collect()
    })
}

/// Whether the namespace can carry IPv6 at all (the kernel has it, and it is
/// not disabled there). `/proc/sys/net` shows the namespace of the reader.
pub(super) fn ipv6_enabled(netns: &NetNs) -> bool {
    netns
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6"))
        .ok()
        .and_then(Result::ok)
        .is_some_and(|value| value.trim() == "0")
}

/// A pod whose IPv6 traffic cannot be captured must not start: it would
/// bypass the mesh over IPv6. Without IPv6 there is nothing to capture.
pub(super) fn ipv6_outcome(
    ipv6: bool,
    captured: Result<(), Error>,
    netns: &str,
) -> Result<(), Error> {
    match captured {
        Ok(()) => Ok(()),
        Err(error) if ipv6 => Err(Error::Capture {
            command: "ip6tables-restore / ip -6 rule".into(),
            netns: netns.to_string(),
            reason: format!(
                "the pod has IPv6 but its IPv6 traffic cannot be captured ({error}); install \
                 ip6tables on the node or disable IPv6 in the pod"
            ),
        }),
        Err(error) => {
            tracing::debug!(netns, %error, "no IPv6 in the pod; nothing to capture");
            Ok(())
        }
    }
}

/// Stops capturing the pod's traffic.
pub fn remove(netns: &NetNs) -> Result<(), Error> {
    if has_rules(netns, "iptables-save")? {
        restore(netns, "iptables-restore", &release_rules())?;
    }
    if has_rules(netns, "ip6tables-save").unwrap_or(false) {
        restore(netns, "ip6tables-restore", &release_rules())?;
    }
    // The namespace may be on its way out with its pod; what cannot be
    // undone there no longer matters.
    let _ = route_replies(netns, "-4", false);
    let _ = route_replies(netns, "-6", false);
    Ok(())
}

/// The policy routing that brings replies to the proxy's spoofed-source
/// connections back to the proxy: `ip rule fwmark 0x111/0xfff lookup 100`
/// and a local route for every address in table 100.
fn route_replies(netns: &NetNs, family: &str, install: bool) -> Result<(), Error> {
    let mark = format!("{:#x}/{:#x}", marks::ORIGINAL_SOURCE, marks::MASK);
    let table = marks::ROUTE_TABLE.to_string();
    let priority = RULE_PRIORITY.to_string();
    let any = if family == "-6" { "::/0" } else { "0.0.0.0/0" };
    let rule = |action: &str| {
        let args = [
            family, "rule", action, "fwmark", &mark, "priority", &priority, "lookup", &table,
        ];
        run(netns, "ip", &args, None)
    };
    if install {
        // Exactly one copy of the rule, and never a moment without one:
        // while it is missing, the app's replies to connections made with
        // a client's address (a SYN-ACK) are routed out of the pod instead
        // of back to the ztunnel, and those connections are reset. A
        // ztunnel that starts beside another (an upgrade) or after one
        // (a restart) finds the rule in place and leaves it.
        let shown = run(netns, "ip", &[family, "rule", "show"], None)?;
        let wanted = format!("{priority}:\tfrom all fwmark {mark} lookup {table}");
        let copies = shown
            .lines()
            .filter(|line| line.trim_end() == wanted)
            .count();
        for _ in 1..copies {
            rule("del")?;
        }
        if copies == 0 {
            rule("add")?;
        }
        let args = [
            family, "route", "replace", "local", any, "dev", "lo", "table", &table,
        ];
        run(netns, "ip", &args, None)?;
    } else {
        let _ = rule("del");
        run(
            netns,
            "ip",
            &[family, "route", "flush", "table", &table],
            None,
        )?;
    }
    Ok(())
}

/// Whether the namespace holds every rule of ours (IPv4): each jump and
/// each chain with as many rules as [`capture_rules`] puts there. (Counted,
/// not compared: `iptables-save` spells rules its own way.)
pub fn rules_in_place(netns: &NetNs) -> Result<bool, Error> {
    let saved = run(netns, "iptables-save", &[], None)?;
    Ok(complete(&saved))
}

fn complete(saved: &str) -> bool {
    let wanted = capture_rules("127.0.0.0/8");
    let count = |text: &str, prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    [
        format!("-A PREROUTING -j {CHAIN_PREROUTING}"),
        format!("-A OUTPUT -j {CHAIN_OUTPUT}"),
        format!("-A {CHAIN_PREROUTING} "),
        format!("-A {CHAIN_OUTPUT} "),
    ]
    .iter()
    .all(|prefix| count(saved, prefix) == count(&wanted, prefix))
}

/// Whether the namespace holds our chains.
pub fn has_rules(netns: &NetNs, save: &str) -> Result<bool, Error> {
    let output = run(netns, save, &[], None)?;
    Ok(output.contains(&format!(":{CHAIN_PREROUTING} ")))
}

fn restore(netns: &NetNs, program: &str, rules: &str) -> Result<(), Error> {
    run(netns, program, &["--noflush", "--wait", "10"], Some(rules)).map(|_| ())
}

/// Runs a tool inside `netns` and returns its standard output.
pub(super) fn run(
    netns: &NetNs,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, Error> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    netns.enter_in_child(&mut command);
    let failed = |reason: String| Error::Capture {
        command: format!("{program} {}", args.join(" ")),
        netns: netns.name().to_string(),
        reason,
    };
    let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        return Err(failed(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_that_cannot_be_captured_fails_the_capture() {
        let failed = || {
            Err(Error::Capture {
                command: "ip6tables-save".into(),
                netns: "pod".into(),
                reason: "No such file or directory".into(),
            })
        };
        let refused = ipv6_outcome(true, failed(), "pod").expect_err("must fail closed");
        let text = refused.to_string();
        assert!(
            text.contains("has IPv6") && text.contains("ip6tables"),
            "{text}"
        );
        assert!(
            ipv6_outcome(false, failed(), "pod").is_ok(),
            "no IPv6, nothing to capture"
        );
        assert!(ipv6_outcome(true, Ok(()), "pod").is_ok());
    }

    #[test]
    fn rules_follow_the_design() {
        let rules = capture_rules("127.0.0.0/8");
        assert!(rules.contains("-A KANAVA_OUTPUT ! -d 127.0.0.0/8 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"));
        assert!(rules.contains("-A KANAVA_PRERT ! -d 127.0.0.0/8 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006"));
        assert!(rules.contains(
            "-A KANAVA_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff"
        ));
        assert_eq!(rules.matches("COMMIT").count(), 2);
        assert_eq!(release_rules().matches("-X ").count(), 4);
    }

    #[test]
    fn rules_in_place_are_rewritten_without_their_jumps() {
        let first = capture_rules("127.0.0.0/8");
        assert_eq!(refresh_input("", "127.0.0.0/8"), None, "nothing to refresh");
        // What iptables-save prints after the first install holds each jump
        // once per table.
        let refresh = refresh_input(&first, "127.0.0.0/8").expect("complete rules are refreshed");
        assert!(!refresh.contains("-A PREROUTING -j") && !refresh.contains("-A OUTPUT -j"));
        assert_eq!(refresh.matches("COMMIT").count(), 2);
        assert!(
            refresh.contains(":KANAVA_PRERT - [0:0]"),
            "declaring a chain flushes it"
        );
        let half = first.replacen("-A OUTPUT -j KANAVA_OUTPUT\n", "", 1);
        assert_eq!(
            refresh_input(&half, "127.0.0.0/8"),
            None,
            "a missing jump starts over"
        );
    }
}
