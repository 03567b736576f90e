//! The randomized fault campaign (issue #10): three instances behind the lease, a private
//! PostgreSQL and Redis, a receiver that misbehaves on purpose, load through SQL and the API, and
//! a seeded schedule of faults; after the last one, invariants checked from PostgreSQL, the
//! receiver's log and the instances' logs. See README.md, "Fault campaign".
//!
//! ```text
//! cargo test --release --test chaos                                   # CI: a few fixed seeds
//! cargo test --release --test chaos -- --seed 7 --duration 30m        # one long campaign
//! cargo test --release --test chaos -- --seeds 1,2,3 --duration 1m
//! cargo test --release --test chaos -- --seed 7 --exclude nul-id,nul-5xx,pg-blackhole
//! ```

#[path = "../common/mod.rs"]
mod common;

mod check;
mod plan;
mod receiver;
mod world;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use check::{check, Audit, Data, Inc, Row, RESUME_BOUND};
use plan::{Plan, BEHAVIOUR_NAMES, FAULT_NAMES};
use world::{Ending, World, DB};

/// The seeds `cargo test` runs, and how long each campaign lasts: about two minutes in all.
// Together they inject every fault kind (see `--plan`).
const CI_SEEDS: &[u64] = &[1, 7, 9];
const CI_DURATION: Duration = Duration::from_secs(25);
/// Messages enqueued once the faults are over, to measure when delivery resumes.
const PROBES: i32 = 20;
/// Waiting for quiescence ends after this long without a single message finished.
const STALL: Duration = Duration::from_secs(20);

/// Microseconds since the Unix epoch (the clock of the daemons' log lines and of PostgreSQL).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// `HH:MM:SS.mmm` (UTC) of a time in microseconds.
pub fn fmt_us(us: i64) -> String {
    if us <= 0 || us == i64::MAX {
        return format!("{us}");
    }
    let t = UNIX_EPOCH + Duration::from_micros(us as u64);
    let s = humantime::format_rfc3339_millis(t).to_string();
    s[11..23].to_owned()
}

/// A log line's `ts` in microseconds.
pub fn parse_ts(ts: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(ts).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_micros() as i64)
}

struct Args {
    seeds: Vec<u64>,
    duration: Duration,
    exclude: Vec<String>,
    /// Print each seed's plan and exit.
    plan_only: bool,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "chaos: {problem}\nusage: chaos [--seed S | --seeds A,B,C] [--duration 30m] [--exclude NAME,…] [--plan]\n\
         fault kinds: {}\nreceiver behaviours: {}",
        FAULT_NAMES.join(", "),
        BEHAVIOUR_NAMES.join(", ")
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        seeds: CI_SEEDS.to_vec(),
        duration: CI_DURATION,
        exclude: Vec::new(),
        plan_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match name.as_str() {
            "--seed" | "--seeds" => {
                args.seeds = value()
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse()
                            .unwrap_or_else(|_| usage(&format!("bad seed {s:?}")))
                    })
                    .collect()
            }
            "--duration" => {
                args.duration = humantime::parse_duration(&value())
                    .unwrap_or_else(|e| usage(&format!("bad duration: {e}")))
            }
            "--exclude" => {
                args.exclude = value().split(',').map(|s| s.trim().to_owned()).collect();
                for e in &args.exclude {
                    if !FAULT_NAMES.contains(&e.as_str()) && !BEHAVIOUR_NAMES.contains(&e.as_str())
                    {
                        usage(&format!("unknown fault kind or behaviour {e:?}"));
                    }
                }
            }
            // What libtest would accept, as `cargo test` may pass it along.
            "--nocapture" | "--quiet" | "-q" | "--include-ignored" | "--ignored"
            | "--show-output" => {}
            "--test-threads" | "--color" | "--format" => {
                let _ = value();
            }
            "--plan" => args.plan_only = true,
            "--help" | "-h" => usage("help"),
            other if other.starts_with('-') => usage(&format!("unknown option {other}")),
            // A test-name filter from `cargo test NAME`: the campaign is one test.
            _ => {}
        }
    }
    args
}

