//! High availability: the Redis lease under crashes, pauses and outages.
//!
//! Every test runs the real binary as several child processes against a real PostgreSQL
//! database of its own and a Redis lease key of its own, delivering to a receiver in the test.
//! Each instance sends to its own path (`/instance-N`), so the receiver can tell who sent what
//! and when. The tests run one at a time (they measure time-outs and take-overs, which a busy
//! machine must not blur) and wait on conditions with deadlines, never on bare sleeps.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::servers::*;
use common::*;

/// DISTRIBUTED_LOCK_TTL of most tests.
const TTL: Duration = Duration::from_secs(3);
/// How often a standby tries to take the lease: PROCESSING_INTERVAL, being shorter than TTL/3.
const RETRY: Duration = Duration::from_millis(100);
const BATCH: usize = 10;
const WORKERS: usize = 4;
const LONG: Duration = Duration::from_secs(60);

fn held_at(port: u16) -> bool {
    get(&format!("http://127.0.0.1:{port}/health")).is_some_and(|(_, v)| v["lock"]["held"] == true)
}

fn instance_id(daemon: &Daemon) -> String {
    let (_, health) = daemon.health().expect("/health answers");
    health["instance_id"].as_str().unwrap().to_owned()
}

/// Reads every instance's `lock.held` twice, in the order 0..n and then n..0, and returns who
/// held at both reads, or an error when the reads prove two holders at once: an instance that
/// held at both its reads (so throughout, as a take-over needs far longer than a sweep) while
/// an instance read in between held too.
fn sweep(ports: &[u16]) -> Result<Vec<bool>, String> {
    let first: Vec<bool> = ports.iter().map(|p| held_at(*p)).collect();
    let mut second = vec![false; ports.len()];
    for (i, p) in ports.iter().enumerate().rev() {
        second[i] = held_at(*p);
    }
    for i in 0..ports.len() {
        for j in i + 1..ports.len() {
            if first[i] && second[i] && (first[j] || second[j]) {
                return Err(format!(
                    "ports {} and {} both held the lease: first reads {first:?}, second {second:?}",
                    ports[i], ports[j]
                ));
            }
        }
    }
    Ok((0..ports.len()).map(|i| first[i] && second[i]).collect())
}

fn ports_of(daemons: &[&Daemon]) -> Vec<u16> {
    daemons.iter().map(|d| d.port).collect()
}

/// Waits until exactly one of `daemons` holds the lease; returns its index.
fn wait_one_holder(daemons: &[&Daemon]) -> usize {
    let ports = ports_of(daemons);
    let mut holder = None;
    wait_until(Duration::from_secs(20), "exactly one lease holder", || {
        let held = sweep(&ports).unwrap();
        holder = held.iter().position(|h| *h);
        held.iter().filter(|h| **h).count() == 1
    });
    holder.unwrap()
}

fn redis_value(url: &str, key: &str) -> Option<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    redis::cmd("GET").arg(key).query(&mut conn).unwrap()
}

/// The instance whose token the lease key holds (tokens are `<instance_id>:<random>`).
fn redis_holder(url: &str, key: &str) -> Option<String> {
    redis_value(url, key).map(|v| v.rsplit_once(':').unwrap().0.to_owned())
}

