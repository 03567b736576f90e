//! The clock that lease deadlines are measured on.
//!
//! `std::time::Instant` is CLOCK_MONOTONIC on Linux, which stops while the machine is suspended
//! or a VM is paused. Redis keeps counting a key's TTL through that time, so a holder reading a
//! monotonic clock would believe its lease still runs after resuming, long after the key
//! expired and another instance took it. CLOCK_BOOTTIME counts suspended time too; every lease
//! deadline is read from it. Elsewhere (not Linux) the monotonic clock is all there is.

use std::time::Duration;

/// A point on the lease clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> BootInstant {
        BootInstant(since_boot())
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    pub fn elapsed(self) -> Duration {
        BootInstant::now().saturating_duration_since(self)
    }

    /// As milliseconds since an arbitrary origin (boot), for storing in an atomic.
    pub fn as_millis(self) -> u64 {
        self.0.as_millis() as u64
    }

    pub fn from_millis(ms: u64) -> BootInstant {
        BootInstant(Duration::from_millis(ms))
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

impl std::ops::Sub<Duration> for BootInstant {
    type Output = BootInstant;
    fn sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(d))
    }
}

#[cfg(target_os = "linux")]
fn since_boot() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into; CLOCK_BOOTTIME exists since Linux 2.6.39
    // and the call cannot fail with a valid clock id and pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(not(target_os = "linux"))]
fn since_boot() -> Duration {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Set in the child that runs inside a time namespace (see below).
    const PROBE: &str = "MESSAGE_DISPATCHER_CLOCK_PROBE";

    /// Prints the lease clock and the monotonic clock when run as the probe child.
    #[test]
    fn clock_probe() {
        if std::env::var_os(PROBE).is_none() {
            return;
        }
        let mut mono = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut mono) };
        println!(
            "PROBE lease={} monotonic={}",
            BootInstant::now().0.as_secs(),
            mono.tv_sec
        );
    }

    /// A suspended machine cannot be made here, but a time namespace can give CLOCK_BOOTTIME
    /// an offset of a day over CLOCK_MONOTONIC, as a day of suspend would: the lease clock must
    /// be the one that shows it.
    #[test]
    fn lease_clock_counts_suspended_time() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("unshare")
            .args(["--time", "--boottime", "86400", "--"])
            .arg(exe)
            .args(["clock::tests::clock_probe", "--exact", "--nocapture"])
            .env(PROBE, "1")
            .output()
            .expect("unshare (util-linux) runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "unshare --time failed (time namespaces need Linux 5.6 and root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("PROBE "))
            .unwrap_or_else(|| panic!("no probe line in {stdout}"));
        let value = |name: &str| -> i64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .unwrap()
                .parse()
                .unwrap()
        };
        let ahead = value("lease") - value("monotonic");
        assert!(
            (86_000..87_000).contains(&ahead),
            "the lease clock is {ahead} s ahead of the monotonic one, not a day: {line}"
        );
    }

    #[test]
    fn arithmetic() {
        let t = BootInstant::from_millis(1_000);
        assert_eq!((t + Duration::from_millis(500)).as_millis(), 1_500);
        assert_eq!((t - Duration::from_secs(5)).as_millis(), 0);
        assert_eq!(
            t.saturating_duration_since(t + Duration::from_secs(1)),
            Duration::ZERO
        );
        assert!(BootInstant::now() > t);
    }
}
