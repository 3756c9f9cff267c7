//! Traffic through the mesh between two enrolled pods: it arrives with the
//! sender's identity (and only the sender's, whatever source address it
//! forges), it crosses the fabric only as TLS on the HBONE port, and a DENY
//! policy ends a connection that is already open.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use kanava_mesh::ports;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    CaptureUnavailable, Check, Dial, FabricCapture, Ground, Listener, PROBE_PORT, Seat, Seats,
    Stream, TIMEOUT, short,
};

/// How long an access-log line may take to show up after its connection
/// ended (it is written then, and a cluster's logs pass through the node).
const LOG_WAIT: Duration = Duration::from_secs(4);

/// The traffic checks, made towards a listener in each server pod;
/// skipped when there is none. The DENY check only when `with_policy`, and
/// only towards the first server.
pub async fn all<G: Ground>(ground: &G, seats: &Seats, with_policy: bool) -> Vec<Check> {
    if seats.servers.is_empty() {
        let mut names = vec![
            "identities in the server's access log",
            "a spoofed source address",
            "a pod's traffic on the node-to-node fabric",
        ];
        if with_policy {
            names.push("a DENY added while connections are open");
        }
        return names
            .into_iter()
            .map(|name| Check::new(name, "-").skip("needs enrolled pods on two different nodes"))
            .collect();
    }
    let mut checks = Vec::new();
    if seats.servers.iter().all(|s| s.node == seats.client.node) {
        checks.push(
            Check::new(
                "a pod's traffic on the node-to-node fabric",
                "only TLS on port 15008, no plaintext",
            )
            .skip("one node: no traffic between nodes"),
        );
    }
    for (index, server) in seats.servers.iter().enumerate() {
        let path = if server.node == seats.client.node {
            " (same node)"
        } else {
            ""
        };
        let listener = match ground.listener(server).await {
            Ok(listener) => listener,
            Err(error) => {
                checks.push(Check::new("probe listener", "a listener in a server pod").fail(error));
                continue;
            }
        };
        let mut these = vec![
            identities_in_log(ground, seats, server, &listener).await,
            spoofed_source(ground, seats, server, &listener).await,
        ];
        if path.is_empty() {
            these.push(fabric_only_tls(ground, seats, &listener).await);
        }
        if with_policy && index == 0 {
            these.push(deny_closes(ground, seats, server, &listener).await);
        }
        checks.extend(these.into_iter().map(|mut check| {
            check.name.push_str(path);
            check
        }));
    }
    checks
}

/// Sends `payload` to the echo listener and reads it back.
async fn echo(stream: &mut Stream, payload: &[u8]) -> Result<(), String> {
    stream
        .write_all(payload)
        .await
        .map_err(|e| format!("send: {e}"))?;
    stream.flush().await.map_err(|e| format!("send: {e}"))?;
    let mut back = vec![0u8; payload.len()];
    match tokio::time::timeout(TIMEOUT, stream.read_exact(&mut back)).await {
        Ok(Ok(_)) if back == payload => Ok(()),
        Ok(Ok(_)) => Err("the echo differs from what was sent".into()),
        Ok(Err(error)) => Err(format!("read: {error}")),
        Err(_) => Err("no echo".into()),
    }
}

/// Whether a log line (text `key=value` or `key="value"`, or JSON
/// `"key":"value"`) has
/// `key` set to `value`.
fn has(line: &str, key: &str, value: &str) -> bool {
    let whole = |pattern: String| {
        line.match_indices(&pattern).any(|(at, _)| {
            let before = line[..at].chars().next_back();
            let after = line[at + pattern.len()..].chars().next();
            before.is_none_or(|c| c.is_whitespace())
                && after.is_none_or(|c| c.is_whitespace() || c == ',')
        })
    };
    whole(format!("{key}={value}"))
        || whole(format!("{key}=\"{value}\""))
        || line.contains(&format!("\"{key}\":\"{value}\""))
}

/// The lines of `after` that come after the last line of `before`.
fn new_lines<'a>(before: &str, after: &'a str) -> Vec<&'a str> {
    let lines: Vec<&str> = after.lines().collect();
    let start = before
        .lines()
        .next_back()
        .and_then(|last| lines.iter().rposition(|l| *l == last))
        .map_or(0, |at| at + 1);
    lines[start..].to_vec()
}