/// Checks `condition` again and again for `period`, failing the test the first time it is false.
fn hold_for(period: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        assert!(condition(), "{what} stopped being true");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a log line `msg` beyond the first `before` ones and returns it.
fn wait_new_log(daemon: &Daemon, msg: &str, before: usize, timeout: Duration) -> serde_json::Value {
    let what = format!("a new {msg:?} from {}", daemon.name);
    wait_until(timeout, &what, || daemon.log_lines(msg).len() > before);
    daemon.log_lines(msg).swap_remove(before)
}

/// Requests per path, in arrival order.
fn by_path(seen: &[Seen]) -> BTreeMap<String, Vec<Seen>> {
    let mut paths: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
    for s in seen {
        paths.entry(s.path.clone()).or_default().push(s.clone());
    }
    paths
}

/// Extra requests beyond the first for each Idempotency-Key.
fn duplicates(receiver: &Receiver) -> usize {
    receiver.keys().values().map(|n| n - 1).sum()
}

/// Every request of one sender must have finished (its answer takes `answer_time`) before a
/// different sender's request arrives: the receiver never sees two senders at once.
fn assert_one_sender_at_a_time(seen: &[Seen], answer_time: Duration) {
    let mut seen: Vec<&Seen> = seen.iter().collect();
    seen.sort_by_key(|s| s.at);
    let mut last_of: HashMap<&str, Instant> = HashMap::new();
    for s in &seen {
        for (path, last) in &last_of {
            if *path != s.path {
                assert!(
                    s.at >= *last + answer_time,
                    "{} sent while {path} had a request in flight ({:?} after it started)",
                    s.path,
                    s.at - *last
                );
            }
        }
        last_of.insert(&s.path, s.at);
    }
}

// --- private servers -------------------------------------------------------------------------

/// Holds the receiver's answers to one path until opened; counts the requests it holds.
struct Gate {
    path: String,
    closed: Mutex<bool>,
    opened: Condvar,
    holding: AtomicUsize,
}

impl Gate {
    fn new(path: &str) -> Arc<Gate> {
        Arc::new(Gate {
            path: path.into(),
            closed: Mutex::new(false),
            opened: Condvar::new(),
            holding: AtomicUsize::new(0),
        })
    }

    fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }

    /// Opens the gate when dropped, so a failing test never leaves receiver threads blocked.
    fn open_on_drop(self: &Arc<Gate>) -> impl Drop {
        struct Opener(Arc<Gate>);
        impl Drop for Opener {
            fn drop(&mut self) {
                self.0.open();
            }
        }
        Opener(self.clone())
    }

    fn pass(&self, seen: &Seen) {
        if seen.path != self.path {
            return;
        }
        let mut closed = self.closed.lock().unwrap();
        if *closed {
            self.holding.fetch_add(1, Ordering::SeqCst);
            while *closed {
                closed = self.opened.wait(closed).unwrap();
            }
            self.holding.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

// --- the tests -------------------------------------------------------------------------------

#[test]
fn one_holder_among_three_and_sigkill_fails_over_within_the_ttl() {
    let _serial = serial();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let answer_time = Duration::from_millis(40);
    receiver.respond_with(move |_, _| Answer::accepted().delay(answer_time));
    let key = unique("md_lock");
    let env = ha_env(&db.url, &redis_url(), &key);
    let total = 400;
    db.insert(total);
    let mut nodes: Vec<Daemon> = (1..=3)
        .map(|n| start_instance(n, &env, &receiver))
        .collect();
    let all: Vec<&Daemon> = nodes.iter().collect();
    let ports = ports_of(&all);
    let first = wait_one_holder(&all);

    // Steady state: the same single holder at every sample, and it is the one Redis names.
    let holder_id = instance_id(&nodes[first]);
    for _ in 0..25 {
        let held = sweep(&ports).unwrap();
        let expected: Vec<bool> = (0..3).map(|i| i == first).collect();
        assert_eq!(
            held,
            expected,
            "exactly instance-{} holds the lease",
            first + 1
        );
        assert_eq!(
            redis_holder(&redis_url(), &key).as_deref(),
            Some(holder_id.as_str())
        );
    }
    for (i, node) in nodes.iter().enumerate() {
        let (code, health) = node.health().unwrap();
        assert_eq!(code, 200, "{health}");
        assert_eq!(health["lock"]["enabled"], true);
        if i != first {
            assert!(
                node.log_lines("Lock acquired").is_empty(),
                "{} never led",
                node.name
            );
        }
    }

    // Kill -9 the holder in the middle of the backlog.
    wait_until(LONG, "a backlog in progress", || receiver.count() >= 40);
    let killed = path_of(first + 1);
    let kill_at = Instant::now();
    nodes[first].child.kill().unwrap();
    nodes[first].wait_exit(Duration::from_secs(10));
    let dead_at = Instant::now();
    assert!(db.count("pending") > 0, "the kill must land mid-backlog");

    let survivors: Vec<&Daemon> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, d)| d)
        .collect();
    let survivor_ports = ports_of(&survivors);
    let mut first_after = None;
    wait_until(TTL * 3, "a standby to take over and send", || {
        sweep(&survivor_ports).unwrap();
        first_after = receiver
            .seen()
            .iter()
            .filter(|s| s.path != killed && s.at > kill_at)
            .map(|s| (s.at, s.path.clone()))
            .min();
        first_after.is_some()
    });
    let (took_over_at, new_path) = first_after.unwrap();
    let failover = took_over_at - kill_at;
    eprintln!("failover after SIGKILL of the holder (TTL {TTL:?}): first request from the new holder {failover:?} after the kill");
    assert!(
        failover <= TTL + RETRY + Duration::from_secs(1),
        "a standby takes over within TTL + one retry period (+ slack for the first claim): {failover:?}"
    );
    let new_index = survivors
        .iter()
        .position(|d| d.name == new_path.trim_start_matches('/'))
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the new holder to show in /health",
        || sweep(&survivor_ports).unwrap() == (0..2).map(|i| i == new_index).collect::<Vec<_>>(),
    );
    assert_eq!(
        redis_holder(&redis_url(), &key),
        Some(instance_id(survivors[new_index])),
        "Redis names the new holder"
    );

    wait_until(LONG, "every message sent", || {
        db.count("sent") == total as i64
    });
    let keys = receiver.keys();
    assert_eq!(keys.len(), total, "every message reached the receiver");
    let dups = duplicates(&receiver);
    eprintln!(
        "duplicates after SIGKILL: {dups} (at most 2×BATCH_SIZE = {})",
        2 * BATCH
    );
    assert!(
        dups <= 2 * BATCH,
        "only what was in flight is sent twice: {dups}"
    );
    assert_eq!(
        db.count("sending") + db.count("pending") + db.count("failed"),
        0
    );
    // The dead holder sent nothing after it died. A request it wrote just before the kill may
    // still be read off the socket a moment after the process is gone, hence the slack.
    let seen = receiver.seen();
    let last_of_dead = seen.iter().filter(|s| s.path == killed).map(|s| s.at).max();
    assert!(last_of_dead.is_some_and(|at| at <= dead_at + Duration::from_millis(500)));
    let paths = by_path(&seen);
    assert_eq!(
        paths.len(),
        2,
        "only the first and the new holder sent: {:?}",
        paths.keys()
    );
}

#[test]
fn sigterm_releases_the_lease_and_a_standby_takes_over_at_once() {
    let _serial = serial();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let answer_time = Duration::from_millis(40);
    receiver.respond_with(move |_, _| Answer::accepted().delay(answer_time));
    let key = unique("md_lock");
    let mut env = ha_env(&db.url, &redis_url(), &key);
    let ttl = Duration::from_secs(10);
    set(&mut env, "DISTRIBUTED_LOCK_TTL", "10s");
    let mut a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let b = start_instance(2, &env, &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);

    let total = 300;
    db.insert(total);
    wait_until(LONG, "the holder sending", || receiver.count() >= 30);
    let term_at = Instant::now();
    a.signal("TERM");
    let status = a.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "a clean stop exits 0");
    assert_eq!(a.log_lines("Lock released").len(), 1);

    let mut first_b = None;
    wait_until(ttl, "the standby to take over", || {
        first_b = receiver
            .seen()
            .iter()
            .filter(|s| s.path == path_of(2))
            .map(|s| s.at)
            .min();
        first_b.is_some()
    });
    let takeover = first_b.unwrap() - term_at;
    eprintln!("takeover after SIGTERM of the holder (TTL {ttl:?}): first request from the new holder {takeover:?} after the signal");
    assert!(
        takeover < Duration::from_secs(2),
        "well before the TTL: {takeover:?}"
    );
    b.wait_log("Lock acquired", Duration::from_secs(5));

    wait_until(LONG, "every message sent", || {
        db.count("sent") == total as i64
    });
    assert_eq!(receiver.keys().len(), total);
    assert_eq!(
        duplicates(&receiver),
        0,
        "a graceful hand-over sends nothing twice"
    );
    assert_eq!(db.count("sending") + db.count("pending"), 0);
    assert_one_sender_at_a_time(&receiver.seen(), answer_time);
}

