//! The A/B view of a run with `--baseline`: this build's mesh against
//! another build's, measured alternately in the same run on the same
//! machine, so that every target is a ratio that noisy, shared machines
//! cannot move much.

use serde::{Deserialize, Serialize};

use crate::stats::{Comparison, Measurement, Target};

/// What a goal compares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Of {
    /// The medians themselves.
    Median,
    /// What each mesh adds to the direct path (mesh − direct medians):
    /// the part of a latency a proxy is responsible for.
    Added,
}

/// A goal for this build over the baseline build.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AbGoal {
    /// This build's number over the baseline's, at most this.
    AtMost(f64, Of),
    /// This build's number over the baseline's, at least this.
    AtLeast(f64, Of),
}

pub const CPU_PER_GIB: AbGoal = AbGoal::AtMost(0.5, Of::Median);
pub const THROUGHPUT: AbGoal = AbGoal::AtLeast(1.5, Of::Median);
pub const ADDED_LATENCY: AbGoal = AbGoal::AtMost(0.75, Of::Added);
pub const CHURN: AbGoal = AbGoal::AtLeast(1.3, Of::Median);
pub const FIRST_CONNECTION: AbGoal = AbGoal::AtMost(0.6, Of::Median);
/// Memory: no worse than the baseline.
pub const NO_WORSE: AbGoal = AbGoal::AtMost(1.0, Of::Median);

/// The metrics held to the baseline, by scenario and metric name as the
/// scenarios record them. A name here that no scenario records shows up in
/// the report as not measured, never silently.
pub const HELD: &[(&str, &str, AbGoal)] = &[
    ("proxy cost", "ztunnel CPU per GiB (1 stream)", CPU_PER_GIB),
    ("proxy cost", "ztunnel CPU per GiB (8 streams)", CPU_PER_GIB),
    ("throughput", "1 stream", THROUGHPUT),
    ("throughput", "8 streams", THROUGHPUT),
    ("latency back-to-back", "p50", ADDED_LATENCY),
    ("latency back-to-back", "p99", ADDED_LATENCY),
    ("connection churn", "1 client", CHURN),
    ("connection churn", "16 clients", CHURN),
    (
        "first connection",
        "connect + 1 KiB round trip",
        FIRST_CONNECTION,
    ),
    ("proxy cost", "ztunnel RSS idle", NO_WORSE),
    (
        "proxy cost",
        "memory per idle connection, client ztunnel",
        NO_WORSE,
    ),
    (
        "proxy cost",
        "memory per idle connection, server ztunnel",
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
    pub baseline: f64,
    pub current: f64,
    /// `current / baseline`.
    pub ratio: f64,
    pub target: Option<Target>,
}

impl AbGoal {
    fn of(self) -> Of {
        match self {
            AbGoal::AtMost(_, of) | AbGoal::AtLeast(_, of) => of,
        }
    }

    pub fn check(self, ratio: f64) -> Target {
        match self {
            AbGoal::AtMost(limit, _) => Target {
                text: format!("current/baseline <= {limit}"),
                met: ratio <= limit,
            },
            AbGoal::AtLeast(limit, _) => Target {
                text: format!("current/baseline >= {limit}"),
                met: ratio >= limit,
            },
        }
    }
}

/// The A/B rows: every held metric (checked), then every other number
/// both builds produced (for reference). Empty when the run had no
/// baseline.
pub fn rows(comparisons: &[Comparison], measurements: &[Measurement]) -> Vec<AbRow> {
    let mut rows = Vec::new();
    // (scenario, metric, unit, direct median, baseline median, this build's median)
    let pairs: Vec<(&str, &str, &str, f64, f64, f64)> = comparisons
        .iter()
        .filter_map(|c| {
            let baseline = c.baseline.as_ref()?.median;
            Some((
                &*c.scenario,
                &*c.metric,
                &*c.unit,
                c.direct.median,
                baseline,
                c.mesh.median,
            ))
        })
        .chain(measurements.iter().filter_map(|m| {
            let baseline = m.baseline.as_ref()?.median;
            Some((
                &*m.scenario,
                &*m.metric,
                &*m.unit,
                f64::NAN,
                baseline,
                m.stats.median,
            ))
        }))
        .collect();
    if pairs.is_empty() {
        return rows;
    }
    for &(scenario, metric, goal) in HELD {
        let found = pairs
            .iter()
            .find(|(s, m, ..)| *s == scenario && *m == metric);
        let Some(&(_, _, unit, direct, baseline, current)) = found else {
            rows.push(AbRow {
                scenario: scenario.into(),
                metric: metric.into(),
                unit: String::new(),
                baseline: f64::NAN,
                current: f64::NAN,
                ratio: f64::NAN,
                target: Some(Target {
                    text: "not measured".into(),
                    met: false,
                }),
            });
            continue;
        };
        let (metric, baseline, current) = match goal.of() {
            Of::Median => (metric.to_string(), baseline, current),
            Of::Added => (
                format!("added {metric}"),
                baseline - direct,
                current - direct,
            ),
        };
        let ratio = current / baseline;
        rows.push(AbRow {
            scenario: scenario.into(),
            metric,
            unit: unit.into(),
            baseline,
            current,
            ratio,
            target: Some(goal.check(ratio)),
        });
    }
    for &(scenario, metric, unit, _, baseline, current) in &pairs {
        if HELD.iter().any(|(s, m, _)| *s == scenario && *m == metric) {
            continue;
        }
        rows.push(AbRow {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            baseline,
            current,
            ratio: current / baseline,
            target: None,
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Better, Collector, Mode};

    #[test]
    fn added_latency_is_compared_beyond_the_direct_path() {
        let mut collector = Collector::default();
        for (mode, value) in [
            (Mode::Direct, 50.0),
            (Mode::Baseline, 250.0),
            (Mode::Mesh, 170.0),
        ] {
            collector.compare(
                "latency back-to-back",
                "p50",
                "us",
                Better::Lower,
                None,
                mode,
                value,
            );
        }
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
        let rows = rows(&collector.comparisons(), &collector.measurements());
        let cpu = rows
            .iter()
            .find(|r| r.metric == "ztunnel CPU per GiB (1 stream)")
            .expect("cpu row");
        assert_eq!(cpu.ratio, 2.2 / 4.0);
        assert!(!cpu.target.as_ref().expect("held").met, "0.55 > 0.5");
        let latency = rows
            .iter()
            .find(|r| r.metric == "added p50")
            .expect("latency row");
        // (170 − 50) / (250 − 50)
        assert_eq!(latency.ratio, 0.6);
        assert!(latency.target.as_ref().expect("held").met);
        // Held but never measured: said so, not dropped.
        let missing = rows
            .iter()
            .find(|r| r.metric == "8 streams")
            .expect("throughput row");
        assert_eq!(
            missing.target.as_ref().map(|t| t.text.as_str()),
            Some("not measured")
        );
    }

    #[test]
    fn a_run_without_baseline_has_no_ab_rows() {
        let mut collector = Collector::default();
        for (mode, value) in [(Mode::Mesh, 1.0), (Mode::Direct, 2.0)] {
            collector.compare(
                "throughput",
                "1 stream",
                "Gbit/s",
                Better::Higher,
                None,
                mode,
                value,
            );
        }
        assert!(rows(&collector.comparisons(), &collector.measurements()).is_empty());
    }
}
