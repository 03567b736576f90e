//! Message expiry (issue #11, item 5): a message past its `expires_at` is never sent. It is
//! marked `expired` when claimed, by the worker just before the request, or instead of a retry
//! that would come after it; MESSAGE_TTL gives every inserted row an expiry, SQL inserts
//! included. Real daemons, a real PostgreSQL, a receiver the test controls.

mod common;

use std::time::{Duration, Instant};

use common::*;
use message_dispatcher::clock::BootInstant;
use message_dispatcher::connect::{install_crypto_provider, Postgres};
use message_dispatcher::message::{Attempt, Delivery};
use message_dispatcher::store::{Enqueued, NewMessage, Store};

const LONG: Duration = Duration::from_secs(30);

fn post(d: &Daemon, target: &str, body: &str) -> (u16, String) {
    request(
        "POST",
        &format!("http://127.0.0.1:{}{target}", d.port),
        Some(body.as_bytes()),
        &[("Content-Type", "application/json")],
    )
    .expect("the daemon answers")
}

/// `message_dispatcher_messages_expired_total` as the daemon reports it.
fn expired_metric(d: &Daemon) -> u64 {
    let (status, text) = request(
        "GET",
        &format!("http://127.0.0.1:{}/metrics", d.port),
        None,
        &[],
    )
    .expect("the daemon answers");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix("message_dispatcher_messages_expired_total "))
        .unwrap_or_else(|| panic!("no messages_expired metric in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The `count`s of the daemon's `Messages expired` lines with this `reason`.
fn expired_logged(d: &Daemon, reason: &str) -> u64 {
    d.log_lines("Messages expired")
        .iter()
        .filter(|l| l["reason"] == reason)
        .map(|l| l["count"].as_u64().unwrap())
        .sum()
}

fn insert_one(db: &TestDb, content: &str, expires_at_sql: &str) -> i64 {
    db.client()
        .query_one(
            &format!(
                "INSERT INTO messages (recipient, content, expires_at)
                 VALUES ('+905550000001', $1, {expires_at_sql}) RETURNING id"
            ),
            &[&content],
        )
        .unwrap()
        .get(0)
}

fn last_error(db: &TestDb, id: i64) -> String {
    db.row(id).2.unwrap_or_default()
}

// ------------------------------------------------------------------ the statements themselves

/// CLAIM and RECORD through `Store`, with every case of the rules set up exactly.
#[test]
fn claim_and_record_apply_the_expiry_rules() {
    install_crypto_provider();
    let db = TestDb::migrated();
    let mut c = db.client();
    let mut store = Store::new(Postgres::new(&db.url, None).unwrap(), "instance-a");

    let past = insert_one(&db, "past", "now() - interval '1 second'");
    let later = insert_one(&db, "later", "now() + interval '1 hour'");
    let never = insert_one(&db, "never", "NULL");
    let infinity = insert_one(&db, "infinity", "'infinity'");
    // Not due yet (a retry waiting, or a later first attempt) but already past its expiry.
    let waiting: i64 = c
        .query_one(
            "INSERT INTO messages (recipient, content, next_attempt_at, expires_at, last_error)
             VALUES ('+905550000002', 'waiting', now() + interval '1 hour',
                     now() - interval '1 second', 'HTTP 503') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    // Not pending: never expire, whatever their expires_at says.
    let done: i64 = c
        .query_one(
            "INSERT INTO messages (recipient, content, status, attempts, sent_at, expires_at)
             VALUES ('+905550000003', 'done', 'sent', 1, now(), now() - interval '1 hour')
             RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let in_flight: i64 = c
        .query_one(
            "INSERT INTO messages (recipient, content, status, attempts, claimed_by, claimed_at,
                                   expires_at)
             VALUES ('+905550000004', 'in flight', 'sending', 1, 'instance-b', now(),
                     now() - interval '1 hour')
             RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);

    // Stopped, or under an epoch that is not current: nothing expires either.
    c.batch_execute("UPDATE dispatcher_state SET processing_enabled = false")
        .unwrap();
    let claim = store.claim(10, None).unwrap();
    assert_eq!((claim.messages.len(), claim.expired), (0, 0));
    c.batch_execute("UPDATE dispatcher_state SET processing_enabled = true")
        .unwrap();
    let epoch = store
        .begin_epoch(BootInstant::now() + Duration::from_secs(60))
        .unwrap();
    let claim = store.claim(10, Some(epoch + 1)).unwrap();
    assert_eq!((claim.messages.len(), claim.expired), (0, 0));
    assert_eq!(db.row(past).0, "pending");

    let asked = BootInstant::now();
    let claim = store.claim(10, Some(epoch)).unwrap();
    assert_eq!(claim.expired, 2, "past and waiting");
    let ids: Vec<i64> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(ids, [later, never, infinity]);
    let deadline = claim.messages[0].expires.expect("later expires");
    let left = deadline.saturating_duration_since(asked);
    assert!(
        left > Duration::from_secs(3590) && left <= Duration::from_secs(3600),
        "{left:?}"
    );
    assert!(!claim.messages[0].expired());
    assert_eq!(claim.messages[1].expires, None);
    assert_eq!(claim.messages[2].expires, None);

    let (status, attempts, error, _) = db.row(past);
    assert_eq!((status.as_str(), attempts), ("expired", 0));
    let error = error.unwrap();
    assert!(
        error.starts_with("expired at 20") && error.ends_with("Z before it could be sent"),
        "{error}"
    );
    let error = last_error(&db, waiting);
    assert!(
        error.ends_with("before it could be sent (last error: HTTP 503)"),
        "{error}"
    );
    assert_eq!(db.row(done).0, "sent");
    assert_eq!(db.row(in_flight).0, "sending");

    // RECORD: every outcome, on rows claimed now, some of whose expiry then "passes".
    let rows: Vec<i64> = (0..7)
        .map(|i| insert_one(&db, &format!("r{i}"), "now() + interval '1 hour'"))
        .collect();
    let claim = store.claim(10, Some(epoch)).unwrap();
    assert_eq!(claim.messages.len(), 7);
    // Rows 2, 3 and 4 reached their expiry while in flight.
    c.execute(
        "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = ANY($1)",
        &[&rows[2..5].to_vec()],
    )
    .unwrap();
    let outcomes = [
        // Due again in 2 hours: after the expiry, so expired at once.
        Delivery::Retry {
            error: "HTTP 500".into(),
            delay: Duration::from_secs(7200),
            charged: true,
        },
        // Due again well before it: pending.
        Delivery::Retry {
            error: "HTTP 500".into(),
            delay: Duration::from_secs(1),
            charged: true,
        },
        // Returned unsent after its expiry: expired, the attempt given back.
        Delivery::Unsent,
        // The worker found it expired: expired, the attempt given back.
        Delivery::Expired,
        // Sent after its expiry (the request started in time): sent, as it happened.
        Delivery::Sent {
            remote_id: Some("r-1".into()),
        },
        Delivery::Failed {
            error: "HTTP 400".into(),
        },
        Delivery::Unsent,
    ];
    // A request was made for every outcome but Unsent and Expired.
    let attempt = Attempt {
        number: 1,
        started_at: std::time::SystemTime::now(),
        duration: Duration::from_millis(3),
        status: Some(500),
    };
    let requested = |d: &Delivery| !matches!(d, Delivery::Unsent | Delivery::Expired);
    let recorded = store
        .record(
            Some(epoch),
            rows.iter()
                .zip(outcomes.iter())
                .map(|(id, d)| (*id, d, requested(d).then_some(&attempt)))
                .collect::<Vec<_>>()
                .into_iter(),
            false,
        )
        .unwrap();
    assert_eq!(recorded.written, 7);
    let mut expired = recorded.expired.clone();
    expired.sort();
    assert_eq!(expired, [rows[0], rows[2], rows[3]]);

    let (status, attempts, error, _) = db.row(rows[0]);
    assert_eq!((status.as_str(), attempts), ("expired", 1));
    let error = error.unwrap();
    assert!(
        error.starts_with("expired at ")
            && error
                .ends_with(": the next attempt would have come after it (last error: HTTP 500)"),
        "{error}"
    );
    assert_eq!(db.row(rows[1]).0, "pending");
    assert_eq!(db.row(rows[1]).1, 1);
    for id in [rows[2], rows[3]] {
        let (status, attempts, error, _) = db.row(id);
        assert_eq!((status.as_str(), attempts), ("expired", 0), "{id}");
        assert!(error.unwrap().ends_with("before it could be sent"));
    }
    // The request of the retry that expired instead stays in the attempt history.
    let history: Vec<(i64, Option<String>)> = c
        .query(
            "SELECT message_id, error FROM message_attempts WHERE message_id = ANY($1)
             ORDER BY message_id",
            &[&rows],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(history.len(), 4, "{history:?}");
    assert_eq!(history[0], (rows[0], Some("HTTP 500".into())));
    assert_eq!(db.row(rows[4]).0, "sent");
    assert_eq!(db.row(rows[5]).0, "failed");
    assert_eq!(
        (db.row(rows[6]).0.as_str(), db.row(rows[6]).1),
        ("pending", 0)
    );

    // Every row still within the table's constraints (the claim fields are all cleared).
    let held: i64 = c
        .query_one(
            "SELECT count(*) FROM messages WHERE status = 'expired'
             AND (claimed_epoch IS NOT NULL OR claimed_by IS NOT NULL OR claimed_at IS NOT NULL)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0);
}

/// MESSAGE_TTL is stored for the insert trigger: rows without an expiry get
/// `created_at + TTL`, rows with one keep it, and the last instance to start sets it for all.
#[test]
fn the_ttl_trigger_fills_in_expires_at_for_any_insert() {
    install_crypto_provider();
    let db = TestDb::migrated();
    let mut store = Store::new(Postgres::new(&db.url, None).unwrap(), "instance-a");
    assert_eq!(
        store
            .set_message_ttl(Some(Duration::from_secs(90)))
            .unwrap(),
        None
    );
    let mut c = db.client();
    let ttl_of = |c: &mut postgres::Client, id: i64| -> Option<f64> {
        c.query_one(
            "SELECT EXTRACT(EPOCH FROM expires_at - created_at)::float8 FROM messages
             WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    let plain = db.insert(1)[0];
    assert_eq!(ttl_of(&mut c, plain), Some(90.0));
    let explicit_null = insert_one(&db, "null", "NULL");
    assert_eq!(ttl_of(&mut c, explicit_null), Some(90.0));
    let own = insert_one(&db, "own", "now() + interval '1 hour'");
    assert_eq!(ttl_of(&mut c, own), Some(3600.0));
    let many = store
        .insert_many(&["a".into(), "b".into()], &["x".into(), "y".into()])
        .unwrap();
    assert_eq!(many, 2);
    let with_ttl: i64 = c
        .query_one(
            "SELECT count(*) FROM messages WHERE expires_at = created_at + interval '90 seconds'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(with_ttl, 4);
    let new = NewMessage {
        recipient: "+1".into(),
        content: "api".into(),
        send_at: None,
        expires_at: None,
    };
    let id = match store.enqueue(&new, None).unwrap() {
        Enqueued::Created(id) => id,
        other => panic!("{other:?}"),
    };
    assert_eq!(ttl_of(&mut c, id), Some(90.0));
    // COPY too.
    let mut writer = c
        .copy_in("COPY messages (recipient, content) FROM STDIN")
        .unwrap();
    std::io::Write::write_all(&mut writer, b"+2\tcopied\n").unwrap();
    writer.finish().unwrap();
    let copied: i64 = c
        .query_one("SELECT id FROM messages WHERE content = 'copied'", &[])
        .unwrap()
        .get(0);
    assert_eq!(ttl_of(&mut c, copied), Some(90.0));

    // A new value applies from the next statement on, in a session that inserted before.
    let insert = "INSERT INTO messages (recipient, content) VALUES ('+3', 'x') RETURNING id";
    assert_eq!(
        store
            .set_message_ttl(Some(Duration::from_millis(1500)))
            .unwrap(),
        Some(Duration::from_secs(90))
    );
    let id: i64 = c.query_one(insert, &[]).unwrap().get(0);
    assert_eq!(ttl_of(&mut c, id), Some(1.5));
    assert_eq!(
        store.set_message_ttl(None).unwrap(),
        Some(Duration::from_millis(1500))
    );
    let mut tx = c.transaction().unwrap();
    let first: i64 = tx.query_one(insert, &[]).unwrap().get(0);
    let second: i64 = tx.query_one(insert, &[]).unwrap().get(0);
    tx.commit().unwrap();
    assert_eq!(
        (ttl_of(&mut c, first), ttl_of(&mut c, second)),
        (None, None)
    );
    let plain = db.insert(1)[0];
    assert_eq!(ttl_of(&mut c, plain), None);
}

// ------------------------------------------------------------------ the daemon

/// A row inserted with SQL whose `expires_at` has passed is marked `expired` and never reaches
/// the receiver; the others go out as usual.
#[test]
fn a_sql_insert_already_past_its_expiry_is_never_sent() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    let past = insert_one(&db, "too late", "now() - interval '1 second'");
    let fine = insert_one(&db, "in time", "now() + interval '1 hour'");
    wait_until(LONG, "one sent and one expired", || {
        db.count("sent") == 1 && db.count("expired") == 1
    });
    assert_eq!(db.row(fine).0, "sent");
    let (status, attempts, error, _) = db.row(past);
    assert_eq!((status.as_str(), attempts), ("expired", 0));
    assert!(error.unwrap().contains("before it could be sent"));
    assert!(!receiver.keys().contains_key(&past));
    assert_eq!(receiver.count(), 1);
    assert_eq!(expired_logged(&daemon, "past expires_at while waiting"), 1);
    assert_eq!(expired_metric(&daemon), 1);
}

/// MESSAGE_TTL=2s: messages enqueued (by SQL and by the API) while processing is stopped, and
/// still waiting 2 s later, expire when processing starts again; none is sent. A row with its
/// own expiry, or exempt with 'infinity', is sent. A later instance without MESSAGE_TTL turns
/// it off for everyone (last writer wins) and says so.
#[test]
fn message_ttl_expires_what_waited_while_processing_was_stopped() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "MESSAGE_TTL", "2s");
    let daemon = Daemon::start(&env);
    let ttl: String = db
        .client()
        .query_one("SELECT message_ttl::text FROM dispatcher_state", &[])
        .unwrap()
        .get(0);
    assert_eq!(ttl, "00:00:02");

    assert_eq!(post(&daemon, "/processing/stop", "").0, 200);
    let enqueued = Instant::now();
    let by_sql = db.insert(1)[0];
    let (status, body) = post(
        &daemon,
        "/messages",
        r#"{"recipient":"+905551111111","content":"Your code is 123456"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let by_api = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_i64()
        .unwrap();
    let own = insert_one(&db, "own expiry", "now() + interval '1 hour'");
    let exempt = insert_one(&db, "exempt", "'infinity'");
    let ttls: Vec<Option<f64>> = db
        .client()
        .query(
            "SELECT EXTRACT(EPOCH FROM expires_at - created_at)::float8 FROM messages
             WHERE id = ANY($1) ORDER BY id",
            &[&vec![by_sql, by_api]],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ttls, [Some(2.0), Some(2.0)]);

    std::thread::sleep(Duration::from_millis(2500).saturating_sub(enqueued.elapsed()));
    assert_eq!(db.count("pending"), 4, "nothing changes while stopped");
    assert_eq!(post(&daemon, "/processing/start", "").0, 200);
    wait_until(LONG, "two expired and two sent", || {
        db.count("expired") == 2 && db.count("sent") == 2
    });
    assert_eq!(db.row(by_sql).0, "expired");
    assert_eq!(db.row(by_api).0, "expired");
    assert_eq!(
        (db.row(own).0.as_str(), db.row(exempt).0.as_str()),
        ("sent", "sent")
    );
    let keys = receiver.keys();
    assert!(!keys.contains_key(&by_sql) && !keys.contains_key(&by_api));
    assert_eq!(expired_logged(&daemon, "past expires_at while waiting"), 2);
    assert_eq!(expired_metric(&daemon), 2);

    // Another instance started without MESSAGE_TTL: the TTL is off for every instance.
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "PROCESSING_INTERVAL", "1h");
    let other = Daemon::start(&env);
    let ttl: Option<String> = db
        .client()
        .query_one("SELECT message_ttl::text FROM dispatcher_state", &[])
        .unwrap()
        .get(0);
    assert_eq!(ttl, None);
    let changed = other.log_lines(
        "MESSAGE_TTL changed for every instance: rows inserted from now on get the new value",
    );
    assert_eq!(changed.len(), 1);
    assert_eq!(
        (
            &changed[0]["level"],
            &changed[0]["before"],
            &changed[0]["now"]
        ),
        (
            &serde_json::json!("warn"),
            &serde_json::json!("2s"),
            &serde_json::json!("<unset>")
        )
    );
}

/// POST /messages takes an optional RFC 3339 `expires_at`: one already past is accepted (as an
/// INSERT would be) and expires unsent; a later one is stored as given; a malformed one is a
/// 400 naming the field.
#[test]
fn the_api_takes_an_expiry() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    let id_of = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body).unwrap()["id"]
            .as_i64()
            .unwrap()
    };
    let (status, body) = post(
        &daemon,
        "/messages",
        r#"{"recipient":"+905551111111","content":"late","expires_at":"2020-01-01T00:00:00Z"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let past = id_of(&body);
    let (status, body) = post(
        &daemon,
        "/messages",
        r#"{"recipient":"+905551111111","content":"in time","expires_at":"2999-01-01T03:00:00.5+03:00"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let later = id_of(&body);
    let stored: String = db
        .client()
        .query_one(
            "SELECT to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS')
             FROM messages WHERE id = $1",
            &[&later],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, "2999-01-01T00:00:00.500");
    for bad in [
        r#""tomorrow""#,
        r#""2026-11-25T14:30:00""#,
        r#""2026-02-30T00:00:00Z""#,
        "42",
    ] {
        let (status, body) = post(
            &daemon,
            "/messages",
            &format!(r#"{{"recipient":"+905551111111","content":"x","expires_at":{bad}}}"#),
        );
        assert_eq!(status, 400, "{bad}: {body}");
        let error = serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(error.starts_with("expires_at: "), "{bad}: {error}");
    }
    wait_until(LONG, "one sent, one expired", || {
        db.count("sent") == 1 && db.count("expired") == 1
    });
    assert_eq!(db.row(past).0, "expired");
    assert_eq!(db.row(later).0, "sent");
    assert_eq!(receiver.keys().keys().copied().collect::<Vec<_>>(), [later]);
    assert_eq!(expired_metric(&daemon), 1);

    // The served document describes the field.
    let (_, doc) = get(&format!("http://127.0.0.1:{}/openapi.json", daemon.port)).unwrap();
    let field = &doc["components"]["schemas"]["NewMessage"]["properties"]["expires_at"];
    assert_eq!(field["format"], "date-time", "{field}");
}

/// A failure whose retry would come after the message's expiry ends it `expired` at once, after
/// one request: a 500 with a 5–10 s backoff, and a 429 whose Retry-After asks for 10 s, for
/// messages that expire 3 s from now.
#[test]
fn a_retry_that_would_come_after_the_expiry_expires_the_message_at_once() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "RETRY_BASE_DELAY", "10s");
    set(&mut env, "RETRY_MAX_DELAY", "10s");
    let daemon = Daemon::start(&env);
    // Processing off while both are inserted, so they go out together.
    assert_eq!(post(&daemon, "/processing/stop", "").0, 200);
    let error500 = insert_one(&db, "500", "now() + interval '3 seconds'");
    let slow_down = insert_one(&db, "429", "now() + interval '3 seconds'");
    receiver.respond_with(move |seen, _| {
        if seen.key() == slow_down {
            Answer::status(429).header("Retry-After", "10")
        } else {
            Answer::status(500).body("try later")
        }
    });
    let started = Instant::now();
    assert_eq!(post(&daemon, "/processing/start", "").0, 200);
    wait_until(LONG, "both expired", || db.count("expired") == 2);
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "expired when the retry was decided, not when the expiry came: {took:?}"
    );
    assert_eq!(receiver.count(), 2, "one request each");
    for (id, answer) in [(error500, "HTTP 500: try later"), (slow_down, "HTTP 429")] {
        let (status, attempts, error, _) = db.row(id);
        assert_eq!((status.as_str(), attempts), ("expired", 1));
        let error = error.unwrap();
        assert!(
            error.ends_with(&format!(
                ": the next attempt would have come after it (last error: {answer})"
            )),
            "{error}"
        );
    }
    assert_eq!(
        expired_logged(&daemon, "the next attempt would have come after expires_at"),
        2
    );
    assert_eq!(expired_metric(&daemon), 2);
    // Nothing else is sent later.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(receiver.count(), 2);
}

/// The worker's own check, just before the request: one worker, a batch of two, the first
/// answer takes 2 s, and the second message expires 1 s after it was claimed, while it waits
/// for the worker. It is not sent, and its attempt is given back.
#[test]
fn a_message_that_expires_while_waiting_for_a_worker_is_not_sent() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "WORKER_COUNT", "1");
    set(&mut env, "BATCH_SIZE", "2");
    set(&mut env, "WEBHOOK_TIMEOUT", "5s");
    set(&mut env, "MAX_PROCESSING_TIME", "10s");
    let daemon = Daemon::start(&env);
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_secs(2)));
    let ids: Vec<i64> = db
        .client()
        .query(
            "INSERT INTO messages (recipient, content, expires_at)
             VALUES ('+905550000001', 'slow', NULL),
                    ('+905550000002', 'expires waiting', now() + interval '1 second')
             RETURNING id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_until(LONG, "one sent, one expired", || {
        db.count("sent") == 1 && db.count("expired") == 1
    });
    assert_eq!(db.row(ids[0]).0, "sent");
    let (status, attempts, error, _) = db.row(ids[1]);
    assert_eq!((status.as_str(), attempts), ("expired", 0));
    assert!(error.unwrap().ends_with("before it could be sent"));
    assert_eq!(
        receiver.keys().keys().copied().collect::<Vec<_>>(),
        [ids[0]]
    );
    assert_eq!(
        expired_logged(&daemon, "past expires_at just before the request"),
        1
    );
    assert_eq!(expired_metric(&daemon), 1);
    let batch = &daemon.log_lines("Message batch processed")[0];
    assert_eq!((&batch["sent"], &batch["expired"]), (&1.into(), &1.into()));
}

