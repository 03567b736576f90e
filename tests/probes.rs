//! The probes: `/livez` reflects only whether the process works (its scheduler loop makes
//! progress), `/readyz` whether its dependencies answer. A database or Redis outage makes an
//! instance unready, never dead (Kubernetes must not restart every replica while PostgreSQL is
//! down); a stuck scheduler makes it dead while everything else still answers.
//!
//! The liveness timeout is the systemd watchdog's: the tests shorten it with `WATCHDOG_USEC`,
//! as systemd would pass it, so a few seconds show what takes a minute by default.

mod common;

use std::time::{Duration, Instant};

use common::servers::*;
use common::*;

const LONG: Duration = Duration::from_secs(30);
/// The liveness timeout the tests give the daemon (WatchdogSec=3s).
const TIMEOUT: Duration = Duration::from_secs(3);

fn probe(daemon: &Daemon, path: &str) -> Option<(u16, serde_json::Value)> {
    get(&format!("http://127.0.0.1:{}{path}", daemon.port))
}

fn code(daemon: &Daemon, path: &str) -> Option<u16> {
    probe(daemon, path).map(|(c, _)| c)
}

fn short_watchdog(env: &mut Vec<(String, String)>) {
    set(env, "WATCHDOG_USEC", &TIMEOUT.as_micros().to_string());
}

/// Polls `/livez` for `how_long` and panics at the first answer that is not 200.
fn always_live(daemon: &Daemon, how_long: Duration) {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        let answer = probe(daemon, "/livez");
        assert!(
            matches!(answer, Some((200, _))),
            "/livez must stay 200 during an outage, got {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn probes_answer_with_their_documented_bodies() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    let (status, live) = probe(&daemon, "/livez").unwrap();
    assert_eq!(status, 200, "{live}");
    assert_eq!(live["status"], "live");
    assert_eq!(live["timeout_ms"], 60_000, "the default without a watchdog");
    assert!(live["last_progress_ms"].as_u64().unwrap() < 60_000);
    let (status, ready) = probe(&daemon, "/readyz").unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["dependencies"]["database"], "healthy");
    assert_eq!(ready["dependencies"]["redis"], "disabled");

    // The healthcheck subcommand knows each probe.
    let port = [("SERVER_PORT".to_string(), daemon.port.to_string())];
    for probe in ["live", "ready", "health"] {
        let out = run(DISPATCHER, &["healthcheck", probe], &port);
        assert!(out.status.success(), "healthcheck {probe}: {out:?}");
    }
    let out = run(DISPATCHER, &["healthcheck", "sideways"], &port);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown probe is a usage error"
    );
}

#[test]
fn a_database_outage_flips_readiness_never_liveness() {
    let Some(pg) = PrivatePg::start() else {
        return;
    };
    let url = pg.create_migrated("postgres");
    let receiver = Receiver::start();
    let mut env = env_for_url(&url, &receiver.url());
    short_watchdog(&mut env);
    let daemon = Daemon::start(&env);
    wait_until(LONG, "ready", || code(&daemon, "/readyz") == Some(200));

    pg.stop_server();
    wait_until(LONG, "/readyz 503 while PostgreSQL is down", || {
        code(&daemon, "/readyz") == Some(503)
    });
    let (_, ready) = probe(&daemon, "/readyz").unwrap();
    assert_eq!(ready["status"], "not ready");
    assert_eq!(ready["dependencies"]["database"], "unhealthy");
    assert_eq!(code(&daemon, "/health"), Some(503));
    // Three liveness timeouts of outage: never once dead.
    always_live(&daemon, 3 * TIMEOUT);

    pg.start_server();
    wait_until(LONG, "/readyz 200 once PostgreSQL is back", || {
        code(&daemon, "/readyz") == Some(200)
    });
    assert_eq!(code(&daemon, "/livez"), Some(200));
}

