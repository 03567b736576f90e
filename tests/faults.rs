//! Odd answers and odd database states that once stalled or slowed a single instance: each test
//! injects exactly the fault a review found and checks the outcome in the database and at the
//! receiver.

mod common;

use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(30);

/// `{"messageId":"x\u0000y"}` on a 202, or a NUL byte in a 500's body, cannot be stored as
/// PostgreSQL text. Such an answer once made every outcome write of its batch fail forever,
/// leaving the whole batch `sending` and no claim running again.
#[test]
fn answers_with_nul_bytes_are_stored_and_stall_nothing() {
    let db = TestDb::migrated();
    let ids = db.insert(10);
    let (nul_id, nul_error) = (ids[2], ids[5]);
    let receiver = Receiver::start();
    receiver.respond_with(move |seen, before| match seen.key() {
        id if id == nul_id => Answer::status(202).body(r#"{"messageId":"x\u0000y"}"#),
        id if id == nul_error && before == 0 => Answer::status(500).body("bad\0byte"),
        _ => Answer::accepted(),
    });
    let _daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    wait_until(LONG, "every message sent", || db.count("sent") == 10);
    let (status, attempts, _, remote) = db.row(nul_id);
    assert_eq!(
        (status.as_str(), attempts, remote.as_deref()),
        ("sent", 1, Some("x\u{fffd}y"))
    );
    let (status, attempts, error, _) = db.row(nul_error);
    assert_eq!((status.as_str(), attempts), ("sent", 2));
    assert_eq!(error.as_deref(), Some("HTTP 500: bad\u{fffd}byte"));

    // More work after it goes out as usual.
    db.insert(5);
    wait_until(LONG, "the next messages sent", || db.count("sent") == 15);
}

/// An outcome PostgreSQL refuses for its data (here a constraint of the operator's own that one
/// receiver answer breaks) must not be retried forever: the rest of the batch is recorded, the
/// bad row is recorded without the receiver's text, and the real reason is logged.
#[test]
fn an_outcome_refused_for_its_data_is_isolated_and_the_rest_recorded() {
    let db = TestDb::migrated();
    db.client()
        .batch_execute(
            "ALTER TABLE messages ADD CONSTRAINT no_poison
             CHECK (remote_message_id IS DISTINCT FROM 'poison')",
        )
        .unwrap();
    let ids = db.insert(10);
    let poisoned = ids[3];
    let receiver = Receiver::start();
    receiver.respond_with(move |seen, _| {
        if seen.key() == poisoned {
            Answer::status(202).body(r#"{"messageId":"poison"}"#)
        } else {
            Answer::accepted()
        }
    });
    let daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    wait_until(LONG, "every message sent", || db.count("sent") == 10);
    assert_eq!(receiver.count(), 10, "nothing was sent twice");
    let (_, attempts, _, remote) = db.row(poisoned);
    assert_eq!((attempts, remote), (1, None));
    let refused = daemon
        .log_lines("Outcome cannot be stored as received; storing it without the receiver's text");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["id"], poisoned);
    assert!(
        refused[0]["error"].as_str().unwrap().contains("no_poison"),
        "the real reason is logged: {}",
        refused[0]
    );
    assert!(daemon.log_lines("Database unavailable").is_empty());
}

/// In continuous mode a retry must go out when it falls due (RETRY_BASE_DELAY 1s), not at the
/// next idle poll a minute later.
#[test]
fn continuous_mode_sends_a_retry_when_it_falls_due() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, before| {
        if before == 0 {
            Answer::status(500)
        } else {
            Answer::accepted()
        }
    });
    let mut env = continuous_env(&db, &receiver.url());
    set(&mut env, "RETRY_BASE_DELAY", "1s");
    set(&mut env, "RETRY_MAX_DELAY", "1s");
    let _daemon = Daemon::start(&env);
    db.insert(1);
    wait_until(LONG, "the retry delivered", || db.count("sent") == 1);
    let seen = receiver.seen();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    eprintln!("retry after {gap:?}");
    // The delay is 0.5–1 s with jitter; the idle poll would be 60 s.
    assert!(
        gap >= Duration::from_millis(500) && gap < Duration::from_secs(5),
        "the retry came {gap:?} after the first request"
    );
}

