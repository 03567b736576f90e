//! The invariants, checked after quiescence from three records that do not depend on each
//! other: PostgreSQL (the rows, and an audit trigger's log of every row change with the epoch
//! current when it was made), the receiver's log of every request, and the instances' own logs
//! (lease acquired / extended / lost / released, with their times).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::plan::{Behaviour, Settings, TTL, WEBHOOK_TIMEOUT};
use crate::receiver::{End, Request};
use crate::world::{Ending, FaultRecord, Sample};
use crate::{fmt_us, parse_ts};

/// Delivery must resume within this long after the last fault is healed: a standby's epoch
/// backoff and a leader's reconnect backoff are each capped at 5 s, plus a TTL for a lease
/// left by an instance that cannot work, plus a second of slack.
pub const RESUME_BOUND: Duration = Duration::from_secs(14);
/// An instance saying "healthy, holding the lock" this long, with work due all along, must have
/// sent something meanwhile.
const HOLDER_WINDOW: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: &'static str,
    pub text: String,
}

pub struct Row {
    pub id: i64,
    pub status: String,
    pub attempts: i32,
    pub remote: Option<String>,
    pub last_error: Option<String>,
}

pub struct Audit {
    pub at: i64,
    pub id: i64,
    pub old_status: String,
    pub new_status: String,
    pub old_attempts: i32,
    pub new_attempts: i32,
    pub old_epoch: Option<i64>,
    pub old_by: Option<String>,
    pub new_epoch: Option<i64>,
    pub new_by: Option<String>,
    pub state_epoch: Option<i64>,
    pub app: String,
}

pub struct Event {
    pub at: i64,
    pub msg: String,
    pub line: serde_json::Value,
}

/// One incarnation of an instance, as the checker needs it.
pub struct Inc {
    pub slot: usize,
    pub gen: usize,
    pub name: String,
    pub instance_id: Option<String>,
    pub ended: Option<i64>,
    pub ending: Ending,
    pub pauses: Vec<(i64, i64)>,
    pub events: Vec<Event>,
}

impl Inc {
    pub fn from_logs(
        slot: usize,
        gen: usize,
        name: String,
        logs: &[String],
        ended: Option<i64>,
        ending: Ending,
        pauses: Vec<(i64, i64)>,
    ) -> Inc {
        let events: Vec<Event> = logs
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                Some(Event {
                    at: parse_ts(v["ts"].as_str()?)?,
                    msg: v["msg"].as_str()?.to_owned(),
                    line: v,
                })
            })
            .collect();
        let instance_id = events
            .iter()
            .find(|e| e.msg == "Message dispatcher started")
            .and_then(|e| e.line["instance_id"].as_str().map(str::to_owned));
        Inc {
            slot,
            gen,
            name,
            instance_id,
            ended,
            ending,
            pauses,
            events,
        }
    }

    /// `Database unavailable` lines in [from, to] whose error is a NUL byte PostgreSQL refused.
    fn nul_errors(&self, from: i64, to: i64) -> usize {
        self.events
            .iter()
            .filter(|e| e.at >= from && e.at <= to && e.msg == "Database unavailable")
            .filter(|e| e.line["error"].as_str().is_some_and(|t| t.contains("0x00")))
            .count()
    }

    fn paused_during(&self, from: i64, to: i64) -> bool {
        self.pauses.iter().any(|(a, b)| *a <= to && *b >= from)
    }

    /// Log lines in [from, to] whose msg is one of `msgs`, for evidence.
    /// Lines about other messages (with another `id` field) are left out.
    fn lines(&self, from: i64, to: i64, msgs: &[&str], id: i64) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e.at >= from && e.at <= to && msgs.contains(&e.msg.as_str()))
            .filter(|e| e.line["id"].as_i64().is_none_or(|i| i == id))
            .map(|e| e.line.to_string())
            .collect()
    }
}

pub struct Data {
    pub settings: Settings,
    pub rows: Vec<Row>,
    pub audit: Vec<Audit>,
    pub requests: Vec<Request>,
    pub incs: Vec<Inc>,
    pub faults: Vec<FaultRecord>,
    pub samples: Vec<Sample>,
    /// Per message, its attempt history: when each recorded request started (µs) and whether
    /// an answer came (without one — a timeout, a reset — the receiver may never have seen it).
    pub history: HashMap<i64, Vec<(i64, bool)>>,
    /// When the last fault was healed (µs).
    pub healed_at: i64,
}