/// Waits for `node`'s ztunnel to log, after `before`, an inbound
/// connection to `target`; the line, if one came within [`LOG_WAIT`].
async fn inbound_line<G: Ground>(
    ground: &G,
    node: &str,
    before: &str,
    target: SocketAddr,
) -> Result<Option<String>, String> {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let log = ground.ztunnel_log(node).await?;
        if let Some(line) = new_lines(before, &log).into_iter().find(|line| {
            has(line, "direction", "inbound") && has(line, "dst.addr", &target.to_string())
        }) {
            return Ok(Some(line.to_string()));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn identities_in_log<G: Ground>(
    ground: &G,
    seats: &Seats,
    server: &Seat,
    listener: &Listener,
) -> Check {
    let check = Check::new(
        "identities in the server's access log",
        "the server's ztunnel names the client's identity",
    );
    let Some(identity) = &seats.client.identity else {
        return check.skip("the client has no identity");
    };
    let before = ground.ztunnel_log(&server.node).await.unwrap_or_default();
    let sent = async {
        let mut stream = ground
            .connect(&seats.client, listener.address, Dial::default())
            .await?;
        echo(&mut stream, b"KANAVA-VERIFY-IDENTITY").await
    }
    .await;
    if let Err(error) = sent {
        return check
            .fail(format!("through the mesh: {error}"))
            .fix_if_failed(
                "enrolled pods cannot reach each other: is a ztunnel running on both nodes \
             (kanava status)? then see the ztunnels' logs",
            );
    }
    match inbound_line(ground, &server.node, &before, listener.address).await {
        Ok(Some(line)) if has(&line, "src.identity", identity) => check.pass(format!(
            "{}'s ztunnel: {} → {}",
            server.node, identity, listener.address
        )),
        Ok(Some(line)) => check
            .fail(format!("logged as: {}", short(&line)))
            .fix_if_failed(
                "the connection did not arrive over HBONE with the client's identity: \
                 check that both pods are captured (kanava status)",
            ),
        Ok(None) => check
            .fail(format!(
                "{}'s ztunnel logged no inbound connection to {}",
                server.node, listener.address
            ))
            .fix_if_failed(
                "the server pod is not captured: check that the ztunnel runs on its node \
                 (kanava status) and that kanava-cni is chained there (kanava check)",
            ),
        Err(error) => check.fail(format!("the ztunnel's log: {error}")),
    }
}

async fn spoofed_source<G: Ground>(
    ground: &G,
    seats: &Seats,
    server: &Seat,
    listener: &Listener,
) -> Check {
    let check = Check::new(
        "a spoofed source address",
        "no connection, or one carrying the sender's own identity",
    );
    let Some(impostor) = &seats.impostor else {
        return check.skip("no other pod to impersonate");
    };
    let Some(own) = &seats.client.identity else {
        return check.skip("the client has no identity");
    };
    let before = ground.ztunnel_log(&server.node).await.unwrap_or_default();
    let dial = Dial {
        spoofed_source: Some(impostor.ip),
    };
    let connected = async {
        let mut stream = ground
            .connect(&seats.client, listener.address, dial)
            .await?;
        stream
            .write_all(b"spoofed")
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, String>(())
    }
    .await;
    let impostor_ip: IpAddr = impostor.ip;
    match connected {
        Ok(()) => match inbound_line(ground, &server.node, &before, listener.address).await {
            Ok(Some(line)) if has(&line, "src.identity", own) => {
                check.pass(format!("arrived as {own}"))
            }
            Ok(Some(line)) => check
                .fail(format!("arrived as: {}", short(&line)))
                .fix_if_failed(
                    "the ztunnel trusted a forged source address: upgrade it and report this",
                ),
            Ok(None) => check.pass("the destination saw no connection"),
            Err(error) => check.fail(format!("the ztunnel's log: {error}")),
        },
        Err(error) => check.pass(format!("as {impostor_ip}: not made ({})", short(&error))),
    }
}

async fn fabric_only_tls<G: Ground>(ground: &G, seats: &Seats, listener: &Listener) -> Check {
    let check = Check::new(
        "a pod's traffic on the node-to-node fabric",
        "only TLS on port 15008, no plaintext",
    );
    let capture = match ground
        .fabric_capture([seats.client.ip, listener.address.ip()])
        .await
    {
        Ok(capture) => capture,
        Err(CaptureUnavailable::NoVantage(why)) => return check.skip(why),
        Err(CaptureUnavailable::Failed(error)) => return check.fail(error),
    };
    let marker = format!("KANAVA-VERIFY-{}", std::process::id());
    let sent = async {
        let mut stream = ground
            .connect(&seats.client, listener.address, Dial::default())
            .await?;
        echo(&mut stream, marker.repeat(64).as_bytes()).await
    }
    .await;
    let packets = match capture.stop().await {
        Ok(packets) => packets,
        Err(error) => return check.fail(error),
    };
    if let Err(error) = sent {
        return check.fail(format!("could not send through the mesh: {error}"));
    }
    let between: Vec<_> = packets
        .iter()
        .filter(|p| {
            let ends = [p.source.ip(), p.destination.ip()];
            ends.contains(&seats.client.ip) && ends.contains(&listener.address.ip())
        })
        .collect();
    let outside_15008 = between
        .iter()
        .filter(|p| p.source.port() != ports::HBONE && p.destination.port() != ports::HBONE)
        .count();
    let in_clear = between
        .iter()
        .any(|p| crate::packets::contains(&p.payload, marker.as_bytes()));
    check
        .judge(
            !in_clear && outside_15008 == 0 && !between.is_empty(),
            format!(
                "{} packets, {outside_15008} outside 15008, payload in clear: {}",
                between.len(),
                if in_clear { "yes" } else { "no" }
            ),
        )
        .fix_if_failed("pods' bytes cross the fabric outside HBONE: check that both are captured")
}

async fn deny_closes<G: Ground>(
    ground: &G,
    seats: &Seats,
    server: &Seat,
    listener: &Listener,
) -> Check {
    let check = Check::new(
        "a DENY added while connections are open",
        "the open connection closes within a second",
    );
    let Some(identity) = &seats.client.identity else {
        return check.skip("the client has no identity");
    };
    let policy = format!(
        "apiVersion: security.kanava.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: kanava-verify-deny, namespace: {}}}\n\
         spec: {{action: DENY, rules: [{{from: [{{principals: [\"{}\"]}}], to: [{{ports: [{PROBE_PORT}]}}]}}]}}\n",
        server.namespace,
        identity.trim_start_matches("spiffe://"),
    );
    let mut stream = match ground
        .connect(&seats.client, listener.address, Dial::default())
        .await
    {
        Ok(stream) => stream,
        Err(error) => return check.fail(format!("could not connect: {error}")),
    };
    if let Err(error) = echo(&mut stream, b"before").await {
        return check.fail(format!("the connection failed before the policy: {error}"));
    }
    let applied = Instant::now();
    if let Err(error) = ground.apply(&policy).await {
        return check.fail(format!("could not apply the policy: {error}"));
    }
    let chunk = vec![b'x'; 1024];
    let mut ended = None;
    while applied.elapsed() < TIMEOUT {
        // A stalled echo is not an end: only an error or a close is.
        let mut back = vec![0u8; chunk.len()];
        let round = async {
            stream.write_all(&chunk).await?;
            stream.flush().await?;
            stream.read_exact(&mut back).await
        };
        match tokio::time::timeout(Duration::from_millis(500), round).await {
            Ok(Err(_)) => {
                ended = Some(applied.elapsed());
                break;
            }
            Ok(Ok(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    drop(stream);
    let removed = ground.delete(&policy).await;
    let check = match ended {
        Some(after) if after < Duration::from_secs(1) => {
            check.pass(format!("closed {after:.1?} after the policy was applied"))
        }
        Some(after) => check.fail(format!("closed only after {after:.1?}")),
        None => check.fail(format!("still open {TIMEOUT:?} after the policy")),
    }
    .fix_if_failed(
        "policy changes do not reach open connections in time: check that the control \
         plane and the ztunnels are subscribed (kanava status)",
    );
    match removed {
        Ok(()) => check,
        Err(error) => check.fail(format!(
            "could not delete the policy kanava-verify-deny: {error}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields_are_read_in_text_and_json() {
        let text = "INFO access: connection complete direction=inbound dst.addr=10.0.0.2:39999 \
                    src.identity=spiffe://cluster.local/ns/a/sa/b";
        let json = r#"{"fields":{"direction":"inbound","dst.addr":"10.0.0.2:39999"}}"#;
        for line in [text, json] {
            assert!(has(line, "direction", "inbound"));
            assert!(has(line, "dst.addr", "10.0.0.2:39999"));
            assert!(!has(line, "dst.addr", "10.0.0.2:3999"));
        }
        assert!(has(
            text,
            "src.identity",
            "spiffe://cluster.local/ns/a/sa/b"
        ));
        let quoted = r#"direction=inbound src.identity="spiffe://cluster.local/ns/a/sa/b" x=1"#;
        assert!(has(
            quoted,
            "src.identity",
            "spiffe://cluster.local/ns/a/sa/b"
        ));
        assert!(!has(
            quoted,
            "src.identity",
            "spiffe://cluster.local/ns/a/sa/"
        ));
    }

    #[test]
    fn only_lines_after_the_last_one_seen_are_new() {
        assert_eq!(new_lines("a\nb", "a\nb\nc\nd"), vec!["c", "d"]);
        assert_eq!(new_lines("", "a"), vec!["a"]);
        // The earlier log rolled away: everything is new.
        assert_eq!(new_lines("x", "c\nd"), vec!["c", "d"]);
    }
}
