//! What an on-demand ztunnel has asked the control plane and not yet been
//! told: the queue between the connections that need an address and the
//! discovery stream that asks for it.
//!
//! A key (an IP in textual form, or `workload/<uid>`) is asked once however
//! many connections wait for it, and asked again on every new stream until
//! an answer names it: a control plane that went away mid-question is
//! asked again by its successor.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::mpsc;

/// Questions outstanding at most: a pod that connects to address after
/// address (a scan) fills this, and its connections to unknown addresses
/// are then refused until answers come, instead of growing memory.
pub const MAX_PENDING: usize = 4096;

/// Keys per `learn` request: well under the 64 KiB a control plane
/// accepts from a ztunnel in one message.
pub const MAX_PER_REQUEST: usize = 512;

pub struct Learning {
    queue: mpsc::UnboundedSender<String>,
    /// Taken by the discovery client, once.
    requests: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    pending: Mutex<HashSet<String>>,
}

impl Default for Learning {
    fn default() -> Self {
        let (queue, requests) = mpsc::unbounded_channel();
        Learning {
            queue,
            requests: Mutex::new(Some(requests)),
            pending: Mutex::new(HashSet::new()),
        }
    }
}

impl Learning {
    /// Asks for `key`, unless it is asked already. False when too many
    /// questions are outstanding ([`MAX_PENDING`]): not asked.
    pub fn ask(&self, key: String) -> bool {
        let mut pending = self.lock_pending();
        if pending.contains(&key) {
            return true;
        }
        if pending.len() >= MAX_PENDING {
            return false;
        }
        pending.insert(key.clone());
        // Err only once the receiver is dropped: no stream will ever ask,
        // and the waiter's bound refuses the connection.
        let _ = self.queue.send(key);
        true
    }

    /// `keys` were answered.
    pub fn answered(&self, keys: &[String]) {
        let mut pending = self.lock_pending();
        for key in keys {
            pending.remove(key);
        }
    }

    /// What was asked and not answered (to ask again on a new stream).
    pub fn pending(&self) -> Vec<String> {
        self.lock_pending().iter().cloned().collect()
    }

    /// The questions, for the discovery client: `None` after the first
    /// call.
    pub fn take_requests(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A set of strings is whole after any panic.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_are_asked_once_and_bounded() {
        let learning = Learning::default();
        let mut requests = learning.take_requests().unwrap();
        assert!(learning.take_requests().is_none(), "taken once");
        assert!(learning.ask("10.0.0.1".into()));
        assert!(learning.ask("10.0.0.1".into()), "already asked");
        assert_eq!(requests.try_recv().unwrap(), "10.0.0.1");
        assert!(requests.try_recv().is_err(), "asked once");
        for i in 1..MAX_PENDING {
            assert!(learning.ask(format!("key-{i}")));
        }
        assert!(!learning.ask("one-too-many".into()), "bounded");
        learning.answered(&["10.0.0.1".to_string()]);
        assert!(learning.ask("one-too-many".into()), "room again");
        assert_eq!(learning.pending().len(), MAX_PENDING);
    }
}
