//! What the run needs installed, and the facts about the machine that go next to the figures.

use std::path::Path;
use std::process::Command;

use crate::procs::find;
use crate::{say, Result};

/// Installs nginx-light and wrk from Debian's packages when either is missing (`apt-get update`
/// once, then one `apt-get install`). Nothing else is downloaded.
pub fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = [("nginx", "nginx-light"), ("wrk", "wrk")]
        .into_iter()
        .filter(|(command, _)| find(command).is_none())
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if find("apt-get").is_none() {
        return Err(format!("{} missing and there is no apt-get", missing.join(", ")).into());
    }
    say(&format!("installing {} (apt-get)", missing.join(" ")));
    // Debian starts a packaged service on install unless policy-rc.d says no: the system nginx
    // it would start on port 80 is not ours to leave running, so forbid it for this install.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        Command::new("chmod").arg("755").arg(policy).status()?;
    }
    let result = (|| -> Result<()> {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    })();
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status()?;
    if !status.success() {
        return Err(format!("{command:?} failed ({status})").into());
    }
    Ok(())
}

pub struct Machine {
    pub date: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
    pub os: String,
    pub postgres: String,
    pub rustc: String,
    pub wrk: String,
    /// The load average when the run started (other work on the machine shows in the figures).
    pub load: String,
}

impl Machine {
    pub fn describe(client: &mut postgres::Client) -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let mem_kb: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        let postgres = client
            .query_one("SHOW server_version", &[])
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default();
        let output = |program: &str, arg: &str| {
            Command::new(program)
                .arg(arg)
                .output()
                .map(|o| {
                    let text = [o.stdout, o.stderr].concat();
                    String::from_utf8_lossy(&text)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                })
                .unwrap_or_default()
        };
        Machine {
            load: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory: format!("{:.1} GiB", mem_kb / 1024.0 / 1024.0),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            os,
            postgres: postgres
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            rustc: output("rustc", "-V"),
            wrk: find("wrk")
                .map(|_| {
                    output("wrk", "-v")
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("")
                        .to_owned()
                })
                .unwrap_or_default(),
        }
    }
}
