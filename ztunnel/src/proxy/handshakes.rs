//! Bounds on inbound HBONE handshakes in progress.
//!
//! A handshake costs the ztunnel memory and CPU before the peer has proven
//! anything, and anyone who can reach a pod's :15008 can start one. One
//! global bound alone lets a single pod that opens idle connections take
//! every slot of the node. So a handshake needs a slot in three budgets at
//! once: the node's, its source address's and its destination pod's. An
//! attacker then exhausts at most its own share and the share of the pod
//! it aims at; other sources reach other pods as before. Slots are given
//! back when the handshake ends, however it ends (the permit is dropped).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The three budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub node: usize,
    pub per_source: usize,
    pub per_pod: usize,
}

/// Which budget was spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    Node,
    Source,
    Pod,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exhausted::Node => "too many in progress on this node",
            Exhausted::Source => "too many in progress from this source address",
            Exhausted::Pod => "too many in progress to this destination",
        })
    }
}

#[derive(Debug, Default)]
struct Counts {
    node: usize,
    by_source: HashMap<IpAddr, usize>,
    by_pod: HashMap<String, usize>,
}

/// Handshakes in progress, by node, source and destination pod.
#[derive(Debug)]
pub struct Handshakes {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

/// A handshake's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    counts: Arc<Mutex<Counts>>,
    source: IpAddr,
    pod: String,
}

impl Handshakes {
    pub fn new(limits: Limits) -> Self {
        Handshakes {
            limits,
            counts: Arc::default(),
        }
    }

    /// A slot for a handshake from `source` to the pod `pod_uid`, if every
    /// budget has room.
    pub fn try_acquire(&self, source: IpAddr, pod_uid: &str) -> Result<Permit, Exhausted> {
        let source = source.to_canonical();
        let mut counts = lock(&self.counts);
        if counts.node >= self.limits.node {
            return Err(Exhausted::Node);
        }
        if counts.by_source.get(&source).copied().unwrap_or(0) >= self.limits.per_source {
            return Err(Exhausted::Source);
        }
        if counts.by_pod.get(pod_uid).copied().unwrap_or(0) >= self.limits.per_pod {
            return Err(Exhausted::Pod);
        }
        counts.node += 1;
        *counts.by_source.entry(source).or_default() += 1;
        *counts.by_pod.entry(pod_uid.to_string()).or_default() += 1;
        Ok(Permit {
            counts: self.counts.clone(),
            source,
            pod: pod_uid.to_string(),
        })
    }

    /// Handshakes in progress on the node.
    pub fn in_progress(&self) -> usize {
        lock(&self.counts).node
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        counts.node = counts.node.saturating_sub(1);
        release(&mut counts.by_source, &self.source);
        release(&mut counts.by_pod, &self.pod);
    }
}

/// One fewer for `key`; entries at zero are removed so the maps hold only
/// what is in progress.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = map.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(key);
        }
    }
}

fn lock(counts: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    // Counters stay consistent under a panic elsewhere: each update is done
    // under one lock and cannot be left half-way.
    counts.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("IP")
    }

    #[test]
    fn one_source_cannot_take_the_nodes_budget() {
        let handshakes = Handshakes::new(Limits {
            node: 100,
            per_source: 4,
            per_pod: 50,
        });
        let attacker = ip("10.244.1.66");
        let held: Vec<Permit> = (0..4)
            .map(|_| {
                handshakes
                    .try_acquire(attacker, "web")
                    .expect("within the share")
            })
            .collect();
        assert_eq!(
            handshakes.try_acquire(attacker, "web").err(),
            Some(Exhausted::Source)
        );
        assert_eq!(
            handshakes
                .try_acquire(ip("::ffff:10.244.1.66"), "other")
                .err(),
            Some(Exhausted::Source),
            "the same source written as IPv4-mapped"
        );
        // Everyone else still gets in, to the attacked pod too.
        assert!(handshakes.try_acquire(ip("10.244.1.2"), "web").is_ok());
        drop(held);
        assert!(
            handshakes.try_acquire(attacker, "web").is_ok(),
            "slots come back"
        );
    }

    #[test]
    fn many_sources_at_one_pod_leave_the_other_pods_reachable() {
        let handshakes = Handshakes::new(Limits {
            node: 100,
            per_source: 4,
            per_pod: 8,
        });
        let held: Vec<Permit> = (1..=8)
            .map(|i| {
                handshakes
                    .try_acquire(ip(&format!("10.244.1.{i}")), "web")
                    .expect("within the pod's share")
            })
            .collect();
        assert_eq!(
            handshakes.try_acquire(ip("10.244.1.9"), "web").err(),
            Some(Exhausted::Pod)
        );
        assert!(handshakes.try_acquire(ip("10.244.1.9"), "db").is_ok());
        assert_eq!(handshakes.in_progress(), 8);
        drop(held);
        assert_eq!(handshakes.in_progress(), 0);
        assert!(lock(&handshakes.counts).by_source.is_empty());
    }

    #[test]
    fn the_node_budget_bounds_everything() {
        let handshakes = Handshakes::new(Limits {
            node: 2,
            per_source: 10,
            per_pod: 10,
        });
        let _a = handshakes.try_acquire(ip("10.0.0.1"), "a").expect("room");
        let _b = handshakes.try_acquire(ip("10.0.0.2"), "b").expect("room");
        assert_eq!(
            handshakes.try_acquire(ip("10.0.0.3"), "c").err(),
            Some(Exhausted::Node)
        );
    }
}
