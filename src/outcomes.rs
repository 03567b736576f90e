//! Outcomes on their way from the workers to PostgreSQL.
//!
//! Workers hand back one [`Outcome`] per message; they are written together, one statement per
//! leadership epoch (normally exactly one), a few milliseconds or a batch's worth at a time.
//! What cannot be written because the database is unavailable stays buffered for the next try:
//! dropping it would resend delivered messages. What PostgreSQL refuses for its data is never
//! retried as it is: the bad row is found and stored without the receiver's text, so that one
//! odd answer cannot stall every batch behind it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::message::{Delivery, Outcome};
use crate::metrics::Metrics;
use crate::store::{Recorded, Store};

/// Outcomes wait at most this long to be written together with others.
pub const FLUSH_DELAY: Duration = Duration::from_millis(20);

pub struct Outcomes {
    buffered: Vec<Outcome>,
    /// When the oldest buffered outcome arrived.
    since: Option<Instant>,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    metrics: Arc<Metrics>,
    /// Messages recorded `expired` by the current flush, by why (see [`ExpiredWhy`]).
    expired: [u64; 3],
    /// A write of buffered outcomes failed without an answer: it may have committed, so the
    /// next writes must not add their history twice. Until the buffer has been written.
    maybe_written: bool,
}

/// Why a recorded outcome ended `expired`.
#[derive(Clone, Copy)]
enum ExpiredWhy {
    /// The worker found it past `expires_at` just before the request.
    BeforeRequest = 0,
    /// A retry would have fallen due at or after `expires_at`.
    InsteadOfRetry = 1,
    /// Returned unsent (lease lost, shutdown, cycle over) at or after `expires_at`.
    ReturnedUnsent = 2,
}

impl ExpiredWhy {
    const ALL: [ExpiredWhy; 3] = [
        ExpiredWhy::BeforeRequest,
        ExpiredWhy::InsteadOfRetry,
        ExpiredWhy::ReturnedUnsent,
    ];

    fn of(delivery: &Delivery) -> ExpiredWhy {
        match delivery {
            Delivery::Retry { .. } => ExpiredWhy::InsteadOfRetry,
            Delivery::Unsent => ExpiredWhy::ReturnedUnsent,
            _ => ExpiredWhy::BeforeRequest,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            ExpiredWhy::BeforeRequest => "past expires_at just before the request",
            ExpiredWhy::InsteadOfRetry => "the next attempt would have come after expires_at",
            ExpiredWhy::ReturnedUnsent => "past expires_at when returned unsent",
        }
    }
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
    expired: u32,
}

impl Outcomes {
    pub fn new(metrics: Arc<Metrics>) -> Outcomes {
        Outcomes {
            buffered: Vec::new(),
            since: None,
            batches: HashMap::new(),
            next_batch: 1,
            metrics,
            expired: [0; 3],
            maybe_written: false,
        }
    }

    /// Opens the books on a claimed batch of `size` messages; returns its number.
    pub fn open_batch(&mut self, epoch: Option<i64>, size: usize, now: Instant) -> u64 {
        let batch = self.next_batch;
        self.next_batch += 1;
        self.batches.insert(
            batch,
            Batch {
                started: now,
                epoch,
                remaining: size,
                sent: 0,
                failed: 0,
                retried: 0,
                returned: 0,
                expired: 0,
            },
        );
        batch
    }

    pub fn push(&mut self, outcome: Outcome) {
        if self.buffered.is_empty() {
            self.since = Some(Instant::now());
        }
        self.buffered.push(outcome);
    }

