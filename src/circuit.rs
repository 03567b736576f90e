//! What the receiver's health lets us send: a circuit breaker and the receiver's "slow down".
//!
//! Real receivers (SMS providers) have outages and per-second limits. Retrying every message
//! through an outage only spends their attempts until they all end `failed`. So after
//! WEBHOOK_CIRCUIT_THRESHOLD transient failures in a row, across messages, the circuit opens:
//! nothing more is claimed, claimed messages go back unsent (no attempt spent), and one probe
//! request at a time, at growing intervals, finds out when the receiver is back. A 429, or a
//! 503 with `Retry-After`, pauses all sending until then, not just the one message. Only the
//! leader sends, so both hold cluster-wide; a new leader starts closed and finds out by itself.
//!
//! Workers ask [`Circuit::admit`] before each request and [`Circuit::report`] after it; the
//! scheduler asks [`Circuit::claims_allowed`] before claiming. The closed, unpaused path is two
//! atomic loads.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// The first pause between probes; it doubles after each failed probe, up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(30);
/// A 429 without `Retry-After` pauses sending this long.
pub const SLOW_DOWN_DEFAULT: Duration = Duration::from_secs(1);

/// What one answer says about the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// It answered as a working receiver does (2xx, or a 4xx about the message itself).
    Working,
    /// Connection error, timeout, 5xx, 408 or a redirect.
    Trouble,
    /// 429, or 503 with `Retry-After`: send nothing for this long (None: not said).
    SlowDown(Option<Duration>),
}

/// Whether a worker may make its request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// The one request that tests an open circuit.
    Probe,
    /// Give the message back unsent.
    Hold,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    /// A probe is out.
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

pub struct Circuit {
    threshold: u32,
    retry_max: Duration,
    origin: Instant,
    /// Fast path: true while not closed.
    tripped: AtomicBool,
    /// Transient failures in a row while closed.
    failures: AtomicU32,
    /// Milliseconds after `origin` until which nothing is sent; 0 = no pause.
    paused_until_ms: AtomicU64,
    inner: Mutex<Inner>,
    metrics: std::sync::Arc<Metrics>,
}

struct Inner {
    state: State,
    next_probe: Instant,
    probe_every: Duration,
}

