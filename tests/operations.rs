//! The operations API of issue #12, end to end against the real daemon and a database of its own:
//! a message with its attempt history, listing by status, manual and bulk retry (a fresh
//! MAX_ATTEMPTS, history kept), cancel, idempotent and scheduled enqueue, retention, the queue
//! metrics — and the races: cancel against the claim, retry against the claim, concurrent
//! idempotent POSTs.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use rand::seq::SliceRandom;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);
const TOKEN: &str = "ops-token-51c7";

/// A daemon with API_TOKEN set, in continuous mode unless `extra` says otherwise.
fn daemon(db: &TestDb, receiver: &Receiver, extra: &[(&str, &str)]) -> Daemon {
    let mut env = daemon_env(db, &receiver.url());
    set(&mut env, "API_TOKEN", TOKEN);
    set(&mut env, "PROCESSING_INTERVAL", "0");
    set(&mut env, "LOG_LEVEL", "info");
    for (k, v) in extra {
        set(&mut env, k, v);
    }
    let d = Daemon::start(&env);
    wait_until(LONG, "/health 200", || {
        d.health().is_some_and(|(s, _)| s == 200)
    });
    d
}

/// A call with the token: (status, JSON body or Null).
fn api(d: &Daemon, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    api_with(d, method, path, body, &[])
}

fn api_with(
    d: &Daemon,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let mut all = vec![("Authorization", auth.as_str())];
    all.extend_from_slice(headers);
    let url = format!("http://127.0.0.1:{}{path}", d.port);
    let (status, text) = request(method, &url, body.map(str::as_bytes), &all)
        .unwrap_or_else(|| panic!("no answer to {method} {path}"));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn enqueue(d: &Daemon, recipient: &str) -> i64 {
    let body = json!({"recipient": recipient, "content": "hello"}).to_string();
    let (status, v) = api(d, "POST", "/messages", Some(&body));
    assert_eq!(status, 201, "{v}");
    v["id"].as_i64().unwrap()
}

fn stop_processing(d: &Daemon) {
    assert_eq!(api(d, "POST", "/processing/stop", None).0, 200);
}

fn start_processing(d: &Daemon) {
    assert_eq!(api(d, "POST", "/processing/start", None).0, 200);
}

fn status_of(db: &TestDb, id: i64) -> String {
    db.row(id).0
}

/// (attempt numbers in order, attempts, attempts_free) of a message.
fn history(db: &TestDb, id: i64) -> (Vec<i32>, i32, i32) {
    let mut c = db.client();
    let numbers = c
        .query(
            "SELECT attempt FROM message_attempts WHERE message_id = $1 ORDER BY attempt",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let r = c
        .query_one(
            "SELECT attempts, attempts_free FROM messages WHERE id = $1",
            &[&id],
        )
        .unwrap();
    (numbers, r.get(0), r.get(1))
}

/// The value of a sample (`name{labels}` or `name`) in a metrics exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn metrics(d: &Daemon) -> String {
    let url = format!("http://127.0.0.1:{}/metrics", d.port);
    request("GET", &url, None, &[]).unwrap().1
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

// ---------------------------------------------------------------------------------------------
// GET /messages/{id}, GET /messages

#[test]
fn a_message_reads_back_with_its_attempt_history() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    // Two 500s, then accepted.
    receiver.respond_with(|_, before| {
        if before < 2 {
            Answer::status(500).body("try later")
        } else {
            Answer::accepted()
        }
    });
    let d = daemon(&db, &receiver, &[]);
    let instance = d.health().unwrap().1["instance_id"].clone();
    let id = enqueue(&d, "+905551111111");
    wait_until(LONG, "the message sent", || status_of(&db, id) == "sent");

    let (status, m) = api(&d, "GET", &format!("/messages/{id}"), None);
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["id"], id);
    assert_eq!(m["recipient"], "+905551111111");
    assert_eq!(m["content"], "hello");
    assert_eq!(m["status"], "sent");
    assert_eq!(m["attempts"], 3);
    assert_eq!(m["remote_message_id"], "remote-1");
    for field in ["created_at", "updated_at", "sent_at", "next_attempt_at"] {
        let at = m[field].as_str().unwrap_or_else(|| panic!("{field}: {m}"));
        assert!(humantime::parse_rfc3339(at).is_ok(), "{field}: {at}");
    }
    for field in [
        "send_at",
        "expires_at",
        "idempotency_key",
        "claimed_by",
        "claimed_at",
    ] {
        assert!(m[field].is_null(), "{field}: {m}");
    }
    let history = m["history"].as_array().unwrap();
    assert_eq!(history.len(), 3, "{m}");
    let mut last_at = String::new();
    for (i, h) in history.iter().enumerate() {
        let keys: HashSet<&str> = h.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            HashSet::from([
                "attempt",
                "at",
                "duration_ms",
                "status_code",
                "error",
                "instance_id"
            ]),
        );
        assert_eq!(h["attempt"], i as i64 + 1);
        assert_eq!(h["instance_id"], instance);
        assert!(h["duration_ms"].as_i64().unwrap() >= 0);
        let at = h["at"].as_str().unwrap().to_owned();
        assert!(at > last_at, "oldest first: {history:?}");
        last_at = at;
    }
    assert_eq!(history[0]["status_code"], 500);
    assert!(history[0]["error"].as_str().unwrap().contains("500"));
    assert_eq!(history[2]["status_code"], 202);
    assert!(history[2]["error"].is_null());

    let (status, e) = api(&d, "GET", "/messages/999999", None);
    assert_eq!(
        (status, e["error"].as_str()),
        (404, Some("message 999999 not found"))
    );
    let (status, e) = api(&d, "GET", "/messages/abc", None);
    assert_eq!(status, 400);
    assert!(e["error"].as_str().unwrap().starts_with("id: "));
}

