//! `kanava verify`: the isolation a mesh promises, checked the way an
//! attacker inside a pod would try it, in a lab or on a live cluster.
//!
//! Every check is written once, against [`Ground`]: where the checks' pods
//! run and how to act from inside them. The lab's ground (in `kanava-lab`)
//! acts from its network namespaces directly; the cluster's ground
//! ([`cluster`]) creates probe pods in temporary namespaces and acts from
//! inside them through the API server (`exec`), so its bytes leave from the
//! pod's own network namespace exactly as an application's would. A check
//! reports what it expected, what it observed and, when it fails, the fix.
//!
//! | module | checks |
//! | --- | --- |
//! | [`checks::ztunnel_ports`] | the ztunnel's admin, metrics and readiness ports from a pod; a pod dialling the ztunnel's own listeners |
//! | [`checks::control_plane`] | the control plane from a pod; a node asking for another node's identity |
//! | [`checks::plaintext`] | plaintext and UDP to a STRICT pod; plaintext to a PERMISSIVE pod |
//! | [`checks::certificates`] | a certificate from a foreign CA on the HBONE port |
//! | [`checks::traffic`] | identities in the access log; a spoofed source; the fabric; a DENY on open connections |

pub mod check;
pub mod checks;
pub mod cluster;
mod ground;
pub mod node_facts;
pub mod packets;

use std::time::Duration;

pub use ground::{
    CaptureUnavailable, Dial, Duplex, FabricCapture, Family, Ground, Listener, Seat, Seats, Stream,
    connect_spoofed,
};
pub use packets::Packet;

/// Port of the listener (a sink) the traffic checks reach in a server pod.
pub const PROBE_PORT: u16 = 39_999;
/// Bound on every single step of a check (a connection, an answer).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// One row of the report.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Check {
    pub name: String,
    pub expected: String,
    pub observed: String,
    /// `None`: skipped (the ground lacks what the check needs; `observed`
    /// says what).
    pub passed: Option<bool>,
    /// The IP family it was made in, for checks made once per family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// What to do about a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn new(name: &str, expected: &str) -> Self {
        Check {
            name: name.into(),
            expected: expected.into(),
            observed: String::new(),
            passed: None,
            family: None,
            fix: None,
        }
    }

    pub fn in_family(mut self, family: Family) -> Self {
        self.family = Some(family);
        self
    }

    pub fn pass(mut self, observed: impl Into<String>) -> Self {
        self.observed = observed.into();
        self.passed = Some(true);
        self
    }

    pub fn fail(mut self, observed: impl Into<String>) -> Self {
        self.observed = observed.into();
        self.passed = Some(false);
        self
    }

    pub fn skip(mut self, why: impl Into<String>) -> Self {
        self.observed = format!("skipped: {}", why.into());
        self.passed = None;
        self
    }

    pub fn judge(self, passed: bool, observed: impl Into<String>) -> Self {
        if passed {
            self.pass(observed)
        } else {
            self.fail(observed)
        }
    }

    /// Names the fix, kept only when the check failed.
    pub fn fix_if_failed(mut self, fix: impl Into<String>) -> Self {
        if self.passed == Some(false) {
            self.fix = Some(fix.into());
        }
        self
    }

    /// The name with its family, as the report shows it.
    pub fn title(&self) -> String {
        match self.family {
            Some(family) => format!("{} ({family})", self.name),
            None => self.name.clone(),
        }
    }
}

/// Whether every check that ran passed.
pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.passed != Some(false))
}

/// Runs every check on `ground`: the checks of addresses once per IP
/// family, the others once. `progress` sees each check as it ends.
pub async fn run<G: Ground>(ground: &G, progress: &mut dyn FnMut(&Check)) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut record = |check: Check, checks: &mut Vec<Check>| {
        progress(&check);
        checks.push(check);
    };
    let families = ground.families();
    let Some(primary) = families.first().and_then(|f| ground.seats(*f)) else {
        record(
            Check::new("enrolled pods", "at least one captured pod")
                .fail("none")
                .fix_if_failed(
                    "enroll a namespace: kubectl label namespace NS kanava.io/dataplane-mode=ambient",
                ),
            &mut checks,
        );
        return checks;
    };
    record(
        checks::control_plane::from_a_pod(ground, &primary).await,
        &mut checks,
    );
    record(
        checks::control_plane::csr_for_another_node(ground, &primary).await,
        &mut checks,
    );
    record(
        checks::ztunnel_ports::self_loop(ground, &primary).await,
        &mut checks,
    );
    for (index, &family) in families.iter().enumerate() {
        let Some(seats) = ground.seats(family) else {
            record(
                Check::new(
                    "enrolled pods",
                    "a captured pod with an address of this family",
                )
                .in_family(family)
                .fail("none"),
                &mut checks,
            );
            continue;
        };
        let in_family = |check: Check| check.in_family(family);
        record(
            in_family(checks::ztunnel_ports::admin_port(ground, &seats).await),
            &mut checks,
        );
        record(
            in_family(checks::ztunnel_ports::metrics_ports(ground, &seats).await),
            &mut checks,
        );
        record(
            in_family(checks::plaintext::to_strict(ground, &seats).await),
            &mut checks,
        );
        record(
            in_family(checks::plaintext::to_permissive(ground, &seats).await),
            &mut checks,
        );
        record(
            in_family(checks::plaintext::udp_to_strict(ground, &seats).await),
            &mut checks,
        );
        record(
            in_family(checks::certificates::foreign_ca(ground, &seats).await),
            &mut checks,
        );
        for check in checks::traffic::all(ground, &seats, index == 0).await {
            record(in_family(check), &mut checks);
        }
    }
    checks
}

/// The first line of `text`, at most 90 characters.
pub(crate) fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(90) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    }
}
