//! The open-files limit. Every worker keeps a connection open, and systemd starts services with
//! a soft limit of 1,024: the daemon raises its soft limit to the hard one (as Go's runtime
//! does), and says so when even the hard limit is short of what WORKER_COUNT may need.
//!
//! Its own test binary: it lowers this process's limits, which every test in the same binary
//! would share.

mod common;

use std::time::Duration;

use common::*;

fn own_limit() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit
}

fn set_own_limit(soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

/// (soft, hard) "Max open files" of a running process.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

const WARNING: &str =
    "Open files limit is low for WORKER_COUNT: raise LimitNOFILE (systemd) or ulimit -n";

#[test]
fn the_soft_open_files_limit_is_raised_and_a_short_hard_limit_is_named() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();

    // A soft limit below the hard one, as under systemd: the daemon inherits it and raises it.
    let hard = own_limit().rlim_max;
    assert!(
        hard > 600,
        "this test needs a hard limit above 600, got {hard}"
    );
    set_own_limit(256, hard);
    let daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    assert_eq!(open_files_limit(daemon.pid()), (hard, hard));
    assert!(daemon.log_lines(WARNING).is_empty());
    drop(daemon);

    // A hard limit short of what 200 workers may need (2 connections each, and more): it
    // starts anyway, names the problem, and delivers.
    set_own_limit(300, 300);
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "WORKER_COUNT", "200");
    let daemon = Daemon::start(&env);
    daemon.wait_log(WARNING, Duration::from_secs(10));
    let warning = &daemon.log_lines(WARNING)[0];
    assert_eq!(
        (warning["limit"].as_u64(), warning["needed"].as_u64()),
        (Some(300), Some(464))
    );
    db.insert(5);
    wait_until(Duration::from_secs(30), "delivery", || {
        db.count("sent") == 5
    });
}