#[test]
fn a_paused_holder_sends_nothing_after_its_lease_expires_and_its_writes_are_fenced() {
    let _serial = serial();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let gate = Gate::new(&path_of(1));
    let answer_time = Duration::from_millis(200);
    let g = gate.clone();
    receiver.respond_with(move |seen, _| {
        g.pass(seen);
        Answer::accepted().delay(answer_time)
    });
    let _open_on_exit = gate.open_on_drop();
    let key = unique("md_lock");
    let env = ha_env(&db.url, &redis_url(), &key);
    let mut a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let b = start_instance(2, &env, &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);

    // Slow sends: the receiver holds A's requests until every worker of A is inside one, so
    // the pause lands while requests are in flight (and never between a check and a send).
    gate.close();
    let total = 60;
    db.insert(total);
    wait_until(
        Duration::from_secs(10),
        "every worker of A inside a request",
        || gate.holding.load(Ordering::SeqCst) == WORKERS,
    );
    let pause_at = Instant::now();
    a.signal("STOP");
    wait_until(Duration::from_secs(5), "A to stop", || stopped(a.pid()));
    gate.open();

    // The lease expires; B takes over, recovers what A held and sends it.
    wait_until(TTL * 3, "B to take the lease while A is paused", || {
        !b.log_lines("Lock acquired").is_empty()
    });
    wait_until(Duration::from_secs(10), "B sending", || {
        receiver.seen().iter().any(|s| s.path == path_of(2))
    });
    wait_until(TTL * 2, "a pause longer than the TTL", || {
        pause_at.elapsed() > TTL + Duration::from_secs(1)
    });
    let resume_at = Instant::now();
    let losses_before = a.log_lines("Lock lost").len();
    a.signal("CONT");

    let lost = wait_new_log(&a, "Lock lost", losses_before, Duration::from_secs(10));
    // Normally its own clock says the lease ran out; had the pause caught it between reading
    // the clock and sending an extension, Redis answers that the key is someone else's.
    let reason = lost["reason"].as_str().unwrap();
    assert!(
        reason.contains("could have expired") || reason.contains("another instance holds"),
        "{lost}"
    );
    a.wait_log(
        "Outcome write rejected for some messages: leadership moved on; they will be recovered",
        Duration::from_secs(10),
    );
    wait_until(LONG, "every message sent", || {
        db.count("sent") == total as i64
    });
    assert!(a.is_running(), "A carries on as a standby");
    assert_eq!(sweep(&[a.port, b.port]).unwrap(), vec![false, true]);

    // A sent nothing once paused: certainly nothing after its lease expired (≤ TTL after the
    // pause began), and nothing at all after it resumed.
    let seen = receiver.seen();
    let late: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == path_of(1) && s.at >= pause_at)
        .collect();
    assert!(
        late.is_empty(),
        "A sent {} requests after the pause began",
        late.len()
    );
    assert!(!seen
        .iter()
        .any(|s| s.path == path_of(1) && s.at >= resume_at));
    // A's answered requests were never recorded (its write was fenced), so B sent those
    // messages again: at least once, nothing lost.
    let held_by_a: Vec<i64> = seen
        .iter()
        .filter(|s| s.path == path_of(1))
        .map(Seen::key)
        .collect();
    assert_eq!(
        held_by_a.len(),
        WORKERS,
        "A sent only the requests it held when paused"
    );
    for id in &held_by_a {
        assert!(
            seen.iter().any(|s| s.path == path_of(2) && s.key() == *id),
            "B re-sent message {id}"
        );
    }
    assert_eq!(receiver.keys().len(), total);
    assert_eq!(duplicates(&receiver), WORKERS);
    assert_eq!(db.count("sending") + db.count("pending"), 0);
}

#[test]
fn a_redis_outage_stops_sending_and_recovers() {
    let _serial = serial();
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_millis(100)));
    let key = unique("md_lock");
    let env = ha_env(&db.url, &redis.url(), &key);
    let mut a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let mut b = start_instance(2, &env, &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);

    let total = 150;
    db.insert(total);
    wait_until(LONG, "sending under way", || receiver.count() >= 10);
    let losses_before = a.log_lines("Lock lost").len();
    redis.stop();
    wait_new_log(&a, "Lock lost", losses_before, Duration::from_secs(5));
    let lost_at = Instant::now();

    // Requests already started finish within WEBHOOK_TIMEOUT; after that, silence.
    let quiet_from = lost_at + Duration::from_secs(1);
    let unhealthy = |d: &Daemon| {
        d.health().is_some_and(|(code, h)| {
            code == 503
                && h["status"] == "unhealthy"
                && h["dependencies"]["redis"] == "unhealthy"
                && h["dependencies"]["database"] == "healthy"
                && h["lock"]["held"] == false
        })
    };
    wait_until(
        Duration::from_secs(5),
        "/health to report Redis down",
        || unhealthy(&a) && unhealthy(&b),
    );
    hold_for(
        Duration::from_secs(3),
        "the outage: no sends, both up, both unhealthy",
        || {
            a.is_running()
                && b.is_running()
                && unhealthy(&a)
                && unhealthy(&b)
                && !receiver.seen().iter().any(|s| s.at >= quiet_from)
        },
    );
    let pending = db.count("pending");
    assert!(pending > 0, "the outage came mid-backlog");

    let back_at = Instant::now();
    redis.restart().unwrap();
    wait_until(LONG, "every message sent after Redis is back", || {
        db.count("sent") == total as i64
    });
    let resumed = receiver
        .seen()
        .iter()
        .filter(|s| s.at >= back_at)
        .map(|s| s.at)
        .min()
        .unwrap();
    eprintln!(
        "Redis outage: sending resumed {:?} after Redis came back",
        resumed - back_at
    );
    assert!(receiver
        .seen()
        .iter()
        .all(|s| s.at < quiet_from || s.at >= back_at));
    assert_eq!(receiver.keys().len(), total);
    assert_eq!(db.count("sending") + db.count("pending"), 0);
    let one = wait_one_holder(&[&a, &b]);
    let holder = [&a, &b][one];
    assert_eq!(redis_holder(&redis.url(), &key), Some(instance_id(holder)));
    for d in [&a, &b] {
        assert_eq!(d.health().unwrap().0, 200);
    }
    assert!(duplicates(&receiver) <= 2 * BATCH);
}

