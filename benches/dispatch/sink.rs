//! The `sink` phase: the project's webhook-sink, slowed with `--delay 100ms`, under wrk.
//!
//! The demo and anyone's load test use webhook-sink as a slow receiver, so it has to keep many
//! delayed requests waiting at once: with a fixed delay, `connections / delay` requests/s is the
//! most any client can get (the ideal), and the target is ≥ 2,000 requests/s. wrk's socket
//! errors and non-2xx answers are reported; a request that timed out (answered after wrk's
//! `--timeout`) or was not answered 2xx does not count.

use std::fs;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::{self, Workdir};
use crate::{say, Result, Settings, WEBHOOK_SINK};

/// The delay the phase asks for, and the rate it must reach.
pub const DELAY: Duration = Duration::from_millis(100);
pub const TARGET: f64 = 2_000.0;
/// Handler threads: enough for every connection even if each held one (as before #14 they did).
const THREADS: u32 = 1024;
/// wrk's `--timeout`: an answer later than this counts as a timeout, not as a request served.
const WRK_TIMEOUT: &str = "2s";

/// One wrk run against the delayed webhook-sink.
pub struct Load {
    pub connections: u32,
    pub seconds: f64,
    /// Answered 2xx within the timeout, per second.
    pub rate: f64,
    pub requests: u64,
    /// Socket errors: connect, read, write, timeout.
    pub errors: [u64; 4],
    pub non_2xx: u64,
    /// Latency p50 and p99 in ms, as wrk measured them.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The sink's CPU time per 1,000 requests (utime + stime).
    pub cpu_ms_per_1000: f64,
}

impl Load {
    pub fn ideal(&self) -> f64 {
        f64::from(self.connections) / DELAY.as_secs_f64()
    }

    fn errors_text(&self) -> String {
        let [connect, read, write, timeout] = self.errors;
        let mut parts = Vec::new();
        if self.errors.iter().any(|&e| e > 0) {
            parts.push(format!(
                "socket errors: connect {connect}, read {read}, write {write}, timeout {timeout}"
            ));
        }
        if self.non_2xx > 0 {
            parts.push(format!("{} non-2xx", self.non_2xx));
        }
        if parts.is_empty() {
            "no socket errors or timeouts".into()
        } else {
            format!("{} (not counted)", parts.join(", "))
        }
    }