#[derive(Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    /// Named exceptions: deviations the invariants allow, with how many.
    pub exceptions: BTreeMap<String, usize>,
    pub repeats: usize,
    pub repeat_reasons: BTreeMap<String, usize>,
    pub resume: Option<Duration>,
    pub by_status: BTreeMap<String, usize>,
    pub matched_attempts: usize,
}

impl Report {
    fn violate(&mut self, invariant: &'static str, text: String) {
        self.violations.push(Violation { invariant, text });
    }

    fn except(&mut self, what: &str) {
        *self.exceptions.entry(what.to_owned()).or_default() += 1;
    }
}

const MS: i64 = 1000;

/// A lease holding, from one `Lock acquired` to its `Lock lost` / `Lock released` / death.
struct Chain {
    inc: usize,
    epoch: i64,
    start: i64,
    renewals: Vec<i64>,
    /// (how, when) it ended; None while it lasted to the end of the process.
    end: Option<(String, i64)>,
}

fn chains(incs: &[Inc]) -> Vec<Chain> {
    let mut all = Vec::new();
    for (i, inc) in incs.iter().enumerate() {
        let mut open: Option<Chain> = None;
        for e in &inc.events {
            match e.msg.as_str() {
                "Lock acquired" => {
                    if let Some(c) = open.take() {
                        all.push(c);
                    }
                    open = Some(Chain {
                        inc: i,
                        epoch: e.line["epoch"].as_i64().unwrap_or(-1),
                        start: e.at,
                        renewals: vec![e.at],
                        end: None,
                    });
                }
                "Lock extended" => {
                    if let Some(c) = open.as_mut() {
                        c.renewals.push(e.at);
                    }
                }
                "Lock lost" => {
                    if let Some(mut c) = open.take() {
                        let reason = e.line["reason"].as_str().unwrap_or("?");
                        c.end = Some((format!("Lock lost ({reason})"), e.at));
                        all.push(c);
                    }
                }
                "Lock released" => {
                    if let Some(mut c) = open.take() {
                        c.end = Some(("Lock released".into(), e.at));
                        all.push(c);
                    }
                }
                _ => {}
            }
        }
        if let Some(mut c) = open.take() {
            if let Some(ended) = inc.ended {
                c.end = Some((format!("process ended ({:?})", inc.ending), ended));
            }
            all.push(c);
        }
    }
    all
}

