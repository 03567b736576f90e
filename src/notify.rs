//! The systemd notify protocol (`Type=notify`): READY=1 once /health serves, STOPPING=1 when the
//! shutdown starts, WATCHDOG=1 from the scheduler loop when `WatchdogSec` is set. Without
//! `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("dispatching")]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to pet the watchdog: half its timeout, as systemd recommends.
pub fn watchdog_period() -> Option<Duration> {
    watchdog_timeout().map(|timeout| timeout / 2)
}

/// `WatchdogSec=` as systemd passes it (`WATCHDOG_USEC`, for this process), if set.
pub fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|t| !t.is_zero())
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        log::warn!(error = e.to_string().as_str(); "Cannot notify systemd");
    }
}
