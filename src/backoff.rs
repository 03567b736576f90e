//! Exponential backoff with jitter, for webhook retries and for reconnecting to PostgreSQL and
//! Redis, so that many messages (or instances) failing together do not retry in lock step.

use std::time::Duration;

use rand::Rng;

/// The delay before retry number `attempt` (1 = the first retry): `base · 2^(attempt-1)`,
/// capped at `max`, then "equal jitter": a random point in the upper half of that delay, so the
/// delay still grows but two failures never line up.
pub fn delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let full = base.saturating_mul(1u32 << exp.min(31)).min(max);
    let half = full / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

/// Reconnect pacing: grows on each failure, resets on success.
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            failures: 0,
        }
    }

    /// Records a failure; returns how long to wait before trying again.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        delay(self.base, self.max, self.failures)
    }

    pub fn succeed(&mut self) {
        self.failures = 0;
    }

    pub fn failing(&self) -> bool {
        self.failures > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_within_jitter_bounds() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(600);
        for attempt in 1..=8 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..200 {
                let d = delay(base, max, attempt);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn delay_is_capped() {
        let max = Duration::from_secs(10);
        for attempt in [5, 10, 31, 32, 1000, u32::MAX] {
            let d = delay(Duration::from_secs(1), max, attempt);
            assert!(d <= max && d >= max / 2, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn jitter_spreads_retries() {
        let samples: std::collections::HashSet<Duration> = (0..50)
            .map(|_| delay(Duration::from_secs(1), Duration::from_secs(60), 4))
            .collect();
        assert!(samples.len() > 10);
    }

    #[test]
    fn backoff_grows_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        assert!(!b.failing());
        let first = b.fail();
        assert!(first <= Duration::from_millis(100));
        for _ in 0..10 {
            b.fail();
        }
        assert!(b.fail() >= Duration::from_millis(2500));
        b.succeed();
        assert!(!b.failing());
        assert!(b.fail() <= Duration::from_millis(100));
    }
}