#[test]
fn redis_restarting_empty_never_moves_the_epoch_back_and_loses_nothing() {
    let _serial = serial();
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_millis(50)));
    let key = unique("md_lock");
    let env = ha_env(&db.url, &redis.url(), &key);
    let a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let b = start_instance(2, &env, &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);
    let epoch = || -> i64 {
        db.client()
            .query_one("SELECT epoch FROM dispatcher_state", &[])
            .unwrap()
            .get(0)
    };

    let total = 150;
    db.insert(total);
    wait_until(LONG, "sending under way", || receiver.count() >= 10);
    let epoch_before = epoch();
    let acquired = || a.log_lines("Lock acquired").len() + b.log_lines("Lock acquired").len();
    let acquired_before = acquired();
    // Redis forgets the key (no persistence) between two extensions of the holder.
    redis.stop();
    redis.restart().unwrap();
    wait_new_log(&a, "Lock lost", 0, Duration::from_secs(5));
    wait_until(
        Duration::from_secs(10),
        "a new lease after the restart",
        || acquired() > acquired_before,
    );
    // The epoch lives in PostgreSQL: it never goes back (to 1, say). The old holder taking the
    // key again keeps its epoch, as nobody led in between; the other instance starts a newer one.
    let holder = wait_one_holder(&[&a, &b]);
    if holder == 0 {
        assert!(
            epoch() >= epoch_before,
            "epoch {} after {epoch_before}",
            epoch()
        );
    } else {
        assert!(
            epoch() > epoch_before,
            "epoch {} after {epoch_before}",
            epoch()
        );
    }

    wait_until(LONG, "every message sent", || {
        db.count("sent") == total as i64
    });
    assert_eq!(receiver.keys().len(), total);
    let dups = duplicates(&receiver);
    eprintln!(
        "Redis restarting empty: {dups} duplicates, epoch {epoch_before} → {}",
        epoch()
    );
    assert!(
        dups <= 2 * BATCH,
        "only what was in flight is sent twice: {dups}"
    );
    assert_eq!(db.count("sending") + db.count("pending"), 0);
    let one = wait_one_holder(&[&a, &b]);
    assert_eq!(
        redis_holder(&redis.url(), &key),
        Some(instance_id([&a, &b][one]))
    );
}

#[test]
fn a_holder_that_gets_its_own_key_back_keeps_its_epoch_and_repeats_nothing() {
    let _serial = serial();
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_millis(50)));
    let env = ha_env(&db.url, &redis.url(), &unique("md_lock"));
    let a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let epoch = || -> i64 {
        db.client()
            .query_one("SELECT epoch FROM dispatcher_state", &[])
            .unwrap()
            .get(0)
    };
    let total = 150;
    db.insert(total);
    wait_until(LONG, "sending under way", || receiver.count() >= 10);
    let epoch_before = epoch();

    // Redis stalls past an extension (every TTL/3) but not past the key's TTL: the holder
    // cannot prove its lease and stops, then finds the key still holding its token.
    redis.signal("STOP");
    wait_new_log(&a, "Lock lost", 0, Duration::from_secs(5));
    redis.signal("CONT");
    wait_new_log(&a, "Lock acquired", 1, Duration::from_secs(5));
    assert_eq!(epoch(), epoch_before, "nobody led in between: same epoch");

    wait_until(LONG, "every message sent", || {
        db.count("sent") == total as i64
    });
    assert_eq!(receiver.keys().len(), total);
    assert_eq!(
        duplicates(&receiver),
        0,
        "outcomes of the requests in flight were kept, so nothing was sent again"
    );
    assert!(a
        .log_lines(
            "Outcome write rejected for some messages: leadership moved on; they will be recovered"
        )
        .is_empty());
}

#[test]
fn a_database_outage_backs_off_and_delivery_resumes() {
    let _serial = serial();
    let Some(pg) = PrivatePg::start() else {
        return;
    };
    // Two daemons on two databases of the one cluster: a lease holder with an interval, and a
    // single instance in continuous mode (LISTEN/NOTIFY), so one outage covers both loops.
    let (leased_db, continuous_db) = ("postgres", "continuous");
    let leased_url = pg.create_migrated(leased_db);
    let continuous_url = pg.create_migrated(continuous_db);
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_millis(50)));
    let key = unique("md_lock");
    let leased_env = ha_env(&leased_url, &redis_url(), &key);
    let mut a = start_instance(1, &leased_env, &receiver);
    wait_one_holder(&[&a]);
    let mut continuous_env = ha_env(&continuous_url, &redis_url(), &key);
    set(&mut continuous_env, "DISTRIBUTED_LOCK_ENABLED", "false");
    set(&mut continuous_env, "PROCESSING_INTERVAL", "0");
    let mut c = start_instance(2, &continuous_env, &receiver);
    let total = 200;
    pg.insert(leased_db, total);
    pg.insert(continuous_db, total);
    let sent_by = |n: usize| {
        receiver
            .seen()
            .iter()
            .filter(|s| s.path == path_of(n))
            .count()
    };
    wait_until(LONG, "both sending", || {
        sent_by(1) >= 20 && sent_by(2) >= 20
    });

    pg.stop_server();
    let unhealthy = |d: &Daemon| {
        d.health().is_some_and(|(code, h)| {
            code == 503
                && h["status"] == "unhealthy"
                && h["dependencies"]["database"] == "unhealthy"
        })
    };
    wait_until(
        Duration::from_secs(10),
        "/health to report the database down",
        || unhealthy(&a) && unhealthy(&c),
    );
    let outage = Duration::from_secs(6);
    hold_for(outage, "the outage: both up and unhealthy", || {
        a.is_running() && c.is_running() && unhealthy(&a) && unhealthy(&c)
    });
    for d in [&a, &c] {
        let failures = d.log_lines("Database unavailable");
        let count = failures.len();
        eprintln!(
            "database outage: {count} 'Database unavailable' lines from {} over {} ms",
            d.name,
            log_time_ms(&failures[count - 1]) - log_time_ms(&failures[0])
        );
        // Reconnecting with backoff (100 ms doubling to 5 s), not every cycle or lease tick.
        assert!(
            (2..=10).contains(&count),
            "{}: {count} failures logged",
            d.name
        );
        // And each retry waits at least the delay the previous failure announced.
        for pair in failures.windows(2) {
            let gap = log_time_ms(&pair[1]) - log_time_ms(&pair[0]);
            let announced =
                humantime::parse_duration(pair[0]["retry_in"].as_str().unwrap()).unwrap();
            assert!(
                gap + 25 >= announced.as_millis() as i64,
                "{}: retried after {gap} ms, announced {announced:?}: {pair:?}",
                d.name
            );
        }
        let last = humantime::parse_duration(failures[count - 1]["retry_in"].as_str().unwrap());
        assert!(
            last.unwrap() >= Duration::from_secs(1),
            "{}: the delay grew",
            d.name
        );
    }

    let back_at = Instant::now();
    pg.start_server();
    wait_until(
        LONG,
        "every message sent after the database is back",
        || {
            pg.count(leased_db, "sent") == total as i64
                && pg.count(continuous_db, "sent") == total as i64
        },
    );
    for (n, d) in [(1, &a), (2, &c)] {
        let resumed = receiver
            .seen()
            .iter()
            .filter(|s| s.path == path_of(n) && s.at >= back_at)
            .map(|s| s.at)
            .min()
            .unwrap();
        eprintln!(
            "database outage: {} resumed sending {:?} after PostgreSQL came back",
            d.name,
            resumed - back_at
        );
        d.wait_log("Database available again", Duration::from_secs(5));
    }
    for db in [leased_db, continuous_db] {
        assert_eq!(
            pg.count(db, "sending") + pg.count(db, "pending"),
            0,
            "{db}: nothing left"
        );
    }
    // Both databases number their messages from 1: count keys per sender.
    for n in [1, 2] {
        let keys: std::collections::HashSet<i64> = receiver
            .seen()
            .iter()
            .filter(|s| s.path == path_of(n))
            .map(Seen::key)
            .collect();
        assert_eq!(keys.len(), total, "instance-{n} delivered every message");
    }
    assert!(a.is_running() && c.is_running());
    wait_until(Duration::from_secs(10), "/health healthy again", || {
        a.health().unwrap().0 == 200 && c.health().unwrap().0 == 200
    });
}

