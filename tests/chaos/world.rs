//! The campaign's world: a private PostgreSQL cluster and redis-server, a proxy per instance in
//! front of each, the three instances (restarted like a supervisor would), the load generator,
//! the /health monitor, and the fault executor that walks the plan.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::proxy::{Mode, Proxy};
use crate::common::servers::{PrivatePg, PrivateRedis};
use crate::common::*;
use crate::now_us;
use crate::plan::*;
use crate::receiver::Receiver;

pub const DB: &str = "chaos";
pub const LOCK_KEY: &str = "chaos:lock";

/// How an incarnation of an instance ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Killed,
    /// SIGTERM: exit code, and how long it took.
    Terminated(Option<i32>, Duration),
    /// Exited without being asked to: exit code, and whether it had started serving.
    Exited(Option<i32>, bool),
    /// Still running at the end of the campaign (then killed).
    Running,
}

/// One run of one instance's process.
pub struct Incarnation {
    pub slot: usize,
    pub gen: usize,
    pub daemon: Daemon,
    pub ended: Option<i64>,
    pub ending: Ending,
    /// The times it was paused (SIGSTOP) and resumed.
    pub pauses: Vec<(i64, i64)>,
}

impl Incarnation {
    pub fn instance_id(&self) -> Option<String> {
        self.daemon
            .log_lines("Message dispatcher started")
            .first()
            .and_then(|l| l["instance_id"].as_str().map(str::to_owned))
    }

    fn has_started(&self) -> bool {
        !self
            .daemon
            .log_lines("Message dispatcher started")
            .is_empty()
    }
}

/// What a slot is doing now.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SlotState {
    Running,
    Paused,
    /// SIGTERM sent at this instant; restart `hold` after it exits.
    Terminating(Instant, Duration),
    /// Down; restart at this instant.
    Down(Instant),
}

/// A fault as it happened.
#[derive(Clone, Debug)]
pub struct FaultRecord {
    pub kind: Kind,
    /// The slot it hit (instance and proxy faults).
    pub slot: Option<usize>,
    /// The incarnation it hit (instance faults).
    pub incarnation: Option<usize>,
    pub began: i64,
    pub healed: Option<i64>,
}

impl FaultRecord {
    /// Whether it could have affected `slot` during [from, to] (µs).
    pub fn touches(&self, slot: usize, from: i64, to: i64) -> bool {
        let end = self.healed.unwrap_or(i64::MAX).max(self.began + 1_000_000);
        self.slot.is_none_or(|s| s == slot) && self.began <= to && end >= from
    }

    pub fn describe(&self) -> String {
        let target = self
            .slot
            .map(|s| format!(" instance-{s}"))
            .unwrap_or_default();
        format!(
            "{}{target} at {}{}",
            self.kind.name(),
            crate::fmt_us(self.began),
            self.healed
                .map(|h| format!(" until {}", crate::fmt_us(h)))
                .unwrap_or_default()
        )
    }
}

/// A violation the executor saw directly (graceful stop, crashes).
#[derive(Clone, Debug)]
pub struct Incident {
    pub invariant: &'static str,
    pub text: String,
}

/// One /health sample of one slot.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: i64,
    pub slot: usize,
    /// (status code, "healthy", lock held, instance id)
    pub health: Option<(u16, bool, bool, String)>,
    /// Pending messages due now, from PostgreSQL directly; None when it could not be read.
    pub due: Option<i64>,
}

#[derive(Default)]
pub struct LoadStats {
    pub sql: AtomicU64,
    pub api: AtomicU64,
    pub failed: AtomicU64,
}

