//! The goals the benchmark is held to. They are reported, never asserted:
//! machines are shared and noisy, and a missed goal is something to
//! understand, not a broken build.

use crate::stats::{Comparison, Measurement, Target};

pub fn for_comparison(c: &Comparison) -> Option<Target> {
    let (text, met) = match (c.scenario.as_str(), c.metric.as_str()) {
        ("throughput", "1 stream") => ("mesh/direct >= 0.45".to_string(), c.ratio >= 0.45),
        ("throughput", "8 streams") => ("mesh/direct >= 0.30".to_string(), c.ratio >= 0.30),
        ("latency back-to-back", "p50") => ("added <= 60 us".to_string(), c.added <= 60.0),
        ("latency back-to-back", "p99") => ("added <= 100 us".to_string(), c.added <= 100.0),
        ("connection churn", _)
            if c.metric.ends_with("client") || c.metric.ends_with("clients") =>
        {
            ("mesh/direct >= 0.5".to_string(), c.ratio >= 0.5)
        }
        ("first connection", _) => ("mesh <= 1500 us".to_string(), c.mesh.median <= 1500.0),
        _ => return None,
    };
    Some(Target { text, met })
}

pub fn for_measurement(m: &Measurement) -> Option<Target> {
    let value = m.stats.median;
    let (text, met) = match (m.scenario.as_str(), m.metric.as_str()) {
        ("proxy cost", "ztunnel RSS idle") => ("<= 8 MiB".to_string(), value <= 8.0),
        ("proxy cost", metric) if metric.starts_with("memory per idle connection") => {
            ("<= 4 KiB".to_string(), value <= 4.0)
        }
        ("control plane", "full snapshot to every stream") => {
            ("< 1000 ms".to_string(), value < 1000.0)
        }
        ("control plane", "one pod change to every stream p99") => {
            ("< 100 ms".to_string(), value < 100.0)
        }
        ("control plane", "RSS") => ("< 200 MiB".to_string(), value < 200.0),
        _ => return None,
    };
    Some(Target { text, met })
}
