//! Per-pod bounds on open connections, so that one pod cannot use up the
//! ztunnel (its file descriptors, its memory) for its neighbours.
//!
//! Each captured pod has two counts: the connections it opened (outbound)
//! and those opened to it (inbound: plaintext, and HBONE connections). A
//! connection over the bound is refused at once and says why in the access
//! log (or the log, for an HBONE connection, which has no line of its own).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The number of connections open in one direction of one pod.
#[derive(Debug, Default)]
pub struct OpenCount(AtomicUsize);

/// One open connection; dropping it closes its place in the count.
#[derive(Debug)]
pub struct Opened(Arc<OpenCount>);

impl OpenCount {
    /// Counts one more connection if fewer than `max` are open.
    pub fn try_open(self: &Arc<Self>, max: usize) -> Option<Opened> {
        let mut current = self.0.load(Ordering::Acquire);
        loop {
            if current >= max {
                return None;
            }
            match self.0.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Opened(self.clone())),
                Err(actual) => current = actual,
            }
        }
    }

    pub fn current(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pod's two counts.
#[derive(Debug, Default)]
pub struct PodConnections {
    pub outbound: Arc<OpenCount>,
    pub inbound: Arc<OpenCount>,
}

/// Why a connection over a pod's bound is refused.
pub fn over_limit(pod: &super::CapturedPod, direction: &str, max: usize) -> String {
    format!(
        "pod {} already has {max} {direction} connections open through this ztunnel, the most \
         allowed (--max-connections-per-pod)",
        pod.info.display_name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_refuses_beyond_its_bound_and_frees_on_drop() {
        let count = Arc::new(OpenCount::default());
        let first = count.try_open(2).expect("room");
        let _second = count.try_open(2).expect("room");
        assert!(count.try_open(2).is_none(), "the third is over the bound");
        drop(first);
        assert_eq!(count.current(), 1);
        assert!(count.try_open(2).is_some());
    }
}
