//! What flows through the pipeline: a claimed message goes to a worker as a [`Job`], and comes
//! back as an [`Outcome`] for the scheduler to record.

use std::time::{Duration, Instant, SystemTime};

use crate::clock::BootInstant;

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
    /// Of those, the ones that count toward MAX_ATTEMPTS: not the probes of an open circuit
    /// nor requests answered "slow down", which say nothing about the message.
    pub charged: i32,
    /// No request for it starts at or after this moment: its `expires_at`, as the time left
    /// when PostgreSQL claimed it, counted from just before the claim on the lease clock (so
    /// a wrong wall clock on either host, or a suspended machine, cannot make it late). None =
    /// it never expires.
    pub expires: Option<BootInstant>,
}

impl Claimed {
    /// True once the message may no longer be sent.
    pub fn expired(&self) -> bool {
        self.expires.is_some_and(|at| BootInstant::now() >= at)
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
    /// A transient failure: back to `pending`, due again after `delay`. `charged` is false
    /// when the failure says nothing about the message (a failed probe of an open circuit, a
    /// receiver asking to slow down): the request does not count toward MAX_ATTEMPTS.
    Retry {
        error: String,
        delay: Duration,
        charged: bool,
    },
    /// A permanent failure, or the last allowed attempt failed.
    Failed { error: String },
    /// Never sent (lease lost, shutdown, cycle over): back to `pending` as it was.
    Unsent,
    /// Never sent: its `expires_at` passed before the request could start. Recorded `expired`,
    /// with the attempt the claim counted given back.
    Expired,
}

impl Delivery {
    /// The same outcome without anything the receiver wrote, for when PostgreSQL refuses it.
    pub fn without_receiver_text(&self) -> Delivery {
        match self {
            Delivery::Sent { .. } => Delivery::Sent { remote_id: None },
            Delivery::Retry { delay, charged, .. } => Delivery::Retry {
                error: "answer not storable".into(),
                delay: *delay,
                charged: *charged,
            },
            Delivery::Failed { .. } => Delivery::Failed {
                error: "answer not storable".into(),
            },
            Delivery::Unsent => Delivery::Unsent,
            Delivery::Expired => Delivery::Expired,
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
