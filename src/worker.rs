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

use crate::lease::Permit;
use crate::message::{Delivery, Job, Outcome};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::webhook::Webhook;

/// Starts the workers; they stop once the scheduler closes the job channel.
pub fn start(
    count: u32,
    webhook: Arc<Webhook>,
    jobs: Receiver<Job>,
    outcomes: Sender<Outcome>,
    permit: Arc<Permit>,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    for n in 0..count {
        let worker = Worker {
            webhook: webhook.clone(),
            permit: permit.clone(),
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
        };
        let (jobs, outcomes) = (jobs.clone(), outcomes.clone());
        std::thread::Builder::new()
            .name(format!("worker-{n}"))
            .spawn(move || worker.run(jobs, outcomes))?;
    }
    Ok(())
}

struct Worker {
    webhook: Arc<Webhook>,
    permit: Arc<Permit>,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(self, jobs: Receiver<Job>, outcomes: Sender<Outcome>) {
        for job in jobs {
            let delivery = match self.begin_request(&job) {
                Some(_running) => {
                    let started = Instant::now();
                    let delivery = self.webhook.deliver(&job.message);
                    self.metrics.observe_delivery(&delivery, started.elapsed());
                    log_delivery(&job, &delivery);
                    delivery
                }
                None => Delivery::Unsent,
            };
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

    /// A request may start unless the shutdown began, the cycle is over, or the lease could
    /// expire before the request would end.
    fn begin_request(&self, job: &Job) -> Option<crate::lease::Request<'_>> {
        if self.shutdown.is_triggered() || Instant::now() >= job.not_after {
            return None;
        }
        self.permit.begin_request()
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
