//! A receiver in trouble, end to end (issue #11): refused connections and 503s for longer than
//! the old retry window under the default retry settings, a 429 that pauses the whole sender,
//! WEBHOOK_RATE_LIMIT measured at the receiver, and the circuit breaker across lease fail-overs.
//! Each test drives the real binary against a real receiver and reads the outcome from the
//! database, the receiver's timestamps, `/health`, `/metrics` and the logs.
//!
//! The tests run one at a time: several measure timing, and the machine is small.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

const LONG: Duration = Duration::from_secs(60);
/// WEBHOOK_CIRCUIT_THRESHOLD's default.
const THRESHOLD: usize = 5;
/// The cap on the time between two probes of an open circuit.
const PROBE_CAP: Duration = Duration::from_secs(30);

/// `daemon_env` without its fast retry settings: MAX_ATTEMPTS, RETRY_BASE_DELAY and
/// RETRY_MAX_DELAY take their defaults (20, 5s, 10m).
fn default_retry_env(db: &TestDb, webhook: &str) -> Vec<(String, String)> {
    let mut env = daemon_env(db, webhook);
    env.retain(|(k, _)| {
        !matches!(
            k.as_str(),
            "MAX_ATTEMPTS" | "RETRY_BASE_DELAY" | "RETRY_MAX_DELAY"
        )
    });
    env
}

/// One sample of `/health`: status code, `webhook.circuit`, `webhook.paused`, `lock.held`.
#[derive(Debug)]
struct HealthSample {
    code: u16,
    circuit: String,
    paused: bool,
    held: bool,
}

fn health(daemon: &Daemon) -> HealthSample {
    let (code, body) = daemon.health().expect("/health answers");
    HealthSample {
        code,
        circuit: body["webhook"]["circuit"]
            .as_str()
            .unwrap_or_else(|| panic!("no webhook.circuit in {body}"))
            .to_owned(),
        paused: body["webhook"]["paused"]
            .as_bool()
            .unwrap_or_else(|| panic!("no webhook.paused in {body}")),
        held: body["lock"]["held"] == true,
    }
}