/// A row another instance left `sending` (it crashed) goes out as soon as it may be recovered
/// (MAX_PROCESSING_TIME + WEBHOOK_TIMEOUT after its claim), not at the next idle poll.
#[test]
fn continuous_mode_recovers_an_abandoned_row_when_it_may() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let mut env = continuous_env(&db, &receiver.url());
    set(&mut env, "MAX_PROCESSING_TIME", "1s");
    set(&mut env, "WEBHOOK_TIMEOUT", "1s");
    let daemon = Daemon::start(&env);
    // Let the daemon go idle first, with nothing due.
    db.wait_listening();
    let claimed = Instant::now();
    db.client()
        .execute(
            "INSERT INTO messages (recipient, content, status, attempts, claimed_by, claimed_at)
             VALUES ('+905550000000', 'abandoned', 'sending', 1, 'crashed-instance', now())",
            &[],
        )
        .unwrap();
    wait_until(LONG, "the abandoned message delivered", || {
        db.count("sent") == 1
    });
    let took = claimed.elapsed();
    eprintln!("abandoned row delivered {took:?} after its claim (recovery timeout 2s)");
    assert!(
        took >= Duration::from_secs(2),
        "not before it may: {took:?}"
    );
    assert!(
        took < Duration::from_secs(8),
        "not at the idle poll: {took:?}"
    );
    assert_eq!(
        daemon
            .log_lines("Recovered messages abandoned in sending state")
            .len(),
        1
    );
}

/// A due row locked by another transaction (an operator's open UPDATE) is skipped by the claim;
/// continuous mode must then wait, not claim again and again at full speed.
#[test]
fn continuous_mode_does_not_spin_on_a_locked_due_row() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let daemon = Daemon::start(&continuous_env(&db, &receiver.url()));
    let id = db.insert(1)[0];
    wait_until(LONG, "the first message sent", || db.count("sent") == 1);

    // Processing off while the row is inserted and locked, so the daemon cannot take it first.
    let switch = |on: bool| {
        db.client()
            .batch_execute(&format!(
                "UPDATE dispatcher_state SET processing_enabled = {on};
                 SELECT pg_notify('message_dispatcher', 'switch')"
            ))
            .unwrap()
    };
    switch(false);
    let locked = db.insert(1)[0];
    let mut operator = db.client();
    let mut tx = operator.transaction().unwrap();
    tx.execute(
        "SELECT 1 FROM messages WHERE id = $1 FOR UPDATE",
        &[&locked],
    )
    .unwrap();
    switch(true);
    // Give the daemon time to meet the locked row and settle into its pace.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(daemon.pid()) - before;
    // Claiming back to back burns ~50 ticks in 2 s here; waiting, a handful.
    assert!(used < 15, "{used} ticks in 2 s with a locked due row");
    tx.rollback().unwrap();
    wait_until(LONG, "the unlocked message sent", || db.count("sent") == 2);
    assert_eq!(receiver.keys().len(), 2);
    assert!(receiver.keys().contains_key(&id));
}

