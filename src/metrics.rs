//! Prometheus metrics, served at `GET /metrics`: what was delivered, how fast, and the lease
//! figures the original quick start tells operators to watch (acquisitions, failures,
//! extensions, losses, who holds it and for how long), plus the HTTP API's own traffic.
//!
//! The exposition is OpenMetrics 1.0 text (what `prometheus-client` encodes: counters as
//! `<name>_total`, a closing `# EOF`), served as [`CONTENT_TYPE`]. Prometheus asks for
//! OpenMetrics first in its scrape `Accept` header and parses it natively; labelling the same
//! bytes `text/plain; version=0.0.4` would misdescribe them (the classic format has no `# EOF`
//! and names counter families with their `_total` suffix).

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::message::Delivery;

/// The media type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of `http_requests`: route (a path from the API's route table, or `unmatched`),
/// method and status code. Unknown paths and methods are folded so that a scanner cannot
/// create unbounded series.
type HttpLabels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub sent: Counter,
    pub failed: Counter,
    pub retried: Counter,
    pub returned: Counter,
    pub recovered: Counter,
    pub expired: Counter,
    pub webhook_latency: Histogram,
    pub batch_duration: Histogram,
    pub queue_depth: Family<Vec<(String, String)>, Gauge>,
    /// How long the oldest due `pending` message has waited since it fell due.
    pub oldest_due_age: Gauge<f64, AtomicU64>,
    /// Rows deleted by retention, by status.
    pub pruned: Family<Vec<(String, String)>, Counter>,
    /// When the ended rows (`sent`, `failed`, …) were last counted for `queue_depth`.
    ended_counted_at: Mutex<Option<Instant>>,
    pub lock_acquisitions: Counter,
    pub lock_acquire_failures: Counter,
    pub lock_extensions: Counter,
    pub lock_extension_failures: Counter,
    pub lock_losses: Counter,
    pub lock_held: Gauge,
    pub lock_held_seconds: Counter<f64, AtomicU64>,
    pub epoch: Gauge,
    pub processing_enabled: Gauge,
    pub circuit_state: Gauge,
    pub circuit_opened: Counter,
    pub slow_downs: Counter,
    pub http_requests: Family<HttpLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("message_dispatcher"),
            sent: Counter::default(),
            failed: Counter::default(),
            retried: Counter::default(),
            returned: Counter::default(),
            recovered: Counter::default(),
            expired: Counter::default(),
            // 1 ms … ~33 s
            webhook_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            batch_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            queue_depth: Family::default(),
            oldest_due_age: Gauge::default(),
            pruned: Family::default(),
            ended_counted_at: Mutex::new(None),
            lock_acquisitions: Counter::default(),
            lock_acquire_failures: Counter::default(),
            lock_extensions: Counter::default(),
            lock_extension_failures: Counter::default(),
            lock_losses: Counter::default(),
            lock_held: Gauge::default(),
            lock_held_seconds: Counter::default(),
            epoch: Gauge::default(),
            processing_enabled: Gauge::default(),
            circuit_state: Gauge::default(),
            circuit_opened: Counter::default(),
            slow_downs: Counter::default(),
            http_requests: Family::default(),
        };
        let r = &mut m.registry;
        r.register("messages_sent", "Messages delivered (2xx)", m.sent.clone());
        r.register(
            "messages_failed",
            "Messages marked failed",
            m.failed.clone(),
        );
        r.register(
            "messages_retried",
            "Deliveries that will be retried",
            m.retried.clone(),
        );
        r.register(
            "messages_returned",
            "Claimed messages returned unsent (lease lost, shutdown, cycle over)",
            m.returned.clone(),
        );
        r.register(
            "messages_recovered",
            "Messages recovered from an abandoned `sending` state",
            m.recovered.clone(),
        );
        r.register(
            "messages_expired",
            "Messages marked expired: past expires_at when claimed or just before the request, \
             or a retry that would have come after it",
            m.expired.clone(),
        );
        r.register(
            "webhook_request_duration_seconds",
            "Webhook request latency",
            m.webhook_latency.clone(),
        );
        r.register(
            "batch_duration_seconds",
            "Time from claiming a batch to recording its last outcome",
            m.batch_duration.clone(),
        );
        r.register(
            "queue_depth",
            "Messages by status: pending and sending counted at each scrape, the others (sent, failed, expired, cancelled) at most once a minute",
            m.queue_depth.clone(),
        );
        r.register(
            "oldest_due_pending_age_seconds",
            "How long the oldest due pending message has been due (0 when none is)",
            m.oldest_due_age.clone(),
        );
        r.register(
            "messages_pruned",
            "Messages deleted by retention (SENT_RETENTION, FAILED_RETENTION), by status",
            m.pruned.clone(),
        );
        r.register(
            "lock_acquisitions",
            "Times this instance acquired the lease",
            m.lock_acquisitions.clone(),
        );
        r.register(
            "lock_acquire_failures",
            "Attempts to acquire the lease that failed (held elsewhere or Redis down)",
            m.lock_acquire_failures.clone(),
        );
        r.register(
            "lock_extensions",
            "Successful lease extensions",
            m.lock_extensions.clone(),
        );
        r.register(
            "lock_extension_failures",
            "Lease extensions that failed",
            m.lock_extension_failures.clone(),
        );
        r.register(
            "lock_losses",
            "Times this instance lost the lease while holding it",
            m.lock_losses.clone(),
        );
        r.register(
            "lock_held",
            "1 while this instance holds the lease",
            m.lock_held.clone(),
        );
        r.register(
            "lock_held_seconds",
            "Time this instance has held the lease",
            m.lock_held_seconds.clone(),
        );
        r.register(
            "leadership_epoch",
            "The leadership epoch this instance holds (0 when none)",
            m.epoch.clone(),
        );
        r.register(
            "processing_enabled",
            "1 while the cluster-wide processing switch is on (as last read by this instance)",
            m.processing_enabled.clone(),
        );
        r.register(
            "webhook_circuit_state",
            "The webhook's circuit breaker: 0 closed, 1 open, 2 half-open (a probe is out)",
            m.circuit_state.clone(),
        );
        r.register(
            "webhook_circuit_opened",
            "Times the webhook's circuit breaker opened",
            m.circuit_opened.clone(),
        );
        r.register(
            "webhook_slow_downs",
            "Times the webhook asked to slow down (429, or 503 with Retry-After) and sending paused",
            m.slow_downs.clone(),
        );
        r.register(
            "http_requests",
            "HTTP API requests answered, by route, method and status",
            m.http_requests.clone(),
        );
        m
    }

    pub fn observe_delivery(&self, delivery: &Delivery, latency: Duration) {
        self.webhook_latency.observe(latency.as_secs_f64());
        match delivery {
            Delivery::Sent { .. } => self.sent.inc(),
            Delivery::Retry { .. } => self.retried.inc(),
            Delivery::Failed { .. } => self.failed.inc(),
            Delivery::Unsent => self.returned.inc(),
            // Never requested: counted when recorded (see `outcomes`).
            Delivery::Expired => 0,
        };
    }

    pub fn set_circuit(&self, state: crate::circuit::State) {
        use crate::circuit::State;
        self.circuit_state.set(match state {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        });
    }

    pub fn set_queue_depth(&self, pending: i64, sending: i64) {
        for (status, n) in [("pending", pending), ("sending", sending)] {
            self.set_depth(status, n);
        }
    }

    pub fn set_depth(&self, status: &str, n: i64) {
        self.queue_depth
            .get_or_create(&vec![("status".to_owned(), status.to_owned())])
            .set(n);
    }

    /// Whether the ended rows are due to be counted again (at most every `period`); claims the
    /// next count for the caller.
    pub fn ended_count_due(&self, period: Duration) -> bool {
        let mut at = self
            .ended_counted_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if at.is_some_and(|t| t.elapsed() < period) {
            return false;
        }
        *at = Some(Instant::now());
        true
    }

    /// Counts rows deleted by retention.
    pub fn pruned(&self, status: &str, n: u64) {
        self.pruned
            .get_or_create(&vec![("status".to_owned(), status.to_owned())])
            .inc_by(n);
    }

    /// Counts one answered API request; `route` is `unmatched` for unknown paths.
    pub fn observe_http(&self, route: &'static str, method: &'static str, status: u16) {
        self.http_requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("method", method.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