/// Pages read (shared buffers hit or read) by `query`: its top node's figures from EXPLAIN
/// (ANALYZE, BUFFERS).
fn pages_read(c: &mut impl postgres::GenericClient, query: &str) -> u64 {
    let plan = c
        .query(&format!("EXPLAIN (ANALYZE, BUFFERS) {query}"), &[])
        .unwrap();
    let top = plan
        .iter()
        .map(|r| r.get::<_, String>(0))
        .find(|line| line.trim_start().starts_with("Buffers:"))
        .unwrap_or_else(|| panic!("no Buffers line in the plan of {query}"));
    plan_figure(&top, "hit=") + plan_figure(&top, "read=")
}

/// The figure after `what` (`rows=`, `hit=`…) in one line of a plan; 0 where it is not shown.
fn plan_figure(line: &str, what: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(what))
        .map_or(0, |n| n.trim_end_matches([',', ')']).parse().unwrap())
}

#[test]
fn a_claim_finds_the_rows_it_changes_by_primary_key_however_small_the_table_looks() {
    // A fresh table, as in a first drain: 40,000 pending rows, 5 of them past their expiry, no
    // statistics yet. Inline, the search for due messages read every pending row and sorted
    // them (its filter on expires_at looks selective), and both changes, joined to their ids,
    // hashed the whole table: each claim read the table twice over, growing with it.
    let db = TestDb::migrated();
    let mut c = db.client();
    for statement in [
        "ALTER TABLE messages SET (autovacuum_enabled = false)",
        "INSERT INTO messages (recipient, content, expires_at)
         SELECT '+90555' || g, 'due ' || g,
                CASE WHEN g % 8000 = 0 THEN now() - interval '1 minute' END
         FROM generate_series(1, 40000) g",
    ] {
        c.batch_execute(statement).unwrap();
    }
    let heap_pages: i64 = c
        .query_one(
            "SELECT pg_relation_size('messages') / current_setting('block_size')::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "PREPARE claim (bigint, bigint, text, bigint) AS {}",
        message_dispatcher::store::CLAIM
    ))
    .unwrap();
    // The second claim is measured: the first also fills this session's catalog caches.
    tx.batch_execute("SAVEPOINT first; EXECUTE claim(10, NULL, 'test', 1000); ROLLBACK TO first")
        .unwrap();
    let pages = pages_read(&mut tx, "EXECUTE claim(10, NULL, 'test', 1000)");
    let (claimed, expired): (i64, i64) = {
        let r = tx
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'sending'),
                        count(*) FILTER (WHERE status = 'expired')
                 FROM messages",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    tx.rollback().unwrap();
    assert_eq!((claimed, expired), (10, 5));
    // Each changed row costs about ten pages (its heap page, its index entries); the table has
    // 550 (before sql/0008 and the primary-key lookups: 1,461).
    assert!(heap_pages > 500, "the table has only {heap_pages} pages");
    assert!(
        pages < heap_pages as u64 / 2,
        "a claim of 10 with 5 expired read {pages} pages of a {heap_pages}-page table"
    );
}