    fn latency_text(&self) -> String {
        match (self.p50_ms, self.p99_ms) {
            (Some(p50), Some(p99)) => format!("latency p50 {p50:.1} ms, p99 {p99:.1} ms"),
            _ => "latency not reported".into(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "webhook-sink --delay {}ms under wrk -c{}: {:.0} requests/s (ideal {:.0}; {} requests in {:.2} s; {}; {}; CPU {:.0} ms / 1,000)",
            DELAY.as_millis(),
            self.connections,
            self.rate,
            self.ideal(),
            self.requests,
            self.seconds,
            self.latency_text(),
            self.errors_text(),
            self.cpu_ms_per_1000
        )
    }
}

/// The phase's results; `skipped` says why there are none.
#[derive(Default)]
pub struct SinkLoad {
    pub loads: Vec<Load>,
    pub skipped: Option<String>,
}

/// Runs the phase when wanted: `-c256` and `-c1024` for BENCH_SECONDS in a full run, `-c256` for
/// a second in the smoke run when wrk happens to be installed (skipped otherwise).
pub fn phase(s: &Settings, work: &Workdir) -> Result<SinkLoad> {
    if !s.wants("sink") || s.wrk_secs == 0 {
        return Ok(SinkLoad::default());
    }
    let Some(wrk) = procs::find("wrk") else {
        let why = "wrk is not installed".to_owned();
        say(&format!("sink phase skipped: {why}"));
        return Ok(SinkLoad {
            loads: Vec::new(),
            skipped: Some(why),
        });
    };
    let (connections, secs): (&[u32], u64) = if s.full {
        (&[256, 1024], s.wrk_secs)
    } else {
        (&[256], s.wrk_secs.min(1))
    };
    let script = procs::wrk_script(work)?;
    let mut loads = Vec::new();
    for &c in connections {
        // A fresh sink per run, so one run's connections do not linger into the next.
        let mut sink = DelayedSink::start(work)?;
        let cpu_before = procs::cpu_ticks(sink.pid())?;
        let out = Command::new(&wrk)
            .arg(format!("-t{}", s.wrk_threads))
            .arg(format!("-c{c}"))
            .arg(format!("-d{secs}s"))
            .args(["--timeout", WRK_TIMEOUT, "--latency", "-s"])
            .arg(&script)
            .arg(sink.url())
            .stdin(Stdio::null())
            .output()?;
        let cpu = procs::cpu_ticks(sink.pid())? - cpu_before;
        sink.stop()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "wrk failed ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let mut load = parse_wrk(&text, c).ok_or_else(|| format!("odd wrk output:\n{text}"))?;
        load.cpu_ms_per_1000 =
            cpu as f64 / procs::clock_ticks() * 1e6 / (load.requests.max(1) as f64);
        say(&load.describe());
        loads.push(load);
    }
    Ok(SinkLoad {
        loads,
        skipped: None,
    })
}

/// Reads wrk's summary: `N requests in 10.01s`, `Socket errors: connect A, read B, write C,
/// timeout D`, `Non-2xx or 3xx responses: E` and the `--latency` percentiles.
fn parse_wrk(text: &str, connections: u32) -> Option<Load> {
    let (requests, seconds) = text.lines().find_map(|l| {
        let (n, rest) = l.trim().split_once(" requests in ")?;
        let took = rest.split(',').next()?;
        Some((n.trim().parse::<u64>().ok()?, wrk_seconds(took)?))
    })?;
    let mut errors = [0; 4];
    if let Some(line) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
    {
        for (slot, name) in errors
            .iter_mut()
            .zip(["connect", "read", "write", "timeout"])
        {
            *slot = line
                .split(',')
                .find_map(|p| p.trim().strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())?;
        }
    }
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map_or(Some(0), |v| v.trim().parse().ok())?;
    let percentile = |p: &str| {
        text.lines().find_map(|l| {
            let v = l.trim().strip_prefix(p)?;
            Some(wrk_seconds(v.trim())? * 1000.0)
        })
    };
    // A timed-out request still completed (late); subtract it, and the non-2xx, from the served.
    let served = requests.saturating_sub(errors[3] + non_2xx);
    Some(Load {
        connections,
        seconds,
        rate: served as f64 / seconds.max(1e-6),
        requests,
        errors,
        non_2xx,
        p50_ms: percentile("50%"),
        p99_ms: percentile("99%"),
        cpu_ms_per_1000: 0.0,
    })
}

/// wrk's durations: `10.01s`, `1.00m`, `100.52ms`, `418.12us`.
fn wrk_seconds(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = v.split_at(split);
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(number.trim().parse::<f64>().ok()? * scale)
}

/// A webhook-sink with `--delay 100ms` on a free port, stopped by its pid.
struct DelayedSink {
    child: Child,
    port: u16,
}

impl DelayedSink {
    fn start(work: &Workdir) -> Result<DelayedSink> {
        let port = procs::free_port()?;
        let log = work.path("delayed-sink.log");
        let child = Command::new(WEBHOOK_SINK)
            .args(["--addr", &format!("127.0.0.1:{port}"), "--quiet"])
            .args(["--delay", &format!("{}ms", DELAY.as_millis())])
            .args(["--threads", &THREADS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let mut sink = DelayedSink { child, port };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = sink.child.try_wait()? {
                return Err(
                    format!("webhook-sink exited ({status}): {}", procs::tail(&log)).into(),
                );
            }
            if Instant::now() > deadline {
                return Err(format!("webhook-sink did not listen on port {port}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sink)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/webhook", self.port)
    }

    /// SIGTERM, which must end it at once (compose's `docker stop` relies on it).
    fn stop(&mut self) -> Result<()> {
        procs::signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("webhook-sink exited with {status} on SIGTERM").into())
                };
            }
            if Instant::now() > deadline {
                return Err("webhook-sink did not exit within 2 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for DelayedSink {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The phase's rows of the results table.
pub fn rows(load: &SinkLoad, s: &Settings) -> Vec<String> {
    use crate::report::{thousands, verdict};
    let mut rows: Vec<String> = load
        .loads
        .iter()
        .map(|l| {
            format!(
                "| webhook-sink `--delay {}ms --threads {THREADS}` under `wrk -t{} -c{} -d{:.0}s --timeout {WRK_TIMEOUT}`; ideal {} connections / {} s | {} req/s = {:.2}× ideal {}; {}; {} | ≥ {} req/s | {} |",
                DELAY.as_millis(),
                s.wrk_threads,
                l.connections,
                l.seconds,
                l.connections,
                DELAY.as_secs_f64(),
                thousands(l.rate),
                l.rate / l.ideal(),
                thousands(l.ideal()),
                l.latency_text(),
                l.errors_text(),
                thousands(TARGET),
                verdict(Some(l.rate >= TARGET))
            )
        })
        .collect();
    if let (Some(why), true) = (&load.skipped, s.full) {
        rows.push(format!(
            "| webhook-sink `--delay {}ms` under wrk | not measured: {why} | ≥ {} req/s | — |",
            DELAY.as_millis(),
            thousands(TARGET)
        ));
    }
    rows
}