/// Every request becomes a row of attempt history, written with its batch's outcomes: number,
/// start, duration, status code or error, instance — matching what the receiver saw.
#[test]
fn attempt_history_matches_what_the_receiver_saw() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, before| match before {
        0 => Answer::status(500).body("boom"),
        1 => Answer::status(503).delay(Duration::from_millis(120)),
        _ => Answer::accepted(),
    });
    let ids = db.insert(3);
    let daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    wait_until(LONG, "every message sent", || db.count("sent") == 3);
    let (_, health) = daemon.health().unwrap();
    let instance = health["instance_id"].as_str().unwrap().to_owned();
    for id in ids {
        let rows = db
            .client()
            .query(
                "SELECT attempt, status_code, error, duration_ms, instance_id, epoch,
                        started_at <= now()
                 FROM message_attempts WHERE message_id = $1 ORDER BY attempt",
                &[&id],
            )
            .unwrap();
        let history: Vec<(i32, Option<i16>, Option<String>)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            history,
            [
                (1, Some(500), Some("HTTP 500: boom".to_owned())),
                (2, Some(503), Some("HTTP 503".to_owned())),
                (3, Some(202), None),
            ],
            "message {id}"
        );
        assert!(
            rows[1].get::<_, i32>(3) >= 120,
            "the slow answer's duration"
        );
        for r in &rows {
            assert_eq!(r.get::<_, String>(4), instance);
            assert_eq!(r.get::<_, Option<i64>>(5), None, "no lease, no epoch");
            assert!(r.get::<_, bool>(6));
        }
        assert_eq!(receiver.keys()[&id], 3);
        assert_eq!(db.row(id).1, 3);
    }
    // Deleted with its message.
    db.client().execute("DELETE FROM messages", &[]).unwrap();
    let left: i64 = db
        .client()
        .query_one("SELECT count(*) FROM message_attempts", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// A row this very instance claimed but no longer holds — the claim committed and its answer
/// was lost on the way back (a timeout, a reset) — is returned by crash recovery like any
/// other. It was once left `sending` for as long as the instance kept its epoch.
#[test]
fn a_claim_whose_answer_was_lost_is_recovered_by_the_same_instance() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "MAX_PROCESSING_TIME", "1s");
    set(&mut env, "WEBHOOK_TIMEOUT", "1s");
    let daemon = Daemon::start(&env);
    let (_, health) = daemon.health().unwrap();
    let me = health["instance_id"].as_str().unwrap().to_owned();
    let id: i64 = db
        .client()
        .query_one(
            "INSERT INTO messages (recipient, content, status, attempts, claimed_by, claimed_at)
             VALUES ('+905550000000', 'lost claim', 'sending', 1, $1, now())
             RETURNING id",
            &[&me],
        )
        .unwrap()
        .get(0);
    wait_until(LONG, "the message recovered and sent", || {
        db.row(id).0 == "sent"
    });
    assert_eq!(receiver.keys()[&id], 1);
}

/// The probes of an open circuit say nothing about their message: a failed probe must not make
/// it `failed`, even at MAX_ATTEMPTS. They once counted, so a long enough outage failed
/// messages one probe at a time.
#[test]
fn failed_probes_of_an_open_circuit_make_nothing_failed() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::status(500));
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "MAX_ATTEMPTS", "1");
    set(&mut env, "WEBHOOK_CIRCUIT_THRESHOLD", "2");
    set(&mut env, "WORKER_COUNT", "1");
    set(&mut env, "BATCH_SIZE", "4");
    db.insert(4);
    let daemon = Daemon::start(&env);
    daemon.wait_log("Webhook circuit opened", LONG);
    wait_until(LONG, "two failed probes", || {
        daemon
            .log_lines("Webhook probe failed, circuit stays open")
            .len()
            >= 2
    });
    // The two requests before the circuit opened were the messages' one allowed attempt.
    assert_eq!(
        db.count("failed"),
        2,
        "only the requests before the circuit opened"
    );
    receiver.respond_with(|_, _| Answer::accepted());
    wait_until(LONG, "the rest sent once the receiver is back", || {
        db.count("sent") == 2
    });
    assert_eq!(db.count("failed"), 2);
    daemon.wait_log("Webhook circuit closed", LONG);
}

/// "Slow down" answers say nothing about the message either: five 429s and two 500s with
/// MAX_ATTEMPTS=3 still end `sent`, with every request in `attempts` and the five throttled
/// ones free of the limit.
#[test]
fn slow_down_answers_do_not_use_up_max_attempts() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, before| match before {
        0..=4 => Answer::status(429).header("Retry-After", "0"),
        5 | 6 => Answer::status(500),
        _ => Answer::accepted(),
    });
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "MAX_ATTEMPTS", "3");
    let id = db.insert(1)[0];
    let _daemon = Daemon::start(&env);
    wait_until(LONG, "the message sent", || db.count("sent") == 1);
    let free: i32 = db
        .client()
        .query_one("SELECT attempts_free FROM messages WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!((db.row(id).1, free), (8, 5));
    assert_eq!(receiver.count(), 8);
}
