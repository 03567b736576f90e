//! Continuous mode (PROCESSING_INTERVAL=0) and batching: LISTEN/NOTIFY wake-ups, a listener
//! that dies, the configured rate with an interval, and mixed outcomes recorded in one batch.

mod common;

use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(30);

#[test]
fn a_message_inserted_while_idle_goes_out_without_waiting() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let daemon = Daemon::start(&continuous_env(&db, &receiver.url()));
    db.wait_listening();

    // Idle: with nothing due, the scheduler sleeps up to a minute unless NOTIFY wakes it.
    for round in 1..=3 {
        let started = std::time::Instant::now();
        db.insert(1);
        wait_until(Duration::from_secs(10), "delivery after NOTIFY", || {
            db.count("sent") == round
        });
        eprintln!("round {round}: insert → sent in {:?}", started.elapsed());
    }
    assert_eq!(receiver.count(), 3);
    assert!(daemon
        .log_lines("Lost the LISTEN connection, reconnecting; polling meanwhile")
        .is_empty());
}

#[test]
fn a_terminated_listener_is_noticed_and_nothing_waits() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let daemon = Daemon::start(&continuous_env(&db, &receiver.url()));
    db.wait_listening();

    let killed: i64 = db
        .client()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE '%/listener'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    // Inserted while nobody listens: the poll fallback or the reconnect's wake-up sends it.
    db.insert(1);
    wait_until(
        Duration::from_secs(10),
        "delivery without the listener",
        || db.count("sent") == 1,
    );
    daemon.wait_log(
        "Lost the LISTEN connection, reconnecting; polling meanwhile",
        LONG,
    );
    db.wait_listening();
    db.insert(1);
    wait_until(
        Duration::from_secs(10),
        "delivery after the listener is back",
        || db.count("sent") == 2,
    );
}

#[test]
fn a_backlog_drains_back_to_back() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    db.insert(300);
    let mut env = continuous_env(&db, &receiver.url());
    set(&mut env, "BATCH_SIZE", "25");
    let daemon = Daemon::start(&env);
    wait_until(LONG, "the backlog drained", || db.count("sent") == 300);
    assert_eq!(receiver.keys().len(), 300);
    assert!(receiver.keys().values().all(|&n| n == 1));
    let batches = daemon.log_lines("Message batch processed");
    assert!(batches.len() >= 12, "{}", batches.len());
    assert!(batches.iter().all(|b| b["sent"].as_u64().unwrap() <= 25));
}

#[test]
fn with_an_interval_inserts_do_not_raise_the_rate() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "PROCESSING_INTERVAL", "1s");
    set(&mut env, "BATCH_SIZE", "2");
    let daemon = Daemon::start(&env);
    // Inserts in quick succession (each NOTIFYs): still 2 per interval.
    for _ in 0..8 {
        db.insert(1);
    }
    wait_until(LONG, "all sent", || db.count("sent") == 8);
    let batches = daemon.log_lines("Message batch processed");
    assert!(
        batches.iter().all(|b| b["sent"].as_u64().unwrap() <= 2),
        "{batches:?}"
    );
    // 8 messages at 2 per second: the first and last request are at least 3 intervals apart.
    let seen = receiver.seen();
    let first = seen.iter().map(|s| s.at).min().unwrap();
    let last = seen.iter().map(|s| s.at).max().unwrap();
    assert!(
        last - first >= Duration::from_millis(2900),
        "{:?} {:?} {:?}",
        last - first,
        seen.iter().map(|s| s.at - first).collect::<Vec<_>>(),
        batches
    );
    let mut times: Vec<_> = seen.iter().map(|s| s.at).collect();
    times.sort();
    for window in times.windows(3) {
        assert!(
            window[2] - window[0] >= Duration::from_millis(900),
            "3 requests within one interval"
        );
    }
}

#[test]
fn one_batch_records_mixed_outcomes() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let ids = db.insert(9);
    let base = ids[0];
    receiver.respond_with(move |seen, _| match (seen.key() - base) % 3 {
        0 => Answer::accepted(),
        1 => Answer::status(503),
        _ => Answer::status(422),
    });
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "BATCH_SIZE", "9");
    set(&mut env, "PROCESSING_INTERVAL", "1h");
    set(&mut env, "RETRY_BASE_DELAY", "1m");
    set(&mut env, "RETRY_MAX_DELAY", "10m");
    let daemon = Daemon::start(&env);
    daemon.wait_log("Message batch processed", LONG);

    let batch = &daemon.log_lines("Message batch processed")[0];
    assert_eq!(
        (
            batch["sent"].as_u64(),
            batch["retried"].as_u64(),
            batch["failed"].as_u64()
        ),
        (Some(3), Some(3), Some(3))
    );
    for (i, id) in ids.iter().enumerate() {
        let (status, attempts, error, remote) = db.row(*id);
        assert_eq!(attempts, 1, "message {id}");
        match i % 3 {
            0 => assert_eq!(
                (status.as_str(), remote.as_deref()),
                ("sent", Some("remote-1"))
            ),
            1 => assert_eq!(
                (status.as_str(), error.as_deref()),
                ("pending", Some("HTTP 503"))
            ),
            _ => assert_eq!(
                (status.as_str(), error.as_deref()),
                ("failed", Some("HTTP 422"))
            ),
        }
    }
    let retry_later: bool = db
        .client()
        .query_one(
            "SELECT bool_and(next_attempt_at > now()) FROM messages WHERE status = 'pending'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(retry_later, "retries are scheduled in the future");
}
