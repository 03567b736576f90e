//! The scheduler thread: the one place that decides what to send and records what happened.
//!
//! It is a small event loop. Each turn it keeps the lease (acquire / extend / notice loss),
//! records finished outcomes in one statement per batch, recovers abandoned rows, and claims the
//! next batch when a cycle is due: every PROCESSING_INTERVAL, or — in continuous mode — as soon
//! as there is room in the pipeline and messages are due. Then it sleeps on whatever comes first:
//! an outcome, a wake-up from LISTEN/NOTIFY, the next lease tick or cycle, or the shutdown.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use crate::backoff::Backoff;
use crate::circuit::Circuit;
use crate::clock::BootInstant;
use crate::config::Config;
use crate::lease::Leadership;
use crate::listener::Listener;
use crate::message::{Claimed, Job, Outcome};
use crate::metrics::Metrics;
use crate::outcomes::Outcomes;
use crate::rate::RateLimit;
use crate::shutdown::Shutdown;
use crate::status::Status;
use crate::store::{Store, EXPIRE_LIMIT};

/// How often abandoned `sending` rows are looked for.
const RECOVERY_PERIOD: Duration = Duration::from_secs(1);
/// While idle in continuous mode, how often to look at the listener's heartbeat.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// Time for a finished request's outcome to reach the scheduler, and for the last write.
const OUTCOME_SLACK: Duration = Duration::from_millis(250);

pub struct Scheduler {
    batch_size: u32,
    /// One batch sending and one queued behind it keeps the workers busy.
    max_in_flight: usize,
    interval: Duration,
    max_processing_time: Duration,
    webhook_timeout: Duration,
    recovery_timeout: Duration,
    max_attempts: u32,
    /// A leader whose database has been unreachable this long hands the lease over.
    step_down_after: Duration,
    store: Store,
    leadership: Leadership,
    jobs: Sender<Job>,
    outcomes: Receiver<Outcome>,
    listener: Option<Listener>,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    circuit: Arc<Circuit>,
    rate_limit: Option<Arc<RateLimit>>,
    watchdog: Option<Duration>,

    /// Messages handed to the workers whose outcome has not come back yet.
    in_flight: HashSet<i64>,
    outcomes_pending: Outcomes,
    next_claim: Instant,
    next_recovery: Instant,
    last_watchdog: Instant,
    db: Backoff,
    /// While PostgreSQL is failing: no statement (claim or outcome write) before this instant.
    db_retry_at: Option<Instant>,
    /// Paces claims while due messages are there but locked by another transaction.
    locked: Backoff,
    /// The leadership epoch the circuit breaker's state belongs to.
    led_epoch: Option<i64>,
}

pub struct Parts {
    pub store: Store,
    pub leadership: Leadership,
    pub jobs: Sender<Job>,
    pub outcomes: Receiver<Outcome>,
    pub listener: Option<Listener>,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub circuit: Arc<Circuit>,
    pub rate_limit: Option<Arc<RateLimit>>,
}

impl Scheduler {
    pub fn new(config: &Config, parts: Parts) -> Scheduler {
        let now = Instant::now();
        Scheduler {
            batch_size: config.batch_size,
            max_in_flight: 2 * config.batch_size as usize,
            interval: config.processing_interval,
            max_processing_time: config.max_processing_time,
            webhook_timeout: config.webhook_timeout,
            recovery_timeout: config.recovery_timeout(),
            max_attempts: config.max_attempts,
            step_down_after: config.lock_ttl,
            store: parts.store,
            leadership: parts.leadership,
            jobs: parts.jobs,
            outcomes: parts.outcomes,
            listener: parts.listener,
            shutdown: parts.shutdown,
            outcomes_pending: Outcomes::new(parts.metrics.clone()),
            metrics: parts.metrics,
            status: parts.status,
            circuit: parts.circuit,
            rate_limit: parts.rate_limit,
            watchdog: crate::notify::watchdog_period(),
            in_flight: HashSet::new(),
            next_claim: now,
            next_recovery: now,
            last_watchdog: now,
            db: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            db_retry_at: None,
            locked: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            led_epoch: None,
        }
    }

    /// Runs until the shutdown, then drains and releases the lease.
    pub fn run(mut self) {
        while !self.shutdown.is_triggered() {
            self.turn();
        }
        self.drain();
    }

