//! The worker pool: WORKER_COUNT threads that take jobs off a bounded channel, make the webhook
//! request through the shared agent, and hand the outcome back to the scheduler.
//!
//! Workers never touch PostgreSQL: the scheduler records outcomes in batches. Before every
//! request a worker checks that it may still send (shutdown, the cycle's time bound, and a
//! lease that outlasts the whole request); a job it may not send goes back as
//! [`Delivery::Unsent`].

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::circuit::{Admission, Circuit};
use crate::lease::Permit;
use crate::message::{Delivery, Job, Outcome};
use crate::metrics::Metrics;
use crate::rate::RateLimit;
use crate::shutdown::Shutdown;
use crate::webhook::Webhook;

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
            let delivery = self.attempt(&job);
            let outcome = Outcome {
                id: job.message.id,
                batch: job.batch,
                delivery,
            };
            if outcomes.send(outcome).is_err() {
                return;
            }
        }
    }

    /// Makes the request, unless it may not be made now: the shutdown began, the cycle is
    /// over, the circuit is open or the receiver asked for a pause, no rate-limit slot comes
    /// in time, or the lease could expire before the request would end.
    fn attempt(&self, job: &Job) -> Delivery {
        if self.shutdown.is_triggered() || Instant::now() >= job.not_after {
            return Delivery::Unsent;
        }
        if let Some(limit) = &self.rate_limit {
            if !limit.wait(job.not_after) {
                return Delivery::Unsent;
            }
        }
        let admission = self.circuit.admit();
        if admission == Admission::Hold {
            return Delivery::Unsent;
        }
        let Some(_running) = self.permit.begin_request() else {
            self.circuit.cancel(&admission);
            return Delivery::Unsent;
        };
        let started = Instant::now();
        let (delivery, health) = self.webhook.deliver(&job.message);
        self.metrics.observe_delivery(&delivery, started.elapsed());
        let error = match &delivery {
            Delivery::Retry { error, .. } | Delivery::Failed { error } => error.as_str(),
            _ => "",
        };
        self.circuit.report(&admission, health, error);
        log_delivery(job, &delivery);
        delivery
    }
}

fn log_delivery(job: &Job, delivery: &Delivery) {
    let id = job.message.id;
    match delivery {
        Delivery::Sent { .. } => log::trace!(id = id; "Message sent"),
        Delivery::Retry { error, delay } => log::debug!(
            id = id, error = error.as_str(), retry_in = crate::config::fmt_duration(*delay).as_str();
            "Message delivery failed, will retry"
        ),
        Delivery::Failed { error } => log::warn!(
            id = id, error = error.as_str(), attempts = job.message.attempts;
            "Message delivery failed permanently"
        ),
        Delivery::Unsent => {}
    }
}