#[test]
fn a_standby_does_not_spin_when_it_cannot_start_an_epoch() {
    let _serial = serial();
    let Some(pg) = PrivatePg::start() else {
        return;
    };
    let url = pg.create_migrated("postgres");
    let receiver = Receiver::start();
    let key = unique("md_lock");
    let env = ha_env(&url, &redis_url(), &key);
    let mut a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let mut b = start_instance(2, &env, &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_millis(50)));
    let total = 50;
    pg.insert("postgres", total);
    wait_until(LONG, "A sending", || receiver.count() >= 1);

    // The database goes down, then the holder dies: B can take the key but cannot start an
    // epoch. It must back off instead of taking and releasing the key every retry period.
    pg.stop_server();
    a.child.kill().unwrap();
    a.wait_exit(Duration::from_secs(10));
    let msg = "Cannot start a leadership epoch, releasing the lock";
    b.wait_log(msg, TTL * 3);
    let first = Instant::now();
    let before = b.log_lines(msg).len();
    let window = Duration::from_secs(5);
    hold_for(window, "B up and not holding", || {
        b.is_running() && !held_at(b.port)
    });
    let attempts = b.log_lines(msg).len() - before;
    eprintln!("database outage during a fail-over: {attempts} epoch attempts in {window:?} (retry period {RETRY:?})");
    assert!(
        attempts <= 10,
        "backs off, not every {RETRY:?}: {attempts} attempts"
    );
    assert!(first.elapsed() >= window);

    pg.start_server();
    wait_until(LONG, "B to take over once the database is back", || {
        held_at(b.port)
    });
    wait_until(LONG, "every message sent", || {
        pg.count("postgres", "sent") == total as i64
    });
    assert_eq!(receiver.keys().len(), total);
}

#[test]
fn rolling_restart_under_load_loses_nothing_and_never_has_two_senders() {
    let _serial = serial();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let answer_time = Duration::from_millis(30);
    receiver.respond_with(move |_, _| Answer::accepted().delay(answer_time));
    let key = unique("md_lock");
    let env = ha_env(&db.url, &redis_url(), &key);
    let mut total = 200;
    db.insert(total);
    let mut nodes: Vec<Daemon> = (1..=3)
        .map(|n| start_instance(n, &env, &receiver))
        .collect();
    let all: Vec<&Daemon> = nodes.iter().collect();
    wait_one_holder(&all);

    // Sample /health of whoever runs, all along.
    let sampled: Arc<Mutex<Vec<u16>>> =
        Arc::new(Mutex::new(nodes.iter().map(|d| d.port).collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (sampled, stop) = (sampled.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut sweeps, mut violations) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let ports = sampled.lock().unwrap().clone();
                if let Err(e) = sweep(&ports) {
                    violations.push(e);
                }
                sweeps += 1;
            }
            (sweeps, violations)
        })
    };

    let original = |d: &Daemon| {
        d.name
            .trim_start_matches("instance-")
            .parse::<usize>()
            .unwrap()
            <= 3
    };
    let mut handovers = 0;
    for round in 0..3 {
        // Replace the holder while it is an original instance, else any original one.
        let running: Vec<&Daemon> = nodes.iter().collect();
        let holder = wait_one_holder(&running);
        let victim = if original(&nodes[holder]) {
            holder
        } else {
            nodes.iter().position(original).unwrap()
        };
        let was_holder = victim == holder;
        let sent_before = receiver.count();
        wait_until(LONG, "sending under way", || {
            receiver.count() >= sent_before + 10
        });
        nodes[victim].signal("TERM");
        let status = nodes[victim].wait_exit(Duration::from_secs(10));
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: {} stops cleanly",
            nodes[victim].name
        );
        if was_holder {
            assert_eq!(nodes[victim].log_lines("Lock released").len(), 1);
            handovers += 1;
        }
        let old = nodes.remove(victim);
        let replacement = start_instance(4 + round, &env, &receiver);
        {
            let mut ports = sampled.lock().unwrap();
            ports.retain(|p| *p != old.port);
            ports.push(replacement.port);
        }
        nodes.push(replacement);
        drop(old);
        db.insert(100);
        total += 100;
    }
    wait_until(LONG, "every message sent", || {
        db.count("sent") == total as i64
    });
    stop.store(true, Ordering::SeqCst);
    let (sweeps, violations) = sampler.join().unwrap();
    eprintln!(
        "rolling restart: {handovers} hand-overs, {sweeps} /health sweeps, {} duplicates",
        duplicates(&receiver)
    );
    assert!(violations.is_empty(), "{violations:?}");
    assert!(sweeps >= 20, "sampled all along: {sweeps}");
    // The first round always stops the holder. Later the lease may sit with a replacement (one
    // that starts just as the key is released can win it), so only that round is certain.
    assert!(handovers >= 1);
    assert_eq!(receiver.keys().len(), total, "nothing lost");
    assert_eq!(
        duplicates(&receiver),
        0,
        "graceful hand-overs send nothing twice"
    );
    assert_eq!(db.count("sending") + db.count("pending"), 0);
    assert_one_sender_at_a_time(&receiver.seen(), answer_time);
}

#[test]
fn without_the_lease_redis_is_not_needed() {
    let _serial = serial();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let closed = format!("redis://127.0.0.1:{}/", free_port());
    let mut env = ha_env(&db.url, &closed, &unique("md_lock"));
    set(&mut env, "DISTRIBUTED_LOCK_ENABLED", "false");
    db.insert(20);
    let daemon = start_instance(1, &env, &receiver);
    wait_until(LONG, "every message sent", || db.count("sent") == 20);
    let (code, health) = daemon.health().unwrap();
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["dependencies"]["redis"], "disabled");
    assert_eq!(
        health["lock"],
        serde_json::json!({"enabled": false, "held": false})
    );
    assert!(daemon.log_lines("Lock acquired").is_empty());
    assert_eq!(receiver.keys().len(), 20);
}

