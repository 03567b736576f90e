//! WEBHOOK_RATE_LIMIT: at most so many requests a second to the receiver, across all workers.
//!
//! Providers limit requests per second and answer 429 past it; staying under the limit beats
//! being told to slow down. This is a token bucket in its GCRA form (one "theoretical arrival
//! time" behind a mutex): each request reserves the next free slot and its worker sleeps until
//! then, so the limit holds exactly however many workers there are. The burst is small (a
//! twentieth of a second's worth), so no one-second window sees much more than the limit.
//! Unset, there is no limiter at all and workers pay nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::shutdown::Shutdown;

pub struct RateLimit {
    /// Time between two requests at the limit.
    interval: Duration,
    /// How far ahead of its slot a request may go: the burst.
    tolerance: Duration,
    /// When the next request would be due if requests came exactly at the limit.
    next: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(per_second: f64) -> RateLimit {
        let interval = Duration::from_secs_f64(1.0 / per_second);
        let burst = (per_second / 20.0).floor().max(1.0);
        RateLimit {
            interval,
            tolerance: interval.mul_f64(burst - 1.0),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Reserves the next slot and sleeps until it. Returns false, reserving nothing, when the
    /// slot would come after `not_after`; false too when the shutdown starts while it sleeps.
    pub fn wait(&self, not_after: Instant, shutdown: &Shutdown) -> bool {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let base = (*next).max(now);
            let slot = base.checked_sub(self.tolerance).unwrap_or(now).max(now);
            if slot > not_after {
                return false;
            }
            *next = base + self.interval;
            slot
        };
        let wait = slot.saturating_duration_since(Instant::now());
        wait.is_zero() || !shutdown.sleep(wait)
    }

    /// How many requests could still start before `horizon`, were they asked for now: the
    /// scheduler claims no more than that, so that claimed messages do not wait past their
    /// cycle for a slot and come back unsent, only to be claimed again.
    pub fn room_before(&self, horizon: Instant) -> u32 {
        let next = *self.next.lock().unwrap_or_else(|e| e.into_inner());
        let base = next.max(Instant::now());
        let Some(span) = (horizon + self.tolerance).checked_duration_since(base) else {
            return 0;
        };
        (span.as_secs_f64() / self.interval.as_secs_f64()).floor() as u32 + 1
    }

    /// The time between two requests at the limit.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_spaced_at_the_limit_after_the_burst() {
        let limit = RateLimit::new(100.0); // 10 ms apart, a burst of 5
        let start = Instant::now();
        let far = start + Duration::from_secs(10);
        for _ in 0..25 {
            assert!(limit.wait(far, &Shutdown::new()));
        }
        // 25 requests at 100/s with a burst of 5: the 25th no earlier than 200 ms in.
        assert!(start.elapsed() >= Duration::from_millis(195));
    }

    #[test]
    fn a_slot_past_the_deadline_is_not_taken() {
        let limit = RateLimit::new(1.0);
        let now = Instant::now();
        assert!(limit.wait(now + Duration::from_secs(5), &Shutdown::new()));
        assert!(!limit.wait(
            Instant::now() + Duration::from_millis(100),
            &Shutdown::new()
        ));
        // Nothing was reserved: the next slot is still one second after the first, not two.
        assert!(limit.wait(now + Duration::from_millis(1500), &Shutdown::new()));
    }

    #[test]
    fn room_counts_the_slots_before_a_horizon() {
        let limit = RateLimit::new(10.0); // 100 ms apart, burst 1
        let now = Instant::now();
        assert_eq!(limit.room_before(now + Duration::from_millis(450)), 5);
        assert!(limit.wait(now + Duration::from_secs(1), &Shutdown::new()));
        assert!(limit.room_before(now + Duration::from_millis(450)) <= 4);
        assert_eq!(limit.room_before(now - Duration::from_secs(1)), 0);
    }

    #[test]
    fn the_shutdown_ends_a_wait() {
        let limit = RateLimit::new(0.1);
        let shutdown = Shutdown::new();
        let far = Instant::now() + Duration::from_secs(60);
        assert!(limit.wait(far, &shutdown));
        shutdown.trigger();
        let started = Instant::now();
        assert!(!limit.wait(far, &shutdown), "the second slot is 10 s away");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn threads_share_the_limit() {
        let limit = std::sync::Arc::new(RateLimit::new(200.0)); // 5 ms apart, burst 10
        let start = Instant::now();
        let far = start + Duration::from_secs(10);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let limit = limit.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        assert!(limit.wait(far, &Shutdown::new()));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // 80 requests, 10 of them in the burst: 70 × 5 ms.
        assert!(start.elapsed() >= Duration::from_millis(340));
    }
}