    fn turn(&mut self) {
        let now = Instant::now();
        self.pet_watchdog(now);
        self.notice_database_back();
        self.status.beat();
        let was_leading = self.leadership.leading();
        self.leadership.tick(&mut self.store);
        self.step_down_if_cut_off(now);
        self.publish_leadership(was_leading);
        self.flush_if_due(now);
        if self.may_claim(now) {
            self.cycle(now);
        }
        self.wait();
    }

    fn publish_leadership(&mut self, was_leading: bool) {
        self.status.lock_held.store(
            self.leadership.holding() && self.leadership.enabled(),
            Ordering::Relaxed,
        );
        if self.leadership.leading() && !was_leading {
            // A new leader starts a cycle at once instead of waiting an interval.
            self.next_claim = Instant::now();
        }
        let epoch = self.leadership.epoch();
        if self.leadership.holding() && epoch != self.led_epoch {
            // A new leadership (not the same one back after a hiccup) finds out for itself how
            // the receiver is doing.
            self.led_epoch = epoch;
            self.circuit.reset();
        }
    }

    fn may_claim(&self, now: Instant) -> bool {
        now >= self.next_claim
            && self.db_retry_at.is_none_or(|at| now >= at)
            && self.leadership.leading()
            && self.in_flight.len() + self.batch_size as usize <= self.max_in_flight
            && self.webhook_room(now).is_ok()
    }

    /// How many messages the receiver can take now: a full batch, the one probe of an open
    /// circuit, or what WEBHOOK_RATE_LIMIT lets start within a cycle — else when to look again.
    fn webhook_room(&self, now: Instant) -> Result<u32, Instant> {
        let room = self.circuit.claims_allowed(self.batch_size)?;
        let Some(limit) = &self.rate_limit else {
            return Ok(room);
        };
        let slots = limit
            .room_before(now + self.max_processing_time)
            .saturating_sub(self.in_flight.len() as u32);
        match room.min(slots) {
            0 => Err(now + limit.interval()),
            n => Ok(n),
        }
    }

    /// One cycle: recover abandoned rows, claim a batch, hand it to the workers.
    fn cycle(&mut self, now: Instant) {
        let epoch = self.leadership.epoch();
        if now >= self.next_recovery {
            let held = self.held();
            let recovered = self.store.recover_abandoned(
                self.recovery_timeout,
                &held,
                epoch,
                self.max_attempts,
            );
            match recovered {
                Ok(0) => {}
                Ok(n) => {
                    self.metrics.recovered.inc_by(n);
                    log::warn!(count = n; "Recovered messages abandoned in sending state");
                }
                Err(e) => return self.database_failed(&e),
            }
            self.next_recovery = now + RECOVERY_PERIOD;
        }
        let limit = self.webhook_room(now).unwrap_or(self.batch_size);
        let claim = match self.store.claim(limit, epoch) {
            Ok(claim) => claim,
            Err(e) => return self.database_failed(&e),
        };
        if claim.expired > 0 {
            self.metrics.expired.inc_by(claim.expired);
            log::info!(
                count = claim.expired, reason = "past expires_at while waiting";
                "Messages expired"
            );
        }
        let claimed = claim.messages;
        // A full batch, or as many expired rows as one claim marks: more may be waiting.
        let full = claimed.len() == limit as usize || claim.expired >= u64::from(EXPIRE_LIMIT);
        if claimed.is_empty() {
            self.nothing_claimed();
        } else {
            self.dispatch(claimed, epoch, now);
        }
        self.next_claim = if !self.continuous() {
            now + self.interval
        } else if full {
            self.locked.succeed();
            now
        } else {
            self.idle_until(now)
        };
    }

    fn continuous(&self) -> bool {
        self.interval.is_zero()
    }

    /// The messages this instance still answers for (with a worker, or an outcome not yet
    /// written): crash recovery leaves them alone, and returns every other abandoned row, even
    /// one claimed by this instance whose claim's answer was lost.
    fn held(&self) -> Vec<i64> {
        self.in_flight
            .iter()
            .copied()
            .chain(self.outcomes_pending.ids())
            .collect()
    }

