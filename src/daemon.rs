//! `serve`: wires the threads together and runs until SIGINT/SIGTERM.
//!
//! ```text
//!  PostgreSQL ──claim──▶ scheduler ──jobs──▶ workers ──POST──▶ webhook
//!      ▲                    │  ▲                │
//!      └──record outcomes───┘  └───outcomes─────┘
//!  Redis ◀──lease── scheduler          tiny_http ──▶ /health, API, /metrics
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::Api;
use crate::circuit::Circuit;
use crate::config::{fmt_duration, Config};
use crate::error::Error;
use crate::lease::Leadership;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::rate::RateLimit;
use crate::retention::Retention;
use crate::scheduler::{Parts, Scheduler};
use crate::shutdown::Shutdown;
use crate::status::{new_instance_id, Status};
use crate::store::Store;
use crate::webhook::Webhook;
use crate::{notify, store, worker};

/// Kept from the stop bound (at most a tenth of it) for what follows giving up on the
/// scheduler: stopping the API, the last log line, the exit.
const EXIT_MARGIN: Duration = Duration::from_millis(250);

pub fn serve(config: &Config) -> Result<(), Error> {
    let webhook_url = config.require_webhook()?;
    let shutdown = Shutdown::new();
    shutdown.on_signals()?;
    raise_open_files_limit(config.worker_count);

    let instance_id = new_instance_id();
    let mut store = Store::new(config.postgres()?, &instance_id);
    // The signal handlers are in place: a SIGTERM while another instance migrates (or between
    // two migrations) stops here, with nothing started yet.
    if !migrate_until(&mut store, &shutdown)? || shutdown.is_triggered() {
        log::info!("Message dispatcher stopped");
        return Ok(());
    }
    store_message_ttl(&mut store, config.message_ttl)?;

    let metrics = Arc::new(Metrics::new());
    let leadership = Leadership::new(config, &instance_id, metrics.clone())?;
    let circuit = Arc::new(Circuit::new(
        config.webhook_circuit_threshold,
        config.retry_max_delay,
        metrics.clone(),
    ));
    let status = Arc::new(Status::new(
        &instance_id,
        config.lock_enabled,
        leadership.permit(),
        circuit.clone(),
    ));

    let capacity = 2 * config.batch_size as usize;
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(capacity);
    let (outcomes_tx, outcomes_rx) = crossbeam_channel::bounded(capacity);
    let rate_limit = config
        .webhook_rate_limit
        .map(|r| Arc::new(RateLimit::new(r)));
    let workers = worker::Worker {
        webhook: Arc::new(Webhook::new(config, webhook_url)?),
        permit: leadership.permit(),
        circuit: circuit.clone(),
        rate_limit: rate_limit.clone(),
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
    };
    worker::start(config.worker_count, workers, jobs_rx, outcomes_tx)?;
    let listener = if config.continuous() {
        let listen_store = Store::new(config.postgres()?, &instance_id);
        Some(Listener::start(listen_store, shutdown.clone())?)
    } else {
        None
    };
    let api = Api::start(config, status.clone(), metrics.clone())?;
    // Stops on its own with the shutdown; a statement in progress ends within its deadline.
    Retention::start(config, status.clone(), metrics.clone(), shutdown.clone())?;

    log::info!(
        instance_id = instance_id.as_str(),
        webhook = crate::config::redact_url(webhook_url.as_str()).as_str(),
        interval = fmt_duration(config.processing_interval).as_str(),
        batch_size = config.batch_size,
        workers = config.worker_count,
        lock_enabled = config.lock_enabled;
        "Message dispatcher started"
    );
    notify::ready();

    let scheduler = Scheduler::new(
        config,
        Parts {
            store,
            leadership,
            jobs: jobs_tx,
            outcomes: outcomes_rx,
            listener,
            shutdown: shutdown.clone(),
            metrics,
            status,
            circuit,
            rate_limit,
        },
    );
    let (finished, scheduler_done) = crossbeam_channel::bounded::<()>(1);
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            scheduler.run();
            let _ = finished.send(());
        })?;

    // The scheduler returns once the shutdown has started and it has drained (bounded by
    // MAX_PROCESSING_TIME). A worker still inside a request by then is not waited for: its
    // message stays `sending` and comes back through crash recovery.
    crossbeam_channel::select! {
        recv(scheduler_done) -> _ => {}
        recv(shutdown.signalled()) -> _ => {}
    }
    // The whole stop takes at most MAX_PROCESSING_TIME + WEBHOOK_TIMEOUT from the signal. Only
    // a scheduler stuck in a call on a silent path can overrun that — a PostgreSQL statement
    // (each ends within QUERY_DEADLINE, which may be longer) or a Redis lookup through hung
    // Sentinels (each step ends within the lease's I/O timeout): then stop waiting for it.
    let bound = config.max_processing_time + config.webhook_timeout;
    let margin = EXIT_MARGIN.min(bound / 10);
    let stop_by = Instant::now() + bound - margin / 2;
    if scheduler_done
        .recv_timeout(bound - margin)
        .is_err_and(|e| e.is_timeout())
    {
        log::warn!(
            bound = fmt_duration(bound).as_str();
            "Stopping without the scheduler, still waiting on PostgreSQL or Redis: messages it claimed and has not recorded stay sending until crash recovery returns them, and its lease expires after the TTL"
        );
    }
    api.stop(stop_by);
    log::info!("Message dispatcher stopped");
    Ok(())
}

