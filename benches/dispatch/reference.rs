//! The reference build: the dispatcher as it was at an earlier commit, built beside this one, so
//! that a feature's cost is measured in one run against what came before it (the same machine,
//! the same load, drains taken in turn) rather than against a figure from another day.
//!
//! The default reference is the last commit before the attempt history, the webhook circuit
//! breaker, the rate limiter and the fault fixes of the lease and outcome paths landed: their
//! promise was to keep the backlog rate within 10 % of it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::procs::{Sink, Workdir};
use crate::{drain, say, Drain, Result, Settings, Variant};

/// `cargo bench` without BENCH_REFERENCE compares with this commit ("before the history").
pub const DEFAULT_REVISION: &str = "5cc60f8";

/// Where [`build`] unpacked the source of `commit`.
pub fn source(commit: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-reference")
        .join(commit)
}

/// A release binary of `message-dispatcher` at `revision`, built (once; kept under
/// target/bench-reference/) from `git archive` of that commit, so nothing in the checkout changes.
pub fn build(revision: &str) -> Result<(String, PathBuf)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let resolved = Command::new("git")
        .args(["rev-parse", "--short=12", &format!("{revision}^{{commit}}")])
        .current_dir(repo)
        .output()
        .map_err(|e| format!("BENCH_REFERENCE needs git: {e}"))?;
    if !resolved.status.success() {
        return Err(format!(
            "BENCH_REFERENCE={revision}: not a commit of this repository ({})",
            String::from_utf8_lossy(&resolved.stderr).trim()
        )
        .into());
    }
    let commit = String::from_utf8_lossy(&resolved.stdout).trim().to_owned();
    let root = repo.join("target/bench-reference");
    let source = source(&commit);
    let binary = root.join("target/release/message-dispatcher");
    let stamp = root.join("target/release/message-dispatcher.commit");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == commit) && binary.exists() {
        return Ok((commit, binary));
    }
    say(&format!(
        "building the reference dispatcher at {commit} (once; kept in {})",
        root.display()
    ));
    if !source.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&source)?;
        let status = Command::new("sh")
            .arg("-c")
            .arg("git -C \"$1\" archive \"$2\" | tar -x -C \"$3\"")
            .args(["sh", &repo.to_string_lossy(), &commit])
            .arg(&source)
            .status()?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&source);
            return Err(format!("git archive {commit} failed ({status})").into());
        }
    }
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--locked",
            "--bin",
            "message-dispatcher",
        ])
        .current_dir(&source)
        .env("CARGO_TARGET_DIR", root.join("target"))
        .status()?;
    if !status.success() {
        return Err(format!("building the reference at {commit} failed ({status})").into());
    }
    std::fs::write(&stamp, &commit)?;
    Ok((commit, binary))
}

/// Drains taken in turn, this build and the reference, so that load on the machine falls on both.
const ROUNDS: usize = 3;

/// The backlog drain of the reference build and of this one in turn, and of this one with
/// WEBHOOK_RATE_LIMIT set high enough never to bind (what merely configuring it costs).
pub struct Comparison {
    pub commit: String,
    pub reference: Vec<Drain>,
    pub current: Vec<Drain>,
    pub limited: Vec<Drain>,
}

/// A rate no drain here reaches: the limiter runs on every request but never waits.
pub const UNBINDING_RATE: &str = "1000000";

impl Comparison {
    pub fn run(
        s: &Settings,
        sink: &Sink,
        work: &Workdir,
        batch_size: u32,
        revision: &str,
    ) -> Result<Comparison> {
        let (commit, binary) = build(revision)?;
        let limit = [("WEBHOOK_RATE_LIMIT", UNBINDING_RATE.to_owned())];
        let reference = Variant {
            binary: &binary,
            env: &[],
        };
        let limited = Variant {
            env: &limit,
            ..Variant::current()
        };
        let mut c = Comparison {
            commit,
            reference: Vec::new(),
            current: Vec::new(),
            limited: Vec::new(),
        };
        for round in 1..=ROUNDS {
            let d = drain(
                s,
                sink,
                work,
                batch_size,
                0,
                &format!("ref-{round}"),
                reference,
            )?;
            say(&format!("reference {}: {}", c.commit, d.describe()));
            c.reference.push(d);
            let d = drain(
                s,
                sink,
                work,
                batch_size,
                0,
                &format!("cur-{round}"),
                Variant::current(),
            )?;
            say(&format!("this build: {}", d.describe()));
            c.current.push(d);
            let d = drain(
                s,
                sink,
                work,
                batch_size,
                0,
                &format!("lim-{round}"),
                limited,
            )?;
            say(&format!(
                "WEBHOOK_RATE_LIMIT={UNBINDING_RATE}: {}",
                d.describe()
            ));
            c.limited.push(d);
        }
        say(&format!(
            "this build {:.0} msgs/s vs reference {:.0} ({:+.1} %); with the limiter set {:.0} ({:+.1} % vs unset)",
            mean(&c.current),
            mean(&c.reference),
            c.change(),
            mean(&c.limited),
            c.limiter_change()
        ));
        Ok(c)
    }

    /// This build against the reference, percent.
    pub fn change(&self) -> f64 {
        (mean(&self.current) / mean(&self.reference) - 1.0) * 100.0
    }

    /// The limiter set against unset, percent.
    pub fn limiter_change(&self) -> f64 {
        (mean(&self.limited) / mean(&self.current) - 1.0) * 100.0
    }
}

/// The mean backlog rate of some drains.
pub fn mean(drains: &[Drain]) -> f64 {
    drains.iter().map(|d| d.rate).sum::<f64>() / drains.len().max(1) as f64
}