    fn dispatch(&mut self, claimed: Vec<Claimed>, epoch: Option<i64>, now: Instant) {
        let batch = self.outcomes_pending.open_batch(epoch, claimed.len(), now);
        let not_after = now + self.max_processing_time;
        for message in claimed {
            let id = message.id;
            // The channel holds max_in_flight jobs, so this never blocks.
            let job = Job {
                message,
                batch,
                not_after,
            };
            if self.jobs.send(job).is_ok() {
                self.in_flight.insert(id);
            }
        }
    }

    /// An empty claim: find out why, so we neither spin nor miss a lost leadership.
    fn nothing_claimed(&mut self) {
        let state = match self.store.state() {
            Ok(state) => state,
            // Unanswered (a silent path) or failed: count it like a failed claim.
            Err(e) => return self.database_failed(&e),
        };
        self.status
            .processing_enabled
            .store(state.processing_enabled, Ordering::Relaxed);
        if let Some(epoch) = self.leadership.epoch() {
            if state.epoch != epoch && self.leadership.leading() {
                self.leadership.fenced(state.epoch);
                self.status.lock_held.store(false, Ordering::Relaxed);
            }
        }
    }

    /// In continuous mode, when to claim again after running out of due messages: when the next
    /// pending message falls due or the next abandoned one may be recovered, or when NOTIFY says
    /// a message arrived — polling only while the listener is not known to be alive.
    fn idle_until(&mut self, now: Instant) -> Instant {
        let listening = self.listener.as_ref().is_some_and(Listener::alive);
        let cap = if listening {
            Duration::from_secs(60)
        } else {
            IDLE_CHECK
        };
        if !self.status.processing_enabled.load(Ordering::Relaxed) {
            return now + cap;
        }
        let held = self.held();
        match self.store.next_due_in(self.recovery_timeout, &held) {
            Ok(Some(due)) if due.is_zero() => {
                // Due, yet the claim did not take it: another transaction holds it locked (an
                // operator's open UPDATE, say). Look again after a growing pause, not at once.
                now + self.locked.fail().min(cap)
            }
            Ok(due) => {
                self.locked.succeed();
                now + due.map_or(cap, |d| d.min(cap))
            }
            Err(_) => now + IDLE_CHECK,
        }
    }

    /// A leader cut off from PostgreSQL (while Redis still works) would keep the lease and stop
    /// the whole cluster; after a TTL of failures it lets a standby that can reach it take over.
    /// Any statement that works ends the outage, so the step-down never fires on stale state.
    fn step_down_if_cut_off(&mut self, now: Instant) {
        if self
            .store
            .down_since()
            .is_some_and(|since| now.duration_since(since) >= self.step_down_after)
        {
            self.leadership
                .step_down("PostgreSQL has been unreachable for longer than the lease TTL");
        }
    }

    fn database_failed(&mut self, e: &crate::error::Error) {
        let wait = self.db.fail();
        log::error!(error = e.to_string().as_str(), retry_in = crate::config::fmt_duration(wait).as_str(); "Database unavailable");
        let at = Instant::now() + wait;
        self.next_claim = at;
        self.db_retry_at = Some(at);
    }

    /// Ends the backoff as soon as any statement on our connection worked (a claim, a write,
    /// or the lease's epoch check).
    fn notice_database_back(&mut self) {
        if self.db.failing() && self.store.last_ok() {
            log::info!("Database available again");
            self.db.succeed();
            self.db_retry_at = None;
            self.next_claim = self.next_claim.min(Instant::now());
        }
    }

    fn take_outcome(&mut self, outcome: Outcome) {
        self.in_flight.remove(&outcome.id);
        self.outcomes_pending.push(outcome);
    }

    fn flush_if_due(&mut self, now: Instant) {
        let Some(by) = self.outcomes_pending.flush_by() else {
            return;
        };
        // Outcomes arriving, or lease ticks, must not retry a failed write before the backoff.
        if self.db_retry_at.is_some_and(|at| now < at) {
            return;
        }
        let due = self.outcomes_pending.len() >= self.batch_size as usize
            || self.in_flight.is_empty()
            || now >= by;
        if due {
            self.flush();
        }
    }

    fn flush(&mut self) {
        match self.outcomes_pending.flush(&mut self.store) {
            Ok(due_again) => {
                self.notice_database_back();
                // A retry or a returned message is due again at a time only we know yet.
                if let Some(at) = due_again.filter(|_| self.continuous()) {
                    self.next_claim = self.next_claim.min(at);
                }
            }
            Err(e) => self.database_failed(&e),
        }
    }

