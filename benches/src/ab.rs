//! The A/B views of a run: this build's mesh against another build's
//! (`--baseline`) or against another project's node proxy (`--peer`),
//! measured alternately in the same run on the same machine, so that every
//! target is a ratio that noisy, shared machines cannot move much.

use serde::{Deserialize, Serialize};

use crate::stats::{Comparison, Measurement, Stats, Target};

/// What a goal compares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Of {
    /// The medians themselves.
    Median,
    /// What each mesh adds to the direct path (mesh − direct medians):
    /// the part of a latency a proxy is responsible for.
    Added,
}

/// A goal for this build over the other side.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AbGoal {
    /// This build's number over the other side's, at most this.
    AtMost(f64, Of),
    /// This build's number over the other side's, at least this.
    AtLeast(f64, Of),
}

/// What this build is held against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Other {
    /// Another build of Kanava (`--baseline`).
    Baseline,
    /// Another project's node proxy (`--peer`).
    Peer,
}

impl Other {
    /// The goal `held` is held to against this side.
    fn goal(self, held: &Held) -> AbGoal {
        match self {
            Other::Baseline => held.baseline,
            Other::Peer => held.peer,
        }
    }

    /// How a goal's ratio is named in the report.
    fn ratio_name(self) -> &'static str {
        match self {
            Other::Baseline => "current/baseline",
            Other::Peer => "kanava/peer",
        }
    }

    fn of_comparison(self, c: &Comparison) -> Option<&Stats> {
        match self {
            Other::Baseline => c.baseline.as_ref(),
            Other::Peer => c.peer.as_ref(),
        }
    }

    fn of_measurement(self, m: &Measurement) -> Option<&Stats> {
        match self {
            Other::Baseline => m.baseline.as_ref(),
            Other::Peer => m.peer.as_ref(),
        }
    }
}

pub const CPU_PER_GIB: AbGoal = AbGoal::AtMost(0.5, Of::Median);
pub const THROUGHPUT: AbGoal = AbGoal::AtLeast(1.5, Of::Median);
pub const ADDED_LATENCY: AbGoal = AbGoal::AtMost(0.75, Of::Added);
pub const CHURN: AbGoal = AbGoal::AtLeast(1.3, Of::Median);
pub const FIRST_CONNECTION: AbGoal = AbGoal::AtMost(0.6, Of::Median);
/// Memory: no worse than the other side.
pub const NO_WORSE: AbGoal = AbGoal::AtMost(1.0, Of::Median);

/// The goals against the peer (the node proxy users would otherwise pick):
/// less CPU per byte and fewer context switches, more throughput and
/// connections, less added latency, a first connection in half the time,
/// no more memory.
pub const PEER_CPU_PER_GIB: AbGoal = AbGoal::AtMost(0.9, Of::Median);
pub const PEER_CONTEXT_SWITCHES: AbGoal = AbGoal::AtMost(1.0, Of::Median);
pub const PEER_THROUGHPUT: AbGoal = AbGoal::AtLeast(1.15, Of::Median);
pub const PEER_ADDED_LATENCY_P50: AbGoal = AbGoal::AtMost(0.8, Of::Added);
pub const PEER_ADDED_LATENCY_P99: AbGoal = AbGoal::AtMost(0.9, Of::Added);
pub const PEER_CHURN: AbGoal = AbGoal::AtLeast(1.2, Of::Median);
pub const PEER_FIRST_CONNECTION: AbGoal = AbGoal::AtMost(0.5, Of::Median);

/// A metric held to the other side, by scenario and metric name as the
/// scenarios record them, with its goal against each side.
pub struct Held {
    scenario: &'static str,
    metric: &'static str,
    baseline: AbGoal,
    peer: AbGoal,
}

const fn held(
    scenario: &'static str,
    metric: &'static str,
    baseline: AbGoal,
    peer: AbGoal,
) -> Held {
    Held {
        scenario,
        metric,
        baseline,
        peer,
    }
}