pub struct World {
    pub plan: Plan,
    pub pg: PrivatePg,
    pub redis: PrivateRedis,
    pub pg_proxies: Vec<Proxy>,
    pub redis_proxies: Vec<Proxy>,
    pub receiver: Receiver,
    pub ports: Vec<u16>,
    pub incarnations: Vec<Incarnation>,
    current: Vec<Option<usize>>,
    states: Vec<SlotState>,
    pub faults: Vec<FaultRecord>,
    pub skipped: Vec<String>,
    pub incidents: Vec<Incident>,
    redis_paused: bool,
    /// Redis or PostgreSQL stopped by a fault not yet healed.
    redis_down: bool,
    pg_down: bool,
    pub samples: Arc<Mutex<Vec<Sample>>>,
    pub load: Arc<LoadStats>,
    stop_load: Arc<AtomicBool>,
    stop_monitor: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Statements that log the campaign's own view of every row change: who changed it, under
/// which current epoch. Installed by the test in its private database; the daemon knows
/// nothing of it.
const AUDIT: &str = "
CREATE TABLE chaos_audit (
    seq         BIGSERIAL PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    id          BIGINT NOT NULL,
    old_status  TEXT, new_status TEXT,
    old_attempts INT, new_attempts INT,
    old_epoch   BIGINT, old_by TEXT,
    new_epoch   BIGINT, new_by TEXT,
    state_epoch BIGINT,
    app         TEXT
);
CREATE FUNCTION chaos_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_audit (id, old_status, new_status, old_attempts, new_attempts,
                             old_epoch, old_by, new_epoch, new_by, state_epoch, app)
    VALUES (NEW.id, OLD.status, NEW.status, OLD.attempts, NEW.attempts,
            OLD.claimed_epoch, OLD.claimed_by, NEW.claimed_epoch, NEW.claimed_by,
            (SELECT epoch FROM dispatcher_state), current_setting('application_name'));
    RETURN NULL;
END
$$;
CREATE TRIGGER chaos_audit AFTER UPDATE ON messages FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.attempts IS DISTINCT FROM NEW.attempts)
    EXECUTE FUNCTION chaos_audit();
";

impl World {
    /// Starts the servers, proxies, receiver and the three instances; None when the machine
    /// lacks redis-server or the PostgreSQL server binaries.
    pub fn start(plan: Plan, exclude: &[String]) -> Option<World> {
        let pg = PrivatePg::start()?;
        let redis = PrivateRedis::start()?;
        pg.client("postgres")
            .batch_execute(&format!("CREATE DATABASE {DB}"))
            .unwrap();
        servers::migrate(&pg.url(DB));
        pg.client(DB).batch_execute(AUDIT).unwrap();
        let pg_addr: SocketAddr = ([127, 0, 0, 1], pg.port).into();
        let redis_addr: SocketAddr = ([127, 0, 0, 1], redis.port).into();
        let receiver = Receiver::start(crate::receiver::Config {
            seed: plan.seed,
            misbehaviour: plan.settings.misbehaviour,
            exclude: exclude.to_vec(),
        });
        let mut world = World {
            pg_proxies: (0..INSTANCES).map(|_| Proxy::start(pg_addr)).collect(),
            redis_proxies: (0..INSTANCES).map(|_| Proxy::start(redis_addr)).collect(),
            ports: (0..INSTANCES).map(|_| free_port()).collect(),
            plan,
            pg,
            redis,
            receiver,
            incarnations: Vec::new(),
            current: vec![None; INSTANCES],
            states: vec![SlotState::Running; INSTANCES],
            faults: Vec::new(),
            skipped: Vec::new(),
            incidents: Vec::new(),
            redis_paused: false,
            redis_down: false,
            pg_down: false,
            samples: Arc::new(Mutex::new(Vec::new())),
            load: Arc::new(LoadStats::default()),
            stop_load: Arc::new(AtomicBool::new(false)),
            stop_monitor: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for slot in 0..INSTANCES {
            world.spawn(slot);
        }
        Some(world)
    }

    pub fn direct_url(&self) -> String {
        self.pg.url(DB)
    }

    fn env(&self, slot: usize, gen: usize) -> Vec<(String, String)> {
        let s = &self.plan.settings;
        let db = format!(
            "postgres://postgres@127.0.0.1:{}/{DB}",
            self.pg_proxies[slot].port
        );
        let mut env = env_for_url(&db, &self.receiver.url(slot, gen));
        let interval = format!("{}ms", s.intervals[slot].as_millis());
        for (k, v) in [
            (
                "REDIS_URL",
                format!("redis://127.0.0.1:{}/", self.redis_proxies[slot].port),
            ),
            ("DISTRIBUTED_LOCK_ENABLED", "true".into()),
            ("DISTRIBUTED_LOCK_KEY", LOCK_KEY.into()),
            ("DISTRIBUTED_LOCK_TTL", format!("{}ms", TTL.as_millis())),
            (
                "MAX_PROCESSING_TIME",
                format!("{}ms", MAX_PROCESSING_TIME.as_millis()),
            ),
            (
                "WEBHOOK_TIMEOUT",
                format!("{}ms", WEBHOOK_TIMEOUT.as_millis()),
            ),
            ("PROCESSING_INTERVAL", interval),
            ("BATCH_SIZE", s.batch_size.to_string()),
            ("WORKER_COUNT", "4".into()),
            ("MAX_ATTEMPTS", s.max_attempts.to_string()),
            ("RETRY_BASE_DELAY", "100ms".into()),
            ("RETRY_MAX_DELAY", "1s".into()),
            ("SERVER_PORT", self.ports[slot].to_string()),
            ("LOG_LEVEL", "debug".into()),
        ] {
            set(&mut env, k, &v);
        }
        env
    }

    fn spawn(&mut self, slot: usize) {
        let gen = self.incarnations.iter().filter(|i| i.slot == slot).count();
        let env = self.env(slot, gen);
        let daemon = Daemon::spawn(&format!("instance-{slot}.{gen}"), &env);
        self.incarnations.push(Incarnation {
            slot,
            gen,
            daemon,
            ended: None,
            ending: Ending::Running,
            pauses: Vec::new(),
        });
        self.current[slot] = Some(self.incarnations.len() - 1);
        self.states[slot] = SlotState::Running;
    }

    fn end(&mut self, index: usize, ending: Ending) {
        let now = now_us();
        let inc = &mut self.incarnations[index];
        inc.ended = Some(now);
        inc.ending = ending;
        // A SIGTERM's effect lasts until its instance has exited: then it is healed, so that it
        // is not named as the cause of whatever happens on that slot afterwards.
        for f in &mut self.faults {
            if matches!(f.kind, Kind::Term(_)) && f.incarnation == Some(index) && f.healed.is_none()
            {
                f.healed = Some(now);
            }
        }
    }

    /// The slot whose instance the lease key names, from Redis directly.
    fn holder_slot(&self) -> Option<usize> {
        let client = redis::Client::open(self.redis.url()).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_millis(300))
            .ok()?;
        let _ = conn.set_read_timeout(Some(Duration::from_millis(300)));
        let token: Option<String> = redis::cmd("GET").arg(LOCK_KEY).query(&mut conn).ok()?;
        let holder = token?.rsplit_once(':')?.0.to_owned();
        (0..INSTANCES).find(|s| {
            self.current[*s]
                .is_some_and(|i| self.incarnations[i].instance_id() == Some(holder.clone()))
        })
    }

