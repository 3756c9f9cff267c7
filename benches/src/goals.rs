//! The goals the benchmark is held to. They are reported, never asserted:
//! machines are shared and noisy, and a missed goal is something to
//! understand, not a broken build.
//!
//! Each goal is a typed constant that the scenario attaches to the metric it
//! records, so renaming a metric cannot silently drop its goal.

use std::fmt::Write as _;

/// A goal for a metric measured both directly and through the mesh.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ComparisonGoal {
    /// The mesh's median over the direct median, at least this.
    RatioAtLeast(f64),
    /// The mesh's median minus the direct median, at most this (unit of
    /// the metric).
    AddedAtMost(f64),
    /// The mesh's median, at most this.
    MeshAtMost(f64),
}

/// A goal for a mesh-only metric, on its median.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MeasurementGoal {
    AtMost(f64),
    Below(f64),
    AtLeast(f64),
}

pub const SINGLE_STREAM_THROUGHPUT: ComparisonGoal = ComparisonGoal::RatioAtLeast(0.45);
pub const EIGHT_STREAM_THROUGHPUT: ComparisonGoal = ComparisonGoal::RatioAtLeast(0.30);
pub const ADDED_LATENCY_P50: ComparisonGoal = ComparisonGoal::AddedAtMost(60.0);
pub const ADDED_LATENCY_P99: ComparisonGoal = ComparisonGoal::AddedAtMost(100.0);
pub const CONNECTION_CHURN: ComparisonGoal = ComparisonGoal::RatioAtLeast(0.5);
pub const FIRST_CONNECTION: ComparisonGoal = ComparisonGoal::MeshAtMost(1500.0);
pub const ZTUNNEL_IDLE_RSS: MeasurementGoal = MeasurementGoal::AtMost(8.0);
pub const MEMORY_PER_IDLE_CONNECTION: MeasurementGoal = MeasurementGoal::AtMost(4.0);
pub const SNAPSHOT_TO_EVERY_STREAM: MeasurementGoal = MeasurementGoal::Below(1000.0);
pub const POD_CHANGE_TO_EVERY_STREAM_P99: MeasurementGoal = MeasurementGoal::Below(100.0);
pub const CONTROL_PLANE_RSS: MeasurementGoal = MeasurementGoal::Below(200.0);
/// At 100,000 pods and 1,000 streams: every stream's snapshot, in ms.
pub const SCALE_SNAPSHOT_TO_EVERY_STREAM: MeasurementGoal = MeasurementGoal::Below(5000.0);
/// At 100,000 pods and 1,000 streams: one change to every stream, p99, ms.
pub const SCALE_POD_CHANGE_TO_EVERY_STREAM_P99: MeasurementGoal = MeasurementGoal::Below(100.0);
/// At 100,000 pods: the control plane's RSS, in MiB.
pub const SCALE_CONTROL_PLANE_RSS: MeasurementGoal = MeasurementGoal::Below(512.0);
/// At 100,000 pods: what one ztunnel is sent before it is ready, in MB.
pub const SCALE_SNAPSHOT_BYTES: MeasurementGoal = MeasurementGoal::Below(2.0);
/// At 100,000 pods: a ztunnel's RSS once it holds the cluster, in MiB.
pub const SCALE_ZTUNNEL_RSS: MeasurementGoal = MeasurementGoal::Below(64.0);
/// At 100,000 pods: kubelet status updates absorbed, per second.
pub const SCALE_STATUS_UPDATES_PER_SECOND: MeasurementGoal = MeasurementGoal::AtLeast(1000.0);
/// At 100,000 pods: bytes status updates cost the streams: none.
pub const SCALE_STATUS_UPDATE_BYTES: MeasurementGoal = MeasurementGoal::AtMost(0.0);

/// At 100,000 pods: what learning an address adds to a first connection,
/// p99, in µs.
pub const SCALE_LEARN_P99: MeasurementGoal = MeasurementGoal::AtMost(1000.0);