/// A TCP proxy to PostgreSQL between one instance and the database. It can `cut` the path
/// (close every connection it carries and refuse new ones: a partition that resets) or
/// `blackhole` it (keep every connection open, accept new ones, forward nothing in either
/// direction and never close anything: a path that silently drops packets, or a middlebox
/// that hung — the client's kernel sees its data acknowledged, so only a client-side deadline
/// can tell).
struct Partition {
    port: u16,
    mode: Arc<AtomicUsize>,
    streams: Arc<Mutex<Vec<std::net::TcpStream>>>,
    /// Bytes that went into the blackhole from connections made before it opened.
    swallowed: Arc<AtomicUsize>,
}

const FORWARD: usize = 0;
const CUT: usize = 1;
const BLACKHOLE: usize = 2;

impl Partition {
    fn to_postgres() -> Partition {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicUsize::new(FORWARD));
        let streams: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let swallowed = Arc::new(AtomicUsize::new(0));
        let (mode2, streams2, swallowed2) = (mode.clone(), streams.clone(), swallowed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                match mode2.load(Ordering::SeqCst) {
                    CUT => continue, // dropped: refused in effect
                    BLACKHOLE => {
                        // Accepted and held open; whatever the client says goes nowhere.
                        streams2.lock().unwrap().push(client);
                        continue;
                    }
                    _ => {}
                }
                let Ok(server) = std::net::TcpStream::connect("127.0.0.1:5432") else {
                    continue;
                };
                let mut all = streams2.lock().unwrap();
                all.push(client.try_clone().unwrap());
                all.push(server.try_clone().unwrap());
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (mode, swallowed) = (mode2.clone(), swallowed2.clone());
                    std::thread::spawn(move || pump(from, to, &mode, &swallowed));
                }
            }
        });
        Partition {
            port,
            mode,
            streams,
            swallowed,
        }
    }

    /// The URL of `db` through this proxy.
    fn url(&self, db: &TestDb) -> String {
        db.url.replace(":5432/", &format!(":{}/", self.port))
    }

    fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn blackhole(&self) {
        self.mode.store(BLACKHOLE, Ordering::SeqCst);
    }

    fn swallowed(&self) -> usize {
        self.swallowed.load(Ordering::SeqCst)
    }
}

/// Copies one direction of a proxied connection until either side closes it; in blackhole mode
/// reads and drops everything, keeping both sockets open.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    mode: &AtomicUsize,
    swallowed: &AtomicUsize,
) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if mode.load(Ordering::SeqCst) == BLACKHOLE {
            swallowed.fetch_add(n, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if mode.load(Ordering::SeqCst) != BLACKHOLE {
        let _ = to.shutdown(std::net::Shutdown::Both);
    }
}

#[test]
fn a_leader_cut_off_from_postgres_hands_the_lease_over() {
    let _serial = serial();
    let db = TestDb::migrated();
    assert!(
        db.url.contains(":5432/"),
        "this test proxies the default server"
    );
    let receiver = Receiver::start();
    let key = unique("md_lock");
    let partition = Partition::to_postgres();
    let a = start_instance(
        1,
        &ha_env(&partition.url(&db), &redis_url(), &key),
        &receiver,
    );
    wait_one_holder(&[&a]);
    let b = start_instance(2, &ha_env(&db.url, &redis_url(), &key), &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);

    partition.cut();
    let cut_at = Instant::now();
    db.insert(50);
    // a still reaches Redis and would keep the lease; after a TTL of failures it steps down.
    a.wait_log("Stepping down as leader", LONG);
    b.wait_log("Lock acquired", LONG);
    wait_until(
        LONG,
        "delivery by the instance that reaches PostgreSQL",
        || db.count("sent") == 50,
    );
    eprintln!(
        "leader cut off from PostgreSQL: all delivered by the standby {:?} after the cut",
        cut_at.elapsed()
    );
    assert!(receiver.seen().iter().all(|s| s.path == path_of(2)));
    let (status, health) = a.health().unwrap();
    assert_eq!(
        (status, health["dependencies"]["database"].as_str()),
        (503, Some("unhealthy"))
    );
    assert_eq!(health["lock"]["held"], false);
}

// --- regressions of the fault review (issue #10) ---------------------------------------------

/// A PostgreSQL outage longer than the TTL makes the leader step down; once PostgreSQL is back
/// it must lead and deliver again. It once alternated `Lock acquired` / `Stepping down as
/// leader` forever: the outage was ended only by a claim, which never ran.
#[test]
fn a_database_outage_longer_than_the_ttl_does_not_stop_the_leader_for_good() {
    let _serial = serial();
    let Some(pg) = PrivatePg::start() else {
        return;
    };
    let url = pg.create_migrated("postgres");
    let receiver = Receiver::start();
    let key = unique("md_lock");
    let a = start_instance(1, &ha_env(&url, &redis_url(), &key), &receiver);
    wait_one_holder(&[&a]);

    pg.stop_server();
    a.wait_log("Stepping down as leader", TTL * 4);
    pg.start_server();
    pg.insert("postgres", 5);
    wait_until(LONG, "delivery after the outage", || {
        pg.count("postgres", "sent") == 5
    });
    // Leading again, and staying so.
    let step_downs = a.log_lines("Stepping down as leader").len();
    hold_for(TTL, "one steady leader", || held_at(a.port));
    assert_eq!(a.log_lines("Stepping down as leader").len(), step_downs);
    assert!(
        step_downs <= 2,
        "{step_downs} step-downs for one outage: {:?}",
        a.log_lines("Stepping down as leader")
    );
}

/// SIGTERM while requests are in flight that take longer than MAX_PROCESSING_TIME: the lease
/// must not be released (letting a standby send) until they have ended.
#[test]
fn sigterm_releases_the_lease_only_after_the_requests_in_flight_end() {
    let _serial = serial();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let answer_time = Duration::from_millis(1500);
    receiver.respond_with(move |_, _| Answer::accepted().delay(answer_time));
    let key = unique("md_lock");
    let mut env = ha_env(&db.url, &redis_url(), &key);
    set(&mut env, "DISTRIBUTED_LOCK_TTL", "10s");
    set(&mut env, "WEBHOOK_TIMEOUT", "3s");
    set(&mut env, "MAX_PROCESSING_TIME", "500ms");
    let mut a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let b = start_instance(2, &env, &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);

    db.insert(40);
    wait_until(LONG, "every worker of A inside a request", || {
        receiver.count() >= WORKERS
    });
    a.signal("TERM");
    let status = a.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    wait_until(LONG, "every message sent", || db.count("sent") == 40);
    assert_one_sender_at_a_time(&receiver.seen(), answer_time);
    assert_eq!(
        duplicates(&receiver),
        0,
        "a graceful hand-over repeats nothing"
    );
}

/// While the holder cannot extend (Redis paused), requests may start only while a whole request
/// fits before the lease could expire: none may still run when the key expires. Redis is paused
/// right after an extension; the receiver holds every request until 1.8 s later and answers
/// each later one after 4.4 s, so workers come free — and would start requests that outlive the
/// lease — in the gap between the permit's end and the moment the holder gives up.
#[test]
fn no_request_outlives_a_lease_that_could_not_be_extended() {
    let _serial = serial();
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let ttl = Duration::from_secs(6);
    let answer_time = Duration::from_millis(4400);
    let release_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let release = release_at.clone();
    receiver.respond_with(move |seen, _| {
        // Answered after `answer_time`, or at the release if that comes first.
        loop {
            let due = match *release.lock().unwrap() {
                Some(at) if seen.at < at => at.min(seen.at + answer_time),
                _ => seen.at + answer_time,
            };
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Answer::accepted();
            }
            std::thread::sleep(left.min(Duration::from_millis(10)));
        }
    });
    let key = unique("md_lock");
    let mut env = ha_env(&db.url, &redis.url(), &key);
    set(&mut env, "DISTRIBUTED_LOCK_TTL", "6s");
    set(&mut env, "WEBHOOK_TIMEOUT", "4500ms");
    set(&mut env, "MAX_PROCESSING_TIME", "1s");
    set(&mut env, "WORKER_COUNT", "8");
    let a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    db.insert(400);
    wait_until(LONG, "A sending", || receiver.count() >= 16);

    let extended = a.log_lines("Lock extended").len();
    wait_new_log(&a, "Lock extended", extended, ttl);
    redis.signal("STOP");
    let _resume = ContinueOnDrop(&redis);
    let released = Instant::now() + Duration::from_millis(1800);
    *release_at.lock().unwrap() = Some(released);
    a.wait_log("Lock lost", ttl * 2);
    // The last extension Redis acknowledged: the key expires at most a TTL after it was sent.
    let last_extended = log_time_ms(a.log_lines("Lock extended").last().unwrap());
    let expiry_ms = last_extended + ttl.as_millis() as i64;
    wait_until(Duration::from_secs(15), "A's requests to end", || {
        Instant::now() > released + answer_time + Duration::from_millis(500)
    });
    let (wall_now, now) = (wall_ms(), Instant::now());
    let wall = |at: Instant| wall_now - now.saturating_duration_since(at).as_millis() as i64;
    let latest_end = receiver
        .seen()
        .iter()
        .map(|s| {
            let end = s.at + answer_time;
            wall(if s.at < released {
                end.min(released)
            } else {
                end
            })
        })
        .max()
        .unwrap();
    eprintln!(
        "last request ended {} ms before the key could expire",
        expiry_ms - latest_end
    );
    assert!(
        latest_end <= expiry_ms,
        "a request ran {} ms past the moment the lease could expire",
        latest_end - expiry_ms
    );
}

