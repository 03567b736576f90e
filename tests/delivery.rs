//! The core daemon end to end: the real binary against a real PostgreSQL database of its own,
//! delivering to a real HTTP receiver in the test.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const LONG: Duration = Duration::from_secs(30);

#[test]
fn delivers_every_message_exactly_once() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let ids = db.insert(50);
    let daemon = Daemon::start(&daemon_env(&db, &receiver.url()));

    wait_until(LONG, "all 50 messages sent", || db.count("sent") == 50);
    let keys = receiver.keys();
    assert_eq!(keys.len(), 50);
    assert!(
        keys.values().all(|&n| n == 1),
        "a message was sent twice: {keys:?}"
    );
    for id in &ids {
        let (status, attempts, error, remote) = db.row(*id);
        assert_eq!((status.as_str(), attempts, error), ("sent", 1, None));
        assert_eq!(remote.as_deref(), Some("remote-1"));
    }
    let first = receiver
        .seen()
        .into_iter()
        .find(|s| s.key() == ids[0])
        .unwrap();
    assert_eq!(
        first.json(),
        serde_json::json!({"to": "+905550000000", "content": "test message 0"})
    );
    assert_eq!(first.header("Content-Type"), Some("application/json"));
    assert_eq!(
        first.header("webhook-id"),
        Some(format!("msg_{}", ids[0]).as_str())
    );
    assert!(first.header("webhook-signature").is_none());
    let sent_at: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM messages WHERE sent_at IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(sent_at, 50);
    assert!(!daemon.log_lines("Message batch processed").is_empty());
    let batch = &daemon.log_lines("Message batch processed")[0];
    for field in ["duration", "sent", "failed", "retried"] {
        assert!(batch.get(field).is_some(), "{field} missing in {batch}");
    }
}

#[test]
fn a_cycle_claims_at_most_batch_size() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    db.insert(9);
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "BATCH_SIZE", "3");
    set(&mut env, "PROCESSING_INTERVAL", "1s");
    let daemon = Daemon::start(&env);
    wait_until(LONG, "all sent", || db.count("sent") == 9);
    let batches = daemon.log_lines("Message batch processed");
    assert!(batches.len() >= 3, "{batches:?}");
    assert!(batches.iter().all(|b| b["sent"].as_u64().unwrap() <= 3));
    // Three claims a second apart: the spread of the requests shows the interval was kept.
    let seen = receiver.seen();
    let first = seen.iter().map(|s| s.at).min().unwrap();
    let last = seen.iter().map(|s| s.at).max().unwrap();
    assert!(
        last - first >= Duration::from_millis(1800),
        "{:?}",
        last - first
    );
}

#[test]
fn transient_errors_are_retried_with_the_same_key() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, before| match before {
        0 => Answer::status(500).body("boom"),
        1 => Answer::status(503),
        _ => Answer::accepted(),
    });
    let id = db.insert(1)[0];
    let _daemon = Daemon::start(&daemon_env(&db, &receiver.url()));

    wait_until(LONG, "the message sent", || db.count("sent") == 1);
    let (status, attempts, error, _) = db.row(id);
    assert_eq!((status.as_str(), attempts), ("sent", 3));
    assert_eq!(
        error.as_deref(),
        Some("HTTP 503"),
        "the last error is kept for the record"
    );
    let seen = receiver.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen
        .iter()
        .all(|s| s.key() == id && s.header("webhook-id") == Some(&format!("msg_{id}"))));
    // Backoff: the retries are spread out, not immediate.
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(50));
}

