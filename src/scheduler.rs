//! The scheduler thread: the one place that decides what to send and records what happened.
//!
//! It is a small event loop. Each turn it keeps the lease (acquire / extend / notice loss),
//! records finished outcomes in one statement per batch, recovers abandoned rows, and claims the
//! next batch when a cycle is due: every PROCESSING_INTERVAL, or — in continuous mode — as soon
//! as there is room in the pipeline and messages are due. Then it sleeps on whatever comes first:
//! an outcome, a wake-up from LISTEN/NOTIFY, the next lease tick or cycle, or the shutdown.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::lease::Leadership;
use crate::listener::Listener;
use crate::message::{Delivery, Job, Outcome};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::status::Status;
use crate::store::Store;

/// Outcomes wait at most this long to be written together with others.
const FLUSH_DELAY: Duration = Duration::from_millis(20);
/// How often abandoned `sending` rows are looked for.
const RECOVERY_PERIOD: Duration = Duration::from_secs(1);
/// While idle in continuous mode, how often to look at the listener's heartbeat.
const IDLE_CHECK: Duration = Duration::from_millis(500);

pub struct Scheduler {
    batch_size: u32,
    /// One batch sending and one queued behind it keeps the workers busy.
    max_in_flight: usize,
    interval: Duration,
    max_processing_time: Duration,
    recovery_timeout: Duration,
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
    watchdog: Option<Duration>,

    in_flight: usize,
    buffered: Vec<Outcome>,
    buffered_since: Option<Instant>,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    next_claim: Instant,
    next_recovery: Instant,
    last_watchdog: Instant,
    db: Backoff,
    /// While PostgreSQL is failing: no statement (claim or outcome write) before this instant.
    db_retry_at: Option<Instant>,
    /// When the current run of database failures began.
    db_down_since: Option<Instant>,
}

/// Bookkeeping for the `Message batch processed` line.
struct Batch {
    started: Instant,
    epoch: Option<i64>,
    remaining: usize,
    sent: u32,
    failed: u32,
    retried: u32,
    returned: u32,
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
}

