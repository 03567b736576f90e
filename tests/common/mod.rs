//! Shared helpers for the integration tests: a private database per test, a real HTTP receiver
//! in the test process, the real binaries as child processes, and waiting on conditions with
//! deadlines (never bare sleeps).
#![allow(dead_code)] // each test file uses a different subset

pub mod cluster;
pub mod proxy;
pub mod servers;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const DISPATCHER: &str = env!("CARGO_BIN_EXE_message-dispatcher");
pub const ADD_TEST_MESSAGES: &str = env!("CARGO_BIN_EXE_add-test-messages");
pub const WEBHOOK_SINK: &str = env!("CARGO_BIN_EXE_webhook-sink");

/// The server every test database is created on; override with TEST_DATABASE_URL.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}_{:06x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// Waits until `check` is true, failing the test with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Tries `attempt` until it gives a value, for at most `timeout`; None if it never did.
pub fn wait_until_ok<T>(timeout: Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = attempt() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` different free ports: all held open until every one is chosen, since a port just let go
/// may be handed out again at once.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// A fresh database, dropped at the end of the test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        let name = unique("md_test");
        let mut admin = postgres::Client::connect(&admin_url(), postgres::NoTls)
            .expect("PostgreSQL must be running (see README)");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let base = admin_url();
        let url = match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("TEST_DATABASE_URL must be a URL"),
        };
        TestDb { name, url }
    }

    /// A new database with the schema applied by the real `migrate` command.
    pub fn migrated() -> TestDb {
        let db = TestDb::new();
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
        db
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }

    pub fn insert(&self, n: usize) -> Vec<i64> {
        let mut c = self.client();
        (0..n)
            .map(|i| {
                c.query_one(
                    "INSERT INTO messages (recipient, content) VALUES ($1, $2) RETURNING id",
                    &[&format!("+90555000{i:04}"), &format!("test message {i}")],
                )
                .unwrap()
                .get(0)
            })
            .collect()
    }

    /// Waits until a daemon's LISTEN connection is up (it shows in pg_stat_activity).
    pub fn wait_listening(&self) {
        wait_until(Duration::from_secs(30), "the listener connection", || {
            self.client()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database()
                           AND application_name LIKE '%/listener'",
                    &[],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        });
    }

    /// Messages `pending` or `sending`, in one snapshot: two counts taken one after the other
    /// miss a message that moves between them in the meantime (claimed, or returned unsent).
    pub fn count_unfinished(&self) -> i64 {
        self.client()
            .query_one(
                "SELECT count(*) FROM messages WHERE status IN ('pending', 'sending')",
                &[],
            )
            .unwrap()
            .get(0)
    }

    pub fn count(&self, status: &str) -> i64 {
        self.client()
            .query_one(
                "SELECT count(*) FROM messages WHERE status = $1",
                &[&status],
            )
            .unwrap()
            .get(0)
    }

    /// (status, attempts, last_error, remote_message_id) of one message.
    pub fn row(&self, id: i64) -> (String, i32, Option<String>, Option<String>) {
        let r = self
            .client()
            .query_one(
                "SELECT status, attempts, last_error, remote_message_id FROM messages WHERE id = $1",
                &[&id],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&admin_url(), postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn key(&self) -> i64 {
        self.header("Idempotency-Key").unwrap().parse().unwrap()
    }
}

/// What the receiver answers.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Answer {
    pub fn accepted() -> Answer {
        Answer::status(202).body(r#"{"message":"Accepted","messageId":"remote-1"}"#)
    }

    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            body: String::new(),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn body(mut self, body: &str) -> Answer {
        self.body = body.into();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

/// Decides the answer from the request and how many requests with its Idempotency-Key came
/// before it (0 for the first).
pub type Responder = dyn Fn(&Seen, usize) -> Answer + Send + Sync;

/// A real HTTP receiver on a loopback port, recording every request.
pub struct Receiver {
    pub port: u16,
    server: Arc<tiny_http::Server>,
    seen: Arc<Mutex<Vec<Seen>>>,
    responder: Arc<Mutex<Arc<Responder>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::start_on(0)
    }

    /// Starts on `port` (0 = any free port).
    pub fn start_on(port: u16) -> Receiver {
        let server = Arc::new(tiny_http::Server::http(("127.0.0.1", port)).unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let default: Arc<Responder> = Arc::new(|_: &Seen, _| Answer::accepted());
        let responder = Arc::new(Mutex::new(default));
        let threads = (0..16)
            .map(|_| {
                let (server, seen, responder) = (server.clone(), seen.clone(), responder.clone());
                std::thread::spawn(move || {
                    while let Ok(mut request) = server.recv() {
                        let mut body = Vec::new();
                        let _ = request.as_reader().read_to_end(&mut body);
                        let at = Instant::now();
                        let request_seen = Seen {
                            path: request.url().to_owned(),
                            headers: request
                                .headers()
                                .iter()
                                .map(|h| {
                                    (
                                        h.field.to_string().to_ascii_lowercase(),
                                        h.value.to_string(),
                                    )
                                })
                                .collect(),
                            body,
                            at,
                        };
                        let before = {
                            let mut all = seen.lock().unwrap();
                            let key = request_seen.header("Idempotency-Key").map(str::to_owned);
                            let before = all
                                .iter()
                                .filter(|s: &&Seen| {
                                    s.header("Idempotency-Key").map(str::to_owned) == key
                                })
                                .count();
                            all.push(request_seen.clone());
                            before
                        };
                        let respond = responder.lock().unwrap().clone();
                        let answer = respond(&request_seen, before);
                        std::thread::sleep(answer.delay);
                        let mut response = tiny_http::Response::from_string(answer.body)
                            .with_status_code(answer.status);
                        for (k, v) in answer.headers {
                            response.add_header(
                                tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap(),
                            );
                        }
                        let _ = request.respond(response);
                    }
                })
            })
            .collect();
        Receiver {
            port,
            server,
            seen,
            responder,
            threads,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/webhook", self.port)
    }

    pub fn respond_with(&self, f: impl Fn(&Seen, usize) -> Answer + Send + Sync + 'static) {
        *self.responder.lock().unwrap() = Arc::new(f);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Idempotency keys seen, with how many requests each got.
    pub fn keys(&self) -> HashMap<i64, usize> {
        let mut keys = HashMap::new();
        for s in self.seen() {
            *keys.entry(s.key()).or_default() += 1;
        }
        keys
    }

    /// Stops listening; the port is free again afterwards.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for _ in &self.threads {
            self.server.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A running `message-dispatcher serve` child process, killed (by its pid) when dropped.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    logs: Arc<Mutex<Vec<String>>>,
    pub name: String,
}

/// Settings for a test daemon: fast cycles, its own port and database.
pub fn daemon_env(db: &TestDb, webhook: &str) -> Vec<(String, String)> {
    env_for_url(&db.url, webhook)
}

/// [`daemon_env`] in continuous mode (PROCESSING_INTERVAL=0).
pub fn continuous_env(db: &TestDb, webhook: &str) -> Vec<(String, String)> {
    let mut env = daemon_env(db, webhook);
    set(&mut env, "PROCESSING_INTERVAL", "0");
    env
}

/// The same for a database given by URL (e.g. in a private cluster).
pub fn env_for_url(database_url: &str, webhook: &str) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", database_url),
        ("WEBHOOK_URL", webhook),
        ("PROCESSING_INTERVAL", "100ms"),
        ("BATCH_SIZE", "10"),
        ("WORKER_COUNT", "4"),
        ("WEBHOOK_TIMEOUT", "2s"),
        ("MAX_PROCESSING_TIME", "5s"),
        ("RETRY_BASE_DELAY", "100ms"),
        ("RETRY_MAX_DELAY", "500ms"),
        ("LOG_LEVEL", "debug"),
        ("SERVER_HOST", "127.0.0.1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Replaces or adds `key=value` in an env list.
pub fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.into(), value.into()));
}

impl Daemon {
    /// Starts the daemon and waits until its /health answers.
    pub fn start(env: &[(String, String)]) -> Daemon {
        let daemon = Daemon::spawn("dispatcher", env);
        daemon.wait_healthy_or_degraded();
        daemon
    }

    /// Starts the daemon without waiting for anything.
    pub fn spawn(name: &str, env: &[(String, String)]) -> Daemon {
        let port = env
            .iter()
            .find(|(k, _)| k == "SERVER_PORT")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or_else(free_port);
        let mut command = Command::new(DISPATCHER);
        command
            .arg("serve")
            .env_clear()
            .env("SERVER_PORT", port.to_string())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Daemon {
            child,
            port,
            logs,
            name: name.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.port)
    }

    /// (status code, JSON body) of GET /health, or None while it does not answer.
    pub fn health(&self) -> Option<(u16, serde_json::Value)> {
        get(&self.health_url())
    }

    pub fn wait_healthy_or_degraded(&self) {
        wait_until(
            Duration::from_secs(20),
            "the daemon's /health to answer",
            || self.health().is_some(),
        );
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Log lines (parsed JSON) whose `msg` is `msg`.
    pub fn log_lines(&self, msg: &str) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["msg"] == msg)
            .collect()
    }

    pub fn wait_log(&self, msg: &str, timeout: Duration) {
        wait_until(timeout, &format!("log {msg:?} from {}", self.name), || {
            !self.log_lines(msg).is_empty()
        });
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- logs of {} (pid {}) ---", self.name, self.child.id());
            for line in self.logs() {
                eprintln!("{line}");
            }
        }
    }
}

/// A GET returning (status, JSON body); None when nothing answers.
pub fn get(url: &str) -> Option<(u16, serde_json::Value)> {
    request("GET", url, None, &[]).map(|(s, b)| (s, serde_json::from_str(&b).unwrap_or_default()))
}

/// Any request; returns (status, body text). Never follows redirects, never errors on 4xx/5xx.
pub fn request(
    method: &str,
    url: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let builder = ureq::http::Request::builder().method(method).uri(url);
    let builder = headers.iter().fold(builder, |b, (k, v)| b.header(*k, *v));
    let result = match body {
        Some(body) => agent.run(builder.body(body.to_vec()).unwrap()),
        None => agent.run(builder.body(()).unwrap()),
    };
    let mut response = result.ok()?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    Some((status, text))
}

/// Runs a binary to completion with only the given environment.
pub fn run(binary: &str, args: &[&str], env: &[(String, String)]) -> std::process::Output {
    Command::new(binary)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

/// CPU time (user + system, in clock ticks) a process has used so far.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The versions of the migrations in `sql/` (file names without `.sql`), in order.
pub fn migration_versions() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(project_root().join("sql"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".sql").map(str::to_owned))
        .collect();
    files.sort();
    files
}

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
