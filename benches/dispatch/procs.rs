//! The processes a run starts (nginx or webhook-sink, the dispatcher, wrk), each stopped by its own
//! pid, and what `/proc` says about them.

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::https::Certs;
use crate::{BenchDb, Result, WEBHOOK_SINK};

/// The JSON body every receiver here answers with, like the real webhook.
pub const ACCEPTED: &str = r#"{"message":"Accepted","messageId":"bench"}"#;

/// A scratch directory for configs and logs, removed at the end.
pub struct Workdir(pub PathBuf);

impl Workdir {
    pub fn new() -> Result<Workdir> {
        let dir = std::env::temp_dir().join(format!("md-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Workdir(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::env::var_os("BENCH_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `kill -SIGNAL pid`; false when there was no such process.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Stops a child we started: `first` (e.g. TERM), then KILL after `grace`. Returns its status.
fn stop_child(child: &mut Child, first: &str, grace: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(child.id(), first);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Where a command lives, looking in PATH and the sbin directories root's PATH would have.
pub fn find(command: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(command))
        .find(|p| p.is_file());
    found
}

fn wait_port(port: u16, child: &mut Child, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait()? {
            return Err(format!("{what} exited ({status}) before listening: {}", tail(log)).into());
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not listen on port {port}: {}", tail(log)).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The webhook receiver: a private nginx when there is one, else the project's webhook-sink.
pub enum Sink {
    Nginx(Nginx),
    WebhookSink {
        child: Child,
        port: u16,
        why: &'static str,
    },
}

impl Sink {
    /// With `tls`, nginx also serves https (see [`Nginx::https_url`]).
    pub fn start(work: &Workdir, want_nginx: Option<bool>, tls: Option<&Certs>) -> Result<Sink> {
        let nginx = find("nginx");
        let use_nginx = match want_nginx {
            Some(true) => {
                if nginx.is_none() {
                    return Err("nginx is not installed".into());
                }
                true
            }
            Some(false) => false,
            None => nginx.is_some(),
        };
        if use_nginx {
            return Ok(Sink::Nginx(Nginx::start(
                &nginx.expect("checked above"),
                work,
                tls,
            )?));
        }
        let why = if nginx.is_none() {
            " (nginx is not installed)"
        } else {
            " (BENCH_SINK)"
        };
        let port = free_port()?;
        let log = work.path("webhook-sink.log");
        let mut child = Command::new(WEBHOOK_SINK)
            .args(["--addr", &format!("127.0.0.1:{port}"), "--quiet"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        if let Err(e) = wait_port(port, &mut child, "webhook-sink", &log) {
            stop_child(&mut child, "KILL", Duration::ZERO);
            return Err(e);
        }
        Ok(Sink::WebhookSink { child, port, why })
    }

    pub fn name(&self) -> String {
        match self {
            Sink::Nginx(n) => format!("nginx {}", n.version),
            Sink::WebhookSink { why, .. } => format!("webhook-sink{why}"),
        }
    }

    pub fn nginx(&self) -> Option<&Nginx> {
        match self {
            Sink::Nginx(n) => Some(n),
            Sink::WebhookSink { .. } => None,
        }
    }

    /// Where throughput runs send: nothing is logged there.
    pub fn url(&self) -> String {
        match self {
            Sink::Nginx(n) => format!("http://127.0.0.1:{}/webhook", n.port),
            Sink::WebhookSink { port, .. } => format!("http://127.0.0.1:{port}/webhook"),
        }
    }

    /// Where the latency run sends: nginx logs the arrival time of every request there.
    pub fn latency_url(&self) -> String {
        match self {
            Sink::Nginx(n) => format!("http://127.0.0.1:{}/webhook", n.log_port),
            Sink::WebhookSink { .. } => self.url(),
        }
    }

    /// `(arrival as unix seconds, Idempotency-Key)` of every request to [`Sink::latency_url`],
    /// when the receiver records them.
    pub fn arrivals(&self) -> Option<Vec<(f64, i64)>> {
        let n = self.nginx()?;
        let text = fs::read_to_string(n.dir.join("arrivals.log")).ok()?;
        Some(
            text.lines()
                .filter_map(|l| {
                    let (at, key) = l.split_once(' ')?;
                    Some((at.parse().ok()?, key.trim().parse().ok()?))
                })
                .collect(),
        )
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Sink::WebhookSink { child, .. } = self {
            stop_child(child, "TERM", Duration::from_secs(2));
        }
    }
}

/// A private nginx: its own config, ports, pid file and logs, in the foreground (`daemon off`).
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub log_port: u16,
    /// The https server's port, when started with certificates.
    pub tls_port: Option<u16>,
    dir: PathBuf,
    pub version: String,
}

impl Nginx {
    fn start(binary: &Path, work: &Workdir, tls: Option<&Certs>) -> Result<Nginx> {
        let dir = work.path("nginx");
        fs::create_dir_all(dir.join("tmp"))?;
        let (port, log_port) = (free_port()?, free_port()?);
        let tls_port = tls.map(|_| free_port()).transpose()?;
        let d = dir.display();
        // The https server answers like the first one, and logs one line per connection (its
        // first request): the TLS handshakes, and whether each resumed a session.
        let https = match (tls, tls_port) {
            (Some(c), Some(tls_port)) => format!(
                r#"
    map $connection_requests $first_request {{ 1 1; default 0; }}
    log_format handshakes '$connection $ssl_session_reused $ssl_protocol';
    server {{
        listen 127.0.0.1:{tls_port} ssl reuseport;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench_tls:1m;
        ssl_session_timeout 1h;
        ssl_session_tickets on;
        access_log {d}/handshakes.log handshakes if=$first_request;
        location / {{ return 202 '{ACCEPTED}'; }}
    }}"#,
                c.cert.display(),
                c.key.display()
            ),
            _ => String::new(),
        };
        // `return 202` answers without reading the body; nginx discards it and keeps the
        // connection alive. The second server logs each request's arrival (`$msec`, the key) for
        // the latency run; the first logs nothing, so throughput runs measure only the answer.
        let config = format!(
            r#"daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/json;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    log_format arrivals '$msec $http_idempotency_key';
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{ return 202 '{ACCEPTED}'; }}
    }}
    server {{
        listen 127.0.0.1:{log_port};
        access_log {d}/arrivals.log arrivals;
        location / {{ return 202 '{ACCEPTED}'; }}
    }}{https}
}}
"#
        );
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config)?;
        let version = Command::new(binary)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .trim_start_matches("nginx version: nginx/")
                    .to_owned()
            })
            .unwrap_or_default();
        let log = dir.join("error.log");
        let mut child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .spawn()?;
        let ready = [Some(port), Some(log_port), tls_port]
            .into_iter()
            .flatten()
            .try_for_each(|p| wait_port(p, &mut child, "nginx", &log));
        let nginx = Nginx {
            child,
            port,
            log_port,
            tls_port,
            dir,
            version,
        };
        ready?;
        Ok(nginx)
    }

    /// Where the https runs send, when nginx serves https.
    pub fn https_url(&self) -> Option<String> {
        Some(format!("https://127.0.0.1:{}/webhook", self.tls_port?))
    }

    /// `(resumed a session, protocol)` of every connection made to [`Nginx::https_url`] so far.
    pub fn handshakes(&self) -> Vec<(bool, String)> {
        fs::read_to_string(self.dir.join("handshakes.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace().skip(1);
                Some((f.next()? == "r", f.next().unwrap_or("").to_owned()))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master stops its workers on TERM; should it be killed instead, the workers it
        // leaves are killed by their own pids.
        let master = self.child.id();
        let workers = children(master);
        stop_child(&mut self.child, "TERM", Duration::from_secs(5));
        for pid in workers {
            if Path::new(&format!("/proc/{pid}")).exists() {
                signal(pid, "KILL");
            }
        }
    }
}

/// Child pids of `pid`, from `/proc` (empty when the kernel does not say).
fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A wrk script making every request a POST of the dispatcher's body and headers.
pub fn wrk_script(work: &Workdir) -> Result<PathBuf> {
    let script = work.path("post.lua");
    fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\n\
             wrk.body = '{}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Idempotency-Key\"] = \"1\"\n\
             wrk.headers[\"webhook-id\"] = \"msg_1\"\n",
            crate::BODY
        ),
    )?;
    Ok(script)
}