    /// Sleeps until the next thing to do.
    fn wait(&mut self) {
        let now = Instant::now();
        let mut until = self.leadership.next_tick();
        // While PostgreSQL is failing, claims and writes wait for the backoff.
        let db_ready = self.db_retry_at.unwrap_or(now);
        if self.leadership.leading()
            && self.in_flight.len() + (self.batch_size as usize) <= self.max_in_flight
        {
            // An open circuit, a receiver's pause or the rate limit holds claims back.
            let webhook_ready = self.webhook_room(now).err().unwrap_or(now);
            until = until.min(self.next_claim.max(db_ready).max(webhook_ready));
        }
        if let Some(by) = self.outcomes_pending.flush_by() {
            until = until.min(by.max(db_ready));
        }
        if let Some(period) = self.watchdog {
            until = until.min(self.last_watchdog + period);
        }
        until = until.min(now + self.status.beat_period());
        if let Some(listener) = &self.listener {
            // A silent listener must not leave a message waiting: poll while it looks dead.
            if !listener.alive() {
                until = until.min(now + IDLE_CHECK);
            } else {
                until = until.min(now + IDLE_CHECK * 2);
            }
        }
        let timeout = until.saturating_duration_since(now);
        let wake = self.listener.as_ref().map(Listener::wakeups);
        let never = crossbeam_channel::never();
        let wake = wake.unwrap_or(&never);
        select! {
            recv(self.outcomes) -> outcome => {
                if let Ok(outcome) = outcome {
                    self.take_outcome(outcome);
                    // Gather whatever else is ready without another turn each.
                    while let Ok(outcome) = self.outcomes.try_recv() {
                        self.take_outcome(outcome);
                    }
                }
            }
            recv(wake) -> _ => {
                if self.continuous() {
                    self.next_claim = Instant::now();
                }
            }
            recv(self.shutdown.signalled()) -> _ => {}
            default(timeout) => {
                if let Some(listener) = &self.listener {
                    if !listener.alive() && self.continuous() {
                        self.next_claim = self.next_claim.min(Instant::now());
                    }
                }
            }
        }
    }

    fn pet_watchdog(&mut self, now: Instant) {
        if let Some(period) = self.watchdog {
            if now >= self.last_watchdog + period {
                crate::notify::watchdog();
                self.last_watchdog = now;
            }
        }
    }

    /// Shutdown: claim nothing more and start no request; let the requests in flight end (each
    /// within WEBHOOK_TIMEOUT); record everything; release the lease once no request runs. All
    /// within MAX_PROCESSING_TIME + WEBHOOK_TIMEOUT.
    fn drain(mut self) {
        let started = Instant::now();
        let stop_by = started + self.max_processing_time + self.webhook_timeout;
        // Queued jobs come back unsent at once; running requests end within their timeout.
        let requests_end = (started + self.webhook_timeout + OUTCOME_SLACK).min(stop_by);
        while !self.in_flight.is_empty() {
            let left = requests_end.saturating_duration_since(Instant::now());
            match self.outcomes.recv_timeout(left) {
                Ok(outcome) => self.take_outcome(outcome),
                Err(_) => break,
            }
        }
        while !self.outcomes_pending.is_empty() && Instant::now() + OUTCOME_SLACK < stop_by {
            self.flush();
            if !self.outcomes_pending.is_empty() {
                std::thread::sleep(
                    Duration::from_millis(200)
                        .min(stop_by.saturating_duration_since(Instant::now())),
                );
            }
        }
        if !self.in_flight.is_empty() || !self.outcomes_pending.is_empty() {
            log::warn!(
                in_flight = self.in_flight.len(), unrecorded = self.outcomes_pending.len();
                "Stopping with messages still in flight; they return to pending after the recovery timeout"
            );
        }
        // Stop claiming the lease in /health before giving it up: once the key is gone another
        // instance may take it, and two instances must never both report it held.
        self.status.lock_held.store(false, Ordering::Relaxed);
        self.leadership
            .release(BootInstant::now() + stop_by.saturating_duration_since(Instant::now()));
    }
}
