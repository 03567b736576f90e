//! What the scheduler knows that `/health` reports: shared flags, written by one thread and read
//! by the HTTP handlers without locks.

use std::sync::atomic::AtomicBool;

pub struct Status {
    pub instance_id: String,
    pub lock_enabled: bool,
    pub lock_held: AtomicBool,
    /// The scheduler's last view of Redis (true when the lease is off).
    pub redis_ok: AtomicBool,
    /// The last known value of the cluster-wide processing switch.
    pub processing_enabled: AtomicBool,
}

impl Status {
    pub fn new(instance_id: &str, lock_enabled: bool) -> Status {
        Status {
            instance_id: instance_id.to_owned(),
            lock_enabled,
            lock_held: AtomicBool::new(false),
            redis_ok: AtomicBool::new(true),
            processing_enabled: AtomicBool::new(true),
        }
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
