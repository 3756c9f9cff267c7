//! Numbers gathered by the benchmark, and what they add up to.

use serde::{Deserialize, Serialize};

pub use crate::goals::Target;
use crate::goals::{ComparisonGoal, MeasurementGoal};

/// Which side of a comparison a sample belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// The same pods, in a namespace that is not enrolled.
    Direct,
    /// Through the mesh.
    Mesh,
    /// Through the mesh of another build (`--baseline`), in a lab of its own.
    Baseline,
    /// Through another project's node proxy (`--peer`), in a lab of its own.
    Peer,
}

impl Mode {
    pub fn namespace(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Mesh | Mode::Baseline | Mode::Peer => "mesh",
        }
    }
}

/// Which way is better.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Some(Stats {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            samples: samples.to_vec(),
        })
    }
}

/// Direct and mesh side by side.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub better: Better,
    pub direct: Stats,
    pub mesh: Stats,
    /// Median of mesh over median of direct.
    pub ratio: f64,
    /// Median of mesh minus median of direct (what the mesh adds).
    pub added: f64,
    pub target: Option<Target>,
    /// The baseline build's mesh, in an A/B run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Stats>,
    /// The peer's proxies, in a run with `--peer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Stats>,
}

/// A number with no direct counterpart (memory of the proxy, control plane
/// scale).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub better: Better,
    pub stats: Stats,
    pub target: Option<Target>,
    /// The same number for the baseline build, in an A/B run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Stats>,
    /// The same number for the peer's proxies, in a run with `--peer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Stats>,
}

type Key = (String, String);

struct Series<G> {
    unit: String,
    better: Better,
    goal: Option<G>,
    direct: Vec<f64>,
    mesh: Vec<f64>,
    baseline: Vec<f64>,
    peer: Vec<f64>,
}

/// Collects samples as the scenarios run, in the order they were first seen
/// (a few dozen series: a list is all it takes).
#[derive(Default)]
pub struct Collector {
    compared: Vec<(Key, Series<ComparisonGoal>)>,
    measured: Vec<(Key, Series<MeasurementGoal>)>,
}

/// The series named `scenario`/`metric` in `list`, added if new.
fn series<'a, G>(
    list: &'a mut Vec<(Key, Series<G>)>,
    scenario: &str,
    metric: &str,
    unit: &str,
    better: Better,
    goal: Option<G>,
) -> &'a mut Series<G> {
    let index = match list
        .iter()
        .position(|((s, m), _)| s == scenario && m == metric)
    {
        Some(index) => index,
        None => {
            let series = Series {
                unit: unit.to_string(),
                better,
                goal,
                direct: Vec::new(),
                mesh: Vec::new(),
                baseline: Vec::new(),
                peer: Vec::new(),
            };
            list.push(((scenario.to_string(), metric.to_string()), series));
            list.len() - 1
        }
    };
    &mut list[index].1
}

impl Collector {
    /// A sample of a direct-versus-mesh metric, held to `goal` if it has one.
    #[allow(clippy::too_many_arguments)]
    pub fn compare(
        &mut self,
        scenario: &str,
        metric: &str,
        unit: &str,
        better: Better,
        goal: Option<ComparisonGoal>,
        mode: Mode,
        value: f64,
    ) {
        let series = series(&mut self.compared, scenario, metric, unit, better, goal);
        match mode {
            Mode::Direct => series.direct.push(value),
            Mode::Mesh => series.mesh.push(value),
            Mode::Baseline => series.baseline.push(value),
            Mode::Peer => series.peer.push(value),
        }
    }

    /// A sample of a mesh-only metric, held to `goal` if it has one.
    pub fn measure(
        &mut self,
        scenario: &str,
        metric: &str,
        unit: &str,
        better: Better,
        goal: Option<MeasurementGoal>,
        value: f64,
    ) {
        self.measure_for(Mode::Mesh, scenario, metric, unit, better, goal, value);
    }

    /// A sample of a mesh-only metric taken of `mode`'s mesh (this build's,
    /// the baseline's or the peer's); the goal is checked on this build's
    /// only.
    #[allow(clippy::too_many_arguments)]
    pub fn measure_for(
        &mut self,
        mode: Mode,
        scenario: &str,
        metric: &str,
        unit: &str,
        better: Better,
        goal: Option<MeasurementGoal>,
        value: f64,
    ) {
        let series = series(&mut self.measured, scenario, metric, unit, better, goal);
        match mode {
            Mode::Baseline => series.baseline.push(value),
            Mode::Peer => series.peer.push(value),
            Mode::Direct | Mode::Mesh => series.mesh.push(value),
        }
    }

    pub fn comparisons(&self) -> Vec<Comparison> {
        self.compared
            .iter()
            .filter_map(|(key, series)| {
                let direct = Stats::of(&series.direct)?;
                let mesh = Stats::of(&series.mesh)?;
                let ratio = if direct.median == 0.0 {
                    f64::NAN
                } else {
                    mesh.median / direct.median
                };
                let added = mesh.median - direct.median;
                let target = series
                    .goal
                    .map(|goal| goal.check(&series.unit, direct.median, mesh.median));
                Some(Comparison {
                    scenario: key.0.clone(),
                    metric: key.1.clone(),
                    unit: series.unit.clone(),
                    better: series.better,
                    direct,
                    mesh,
                    ratio,
                    added,
                    target,
                    baseline: Stats::of(&series.baseline),
                    peer: Stats::of(&series.peer),
                })
            })
            .collect()
    }

    pub fn measurements(&self) -> Vec<Measurement> {
        self.measured
            .iter()
            .filter_map(|(key, series)| {
                let stats = Stats::of(&series.mesh)?;
                let target = series
                    .goal
                    .map(|goal| goal.check(&series.unit, stats.median));
                Some(Measurement {
                    scenario: key.0.clone(),
                    metric: key.1.clone(),
                    unit: series.unit.clone(),
                    better: series.better,
                    stats,
                    target,
                    baseline: Stats::of(&series.baseline),
                    peer: Stats::of(&series.peer),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(Stats::of(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(Stats::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Stats::of(&[]).is_none());
        let mut collector = Collector::default();
        for (mode, value) in [
            (Mode::Direct, 10.0),
            (Mode::Mesh, 4.0),
            (Mode::Direct, 12.0),
            (Mode::Mesh, 6.0),
        ] {
            collector.compare(
                "throughput",
                "single stream",
                "Gbit/s",
                Better::Higher,
                Some(crate::goals::SINGLE_STREAM_THROUGHPUT),
                mode,
                value,
            );
        }
        let comparison = &collector.comparisons()[0];
        assert_eq!(comparison.ratio, 5.0 / 11.0);
        assert_eq!(comparison.added, -6.0);
        // The goal rides with the metric, whatever it is called.
        let target = comparison.target.as_ref().expect("goal attached");
        assert_eq!(target.text, "mesh/direct >= 0.45");
        assert!(target.met);
    }
}
