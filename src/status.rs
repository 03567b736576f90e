//! What the scheduler knows that `/health`, `/readyz` and `/livez` report: shared flags, written
//! by one thread and read by the HTTP handlers without locks.
//!
//! # Liveness
//!
//! The scheduler calls [`Status::beat`] every turn and wakes at least every [`beat_period`], so
//! a scheduler that makes progress has always beaten within the last [`liveness_timeout`].
//! `/livez` answers 503 once it has not: the loop is stuck (a deadlock, a call that never
//! returns). It is the same signal as the systemd watchdog, with the same timeout when
//! `WatchdogSec=` is set — a process `/livez` calls dead is one systemd would restart. It never
//! looks at PostgreSQL or Redis: an outage of either makes the instance unready, not dead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::circuit::Circuit;
use crate::lease::Permit;

pub struct Status {
    pub instance_id: String,
    pub lock_enabled: bool,
    /// Set by the scheduler each turn; read through [`Status::holds_lock`].
    pub lock_held: AtomicBool,
    /// The workers' permit: checked too, so `/health` never says `held` once the lease may
    /// have expired, even before the scheduler has had its next turn (e.g. after a pause).
    permit: Arc<Permit>,
    /// The last known value of the cluster-wide processing switch.
    pub processing_enabled: AtomicBool,
    /// The webhook's circuit breaker, shown in `/health` without deciding its status: a down
    /// receiver must not get a healthy dispatcher restarted.
    pub circuit: Arc<Circuit>,
    /// What `last_beat` counts from.
    started: Instant,
    /// Milliseconds from `started` to the scheduler's last turn.
    last_beat: AtomicU64,
    liveness_timeout: Duration,
}

/// Without a systemd watchdog: how long the scheduler may go without a turn before `/livez`
/// calls it stuck. Its longest legitimate turn is a few database calls, each bounded by the
/// connect and statement timeouts, while PostgreSQL fails fast or is backed off.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest the scheduler may go without a turn: `WatchdogSec=` when systemd set one (so
/// `/livez` fails exactly when the watchdog would fire), else [`DEFAULT_LIVENESS_TIMEOUT`].
pub fn liveness_timeout() -> Duration {
    crate::notify::watchdog_timeout().unwrap_or(DEFAULT_LIVENESS_TIMEOUT)
}

/// How often the scheduler wakes at the latest, to pet the watchdog and beat: half the timeout,
/// as systemd recommends for its watchdog.
pub fn beat_period() -> Duration {
    liveness_timeout() / 2
}

impl Status {
    pub fn new(
        instance_id: &str,
        lock_enabled: bool,
        permit: Arc<Permit>,
        circuit: Arc<Circuit>,
    ) -> Status {
        Status {
            permit,
            circuit,
            instance_id: instance_id.to_owned(),
            lock_enabled,
            lock_held: AtomicBool::new(false),
            processing_enabled: AtomicBool::new(true),
            started: Instant::now(),
            last_beat: AtomicU64::new(0),
            liveness_timeout: liveness_timeout(),
        }
    }

    /// The scheduler made progress: called once per turn.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_beat.store(ms, Ordering::Relaxed);
    }

    /// How long ago the scheduler's last turn was (from start-up until its first).
    pub fn since_beat(&self) -> Duration {
        let now = self.started.elapsed();
        now.saturating_sub(Duration::from_millis(
            self.last_beat.load(Ordering::Relaxed),
        ))
    }

    /// False once the scheduler has gone [`liveness_timeout`] without a turn.
    pub fn live(&self) -> bool {
        self.since_beat() < self.liveness_timeout
    }

    pub fn liveness_timeout(&self) -> Duration {
        self.liveness_timeout
    }

    /// The scheduler sleeps at most this long between turns ([`beat_period`], cached).
    pub fn beat_period(&self) -> Duration {
        self.liveness_timeout / 2
    }

    pub fn holds_lock(&self) -> bool {
        self.lock_enabled && self.lock_held.load(Ordering::Relaxed) && self.permit.allows()
    }
}

/// A name for this process that is unique across restarts: host name plus random suffix.
/// `/etc/hostname` is the fallback where `/proc/sys` is hidden (the systemd unit's
/// `ProcSubset=pid`).
pub fn new_instance_id() -> String {
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|h| h.trim().to_owned())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "instance".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}