#[test]
fn a_redis_outage_under_the_lease_flips_readiness_never_liveness() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    short_watchdog(&mut env);
    set(&mut env, "REDIS_URL", &redis.url());
    set(&mut env, "DISTRIBUTED_LOCK_ENABLED", "true");
    set(&mut env, "DISTRIBUTED_LOCK_TTL", "10s");
    set(&mut env, "DISTRIBUTED_LOCK_KEY", &unique("md:probes:lock"));
    let daemon = Daemon::start(&env);
    wait_until(LONG, "ready", || code(&daemon, "/readyz") == Some(200));

    redis.stop();
    wait_until(LONG, "/readyz 503 while Redis is down", || {
        code(&daemon, "/readyz") == Some(503)
    });
    let (_, ready) = probe(&daemon, "/readyz").unwrap();
    assert_eq!(ready["dependencies"]["redis"], "unhealthy");
    always_live(&daemon, 3 * TIMEOUT);

    redis.restart().unwrap();
    wait_until(LONG, "/readyz 200 once Redis is back", || {
        code(&daemon, "/readyz") == Some(200)
    });
}

/// The thread id of the daemon's thread named `name`.
fn thread_named(pid: u32, name: &str) -> i32 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return task.file_name().unwrap().to_str().unwrap().parse().unwrap();
        }
    }
    panic!("no thread named {name} in process {pid}");
}

/// Stops one thread of another process (ptrace's group-stop-free interrupt): the rest of the
/// process runs on. Resumed by `thaw` or when this (tracer) thread ends.
struct Frozen(i32);

impl Frozen {
    fn freeze(tid: i32) -> Frozen {
        // SAFETY: plain ptrace/waitpid system calls on a thread id; no memory is shared.
        unsafe {
            let null = std::ptr::null_mut::<libc::c_void>();
            let r = libc::ptrace(libc::PTRACE_SEIZE, tid, null, null);
            assert_eq!(r, 0, "PTRACE_SEIZE: {}", std::io::Error::last_os_error());
            let r = libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null);
            assert_eq!(
                r,
                0,
                "PTRACE_INTERRUPT: {}",
                std::io::Error::last_os_error()
            );
            let mut status = 0;
            let r = libc::waitpid(tid, &mut status, libc::__WALL);
            assert_eq!(r, tid, "waitpid: {}", std::io::Error::last_os_error());
        }
        Frozen(tid)
    }

    fn thaw(self) {
        // Drop detaches.
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            let null = std::ptr::null_mut::<libc::c_void>();
            libc::ptrace(libc::PTRACE_DETACH, self.0, null, null);
        }
    }
}

#[test]
fn a_stuck_scheduler_flips_liveness_not_readiness() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    short_watchdog(&mut env);
    // A long interval: the scheduler's only reason to wake is the liveness beat.
    set(&mut env, "PROCESSING_INTERVAL", "1h");
    let daemon = Daemon::start(&env);
    // Idle for over a timeout: the beat keeps it live however long the interval.
    always_live(&daemon, TIMEOUT + TIMEOUT / 2);

    let scheduler = Frozen::freeze(thread_named(daemon.pid(), "scheduler"));
    let frozen_at = Instant::now();
    wait_until(LONG, "/livez 503 with the scheduler stuck", || {
        code(&daemon, "/livez") == Some(503)
    });
    // The last beat came at most half a timeout (the beat period) before the freeze.
    let took = frozen_at.elapsed();
    assert!(
        took >= TIMEOUT / 2 - Duration::from_millis(100) && took < TIMEOUT * 2,
        "dead after {took:?}, the timeout is {TIMEOUT:?}"
    );
    let (_, live) = probe(&daemon, "/livez").unwrap();
    assert_eq!(live["status"], "stalled");
    // Everything else still answers: it is the loop that is stuck, not the process.
    assert_eq!(code(&daemon, "/readyz"), Some(200));
    assert_eq!(code(&daemon, "/health"), Some(200));
    let port = [("SERVER_PORT".to_string(), daemon.port.to_string())];
    assert_eq!(
        run(DISPATCHER, &["healthcheck", "live"], &port)
            .status
            .code(),
        Some(1),
        "the image's HEALTHCHECK fails"
    );

    scheduler.thaw();
    wait_until(LONG, "/livez 200 once the scheduler runs again", || {
        code(&daemon, "/livez") == Some(200)
    });
}