/// A claim of one message by one instance, from the audit log.
struct Claim {
    by: String,
    at: i64,
    end: ClaimEnd,
    end_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
enum ClaimEnd {
    /// Its outcome written by the claimant: the new status and attempts added.
    Outcome(String, i32),
    /// Returned to pending by someone else (crash recovery).
    Recovered(String),
    Open,
}

fn describe(r: &Request) -> String {
    format!(
        "#{} msg {} from i{}/g{} arrived {} ended {} ({:?}, {})",
        r.seq,
        r.key,
        r.slot,
        r.gen,
        fmt_us(r.arrived),
        fmt_us(r.ended),
        r.end,
        r.behaviour.name()
    )
}

pub fn check(d: &Data) -> Report {
    let mut report = Report::default();
    let ttl = TTL.as_micros() as i64;
    let timeout = WEBHOOK_TIMEOUT.as_micros() as i64;
    for r in &d.rows {
        *report.by_status.entry(r.status.clone()).or_default() += 1;
    }
    let inc_of: HashMap<(usize, usize), usize> = d
        .incs
        .iter()
        .enumerate()
        .map(|(i, inc)| ((inc.slot, inc.gen), i))
        .collect();
    let inc_by_id: HashMap<&str, usize> = d
        .incs
        .iter()
        .enumerate()
        .filter_map(|(i, inc)| Some((inc.instance_id.as_deref()?, i)))
        .collect();
    let mut requests_of: HashMap<i64, Vec<&Request>> = HashMap::new();
    for r in &d.requests {
        requests_of.entry(r.key).or_default().push(r);
    }
    for list in requests_of.values_mut() {
        list.sort_by_key(|r| r.arrived);
    }

    // --- the lease: no request in flight after the sender's lease could have expired -------
    let chains = chains(&d.incs);
    for r in &d.requests {
        if r.end == End::Open {
            continue;
        }
        let Some(&i) = inc_of.get(&(r.slot, r.gen)) else {
            report.violate("requests come from a known instance", describe(r));
            continue;
        };
        let inc = &d.incs[i];
        // The `Lock acquired` line is written just after the key is taken: a request may
        // precede it by a moment.
        let chain = chains
            .iter()
            .filter(|c| c.inc == i && c.start - 500 * MS <= r.arrived)
            .max_by_key(|c| c.start);
        let Some(chain) = chain else {
            if inc.paused_during(inc.events.first().map_or(0, |e| e.at), r.arrived) {
                report.except("request after a pause, with no lease on record (paused sender)");
            } else {
                report.violate(
                    "no request without the lease",
                    format!(
                        "{} but {} never logged `Lock acquired` before it",
                        describe(r),
                        inc.name
                    ),
                );
            }
            continue;
        };
        let end = r.ended;
        let released = chain
            .end
            .as_ref()
            .filter(|(how, _)| how == "Lock released")
            .map(|(_, at)| *at);
        // In flight after the lease was given back, or past the expiry of its last renewal
        // (Redis set the expiry before the line was written, so the line's time plus the TTL
        // is the latest the key could have lived) with no later renewal in the same holding.
        let after_release = released.is_some_and(|rel| end > rel + 20 * MS);
        let covered = !after_release
            && (chain.renewals.iter().any(|t| *t >= end)
                || chain
                    .renewals
                    .iter()
                    .filter(|t| **t <= end)
                    .max()
                    .is_some_and(|t| end <= t + ttl + 5 * MS));
        if !covered {
            let last = chain
                .renewals
                .iter()
                .filter(|t| **t <= end)
                .max()
                .copied()
                .unwrap_or(chain.start);
            if inc.paused_during(last, end) {
                report.except("request in flight across a pause of its sender (SIGSTOP)");
                continue;
            }
            let chain_end = chain
                .end
                .as_ref()
                .map(|(how, at)| format!("{how} at {}", fmt_us(*at)))
                .unwrap_or_else(|| "still held".into());
            report.violate(
                "no request in flight after the lease could have expired",
                format!(
                    "{}: in flight {} ms after its last renewal ({}; epoch {}, TTL {} ms{}); lease {chain_end}",
                    describe(r),
                    (end - last) / MS,
                    fmt_us(last),
                    chain.epoch,
                    ttl / MS,
                    released
                        .map(|rel| format!(", released at {}", fmt_us(rel)))
                        .unwrap_or_default()
                ),
            );
        }
    }

    // --- an answer's bytes never make an outcome unwritable --------------------------------
    for inc in &d.incs {
        let n = inc.nul_errors(0, i64::MAX);
        if n > 0 {
            let first = inc
                .events
                .iter()
                .find(|e| {
                    e.msg == "Database unavailable"
                        && e.line["error"].as_str().is_some_and(|t| t.contains("0x00"))
                })
                .unwrap();
            report.violate(
                "no answer makes an outcome unwritable",
                format!(
                    "{}: {n} outcome writes refused by PostgreSQL because of a NUL byte from the receiver, the first at {}: {}",
                    inc.name,
                    fmt_us(first.at),
                    first.line
                ),
            );
        }
    }

    // --- an epoch is begun only while its lease is valid ------------------------------------
    // An acquisition whose epoch statement took longer than the lease (a database that hangs)
    // raises the epoch after the key could have passed to someone else, fencing that holder.
    for c in &chains {
        let inc = &d.incs[c.inc];
        let lost_at_once = inc.events.iter().find(|e| {
            e.at >= c.start
                && e.at <= c.start + 100 * MS
                && e.msg == "Lock lost"
                && e.line["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("could have expired"))
        });
        if let Some(lost) = lost_at_once {
            let others: Vec<String> = chains
                .iter()
                .filter(|o| {
                    o.inc != c.inc
                        && o.renewals
                            .iter()
                            .any(|r| *r <= c.start && c.start <= r + ttl)
                })
                .map(|o| format!("{} (epoch {})", d.incs[o.inc].name, o.epoch))
                .collect();
            report.violate(
                "an epoch is begun only while its lease is valid",
                format!(
                    "{} logged `Lock acquired` epoch {} at {} and at once `Lock lost` ({}): the epoch was raised after its lease could have expired; holders then with a live lease: [{}]",
                    inc.name,
                    c.epoch,
                    fmt_us(c.start),
                    lost.line["reason"].as_str().unwrap_or("?"),
                    others.join(", ")
                ),
            );
        }
    }

    // --- epochs never go backwards, and no two holders share one --------------------------
    let mut acquisitions: Vec<(i64, usize, i64)> =
        chains.iter().map(|c| (c.start, c.inc, c.epoch)).collect();
    acquisitions.sort();
    let mut highest: Option<(i64, usize)> = None;
    for (at, inc, epoch) in acquisitions {
        if let Some((top, holder)) = highest {
            if epoch < top || (epoch == top && holder != inc) {
                report.violate(
                    "epochs only go forward",
                    format!(
                        "{} acquired epoch {epoch} at {} after {} had epoch {top}",
                        d.incs[inc].name,
                        fmt_us(at),
                        d.incs[holder].name
                    ),
                );
            }
        }
        if highest.is_none_or(|(top, _)| epoch > top) {
            highest = Some((epoch, inc));
        }
    }

    // --- the audit log: claims, outcomes, recoveries; the fence ----------------------------
    let mut claims: HashMap<i64, Vec<Claim>> = HashMap::new();
    for a in &d.audit {
        let list = claims.entry(a.id).or_default();
        if a.old_status == "pending" && a.new_status == "sending" {
            if a.new_epoch != a.state_epoch {
                report.violate(
                    "no claim by a replaced epoch",
                    format!(
                        "msg {} claimed by {:?} under epoch {:?} at {} while the epoch was {:?}",
                        a.id,
                        a.new_by,
                        a.new_epoch,
                        fmt_us(a.at),
                        a.state_epoch
                    ),
                );
            }
            list.push(Claim {
                by: a.new_by.clone().unwrap_or_default(),
                at: a.at,
                end: ClaimEnd::Open,
                end_at: None,
            });
        } else if a.old_status == "sending" {
            let writer = a.app.strip_prefix("message-dispatcher/").unwrap_or(&a.app);
            let tried = a.new_attempts - a.old_attempts;
            let by_claimant = a.old_by.as_deref() == Some(writer);
            let current = a.old_epoch == a.state_epoch;
            let end = if a.new_status == "pending" && tried == 0 && !(by_claimant && current) {
                ClaimEnd::Recovered(writer.to_owned())
            } else {
                if !current || !by_claimant {
                    report.violate(
                        "no outcome written by a replaced epoch",
                        format!(
                            "msg {} → {} (+{tried} attempts) at {} written by {writer} for a claim of {:?} under epoch {:?}; current epoch {:?}",
                            a.id, a.new_status, fmt_us(a.at), a.old_by, a.old_epoch, a.state_epoch
                        ),
                    );
                }
                ClaimEnd::Outcome(a.new_status.clone(), tried)
            };
            if let Some(open) = list.iter_mut().rev().find(|c| c.end == ClaimEnd::Open) {
                open.end = end;
                open.end_at = Some(a.at);
            }
        }
    }

    // --- every request belongs to a claim of its sender; attempts match requests ----------
    // (message id, claim index) → requests
    let mut of_claim: HashMap<(i64, usize), Vec<&Request>> = HashMap::new();
    let mut claim_of_request: HashMap<usize, (i64, usize)> = HashMap::new();
    for r in &d.requests {
        let Some(&i) = inc_of.get(&(r.slot, r.gen)) else {
            continue;
        };
        let id = d.incs[i].instance_id.as_deref().unwrap_or("?");
        // Its claim is the latest one by its sender that began before it arrived. Only when
        // there is none does a claim stamped up to 5 ms after the arrival count (clock
        // granularity): a message answered "retry after 0 s" is claimed again within
        // milliseconds, and that next claim must not take the request of the one before.
        let found = claims.get(&r.key).and_then(|list| {
            let latest = |slop: i64| {
                list.iter()
                    .enumerate()
                    .filter(|(_, c)| c.by == id && c.at - slop <= r.arrived)
                    .max_by_key(|(_, c)| c.at)
                    .map(|(n, _)| n)
            };
            latest(0).or_else(|| latest(5 * MS))
        });
        match found {
            Some(n) => {
                let c = &claims[&r.key][n];
                if matches!(c.end, ClaimEnd::Outcome(..))
                    && c.end_at.is_some_and(|t| r.arrived > t + 5 * MS)
                {
                    report.violate(
                        "requests only while claimed",
                        format!(
                            "{} arrived after its claim's outcome was written at {}",
                            describe(r),
                            fmt_us(c.end_at.unwrap())
                        ),
                    );
                }
                of_claim.entry((r.key, n)).or_default().push(r);
                claim_of_request.insert(r.seq, (r.key, n));
            }
            None => report.violate(
                "requests only while claimed",
                format!(
                    "{}: {} had not claimed the message",
                    describe(r),
                    d.incs[i].name
                ),
            ),
        }
    }
    let rows: HashMap<i64, &Row> = d.rows.iter().map(|r| (r.id, r)).collect();
    for (id, list) in &claims {
        for (n, c) in list.iter().enumerate() {
            let reqs = of_claim.get(&(*id, n)).map(Vec::as_slice).unwrap_or(&[]);
            let claimant = inc_by_id.get(c.by.as_str()).map(|i| &d.incs[*i]);
            let name = claimant.map_or(c.by.clone(), |i| i.name.clone());
            if reqs.len() > 1 {
                report.violate(
                    "one request per claim",
                    format!(
                        "msg {id}: {} requests in one claim by {name}: {}",
                        reqs.len(),
                        reqs.iter()
                            .map(|r| describe(r))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                );
            }
            // The claim counts the attempt (+1); an outcome of a message never sent gives it
            // back (-1), so claim and outcome together add exactly the requests made.
            // The history rows of this claim's requests: none when no request was made.
            let recorded: Vec<bool> = d
                .history
                .get(id)
                .map(|rows| {
                    rows.iter()
                        .filter(|(at, _)| {
                            *at >= c.at - 5 * MS && c.end_at.is_none_or(|end| *at <= end)
                        })
                        .map(|(_, answered)| *answered)
                        .collect()
                })
                .unwrap_or_default();
            match &c.end {
                // A request whose history says it got no answer may have died in the
                // receiver's accept queue (an overloaded receiver, a client timeout): counted,
                // as the daemon cannot know, and never seen.
                ClaimEnd::Outcome(_, 0) if reqs.is_empty() && recorded == [false] => {
                    report.except(
                        "a request that got no answer and never reached the receiver: counted in attempts, not seen",
                    );
                }
                // Back to pending by its own claimant with no request on record: the claim's
                // answer was lost with its connection, so the claimant never knew it held the
                // rows, and its crash recovery returned them.
                ClaimEnd::Outcome(status, 0)
                    if status == "pending" && reqs.is_empty() && recorded.is_empty() =>
                {
                    report.except(
                        "claimed, never sent, then recovered: counted in attempts without a request",
                    );
                }
                ClaimEnd::Outcome(status, tried) if (1 + *tried) as usize != reqs.len().min(1) => {
                    report.violate(
                            "attempts equal the requests the receiver saw",
                            format!(
                                "msg {id}: claim by {name} at {} ended {status} with {:+} attempts (claim and outcome) at {}, but the receiver saw {} request(s){}",
                                fmt_us(c.at),
                                1 + tried,
                                fmt_us(c.end_at.unwrap_or(0)),
                                reqs.len(),
                                reqs.first().map(|r| format!(": {}", describe(r))).unwrap_or_default()
                            ),
                        );
                }
                // Counted by the claim whether or not its outcome was ever written.
                ClaimEnd::Recovered(_) if reqs.is_empty() => {
                    report.except(
                        "claimed, never sent, then recovered: counted in attempts without a request",
                    );
                }
                _ => {}
            }
        }
        if let Some(row) = rows.get(id) {
            let seen = requests_of.get(id).map_or(0, Vec::len);
            if seen == row.attempts as usize {
                report.matched_attempts += 1;
            }
        }
    }

    // --- every message ends sent, failed or expired ----------------------------------------
    let mut stuck = Vec::new();
    for row in &d.rows {
        if !matches!(row.status.as_str(), "sent" | "failed" | "expired") {
            stuck.push(row);
        }
    }
    if !stuck.is_empty() {
        let examples: Vec<String> = stuck
            .iter()
            .take(8)
            .map(|row| {
                let reqs = requests_of.get(&row.id).map(Vec::as_slice).unwrap_or(&[]);
                let trail: Vec<String> = claims
                    .get(&row.id)
                    .map(|l| {
                        l.iter()
                            .map(|c| {
                                format!("claimed by {} at {} → {:?}", c.by, fmt_us(c.at), c.end)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "msg {} {} attempts {} last_error {:?}; claims [{}]; last request: {}",
                    row.id,
                    row.status,
                    row.attempts,
                    row.last_error,
                    trail.join("; "),
                    reqs.last()
                        .map(|r| describe(r))
                        .unwrap_or_else(|| "none".into())
                )
            })
            .collect();
        report.violate(
            "every message ends sent, failed or expired",
            format!(
                "{} messages still pending or sending: {}",
                stuck.len(),
                examples.join(" || ")
            ),
        );
    }

    // --- sent rows were accepted, with the receiver's messageId ----------------------------
    for row in d.rows.iter().filter(|r| r.status == "sent") {
        let reqs = requests_of.get(&row.id).map(Vec::as_slice).unwrap_or(&[]);
        if !reqs
            .iter()
            .any(|r| matches!(r.end, End::Answered(200..=299)))
        {
            report.violate(
                "every sent row was accepted by the receiver",
                format!(
                    "msg {} is sent but the receiver accepted none of its {} requests",
                    row.id,
                    reqs.len()
                ),
            );
            continue;
        }
        // The request whose claim ended `sent` carries the messageId to keep.
        let winner = reqs.iter().find(|r| {
            claim_of_request.get(&r.seq).is_some_and(
                |(id, n)| matches!(&claims[id][*n].end, ClaimEnd::Outcome(s, _) if s == "sent"),
            )
        });
        if let Some(w) = winner {
            let expected = w.remote_id.as_deref();
            let ok = match (expected, row.remote.as_deref()) {
                (None, None) => true,
                (Some(e), Some(got)) => {
                    let base = e.split('\0').next().unwrap_or(e);
                    got == e || got.starts_with(base)
                }
                (Some(e), None) => e.contains('\0'),
                (None, Some(_)) => false,
            };
            if !ok {
                report.violate(
                    "every sent row was accepted by the receiver",
                    format!(
                        "msg {}: remote_message_id {:?}, the accepting answer gave {:?} ({})",
                        row.id,
                        row.remote,
                        expected,
                        describe(w)
                    ),
                );
            }
        }
    }

    // --- failed only after MAX_ATTEMPTS or a permanent answer -------------------------------
    for row in d.rows.iter().filter(|r| r.status == "failed") {
        let reqs = requests_of.get(&row.id).map(Vec::as_slice).unwrap_or(&[]);
        let permanent = reqs
            .iter()
            .rev()
            .find(|r| matches!(r.end, End::Answered(_)))
            .is_some_and(|r| r.behaviour == Behaviour::Reject);
        if row.attempts < d.settings.max_attempts as i32 && !permanent {
            report.violate(
                "failed only after MAX_ATTEMPTS or a permanent answer",
                format!(
                    "msg {} failed after {} attempts (MAX_ATTEMPTS {}), last_error {:?}; last request: {}",
                    row.id,
                    row.attempts,
                    d.settings.max_attempts,
                    row.last_error,
                    reqs.last().map(|r| describe(r)).unwrap_or_else(|| "none".into())
                ),
            );
        }
    }

    // --- repeats: a request after one the receiver accepted, each explained -----------------
    for (id, reqs) in &requests_of {
        let mut repeated = false;
        for (k, r) in reqs.iter().enumerate() {
            if !r.delivered() || k + 1 == reqs.len() {
                continue;
            }
            repeated = true;
            let claim = claim_of_request.get(&r.seq).map(|(id, n)| &claims[id][*n]);
            let raced = r.ended >= r.arrived + timeout - 100 * MS;
            let sender = inc_of.get(&(r.slot, r.gen)).map(|i| &d.incs[*i]);
            let reason: Result<String, String> = match claim {
                _ if raced => Ok("the 2xx raced the client's timeout".into()),
                None => Err("no claim".into()),
                Some(c) if matches!(&c.end, ClaimEnd::Outcome(s, _) if s == "sent") => {
                    Err(format!("its claim already ended sent at {}", fmt_us(c.end_at.unwrap_or(0))))
                }
                Some(c) if sender.is_some_and(|s| s.nul_errors(r.arrived, c.end_at.unwrap_or(i64::MAX)) > 0) => {
                    Err("its outcome write kept failing on a NUL byte (`Database unavailable`: invalid byte sequence 0x00), fault or not".into())
                }
                Some(c) => {
                    let until = c.end_at.unwrap_or(i64::MAX);
                    // Every fault between the request and its claim's end, in order: a repeat
                    // often takes two (an outage keeping the outcome unwritten, then a kill).
                    let mut kinds: Vec<&str> = Vec::new();
                    for f in d.faults.iter().filter(|f| f.touches(r.slot, r.arrived, until)) {
                        if !kinds.contains(&f.kind.name()) {
                            kinds.push(f.kind.name());
                        }
                    }
                    match kinds.is_empty() {
                        false => Ok(format!("in flight at a fault: {}", kinds.join(" + "))),
                        true => Err(format!(
                            "its claim ended {:?} at {}, with no fault on its sender meanwhile; sender's log: [{}]",
                            c.end,
                            fmt_us(until),
                            sender
                                .map(|s| {
                                    s.lines(r.arrived, until, &[
                                        "Database unavailable",
                                        "Outcome write rejected for some messages: leadership moved on; they will be recovered",
                                        "Lock lost",
                                        "Stepping down as leader",
                                        "Message delivery failed, will retry",
                                    ], *id)
                                    .into_iter()
                                    .take(3)
                                    .collect::<Vec<_>>()
                                    .join(" ")
                                })
                                .unwrap_or_default()
                        )),
                    }
                }
            };
            match reason {
                Ok(why) => *report.repeat_reasons.entry(why).or_default() += 1,
                Err(why) => report.violate(
                    "repeats only for messages in flight at a fault",
                    format!(
                        "msg {id} sent again after the receiver accepted {}: {why}; next: {}",
                        describe(r),
                        describe(reqs[k + 1])
                    ),
                ),
            }
        }
        if repeated {
            report.repeats += 1;
        }
    }

    // --- delivery resumes after the last fault ---------------------------------------------
    let resumed = d
        .requests
        .iter()
        .filter(|r| r.arrived >= d.healed_at && r.delivered())
        .map(|r| r.ended)
        .min();
    report.resume = resumed.map(|t| Duration::from_micros((t - d.healed_at).max(0) as u64));
    match report.resume {
        Some(took) if took <= RESUME_BOUND => {}
        other => report.violate(
            "delivery resumes within the bound after the last fault",
            format!(
                "first delivery {other:?} after the last fault was healed (bound {RESUME_BOUND:?})"
            ),
        ),
    }

    // --- an instance saying healthy and holding delivers when work is due -----------------
    let mut by_slot: BTreeMap<usize, Vec<&Sample>> = BTreeMap::new();
    for s in &d.samples {
        by_slot.entry(s.slot).or_default().push(s);
    }
    let window = HOLDER_WINDOW.as_micros() as i64;
    for (slot, samples) in by_slot {
        let mut run: Vec<&Sample> = Vec::new();
        let mut flagged_until = 0;
        for s in samples {
            let good =
                matches!(&s.health, Some((200, true, true, _))) && s.due.is_some_and(|n| n > 0);
            let continues = run.last().is_some_and(|last| {
                s.at - last.at <= 1_500 * MS
                    && last.health.as_ref().map(|h| &h.3) == s.health.as_ref().map(|h| &h.3)
            });
            if !good || !continues {
                run.clear();
            }
            if !good {
                continue;
            }
            run.push(s);
            let (first, last) = (run[0], *run.last().unwrap());
            if last.at - first.at < window || first.at < flagged_until {
                continue;
            }
            let id = &first.health.as_ref().unwrap().3;
            let Some(&inc) = inc_by_id.get(id.as_str()) else {
                continue;
            };
            let (islot, igen) = (d.incs[inc].slot, d.incs[inc].gen);
            let sent = d.requests.iter().any(|r| {
                r.slot == islot && r.gen == igen && r.arrived >= first.at && r.arrived <= last.at
            });
            if !sent {
                report.violate(
                    "an instance healthy and holding the lock delivers when work is due",
                    format!(
                        "instance-{slot} ({}) said healthy and holding from {} to {} with {:?}..{:?} messages due, and sent nothing; its log then: [{}]",
                        d.incs[inc].name,
                        fmt_us(first.at),
                        fmt_us(last.at),
                        first.due,
                        last.due,
                        d.incs[inc]
                            .events
                            .iter()
                            .filter(|e| e.at >= first.at - 2_000 * MS && e.at <= last.at && e.line["level"] != "debug")
                            .take(4)
                            .map(|e| e.line.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                );
                flagged_until = last.at + 30_000 * MS;
                run.clear();
            }
        }
    }
    report
}