/// Resumes a SIGSTOPped server when the test ends, however it ends.
struct ContinueOnDrop<'a>(&'a PrivateRedis);

impl Drop for ContinueOnDrop<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A holder killed with requests in flight: those requests reached the receiver but their
/// outcomes were never recorded. They must still count in `attempts` once the message is sent
/// again by the next holder.
#[test]
fn attempts_count_requests_whose_outcome_was_lost_in_a_crash() {
    let _serial = serial();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let gate = Gate::new(&path_of(1));
    let g = gate.clone();
    receiver.respond_with(move |seen, _| {
        g.pass(seen);
        Answer::accepted()
    });
    let _open_on_exit = gate.open_on_drop();
    let key = unique("md_lock");
    let env = ha_env(&db.url, &redis_url(), &key);
    let mut a = start_instance(1, &env, &receiver);
    wait_one_holder(&[&a]);
    let b = start_instance(2, &env, &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);

    gate.close();
    let total = 20;
    db.insert(total);
    wait_until(
        Duration::from_secs(10),
        "every worker of A inside a request",
        || gate.holding.load(Ordering::SeqCst) == WORKERS,
    );
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5));
    gate.open();
    wait_until(LONG, "every message sent by B", || {
        db.count("sent") == total as i64
    });
    let seen = receiver.keys();
    let mut client = db.client();
    for row in client
        .query("SELECT id, attempts FROM messages", &[])
        .unwrap()
    {
        let (id, attempts): (i64, i32) = (row.get(0), row.get(1));
        let requests = seen.get(&id).copied().unwrap_or(0) as i32;
        assert!(
            attempts >= requests,
            "message {id}: {attempts} attempts recorded for {requests} requests"
        );
    }
    let repeated: Vec<i64> = seen
        .iter()
        .filter(|(_, n)| **n == 2)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        repeated.len(),
        WORKERS,
        "the requests A held went out again"
    );
    for id in repeated {
        assert_eq!(db.row(id).1, 2, "message {id}");
    }
}

/// How long the daemon takes at most to give up on a statement PostgreSQL never answers (its
/// client-side deadline, `connect::QUERY_DEADLINE`), plus slack for a busy machine.
const SILENT_PATH_DETECTED: Duration = Duration::from_secs(15);