/// The metrics held to the other side. A name here that no scenario
/// records shows up in the report as not measured, never silently.
const HELD: &[Held] = &[
    held(
        "proxy cost",
        "ztunnel CPU per GiB (1 stream)",
        CPU_PER_GIB,
        PEER_CPU_PER_GIB,
    ),
    held(
        "proxy cost",
        "ztunnel CPU per GiB (8 streams)",
        CPU_PER_GIB,
        PEER_CPU_PER_GIB,
    ),
    held(
        "proxy cost",
        "ztunnel context switches per GiB (1 stream)",
        NO_WORSE,
        PEER_CONTEXT_SWITCHES,
    ),
    held(
        "proxy cost",
        "ztunnel context switches per GiB (8 streams)",
        NO_WORSE,
        PEER_CONTEXT_SWITCHES,
    ),
    held("throughput", "1 stream", THROUGHPUT, PEER_THROUGHPUT),
    held("throughput", "8 streams", THROUGHPUT, PEER_THROUGHPUT),
    held(
        "latency back-to-back",
        "p50",
        ADDED_LATENCY,
        PEER_ADDED_LATENCY_P50,
    ),
    held(
        "latency back-to-back",
        "p99",
        ADDED_LATENCY,
        PEER_ADDED_LATENCY_P99,
    ),
    held("connection churn", "1 client", CHURN, PEER_CHURN),
    held("connection churn", "16 clients", CHURN, PEER_CHURN),
    held(
        "first connection",
        "connect + 1 KiB round trip",
        FIRST_CONNECTION,
        PEER_FIRST_CONNECTION,
    ),
    held("proxy cost", "ztunnel RSS idle", NO_WORSE, NO_WORSE),
    held(
        "proxy cost",
        "memory per idle connection, client ztunnel",
        NO_WORSE,
        NO_WORSE,
    ),
    held(
        "proxy cost",
        "memory per idle connection, server ztunnel",
        NO_WORSE,
        NO_WORSE,
    ),
];

/// One line of the A/B table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AbRow {
    pub scenario: String,
    /// The metric, with "added" in front when mesh − direct is compared.
    pub metric: String,
    pub unit: String,
    /// The other side's number.
    pub other: f64,
    pub current: f64,
    /// `current / other`.
    pub ratio: f64,
    /// The same ratio within each repetition (this build's sample over the
    /// other side's of the same repetition): steadier than the ratio of
    /// the medians on a noisy machine, and its spread shows how far one
    /// run's ratio can be trusted. `None` when the sides' samples do not
    /// pair up.
    #[serde(default)]
    pub per_repetition: Option<Stats>,
    pub target: Option<Target>,
}

/// Each repetition's `current / other` (for `Of::Added`, what each side
/// added to that repetition's direct path), when every side has one sample
/// per repetition.
fn per_repetition(of: Of, direct: &[f64], theirs: &[f64], current: &[f64]) -> Option<Stats> {
    if theirs.len() != current.len() || (of == Of::Added && direct.len() != current.len()) {
        return None;
    }
    let ratios: Vec<f64> = (0..current.len())
        .map(|i| match of {
            Of::Median => current[i] / theirs[i],
            Of::Added => (current[i] - direct[i]) / (theirs[i] - direct[i]),
        })
        .collect();
    Stats::of(&ratios)
}

impl AbGoal {
    fn of(self) -> Of {
        match self {
            AbGoal::AtMost(_, of) | AbGoal::AtLeast(_, of) => of,
        }
    }

    pub fn check(self, ratio: f64, other: Other) -> Target {
        let name = other.ratio_name();
        match self {
            AbGoal::AtMost(limit, _) => Target {
                text: format!("{name} <= {limit}"),
                met: ratio <= limit,
            },
            AbGoal::AtLeast(limit, _) => Target {
                text: format!("{name} >= {limit}"),
                met: ratio >= limit,
            },
        }
    }
}

/// One number as both sides measured it: scenario, metric, unit, the
/// direct path (for compared numbers), the other side, this build.
type Sides<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a Stats>,
    &'a Stats,
    &'a Stats,
);