#[test]
fn messages_list_by_status_newest_first_each_exactly_once() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let d = daemon(&db, &receiver, &[]);
    stop_processing(&d);
    let ids = db.insert(23);
    // Every status, by SQL as an operator (or the daemon) would leave them.
    let mut c = db.client();
    let failed: Vec<i64> = ids.iter().copied().filter(|i| i % 3 == 0).collect();
    let cancelled: Vec<i64> = ids.iter().copied().filter(|i| i % 3 == 1).collect();
    c.execute(
        "UPDATE messages SET status = 'failed', last_error = 'x' WHERE id = ANY($1)",
        &[&failed],
    )
    .unwrap();
    c.execute(
        "UPDATE messages SET status = 'cancelled' WHERE id = ANY($1)",
        &[&cancelled],
    )
    .unwrap();

    let walk = |status: Option<&str>, limit: usize| -> Vec<i64> {
        let mut seen = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let mut q = format!("/messages?limit={limit}");
            if let Some(s) = status {
                q.push_str(&format!("&status={s}"));
            }
            if let Some(b) = before {
                q.push_str(&format!("&before={b}"));
            }
            let (code, page) = api(&d, "GET", &q, None);
            assert_eq!(code, 200, "{page}");
            for m in page["messages"].as_array().unwrap() {
                if let Some(s) = status {
                    assert_eq!(m["status"], s);
                }
                assert!(m.get("history").is_none());
                seen.push(m["id"].as_i64().unwrap());
            }
            match page["next"].as_i64() {
                Some(next) => before = Some(next),
                None => return seen,
            }
        }
    };
    let newest_first = |mut v: Vec<i64>| {
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    };
    assert_eq!(walk(Some("failed"), 2), newest_first(failed.clone()));
    assert_eq!(walk(Some("cancelled"), 3), newest_first(cancelled.clone()));
    let pending: Vec<i64> = ids.iter().copied().filter(|i| i % 3 == 2).collect();
    assert_eq!(walk(Some("pending"), 50), newest_first(pending));
    assert_eq!(walk(None, 5), newest_first(ids.clone()));
    assert!(walk(Some("expired"), 5).is_empty());
    let (code, e) = api(&d, "GET", "/messages?status=done", None);
    assert_eq!(code, 400);
    assert!(e["error"].as_str().unwrap().starts_with("status: "), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Retry

#[test]
fn a_retry_gives_a_fresh_max_attempts_and_keeps_the_history() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let fail = Arc::new(Mutex::new(true));
    let failing = fail.clone();
    receiver.respond_with(move |_, _| {
        if *failing.lock().unwrap() {
            Answer::status(500)
        } else {
            Answer::accepted()
        }
    });
    let d = daemon(&db, &receiver, &[("MAX_ATTEMPTS", "2")]);
    let id = enqueue(&d, "a");
    wait_until(LONG, "failed after 2 attempts", || {
        status_of(&db, id) == "failed"
    });
    assert_eq!(history(&db, id), (vec![1, 2], 2, 0));

    // Still failing: exactly two more requests, then failed again; history 1..4.
    let (code, v) = api(&d, "POST", &format!("/messages/{id}/retry"), None);
    assert_eq!((code, v), (200, json!({"id": id, "status": "pending"})));
    wait_until(LONG, "failed again", || {
        status_of(&db, id) == "failed" && history(&db, id).0.len() == 4
    });
    assert_eq!(history(&db, id), (vec![1, 2, 3, 4], 4, 2));
    assert_eq!(receiver.keys()[&id], 4);

    // The receiver is back: a retry (woken at once by NOTIFY) delivers it on attempt 5.
    *fail.lock().unwrap() = false;
    let started = Instant::now();
    assert_eq!(
        api(&d, "POST", &format!("/messages/{id}/retry"), Some("")).0,
        200
    );
    wait_until(LONG, "sent", || status_of(&db, id) == "sent");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the retry waited {:?} for the scheduler",
        started.elapsed()
    );
    assert_eq!(history(&db, id), (vec![1, 2, 3, 4, 5], 5, 4));
    let (_, m) = api(&d, "GET", &format!("/messages/{id}"), None);
    assert_eq!(m["history"].as_array().unwrap().len(), 5);

    // Only failed, expired or cancelled messages are retried.
    let (code, e) = api(&d, "POST", &format!("/messages/{id}/retry"), None);
    assert_eq!(code, 409);
    assert!(e["error"].as_str().unwrap().contains("is sent"), "{e}");
    assert_eq!(api(&d, "POST", "/messages/424242/retry", None).0, 404);
    stop_processing(&d);
    let pending = enqueue(&d, "b");
    assert_eq!(
        api(&d, "POST", &format!("/messages/{pending}/retry"), None).0,
        409
    );

    // Cancelled and expired ones are; an expired one gets the expiry given, or none.
    assert_eq!(
        api(&d, "POST", &format!("/messages/{pending}/cancel"), None).0,
        200
    );
    assert_eq!(
        api(&d, "POST", &format!("/messages/{pending}/retry"), None).0,
        200
    );
    assert_eq!(status_of(&db, pending), "pending");
    let mut c = db.client();
    c.execute(
        "UPDATE messages SET status = 'expired', expires_at = now() - interval '1 hour' WHERE id = $1",
        &[&pending],
    )
    .unwrap();
    let (code, e) = api(
        &d,
        "POST",
        &format!("/messages/{pending}/retry"),
        Some(r#"{"expires_at":"yesterday"}"#),
    );
    assert_eq!(code, 400, "{e}");
    let (code, _) = api(
        &d,
        "POST",
        &format!("/messages/{pending}/retry"),
        Some(r#"{"expires_at":"2031-02-03T04:05:06+01:00"}"#),
    );
    assert_eq!(code, 200);
    let (_, m) = api(&d, "GET", &format!("/messages/{pending}"), None);
    assert_eq!(m["expires_at"], "2031-02-03T03:05:06.000000Z");
    c.execute(
        "UPDATE messages SET status = 'expired' WHERE id = $1",
        &[&pending],
    )
    .unwrap();
    assert_eq!(
        api(&d, "POST", &format!("/messages/{pending}/retry"), None).0,
        200
    );
    let (_, m) = api(&d, "GET", &format!("/messages/{pending}"), None);
    assert!(m["expires_at"].is_null(), "{m}");
    start_processing(&d);
    wait_until(LONG, "the requeued message sent", || {
        status_of(&db, pending) == "sent"
    });
}

#[test]
fn bulk_retry_requeues_by_status_and_time_and_says_how_many() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let d = daemon(&db, &receiver, &[]);
    stop_processing(&d);
    let ids = db.insert(40);
    let mut c = db.client();
    // 0..10 failed 3 h ago, 10..20 failed 1 h ago, 20..30 expired 1 h ago, 30..40 pending.
    let ages = [
        (0, 10, "failed", 3),
        (10, 20, "failed", 1),
        (20, 30, "expired", 1),
    ];
    for (from, to, status, hours) in ages {
        c.execute(
            "UPDATE messages SET status = $2, attempts = 3,
                 updated_at = now() - $3::int * interval '1 hour'
             WHERE id = ANY($1)",
            &[&ids[from..to].to_vec(), &status, &hours],
        )
        .unwrap();
    }
    let two_hours_ago = rfc3339(SystemTime::now() - Duration::from_secs(7200));
    let retry = |body: Value| -> (u16, Value) {
        api(&d, "POST", "/messages/retry", Some(&body.to_string()))
    };
    // Only those that ended before `until`, at most `limit`, oldest first.
    assert_eq!(
        retry(json!({"status": "failed", "until": two_hours_ago, "limit": 4})),
        (200, json!({"requeued": 4}))
    );
    assert_eq!(
        retry(json!({"status": "failed", "until": two_hours_ago})),
        (200, json!({"requeued": 6}))
    );
    assert_eq!(db.count("pending"), 20);
    for id in &ids[0..10] {
        let (_, attempts, base) = history(&db, *id);
        assert_eq!((attempts, base), (3, 3), "a fresh MAX_ATTEMPTS from 3");
    }
    // `since`: the rest of the failed ones.
    assert_eq!(
        retry(json!({"status": "failed", "since": two_hours_ago, "until": null})),
        (200, json!({"requeued": 10}))
    );
    assert_eq!(db.count("failed"), 0);
    assert_eq!(
        retry(json!({"status": "expired", "limit": 10000})),
        (200, json!({"requeued": 10}))
    );
    assert_eq!(
        retry(json!({"status": "expired"})),
        (200, json!({"requeued": 0}))
    );
    let (code, e) = retry(json!({"status": "cancelled"}));
    assert_eq!(code, 400, "{e}");
    let (code, _) = retry(json!({"status": "failed", "limit": 10001}));
    assert_eq!(code, 400);

    assert_eq!(db.count("pending"), 40);
    start_processing(&d);
    wait_until(LONG, "all 40 sent", || db.count("sent") == 40);
    // Each was sent once more: attempts 4, its first three (made before) counted.
    assert_eq!(history(&db, ids[0]), (vec![4], 4, 3));
}