/// The value of an unlabelled metric in `/metrics`.
fn metric(daemon: &Daemon, name: &str) -> f64 {
    let url = format!("http://127.0.0.1:{}/metrics", daemon.port);
    let (code, text) = request("GET", &url, None, &[]).expect("/metrics answers");
    assert_eq!(code, 200);
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

const CIRCUIT_STATE: &str = "message_dispatcher_webhook_circuit_state";
const CIRCUIT_OPENED: &str = "message_dispatcher_webhook_circuit_opened_total";
const SLOW_DOWNS: &str = "message_dispatcher_webhook_slow_downs_total";

/// When the circuit's probes failed and when it closed, in seconds after it (first) opened.
fn probe_timeline(daemon: &Daemon) -> String {
    let opened = log_time_ms(&daemon.log_lines("Webhook circuit opened")[0]);
    let at = |msg: &str| -> Vec<String> {
        daemon
            .log_lines(msg)
            .iter()
            .map(|l| format!("{:.1}", (log_time_ms(l) - opened) as f64 / 1000.0))
            .collect()
    };
    format!(
        "probes failed at {:?} s, closed at {:?} s after opening",
        at("Webhook probe failed, circuit stays open"),
        at("Webhook circuit closed")
    )
}

/// Webhook requests made, as the database counts them.
fn attempts_sum(db: &TestDb) -> i64 {
    db.client()
        .query_one(
            "SELECT coalesce(sum(attempts), 0)::bigint FROM messages",
            &[],
        )
        .unwrap()
        .get(0)
}

/// Samples `/health` until `until`: it must answer 200 (a receiver in trouble is no reason to
/// restart the daemon) with a circuit that is not closed. Returns how many samples were taken.
fn hold_open_until(daemon: &Daemon, until: Instant) -> usize {
    let mut samples = 0;
    while Instant::now() < until {
        let h = health(daemon);
        assert_eq!(
            h.code, 200,
            "liveness must not depend on the receiver: {h:?}"
        );
        assert!(
            h.circuit == "open" || h.circuit == "half-open",
            "circuit closed during the outage: {h:?}"
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    samples
}

/// No listener on the webhook's port for 25 s, then the receiver comes up there. Under the
/// default retry settings (the old ones gave up after ~15 s) nothing may end `failed`, the
/// outage costs only the threshold's requests and a few probes, and the backlog goes out once a
/// probe finds the receiver back (probes are at most 30 s apart).
#[test]
fn refused_connections_for_longer_than_the_old_retry_window_fail_nothing() {
    let _serial = serial();
    let db = TestDb::migrated();
    let total = 200;
    db.insert(total);
    let port = free_port();
    let env = default_retry_env(&db, &format!("http://127.0.0.1:{port}/webhook"));
    let started = Instant::now();
    let daemon = Daemon::start(&env);

    daemon.wait_log("Webhook circuit opened", LONG);
    let opened_after = started.elapsed();
    let opened = &daemon.log_lines("Webhook circuit opened")[0];
    assert_eq!(opened["failures"], THRESHOLD, "{opened}");
    wait_until(Duration::from_secs(5), "circuit_state 1", || {
        metric(&daemon, CIRCUIT_STATE) == 1.0
    });
    assert_eq!(metric(&daemon, CIRCUIT_OPENED), 1.0);
    hold_open_until(&daemon, started + Duration::from_secs(25));

    // The outage, as the daemon counts it: every request made is an attempt.
    let requests = attempts_sum(&db);
    let retries = daemon
        .log_lines("Message delivery failed, will retry")
        .len();
    let probes = daemon
        .log_lines("Webhook probe failed, circuit stays open")
        .len();
    eprintln!(
        "refused for {:?}: circuit opened after {opened_after:?}; {requests} requests \
         ({retries} failed-request log lines, {probes} failed probes)",
        started.elapsed()
    );
    assert_eq!(db.count("failed"), 0);
    // Before it opened: the threshold, plus what the other workers already had on the wire.
    // Then probes at 1, 3, 7, 15 s after opening (31 s is after the receiver is back).
    assert!((3..=5).contains(&probes), "{probes} failed probes in ~25 s");
    assert!(
        requests >= (THRESHOLD + probes) as i64 && requests <= (THRESHOLD + 3 + probes + 1) as i64,
        "{requests} requests during the outage ({probes} probes)"
    );

    let receiver = Receiver::start_on(port);
    let back = Instant::now();
    wait_until(LONG, "the whole backlog sent", || {
        db.count("sent") == total as i64
    });
    let drained = back.elapsed();
    let first = receiver.seen().iter().map(|s| s.at).min().unwrap();
    eprintln!(
        "receiver back: first request (the probe) after {:?}, all {total} sent after {drained:?}",
        first - back
    );
    eprintln!("{}", probe_timeline(&daemon));
    assert!(
        drained < PROBE_CAP + Duration::from_secs(10),
        "the backlog took {drained:?} after the receiver came back"
    );
    assert_eq!(db.count("failed"), 0);
    assert_eq!(receiver.count(), total, "each message sent once");
    assert_eq!(receiver.keys().len(), total);
    // Messages held while the circuit was open gave their attempt back: attempts count requests.
    let retries = daemon
        .log_lines("Message delivery failed, will retry")
        .len();
    assert_eq!(attempts_sum(&db), (total + retries) as i64);
    daemon.wait_log("Webhook circuit closed", Duration::from_secs(5));
    assert_eq!(metric(&daemon, CIRCUIT_STATE), 0.0);
    assert_eq!(health(&daemon).circuit, "closed");
}

/// The receiver answers 503 (no Retry-After) for ~28 s, then 202: nothing fails, few requests
/// reach it meanwhile, /health and /metrics show the circuit open, then closed.
#[test]
fn a_receiver_answering_503_for_half_a_minute_sees_few_requests_and_nothing_fails() {
    let _serial = serial();
    let db = TestDb::migrated();
    let total = 50;
    db.insert(total);
    let receiver = Receiver::start();
    let up = Arc::new(AtomicBool::new(false));
    let during_outage = Arc::new(AtomicUsize::new(0));
    let (u, d) = (up.clone(), during_outage.clone());
    receiver.respond_with(move |_, _| {
        if u.load(Ordering::SeqCst) {
            Answer::accepted()
        } else {
            d.fetch_add(1, Ordering::SeqCst);
            Answer::status(503).body("maintenance")
        }
    });
    let started = Instant::now();
    let daemon = Daemon::start(&default_retry_env(&db, &receiver.url()));

    daemon.wait_log("Webhook circuit opened", LONG);
    let opened = Instant::now();
    let h = health(&daemon);
    assert_eq!(h.code, 200, "{h:?}");
    assert_ne!(h.circuit, "closed", "{h:?}");
    assert!(
        !h.paused,
        "a 503 without Retry-After is trouble, not a pause"
    );
    wait_until(Duration::from_secs(5), "circuit_state 1", || {
        metric(&daemon, CIRCUIT_STATE) == 1.0
    });
    assert!(metric(&daemon, CIRCUIT_OPENED) >= 1.0);
    // Probes go out 1, 3, 7, 15 and 31 s after the circuit opened: come back before the last.
    hold_open_until(&daemon, opened + Duration::from_secs(28));

    let seen_503 = during_outage.load(Ordering::SeqCst);
    up.store(true, Ordering::SeqCst);
    let back = Instant::now();
    let probes = daemon
        .log_lines("Webhook probe failed, circuit stays open")
        .len();
    assert_eq!(db.count("failed"), 0);
    wait_until(LONG, "everything sent", || db.count("sent") == total as i64);
    let drained = back.elapsed();
    eprintln!(
        "503 for {:?} (circuit open for {:?}): {seen_503} requests, {probes} failed probes; \
         all {total} sent {drained:?} after the receiver recovered",
        back - started,
        back - opened
    );
    assert!(
        seen_503 <= THRESHOLD + 3 + probes + 1,
        "{seen_503} requests during the 503s ({probes} probes)"
    );
    eprintln!("{}", probe_timeline(&daemon));
    assert!((3..=5).contains(&probes), "{probes} probes in 28 s");
    assert!(drained < Duration::from_secs(15), "drained in {drained:?}");
    assert_eq!(db.count("failed"), 0);
    assert_eq!(receiver.keys().len(), total);
    assert_eq!(
        attempts_sum(&db),
        receiver.count() as i64,
        "attempts count requests; held messages gave theirs back"
    );
    daemon.wait_log("Webhook circuit closed", Duration::from_secs(5));
    wait_until(Duration::from_secs(5), "circuit_state 0", || {
        metric(&daemon, CIRCUIT_STATE) == 0.0
    });
    let h = health(&daemon);
    assert_eq!((h.code, h.circuit.as_str()), (200, "closed"));
    assert_eq!(metric(&daemon, CIRCUIT_OPENED), 1.0);
}

/// One 429 with `Retry-After: 2` pauses every worker: after the requests already under way,
/// nothing reaches the receiver until the pause ends; the message goes out afterwards.
#[test]
fn a_429_with_retry_after_pauses_the_whole_sender() {
    let _serial = serial();
    let db = TestDb::migrated();
    let total = 100;
    db.insert(total);
    let receiver = Receiver::start();
    let n = Arc::new(AtomicUsize::new(0));
    let throttled: Arc<Mutex<Option<i64>>> = Arc::default();
    let (count, t) = (n.clone(), throttled.clone());
    receiver.respond_with(move |seen, _| {
        if count.fetch_add(1, Ordering::SeqCst) == 20 {
            *t.lock().unwrap() = Some(seen.key());
            Answer::status(429).header("Retry-After", "2")
        } else {
            Answer::accepted().delay(Duration::from_millis(20))
        }
    });
    let mut env = default_retry_env(&db, &receiver.url());
    set(&mut env, "PROCESSING_INTERVAL", "0");
    let daemon = Daemon::start(&env);

    wait_until(LONG, "the 429", || throttled.lock().unwrap().is_some());
    wait_until(Duration::from_millis(1500), "/health paused", || {
        health(&daemon).paused
    });
    let throttled_id = throttled.lock().unwrap().unwrap();
    wait_until(LONG, "everything sent", || db.count("sent") == total as i64);

    let seen = receiver.seen();
    let t429 = seen.iter().find(|s| s.key() == throttled_id).unwrap().at;
    let mut after: Vec<Duration> = seen
        .iter()
        .filter(|s| s.at > t429)
        .map(|s| s.at - t429)
        .collect();
    after.sort();
    let in_flight = after
        .iter()
        .filter(|d| **d < Duration::from_millis(300))
        .count();
    let resumed = *after
        .iter()
        .find(|d| **d >= Duration::from_millis(300))
        .expect("requests after the pause");
    eprintln!(
        "429 at request 21: {in_flight} requests arrived within 300 ms (already under way), \
         the next {resumed:?} after it"
    );
    assert!(
        resumed >= Duration::from_millis(1800),
        "a request arrived {resumed:?} after the 429 (Retry-After: 2)"
    );
    assert!(
        resumed < Duration::from_secs(4),
        "sending resumed only {resumed:?} after the 429"
    );
    assert!(
        in_flight < 4,
        "{in_flight} requests right after the 429 (4 workers)"
    );
    let retried = seen
        .iter()
        .filter(|s| s.key() == throttled_id)
        .nth(1)
        .expect("the throttled message sent again");
    assert!(retried.at - t429 >= Duration::from_millis(1800));
    assert_eq!(db.row(throttled_id).0, "sent");
    assert_eq!(db.row(throttled_id).1, 2);
    assert_eq!(db.count("failed"), 0);
    assert_eq!(receiver.count(), total + 1);
    assert!(!health(&daemon).paused);
    assert_eq!(metric(&daemon, SLOW_DOWNS), 1.0);
    assert_eq!(metric(&daemon, CIRCUIT_OPENED), 0.0, "a 429 is not trouble");
    let logged = daemon.log_lines("Webhook asked to slow down, pausing sending");
    assert_eq!(logged.len(), 1, "{logged:?}");
}

/// WEBHOOK_RATE_LIMIT=20 with 8 workers claiming continuously: the receiver's clock sees at most
/// 20 requests a second overall, and no one-second window holds more than 21 + the burst (1).
#[test]
fn webhook_rate_limit_holds_at_the_receiver() {
    let _serial = serial();
    let db = TestDb::migrated();
    let total = 100;
    db.insert(total);
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    for (k, v) in [
        ("WEBHOOK_RATE_LIMIT", "20"),
        ("WORKER_COUNT", "8"),
        ("PROCESSING_INTERVAL", "0"),
        ("BATCH_SIZE", "20"),
    ] {
        set(&mut env, k, v);
    }
    let _daemon = Daemon::start(&env);
    wait_until(LONG, "everything sent", || db.count("sent") == total as i64);

    let mut at: Vec<Instant> = receiver.seen().iter().map(|s| s.at).collect();
    assert_eq!(at.len(), total);
    at.sort();
    let span = (at[total - 1] - at[0]).as_secs_f64();
    let rate = (total - 1) as f64 / span;
    let busiest = (0..total)
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|t| **t - at[i] < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    eprintln!(
        "WEBHOOK_RATE_LIMIT=20: {total} requests in {span:.3} s = {rate:.2}/s \
         ({:.2}/s counting n/span); busiest 1 s window {busiest}",
        total as f64 / span
    );
    assert!(rate <= 20.0 * 1.05 + 0.01, "{rate:.2} requests/s");
    assert!(busiest <= 21 + 1, "{busiest} requests in one second");
    assert!(
        rate >= 10.0,
        "the limiter holds back far too much: {rate:.2}/s"
    );
}

// ---- the circuit across lease fail-overs ----

/// Waits until exactly one of `daemons` says it holds the lease; returns its index.
fn wait_one_holder(daemons: &[&Daemon]) -> usize {
    let mut holder = 0;
    wait_until(Duration::from_secs(20), "exactly one lease holder", || {
        let held: Vec<bool> = daemons.iter().map(|d| health(d).held).collect();
        holder = held.iter().position(|h| *h).unwrap_or(0);
        held.iter().filter(|h| **h).count() == 1
    });
    holder
}

fn requests_from(receiver: &Receiver, n: usize) -> usize {
    receiver
        .seen()
        .iter()
        .filter(|s| s.path == path_of(n))
        .count()
}

/// How long a 503 takes: slow enough that a new leader's first THRESHOLD failures take a
/// visible moment (two rounds of 4 workers), during which /health shows its circuit closed.
const SLOW_503: Duration = Duration::from_millis(300);

/// Polls `daemon`'s /health from before it takes the lease until its circuit opens on its own
/// failures; asserts that, once it held the lease, it showed a closed circuit first.
fn takes_over_closed_then_opens(daemon: &Daemon, opened_before: usize) {
    let mut closed_while_held = false;
    let mut samples = Vec::new();
    wait_until(LONG, &format!("{} to lead and open", daemon.name), || {
        let h = health(daemon);
        if h.held && h.circuit == "closed" {
            closed_while_held = true;
        }
        samples.push(h);
        if samples.len() > 20 {
            samples.remove(0);
        }
        daemon.log_lines("Webhook circuit opened").len() > opened_before
    });
    assert!(
        closed_while_held,
        "{} never showed a closed circuit while holding the lease: {samples:?}",
        daemon.name
    );
    let opened = &daemon.log_lines("Webhook circuit opened")[opened_before];
    assert_eq!(opened["failures"], THRESHOLD, "its own failures: {opened}");
    let acquired = daemon.log_lines("Lock acquired").len();
    assert!(acquired > 0, "{} opened without leading", daemon.name);
}

/// The leader's circuit is open (receiver answers 503); it is SIGKILLed; the standby takes the
/// lease with a closed circuit, opens it on its own failures, and delivers everything once the
/// receiver recovers.
#[test]
fn the_circuit_across_a_sigkill_failover() {
    let _serial = serial();
    let db = TestDb::migrated();
    let total = 30;
    db.insert(total);
    let receiver = Receiver::start();
    let up = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    receiver.respond_with(move |_, _| {
        if u.load(Ordering::SeqCst) {
            Answer::accepted()
        } else {
            Answer::status(503).delay(SLOW_503)
        }
    });
    let env = ha_env(&db.url, &redis_url(), &unique("md_receiver_lock"));
    let a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let b = start_instance(2, &env, &receiver);
    let mut instances = [a, b];
    let leader = wait_one_holder(&[&instances[0], &instances[1]]);
    let standby = 1 - leader;
    let (l, s) = (&instances[leader], &instances[standby]);
    l.wait_log("Webhook circuit opened", LONG);
    wait_until(Duration::from_secs(5), "the leader's circuit open", || {
        health(l).circuit != "closed" && metric(l, CIRCUIT_STATE) != 0.0
    });
    let h = health(s);
    assert_eq!((h.held, h.circuit.as_str()), (false, "closed"), "{h:?}");
    assert_eq!(requests_from(&receiver, standby + 1), 0);

    let leader_requests = requests_from(&receiver, leader + 1);
    instances[leader].child.kill().unwrap();
    instances[leader].child.wait().unwrap();
    let s = &instances[standby];
    takes_over_closed_then_opens(s, 0);
    assert_eq!(metric(s, CIRCUIT_OPENED), 1.0);
    assert!(requests_from(&receiver, standby + 1) >= THRESHOLD);
    eprintln!(
        "old leader made {leader_requests} requests; the new one opened after {} of its own",
        requests_from(&receiver, standby + 1)
    );

    up.store(true, Ordering::SeqCst);
    wait_until(LONG, "everything sent", || db.count("sent") == total as i64);
    assert_eq!(db.count("failed"), 0);
    assert_eq!(receiver.keys().len(), total);
    s.wait_log("Webhook circuit closed", Duration::from_secs(5));
    assert_eq!(health(s).circuit, "closed");
    assert_eq!(metric(s, CIRCUIT_STATE), 0.0);
}

/// A new leadership resets the circuit even when the instance's circuit was open from an
/// earlier leadership: A opens, is paused past its lease, B takes over; A resumes as a standby
/// with its circuit still open; B is SIGKILLed and A leads again, starting closed.
#[test]
fn a_leader_that_comes_back_starts_with_a_closed_circuit() {
    let _serial = serial();
    let db = TestDb::migrated();
    let total = 30;
    db.insert(total);
    let receiver = Receiver::start();
    let up = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    receiver.respond_with(move |_, _| {
        if u.load(Ordering::SeqCst) {
            Answer::accepted()
        } else {
            Answer::status(503).delay(SLOW_503)
        }
    });
    let env = ha_env(&db.url, &redis_url(), &unique("md_receiver_lock"));
    let a = start_instance(1, &env, &receiver);
    assert_eq!(wait_one_holder(&[&a]), 0);
    a.wait_log("Webhook circuit opened", LONG);
    let mut b = start_instance(2, &env, &receiver);

    a.signal("STOP");
    wait_until(Duration::from_secs(5), "A to stop", || stopped(a.pid()));
    takes_over_closed_then_opens(&b, 0);
    a.signal("CONT");
    wait_until(Duration::from_secs(10), "A to give up the lease", || {
        !health(&a).held
    });
    a.wait_log("Lock lost", Duration::from_secs(10));
    let h = health(&a);
    assert_ne!(
        h.circuit, "closed",
        "A's circuit is still open from before: {h:?}"
    );

    b.child.kill().unwrap();
    b.child.wait().unwrap();
    takes_over_closed_then_opens(&a, 1);
    assert_eq!(a.log_lines("Lock acquired").len(), 2);
    assert_eq!(metric(&a, CIRCUIT_OPENED), 2.0);

    up.store(true, Ordering::SeqCst);
    wait_until(LONG, "everything sent", || db.count("sent") == total as i64);
    assert_eq!(db.count("failed"), 0);
    a.wait_log("Webhook circuit closed", Duration::from_secs(5));
    assert_eq!(health(&a).circuit, "closed");
}

/// A limit slower than WORKER_COUNT requests per MAX_PROCESSING_TIME (here 0.1/s, a provider's
/// "6 a minute", with the default 4 workers and 30 s, and BATCH_SIZE 10): the workers reserve
/// slots up to 40 s ahead, every further job's slot comes after its cycle's end, so it is
/// returned unsent at once, and continuous mode claims it again at once (the sleeping workers
/// hold fewer than a batch in flight): a claim/return loop against PostgreSQL for as long as
/// the limit holds.
#[test]
fn a_slow_rate_limit_does_not_make_claims_spin() {
    let _serial = serial();
    let db = TestDb::migrated();
    db.insert(20);
    let receiver = Receiver::start();
    let mut env = daemon_env(&db, &receiver.url());
    env.retain(|(k, _)| k != "MAX_PROCESSING_TIME");
    set(&mut env, "WEBHOOK_RATE_LIMIT", "0.1");
    set(&mut env, "PROCESSING_INTERVAL", "0");
    let daemon = Daemon::start(&env);
    wait_until(LONG, "the first request", || receiver.count() >= 1);
    let ticks = cpu_ticks(daemon.pid());
    let returned = metric(&daemon, "message_dispatcher_messages_returned_total");
    let batches = daemon.log_lines("Message batch processed").len();
    // Not a bare sleep as an assertion: a fixed observation window for a rate.
    std::thread::sleep(Duration::from_secs(5));
    let ticks = cpu_ticks(daemon.pid()) - ticks;
    let returned = metric(&daemon, "message_dispatcher_messages_returned_total") - returned;
    let batches = daemon.log_lines("Message batch processed").len() - batches;
    eprintln!(
        "WEBHOOK_RATE_LIMIT=0.1, BATCH_SIZE 10, MAX_PROCESSING_TIME 30s, 5 s: {} requests, {returned} messages \
         returned unsent, {batches} batches, {ticks} CPU ticks",
        receiver.count()
    );
    assert!(
        returned <= 10.0 && batches <= 10,
        "{returned} messages returned unsent and {batches} batches claimed in 5 s"
    );
    assert!(
        ticks < 15,
        "{ticks} CPU ticks in 5 s while waiting for the limit"
    );
}