#[test]
fn a_client_error_fails_at_once() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let id = db.insert(1)[0];
    receiver.respond_with(move |seen, _| {
        if seen.key() == id {
            Answer::status(400).body(r#"{"error":"bad recipient"}"#)
        } else {
            Answer::accepted()
        }
    });
    let _daemon = Daemon::start(&daemon_env(&db, &receiver.url()));

    wait_until(LONG, "the message failed", || db.count("failed") == 1);
    let (_, attempts, error, _) = db.row(id);
    assert_eq!(attempts, 1);
    assert_eq!(
        error.as_deref(),
        Some(r#"HTTP 400: {"error":"bad recipient"}"#)
    );
    // Later cycles deliver other messages but never retry the failed one.
    db.insert(3);
    wait_until(LONG, "the later messages sent", || db.count("sent") == 3);
    assert_eq!(receiver.keys()[&id], 1);
}

#[test]
fn gives_up_after_max_attempts() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::status(502));
    let id = db.insert(1)[0];
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "MAX_ATTEMPTS", "3");
    let _daemon = Daemon::start(&env);

    wait_until(LONG, "the message failed", || db.count("failed") == 1);
    let (_, attempts, error, _) = db.row(id);
    assert_eq!(attempts, 3);
    assert!(error.unwrap().contains("gave up after 3 attempts"));
    assert_eq!(receiver.count(), 3);
}

#[test]
fn retry_after_is_honoured() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, before| match before {
        0 => Answer::status(429).header("Retry-After", "1"),
        _ => Answer::accepted(),
    });
    db.insert(1);
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "RETRY_MAX_DELAY", "5s");
    let _daemon = Daemon::start(&env);
    wait_until(LONG, "the message sent", || db.count("sent") == 1);
    let seen = receiver.seen();
    assert!(
        seen[1].at - seen[0].at >= Duration::from_millis(950),
        "{:?}",
        seen[1].at - seen[0].at
    );
}

#[test]
fn receiver_down_means_retry_not_failure() {
    let db = TestDb::migrated();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/webhook");
    let ids = db.insert(3);
    let mut env = daemon_env(&db, &url);
    set(&mut env, "MAX_ATTEMPTS", "50");
    let _daemon = Daemon::start(&env);

    wait_until(LONG, "a few failed attempts", || {
        ids.iter().all(|id| db.row(*id).1 >= 2)
    });
    assert_eq!(db.count("failed"), 0);
    let (_, _, error, _) = db.row(ids[0]);
    assert!(error.unwrap().contains("request failed"));

    let receiver = Receiver::start_on(port);
    wait_until(LONG, "delivery once the receiver is back", || {
        db.count("sent") == 3
    });
    assert_eq!(receiver.keys().len(), 3);
}

#[test]
fn redirects_are_not_followed() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let elsewhere = Receiver::start();
    let target = elsewhere.url();
    receiver.respond_with(move |_, before| match before {
        0 => Answer::status(307).header("Location", &target),
        _ => Answer::accepted(),
    });
    let id = db.insert(1)[0];
    let _daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    wait_until(LONG, "the message sent", || db.count("sent") == 1);
    assert_eq!(db.row(id).1, 2);
    assert_eq!(elsewhere.count(), 0);
}

#[test]
fn requests_are_signed_as_standard_webhooks() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let key = b"a test key of some length";
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    let id = db.insert(1)[0];
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "WEBHOOK_SECRET", &secret);
    let daemon = Daemon::start(&env);
    wait_until(LONG, "the message sent", || db.count("sent") == 1);

    let seen = &receiver.seen()[0];
    let msg_id = seen.header("webhook-id").unwrap();
    assert_eq!(msg_id, format!("msg_{id}"));
    let timestamp: u64 = seen.header("webhook-timestamp").unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(timestamp) < 60);
    // Computed here from the raw body, independently of the daemon's code.
    let mut signed = format!("{msg_id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(&seen.body);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(&signed);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(seen.header("webhook-signature"), Some(expected.as_str()));
    // The secret never shows in the logs.
    let encoded = secret.trim_start_matches("whsec_");
    assert!(daemon.logs().iter().all(|l| !l.contains(encoded)));
}

#[test]
fn sigterm_mid_batch_finishes_and_leaves_nothing_sending() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_millis(300)));
    db.insert(40);
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "BATCH_SIZE", "20");
    let mut daemon = Daemon::start(&env);

    wait_until(LONG, "sends in flight", || receiver.count() >= 2);
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "clean stop");
    assert_eq!(db.count("sending"), 0);
    assert_eq!(db.count("sent") + db.count("pending"), 40);
    // Everything the receiver answered 2xx to is recorded as sent.
    assert_eq!(db.count("sent") as usize, receiver.keys().len());
    assert!(!daemon.log_lines("Message dispatcher stopped").is_empty());
}