// ---------------------------------------------------------------------------------------------
// Cancel

#[test]
fn only_a_pending_message_can_be_cancelled_and_it_is_never_sent() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let d = daemon(&db, &receiver, &[]);
    let sent = enqueue(&d, "sent-one");
    wait_until(LONG, "sent", || status_of(&db, sent) == "sent");
    stop_processing(&d);
    let id = enqueue(&d, "cancel-me");
    let (code, v) = api(&d, "POST", &format!("/messages/{id}/cancel"), Some("{}"));
    assert_eq!((code, v), (200, json!({"id": id, "status": "cancelled"})));
    let (code, e) = api(&d, "POST", &format!("/messages/{id}/cancel"), None);
    assert_eq!(code, 409);
    assert!(e["error"].as_str().unwrap().contains("is cancelled"), "{e}");
    let (code, e) = api(&d, "POST", &format!("/messages/{sent}/cancel"), None);
    assert_eq!(code, 409);
    assert!(e["error"].as_str().unwrap().contains("is sent"), "{e}");
    assert_eq!(api(&d, "POST", "/messages/987654/cancel", None).0, 404);
    start_processing(&d);
    let later = enqueue(&d, "after");
    wait_until(LONG, "the next message sent", || {
        status_of(&db, later) == "sent"
    });
    assert!(!receiver.keys().contains_key(&id));
    assert_eq!(status_of(&db, id), "cancelled");
}

