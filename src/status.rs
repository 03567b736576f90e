//! What the scheduler knows that `/health` reports: shared flags, written by one thread and read
//! by the HTTP handlers without locks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
        }
    }

    pub fn holds_lock(&self) -> bool {
        self.lock_enabled && self.lock_held.load(Ordering::Relaxed) && self.permit.allows()
    }
}

/// A name for this process that is unique across restarts: host name plus random suffix.
pub fn new_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "instance".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}