/// Rows handled by the nodes of an EXPLAIN ANALYZE plan that ran more than once (each one's
/// rows times its loops): what a plan that goes through one input again for every row of
/// another multiplies.
fn rows_handled_again(plan: &[String]) -> u64 {
    plan.iter()
        .filter(|line| line.contains("(actual "))
        .map(|line| (plan_figure(line, "rows="), plan_figure(line, "loops=")))
        .filter(|&(_, loops)| loops > 1)
        .map(|(rows, loops)| rows * loops)
        .sum()
}

#[test]
fn an_outcome_write_goes_through_its_batch_once_whatever_the_statistics_say() {
    // A fresh table (no statistics), then statistics taken between two claims (nothing
    // `sending`), each with a first execution's plan and the one a session keeps after five
    // (the generic plan). Joined as a nested loop, the write read the claimed rows first and went
    // through every outcome again for each: a batch of 500 handled 250,000 rows, 150 ms of
    // PostgreSQL's CPU (sql/0009). The plan of the statement inside the function is what
    // auto_explain sends to this session.
    const BATCH: usize = 500;
    let db = TestDb::migrated();
    let plans = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = plans.clone();
    let mut c = db
        .url
        .parse::<postgres::Config>()
        .unwrap()
        .notice_callback(move |notice| sink.lock().unwrap().push(notice.message().to_owned()))
        .connect(postgres::NoTls)
        .unwrap();
    c.batch_execute(&format!(
        "ALTER TABLE messages SET (autovacuum_enabled = false);
         INSERT INTO messages (recipient, content)
         SELECT '+90555' || g, 'due ' || g FROM generate_series(1, 20000) g;
         LOAD 'auto_explain';
         SET auto_explain.log_min_duration = 0;
         SET auto_explain.log_analyze = on;
         SET auto_explain.log_timing = off;
         SET auto_explain.log_nested_statements = on;
         SET client_min_messages = log;
         PREPARE record AS {}",
        message_dispatcher::store::RECORD
    ))
    .unwrap();
    install_crypto_provider();
    let mut store = Store::new(Postgres::new(&db.url, None).unwrap(), "test");
    for statistics in ["none", "taken with nothing sending"] {
        if statistics != "none" {
            c.batch_execute("ANALYZE messages").unwrap();
        }
        let claimed = store.claim(BATCH as u32, None).unwrap().messages;
        assert_eq!(claimed.len(), BATCH);
        let array = |item: &dyn Fn(usize) -> String| {
            let items: Vec<String> = (0..BATCH).map(item).collect();
            format!("'{{{}}}'", items.join(","))
        };
        let arguments = [
            array(&|i| claimed[i].id.to_string()),
            array(&|_| "sent".into()),
            array(&|_| "0".into()),
            array(&|_| "NULL".into()),
            array(&|_| "NULL".into()),
            array(&|_| "0".into()),
            "NULL".into(),
            "'test'".into(),
            array(&|i| claimed[i].id.to_string()),
            array(&|_| "1".into()),
            array(&|_| "\"2026-11-26 08:00:00+00\"".into()),
            array(&|_| "3".into()),
            array(&|_| "202".into()),
            array(&|_| "NULL".into()),
            array(&|_| "0".into()),
            "false".into(),
        ]
        .join(", ");
        for plan_cache_mode in ["force_custom_plan", "force_generic_plan"] {
            plans.lock().unwrap().clear();
            let mut tx = c.transaction().unwrap();
            tx.batch_execute(&format!(
                "SET LOCAL plan_cache_mode = {plan_cache_mode};
                 EXECUTE record({arguments});"
            ))
            .unwrap();
            tx.rollback().unwrap();
            let plan: Vec<String> = plans
                .lock()
                .unwrap()
                .iter()
                .find(|text| text.contains("UPDATE messages"))
                .unwrap_or_else(|| panic!("no plan of the write among {:?}", plans.lock()))
                .lines()
                .map(str::to_owned)
                .collect();
            let handled = rows_handled_again(&plan);
            assert!(
                handled == 0,
                "statistics {statistics}, {plan_cache_mode}: an outcome write of {BATCH} \
                 went through {handled} rows in nodes run more than once:\n{}",
                plan.join("\n")
            );
        }
        // Written for real, so that nothing is `sending` when the next statistics are taken.
        let sent = Delivery::Sent { remote_id: None };
        let outcomes = claimed.iter().map(|m| (m.id, &sent, None));
        assert_eq!(
            store.record(None, outcomes, false).unwrap().written,
            BATCH as u64
        );
    }
}

