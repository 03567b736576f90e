//! The dispatch benchmark: `cargo bench --bench dispatch`.
//!
//! One run, on this machine, with the release build of the real binaries:
//! 1. installs nginx-light and wrk from Debian's packages if missing;
//! 2. starts a private nginx answering every POST with 202 `{"message":"Accepted",…}`;
//! 3. measures nginx's limit with wrk (WORKER_COUNT connections, the dispatcher's request);
//! 4. the bare loop: WORKER_COUNT threads sending that request through one shared agent with the
//!    dispatcher's own sending code (`Webhook::deliver`) and no database — the design's ceiling —
//!    and, for comparison, a stock ureq agent making a minimal request;
//! 5. the real dispatcher (continuous mode) draining a backlog from a fresh database, for a few
//!    batch sizes: msgs/s from the moment the backlog's INSERT committed to the last `sent_at`,
//!    peak RSS (VmHWM) and CPU time per 1,000 messages (utime + stime);
//! 6. insert → delivery latency at a steady offered load, one INSERT per message, measured at
//!    the receiver (nginx logs each request's arrival) and by `sent_at`;
//! 7. the idle daemon's CPU use;
//! 8. the drain again on a table that already holds a million `sent` rows, and EXPLAIN ANALYZE of
//!    the claim and record statements there;
//! 9. the slow receiver (slow.rs): WORKER_COUNT 64 / 256 / 1,024 against 50 / 100 / 250 ms per
//!    request, msgs/s against the ideal (WORKER_COUNT / delay), peak RSS, CPU per 1,000 messages;
//! 10. https (https.rs): the same nginx over TLS with a throwaway CA: wrk, the bare loop and a drain
//!     over https, and the TLS handshakes the daemon made;
//! 11. writes the results to BENCHMARKS.md (between its generated-section markers).
//!
//! Run by `cargo test --all-targets` (no `--bench` argument) it is a smoke test of a few seconds:
//! a few hundred messages, no wrk and no big table, webhook-sink when nginx is not installed,
//! nothing written. `BENCH_*` variables change sizes (see [`Settings::from_env`]); a run with
//! any of them set writes its report only where `BENCH_OUT` says.

mod https;
mod machine;
mod procs;
mod reference;
mod report;
mod sink;
mod slow;
mod statements;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use message_dispatcher::config::Config;
use message_dispatcher::message::{Claimed, Delivery};
use message_dispatcher::webhook::Webhook;

use procs::{Daemon, DaemonSettings, Sink, Workdir};

pub const DISPATCHER: &str = env!("CARGO_BIN_EXE_message-dispatcher");

/// Which dispatcher a drain runs: this build, or the reference build, with any extra variables.
#[derive(Clone, Copy)]
pub struct Variant<'a> {
    pub binary: &'a Path,
    pub env: &'a [(&'a str, String)],
}