impl Circuit {
    pub fn new(threshold: u32, retry_max: Duration, metrics: std::sync::Arc<Metrics>) -> Circuit {
        let now = Instant::now();
        Circuit {
            threshold,
            retry_max,
            origin: now,
            tripped: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            paused_until_ms: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                state: State::Closed,
                next_probe: now,
                probe_every: PROBE_FIRST,
            }),
            metrics,
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        if !self.tripped.load(Ordering::Acquire) {
            return State::Closed;
        }
        self.inner().state
    }

    /// Until when the receiver asked us to send nothing, if that is still ahead.
    pub fn paused_until(&self) -> Option<Instant> {
        let ms = self.paused_until_ms.load(Ordering::Acquire);
        let until = self.origin + Duration::from_millis(ms);
        (ms != 0 && until > Instant::now()).then_some(until)
    }

    /// Before a request.
    pub fn admit(&self) -> Admission {
        if self.paused_until().is_some() {
            return Admission::Hold;
        }
        if !self.tripped.load(Ordering::Acquire) {
            return Admission::Go;
        }
        let mut inner = self.inner();
        match inner.state {
            State::Closed => Admission::Go,
            State::Open if Instant::now() >= inner.next_probe => {
                inner.state = State::HalfOpen;
                self.metrics.set_circuit(State::HalfOpen);
                Admission::Probe
            }
            State::Open | State::HalfOpen => Admission::Hold,
        }
    }

    /// After a request, with what its answer said; `error` names the trouble for the log.
    pub fn report(&self, admission: &Admission, health: Health, error: &str) {
        match health {
            Health::Working => {
                if self.tripped.load(Ordering::Acquire) {
                    self.close();
                } else if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
            }
            Health::SlowDown(asked) => {
                let pause = asked.unwrap_or(SLOW_DOWN_DEFAULT).min(self.retry_max);
                self.pause_for(pause);
                // It answered: whatever was wrong before is over.
                if self.tripped.load(Ordering::Acquire) {
                    self.close();
                }
            }
            Health::Trouble => self.trouble(admission, error),
        }
    }

    /// An admitted request that was not made after all (the lease ran short): a probe goes
    /// back so that the next request can be one.
    pub fn cancel(&self, admission: &Admission) {
        if *admission != Admission::Probe {
            return;
        }
        let mut inner = self.inner();
        if inner.state == State::HalfOpen {
            inner.state = State::Open;
            self.metrics.set_circuit(State::Open);
        }
    }

    fn trouble(&self, admission: &Admission, error: &str) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.threshold && *admission == Admission::Go {
            return;
        }
        let mut inner = self.inner();
        let now = Instant::now();
        match (inner.state, admission) {
            (State::HalfOpen, Admission::Probe) => {
                inner.probe_every = (inner.probe_every * 2).min(PROBE_MAX);
                inner.next_probe = now + inner.probe_every;
                inner.state = State::Open;
                self.metrics.set_circuit(State::Open);
                log::warn!(
                    error = error, next_probe_in = crate::config::fmt_duration(inner.probe_every).as_str();
                    "Webhook probe failed, circuit stays open"
                );
            }
            (State::Closed, _) => {
                inner.state = State::Open;
                inner.probe_every = PROBE_FIRST;
                inner.next_probe = now + PROBE_FIRST;
                self.tripped.store(true, Ordering::Release);
                self.metrics.set_circuit(State::Open);
                self.metrics.circuit_opened.inc();
                log::warn!(failures = failures, error = error; "Webhook circuit opened");
            }
            // A request that started before the circuit opened: it changes nothing.
            _ => {}
        }
    }

    fn close(&self) {
        let mut inner = self.inner();
        if inner.state == State::Closed {
            return;
        }
        inner.state = State::Closed;
        self.failures.store(0, Ordering::Relaxed);
        inner.probe_every = PROBE_FIRST;
        self.tripped.store(false, Ordering::Release);
        self.metrics.set_circuit(State::Closed);
        log::info!("Webhook circuit closed");
    }

    fn pause_for(&self, pause: Duration) {
        let until = (Instant::now() + pause)
            .duration_since(self.origin)
            .as_millis() as u64;
        let before = self.paused_until_ms.fetch_max(until, Ordering::AcqRel);
        if before < until && self.paused_until().is_some() {
            self.metrics.slow_downs.inc();
            log::warn!(pause = crate::config::fmt_duration(pause).as_str(); "Webhook asked to slow down, pausing sending");
        }
    }

    /// Whether the scheduler may claim now, how many, and else when to look again.
    pub fn claims_allowed(&self, batch_size: u32) -> Result<u32, Instant> {
        if let Some(until) = self.paused_until() {
            return Err(until);
        }
        if !self.tripped.load(Ordering::Acquire) {
            return Ok(batch_size);
        }
        let inner = self.inner();
        match inner.state {
            State::Closed => Ok(batch_size),
            State::Open if Instant::now() >= inner.next_probe => Ok(1),
            State::Open => Err(inner.next_probe),
            // The probe's outcome will wake us.
            State::HalfOpen => Err(Instant::now() + PROBE_MAX),
        }
    }

    /// A new leadership starts with a closed circuit and no pause: it finds out by itself.
    pub fn reset(&self) {
        self.paused_until_ms.store(0, Ordering::Release);
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit(threshold: u32) -> Circuit {
        Circuit::new(
            threshold,
            Duration::from_secs(600),
            std::sync::Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn opens_after_the_threshold_of_failures_in_a_row() {
        let c = circuit(3);
        for _ in 0..2 {
            assert_eq!(c.admit(), Admission::Go);
            c.report(&Admission::Go, Health::Trouble, "boom");
        }
        // A success in between starts the count again.
        c.report(&Admission::Go, Health::Working, "");
        for _ in 0..2 {
            c.report(&Admission::Go, Health::Trouble, "boom");
        }
        assert_eq!(c.state(), State::Closed);
        c.report(&Admission::Go, Health::Trouble, "boom");
        assert_eq!(c.state(), State::Open);
        assert_eq!(c.admit(), Admission::Hold);
        assert!(c.claims_allowed(10).is_err());
    }

    #[test]
    fn one_probe_at_a_time_and_a_success_closes() {
        let c = circuit(1);
        c.report(&Admission::Go, Health::Trouble, "down");
        {
            let mut inner = c.inner();
            inner.next_probe = Instant::now();
        }
        assert_eq!(c.claims_allowed(10), Ok(1));
        assert_eq!(c.admit(), Admission::Probe);
        assert_eq!(c.state(), State::HalfOpen);
        assert_eq!(c.admit(), Admission::Hold, "only one probe");
        c.report(&Admission::Probe, Health::Working, "");
        assert_eq!(c.state(), State::Closed);
        assert_eq!(c.claims_allowed(10), Ok(10));
    }

    #[test]
    fn a_failed_probe_doubles_the_wait_up_to_the_cap() {
        let c = circuit(1);
        c.report(&Admission::Go, Health::Trouble, "down");
        let mut waits = Vec::new();
        for _ in 0..8 {
            c.inner().next_probe = Instant::now();
            assert_eq!(c.admit(), Admission::Probe);
            c.report(&Admission::Probe, Health::Trouble, "still down");
            waits.push(c.inner().probe_every.as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 30, 30, 30, 30]);
        assert_eq!(c.state(), State::Open);
    }

    #[test]
    fn a_probe_not_made_lets_the_next_request_probe() {
        let c = circuit(1);
        c.report(&Admission::Go, Health::Trouble, "down");
        c.inner().next_probe = Instant::now();
        let probe = c.admit();
        assert_eq!(probe, Admission::Probe);
        c.cancel(&probe);
        assert_eq!(c.admit(), Admission::Probe);
    }

    #[test]
    fn slow_down_pauses_everything_until_then() {
        let c = circuit(5);
        c.report(
            &Admission::Go,
            Health::SlowDown(Some(Duration::from_secs(2))),
            "HTTP 429",
        );
        assert_eq!(c.admit(), Admission::Hold);
        let until = c.claims_allowed(10).unwrap_err();
        let left = until - Instant::now();
        assert!(left > Duration::from_millis(1500) && left <= Duration::from_secs(2));
        // A shorter pause asked later does not shorten it.
        c.report(&Admission::Go, Health::SlowDown(None), "HTTP 429");
        assert!(c.paused_until().unwrap() >= until);
    }

    #[test]
    fn a_pause_is_capped_by_the_longest_retry_delay() {
        let c = Circuit::new(
            5,
            Duration::from_secs(3),
            std::sync::Arc::new(Metrics::new()),
        );
        c.report(
            &Admission::Go,
            Health::SlowDown(Some(Duration::from_secs(3600))),
            "HTTP 429",
        );
        assert!(c.paused_until().unwrap() <= Instant::now() + Duration::from_secs(3));
    }

    #[test]
    fn reset_closes_and_unpauses() {
        let c = circuit(1);
        c.report(&Admission::Go, Health::Trouble, "down");
        c.report(&Admission::Go, Health::SlowDown(None), "HTTP 429");
        c.reset();
        assert_eq!(c.state(), State::Closed);
        assert_eq!(c.admit(), Admission::Go);
    }
}