/// Cancels race a fast daemon's claims over a thousand messages: each cancel has one winner.
/// A 200 means the message is `cancelled` and the receiver never saw it; a 409 means the claim
/// won and the message was sent.
#[test]
fn a_cancel_racing_the_claim_has_one_winner() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_millis(2)));
    let d = daemon(
        &db,
        &receiver,
        &[("BATCH_SIZE", "20"), ("WORKER_COUNT", "8")],
    );
    stop_processing(&d);
    let mut ids = db.insert(1000);
    ids.shuffle(&mut rand::rng());
    let results = Arc::new(Mutex::new(HashMap::<i64, u16>::new()));
    let go = Arc::new(Barrier::new(5));
    let threads: Vec<_> = ids
        .chunks(250)
        .map(|chunk| {
            let (chunk, results, go) = (chunk.to_vec(), results.clone(), go.clone());
            let port = d.port;
            std::thread::spawn(move || {
                go.wait();
                for id in chunk {
                    let url = format!("http://127.0.0.1:{port}/messages/{id}/cancel");
                    let auth = format!("Bearer {TOKEN}");
                    let (status, _) =
                        request("POST", &url, None, &[("Authorization", &auth)]).unwrap();
                    results.lock().unwrap().insert(id, status);
                }
            })
        })
        .collect();
    go.wait();
    start_processing(&d);
    for t in threads {
        t.join().unwrap();
    }
    wait_until(LONG, "nothing left pending or sending", || {
        db.count_unfinished() == 0
    });
    let results = results.lock().unwrap();
    let seen = receiver.keys();
    let (mut won, mut lost) = (0, 0);
    for (id, status) in results.iter() {
        match status {
            200 => {
                won += 1;
                assert_eq!(status_of(&db, *id), "cancelled", "message {id}");
                assert!(
                    !seen.contains_key(id),
                    "message {id} was cancelled (200) yet sent"
                );
            }
            409 => {
                lost += 1;
                assert_eq!(status_of(&db, *id), "sent", "message {id}");
                // At least once: a request that timed out is made again.
                assert!(seen.contains_key(id), "message {id}");
            }
            other => panic!("message {id}: cancel answered {other}"),
        }
    }
    eprintln!("cancel vs claim: {won} cancels won, {lost} lost to the claim");
    assert_eq!(won + lost, 1000);
    assert_eq!(db.count("cancelled"), won as i64);
    assert_eq!(
        seen.len(),
        lost,
        "only the messages whose cancel lost were sent"
    );
    assert!(
        won > 0 && lost > 0,
        "no race happened: {won} won, {lost} lost"
    );
}

