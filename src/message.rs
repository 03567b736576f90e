//! What flows through the pipeline: a claimed message goes to a worker as a [`Job`], and comes
//! back as an [`Outcome`] for the scheduler to record.

use std::time::{Duration, Instant, SystemTime};

/// A message claimed from the table (status now `sending`).
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: i64,
    pub recipient: String,
    pub content: String,
    /// Webhook requests made for it, counting the one this claim is for: the claim counts the
    /// attempt, so that a request is counted even if its outcome is never recorded (a crash, a
    /// fenced write).
    pub attempts: i32,
    /// `attempts` when the message was last retried by hand (0 if never): the give-up rule and
    /// the backoff count only the requests since.
    pub attempts_base: i32,
}

impl Claimed {
    /// Requests made since the last manual retry, counting this one.
    pub fn attempts_since_retry(&self) -> u32 {
        (self.attempts - self.attempts_base).max(1) as u32
    }
}

/// A claimed message on its way to a worker.
#[derive(Debug)]
pub struct Job {
    pub message: Claimed,
    /// The claim it belongs to, for the per-batch log line.
    pub batch: u64,
    /// No request for it starts after this instant (MAX_PROCESSING_TIME after the claim).
    pub not_after: Instant,
}

/// What happened to one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// 2xx: done.
    Sent { remote_id: Option<String> },
    /// A transient failure: back to `pending`, due again after `delay`.
    Retry { error: String, delay: Duration },
    /// A permanent failure, or the last allowed attempt failed.
    Failed { error: String },
    /// Never sent (lease lost, shutdown, cycle over): back to `pending` as it was.
    Unsent,
}

impl Delivery {
    /// The same outcome without anything the receiver wrote, for when PostgreSQL refuses it.
    pub fn without_receiver_text(&self) -> Delivery {
        match self {
            Delivery::Sent { .. } => Delivery::Sent { remote_id: None },
            Delivery::Retry { delay, .. } => Delivery::Retry {
                error: "answer not storable".into(),
                delay: *delay,
            },
            Delivery::Failed { .. } => Delivery::Failed {
                error: "answer not storable".into(),
            },
            Delivery::Unsent => Delivery::Unsent,
        }
    }
}

/// One webhook request, as the attempt history keeps it.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The message's `attempts` counting this request.
    pub number: i32,
    pub started_at: SystemTime,
    pub duration: Duration,
    /// The answer's HTTP status; None when none came.
    pub status: Option<u16>,
}

#[derive(Debug)]
pub struct Outcome {
    pub id: i64,
    pub batch: u64,
    pub delivery: Delivery,
    /// The request made, if one was.
    pub attempt: Option<Attempt>,
}