    /// Restarts what is due, notices instances that exited on their own, and enforces the
    /// bound on a graceful stop. Called every few milliseconds.
    fn supervise(&mut self) {
        let now = Instant::now();
        for slot in 0..INSTANCES {
            match self.states[slot] {
                SlotState::Down(at) if now >= at => self.spawn(slot),
                SlotState::Running | SlotState::Paused => {
                    let index = self.current[slot].unwrap();
                    if let Ok(Some(status)) = self.incarnations[index].daemon.child.try_wait() {
                        let started = self.incarnations[index].has_started();
                        let name = self.incarnations[index].daemon.name.clone();
                        self.end(index, Ending::Exited(status.code(), started));
                        if started {
                            let tail: Vec<String> = self.incarnations[index]
                                .daemon
                                .logs()
                                .into_iter()
                                .rev()
                                .take(5)
                                .collect();
                            self.incidents.push(Incident {
                                invariant: "no crash",
                                text: format!(
                                    "{name} exited on its own with {status} at {}; last lines: {}",
                                    crate::fmt_us(now_us()),
                                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                                ),
                            });
                        }
                        // Like a supervisor: start it again a moment later.
                        self.states[slot] = SlotState::Down(now + Duration::from_millis(500));
                    }
                }
                SlotState::Terminating(since, hold) => {
                    let index = self.current[slot].unwrap();
                    let bound = MAX_PROCESSING_TIME + WEBHOOK_TIMEOUT + Duration::from_millis(1500);
                    match self.incarnations[index].daemon.child.try_wait() {
                        Ok(Some(status)) => {
                            let took = since.elapsed();
                            let name = self.incarnations[index].daemon.name.clone();
                            self.end(index, Ending::Terminated(status.code(), took));
                            // Ended by the signal itself: it landed before the program installed
                            // its handler (once installed, SIGTERM never ends it that way),
                            // which happens before it touches PostgreSQL or Redis. Nothing was
                            // held, so that is a clean stop too.
                            let before_handler = status.signal() == Some(libc::SIGTERM);
                            if (status.code() != Some(0) && !before_handler) || took > bound {
                                self.incidents.push(Incident {
                                    invariant: "SIGTERM stops cleanly in time",
                                    text: format!(
                                        "{name} exited with {status} {took:?} after SIGTERM (bound {bound:?})"
                                    ),
                                });
                            }
                            self.states[slot] = SlotState::Down(now + hold);
                        }
                        _ if since.elapsed() > Duration::from_secs(15) => {
                            let name = self.incarnations[index].daemon.name.clone();
                            let tail: Vec<String> = self.incarnations[index]
                                .daemon
                                .logs()
                                .into_iter()
                                .rev()
                                .take(5)
                                .collect();
                            self.incidents.push(Incident {
                                invariant: "SIGTERM stops cleanly in time",
                                text: format!(
                                    "{name} still running 15 s after SIGTERM (bound {bound:?}): killed; last lines: {}",
                                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                                ),
                            });
                            let _ = self.incarnations[index].daemon.child.kill();
                            let _ = self.incarnations[index].daemon.child.wait();
                            self.end(index, Ending::Killed);
                            self.states[slot] = SlotState::Down(now + hold);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }

    /// Starts `fault`; returns what heals it and when, if anything does.
    fn begin(&mut self, fault: &Fault) -> Option<(Instant, usize)> {
        let slot = match fault.kind.target() {
            Some(Target::Slot(s)) => Some(s),
            Some(Target::Holder) => Some(self.holder_slot().unwrap_or(0)),
            None => None,
        };
        let instance_fault = matches!(fault.kind, Kind::Kill(_) | Kind::Pause(_) | Kind::Term(_));
        if instance_fault && self.states[slot.unwrap()] != SlotState::Running {
            self.skipped.push(format!(
                "{} instance-{}: busy ({:?})",
                fault.kind.name(),
                slot.unwrap(),
                self.states[slot.unwrap()]
            ));
            return None;
        }
        let server_busy = match fault.kind {
            Kind::RedisRestart | Kind::RedisPause => self.redis_down || self.redis_paused,
            Kind::PgRestart | Kind::PgStop | Kind::PgTerminate => self.pg_down,
            _ => false,
        };
        if server_busy {
            self.skipped
                .push(format!("{}: server already down", fault.kind.name()));
            return None;
        }
        let busy_proxy = |p: &Proxy| p.mode() != Mode::Pass;
        match fault.kind {
            Kind::PgRefuse(_) | Kind::PgBlackhole(_)
                if busy_proxy(&self.pg_proxies[slot.unwrap()]) =>
            {
                self.skipped.push(format!(
                    "{} instance-{}: proxy busy",
                    fault.kind.name(),
                    slot.unwrap()
                ));
                return None;
            }
            Kind::RedisRefuse(_) | Kind::RedisBlackhole(_)
                if busy_proxy(&self.redis_proxies[slot.unwrap()]) =>
            {
                self.skipped.push(format!(
                    "{} instance-{}: proxy busy",
                    fault.kind.name(),
                    slot.unwrap()
                ));
                return None;
            }
            _ => {}
        }
        let incarnation = if instance_fault {
            self.current[slot.unwrap()]
        } else {
            None
        };
        let record = FaultRecord {
            kind: fault.kind,
            slot,
            incarnation,
            began: now_us(),
            healed: None,
        };
        let index = self.faults.len();
        let heal_at = Instant::now() + fault.hold;
        match fault.kind {
            Kind::Kill(_) => {
                let i = incarnation.unwrap();
                let _ = self.incarnations[i].daemon.child.kill();
                let _ = self.incarnations[i].daemon.child.wait();
                self.end(i, Ending::Killed);
                self.states[slot.unwrap()] = SlotState::Down(heal_at);
                self.faults.push(FaultRecord {
                    healed: Some(now_us()),
                    ..record
                });
                return None;
            }
            Kind::Pause(_) => {
                self.incarnations[incarnation.unwrap()]
                    .daemon
                    .signal("STOP");
                self.states[slot.unwrap()] = SlotState::Paused;
            }
            Kind::Term(_) => {
                self.incarnations[incarnation.unwrap()]
                    .daemon
                    .signal("TERM");
                self.states[slot.unwrap()] = SlotState::Terminating(Instant::now(), fault.hold);
                self.faults.push(record);
                return None;
            }
            Kind::RedisRestart => {
                self.redis.stop();
                self.redis_down = true;
            }
            Kind::RedisPause => {
                self.redis.signal("STOP");
                self.redis_paused = true;
            }
            Kind::PgRestart | Kind::PgStop => {
                self.pg.stop_server();
                self.pg_down = true;
            }
            Kind::PgTerminate => {
                let n = self.pg_terminate();
                self.faults.push(FaultRecord {
                    healed: Some(now_us()),
                    ..record
                });
                if n == 0 {
                    self.skipped.push("pg-terminate: no daemon backend".into());
                }
                return None;
            }
            Kind::PgRefuse(_) => self.pg_proxies[slot.unwrap()].set(Mode::Refuse),
            Kind::PgBlackhole(_) => self.pg_proxies[slot.unwrap()].set(Mode::Blackhole),
            Kind::RedisRefuse(_) => self.redis_proxies[slot.unwrap()].set(Mode::Refuse),
            Kind::RedisBlackhole(_) => self.redis_proxies[slot.unwrap()].set(Mode::Blackhole),
        }
        self.faults.push(record);
        Some((heal_at, index))
    }

    fn pg_terminate(&self) -> u64 {
        let Ok(mut c) = postgres::Client::connect(&self.direct_url(), postgres::NoTls) else {
            return 0;
        };
        c.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name LIKE 'message-dispatcher/%'",
            &[],
        )
        .map(|rows| rows.len() as u64)
        .unwrap_or(0)
    }

    fn heal(&mut self, index: usize) {
        let record = self.faults[index].clone();
        let slot = record.slot;
        match record.kind {
            Kind::Pause(_) => {
                let i = record.incarnation.unwrap();
                let inc = &mut self.incarnations[i];
                if inc.ended.is_none() {
                    inc.daemon.signal("CONT");
                }
                inc.pauses.push((record.began, now_us()));
                if self.current[slot.unwrap()] == Some(i)
                    && self.states[slot.unwrap()] == SlotState::Paused
                {
                    self.states[slot.unwrap()] = SlotState::Running;
                }
            }
            Kind::RedisRestart => {
                self.redis.restart().unwrap();
                self.redis_down = false;
            }
            Kind::RedisPause => {
                self.redis.signal("CONT");
                self.redis_paused = false;
            }
            Kind::PgRestart | Kind::PgStop => {
                self.pg.start_server();
                self.pg_down = false;
            }
            Kind::PgRefuse(_) | Kind::PgBlackhole(_) => {
                self.pg_proxies[slot.unwrap()].set(Mode::Pass)
            }
            Kind::RedisRefuse(_) | Kind::RedisBlackhole(_) => {
                self.redis_proxies[slot.unwrap()].set(Mode::Pass)
            }
            _ => {}
        }
        self.faults[index].healed = Some(now_us());
    }

    /// Runs the plan's faults while the load runs; returns when the last one is healed and every
    /// instance runs again.
    pub fn run_faults(&mut self) {
        let start = Instant::now();
        let faults = self.plan.faults.clone();
        let mut next = 0;
        let mut heals: Vec<(Instant, usize)> = Vec::new();
        loop {
            self.supervise();
            let now = Instant::now();
            heals.sort_by_key(|(at, _)| *at);
            while heals.first().is_some_and(|(at, _)| *at <= now) {
                let (_, index) = heals.remove(0);
                self.heal(index);
            }
            if next < faults.len() && start + faults[next].at <= now {
                if let Some(heal) = self.begin(&faults[next]) {
                    heals.push(heal);
                }
                next += 1;
            }
            let all_running = self.states.iter().all(|s| *s == SlotState::Running);
            if next == faults.len()
                && heals.is_empty()
                && all_running
                && now >= start + self.plan.duration
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Keeps supervising (restarting whatever exits) until `done` or `timeout`.
    pub fn supervise_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&World) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut turn = 0u32;
        while Instant::now() < deadline {
            self.supervise();
            // The condition may query PostgreSQL: every 200 ms is often enough.
            if turn % 10 == 0 && done(self) {
                return true;
            }
            turn += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Enqueues messages through SQL and the API until stopped, from its own seeded stream.
    pub fn start_load(&mut self) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.plan.seed ^ 0x10ad);
        let (stats, stop, url) = (self.load.clone(), self.stop_load.clone(), self.direct_url());
        let ports = self.ports.clone();
        self.threads.push(std::thread::spawn(move || {
            let mut client: Option<postgres::Client> = None;
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
                seq += 1;
                let content = match seq % 4 {
                    0 => format!("chaos {seq}"),
                    1 => format!("çhåøs \"{seq}\" ünïcødé ✓"),
                    2 => format!("line1\nline2 {seq}"),
                    _ => format!("{}{seq}", "x".repeat(120)),
                };
                if rng.random_bool(0.7) {
                    let n: i32 = if rng.random_bool(0.05) { 50 } else { rng.random_range(1..=10) };
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        client = postgres::Client::connect(&format!("{url}?connect_timeout=2"), postgres::NoTls).ok();
                    }
                    let inserted = client.as_mut().and_then(|c| {
                        c.execute(
                            "INSERT INTO messages (recipient, content)
                             SELECT '+90555' || lpad(i::text, 7, '0'), $2 FROM generate_series(1, $1) AS i",
                            &[&n, &content],
                        )
                        .ok()
                    });
                    match inserted {
                        Some(k) => stats.sql.fetch_add(k, Ordering::SeqCst),
                        None => stats.failed.fetch_add(1, Ordering::SeqCst),
                    };
                } else {
                    let port = ports[rng.random_range(0..ports.len())];
                    let body = serde_json::json!({"recipient": format!("+90555{seq:07}"), "content": content}).to_string();
                    let created = request(
                        "POST",
                        &format!("http://127.0.0.1:{port}/messages"),
                        Some(body.as_bytes()),
                        &[("Content-Type", "application/json")],
                    )
                    .is_some_and(|(status, _)| status == 201);
                    if created {
                        stats.api.fetch_add(1, Ordering::SeqCst);
                    } else {
                        stats.failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }

    pub fn stop_load(&self) {
        self.stop_load.store(true, Ordering::SeqCst);
    }

    /// Samples every instance's /health and the due work, every 250 ms, until stopped.
    pub fn start_monitor(&mut self) {
        let (samples, stop, url) = (
            self.samples.clone(),
            self.stop_monitor.clone(),
            self.direct_url(),
        );
        let ports = self.ports.clone();
        self.threads.push(std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_millis(700)))
                .build()
                .into();
            let mut client: Option<postgres::Client> = None;
            while !stop.load(Ordering::SeqCst) {
                let round = Instant::now();
                for (slot, port) in ports.iter().enumerate() {
                    let at = now_us();
                    let health = agent
                        .get(&format!("http://127.0.0.1:{port}/health"))
                        .call()
                        .ok()
                        .and_then(|mut r| {
                            let code = r.status().as_u16();
                            let v: serde_json::Value =
                                serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
                            Some((
                                code,
                                v["status"] == "healthy",
                                v["lock"]["held"] == true,
                                v["instance_id"].as_str()?.to_owned(),
                            ))
                        });
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        client = postgres::Client::connect(
                            &format!("{url}?connect_timeout=1&options=-c%20statement_timeout%3D1000"),
                            postgres::NoTls,
                        )
                        .ok();
                    }
                    let due = client.as_mut().and_then(|c| {
                        c.query_one(
                            "SELECT count(*) FROM messages WHERE status = 'pending' AND next_attempt_at <= now()",
                            &[],
                        )
                        .ok()
                        .map(|r| r.get::<_, i64>(0))
                    });
                    samples.lock().unwrap().push(Sample { at, slot, health, due });
                }
                std::thread::sleep(Duration::from_millis(250).saturating_sub(round.elapsed()));
            }
        }));
    }

    /// Lifts every fault still in force (none should be).
    pub fn heal_all(&mut self) {
        for p in self.pg_proxies.iter().chain(&self.redis_proxies) {
            p.set(Mode::Pass);
        }
        if self.redis_paused {
            self.redis.signal("CONT");
            self.redis_paused = false;
        }
    }

    pub fn stop_threads(&mut self) {
        self.stop_load.store(true, Ordering::SeqCst);
        self.stop_monitor.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    pub fn count(&self, statuses: &[&str]) -> Option<i64> {
        let mut c = postgres::Client::connect(&self.direct_url(), postgres::NoTls).ok()?;
        let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
        c.query_one(
            "SELECT count(*) FROM messages WHERE status = ANY($1)",
            &[&statuses],
        )
        .ok()
        .map(|r| r.get(0))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_load.store(true, Ordering::SeqCst);
        self.stop_monitor.store(true, Ordering::SeqCst);
        // SIGKILL works on a stopped process too; SIGCONT first all the same.
        for inc in &mut self.incarnations {
            if inc.ended.is_none() {
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &inc.daemon.pid().to_string()])
                    .status();
                let _ = inc.daemon.child.kill();
                let _ = inc.daemon.child.wait();
            }
        }
        if self.redis_paused {
            self.redis.signal("CONT");
        }
    }
}