/// The wrk load generator's requests/s against `url`, POSTing the dispatcher's request.
pub fn wrk(work: &Workdir, url: &str, threads: u32, connections: u32, secs: u64) -> Result<f64> {
    let binary = find("wrk").ok_or("wrk is not installed")?;
    let script = wrk_script(work)?;
    let out = Command::new(binary)
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("-s")
        .arg(&script)
        .arg(url)
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        return Err(format!(
            "wrk failed ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk's output:\n{text}").into())
}

/// A running `message-dispatcher serve`, stopped (SIGTERM, by pid) when dropped.
pub struct Daemon {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

pub struct DaemonSettings<'a> {
    /// The dispatcher binary: this build's, or a reference build's.
    pub binary: &'a Path,
    pub webhook: &'a str,
    pub batch_size: u32,
    pub workers: u32,
    pub tag: &'a str,
    /// More variables, e.g. WEBHOOK_RATE_LIMIT.
    pub env: &'a [(&'a str, String)],
}

impl Daemon {
    /// Starts the daemon in continuous mode and waits until it serves /health and LISTENs.
    pub fn start(db: &BenchDb, work: &Workdir, s: &DaemonSettings) -> Result<Daemon> {
        let port = free_port()?;
        let log = work.path(&format!("dispatcher-{}.log", s.tag));
        // BENCH_DAEMON_WRAPPER runs the daemon under a profiler, e.g.
        // "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out".
        let wrapper: Vec<String> = std::env::var("BENCH_DAEMON_WRAPPER")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(s.binary);
                c
            }
            None => Command::new(s.binary),
        };
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db.url)
            .env("WEBHOOK_URL", s.webhook)
            .env("PROCESSING_INTERVAL", "0")
            .env("BATCH_SIZE", s.batch_size.to_string())
            .env("WORKER_COUNT", s.workers.to_string())
            .env("SERVER_HOST", "127.0.0.1")
            .env("SERVER_PORT", port.to_string())
            .env("LOG_LEVEL", "info")
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let child = command.spawn()?;
        let mut daemon = Daemon { child, port, log };
        let slow = !wrapper.is_empty();
        daemon.wait_ready(db, if slow { 120 } else { 30 })?;
        Ok(daemon)
    }

    fn wait_ready(&mut self, db: &BenchDb, secs: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build()
            .into();
        let health = format!("http://127.0.0.1:{}/health", self.port);
        let mut client = db.client()?;
        loop {
            self.check_alive()?;
            let healthy = agent
                .get(&health)
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200);
            let listening: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name LIKE '%/listener'",
                    &[],
                )?
                .get(0);
            if healthy && listening > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the dispatcher was not healthy and listening within {secs} s (healthy: {healthy}):\n{}",
                    tail(&self.log)
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                Err(format!("the dispatcher exited ({status}):\n{}", tail(&self.log)).into())
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> Result<()> {
        let status = stop_child(&mut self.child, "TERM", Duration::from_secs(40));
        match status {
            Some(s) if s.success() => Ok(()),
            other => Err(format!(
                "the dispatcher did not stop cleanly ({other:?}):\n{}",
                tail(&self.log)
            )
            .into()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, "TERM", Duration::from_secs(10));
    }
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = &stat[stat.rfind(')').ok_or("odd /proc stat")? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11).ok_or("short /proc stat")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("short /proc stat")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A field of /proc/PID/status in kB (VmHWM, VmRSS).
pub fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

/// Nanosecond CPU time of all threads of a process and their context switches, from
/// /proc/PID/task/*/schedstat and status (finer than clock ticks, for the idle measurement).
pub fn cpu_ns_and_switches(pid: u32) -> Result<(u64, u64)> {
    let (mut ns, mut switches) = (0, 0);
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let mut sched = String::new();
        if fs::File::open(task.join("schedstat"))
            .and_then(|mut f| f.read_to_string(&mut sched))
            .is_err()
        {
            continue; // the thread just ended
        }
        ns += sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let status = fs::read_to_string(task.join("status")).unwrap_or_default();
        for l in status.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok((ns, switches))
}
