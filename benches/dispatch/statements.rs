//! The `statements` phase (issue #14): PostgreSQL's CPU per message for the claim and the outcome
//! write alone, on one connection, with no webhook and no daemon, so neither nginx nor the rest of
//! the machine's load is in the figure. A drain is bound by exactly this work (the backend the
//! scheduler writes through is the busiest process), so it says where the backlog rate goes
//! without the noise of a whole drain.
//!
//! A backlog on a fresh database is claimed BATCH_SIZE at a time and written back `sent`, as the
//! daemon does; the backend's utime + stime comes from /proc. Three variants, taken in turn, each
//! round on fresh databases: this build; this build writing no attempt history (what the history
//! costs); and the reference build's own claim and outcome statements on the schema its binary
//! migrates (what came before the history).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use postgres::types::ToSql;

use crate::procs::{clock_ticks, cpu_ticks};
use crate::{reference, say, BenchDb, Result, Settings, DISPATCHER, INSERT_BACKLOG};

/// Rounds of the three variants in a full run; each figure is the median of its rounds.
const ROUNDS: usize = 3;
/// The backlog each variant drains per round in a full run (the smoke run: 600).
const MESSAGES: i32 = 40_000;

/// The result: µs of PostgreSQL CPU per message, median of the rounds.
pub struct Statements {
    pub batch_size: u32,
    pub messages: i32,
    pub rounds: usize,
    pub current: f64,
    pub without_history: f64,
    /// The reference commit and its figure, or why there is none.
    pub reference: std::result::Result<(String, f64), String>,
}

/// Whose statements a loop runs.
#[derive(Clone, Copy)]
enum Kind<'a> {
    Current { history: bool },
    Reference(&'a ReferenceSql),
}

/// The reference build's claim and outcome statements, read from its source.
struct ReferenceSql {
    commit: String,
    binary: PathBuf,
    claim: String,
    record: String,
}