/// The A/B rows against `other`: every held metric (checked), then every
/// other number both sides produced (for reference). Empty when the run
/// did not measure that side.
pub fn rows(other: Other, comparisons: &[Comparison], measurements: &[Measurement]) -> Vec<AbRow> {
    let mut rows = Vec::new();
    let pairs: Vec<Sides> = comparisons
        .iter()
        .filter_map(|c| {
            let theirs = other.of_comparison(c)?;
            Some((
                &*c.scenario,
                &*c.metric,
                &*c.unit,
                Some(&c.direct),
                theirs,
                &c.mesh,
            ))
        })
        .chain(measurements.iter().filter_map(|m| {
            let theirs = other.of_measurement(m)?;
            Some((&*m.scenario, &*m.metric, &*m.unit, None, theirs, &m.stats))
        }))
        .collect();
    if pairs.is_empty() {
        return rows;
    }
    for held in HELD {
        let (scenario, metric, goal) = (held.scenario, held.metric, other.goal(held));
        let found = pairs
            .iter()
            .find(|(s, m, ..)| *s == scenario && *m == metric);
        let Some(&(_, _, unit, direct, theirs, current)) = found else {
            rows.push(AbRow {
                scenario: scenario.into(),
                metric: metric.into(),
                unit: String::new(),
                other: f64::NAN,
                current: f64::NAN,
                ratio: f64::NAN,
                per_repetition: None,
                target: Some(Target {
                    text: "not measured".into(),
                    met: false,
                }),
            });
            continue;
        };
        let direct_samples = direct.map_or(&[][..], |d| &d.samples[..]);
        let paired = per_repetition(goal.of(), direct_samples, &theirs.samples, &current.samples);
        let direct = direct.map_or(f64::NAN, |d| d.median);
        let (metric, theirs, current) = match goal.of() {
            Of::Median => (metric.to_string(), theirs.median, current.median),
            Of::Added => (
                format!("added {metric}"),
                theirs.median - direct,
                current.median - direct,
            ),
        };
        let ratio = current / theirs;
        rows.push(AbRow {
            scenario: scenario.into(),
            metric,
            unit: unit.into(),
            other: theirs,
            current,
            ratio,
            per_repetition: paired,
            target: Some(goal.check(ratio, other)),
        });
    }
    for &(scenario, metric, unit, _, theirs, current) in &pairs {
        if HELD
            .iter()
            .any(|h| h.scenario == scenario && h.metric == metric)
        {
            continue;
        }
        rows.push(AbRow {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            other: theirs.median,
            current: current.median,
            ratio: current.median / theirs.median,
            per_repetition: per_repetition(Of::Median, &[], &theirs.samples, &current.samples),
            target: None,
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Better, Collector, Mode};

    /// The row of `metric`, which the test expects to be there.
    fn row<'a>(rows: &'a [AbRow], metric: &str) -> &'a AbRow {
        rows.iter()
            .find(|r| r.metric == metric)
            .unwrap_or_else(|| panic!("no row {metric}"))
    }

    /// Records one sample per side of a compared metric
    /// (scenario, metric, unit, which way is better).
    fn compared(
        collector: &mut Collector,
        (scenario, metric, unit, better): (&str, &str, &str, Better),
        samples: &[(Mode, f64)],
    ) {
        for &(mode, value) in samples {
            collector.compare(scenario, metric, unit, better, None, mode, value);
        }
    }

    #[test]
    fn added_latency_is_compared_beyond_the_direct_path() {
        let mut collector = Collector::default();
        compared(
            &mut collector,
            ("latency back-to-back", "p50", "us", Better::Lower),
            &[
                (Mode::Direct, 50.0),
                (Mode::Baseline, 250.0),
                (Mode::Mesh, 170.0),
            ],
        );
        for (mode, value) in [(Mode::Baseline, 4.0), (Mode::Mesh, 2.2)] {
            collector.measure_for(
                mode,
                "proxy cost",
                "ztunnel CPU per GiB (1 stream)",
                "CPU s/GiB",
                Better::Lower,
                None,
                value,
            );
        }
        let rows = rows(
            Other::Baseline,
            &collector.comparisons(),
            &collector.measurements(),
        );
        let cpu = row(&rows, "ztunnel CPU per GiB (1 stream)");
        assert_eq!(cpu.ratio, 2.2 / 4.0);
        assert!(!cpu.target.as_ref().expect("held").met, "0.55 > 0.5");
        let latency = row(&rows, "added p50");
        // (170 − 50) / (250 − 50)
        assert_eq!(latency.ratio, 0.6);
        assert!(latency.target.as_ref().expect("held").met);
        // Held but never measured: said so, not dropped.
        let missing = row(&rows, "8 streams");
        assert_eq!(
            missing.target.as_ref().map(|t| t.text.as_str()),
            Some("not measured")
        );
    }

    #[test]
    fn the_peer_is_held_to_its_own_goals() {
        let mut collector = Collector::default();
        compared(
            &mut collector,
            ("throughput", "1 stream", "Gbit/s", Better::Higher),
            &[
                (Mode::Direct, 10.0),
                (Mode::Baseline, 4.0),
                (Mode::Peer, 2.5),
                (Mode::Mesh, 3.2),
            ],
        );
        let (comparisons, measurements) = (collector.comparisons(), collector.measurements());
        let against_peer = rows(Other::Peer, &comparisons, &measurements);
        let throughput = row(&against_peer, "1 stream");
        assert_eq!(throughput.other, 2.5);
        assert_eq!(throughput.ratio, 3.2 / 2.5);
        let target = throughput.target.as_ref().expect("held");
        assert_eq!(target.text, "kanava/peer >= 1.15");
        assert!(target.met, "1.28 >= 1.15");
        // The same number against the baseline is held to the baseline's
        // goal, from the baseline's samples.
        let against_baseline = rows(Other::Baseline, &comparisons, &measurements);
        let throughput = row(&against_baseline, "1 stream");
        assert_eq!(throughput.other, 4.0);
        assert!(!throughput.target.as_ref().expect("held").met, "0.8 < 1.5");
    }

    #[test]
    fn each_repetition_is_compared_with_its_own() {
        // The medians' ratio is 1 (2 over 2); within each repetition the
        // ratios are 0.5, 2 and 1.
        let paired =
            per_repetition(Of::Median, &[], &[2.0, 1.0, 3.0], &[1.0, 2.0, 3.0]).expect("paired");
        assert_eq!((paired.median, paired.min, paired.max), (1.0, 0.5, 2.0));
        // Added: each side less that repetition's direct path.
        let added =
            per_repetition(Of::Added, &[10.0, 20.0], &[30.0, 60.0], &[20.0, 50.0]).expect("paired");
        assert_eq!((added.min, added.max), (0.5, 0.75));
        assert!(
            per_repetition(Of::Median, &[], &[1.0, 2.0], &[1.0]).is_none(),
            "a repetition without its pair pairs nothing"
        );

        let mut collector = Collector::default();
        for (peer, mesh) in [(2.0, 1.0), (1.0, 2.0), (3.0, 3.0)] {
            compared(
                &mut collector,
                ("throughput", "1 stream", "Gbit/s", Better::Higher),
                &[(Mode::Direct, 10.0), (Mode::Peer, peer), (Mode::Mesh, mesh)],
            );
        }
        let rows = rows(
            Other::Peer,
            &collector.comparisons(),
            &collector.measurements(),
        );
        let throughput = row(&rows, "1 stream");
        assert_eq!(throughput.ratio, 1.0);
        let paired = throughput.per_repetition.as_ref().expect("paired");
        assert_eq!((paired.min, paired.max), (0.5, 2.0));
    }

    #[test]
    fn a_run_without_baseline_has_no_ab_rows() {
        let mut collector = Collector::default();
        compared(
            &mut collector,
            ("throughput", "1 stream", "Gbit/s", Better::Higher),
            &[(Mode::Mesh, 1.0), (Mode::Direct, 2.0)],
        );
        for other in [Other::Baseline, Other::Peer] {
            assert!(rows(other, &collector.comparisons(), &collector.measurements()).is_empty());
        }
    }
}