    /// The messages whose outcome is buffered.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.buffered.iter().map(|o| o.id)
    }

    pub fn len(&self) -> usize {
        self.buffered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffered.is_empty()
    }

    /// The latest moment the buffered outcomes should be written.
    pub fn flush_by(&self) -> Option<Instant> {
        self.since.map(|since| since + FLUSH_DELAY)
    }

    /// Writes what is buffered. Returns the earliest moment a message written now falls due
    /// again (a retry, or one returned unsent), or the error of a database that could not be
    /// used, with whatever was not written still buffered.
    pub fn flush(&mut self, store: &mut Store) -> Result<Option<Instant>, Error> {
        let mut by_epoch: HashMap<Option<i64>, Vec<Outcome>> = HashMap::new();
        for o in self.buffered.drain(..) {
            let epoch = self.batches.get(&o.batch).and_then(|b| b.epoch);
            by_epoch.entry(epoch).or_default().push(o);
        }
        let mut due: Option<Instant> = None;
        let mut failure = None;
        for (epoch, outcomes) in by_epoch {
            if failure.is_some() {
                self.buffered.extend(outcomes);
                continue;
            }
            let rows = outcomes
                .iter()
                .map(|o| (o.id, &o.delivery, o.attempt.as_ref()));
            let result = match store.record(epoch, rows, self.maybe_written) {
                Ok(recorded) => {
                    self.recorded(epoch, recorded, outcomes, &mut due);
                    Ok(())
                }
                Err(e) if e.is_data_error() => {
                    log::warn!(
                        error = e.to_string().as_str(), count = outcomes.len();
                        "Outcome write refused for its data; writing the outcomes one by one"
                    );
                    self.record_one_by_one(store, epoch, outcomes, &mut due)
                }
                Err(e) => {
                    self.buffered.extend(outcomes);
                    self.maybe_written = true;
                    Err(e)
                }
            };
            failure = result.err();
        }
        self.log_expired();
        match failure {
            Some(e) => Err(e),
            None => {
                self.since = None;
                self.maybe_written = false;
                Ok(due)
            }
        }
    }

    fn recorded(
        &mut self,
        epoch: Option<i64>,
        recorded: Recorded,
        outcomes: Vec<Outcome>,
        due: &mut Option<Instant>,
    ) {
        let written = recorded.written;
        if written < outcomes.len() as u64 {
            log::warn!(
                written = written, given = outcomes.len(), epoch = epoch.unwrap_or(0);
                "Outcome write rejected for some messages: leadership moved on; they will be recovered"
            );
        }
        for outcome in outcomes {
            let expired = recorded.expired.contains(&outcome.id);
            if !expired {
                earliest(due, &outcome.delivery);
            }
            self.count(outcome, expired);
        }
    }

    /// One `Messages expired` line per reason for what the last flush recorded `expired`.
    fn log_expired(&mut self) {
        for why in ExpiredWhy::ALL {
            let count = std::mem::take(&mut self.expired[why as usize]);
            if count > 0 {
                log::info!(count = count, reason = why.reason(); "Messages expired");
            }
        }
    }

    /// The slow path after PostgreSQL refused a batch for its data: each outcome on its own, and
    /// one that is refused again is stored without the receiver's text. Stops at a database
    /// that cannot be used, with the rest buffered again.
    fn record_one_by_one(
        &mut self,
        store: &mut Store,
        epoch: Option<i64>,
        outcomes: Vec<Outcome>,
        due: &mut Option<Instant>,
    ) -> Result<(), Error> {
        let mut outcomes = outcomes.into_iter();
        while let Some(outcome) = outcomes.next() {
            let expired = match self.record_alone(store, epoch, &outcome) {
                Ok(expired) => expired,
                Err(e) => {
                    self.buffered.push(outcome);
                    self.buffered.extend(outcomes);
                    self.maybe_written = true;
                    return Err(e);
                }
            };
            if !expired {
                earliest(due, &outcome.delivery);
            }
            self.count(outcome, expired);
        }
        Ok(())
    }

    /// Returns whether the message ended `expired`.
    fn record_alone(
        &mut self,
        store: &mut Store,
        epoch: Option<i64>,
        outcome: &Outcome,
    ) -> Result<bool, Error> {
        let attempt = outcome.attempt.as_ref();
        let again = self.maybe_written;
        let refused = match store.record(
            epoch,
            std::iter::once((outcome.id, &outcome.delivery, attempt)),
            again,
        ) {
            Ok(recorded) => return Ok(!recorded.expired.is_empty()),
            Err(e) if e.is_data_error() => e,
            Err(e) => return Err(e),
        };
        let plain = outcome.delivery.without_receiver_text();
        log::error!(
            id = outcome.id, error = refused.to_string().as_str();
            "Outcome cannot be stored as received; storing it without the receiver's text"
        );
        // Skipping history rows already there as well: should a duplicate be what PostgreSQL
        // refused, the outcome is still written.
        match store.record(epoch, std::iter::once((outcome.id, &plain, attempt)), true) {
            Ok(recorded) => Ok(!recorded.expired.is_empty()),
            Err(e) if e.is_data_error() => {
                // Nothing we add is left to remove: leave the row to crash recovery (which takes
                // back any row this instance no longer holds) rather than stall every batch.
                log::error!(
                    id = outcome.id, error = e.to_string().as_str();
                    "Outcome cannot be stored; the message returns to pending through crash recovery"
                );
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Counts a written outcome; `expired` when the row ended `expired` whatever the outcome
    /// said.
    fn count(&mut self, outcome: Outcome, expired: bool) {
        if expired {
            self.metrics.expired.inc();
            self.expired[ExpiredWhy::of(&outcome.delivery) as usize] += 1;
        }
        let Some(batch) = self.batches.get_mut(&outcome.batch) else {
            return;
        };
        match outcome.delivery {
            _ if expired => batch.expired += 1,
            Delivery::Sent { .. } => batch.sent += 1,
            Delivery::Failed { .. } => batch.failed += 1,
            Delivery::Retry { .. } => batch.retried += 1,
            Delivery::Unsent => {
                batch.returned += 1;
                self.metrics.returned.inc();
            }
            // Recorded `expired` unless the write was fenced off; then it is nothing yet.
            Delivery::Expired => {}
        }
        batch.remaining -= 1;
        if batch.remaining == 0 {
            let batch = self.batches.remove(&outcome.batch).expect("present above");
            let took = batch.started.elapsed();
            self.metrics.batch_duration.observe(took.as_secs_f64());
            log::debug!(
                duration = format!("{took:?}").as_str(),
                sent = batch.sent, failed = batch.failed, retried = batch.retried,
                returned = batch.returned, expired = batch.expired;
                "Message batch processed"
            );
        }
    }
}

/// Keeps the earliest moment a written outcome makes its message due again.
fn earliest(due: &mut Option<Instant>, delivery: &Delivery) {
    let at = match delivery {
        Delivery::Retry { delay, .. } => Instant::now() + *delay,
        Delivery::Unsent => Instant::now(),
        Delivery::Sent { .. } | Delivery::Failed { .. } | Delivery::Expired => return,
    };
    *due = Some(due.map_or(at, |d| d.min(at)));
}