#[test]
fn the_searches_for_expired_and_next_due_messages_stay_on_their_indexes_whatever_the_statistics_say(
) {
    // Statistics taken while nothing was pending (sent rows, ANALYZEd), then a backlog: the
    // planner believes no row is pending. Autovacuum is off so that it cannot fix them midway.
    let db = TestDb::migrated();
    let mut c = db.client();
    for statement in [
        "ALTER TABLE messages SET (autovacuum_enabled = false)",
        "INSERT INTO messages (recipient, content, status, sent_at)
         SELECT '+90555' || g, 'sent ' || g, 'sent', now() FROM generate_series(1, 30000) g",
        "VACUUM ANALYZE messages",
        "INSERT INTO messages (recipient, content)
         SELECT '+90555' || g, 'due ' || g FROM generate_series(1, 20000) g",
    ] {
        c.batch_execute(statement).unwrap();
    }
    // The same search written inline walks every pending row (what each claim did before
    // sql/0007): this is the situation the function is for.
    let inline = pages_read(
        &mut c,
        "SELECT id FROM messages WHERE status = 'pending' AND expires_at <= now()
         ORDER BY expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED",
    );
    let function = pages_read(&mut c, "SELECT * FROM messages_past_expiry(1000)");
    assert!(
        inline > 100,
        "the inline search read only {inline} pages: the planner no longer errs here"
    );
    assert!(
        function < 20,
        "the claim's expiry search read {function} pages with nothing expired (inline: {inline})"
    );
    // The idle scheduler's look at when the next pending message falls due or expires: min()
    // walks every pending row here; the function reads the first entry of each index.
    let inline = pages_read(
        &mut c,
        "SELECT (SELECT min(next_attempt_at) FROM messages WHERE status = 'pending'),
                (SELECT min(expires_at) FROM messages
                 WHERE status = 'pending' AND expires_at IS NOT NULL AND isfinite(expires_at))",
    );
    let function = pages_read(&mut c, "SELECT * FROM messages_next_pending()");
    assert!(inline > 100, "min() read only {inline} pages");
    assert!(
        function < 20,
        "the next-due look read {function} pages (min(): {inline})"
    );
    // And it still finds what expired, oldest expiry first, and only pending rows.
    c.batch_execute(
        "UPDATE messages SET expires_at = now() - (id % 7) * interval '1 minute'
         WHERE id % 1000 = 0;
         UPDATE messages SET expires_at = now() - interval '1 hour'
         WHERE status = 'sent' AND id % 1000 = 1",
    )
    .unwrap();
    let found: Vec<(i64, String, f64)> = c
        .query(
            "SELECT p.id, m.status, extract(epoch FROM m.expires_at)::float8
             FROM messages_past_expiry(100) WITH ORDINALITY AS p(id, n)
             JOIN messages m ON m.id = p.id
             ORDER BY p.n",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // The 20 pending rows among ids 30,001 to 50,000 with id % 1000 = 0; no sent row.
    assert_eq!(found.len(), 20, "{found:?}");
    assert!(
        found.iter().all(|(_, status, _)| status == "pending"),
        "{found:?}"
    );
    assert!(found.windows(2).all(|w| w[0].2 <= w[1].2), "{found:?}");
    let (next, expiry, next_min, expiry_min): (f64, f64, f64, f64) = {
        let r = c
            .query_one(
                "SELECT extract(epoch FROM n.next_attempt_at)::float8,
                        extract(epoch FROM n.expires_at)::float8,
                        (SELECT extract(epoch FROM min(next_attempt_at))::float8
                         FROM messages WHERE status = 'pending'),
                        (SELECT extract(epoch FROM min(expires_at))::float8
                         FROM messages WHERE status = 'pending')
                 FROM messages_next_pending() AS n",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    assert_eq!((next, expiry), (next_min, expiry_min));
}
