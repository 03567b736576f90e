//! Retention: deletes `sent` rows older than SENT_RETENTION and `failed`/`expired`/`cancelled`
//! rows older than FAILED_RETENTION, with their attempt history (ON DELETE CASCADE).
//!
//! It runs on a thread of its own with its own PostgreSQL connection, so it never holds up the
//! scheduler's claims: each statement deletes at most [`BATCH`] rows (locking only those, and
//! skipping any a transaction holds), with a pause between statements. Only the instance that
//! sends prunes — the lease holder, or every instance when the lease is off — so a cluster does
//! the work once.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::{fmt_duration, Config};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::status::Status;
use crate::store::{Ended, Store};

/// Rows deleted per statement.
pub const BATCH: u32 = 1000;
/// Between two statements of one round: leaves the database to other work.
const PAUSE: Duration = Duration::from_millis(100);
/// Between two rounds once nothing was left to delete.
const PERIOD: Duration = Duration::from_secs(30);
/// How often a standby looks whether it leads now.
const STANDBY_CHECK: Duration = Duration::from_secs(1);
/// After a database error.
const ERROR_WAIT: Duration = Duration::from_secs(5);

pub struct Retention {
    store: Store,
    rules: Vec<(Ended, Duration)>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
}

impl Retention {
    /// Starts the thread; None when neither retention is set.
    pub fn start(
        config: &Config,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<Option<JoinHandle<()>>, Error> {
        let rules: Vec<(Ended, Duration)> = [
            (Ended::Sent, config.sent_retention),
            (Ended::Unsent, config.failed_retention),
        ]
        .into_iter()
        .filter_map(|(which, age)| age.map(|a| (which, a)))
        .collect();
        if rules.is_empty() {
            return Ok(None);
        }
        // Named message-dispatcher/<instance>/retention in pg_stat_activity.
        let name = format!("{}/retention", status.instance_id);
        let retention = Retention {
            store: Store::new(config.postgres()?, &name),
            rules,
            status,
            metrics,
            shutdown,
        };
        for (which, age) in &retention.rules {
            for status in which.statuses() {
                retention.metrics.pruned(status, 0);
            }
            log::info!(
                statuses = which.statuses().join(",").as_str(), older_than = fmt_duration(*age).as_str();
                "Retention enabled"
            );
        }
        let handle = std::thread::Builder::new()
            .name("retention".into())
            .spawn(move || retention.run())?;
        Ok(Some(handle))
    }

    fn run(mut self) {
        loop {
            let wait = if self.sends() {
                match self.round() {
                    Ok(_) => PERIOD,
                    Err(e) => {
                        log::warn!(error = e.to_string().as_str(); "Retention: database unavailable");
                        ERROR_WAIT
                    }
                }
            } else {
                STANDBY_CHECK
            };
            if self.shutdown.sleep(wait) {
                return;
            }
        }
    }

    /// Whether this instance is the one that sends.
    fn sends(&self) -> bool {
        !self.status.lock_enabled || self.status.holds_lock()
    }

    /// Deletes everything due, a batch at a time; stops early on shutdown or leadership lost.
    /// Returns how many rows.
    fn round(&mut self) -> Result<u64, Error> {
        let mut total = 0;
        for (which, age) in self.rules.clone() {
            loop {
                if self.shutdown.is_triggered() || !self.sends() {
                    return Ok(total);
                }
                let deleted = self.store.prune(which, age, BATCH)?;
                let mut full = false;
                for (status, n) in deleted {
                    if n > 0 {
                        self.metrics.pruned(status, n);
                        total += n;
                    }
                    full |= n >= u64::from(BATCH);
                }
                if !full {
                    break;
                }
                if self.shutdown.sleep(PAUSE) {
                    return Ok(total);
                }
            }
        }
        if total > 0 {
            log::info!(deleted = total; "Retention deleted old messages");
        }
        Ok(total)
    }
}