impl Scheduler {
    pub fn new(config: &Config, parts: Parts) -> Scheduler {
        let now = Instant::now();
        Scheduler {
            batch_size: config.batch_size,
            max_in_flight: 2 * config.batch_size as usize,
            interval: config.processing_interval,
            max_processing_time: config.max_processing_time,
            recovery_timeout: config.recovery_timeout(),
            step_down_after: config.lock_ttl,
            store: parts.store,
            leadership: parts.leadership,
            jobs: parts.jobs,
            outcomes: parts.outcomes,
            listener: parts.listener,
            shutdown: parts.shutdown,
            metrics: parts.metrics,
            status: parts.status,
            watchdog: crate::notify::watchdog_period(),
            in_flight: 0,
            buffered: Vec::new(),
            buffered_since: None,
            batches: HashMap::new(),
            next_batch: 1,
            next_claim: now,
            next_recovery: now,
            last_watchdog: now,
            db: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            db_retry_at: None,
            db_down_since: None,
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
        let leading = self.leadership.leading();
        self.status
            .lock_held
            .store(leading && self.leadership.enabled(), Ordering::Relaxed);
        if leading && !was_leading {
            // A new leader starts a cycle at once instead of waiting an interval.
            self.next_claim = Instant::now();
        }
    }

    fn may_claim(&self, now: Instant) -> bool {
        now >= self.next_claim
            && self.db_retry_at.is_none_or(|at| now >= at)
            && self.leadership.leading()
            && self.in_flight + self.batch_size as usize <= self.max_in_flight
    }

    /// One cycle: recover abandoned rows, claim a batch, hand it to the workers.
    fn cycle(&mut self, now: Instant) {
        let epoch = self.leadership.epoch();
        if now >= self.next_recovery {
            match self.store.recover_abandoned(self.recovery_timeout, epoch) {
                Ok(0) => {}
                Ok(n) => {
                    self.metrics.recovered.inc_by(n);
                    log::warn!(count = n; "Recovered messages abandoned in sending state");
                }
                Err(e) => return self.database_failed(&e),
            }
            self.next_recovery = now + RECOVERY_PERIOD;
        }
        let claimed = match self.store.claim(self.batch_size, epoch) {
            Ok(claimed) => claimed,
            Err(e) => return self.database_failed(&e),
        };
        self.database_ok();
        let full = claimed.len() == self.batch_size as usize;
        if claimed.is_empty() {
            self.nothing_claimed();
        } else {
            self.dispatch(claimed, epoch, now);
        }
        self.next_claim = if !self.continuous() {
            now + self.interval
        } else if full {
            now
        } else {
            self.idle_until(now)
        };
    }

    fn continuous(&self) -> bool {
        self.interval.is_zero()
    }

    fn dispatch(
        &mut self,
        claimed: Vec<crate::message::Claimed>,
        epoch: Option<i64>,
        now: Instant,
    ) {
        let batch = self.next_batch;
        self.next_batch += 1;
        self.batches.insert(
            batch,
            Batch {
                started: now,
                epoch,
                remaining: claimed.len(),
                sent: 0,
                failed: 0,
                retried: 0,
                returned: 0,
            },
        );
        let not_after = now + self.max_processing_time;
        for message in claimed {
            self.in_flight += 1;
            // The channel holds max_in_flight jobs, so this never blocks.
            if self
                .jobs
                .send(Job {
                    message,
                    batch,
                    not_after,
                })
                .is_err()
            {
                self.in_flight -= 1;
            }
        }
    }

    /// An empty claim: find out why, so we neither spin nor miss a lost leadership.
    fn nothing_claimed(&mut self) {
        let Ok(state) = self.store.state() else {
            return;
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

    /// In continuous mode, when to claim again after running out of due messages: at the next
    /// retry's due time, or when NOTIFY says a message arrived — polling only while the listener
    /// is not known to be alive.
    fn idle_until(&mut self, now: Instant) -> Instant {
        let listening = self.listener.as_ref().is_some_and(Listener::alive);
        let cap = if listening {
            Duration::from_secs(60)
        } else {
            IDLE_CHECK
        };
        let due_in = if self.status.processing_enabled.load(Ordering::Relaxed) {
            self.store.next_due_in().ok().flatten()
        } else {
            None
        };
        now + due_in.map_or(cap, |d| d.min(cap))
    }

    /// A leader cut off from PostgreSQL (while Redis still works) would keep the lease and stop
    /// the whole cluster; after a TTL of failures it lets a standby that can reach it take over.
    fn step_down_if_cut_off(&mut self, now: Instant) {
        if self
            .db_down_since
            .is_some_and(|since| now.duration_since(since) >= self.step_down_after)
        {
            self.leadership
                .step_down("PostgreSQL has been unreachable for longer than the lease TTL");
        }
    }

    fn database_failed(&mut self, e: &crate::error::Error) {
        self.db_down_since.get_or_insert_with(Instant::now);
        let wait = self.db.fail();
        log::error!(error = e.to_string().as_str(), retry_in = crate::config::fmt_duration(wait).as_str(); "Database unavailable");
        let at = Instant::now() + wait;
        self.next_claim = at;
        self.db_retry_at = Some(at);
    }

    fn database_ok(&mut self) {
        if self.db.failing() {
            log::info!("Database available again");
        }
        self.db.succeed();
        self.db_retry_at = None;
        self.db_down_since = None;
    }

    fn take_outcome(&mut self, outcome: Outcome) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.buffered.is_empty() {
            self.buffered_since = Some(Instant::now());
        }
        self.buffered.push(outcome);
    }

    fn flush_if_due(&mut self, now: Instant) {
        let Some(since) = self.buffered_since else {
            return;
        };
        // Outcomes arriving, or lease ticks, must not retry a failed write before the backoff.
        if self.db_retry_at.is_some_and(|at| now < at) {
            return;
        }
        let due = self.buffered.len() >= self.batch_size as usize
            || self.in_flight == 0
            || now >= since + FLUSH_DELAY;
        if due {
            self.flush();
        }
    }

    /// Writes buffered outcomes, one statement per epoch (normally exactly one). What cannot
    /// be written stays buffered for the next try: dropping it would resend delivered messages.
    fn flush(&mut self) {
        let mut by_epoch: HashMap<Option<i64>, Vec<Outcome>> = HashMap::new();
        for o in self.buffered.drain(..) {
            let epoch = self.batches.get(&o.batch).and_then(|b| b.epoch);
            by_epoch.entry(epoch).or_default().push(o);
        }
        let mut failed = false;
        for (epoch, outcomes) in by_epoch {
            if failed {
                self.buffered.extend(outcomes);
                continue;
            }
            let rows = outcomes.iter().map(|o| (o.id, &o.delivery));
            match self.store.record(epoch, rows) {
                Ok(written) => {
                    if written < outcomes.len() as u64 {
                        log::warn!(
                            written = written, given = outcomes.len(), epoch = epoch.unwrap_or(0);
                            "Outcome write rejected for some messages: leadership moved on; they will be recovered"
                        );
                    }
                    for outcome in outcomes {
                        self.count(outcome);
                    }
                }
                Err(e) => {
                    self.database_failed(&e);
                    failed = true;
                    self.buffered.extend(outcomes);
                }
            }
        }
        if !failed {
            self.database_ok();
            self.buffered_since = None;
        }
    }

    fn count(&mut self, outcome: Outcome) {
        let Some(batch) = self.batches.get_mut(&outcome.batch) else {
            return;
        };
        match outcome.delivery {
            Delivery::Sent { .. } => batch.sent += 1,
            Delivery::Failed { .. } => batch.failed += 1,
            Delivery::Retry { .. } => batch.retried += 1,
            Delivery::Unsent => {
                batch.returned += 1;
                self.metrics.returned.inc();
            }
        }
        batch.remaining -= 1;
        if batch.remaining == 0 {
            let batch = self.batches.remove(&outcome.batch).expect("present above");
            let took = batch.started.elapsed();
            self.metrics.batch_duration.observe(took.as_secs_f64());
            log::debug!(
                duration = format!("{took:?}").as_str(),
                sent = batch.sent, failed = batch.failed, retried = batch.retried, returned = batch.returned;
                "Message batch processed"
            );
        }
    }

    /// Sleeps until the next thing to do.
    fn wait(&mut self) {
        let now = Instant::now();
        let mut until = self.leadership.next_tick();
        // While PostgreSQL is failing, claims and writes wait for the backoff.
        let db_ready = self.db_retry_at.unwrap_or(now);
        if self.leadership.leading()
            && self.in_flight + (self.batch_size as usize) <= self.max_in_flight
        {
            until = until.min(self.next_claim.max(db_ready));
        }
        if let Some(since) = self.buffered_since {
            until = until.min((since + FLUSH_DELAY).max(db_ready));
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

    /// Shutdown: claim nothing more, let in-flight sends finish (bounded by
    /// MAX_PROCESSING_TIME), record everything, release the lease.
    fn drain(mut self) {
        let deadline = Instant::now() + self.max_processing_time;
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.outcomes.recv_timeout(left) {
                Ok(outcome) => self.take_outcome(outcome),
                Err(_) => break,
            }
        }
        while !self.buffered.is_empty() && Instant::now() < deadline {
            self.flush();
            if !self.buffered.is_empty() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if self.in_flight > 0 || !self.buffered.is_empty() {
            log::warn!(
                in_flight = self.in_flight, unrecorded = self.buffered.len();
                "Stopping with messages still in flight; they return to pending after the recovery timeout"
            );
        }
        // Stop claiming the lease in /health before giving it up: once the key is gone another
        // instance may take it, and two instances must never both report it held.
        self.status.lock_held.store(false, Ordering::Relaxed);
        self.leadership.release();
    }
}