/// Retries race the claims: MAX_ATTEMPTS=1 and a receiver that fails each message's first
/// request, so every message fails at least once; two threads per message keep retrying it
/// while the daemon claims, until it is sent. A retry answers 200 only for a failed message and
/// then leads to exactly one more request: for every message the number of 200s is its requests
/// minus one (no requeue lost, none doubled by the two threads), and its history holds every
/// request, numbered 1, 2, … with a fresh MAX_ATTEMPTS after the last retry.
#[test]
fn retries_racing_the_claim_requeue_each_failure_once() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, before| {
        if before == 0 {
            Answer::status(503)
        } else {
            Answer::accepted()
        }
    });
    let d = daemon(
        &db,
        &receiver,
        &[
            ("MAX_ATTEMPTS", "1"),
            ("BATCH_SIZE", "20"),
            ("WORKER_COUNT", "8"),
            // Keep the circuit closed through a storm of first-request failures.
            ("WEBHOOK_CIRCUIT_THRESHOLD", "10000"),
        ],
    );
    stop_processing(&d);
    let ids = db.insert(300);
    let answers = Arc::new(Mutex::new(HashMap::<i64, Vec<u16>>::new()));
    let go = Arc::new(Barrier::new(5));
    let threads: Vec<_> = (0..4)
        .map(|n| {
            // Threads 0 and 1 share the first half, 2 and 3 the second: two retriers a message.
            let half = if n < 2 { &ids[..150] } else { &ids[150..] };
            let mut left = half.to_vec();
            left.shuffle(&mut rand::rng());
            let (answers, go, port) = (answers.clone(), go.clone(), d.port);
            std::thread::spawn(move || {
                go.wait();
                let auth = format!("Bearer {TOKEN}");
                let deadline = Instant::now() + LONG;
                while !left.is_empty() && Instant::now() < deadline {
                    left.retain(|id| {
                        let url = format!("http://127.0.0.1:{port}/messages/{id}/retry");
                        let (status, text) =
                            request("POST", &url, None, &[("Authorization", &auth)]).unwrap();
                        answers.lock().unwrap().entry(*id).or_default().push(status);
                        // Done once it is delivered.
                        !(status == 409 && text.contains("is sent"))
                    });
                }
            })
        })
        .collect();
    go.wait();
    start_processing(&d);
    for t in threads {
        t.join().unwrap();
    }
    wait_until(LONG, "all 300 sent", || db.count("sent") == 300);
    let answers = answers.lock().unwrap();
    let seen = receiver.keys();
    let (mut requeues, mut refused, mut twice) = (0, 0, 0);
    for id in &ids {
        let got = &answers[id];
        assert!(got.iter().all(|s| [200, 409].contains(s)), "{id}: {got:?}");
        let ok = got.iter().filter(|s| **s == 200).count() as i32;
        let (numbers, attempts, base) = history(&db, *id);
        assert!(ok >= 1, "message {id}: never requeued: {got:?}");
        assert_eq!(ok, attempts - 1, "message {id}: retry answers {got:?}");
        assert_eq!(base, attempts - 1, "message {id}");
        assert_eq!(numbers, (1..=attempts).collect::<Vec<_>>(), "message {id}");
        // A request that timed out on the way may not have reached the receiver.
        assert!(seen.get(id).is_some_and(|n| *n as i32 <= attempts), "{id}");
        requeues += ok;
        refused += got.len() as i32 - ok;
        twice += i32::from(ok > 1);
    }
    eprintln!(
        "retry vs claim: {requeues} requeues for 300 messages ({twice} failed more than once), {refused} retries refused with 409"
    );
    // A retry after the delivery is refused, and nothing is sent again.
    let before = receiver.count();
    assert_eq!(
        api(&d, "POST", &format!("/messages/{}/retry", ids[0]), None).0,
        409
    );
    assert_eq!(db.count("pending"), 0);
    assert_eq!(receiver.count(), before);
}

