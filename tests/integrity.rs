//! The table's constraints (sql/0002_integrity.sql): impossible states are rejected by
//! PostgreSQL, a database already holding such rows migrates and is repaired, and the daemon's own
//! statements (claim, record, recover) never produce one. Each test has a database of its own,
//! migrated by the real `migrate` command.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use message_dispatcher::connect::{install_crypto_provider, Postgres};
use message_dispatcher::message::{Attempt, Claimed, Delivery};
use message_dispatcher::store::Store;
use postgres::error::SqlState;

/// Runs `sql` expecting PostgreSQL to refuse it for breaking `constraint`.
fn assert_rejected(client: &mut postgres::Client, what: &str, sql: &str, constraint: &str) {
    let err = match client.batch_execute(sql) {
        Ok(()) => panic!("{what}: accepted, expected {constraint} to reject it\n{sql}"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: not a database error: {err}"));
    assert_eq!(
        (db.code(), db.constraint()),
        (&SqlState::CHECK_VIOLATION, Some(constraint)),
        "{what}: {db}"
    );
}

#[test]
fn impossible_states_are_rejected() {
    let db = TestDb::migrated();
    let mut c = db.client();
    // Rows to update into impossible states: one pending, one sending (claimed without lease).
    let waiting: i64 = c
        .query_one(
            "INSERT INTO messages (recipient, content) VALUES ('+905550000001', 'waiting')
             RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let in_flight: i64 = c
        .query_one(
            "INSERT INTO messages (recipient, content, status, claimed_by, claimed_at)
             VALUES ('+905550000002', 'in flight', 'sending', 'instance-a', now())
             RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let cases: &[(&str, String, &str)] = &[
        (
            "an unknown status",
            "INSERT INTO messages (recipient, content, status) VALUES ('r', 'c', 'delivered')"
                .to_string(),
            "messages_status_check",
        ),
        (
            "sending with no claim time (the defect: crash recovery never sees it)",
            "INSERT INTO messages (recipient, content, status, claimed_by)
             VALUES ('r', 'c', 'sending', 'ghost')"
                .to_string(),
            "messages_sending_is_claimed",
        ),
        (
            "sending with no claimant",
            "INSERT INTO messages (recipient, content, status, claimed_at)
             VALUES ('r', 'c', 'sending', now())"
                .to_string(),
            "messages_sending_is_claimed",
        ),
        (
            "a pending row turned sending without a claim",
            format!("UPDATE messages SET status = 'sending' WHERE id = {waiting}"),
            "messages_sending_is_claimed",
        ),
        (
            "a claim's time dropped while still sending",
            format!("UPDATE messages SET claimed_at = NULL WHERE id = {in_flight}"),
            "messages_sending_is_claimed",
        ),
        (
            "a pending row with a claimant",
            "INSERT INTO messages (recipient, content, claimed_by) VALUES ('r', 'c', 'ghost')"
                .to_string(),
            "messages_claimed_only_while_sending",
        ),
        (
            "a pending row with a claim epoch",
            format!("UPDATE messages SET claimed_epoch = 3 WHERE id = {waiting}"),
            "messages_claimed_only_while_sending",
        ),
        (
            "a claim left on a row that was sent",
            format!("UPDATE messages SET status = 'sent', sent_at = now() WHERE id = {in_flight}"),
            "messages_claimed_only_while_sending",
        ),
        (
            "a claim left on a row that failed",
            "INSERT INTO messages (recipient, content, status, claimed_at)
             VALUES ('r', 'c', 'failed', now())"
                .to_string(),
            "messages_claimed_only_while_sending",
        ),
        (
            "a claim under epoch 0, which no lease ever had",
            format!("UPDATE messages SET claimed_epoch = 0 WHERE id = {in_flight}"),
            "messages_claimed_epoch_positive",
        ),
        (
            "sent with no sent_at",
            "INSERT INTO messages (recipient, content, status, attempts)
             VALUES ('r', 'c', 'sent', 1)"
                .to_string(),
            "messages_sent_has_sent_at",
        ),
        (
            "negative attempts",
            format!("UPDATE messages SET attempts = -1 WHERE id = {waiting}"),
            "messages_attempts_not_negative",
        ),
        (
            "an empty recipient",
            "INSERT INTO messages (recipient, content) VALUES ('', 'c')".to_string(),
            "messages_queued_not_empty",
        ),
        (
            "an empty content",
            "INSERT INTO messages (recipient, content) VALUES ('r', '')".to_string(),
            "messages_queued_not_empty",
        ),
        (
            "a negative leadership epoch",
            "UPDATE dispatcher_state SET epoch = -1".to_string(),
            "dispatcher_state_epoch_not_negative",
        ),
    ];
    for (what, sql, constraint) in cases {
        assert_rejected(&mut c, what, sql, constraint);
    }

    // What the daemon, the API and enqueueing programs write is still accepted.
    c.batch_execute(
        "INSERT INTO messages (recipient, content) VALUES ('+905550000003', 'enqueued');
         INSERT INTO messages (recipient, content, next_attempt_at)
         VALUES ('+905550000004', 'later', now() + interval '1 hour');
         INSERT INTO messages (recipient, content, status, claimed_epoch, claimed_by, claimed_at)
         VALUES ('r', 'claimed under the lease', 'sending', 1, 'instance-a', now());
         INSERT INTO messages (recipient, content, status, attempts, sent_at, remote_message_id)
         VALUES ('r', 'history', 'sent', 1, now(), 'remote-1');
         INSERT INTO messages (recipient, content, status, attempts, last_error)
         VALUES ('r', 'gave up', 'failed', 5, 'HTTP 400');
         INSERT INTO messages (recipient, content, status) VALUES ('r', 'too late', 'expired');
         INSERT INTO messages (recipient, content, status) VALUES ('r', 'withdrawn', 'cancelled');
         -- a finished row keeps what it had, even an empty recipient an older version accepted
         INSERT INTO messages (recipient, content, status, last_error)
         VALUES ('', 'old', 'failed', 'HTTP 422');
         UPDATE dispatcher_state SET epoch = epoch + 1;",
    )
    .unwrap();
    c.execute(
        "UPDATE messages SET status = 'pending', claimed_by = NULL, claimed_at = NULL
         WHERE id = $1",
        &[&in_flight],
    )
    .unwrap();
}

#[test]
fn a_database_holding_impossible_rows_migrates_and_is_repaired() {
    // The schema as an older version left it: only 0001 applied (as `migrate` records it).
    let db = TestDb::new();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE schema_migrations (
             version    TEXT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .unwrap();
    c.batch_execute(include_str!("../sql/0001_messages.sql"))
        .unwrap();
    c.batch_execute(
        "INSERT INTO schema_migrations (version) VALUES ('0001_messages');
         INSERT INTO messages (id, recipient, content, status, attempts, claimed_epoch, claimed_by,
                               claimed_at, sent_at, updated_at, last_error) VALUES
         -- the defect: sending without claim time, stuck for ever
         (1, 'r1', 'c1', 'sending', 2, NULL, 'ghost', NULL, NULL, '2026-01-01', NULL),
         -- sending without claimant
         (2, 'r2', 'c2', 'sending', 0, 4, NULL, '2026-01-01', NULL, '2026-01-01', NULL),
         -- sending under epoch 0
         (3, 'r3', 'c3', 'sending', 0, 0, 'ghost', '2026-01-01', NULL, '2026-01-01', NULL),
         -- sent, with the claim left on it
         (4, 'r4', 'c4', 'sent', 1, 7, 'ghost', '2026-01-01', '2026-01-02', '2026-01-02', NULL),
         -- sent without sent_at
         (5, 'r5', 'c5', 'sent', 1, NULL, NULL, NULL, NULL, '2026-01-03', NULL),
         -- negative attempts
         (6, 'r6', 'c6', 'pending', -3, NULL, NULL, NULL, NULL, '2026-01-01', NULL),
         -- waiting with an empty recipient, and in flight with an empty content
         (7, '', 'c7', 'pending', 0, NULL, NULL, NULL, NULL, '2026-01-01', NULL),
         (8, 'r8', '', 'sending', 1, 2, 'ghost', '2026-01-01', NULL, '2026-01-01', NULL),
         -- healthy rows, left alone: a claim without lease, one under the lease, a failed one
         (9, 'r9', 'c9', 'sending', 0, NULL, 'instance-a', '2026-01-01', NULL, '2026-01-01', NULL),
         (10, 'r10', 'c10', 'sending', 0, 5, 'instance-a', '2026-01-01', NULL, '2026-01-01', NULL),
         (11, '', 'c11', 'failed', 1, NULL, NULL, NULL, NULL, '2026-01-01', 'HTTP 422');",
    )
    .unwrap();

    let migrate = || {
        let out = Command::new(DISPATCHER)
            .arg("migrate")
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    migrate();

    type Row = (
        String,
        i32,
        Option<i64>,
        Option<String>,
        bool,
        Option<String>,
        Option<String>,
        bool,
    );
    let row = |id: i64| -> Row {
        let r = db
            .client()
            .query_one(
                "SELECT status, attempts, claimed_epoch, claimed_by, claimed_at IS NOT NULL,
                        to_char(sent_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), last_error,
                        updated_at > '2026-01-10'
                 FROM messages WHERE id = $1",
                &[&id],
            )
            .unwrap();
        (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
            r.get(7),
        )
    };
    let pending = |attempts: i32| -> Row {
        (
            "pending".into(),
            attempts,
            None,
            None,
            false,
            None,
            None,
            true,
        )
    };
    assert_eq!(row(1), pending(2), "sending without claim time");
    assert_eq!(row(2), pending(0), "sending without claimant");
    assert_eq!(row(3), pending(0), "sending under epoch 0");
    assert_eq!(
        row(4),
        (
            "sent".into(),
            1,
            None,
            None,
            false,
            Some("2026-01-02".into()),
            None,
            false
        ),
        "sent with a leftover claim: the claim goes, the rest stays"
    );
    assert_eq!(
        row(5),
        (
            "sent".into(),
            1,
            None,
            None,
            false,
            Some("2026-01-03".into()),
            None,
            false
        ),
        "sent without sent_at: sent when last updated"
    );
    assert_eq!(
        row(6),
        ("pending".into(), 0, None, None, false, None, None, false)
    );
    let emptied =
        Some("empty recipient or content (set failed by migration 0002_integrity)".into());
    assert_eq!(
        row(7),
        (
            "failed".into(),
            0,
            None,
            None,
            false,
            None,
            emptied.clone(),
            true
        )
    );
    assert_eq!(
        row(8),
        ("failed".into(), 1, None, None, false, None, emptied, true)
    );
    assert_eq!(
        row(9),
        (
            "sending".into(),
            0,
            None,
            Some("instance-a".into()),
            true,
            None,
            None,
            false
        )
    );
    assert_eq!(
        row(10),
        (
            "sending".into(),
            0,
            Some(5),
            Some("instance-a".into()),
            true,
            None,
            None,
            false
        )
    );
    assert_eq!(
        row(11),
        (
            "failed".into(),
            1,
            None,
            None,
            false,
            None,
            Some("HTTP 422".into()),
            false
        )
    );

    // Applied once, and the constraints are in force.
    migrate();
    let applied: Vec<String> = c
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(applied, migration_versions(), "every migration once");
    assert_rejected(
        &mut c,
        "the defect, after the migration",
        "UPDATE messages SET claimed_at = NULL WHERE id = 9",
        "messages_sending_is_claimed",
    );
}

/// The request each claimed message got (a history row is written for each).
fn attempts_of(claimed: &[Claimed]) -> Vec<Attempt> {
    claimed
        .iter()
        .map(|m| Attempt {
            number: m.attempts,
            started_at: std::time::SystemTime::now(),
            duration: Duration::from_millis(3),
            status: Some(202),
        })
        .collect()
}

/// Outcome rows as `Store::record` takes them; the last outcome (Unsent) made no request.
fn rows<'a>(
    claimed: &[Claimed],
    outcomes: &'a [Delivery],
    attempts: &'a [Attempt],
) -> std::vec::IntoIter<(i64, &'a Delivery, Option<&'a Attempt>)> {
    claimed
        .iter()
        .zip(outcomes)
        .zip(attempts)
        .map(|((m, d), a)| (m.id, d, (*d != Delivery::Unsent).then_some(a)))
        .collect::<Vec<_>>()
        .into_iter()
}

/// The daemon's own statements — claim, record (every kind of outcome) and crash recovery — with
/// and without the lease, keep every row within the constraints.
#[test]
fn the_daemons_statements_satisfy_the_constraints() {
    install_crypto_provider();
    let db = TestDb::migrated();
    db.insert(8);
    let store = |instance: &str| Store::new(Postgres::new(&db.url, None).unwrap(), instance);
    let mut a = store("instance-a");
    let mut b = store("instance-b");
    let outcomes = [
        Delivery::Sent {
            remote_id: Some("remote-1".into()),
        },
        Delivery::Retry {
            error: "HTTP 503".into(),
            delay: Duration::ZERO,
            charged: true,
        },
        Delivery::Failed {
            error: "HTTP 400".into(),
        },
        Delivery::Unsent,
    ];

    // Without the lease: claimed with no epoch, then every outcome.
    let claimed = a.claim(4, None).unwrap().messages;
    assert_eq!(claimed.len(), 4);
    assert_eq!(db.count("sending"), 4);
    let attempts = attempts_of(&claimed);
    let recorded = a
        .record(None, rows(&claimed, &outcomes, &attempts), false)
        .unwrap()
        .written;
    assert_eq!(recorded, 4);
    assert_eq!(
        (db.count("sent"), db.count("failed"), db.count("pending")),
        (1, 1, 6)
    );

    // Under the lease: claimed with the epoch, then every outcome.
    let epoch = a.begin_epoch(soon()).unwrap();
    assert!(epoch >= 1);
    let claimed = a.claim(4, Some(epoch)).unwrap().messages;
    assert_eq!(claimed.len(), 4);
    let attempts = attempts_of(&claimed);
    let recorded = a
        .record(Some(epoch), rows(&claimed, &outcomes, &attempts), false)
        .unwrap()
        .written;
    assert_eq!(recorded, 4);
    assert_eq!((db.count("sent"), db.count("failed")), (2, 2));
    let history: i64 = db
        .client()
        .query_one("SELECT count(*) FROM message_attempts", &[])
        .unwrap()
        .get(0);
    assert_eq!(history, 6, "one row per request made; none for the unsent");

    // Crash recovery: A's claims are returned by B under a newer epoch.
    let claimed = a.claim(8, Some(epoch)).unwrap().messages;
    assert_eq!(claimed.len(), 4);
    let newer = b.begin_epoch(soon()).unwrap();
    assert_eq!(
        b.recover_abandoned(Duration::ZERO, &[], Some(newer), 50)
            .unwrap(),
        4
    );
    assert_eq!((db.count("sending"), db.count("pending")), (0, 4));

    let unclaimed_but_held: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM messages WHERE status <> 'sending'
             AND (claimed_epoch IS NOT NULL OR claimed_by IS NOT NULL OR claimed_at IS NOT NULL)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unclaimed_but_held, 0);
}

/// The history has no foreign key (it cost a third of every outcome write): deleting messages,
/// by retention or by hand, must still take their history with them, in the same statement.
#[test]
fn deleting_or_truncating_messages_deletes_their_history() {
    install_crypto_provider();
    let db = TestDb::migrated();
    let mut store = Store::new(Postgres::new(&db.url, None).unwrap(), "history");
    db.insert(6);
    let claimed = store.claim(6, None).unwrap().messages;
    let (outcomes, attempts) = all_sent(&claimed);
    store
        .record(None, rows(&claimed, &outcomes, &attempts), false)
        .unwrap();
    let mut c = db.client();
    assert_eq!(history_rows(&mut c), 6);
    let ids: Vec<i64> = claimed.iter().map(|m| m.id).collect();
    c.execute("DELETE FROM messages WHERE id = ANY($1)", &[&&ids[..2]])
        .unwrap();
    assert_eq!(
        history_rows(&mut c),
        4,
        "a DELETE takes the history of its rows"
    );
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM message_attempts WHERE message_id = ANY($1)",
            &[&&ids[2..]],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 4, "and only theirs");
    c.batch_execute("TRUNCATE messages").unwrap();
    assert_eq!(history_rows(&mut c), 0, "TRUNCATE takes all of it");
}

/// A write whose answer was lost (the connection broke) may have committed: written again, its
/// outcomes change nothing more and their history is not added twice. Only a write made
/// `again` skips history rows already there; a first write has no reason to look.
#[test]
fn an_outcome_write_made_again_adds_no_history_twice() {
    install_crypto_provider();
    let db = TestDb::migrated();
    let mut store = Store::new(Postgres::new(&db.url, None).unwrap(), "again");
    db.insert(3);
    let claimed = store.claim(3, None).unwrap().messages;
    let (outcomes, attempts) = all_sent(&claimed);
    let mut write = |again| store.record(None, rows(&claimed, &outcomes, &attempts), again);
    let state = || (db.count("sent"), history_rows(&mut db.client()));
    assert_eq!(write(false).unwrap().written, 3);
    assert_eq!(state(), (3, 3));
    assert_eq!(write(true).unwrap().written, 0, "nothing left to write");
    assert_eq!(state(), (3, 3), "and no history twice");
    let refused = write(false).unwrap_err();
    assert!(refused.is_data_error(), "{refused}");
    assert_eq!(state(), (3, 3));
}

/// Every claimed message sent, after one request each.
fn all_sent(claimed: &[Claimed]) -> (Vec<Delivery>, Vec<Attempt>) {
    let sent = claimed
        .iter()
        .map(|_| Delivery::Sent {
            remote_id: Some("remote".into()),
        })
        .collect();
    (sent, attempts_of(claimed))
}

fn history_rows(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM message_attempts", &[])
        .unwrap()
        .get(0)
}

/// A lease deadline a few seconds ahead, for statements that need one.
fn soon() -> message_dispatcher::clock::BootInstant {
    message_dispatcher::clock::BootInstant::now() + Duration::from_secs(5)
}