#[test]
fn a_leader_on_a_blackholed_path_notices_steps_down_and_a_standby_delivers() {
    let _serial = serial();
    let db = TestDb::migrated();
    assert!(
        db.url.contains(":5432/"),
        "this test proxies the default server"
    );
    let receiver = Receiver::start();
    let key = unique("md_lock");
    let partition = Partition::to_postgres();
    let a = start_instance(
        1,
        &ha_env(&partition.url(&db), &redis_url(), &key),
        &receiver,
    );
    wait_one_holder(&[&a]);
    let b = start_instance(2, &ha_env(&db.url, &redis_url(), &key), &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);

    let failures_before = a.log_lines("Database unavailable").len();
    partition.blackhole();
    let holed_at = Instant::now();
    db.insert(50);
    // A claims every 100 ms, so its next statement goes into the hole at once and is never
    // answered: no reset, no error, no server-side statement_timeout.
    wait_until(
        Duration::from_secs(5),
        "a statement of A in the hole",
        || partition.swallowed() > 0,
    );
    wait_new_log(&a, "Database unavailable", failures_before, LONG);
    let detected = holed_at.elapsed();
    eprintln!("blackholed path: A logged `Database unavailable` after {detected:?}");
    assert!(
        detected <= SILENT_PATH_DETECTED,
        "A noticed the silent path only after {detected:?}"
    );
    wait_until(LONG, "A to give up the lease", || {
        !a.log_lines("Lock lost").is_empty() || !a.log_lines("Stepping down as leader").is_empty()
    });
    b.wait_log("Lock acquired", LONG);
    wait_until(
        LONG,
        "delivery by the instance that reaches PostgreSQL",
        || db.count("sent") == 50,
    );
    let seen = receiver.seen();
    assert!(seen.iter().all(|s| s.path == path_of(2)));
    // A stuck leader cannot extend its lease either, so B takes over after about a TTL,
    // before A has even noticed.
    let first = seen.iter().map(|s| s.at).min().unwrap();
    eprintln!(
        "blackholed path: the standby sent its first message {:?} after the blackhole",
        first - holed_at
    );
    // (A's own /health would wait on the silent path too: ask Redis who holds the lease.)
    assert_eq!(
        redis_holder(&redis_url(), &key),
        Some(instance_id(&b)),
        "B holds the lease"
    );
}

#[test]
fn sigterm_while_blocked_on_a_blackholed_path_exits_within_its_bound() {
    let _serial = serial();
    let db = TestDb::migrated();
    assert!(
        db.url.contains(":5432/"),
        "this test proxies the default server"
    );
    let receiver = Receiver::start();
    // A's requests hang until the gate opens (and time out after WEBHOOK_TIMEOUT), so A has
    // claimed messages in flight and outcomes to write when its path goes silent.
    let gate = Gate::new(&path_of(1));
    let g = gate.clone();
    receiver.respond_with(move |seen, _| {
        g.pass(seen);
        Answer::accepted()
    });
    let _open_on_exit = gate.open_on_drop();
    let key = unique("md_lock");
    let partition = Partition::to_postgres();
    let env_a = ha_env(&partition.url(&db), &redis_url(), &key);
    let mut a = start_instance(1, &env_a, &receiver);
    wait_one_holder(&[&a]);
    let b = start_instance(2, &ha_env(&db.url, &redis_url(), &key), &receiver);
    assert_eq!(wait_one_holder(&[&a, &b]), 0);

    gate.close();
    let total = 30;
    db.insert(total);
    wait_until(Duration::from_secs(10), "A's requests in flight", || {
        gate.holding.load(Ordering::SeqCst) > 0
    });
    partition.blackhole();
    // The scheduler's next statement (a claim, or the outcomes of the requests that time out)
    // goes into the hole and blocks it.
    wait_until(
        Duration::from_secs(5),
        "a statement of A in the hole",
        || partition.swallowed() > 0,
    );
    let sigterm_at = Instant::now();
    a.signal("TERM");
    let status = a.wait_exit(LONG);
    let took = sigterm_at.elapsed();
    eprintln!(
        "SIGTERM with the scheduler blocked on a silent path: exited {status} after {took:?}"
    );
    // MAX_PROCESSING_TIME + WEBHOOK_TIMEOUT in `ha_env`, and slack for a busy machine.
    let bound = Duration::from_secs(1) + Duration::from_secs(1);
    assert!(
        took <= bound + Duration::from_secs(1),
        "A took {took:?} to stop"
    );
    assert!(status.success(), "{status}");
    gate.open();

    // What A left `sending` comes back through crash recovery; B sends everything.
    b.wait_log("Lock acquired", LONG);
    wait_until(LONG, "every message sent by B", || {
        db.count("sent") == total as i64
    });
    assert_eq!(db.count("sending") + db.count("pending"), 0);
    assert_eq!(receiver.keys().len(), total);
}

/// A holder that lost its key and takes it again asks PostgreSQL whether its epoch still
/// stands. When that answer comes only after the new lease could have expired, it must not
/// lead on it: it once logged `Lock acquired` and at once `Lock lost` (the fault campaign,
/// seed 7, on a loaded machine). It steps back like any failed start and leads properly later.
#[test]
fn an_epoch_answer_that_comes_after_the_lease_could_have_expired_does_not_lead() {
    let _serial = serial();
    let db = TestDb::migrated();
    assert!(
        db.url.contains(":5432/"),
        "this test proxies the default server"
    );
    let receiver = Receiver::start();
    let key = unique("md_lock");
    let proxy = proxy::Proxy::start("127.0.0.1:5432".parse().unwrap());
    let url = db.url.replace(":5432/", &format!(":{}/", proxy.port));
    let a = start_instance(1, &ha_env(&url, &redis_url(), &key), &receiver);
    wait_one_holder(&[&a]);
    // (Its /health asks PostgreSQL too, so ask now, before the path goes silent.)
    let id = instance_id(&a);

    // Someone else takes the key: A's next extension finds it gone and A stands by.
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut conn = redis
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("someone-else:1")
        .arg("PX")
        .arg(60_000)
        .query(&mut conn)
        .unwrap();
    wait_new_log(&a, "Lock lost", 0, LONG);

    // PostgreSQL goes silent (bytes wait, nothing is lost), then the key is free: A takes it
    // and asks for its epoch, whose answer comes only after the lease could have expired.
    proxy.set(proxy::Mode::Blackhole);
    let _: () = redis::cmd("DEL").arg(&key).query(&mut conn).unwrap();
    wait_until(Duration::from_secs(10), "A to take the free key", || {
        redis_holder(&redis_url(), &key) == Some(id.clone())
    });
    let acquired_before = a.log_lines("Lock acquired").len();
    std::thread::sleep(TTL + Duration::from_millis(500));
    proxy.set(proxy::Mode::Pass);

    let failed = wait_new_log(
        &a,
        "Cannot start a leadership epoch, releasing the lock",
        0,
        LONG,
    );
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("after the lease could have expired")),
        "{failed}"
    );
    let acquired = a.log_lines("Lock acquired");
    let failed_at = log_time_ms(&failed);
    assert!(
        acquired[acquired_before..]
            .iter()
            .all(|l| log_time_ms(l) > failed_at),
        "A led on an answer that came too late: {acquired:?}"
    );
    assert_eq!(a.log_lines("Lock lost").len(), 1, "only the key taken away");

    // It leads again once PostgreSQL answers in time, and delivers.
    wait_new_log(&a, "Lock acquired", acquired_before, LONG);
    db.insert(5);
    wait_until(LONG, "delivery after the failed start", || {
        db.count("sent") == 5
    });
}
