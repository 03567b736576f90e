//! Several instances behind the Redis lease, for the high-availability and receiver tests: the
//! settings of an instance, one receiver path per instance (so the receiver can tell who sent
//! what), log timestamps, and whether a process is stopped.

use std::sync::{Mutex, MutexGuard};

use super::*;

/// Tests that measure take-overs and time-outs run one at a time in their file.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Settings for an instance behind the lease: short timings, its own lock key.
pub fn ha_env(database_url: &str, redis_url: &str, key: &str) -> Vec<(String, String)> {
    // Each instance gets its own WEBHOOK_URL from `start_instance`.
    let mut env = env_for_url(database_url, "");
    for (k, v) in [
        ("REDIS_URL", redis_url),
        ("DISTRIBUTED_LOCK_ENABLED", "true"),
        ("DISTRIBUTED_LOCK_KEY", key),
        ("DISTRIBUTED_LOCK_TTL", "3s"),
        ("MAX_PROCESSING_TIME", "1s"),
        ("WEBHOOK_TIMEOUT", "1s"),
        ("MAX_ATTEMPTS", "50"),
    ] {
        set(&mut env, k, v);
    }
    env
}

/// The receiver path instance `n` sends to.
pub fn path_of(n: usize) -> String {
    format!("/instance-{n}")
}

/// Starts instance `n`, sending to [`path_of`]`(n)` on the receiver, and waits for its /health.
pub fn start_instance(n: usize, env: &[(String, String)], receiver: &Receiver) -> Daemon {
    let mut env = env.to_vec();
    let url = format!("http://127.0.0.1:{}{}", receiver.port, path_of(n));
    set(&mut env, "WEBHOOK_URL", &url);
    let daemon = Daemon::spawn(&format!("instance-{n}"), &env);
    daemon.wait_healthy_or_degraded();
    daemon
}

/// A log line's `ts` (`2026-01-02T03:04:05.678Z`) in milliseconds since the Unix epoch.
pub fn log_time_ms(line: &serde_json::Value) -> i64 {
    let ts = line["ts"].as_str().unwrap();
    let num = |range: std::ops::Range<usize>| ts[range].parse::<i64>().unwrap();
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let ms_of_day = ((num(11..13) * 60 + num(14..16)) * 60 + num(17..19)) * 1000 + num(20..23);
    days * 86_400_000 + ms_of_day
}

/// Whether every thread of `pid` is stopped (SIGSTOP took effect).
pub fn stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    })
}