impl Variant<'static> {
    pub fn current() -> Variant<'static> {
        Variant {
            binary: Path::new(DISPATCHER),
            env: &[],
        }
    }
}
pub const WEBHOOK_SINK: &str = env!("CARGO_BIN_EXE_webhook-sink");

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The message every sender here sends (the dispatcher sends the backlog's own, of this shape).
pub const RECIPIENT: &str = "+905550000001";
pub const CONTENT: &str = "Your verification code is 123456. It expires in 10 minutes.";
pub const BODY: &str = r#"{"to":"+905550000001","content":"Your verification code is 123456. It expires in 10 minutes."}"#;

/// The backlog: `$1` messages in one statement, like those above.
const INSERT_BACKLOG: &str = "
INSERT INTO messages (recipient, content)
SELECT '+90555' || lpad(g::text, 7, '0'),
       'Your verification code is ' || (100000 + g % 900000) || '. It expires in 10 minutes.'
FROM generate_series(1, $1::int) AS g";

/// History: `$1` messages delivered a day ago.
const INSERT_HISTORY: &str = "
INSERT INTO messages (recipient, content, status, attempts, created_at, updated_at, sent_at,
                      next_attempt_at, remote_message_id)
SELECT '+90555' || lpad(g::text, 7, '0'),
       'Your order #' || g || ' has shipped and will arrive tomorrow.',
       'sent', 1, now() - interval '1 day', now() - interval '1 day', now() - interval '1 day',
       now() - interval '1 day', 'remote-' || g
FROM generate_series(1, $1::int) AS g";

/// Whether messages are still waiting or in flight: the first entry of each small partial index,
/// cheap enough to ask often without taking CPU from the run.
const REMAINING: &str = "SELECT EXISTS (SELECT 1 FROM messages WHERE status = 'pending')
                              OR EXISTS (SELECT 1 FROM messages WHERE status = 'sending')";
/// How often the bench looks (the figures come from the database's timestamps, not from this).
const POLL: Duration = Duration::from_millis(50);

pub fn say(line: &str) {
    eprintln!("[dispatch bench] {line}");
}

pub struct Settings {
    pub full: bool,
    pub customised: bool,
    pub messages: i32,
    pub batch_sizes: Vec<u32>,
    pub workers: u32,
    pub big_rows: i32,
    pub wrk_secs: u64,
    pub wrk_threads: u32,
    pub bare_secs: f64,
    pub rate: u32,
    pub latency_secs: u64,
    pub idle_secs: u64,
    pub nginx: Option<bool>,
    pub out: Option<std::path::PathBuf>,
    pub admin_url: String,
    /// BENCH_ONLY: the phases to run (wrk, bare, drain, big, reference, statements, https, sink,
    /// slow, latency); no report then.
    pub only: Option<Vec<String>>,
    /// BENCH_REFERENCE: the commit whose build the `reference` phase drains beside this one
    /// (`none` skips it); the full run's default is [`reference::DEFAULT_REVISION`].
    pub reference: Option<String>,
}

impl Settings {
    /// `--bench` (as `cargo bench` passes) = the full run; otherwise the smoke test.
    /// Overrides: BENCH_MESSAGES, BENCH_BATCH_SIZES (comma-separated), BENCH_WORKERS,
    /// BENCH_BIG_ROWS (0 = skip), BENCH_SECONDS (wrk, bare loop, latency and idle phases),
    /// BENCH_RATE (msgs/s offered in the latency phase), BENCH_SINK (nginx | webhook-sink),
    /// BENCH_OUT (report file), BENCH_DATABASE_URL (else TEST_DATABASE_URL, else local),
    /// BENCH_DAEMON_WRAPPER (e.g. a profiler command), BENCH_KEEP (keep the scratch directory),
    /// BENCH_ONLY (some phases only, e.g. `bare,drain`, for profiling; no report).
    fn from_env() -> Result<Settings> {
        let full = std::env::args().skip(1).any(|a| a == "--bench");
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let mut customised = false;
        let mut num = |k: &str, default: u64| -> Result<u64> {
            match var(k) {
                Some(v) => {
                    customised = true;
                    Ok(v.trim().parse().map_err(|_| format!("{k}: not a number"))?)
                }
                None => Ok(default),
            }
        };
        let (messages, big, secs, rate, bare) = if full {
            (20_000, 1_000_000, 10, 200, 10.0)
        } else {
            (300, 0, 1, 50, 1.0)
        };
        let messages = num("BENCH_MESSAGES", messages)? as i32;
        let workers = num("BENCH_WORKERS", 4)? as u32;
        let big_rows = num("BENCH_BIG_ROWS", big)? as i32;
        let phase_secs = num("BENCH_SECONDS", secs)?;
        let rate = num("BENCH_RATE", rate)? as u32;
        let batch_sizes = match var("BENCH_BATCH_SIZES") {
            Some(v) => {
                customised = true;
                v.split(',')
                    .map(|b| b.trim().parse::<u32>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| "BENCH_BATCH_SIZES: expected e.g. 100,250,500")?
            }
            None if full => vec![100, 250, 500],
            None => vec![100],
        };
        let nginx = match var("BENCH_SINK").as_deref() {
            None => None,
            Some("nginx") => Some(true),
            Some("webhook-sink") => Some(false),
            Some(other) => return Err(format!("BENCH_SINK: {other:?}").into()),
        };
        let out = match var("BENCH_OUT") {
            Some(path) => Some(path.into()),
            None if full && !customised => {
                Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md"))
            }
            None => None,
        };
        Ok(Settings {
            full,
            customised,
            messages,
            batch_sizes,
            workers,
            big_rows,
            wrk_secs: phase_secs,
            wrk_threads: 2,
            bare_secs: if var("BENCH_SECONDS").is_some() {
                phase_secs as f64
            } else {
                bare
            },
            rate,
            latency_secs: phase_secs,
            idle_secs: phase_secs,
            nginx,
            out,
            admin_url: var("BENCH_DATABASE_URL")
                .or_else(|| var("TEST_DATABASE_URL"))
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            only: var("BENCH_ONLY").map(|v| v.split(',').map(|p| p.trim().to_owned()).collect()),
            reference: match var("BENCH_REFERENCE") {
                Some(v) if v == "none" => None,
                Some(v) => Some(v),
                None if full => Some(reference::DEFAULT_REVISION.to_owned()),
                None => None,
            },
        })
    }

    fn wants(&self, phase: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|p| p == phase))
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let result = Settings::from_env().and_then(|s| {
        let work = Workdir::new()?;
        run(&s, &work)
    });
    match result {
        Ok(()) => {
            say(&format!("done in {:.1} s", started.elapsed().as_secs_f64()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            say(&format!("FAILED: {text}"));
            ExitCode::FAILURE
        }
    }
}

fn run(s: &Settings, work: &Workdir) -> Result<()> {
    say(&format!(
        "{} run: {} messages, WORKER_COUNT={}, BATCH_SIZE {:?}",
        if s.full { "full" } else { "smoke" },
        s.messages,
        s.workers,
        s.batch_sizes
    ));
    if s.full && s.nginx != Some(false) {
        machine::ensure_tools()?;
    }
    let mut admin = postgres::Client::connect(&s.admin_url, postgres::NoTls)
        .map_err(|e| format!("PostgreSQL at {}: {e}", s.admin_url))?;
    let machine = machine::Machine::describe(&mut admin);
    drop(admin);

    let certs = https::prepare(s, work)?;
    let sink = Sink::start(work, s.nginx, certs.as_ref().ok())?;
    say(&format!("receiver: {} at {}", sink.name(), sink.url()));

    let wrk = match sink.nginx() {
        Some(_) if s.full && s.wrk_secs > 0 && s.wants("wrk") => {
            let rate = procs::wrk(work, &sink.url(), s.wrk_threads, s.workers, s.wrk_secs)?;
            say(&format!(
                "wrk -t{} -c{} -d{}s: {rate:.0} requests/s",
                s.wrk_threads, s.workers, s.wrk_secs
            ));
            Some(rate)
        }
        _ => None,
    };

    let (mut bare, mut raw) = (f64::NAN, f64::NAN);
    if s.wants("bare") {
        bare = bare_loop(&sink.url(), None, s.workers, s.bare_secs, Sender::Deliver)?;
        say(&format!(
            "bare loop (Webhook::deliver, {} threads, one agent): {bare:.0} msgs/s",
            s.workers
        ));
        raw = bare_loop(
            &sink.url(),
            None,
            s.workers,
            s.bare_secs / 2.0,
            Sender::RawUreq,
        )?;
        say(&format!(
            "bare loop (stock ureq agent, minimal request): {raw:.0} msgs/s"
        ));
    }

    let mut sweep = Vec::new();
    for &batch in s.batch_sizes.iter().filter(|_| s.wants("drain")) {
        let d = drain(
            s,
            &sink,
            work,
            batch,
            0,
            &format!("fresh-{batch}"),
            Variant::current(),
        )?;
        say(&d.describe());
        sweep.push(d);
    }
    let best_drain = sweep.iter().max_by(|a, b| a.rate.total_cmp(&b.rate));
    let best = best_drain
        .map(|d| d.batch_size)
        .or(s.batch_sizes.first().copied())
        .ok_or("no batch size given")?;

    let (big, fresh_again) = if s.big_rows > 0 && s.wants("big") {
        let big = drain(s, &sink, work, best, s.big_rows, "big", Variant::current())?;
        say(&big.describe());
        if s.only.is_some() {
            say(big.explain.as_deref().unwrap_or_default());
        }
        let again = drain(s, &sink, work, best, 0, "fresh-again", Variant::current())?;
        say(&again.describe());
        (Some(big), Some(again))
    } else {
        (None, None)
    };

    let comparison = match &s.reference {
        Some(revision) if s.wants("reference") => {
            Some(reference::Comparison::run(s, &sink, work, best, revision)?)
        }
        _ => None,
    };
    let plain = https::Plain {
        wrk,
        bare: Some(bare).filter(|b| !b.is_nan()),
        drain: best_drain,
    };
    let statements = if s.wants("statements") {
        Some(statements::phase(s, best, s.reference.as_deref())?)
    } else {
        None
    };
    let https = https::phase(s, work, &sink, certs, &plain)?;
    let sink_load = sink::phase(s, work)?;
    let slow = if s.wants("slow") {
        slow::phase(s, work)?
    } else {
        Vec::new()
    };

    if !s.wants("latency") {
        say("BENCH_ONLY: no report");
        return Ok(());
    }
    let (latency, idle) = latency_and_idle(s, &sink, work, best)?;
    say(&latency.describe());
    say(&idle.describe());
    if s.only.is_some() || sweep.is_empty() || bare.is_nan() {
        say("BENCH_ONLY: no report");
        return Ok(());
    }
    if !s.full {
        smoke_checks(&latency, &idle)?;
    }

    let results = report::Results {
        settings: s,
        machine,
        receiver: sink.name(),
        wrk,
        bare,
        raw,
        sweep,
        best,
        big,
        fresh_again,
        latency,
        idle,
        comparison,
        statements,
        https,
        sink: sink_load,
        slow,
    };
    let markdown = results.markdown();
    if s.full {
        println!("\n{markdown}");
    }
    if let Some(path) = &s.out {
        report::write_section(path, &markdown)?;
        say(&format!("results written to {}", path.display()));
        if path.ends_with("BENCHMARKS.md") {
            let readme = path.with_file_name("README.md");
            report::write_section(&readme, &report::summary(&markdown))?;
            say(&format!("summary written to {}", readme.display()));
        }
    }
    Ok(())
}

/// The smoke run proves the benchmark works, and catches gross regressions only: a daemon that
/// spins while idle, or messages that wait for a poll instead of the NOTIFY (both happened).
/// Loose bounds, since it runs in a debug build on a busy CI machine.
fn smoke_checks(latency: &Latency, idle: &Idle) -> Result<()> {
    let p50 = latency.receiver.as_ref().unwrap_or(&latency.recorded).p50;
    if p50 > 500.0 {
        return Err(format!("insert → delivery p50 is {p50:.0} ms (> 500 ms)").into());
    }
    if idle.cpu_percent > 20.0 {
        return Err(format!(
            "the idle daemon used {:.1} % CPU (> 20 %)",
            idle.cpu_percent
        )
        .into());
    }
    say("smoke checks passed: everything delivered, no spinning, no waiting for a poll");
    Ok(())
}

/// A database of our own (`md_bench_<pid>_<tag>`), migrated by the real binary, dropped at the end.
pub struct BenchDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl BenchDb {
    /// Migrated by `binary`, so a reference build gets the schema it was written for.
    fn create(admin_url: &str, tag: &str, binary: &Path) -> Result<BenchDb> {
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = format!("md_bench_{}_{tag}", std::process::id());
        let (server, _) = admin_url
            .rsplit_once('/')
            .ok_or("the database URL must end in /DBNAME")?;
        let db = BenchDb {
            admin_url: admin_url.to_owned(),
            url: format!("{server}/{name}"),
            name,
        };
        let mut admin = postgres::Client::connect(admin_url, postgres::NoTls)?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name))?;
        admin.batch_execute(&format!("CREATE DATABASE {}", db.name))?;
        let out = Command::new(binary)
            .arg("migrate")
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .env("LOG_LEVEL", "warn")
            .output()?;
        if !out.status.success() {
            return Err(format!("migrate failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        // BENCH_DB_SETUP: SQL run on every fresh database after its migration, to try a schema
        // change (e.g. `DROP INDEX …`) before writing a migration for it.
        if let Some(sql) = std::env::var("BENCH_DB_SETUP")
            .ok()
            .filter(|s| !s.trim().is_empty())
        {
            db.client()?.batch_execute(&sql)?;
        }
        Ok(db)
    }

    pub fn client(&self) -> Result<postgres::Client> {
        Ok(postgres::Client::connect(&self.url, postgres::NoTls)?)
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

#[derive(Clone, Copy)]
pub enum Sender {
    /// The dispatcher's own sending code: body, headers, reading the answer, `messageId`.
    Deliver,
    /// A stock ureq agent (default resolver) doing the least it can: a POST with the same
    /// headers and body, the answer read to the end.
    RawUreq,
}

/// The daemon's configuration and sending code for `workers` threads sending to `url`
/// (trusting the CA file `ca`, for https), as a bare loop uses them.
pub fn webhook_for(url: &str, ca: Option<&Path>, workers: u32) -> Result<(Config, Arc<Webhook>)> {
    let mut vars: HashMap<String, String> = [
        ("WEBHOOK_URL", url.to_owned()),
        ("WORKER_COUNT", workers.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(ca) = ca {
        vars.insert("SSL_CERT_FILE".into(), ca.display().to_string());
    }
    let config = Config::from_vars(&vars).map_err(|e| e.to_string())?;
    let webhook_url = config.webhook_url.clone().ok_or("no WEBHOOK_URL")?;
    let webhook = Arc::new(Webhook::new(&config, &webhook_url)?);
    Ok((config, webhook))
}

/// `workers` threads sending through one shared agent, no database: messages per second.
/// `ca`: the SSL_CERT_FILE an https `url` needs (the dispatcher's sender only).
pub fn bare_loop(
    url: &str,
    ca: Option<&Path>,
    workers: u32,
    secs: f64,
    sender: Sender,
) -> Result<f64> {
    let (config, webhook) = webhook_for(url, ca, workers)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(config.webhook_timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .max_idle_connections(workers as usize * 2)
        .max_idle_connections_per_host(workers as usize * 2)
        .build()
        .into();
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let me = std::process::id();
    let cpu_before = procs::cpu_ticks(me)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..workers)
        .map(|n| {
            let (webhook, agent, url) = (webhook.clone(), agent.clone(), url.to_owned());
            let (sent, failed) = (sent.clone(), failed.clone());
            std::thread::spawn(move || {
                let message = Claimed {
                    id: i64::from(n) + 1,
                    recipient: RECIPIENT.into(),
                    content: CONTENT.into(),
                    attempts: 0,
                    charged: 0,
                    expires: None,
                };
                while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
                    let ok = match sender {
                        Sender::Deliver => {
                            matches!(
                                webhook.deliver(&message, false).delivery,
                                Delivery::Sent { .. }
                            )
                        }
                        Sender::RawUreq => agent
                            .post(&url)
                            .header("Content-Type", "application/json")
                            .header("Idempotency-Key", "1")
                            .header("webhook-id", "msg_1")
                            .send(BODY.as_bytes())
                            .ok()
                            .filter(|r| r.status().is_success())
                            .and_then(|mut r| r.body_mut().read_to_vec().ok())
                            .is_some(),
                    };
                    if ok {
                        sent.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "a bare-loop thread panicked")?;
    }
    if failed.load(Ordering::Relaxed) {
        return Err("the receiver did not accept a bare-loop request".into());
    }
    let sent = sent.load(Ordering::Relaxed) as f64;
    let cpu = (procs::cpu_ticks(me)? - cpu_before) as f64 / procs::clock_ticks();
    say(&format!(
        "  ({sent:.0} requests, CPU {:.0} ms / 1,000)",
        cpu * 1e6 / sent.max(1.0)
    ));
    Ok(sent / started.elapsed().as_secs_f64())
}

/// One drain of a backlog by the real dispatcher.
pub struct Drain {
    pub batch_size: u32,
    pub big_rows: i32,
    pub messages: i32,
    /// Insert committed → last `sent_at`.
    pub seconds: f64,
    pub rate: f64,
    /// First → last `sent_at`.
    pub delivery_rate: f64,
    pub peak_rss_kb: u64,
    pub cpu_ms_per_1000: f64,
    /// CPU of the PostgreSQL backends serving the daemon, per 1,000 messages (None when their
    /// /proc entries are not readable).
    pub db_cpu_ms_per_1000: Option<f64>,
    pub explain: Option<String>,
}

impl Drain {
    pub fn describe(&self) -> String {
        format!(
            "drain BATCH_SIZE={} on {} rows: {} msgs in {:.2} s = {:.0} msgs/s (first→last {:.0}/s), \
             peak RSS {} kB, CPU {:.0} ms / 1,000 msgs (PostgreSQL {})",
            self.batch_size,
            if self.big_rows > 0 {
                format!("{}+", self.big_rows)
            } else {
                "fresh".into()
            },
            self.messages,
            self.seconds,
            self.rate,
            self.delivery_rate,
            self.peak_rss_kb,
            self.cpu_ms_per_1000,
            self.db_cpu_ms_per_1000
                .map_or("not readable".into(), |v| format!("{v:.0} ms"))
        )
    }
}

fn drain(
    s: &Settings,
    sink: &Sink,
    work: &Workdir,
    batch_size: u32,
    big_rows: i32,
    tag: &str,
    variant: Variant,
) -> Result<Drain> {
    drain_to(s, &sink.url(), work, batch_size, big_rows, tag, variant)
}

/// [`drain`] to any webhook URL.
pub fn drain_to(
    s: &Settings,
    url: &str,
    work: &Workdir,
    batch_size: u32,
    big_rows: i32,
    tag: &str,
    variant: Variant,
) -> Result<Drain> {
    let db = BenchDb::create(&s.admin_url, tag, variant.binary)?;
    let mut c = db.client()?;
    if big_rows > 0 {
        let t = Instant::now();
        c.execute(INSERT_HISTORY, &[&big_rows])?;
        c.batch_execute("VACUUM ANALYZE messages")?;
        say(&format!(
            "{big_rows} sent rows inserted and vacuumed in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }
    let mut daemon = Daemon::start(
        &db,
        work,
        &DaemonSettings {
            binary: variant.binary,
            webhook: url,
            batch_size,
            workers: s.workers,
            tag,
            env: variant.env,
        },
    )?;
    let pid = daemon.pid();
    say(&format!("dispatcher pid {pid} ({tag})"));
    let before: i64 = c
        .query_one("SELECT coalesce(max(id), 0) FROM messages", &[])?
        .get(0);
    let backends: Vec<u32> = c
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name LIKE 'message-dispatcher/%'",
            &[],
        )?
        .iter()
        .map(|r| r.get::<_, i32>(0) as u32)
        .collect();
    let db_ticks = || -> Option<u64> { backends.iter().map(|&b| procs::cpu_ticks(b).ok()).sum() };
    let db_before = db_ticks();
    let cpu_before = procs::cpu_ticks(pid)?;
    c.execute(INSERT_BACKLOG, &[&s.messages])?;
    let committed: f64 = c
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])?
        .get(0);
    let timeout = Duration::from_secs(60.max(s.messages as u64 / 100));
    let waited = Instant::now();
    loop {
        let left: bool = c.query_one(REMAINING, &[])?.get(0);
        if !left {
            break;
        }
        daemon.check_alive()?;
        if waited.elapsed() > timeout {
            return Err(format!("messages still not sent after {timeout:?}").into());
        }
        std::thread::sleep(POLL);
    }
    let cpu_after = procs::cpu_ticks(pid)?;
    let db_after = db_ticks();
    let peak_rss_kb = procs::status_kb(pid, "VmHWM")?;
    let row = c.query_one(
        "SELECT count(*) FILTER (WHERE status = 'sent'),
                extract(epoch FROM min(sent_at))::float8,
                extract(epoch FROM max(sent_at))::float8
         FROM messages WHERE id > $1",
        &[&before],
    )?;
    let (sent, first, last): (i64, Option<f64>, Option<f64>) = (row.get(0), row.get(1), row.get(2));
    if sent != i64::from(s.messages) {
        return Err(format!("only {sent} of {} messages were sent", s.messages).into());
    }
    let (first, last) = (first.unwrap_or(committed), last.unwrap_or(committed));
    let seconds = (last - committed).max(1e-6);
    let explain = if big_rows > 0 {
        Some(explain(&db, batch_size, s.messages)?)
    } else {
        None
    };
    daemon.stop()?;
    let ticks = (cpu_after - cpu_before) as f64;
    Ok(Drain {
        batch_size,
        big_rows,
        messages: s.messages,
        seconds,
        rate: f64::from(s.messages) / seconds,
        delivery_rate: f64::from(s.messages - 1) / (last - first).max(1e-6),
        peak_rss_kb,
        cpu_ms_per_1000: ticks / procs::clock_ticks() * 1000.0 * 1000.0 / f64::from(s.messages),
        db_cpu_ms_per_1000: db_before.zip(db_after).map(|(b, a)| {
            a.saturating_sub(b) as f64 / procs::clock_ticks() * 1e6 / f64::from(s.messages)
        }),
        explain,
    })
}

/// EXPLAIN ANALYZE of the daemon's claim and record statements (the library's own, so the plan
/// shown is the current code's) with a backlog waiting, rolled back afterwards. The record's
/// statement runs inside a function (sql/0009): its plan is the one auto_explain sends.
fn explain(db: &BenchDb, batch_size: u32, backlog: i32) -> Result<String> {
    use message_dispatcher::store::{CLAIM, EXPIRE_LIMIT, RECORD};
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut c = db
        .url
        .parse::<postgres::Config>()?
        .notice_callback(move |n| sink.lock().unwrap().push(n.message().to_owned()))
        .connect(postgres::NoTls)?;
    let mut tx = c.transaction()?;
    tx.execute(INSERT_BACKLOG, &[&backlog])?;
    let limit = i64::from(batch_size);
    let expire_limit = i64::from(EXPIRE_LIMIT);
    let plan = |rows: Vec<postgres::Row>| -> String {
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let explain = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING ON)";
    let claim_args: [&(dyn postgres::types::ToSql + Sync); 4] =
        [&limit, &None::<i64>, &"bench", &expire_limit];
    let claim_plan = plan(tx.query(&format!("{explain} {CLAIM}"), &claim_args)?);
    // The claim's EXPLAIN ANALYZE ran it: `limit` rows are now `sending` by "bench"; claim the
    // next batch for real to have ids to record.
    let ids: Vec<i64> = tx
        .query(CLAIM, &claim_args)?
        .iter()
        .map(|r| r.get(1))
        .collect();
    let n = ids.len();
    let now = std::time::SystemTime::now();
    tx.batch_execute(
        "LOAD 'auto_explain';
         SET LOCAL auto_explain.log_min_duration = 0;
         SET LOCAL auto_explain.log_analyze = on;
         SET LOCAL auto_explain.log_buffers = on;
         SET LOCAL auto_explain.log_nested_statements = on;
         SET LOCAL client_min_messages = log",
    )?;
    tx.query(
        RECORD,
        &[
            &ids,
            &vec!["sent"; n],
            &vec![0i32; n],
            &vec![None::<&str>; n],
            &vec![Some("bench"); n],
            &vec![0i64; n],
            &None::<i64>,
            &"bench",
            &ids,
            &vec![1i32; n],
            &vec![now; n],
            &vec![1i32; n],
            &vec![Some(202i16); n],
            &vec![None::<&str>; n],
            &vec![0i32; n],
            &false,
        ],
    )?;
    tx.rollback()?;
    let record_plan = notices
        .lock()
        .unwrap()
        .iter()
        .find(|text| text.contains("UPDATE messages"))
        .map(|text| {
            // After its query's text: the first line of the plan is the first with figures.
            let lines: Vec<&str> = text.lines().collect();
            let first = lines.iter().position(|l| l.contains("(cost=")).unwrap_or(0);
            lines[first..].join("\n")
        })
        .ok_or("auto_explain sent no plan of the outcome write")?;
    Ok(format!(
        "-- claim (BATCH_SIZE={batch_size}, {backlog} pending)\n{claim_plan}\n\n-- record ({n} outcomes, with their attempt history)\n{record_plan}"
    ))
}

pub struct Latency {
    pub offered: f64,
    pub count: usize,
    /// Insert → arrival at the receiver, ms (nginx only).
    pub receiver: Option<Percentiles>,
    /// Insert → `sent_at` (the outcome's write), ms.
    pub recorded: Percentiles,
}

pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Percentiles {
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
            v.get(rank - 1).copied().unwrap_or(f64::NAN)
        };
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

impl Latency {
    fn describe(&self) -> String {
        let r = self.receiver.as_ref().map_or(String::new(), |r| {
            format!(
                "at receiver p50 {:.1} ms p99 {:.1} ms max {:.1} ms; ",
                r.p50, r.p99, r.max
            )
        });
        format!(
            "latency at {:.0} msgs/s ({} msgs): {r}by sent_at p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            self.offered, self.count, self.recorded.p50, self.recorded.p99, self.recorded.max
        )
    }
}

pub struct Idle {
    pub seconds: f64,
    pub cpu_percent: f64,
    pub ticks: u64,
    pub wakeups_per_sec: f64,
}

impl Idle {
    fn describe(&self) -> String {
        format!(
            "idle over {:.0} s: {:.4} % CPU ({} ticks), {:.1} context switches/s",
            self.seconds, self.cpu_percent, self.ticks, self.wakeups_per_sec
        )
    }
}

/// Continuous mode at a steady offered load (one INSERT per message), then the daemon idle.
fn latency_and_idle(
    s: &Settings,
    sink: &Sink,
    work: &Workdir,
    batch_size: u32,
) -> Result<(Latency, Idle)> {
    let db = BenchDb::create(&s.admin_url, "latency", Path::new(DISPATCHER))?;
    let url = sink.latency_url();
    let mut daemon = Daemon::start(
        &db,
        work,
        &DaemonSettings {
            binary: Path::new(DISPATCHER),
            webhook: &url,
            batch_size,
            workers: s.workers,
            tag: "latency",
            env: &[],
        },
    )?;
    let mut c = db.client()?;
    let insert = c.prepare(
        "INSERT INTO messages (recipient, content) VALUES ($1, $2)
         RETURNING id, extract(epoch FROM created_at)::float8",
    )?;
    let total = (u64::from(s.rate) * s.latency_secs) as u32;
    let period = Duration::from_secs_f64(1.0 / f64::from(s.rate.max(1)));
    let mut created: HashMap<i64, f64> = HashMap::with_capacity(total as usize);
    let started = Instant::now();
    for i in 0..total {
        let due = started + period * i;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let row = c.query_one(&insert, &[&RECIPIENT, &CONTENT])?;
        created.insert(row.get(0), row.get(1));
    }
    let offered = f64::from(total) / started.elapsed().as_secs_f64();
    let waited = Instant::now();
    loop {
        let left: bool = c.query_one(REMAINING, &[])?.get(0);
        if !left {
            break;
        }
        daemon.check_alive()?;
        if waited.elapsed() > Duration::from_secs(60) {
            return Err("messages of the latency run still not sent after 60 s".into());
        }
        std::thread::sleep(POLL);
    }
    let recorded: Vec<f64> = c
        .query(
            "SELECT extract(epoch FROM sent_at - created_at)::float8 * 1000 FROM messages
             WHERE status = 'sent'",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if recorded.len() != created.len() {
        return Err(format!("{} of {} sent", recorded.len(), created.len()).into());
    }
    let receiver = sink.arrivals().map(|arrivals| {
        let mut first: HashMap<i64, f64> = HashMap::new();
        for (at, key) in arrivals {
            first.entry(key).or_insert(at);
        }
        Percentiles::of(
            created
                .iter()
                // nginx's $msec is truncated to the millisecond: a message that arrived within
                // the millisecond it was inserted can show as slightly negative.
                .filter_map(|(id, c)| Some(((first.get(id)? - c) * 1000.0).max(0.0)))
                .collect(),
        )
    });
    let latency = Latency {
        offered,
        count: created.len(),
        receiver,
        recorded: Percentiles::of(recorded),
    };

    // Idle: nothing due, nothing arriving. Let the last batch's bookkeeping settle first.
    std::thread::sleep(Duration::from_secs(s.idle_secs.min(2)));
    let pid = daemon.pid();
    let (cpu0, switches0) = procs::cpu_ns_and_switches(pid)?;
    let ticks0 = procs::cpu_ticks(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(s.idle_secs));
    let (cpu1, switches1) = procs::cpu_ns_and_switches(pid)?;
    let ticks1 = procs::cpu_ticks(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let idle = Idle {
        seconds: wall,
        cpu_percent: cpu1.saturating_sub(cpu0) as f64 / 1e9 / wall * 100.0,
        ticks: ticks1.saturating_sub(ticks0),
        wakeups_per_sec: switches1.saturating_sub(switches0) as f64 / wall,
    };
    daemon.check_alive()?;
    daemon.stop()?;
    Ok((latency, idle))
}
