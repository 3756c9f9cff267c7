use std::time::Duration;

/// Capped exponential backoff with full jitter: the n-th wait is random in
/// `[0, min(cap, base * 2^n)]`, so many ztunnels losing the control plane at
/// once do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling
            .mul_f64(rand::random::<f64>())
            .max(Duration::from_millis(10))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..30 {
            assert!(backoff.next_delay() <= Duration::from_secs(5));
        }
        assert!(backoff.attempt > 20);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn a_ztunnel_resubscribes_within_two_seconds_of_the_control_plane_returning() {
        // However long the control plane was away, the next attempt comes
        // within the cap (the attempt itself then takes a round trip).
        let mut backoff = Backoff::new(Duration::from_millis(100), crate::discovery::RECONNECT_CAP);
        for _ in 0..1000 {
            assert!(backoff.next_delay() <= crate::discovery::RECONNECT_CAP);
        }
        assert!(crate::discovery::RECONNECT_CAP < Duration::from_secs(2));
    }
}