#[test]
fn bad_configuration_exits_2_naming_the_variable() {
    let db = TestDb::new();
    for (name, value) in [
        ("BATCH_SIZE", "lots"),
        ("PROCESSING_INTERVAL", "10"),
        ("WEBHOOK_URL", "ftp://x"),
        ("LOG_FORMAT", "yaml"),
    ] {
        let mut env = daemon_env(&db, "http://127.0.0.1:9/hook");
        set(&mut env, name, value);
        for command in ["serve", "check-config"] {
            let out = run(DISPATCHER, &[command], &env);
            assert_eq!(out.status.code(), Some(2), "{command} with {name}={value}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(stderr.contains(&format!("{name}: ")), "{stderr}");
        }
    }
    let mut env = daemon_env(&db, "http://127.0.0.1:9/hook");
    env.retain(|(k, _)| k != "WEBHOOK_URL");
    let out = run(DISPATCHER, &["serve"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WEBHOOK_URL: required"));
    let out = run(DISPATCHER, &["frobnicate"], &env);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let env: Vec<(String, String)> = [
        ("DB_PASSWORD", "db-secret-1"),
        ("REDIS_PASSWORD", "redis-secret-2"),
        ("API_TOKEN", "token-secret-3"),
        ("WEBHOOK_URL", "https://user:hook-secret-4@example.com/hook"),
        ("WEBHOOK_SECRET", "whsec_c2VjcmV0LXNlY3JldC01"),
        ("BATCH_SIZE", "7"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let out = run(DISPATCHER, &["check-config"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("BATCH_SIZE=7\n"));
    assert!(text.contains("PROCESSING_INTERVAL=2m\n"));
    for secret in [
        "db-secret-1",
        "redis-secret-2",
        "token-secret-3",
        "hook-secret-4",
        "c2VjcmV0LXNlY3JldC01",
    ] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
}

#[test]
fn unreachable_database_is_a_fatal_error_with_exit_1() {
    let port = free_port();
    let env: Vec<(String, String)> = vec![
        (
            "DATABASE_URL".into(),
            format!("postgres://postgres:pw-secret@127.0.0.1:{port}/x"),
        ),
        ("WEBHOOK_URL".into(), "http://127.0.0.1:9/".into()),
    ];
    let out = run(DISPATCHER, &["migrate"], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("pw-secret"));
}

#[test]
fn add_test_messages_inserts_and_reports() {
    let db = TestDb::new();
    let env = vec![("DATABASE_URL".to_string(), db.url.clone())];
    let out = run(ADD_TEST_MESSAGES, &["25"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Inserted 25 test messages"
    );
    assert_eq!(db.count("pending"), 25);
    let out = run(ADD_TEST_MESSAGES, &[], &env);
    assert!(out.status.success());
    assert_eq!(db.count("pending"), 125);
    let out = run(ADD_TEST_MESSAGES, &["many"], &env);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn migrations_run_once_even_when_started_together() {
    let db = TestDb::new();
    let env = vec![("DATABASE_URL".to_string(), db.url.clone())];
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(DISPATCHER)
                .arg("migrate")
                .env_clear()
                .envs(env.clone())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    // Every file in sql/ exactly once (the versions are the primary key; a second run of one
    // would also have failed on the objects it creates).
    let applied: Vec<String> = db
        .client()
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(applied, migration_versions());
}

#[test]
fn an_idle_daemon_does_not_spin() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    for interval in ["2m", "0"] {
        let mut env = daemon_env(&db, &receiver.url());
        set(&mut env, "PROCESSING_INTERVAL", interval);
        let daemon = Daemon::start(&env);
        let before = cpu_ticks(daemon.pid());
        std::thread::sleep(Duration::from_secs(2));
        let used = cpu_ticks(daemon.pid()) - before;
        // A busy loop would burn ~200 ticks here; an idle daemon a handful at most.
        assert!(
            used < 40,
            "PROCESSING_INTERVAL={interval}: {used} ticks in 2 s while idle"
        );
    }
}