fn say(seed: u64, text: &str) {
    println!("chaos seed={seed}: {text}");
    let _ = std::io::stdout().flush();
}

fn main() -> ExitCode {
    let args = parse_args();
    if args.plan_only {
        for &seed in &args.seeds {
            let plan = Plan::new(seed, args.duration, &args.exclude);
            println!("seed {seed}: {:?}", plan.settings);
            for f in &plan.faults {
                println!(
                    "  at {:>7.3} s  {:<16} {:<12} for {:?}",
                    f.at.as_secs_f64(),
                    f.kind.name(),
                    f.kind.target().map(|t| t.to_string()).unwrap_or_default(),
                    f.hold
                );
            }
        }
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let (mut passed, mut failed) = (0, 0);
    for &seed in &args.seeds {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            campaign(seed, args.duration, &args.exclude)
        }));
        match outcome {
            Ok(true) => passed += 1,
            Ok(false) => failed += 1,
            Err(_) => {
                say(seed, "FAIL: the campaign itself panicked (see above)");
                failed += 1;
            }
        }
    }
    println!(
        "chaos: {} seed(s) in {:.0} s",
        args.seeds.len(),
        started.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one campaign; true when every invariant held.
fn campaign(seed: u64, duration: Duration, exclude: &[String]) -> bool {
    let plan = Plan::new(seed, duration, exclude);
    let s = &plan.settings;
    say(
        seed,
        &format!(
            "{} of faults ({} planned); PROCESSING_INTERVAL {:?}, BATCH_SIZE {}, MAX_ATTEMPTS {}, receiver misbehaving on {:.0} % of requests{}",
            humantime::format_duration(duration),
            plan.faults.len(),
            s.intervals,
            s.batch_size,
            s.max_attempts,
            s.misbehaviour * 100.0,
            if exclude.is_empty() { String::new() } else { format!("; excluded: {}", exclude.join(",")) }
        ),
    );
    let Some(mut world) = World::start(plan.clone(), exclude) else {
        say(
            seed,
            "SKIPPED: redis-server or the PostgreSQL server binaries are missing",
        );
        return true;
    };
    let leader = world.supervise_until(Duration::from_secs(30), |w| {
        w.incarnations
            .iter()
            .any(|i| !i.daemon.log_lines("Lock acquired").is_empty())
    });
    assert!(
        leader,
        "no instance took the lease within 30 s of the start"
    );
    world.start_monitor();
    world.start_load();
    world.run_faults();
    world.stop_load();
    world.heal_all();
    world.receiver.set_quiet(true);
    let healed_at = now_us();
    let backlog = world.count(&["pending", "sending"]).unwrap_or(0);
    let direct = world.direct_url();
    let probes = common::wait_until_ok(Duration::from_secs(20), || {
        let mut c = postgres::Client::connect(&direct, postgres::NoTls).ok()?;
        c.execute(
            "INSERT INTO messages (recipient, content)
             SELECT '+90555' || lpad(i::text, 7, '0'), 'probe ' || i FROM generate_series(1, $1) AS i",
            &[&PROBES],
        )
        .ok()
    });
    assert!(
        probes.is_some(),
        "cannot enqueue the probes after the faults"
    );
    // The backlog drains at hundreds of messages a second once the receiver behaves; a wedged
    // cluster is given up on after STALL without progress rather than at the deadline.
    let quiet_for = Duration::from_secs(40) + Duration::from_millis(backlog as u64 * 20);
    let mut progress = (i64::MAX, Instant::now());
    let quiescent = world.supervise_until(quiet_for, |w| {
        let left = w.count(&["pending", "sending"]).unwrap_or(i64::MAX);
        if left < progress.0 {
            progress = (left, Instant::now());
        }
        left == 0 || progress.1.elapsed() > STALL
    }) && progress.0 == 0;
    // A little longer, for the last outcomes and log lines to land.
    world.supervise_until(Duration::from_millis(1500), |_| false);
    world.stop_threads();

    let data = gather(&world, healed_at);
    let report = check(&data);
    let seconds = |us: i64| us as f64 / 1e6;

    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &world.faults {
        *kinds.entry(f.kind.name()).or_default() += 1;
    }
    let restarts = world.incarnations.len() - plan::INSTANCES;
    say(
        seed,
        &format!(
            "faults injected: {} ({}); instance restarts {restarts}; skipped {}",
            world.faults.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            world.skipped.len()
        ),
    );
    let load = &world.load;
    use std::sync::atomic::Ordering::SeqCst;
    say(
        seed,
        &format!(
            "enqueued {} rows: {} through SQL, {} through the API (+{} probes; {} enqueue calls failed during faults); the receiver got {} requests",
            data.rows.len(),
            load.sql.load(SeqCst),
            load.api.load(SeqCst),
            PROBES,
            load.failed.load(SeqCst),
            data.requests.len()
        ),
    );
    let mut behaviours: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &data.requests {
        *behaviours.entry(r.behaviour.name()).or_default() += 1;
    }
    say(
        seed,
        &format!(
            "receiver answers: {}",
            behaviours
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    say(
        seed,
        &format!(
            "outcome: {}; repeats: {} messages ({}); attempts = requests seen for {} of {} messages; named exceptions: {}",
            report.by_status.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
            report.repeats,
            report.repeat_reasons.iter().map(|(k, n)| format!("{k}: {n}")).collect::<Vec<_>>().join("; "),
            report.matched_attempts,
            data.rows.len(),
            if report.exceptions.is_empty() {
                "none".to_owned()
            } else {
                report.exceptions.iter().map(|(k, n)| format!("{k}: {n}")).collect::<Vec<_>>().join("; ")
            }
        ),
    );
    say(
        seed,
        &format!(
            "delivery resumed {} after the last fault (bound {RESUME_BOUND:?}); {} the backlog of {backlog} (+{PROBES} probes) drained{}",
            report.resume.map_or("never".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            if quiescent { "all of" } else { "NOT all of" },
            if quiescent {
                format!(" {:.1} s after it", seconds(now_us() - healed_at))
            } else {
                String::new()
            }
        ),
    );

    let mut violations = report.violations.clone();
    for incident in &world.incidents {
        violations.push(check::Violation {
            invariant: incident.invariant,
            text: incident.text.clone(),
        });
    }
    let mut by_invariant: BTreeMap<&str, Vec<&check::Violation>> = BTreeMap::new();
    for v in &violations {
        by_invariant.entry(v.invariant).or_default().push(v);
    }
    for (invariant, list) in &by_invariant {
        println!("  VIOLATION {invariant}: {} case(s)", list.len());
        for v in list.iter().take(5) {
            println!("    - {}", v.text);
        }
    }
    if violations.is_empty() {
        say(seed, "PASS");
        true
    } else {
        let dir = dump(&world, &data, &violations);
        println!(
            "  evidence: {} (replay: cargo test --release --test chaos -- --seed {seed} --duration {})",
            dir.display(),
            humantime::format_duration(duration)
        );
        say(
            seed,
            &format!(
                "FAIL: {}",
                by_invariant
                    .iter()
                    .map(|(k, l)| format!("{k} ({})", l.len()))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        );
        false
    }
}

/// Everything the checks read, from PostgreSQL directly, the receiver and the instances' logs.
fn gather(world: &World, healed_at: i64) -> Data {
    let mut c = postgres::Client::connect(&world.pg.url(DB), postgres::NoTls).unwrap();
    let rows = c
        .query(
            "SELECT id, status, attempts, remote_message_id, last_error FROM messages ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| Row {
            id: r.get(0),
            status: r.get(1),
            attempts: r.get(2),
            remote: r.get(3),
            last_error: r.get(4),
        })
        .collect();
    let audit = c
        .query(
            "SELECT (extract(epoch FROM at) * 1000000)::bigint, id, old_status, new_status,
                    old_attempts, new_attempts, old_epoch, old_by, new_epoch, new_by, state_epoch, app
             FROM chaos_audit ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| Audit {
            at: r.get(0),
            id: r.get(1),
            old_status: r.get(2),
            new_status: r.get(3),
            old_attempts: r.get(4),
            new_attempts: r.get(5),
            old_epoch: r.get(6),
            old_by: r.get(7),
            new_epoch: r.get(8),
            new_by: r.get(9),
            state_epoch: r.get(10),
            app: r.get(11),
        })
        .collect();
    let mut history: HashMap<i64, Vec<(i64, bool)>> = HashMap::new();
    for r in c
        .query(
            "SELECT message_id, (extract(epoch FROM started_at) * 1000000)::bigint,
                    status_code IS NOT NULL
             FROM message_attempts",
            &[],
        )
        .unwrap()
    {
        history
            .entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2)));
    }
    let incs = world
        .incarnations
        .iter()
        .map(|i| {
            Inc::from_logs(
                i.slot,
                i.gen,
                i.daemon.name.clone(),
                &i.daemon.logs(),
                i.ended,
                if i.ended.is_none() {
                    Ending::Running
                } else {
                    i.ending.clone()
                },
                i.pauses.clone(),
            )
        })
        .collect();
    Data {
        settings: world.plan.settings.clone(),
        rows,
        audit,
        requests: world.receiver.requests(),
        incs,
        faults: world.faults.clone(),
        samples: world.samples.lock().unwrap().clone(),
        history,
        healed_at,
    }
}

/// Writes the evidence of a failed campaign under target/chaos/seed-S/; returns the directory.
fn dump(world: &World, data: &Data, violations: &[check::Violation]) -> PathBuf {
    let dir = common::project_root()
        .join("target/chaos")
        .join(format!("seed-{}", world.plan.seed));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    for i in &world.incarnations {
        write(
            &format!("{}.log", i.daemon.name),
            i.daemon.logs().join("\n") + "\n",
        );
    }
    write(
        "receiver.tsv",
        data.requests
            .iter()
            .map(|r| {
                format!(
                    "{}\t{}\ti{}/g{}\tmsg {}\tn {}\t{}\t{}\t{:?}\t{:?}\n",
                    r.seq,
                    fmt_us(r.arrived),
                    r.slot,
                    r.gen,
                    r.key,
                    r.n,
                    fmt_us(r.ended),
                    r.behaviour.name(),
                    r.end,
                    r.remote_id
                )
            })
            .collect(),
    );
    write(
        "audit.tsv",
        data.audit
            .iter()
            .map(|a| {
                format!(
                    "{}\tmsg {}\t{}→{}\tattempts {}→{}\tclaim {:?}/{:?}→{:?}/{:?}\tepoch now {:?}\t{}\n",
                    fmt_us(a.at),
                    a.id,
                    a.old_status,
                    a.new_status,
                    a.old_attempts,
                    a.new_attempts,
                    a.old_by,
                    a.old_epoch,
                    a.new_by,
                    a.new_epoch,
                    a.state_epoch,
                    a.app
                )
            })
            .collect(),
    );
    write(
        "faults.txt",
        world
            .faults
            .iter()
            .map(|f| f.describe() + "\n")
            .chain(world.skipped.iter().map(|s| format!("skipped: {s}\n")))
            .collect(),
    );
    write(
        "violations.txt",
        violations
            .iter()
            .map(|v| format!("{}: {}\n", v.invariant, v.text))
            .collect(),
    );
    dir
}
