//! The worker pool: WORKER_COUNT threads that take jobs off a bounded channel, make the webhook
//! request through the shared agent, and hand the outcome back to the scheduler.
//!
//! Workers never touch PostgreSQL: the scheduler records outcomes in batches. Before every
//! request a worker checks that it may still send (shutdown, the cycle's time bound, and a
//! lease that outlasts the whole request); a job it may not send goes back as
//! [`Delivery::Unsent`]. A message whose `expires_at` has passed by then (it waited in the
//! channel behind slow requests, or for a rate-limit slot) goes back as [`Delivery::Expired`].

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use crate::circuit::{Admission, Circuit};
use crate::lease::Permit;
use crate::message::{Attempt, Delivery, Job, Outcome};
use crate::metrics::Metrics;
use crate::rate::RateLimit;
use crate::shutdown::Shutdown;
use crate::webhook::Webhook;

/// A worker's stack. A request through ureq (http or https) reaches 32–64 KiB deep (measured:
/// 32 KiB overflows); the default of 2 MiB per thread is 2 GB of address space at
/// WORKER_COUNT=1024, which memory limits on virtual size (ulimit -v, some containers) count.
const WORKER_STACK: usize = 256 * 1024;

/// Starts the workers; they stop once the scheduler closes the job channel.
pub fn start(
    count: u32,
    parts: Worker,
    jobs: Receiver<Job>,
    outcomes: Sender<Outcome>,
) -> std::io::Result<()> {
    for n in 0..count {
        let worker = parts.clone();
        let (jobs, outcomes) = (jobs.clone(), outcomes.clone());
        std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .stack_size(WORKER_STACK)
            .spawn(move || worker.run(jobs, outcomes))?;
    }
    Ok(())
}

/// What every worker shares: the agent, the lease permit, the receiver's circuit, the rate
/// limit.
#[derive(Clone)]
pub struct Worker {
    pub webhook: Arc<Webhook>,
    pub permit: Arc<Permit>,
    pub circuit: Arc<Circuit>,
    pub rate_limit: Option<Arc<RateLimit>>,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
}

impl Worker {
    fn run(self, jobs: Receiver<Job>, outcomes: Sender<Outcome>) {
        for job in jobs {
            let (delivery, attempt) = self.attempt(&job);
            let outcome = Outcome {
                id: job.message.id,
                batch: job.batch,
                delivery,
                attempt,
            };
            if outcomes.send(outcome).is_err() {
                return;
            }
        }
    }

    /// Makes the request, unless it may not be made now: the message expired, the shutdown
    /// began, the cycle is over, the circuit is open or the receiver asked for a pause, no
    /// rate-limit slot comes in time, or the lease could expire before the request would end.
    fn attempt(&self, job: &Job) -> (Delivery, Option<Attempt>) {
        const UNSENT: (Delivery, Option<Attempt>) = (Delivery::Unsent, None);
        const EXPIRED: (Delivery, Option<Attempt>) = (Delivery::Expired, None);
        if job.message.expired() {
            return EXPIRED;
        }
        if self.shutdown.is_triggered() || Instant::now() >= job.not_after {
            return UNSENT;
        }
        if let Some(limit) = &self.rate_limit {
            // The wait may be long: look at the shutdown and the cycle's bound again after it.
            if !limit.wait(job.not_after, &self.shutdown)
                || self.shutdown.is_triggered()
                || Instant::now() >= job.not_after
            {
                return UNSENT;
            }
            // The wait may have been long; the slot it took is simply not used.
            if job.message.expired() {
                return EXPIRED;
            }
        }
        let admission = self.circuit.admit();
        if admission == Admission::Hold {
            return UNSENT;
        }
        let Some(_running) = self.permit.begin_request() else {
            self.circuit.cancel(&admission);
            return UNSENT;
        };
        // The last look, just before the request (admission and permit never block).
        if job.message.expired() {
            self.circuit.cancel(&admission);
            return EXPIRED;
        }
        let (started_at, started) = (SystemTime::now(), Instant::now());
        let result = self
            .webhook
            .deliver(&job.message, admission == Admission::Probe);
        let duration = started.elapsed();
        self.metrics.observe_delivery(&result.delivery, duration);
        let error = match &result.delivery {
            Delivery::Retry { error, .. } | Delivery::Failed { error } => error.as_str(),
            _ => "",
        };
        self.circuit.report(&admission, result.health, error);
        log_delivery(job, &result.delivery);
        let attempt = Attempt {
            number: job.message.attempts,
            started_at,
            duration,
            status: result.status,
        };
        (result.delivery, Some(attempt))
    }
}

fn log_delivery(job: &Job, delivery: &Delivery) {
    let id = job.message.id;
    match delivery {
        Delivery::Sent { .. } => log::trace!(id = id; "Message sent"),
        Delivery::Retry { error, delay, .. } => log::debug!(
            id = id, error = error.as_str(), retry_in = crate::config::fmt_duration(*delay).as_str();
            "Message delivery failed, will retry"
        ),
        Delivery::Failed { error } => log::warn!(
            id = id, error = error.as_str(), attempts = job.message.attempts;
            "Message delivery failed permanently"
        ),
        Delivery::Unsent | Delivery::Expired => {}
    }
}