pub fn phase(s: &Settings, batch_size: u32, revision: Option<&str>) -> Result<Statements> {
    let (messages, rounds) = if s.full { (MESSAGES, ROUNDS) } else { (600, 1) };
    // The smoke run has no reference build to hand; a full run builds it for the drains anyway.
    let reference = match revision.filter(|_| s.full) {
        Some(revision) => reference_sql(revision),
        None => Err("no reference build in this run".to_owned()),
    };
    let mut current = Vec::new();
    let mut without_history = Vec::new();
    let mut before = Vec::new();
    for round in 1..=rounds {
        let cost = |kind| loop_cost(s, batch_size, messages, kind, round);
        current.push(cost(Kind::Current { history: true })?);
        without_history.push(cost(Kind::Current { history: false })?);
        if let Ok(r) = &reference {
            before.push(cost(Kind::Reference(r))?);
        }
        say(&format!(
            "statements round {round}: this build {:.1} µs a message, without history {:.1}{}",
            current[round - 1],
            without_history[round - 1],
            before
                .last()
                .map_or(String::new(), |r| format!(", the reference {r:.1}"))
        ));
    }
    Ok(Statements {
        batch_size,
        messages,
        rounds,
        current: median(current),
        without_history: median(without_history),
        reference: reference.map(|r| (r.commit, median(before))),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The reference's `CLAIM` and `RECORD` as written in its `src/store.rs` (plain string
/// constants at the default reference; another revision may not have them).
fn reference_sql(revision: &str) -> std::result::Result<ReferenceSql, String> {
    let (commit, binary) = reference::build(revision).map_err(|e| e.to_string())?;
    let store = reference::source(&commit).join("src/store.rs");
    let text = std::fs::read_to_string(&store).map_err(|e| format!("{}: {e}", store.display()))?;
    let constant = |name: &str| -> std::result::Result<String, String> {
        let start = format!("const {name}: &str = \"");
        let from = text
            .find(&start)
            .ok_or(format!("no plain `{name}` string in {}", store.display()))?
            + start.len();
        let len = text[from..]
            .find("\";")
            .ok_or(format!("`{name}` in {} does not end", store.display()))?;
        Ok(text[from..from + len].to_owned())
    };
    Ok(ReferenceSql {
        claim: constant("CLAIM")?,
        record: constant("RECORD")?,
        commit,
        binary,
    })
}

/// One round of one variant: µs of the backend's CPU per message.
fn loop_cost(
    s: &Settings,
    batch_size: u32,
    messages: i32,
    kind: Kind,
    round: usize,
) -> Result<f64> {
    let (tag, binary, claim_sql, record_sql) = match kind {
        Kind::Current { history } => (
            if history { "stmt-cur" } else { "stmt-nohist" },
            Path::new(DISPATCHER),
            message_dispatcher::store::CLAIM,
            message_dispatcher::store::RECORD,
        ),
        Kind::Reference(r) => (
            "stmt-ref",
            r.binary.as_path(),
            r.claim.as_str(),
            r.record.as_str(),
        ),
    };
    let db = BenchDb::create(&s.admin_url, &format!("{tag}-{round}"), binary)?;
    let mut c = db.client()?;
    c.execute(INSERT_BACKLOG, &[&messages])?;
    let backend: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let claim = c.prepare(claim_sql)?;
    let record = c.prepare(record_sql)?;
    let limit = i64::from(batch_size);
    let epoch: Option<i64> = None;
    let instance = "bench".to_owned();
    let expire_limit = i64::from(message_dispatcher::store::EXPIRE_LIMIT);
    let before = cpu_ticks(backend as u32)?;
    let mut done = 0;
    loop {
        let ids: Vec<i64> = match kind {
            Kind::Reference(_) => {
                let rows = c.query(&claim, &[&limit, &epoch, &instance])?;
                rows.iter().map(|r| r.get(0)).collect()
            }
            Kind::Current { .. } => {
                let rows = c.query(&claim, &[&limit, &epoch, &instance, &expire_limit])?;
                rows.iter()
                    .filter(|r| r.get::<_, bool>(0))
                    .map(|r| r.get(1))
                    .collect()
            }
        };
        if ids.is_empty() {
            break;
        }
        done += ids.len();
        let n = ids.len();
        let statuses = vec!["sent"; n];
        let zeros = vec![0i32; n];
        let no_text: Vec<Option<String>> = vec![None; n];
        let remote: Vec<Option<String>> = vec![Some("bench".to_owned()); n];
        let delays = vec![0i64; n];
        match kind {
            Kind::Reference(_) => {
                let params: [&(dyn ToSql + Sync); 8] = [
                    &ids, &statuses, &zeros, &no_text, &remote, &delays, &epoch, &instance,
                ];
                c.execute(&record, &params)?;
            }
            Kind::Current { history } => {
                // The history the daemon writes: one row per request (none without).
                let h = if history { n } else { 0 };
                let attempts = vec![1i32; h];
                let started = vec![SystemTime::now(); h];
                let durations = vec![3i32; h];
                let codes: Vec<Option<i16>> = vec![Some(202); h];
                let errors: Vec<Option<String>> = vec![None; h];
                let history_ids = ids[..h].to_vec();
                let params: [&(dyn ToSql + Sync); 16] = [
                    &ids,
                    &statuses,
                    &zeros,
                    &no_text,
                    &remote,
                    &delays,
                    &epoch,
                    &instance,
                    &history_ids,
                    &attempts,
                    &started,
                    &durations,
                    &codes,
                    &errors,
                    &zeros,
                    &false,
                ];
                c.query_one(&record, &params)?;
            }
        }
    }
    let ticks = cpu_ticks(backend as u32)? - before;
    if done != messages as usize {
        return Err(format!("{tag}: {done} of {messages} messages claimed").into());
    }
    Ok(ticks as f64 / clock_ticks() * 1e6 / f64::from(messages))
}

/// The table's row: the three figures side by side.
pub fn row(st: &Statements) -> String {
    let reference = match &st.reference {
        Ok((commit, us)) => format!(
            "; the statements of `{commit}` on its schema {us:.1} µs, so this build is {:+.0} %",
            (st.current / us - 1.0) * 100.0
        ),
        Err(why) => format!("; no reference ({why})"),
    };
    format!(
        "| … PostgreSQL's CPU per message for the claim and outcome statements alone (one connection, no webhook; BATCH_SIZE={}, {} messages, median of {}) | this build {:.1} µs; without writing the attempt history {:.1} µs (the history {:.1} µs){reference} | | |",
        st.batch_size,
        crate::report::thousands(f64::from(st.messages)),
        st.rounds,
        st.current,
        st.without_history,
        st.current - st.without_history,
    )
}