/// A node of 110 enrolled pods: its ztunnel's CPU while idle, % of a core.
pub const FULL_NODE_IDLE_CPU: MeasurementGoal = MeasurementGoal::Below(1.0);
/// A node of 110 enrolled pods: processes the mesh starts while idle.
pub const FULL_NODE_IDLE_PROCESSES: MeasurementGoal = MeasurementGoal::AtMost(0.0);
/// A node of 110 enrolled pods: one more pod, from its capture to its
/// first meshed byte, p99, ms.
pub const FULL_NODE_CAPTURE_TO_FIRST_BYTE_P99: MeasurementGoal = MeasurementGoal::Below(200.0);

/// `goal` at the largest size of a full run (100,000 pods), none below.
pub fn at_largest(pods: usize, goal: MeasurementGoal) -> Option<MeasurementGoal> {
    (pods >= 100_000).then_some(goal)
}
/// One node's hand-over during an upgrade, in ms (10,000 connections).
pub const HAND_OVER_TIME: MeasurementGoal = MeasurementGoal::Below(2000.0);
/// None at all: failed connections, descriptors left behind.
pub const NONE_FAILED: MeasurementGoal = MeasurementGoal::AtMost(0.0);

/// A goal with its verdict, as the report shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Target {
    /// E.g. `mesh/direct >= 0.45`.
    pub text: String,
    pub met: bool,
}

impl ComparisonGoal {
    /// Checks the goal against a comparison's medians.
    pub fn check(self, unit: &str, direct_median: f64, mesh_median: f64) -> Target {
        let mut text = String::new();
        let met = match self {
            ComparisonGoal::RatioAtLeast(ratio) => {
                let _ = write!(text, "mesh/direct >= {ratio}");
                direct_median > 0.0 && mesh_median / direct_median >= ratio
            }
            ComparisonGoal::AddedAtMost(added) => {
                let _ = write!(text, "added <= {added} {unit}");
                mesh_median - direct_median <= added
            }
            ComparisonGoal::MeshAtMost(limit) => {
                let _ = write!(text, "mesh <= {limit} {unit}");
                mesh_median <= limit
            }
        };
        Target { text, met }
    }
}

impl MeasurementGoal {
    /// Checks the goal against a measurement's median.
    pub fn check(self, unit: &str, median: f64) -> Target {
        match self {
            MeasurementGoal::AtMost(limit) => Target {
                text: format!("<= {limit} {unit}"),
                met: median <= limit,
            },
            MeasurementGoal::Below(limit) => Target {
                text: format!("< {limit} {unit}"),
                met: median < limit,
            },
            MeasurementGoal::AtLeast(floor) => Target {
                text: format!(">= {floor} {unit}"),
                met: median >= floor,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_read_and_judge_as_written() {
        let target = SINGLE_STREAM_THROUGHPUT.check("Gbit/s", 10.0, 4.0);
        assert_eq!(target.text, "mesh/direct >= 0.45");
        assert!(!target.met);
        assert!(SINGLE_STREAM_THROUGHPUT.check("Gbit/s", 10.0, 4.5).met);
        let target = ADDED_LATENCY_P50.check("us", 80.0, 140.0);
        assert_eq!(target.text, "added <= 60 us");
        assert!(target.met);
        assert!(!FIRST_CONNECTION.check("us", 100.0, 1501.0).met);
        let target = CONTROL_PLANE_RSS.check("MiB", 200.0);
        assert_eq!(target.text, "< 200 MiB");
        assert!(!target.met, "the limit itself is not below the limit");
        assert!(ZTUNNEL_IDLE_RSS.check("MiB", 8.0).met);
        let target = SCALE_STATUS_UPDATES_PER_SECOND.check("updates/s", 999.0);
        assert_eq!(target.text, ">= 1000 updates/s");
        assert!(!target.met);
    }
}