/// Stores MESSAGE_TTL for the insert trigger: it is cluster-wide, so the last instance to start
/// sets it for all; a different value replaced is worth a warning.
fn store_message_ttl(store: &mut Store, ttl: Option<std::time::Duration>) -> Result<(), Error> {
    let shown = |ttl: Option<std::time::Duration>| ttl.map_or("<unset>".into(), fmt_duration);
    let before = store.set_message_ttl(ttl)?;
    // PostgreSQL keeps microseconds.
    let micros = |ttl: Option<std::time::Duration>| ttl.map(|d| d.as_micros());
    if micros(before) != micros(ttl) {
        let was_unset = before.is_none();
        let (before, now) = (shown(before), shown(ttl));
        let msg =
            "MESSAGE_TTL changed for every instance: rows inserted from now on get the new value";
        if was_unset {
            log::info!(before = before.as_str(), now = now.as_str(); "{msg}");
        } else {
            // Another instance (or an earlier start) had another value: instances disagree.
            log::warn!(before = before.as_str(), now = now.as_str(); "{msg}");
        }
    } else {
        log::debug!(ttl = shown(ttl).as_str(); "MESSAGE_TTL unchanged");
    }
    Ok(())
}

/// Applies pending migrations and says which.
pub fn migrate(store: &mut Store) -> Result<(), Error> {
    migrate_until(store, &Shutdown::new()).map(|_| ())
}

/// The same, giving up while it waits for another instance's migrations once `shutdown`
/// starts (false then).
pub fn migrate_until(store: &mut Store, shutdown: &Shutdown) -> Result<bool, Error> {
    let Some(applied) = store.migrate(shutdown)? else {
        return Ok(false);
    };
    for version in &applied {
        log::info!(version = *version; "Migration applied");
    }
    if applied.is_empty() {
        log::debug!(channel = store::NOTIFY_CHANNEL; "Schema up to date");
    }
    Ok(true)
}

/// Every worker keeps a connection to the receiver open (and the agent may keep as many again
/// idle), and Rust, unlike Go, leaves the open-files limit where it found it: systemd starts
/// services with a soft limit of 1,024, too few for WORKER_COUNT=1024. Like Go's runtime, raise
/// the soft limit to the hard one; say so when even that is short of what the workers may need.
fn raise_open_files_limit(workers: u32) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // A connection per worker and as many idle, plus PostgreSQL, Redis, the API and files.
    let needed = u64::from(workers) * 2 + 64;
    if limit.rlim_cur < needed {
        log::warn!(
            limit = limit.rlim_cur, needed = needed, worker_count = workers;
            "Open files limit is low for WORKER_COUNT: raise LimitNOFILE (systemd) or ulimit -n"
        );
    }
}