// ---------------------------------------------------------------------------------------------
// Idempotent and scheduled enqueue

#[test]
fn an_idempotency_key_enqueues_once() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let d = daemon(&db, &receiver, &[]);
    stop_processing(&d);
    let key = [("Idempotency-Key", "order-17/otp")];
    let body =
        r#"{"recipient":"+905551111111","content":"code 1","send_at":"2020-01-01T03:00:00+03:00"}"#;
    let (code, first) = api_with(&d, "POST", "/messages", Some(body), &key);
    assert_eq!(code, 201, "{first}");
    let id = first["id"].as_i64().unwrap();
    // The same request written differently is a repeat.
    let same = r#"{ "send_at": "2020-01-01T00:00:00Z", "content": "code 1", "recipient": "+905551111111" }"#;
    assert_eq!(
        api_with(&d, "POST", "/messages", Some(same), &key),
        (200, json!({ "id": id }))
    );
    let (code, e) = api_with(
        &d,
        "POST",
        "/messages",
        Some(r#"{"recipient":"+905551111111","content":"code 2"}"#),
        &key,
    );
    assert_eq!(code, 409, "{e}");
    assert!(e["error"]
        .as_str()
        .unwrap()
        .starts_with("Idempotency-Key: "));
    let total = |db: &TestDb| -> i64 {
        db.client()
            .query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(total(&db), 1);
    let (_, m) = api(&d, "GET", &format!("/messages/{id}"), None);
    assert_eq!(m["idempotency_key"], "order-17/otp");
    // Without a key, the same body is another message; a bad key is refused.
    assert_eq!(api(&d, "POST", "/messages", Some(body)).0, 201);
    let long = "k".repeat(256);
    let (code, e) = api_with(
        &d,
        "POST",
        "/messages",
        Some(body),
        &[("Idempotency-Key", &long)],
    );
    assert_eq!(code, 400, "{e}");
    assert_eq!(total(&db), 2);

    // Concurrent identical requests: one row, one 201, the same id for all.
    let race = |key: String, bodies: Vec<String>| -> Vec<(u16, Value)> {
        let go = Arc::new(Barrier::new(bodies.len()));
        let threads: Vec<_> = bodies
            .into_iter()
            .map(|body| {
                let (go, key, port) = (go.clone(), key.clone(), d.port);
                std::thread::spawn(move || {
                    let auth = format!("Bearer {TOKEN}");
                    let url = format!("http://127.0.0.1:{port}/messages");
                    go.wait();
                    let (s, t) = request(
                        "POST",
                        &url,
                        Some(body.as_bytes()),
                        &[("Authorization", &auth), ("Idempotency-Key", &key)],
                    )
                    .unwrap();
                    (s, serde_json::from_str(&t).unwrap())
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    };
    for round in 0..5 {
        let before = total(&db);
        let body = format!(r#"{{"recipient":"r{round}","content":"same"}}"#);
        let answers = race(format!("race-{round}"), vec![body; 16]);
        let created = answers.iter().filter(|(s, _)| *s == 201).count();
        let repeated = answers.iter().filter(|(s, _)| *s == 200).count();
        assert_eq!((created, repeated), (1, 15), "{answers:?}");
        let ids: HashSet<&Value> = answers.iter().map(|(_, v)| &v["id"]).collect();
        assert_eq!(ids.len(), 1, "{answers:?}");
        assert_eq!(total(&db), before + 1);
    }
    // Concurrent requests with one key and two bodies: one row; the other body gets 409.
    let bodies: Vec<String> = (0..16)
        .map(|i| format!(r#"{{"recipient":"r","content":"body {}"}}"#, i % 2))
        .collect();
    let before = total(&db);
    let answers = race("mixed".into(), bodies);
    assert_eq!(total(&db), before + 1);
    let codes: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes.iter().filter(|s| **s == 201).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|s| **s == 409).count(), 8, "{codes:?}");
    assert_eq!(codes.iter().filter(|s| **s == 200).count(), 7, "{codes:?}");
}

#[test]
fn nothing_is_sent_before_send_at() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let d = daemon(&db, &receiver, &[]);
    let text = rfc3339(SystemTime::now() + Duration::from_secs(3));
    let send_at = humantime::parse_rfc3339(&text).unwrap();
    let body = json!({"recipient": "later", "content": "x", "send_at": text});
    let (code, v) = api(&d, "POST", "/messages", Some(&body.to_string()));
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_i64().unwrap();
    // The same by SQL: the send_at column, nothing else.
    let by_sql: i64 = db
        .client()
        .query_one(
            "INSERT INTO messages (recipient, content, send_at)
             VALUES ('later-sql', 'x', now() + interval '3 seconds') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    // A past send_at is now.
    let past = json!({"recipient": "now", "content": "x", "send_at": "2001-01-01T00:00:00Z"});
    let now_id = api(&d, "POST", "/messages", Some(&past.to_string())).1["id"]
        .as_i64()
        .unwrap();
    wait_until(LONG, "the past-scheduled one sent", || {
        status_of(&db, now_id) == "sent"
    });
    let (_, m) = api(&d, "GET", &format!("/messages/{id}"), None);
    assert_eq!(m["status"], "pending");
    assert_eq!(m["send_at"], m["next_attempt_at"], "{m}");
    wait_until(LONG, "both scheduled ones sent", || {
        status_of(&db, id) == "sent" && status_of(&db, by_sql) == "sent"
    });
    let arrivals: HashMap<i64, SystemTime> = receiver
        .seen()
        .iter()
        .map(|s| (s.key(), SystemTime::now() - s.at.elapsed()))
        .collect();
    assert!(
        arrivals[&id] >= send_at,
        "sent {:?} before its send_at",
        send_at.duration_since(arrivals[&id]).unwrap_or_default()
    );
    // Continuous mode woke for it: not a minute late.
    assert!(arrivals[&id] < send_at + Duration::from_secs(3));
    let (code, e) = api(
        &d,
        "POST",
        "/messages",
        Some(r#"{"recipient":"a","content":"b","send_at":"tomorrow"}"#),
    );
    assert_eq!(code, 400);
    assert!(e["error"].as_str().unwrap().starts_with("send_at: "), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Retention and metrics

/// Rows of the given shape, by SQL: `n` messages of `status`, ended `age` ago.
fn old_rows(db: &TestDb, n: i64, status: &str, age: &str) -> Vec<i64> {
    let rows = db
        .client()
        .query(
            "INSERT INTO messages (recipient, content, status, attempts, sent_at, updated_at,
                                   created_at)
             SELECT 'r' || g, 'old', $2,
                    1,
                    CASE WHEN $2 = 'sent' THEN now() - $3::text::interval END,
                    now() - $3::text::interval, now() - $3::text::interval
             FROM generate_series(1, $1::bigint) g
             RETURNING id",
            &[&n, &status, &age],
        )
        .unwrap();
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    // Their attempt history goes with them.
    db.client()
        .execute(
            "INSERT INTO message_attempts (message_id, attempt, started_at, duration_ms, instance_id)
             SELECT id, 1, updated_at, 5, 'old-instance' FROM messages WHERE id = ANY($1)",
            &[&ids],
        )
        .unwrap();
    ids
}

fn count_where(db: &TestDb, sql: &str) -> i64 {
    db.client()
        .query_one(&format!("SELECT count(*) FROM messages WHERE {sql}"), &[])
        .unwrap()
        .get(0)
}

#[test]
fn retention_deletes_only_old_ended_rows_while_a_backlog_is_sent() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let old_sent = old_rows(&db, 2500, "sent", "2 hours");
    old_rows(&db, 300, "sent", "10 minutes");
    old_rows(&db, 1200, "failed", "3 hours");
    old_rows(&db, 100, "expired", "3 hours");
    old_rows(&db, 100, "cancelled", "3 hours");
    old_rows(&db, 50, "failed", "5 minutes");
    old_rows(&db, 200, "pending", "3 hours");
    db.client()
        .execute(
            "INSERT INTO messages (recipient, content)
             SELECT 'backlog' || g, 'new' FROM generate_series(1, 2000) g",
            &[],
        )
        .unwrap();
    let d = daemon(
        &db,
        &receiver,
        &[
            ("SENT_RETENTION", "1h"),
            ("FAILED_RETENTION", "2h"),
            ("BATCH_SIZE", "50"),
            ("WORKER_COUNT", "8"),
        ],
    );
    let started = Instant::now();
    let pruned = |status: &str| {
        sample(
            &metrics(&d),
            &format!("message_dispatcher_messages_pruned_total{{status=\"{status}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    wait_until(LONG, "retention done and the backlog sent", || {
        pruned("sent") == 2500.0 && pruned("failed") == 1200.0 && db.count_unfinished() == 0
    });
    eprintln!(
        "retention and a backlog of 2,200: done in {:?}",
        started.elapsed()
    );
    assert_eq!(pruned("expired"), 100.0);
    assert_eq!(pruned("cancelled"), 100.0);
    // What is left: the recent sent ones, the whole backlog (just sent), the recent failures.
    assert_eq!(db.count("sent"), 300 + 2000 + 200);
    assert_eq!(db.count("failed"), 50);
    assert_eq!(db.count("expired") + db.count("cancelled"), 0);
    assert_eq!(
        count_where(
            &db,
            "content = 'old' AND status = 'sent' AND sent_at < now() - interval '1 hour'"
        ),
        0
    );
    assert_eq!(receiver.count(), 2200);
    let orphans: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM message_attempts WHERE message_id = ANY($1)",
            &[&old_sent],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        orphans, 0,
        "the history of deleted messages is gone with them"
    );
    let info = d.log_lines("Retention deleted old messages");
    let total: u64 = info.iter().map(|l| l["deleted"].as_u64().unwrap()).sum();
    assert_eq!(total, 3900);
}

/// With the lease on, only the instance holding it prunes.
#[test]
fn retention_runs_on_the_lease_holder_only() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    old_rows(&db, 1500, "sent", "2 hours");
    let key = unique("ops_lock");
    let lease = [
        ("SENT_RETENTION", "1h"),
        ("DISTRIBUTED_LOCK_ENABLED", "true"),
        ("DISTRIBUTED_LOCK_KEY", key.as_str()),
        ("DISTRIBUTED_LOCK_TTL", "10s"),
        ("REDIS_URL", &redis_url()),
    ];
    let lease: Vec<(&str, &str)> = lease.iter().map(|(k, v)| (*k, *v)).collect();
    let a = daemon(&db, &receiver, &lease);
    let b = daemon(&db, &receiver, &lease);
    let held = |d: &Daemon| d.health().unwrap().1["lock"]["held"] == true;
    wait_until(LONG, "a leader", || held(&a) || held(&b));
    let (leader, standby) = if held(&a) { (&a, &b) } else { (&b, &a) };
    let series = "message_dispatcher_messages_pruned_total{status=\"sent\"}";
    wait_until(LONG, "the leader to prune", || {
        sample(&metrics(leader), series) == Some(1500.0)
    });
    assert_eq!(sample(&metrics(standby), series), Some(0.0));
    assert_eq!(db.count("sent"), 0);
}

#[test]
fn metrics_show_every_status_and_the_oldest_due_age() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    old_rows(&db, 3, "sent", "1 hour");
    old_rows(&db, 4, "failed", "1 hour");
    old_rows(&db, 5, "expired", "1 hour");
    old_rows(&db, 6, "cancelled", "1 hour");
    db.client()
        .execute(
            "INSERT INTO messages (recipient, content, next_attempt_at)
             VALUES ('a', 'due long ago', now() - interval '90 seconds'),
                    ('b', 'due later', now() + interval '1 hour')",
            &[],
        )
        .unwrap();
    db.client()
        .execute(
            "UPDATE dispatcher_state SET processing_enabled = false",
            &[],
        )
        .unwrap();
    let d = daemon(&db, &receiver, &[]);
    let text = metrics(&d);
    for (status, n) in [
        ("pending", 2.0),
        ("sending", 0.0),
        ("sent", 3.0),
        ("failed", 4.0),
        ("expired", 5.0),
        ("cancelled", 6.0),
    ] {
        let series = format!("message_dispatcher_queue_depth{{status=\"{status}\"}}");
        assert_eq!(sample(&text, &series), Some(n), "{series}\n{text}");
    }
    let age = sample(&text, "message_dispatcher_oldest_due_pending_age_seconds").unwrap();
    assert!((90.0..120.0).contains(&age), "{age}");
    // Nothing due: 0.
    start_processing(&d);
    wait_until(LONG, "the due one sent", || db.count("sent") == 4);
    let age = sample(
        &metrics(&d),
        "message_dispatcher_oldest_due_pending_age_seconds",
    );
    assert_eq!(age, Some(0.0));
}
