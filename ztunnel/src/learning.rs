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
    /// Asks for `key`, unless it is asked already.
    pub fn ask(&self, key: String) {
        if self.lock_pending().insert(key.clone()) {
            // Err only once the receiver is dropped: no stream will ever
            // ask, and the waiter's bound refuses the connection.
            let _ = self.queue.send(key);
        }
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
