//! Leadership: which instance may send, and until when.
//!
//! With DISTRIBUTED_LOCK_ENABLED a Redis key holds the leader's random token (`SET NX PX`). The
//! holder knows the latest instant its lease could have expired — measured from *before* the
//! Redis call, on a clock that keeps counting while the machine is suspended, less a safety
//! margin — and publishes it as a [`Permit`] that workers check before every request. Each acquisition also starts a new leadership epoch
//! in PostgreSQL, which fences the writes of a holder that was replaced without knowing it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Connection, Script};

use crate::backoff::Backoff;
use crate::clock::BootInstant;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::Store;

/// Extends the key's life only while it still holds our token.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Deletes the key only while it still holds our token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0";

/// Longest pause between acquisitions while PostgreSQL cannot start an epoch.
const EPOCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Until when this instance may send, shared by the scheduler and the workers, and how many
/// of its webhook requests are running.
///
/// A request starts only if it can end (WEBHOOK_TIMEOUT) before the lease could expire, so no
/// request of a holder is still running once another instance may hold the key; and the lease
/// is given back only once none is running.
pub struct Permit {
    /// On the [`BootInstant`] clock, in milliseconds; 0 = revoked, u64::MAX = unlimited.
    deadline_ms: AtomicU64,
    /// The longest a request can take (WEBHOOK_TIMEOUT).
    request_bound: Duration,
    running: AtomicUsize,
}

/// One running webhook request; dropping it ends it.
pub struct Request<'a> {
    permit: &'a Permit,
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        self.permit.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Permit {
    pub fn revoked(request_bound: Duration) -> Arc<Permit> {
        Arc::new(Permit {
            deadline_ms: AtomicU64::new(0),
            request_bound,
            running: AtomicUsize::new(0),
        })
    }

    pub fn unlimited(request_bound: Duration) -> Arc<Permit> {
        let permit = Permit::revoked(request_bound);
        permit.deadline_ms.store(u64::MAX, Ordering::SeqCst);
        permit
    }

    /// True while the lease cannot have expired yet.
    pub fn allows(&self) -> bool {
        self.allows_for(Duration::ZERO)
    }

    /// True while a whole request started now would end before the lease could expire.
    pub fn allows_request(&self) -> bool {
        self.allows_for(self.request_bound)
    }

    fn allows_for(&self, d: Duration) -> bool {
        let deadline = self.deadline_ms.load(Ordering::SeqCst);
        deadline == u64::MAX || (BootInstant::now() + d).as_millis() < deadline
    }

    /// Starts a request if one may start now. The count goes up before the deadline is read, and
    /// [`Permit::revoke`] stores the deadline before reading the count (both sequentially
    /// consistent): either the revoker sees this request, or this request sees the revocation.
    pub fn begin_request(&self) -> Option<Request<'_>> {
        self.running.fetch_add(1, Ordering::SeqCst);
        let request = Request { permit: self };
        self.allows_request().then_some(request)
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Waits until no request is running or `until` passes; true when none is running.
    pub fn wait_idle(&self, until: BootInstant) -> bool {
        while self.running() > 0 {
            if BootInstant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn grant_until(&self, deadline: BootInstant) {
        self.deadline_ms
            .store(deadline.as_millis().max(1), Ordering::SeqCst);
    }

    fn revoke(&self) {
        self.deadline_ms.store(0, Ordering::SeqCst);
    }
}

/// The Redis side of the lease.
struct Lease {
    redis: crate::connect::Redis,
    conn: Option<Connection>,
    key: String,
    token: String,
    ttl: Duration,
    io_timeout: Duration,
    extend: Script,
    release: Script,
}

impl Lease {
    fn connection(&mut self) -> Result<&mut Connection, Error> {
        if self.conn.is_none() {
            self.conn = Some(self.redis.connect(self.io_timeout)?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Runs a Redis call, dropping the connection if it fails so the next call reconnects.
    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut Lease, &mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, Error> {
        self.connection()?;
        let mut conn = self.conn.take().expect("connected above");
        let result = f(self, &mut conn);
        if result.is_ok() {
            self.conn = Some(conn);
        }
        Ok(result?)
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Takes the key if free, or confirms it is still ours (after a Redis hiccup).
    fn acquire(&mut self) -> Result<bool, Error> {
        let ttl = self.ttl_ms();
        self.call(|l, c| {
            let set: Option<String> = redis::cmd("SET")
                .arg(&l.key)
                .arg(&l.token)
                .arg("NX")
                .arg("PX")
                .arg(ttl)
                .query(c)?;
            if set.is_some() {
                return Ok(true);
            }
            let still_ours: i64 = l.extend.key(&l.key).arg(&l.token).arg(ttl).invoke(c)?;
            Ok(still_ours == 1)
        })
    }

    fn extend(&mut self) -> Result<bool, Error> {
        let ttl = self.ttl_ms();
        self.call(|l, c| {
            let n: i64 = l.extend.key(&l.key).arg(&l.token).arg(ttl).invoke(c)?;
            Ok(n == 1)
        })
    }

    fn release(&mut self) -> Result<bool, Error> {
        self.call(|l, c| {
            let n: i64 = l.release.key(&l.key).arg(&l.token).invoke(c)?;
            Ok(n == 1)
        })
    }
}

/// What the scheduler asks each turn: may I claim, and under which epoch?
pub struct Leadership {
    lease: Option<Lease>,
    permit: Arc<Permit>,
    epoch: Option<i64>,
    leading: bool,
    /// The latest moment our lease could expire, while we may still own the key in Redis (so
    /// shutdown should release it).
    deadline: Option<BootInstant>,
    next_tick: Instant,
    extend_every: Duration,
    retry_every: Duration,
    margin: Duration,
    /// Whether the last Redis call worked, so that an outage is warned about once.
    redis_ok: bool,
    /// Paces acquisitions while PostgreSQL cannot start an epoch, so that a standby does not
    /// take the key, fail and give it back every retry period for as long as the outage lasts.
    epoch_backoff: Backoff,
    held_since: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl Leadership {
    pub fn new(
        config: &Config,
        instance_id: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Leadership, Error> {
        if !config.lock_enabled {
            return Ok(Leadership {
                lease: None,
                permit: Permit::unlimited(config.webhook_timeout),
                epoch: None,
                leading: true,
                deadline: None,
                next_tick: Instant::now(),
                extend_every: Duration::MAX,
                retry_every: Duration::MAX,
                margin: Duration::ZERO,
                redis_ok: true,
                epoch_backoff: Backoff::new(Duration::ZERO, Duration::ZERO),
                held_since: None,
                metrics,
            });
        }
        let redis = crate::connect::Redis::new(&config.redis)?;
        let token = format!("{instance_id}:{:032x}", rand::random::<u128>());
        Ok(Leadership {
            lease: Some(Lease {
                redis,
                conn: None,
                key: config.lock_key.clone(),
                token,
                ttl: config.lock_ttl,
                io_timeout: (config.lock_ttl / 6)
                    .clamp(Duration::from_millis(100), Duration::from_secs(2)),
                extend: Script::new(EXTEND),
                release: Script::new(RELEASE),
            }),
            permit: Permit::revoked(config.webhook_timeout),
            epoch: None,
            leading: false,
            deadline: None,
            next_tick: Instant::now(),
            extend_every: config.lease_extend_period(),
            retry_every: config.lease_retry_period(),
            margin: config.lease_margin(),
            redis_ok: true,
            epoch_backoff: Backoff::new(
                config.lease_retry_period(),
                config.lease_retry_period().max(EPOCH_RETRY_MAX),
            ),
            held_since: None,
            metrics,
        })
    }

    pub fn permit(&self) -> Arc<Permit> {
        self.permit.clone()
    }

    pub fn enabled(&self) -> bool {
        self.lease.is_some()
    }

    /// True while this instance may claim: it holds the lease with time left for a request.
    pub fn leading(&self) -> bool {
        self.leading && self.permit.allows_request()
    }

    /// True while this instance holds the lease (or needs none), whether or not a request
    /// would still fit.
    pub fn holding(&self) -> bool {
        self.leading && self.permit.allows()
    }

    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    /// When the scheduler should call [`Leadership::tick`] next.
    pub fn next_tick(&self) -> Instant {
        if self.lease.is_none() {
            // Nothing to keep: never the reason to wake up.
            return Instant::now() + Duration::from_secs(3600);
        }
        match self.deadline {
            Some(deadline) if self.leading => {
                let left = deadline.saturating_duration_since(BootInstant::now());
                self.next_tick.min(Instant::now() + left)
            }
            _ => self.next_tick,
        }
    }

    /// Acquires, extends or notices the loss of the lease, as due.
    pub fn tick(&mut self, store: &mut Store) {
        if self.lease.is_none() {
            return;
        }
        if self.leading && self.deadline.is_some_and(|d| BootInstant::now() >= d) {
            self.lose("the lease could have expired before it was extended");
            return;
        }
        let now = Instant::now();
        if now < self.next_tick {
            return;
        }
        if self.leading {
            self.extend();
        } else {
            self.next_tick = now + self.retry_every;
            self.acquire(store);
        }
    }

    fn lease(&mut self) -> &mut Lease {
        self.lease.as_mut().expect("only called with a lease")
    }

    fn key(&self) -> String {
        self.lease
            .as_ref()
            .map_or_else(String::new, |l| l.key.clone())
    }

    fn extend(&mut self) {
        let started = (Instant::now(), BootInstant::now());
        let result = self.lease().extend();
        self.redis_ok = result.is_ok();
        match result {
            Ok(true) => {
                self.metrics.lock_extensions.inc();
                self.set_deadline(started.1);
                self.next_tick = started.0 + self.extend_every;
                log::debug!(key = self.key().as_str(), epoch = self.epoch.unwrap_or(0); "Lock extended");
            }
            Ok(false) => {
                self.metrics.lock_extension_failures.inc();
                self.lose("another instance holds the key");
            }
            Err(e) => {
                // Redis did not answer: the key may well still be ours until the deadline.
                // Keep sending until then (the tick gives up at the deadline) and try again
                // soon, rather than stop everything for a retry period over one hiccup.
                self.metrics.lock_extension_failures.inc();
                let retry = (self.extend_every / 4).max(Duration::from_millis(10));
                self.next_tick = started.0 + retry;
                log::warn!(
                    key = self.key().as_str(), error = e.to_string().as_str(),
                    retry_in = crate::config::fmt_duration(retry).as_str();
                    "Cannot extend the lock, retrying"
                );
            }
        }
    }

    fn ttl(&self) -> Duration {
        self.lease.as_ref().map_or(Duration::ZERO, |l| l.ttl)
    }

    fn acquire(&mut self, store: &mut Store) {
        let started = (Instant::now(), BootInstant::now());
        let result = self.lease().acquire();
        let was_ok = std::mem::replace(&mut self.redis_ok, result.is_ok());
        match result {
            Ok(true) => match self.epoch_to_hold(store, started.1) {
                // PostgreSQL answered so late that the lease could have expired meanwhile:
                // leading now would only last until the next tick. Step back like any failed
                // start (a raised epoch was raised in time; it fences nobody who held a key).
                Ok(_) if BootInstant::now() >= started.1 + self.ttl() - self.margin => {
                    self.epoch_failed(
                        started.1,
                        "PostgreSQL answered after the lease could have expired",
                    );
                }
                Ok(epoch) => {
                    self.epoch_backoff.succeed();
                    self.epoch = Some(epoch);
                    self.leading = true;
                    self.held_since = Some(started.0);
                    self.metrics.lock_acquisitions.inc();
                    self.metrics.lock_held.set(1);
                    self.metrics.epoch.set(epoch);
                    self.set_deadline(started.1);
                    self.next_tick = started.0 + self.extend_every;
                    log::info!(key = self.key().as_str(), epoch = epoch; "Lock acquired");
                }
                Err(e) => self.epoch_failed(started.1, &e.to_string()),
            },
            Ok(false) => {
                self.metrics.lock_acquire_failures.inc();
                log::debug!("Another instance is processing, skipping this cycle");
            }
            Err(e) => {
                self.metrics.lock_acquire_failures.inc();
                if was_ok {
                    log::warn!(error = e.to_string().as_str(); "Redis unavailable, cannot take the lock");
                }
            }
        }
    }

    /// Without a new epoch our writes would be fenced anyway: step back, and try again only
    /// after a growing pause (PostgreSQL is probably down or overloaded).
    fn epoch_failed(&mut self, started: BootInstant, error: &str) {
        self.metrics.lock_acquire_failures.inc();
        let wait = self.epoch_backoff.fail();
        self.next_tick = self.next_tick.max(Instant::now() + wait);
        log::warn!(
            error = error,
            retry_in = crate::config::fmt_duration(wait).as_str();
            "Cannot start a leadership epoch, releasing the lock"
        );
        // The key may have been ours all along (taken back after a Redis error), with requests
        // of the earlier holding still running: the key goes only once they have ended.
        self.deadline = Some(started + self.ttl() - self.margin);
        self.release(BootInstant::now() + self.ttl());
    }

    /// The epoch to lead under: ours again when PostgreSQL still shows it (nobody has led since
    /// we lost the key, e.g. to a Redis hiccup, so our in-flight outcomes stay valid), else a
    /// new one. Anyone else who led in between had to raise the epoch before writing.
    ///
    /// The epoch is raised only while the lease just taken (at `started`) cannot have expired:
    /// a statement stuck on a silent path must not raise it after another instance took over.
    fn epoch_to_hold(&self, store: &mut Store, started: BootInstant) -> Result<i64, Error> {
        if let Some(mine) = self.epoch {
            if store.state()?.epoch == mine {
                return Ok(mine);
            }
        }
        let lease = self.lease.as_ref().expect("only with a lease");
        store.begin_epoch(started + lease.ttl - self.margin)
    }

    fn set_deadline(&mut self, started: BootInstant) {
        let lease = self.lease.as_ref().expect("only with a lease");
        let deadline = started + lease.ttl - self.margin;
        self.deadline = Some(deadline);
        self.permit.grant_until(deadline);
    }

    /// PostgreSQL shows a newer epoch than ours: another instance took over while we believed we
    /// led (a pause, or a Redis that lost our key). Stop at once.
    pub fn fenced(&mut self, current: i64) {
        let reason = format!(
            "leadership epoch {} was superseded by {current}",
            self.epoch.unwrap_or(0)
        );
        self.lose(&reason);
    }

    fn lose(&mut self, reason: &str) {
        self.metrics.lock_losses.inc();
        self.stop_holding();
        // Retry soon: if the key is still ours (a Redis hiccup), we take it back at once.
        self.next_tick = Instant::now() + self.retry_every;
        let key = self.lease.as_ref().map_or("", |l| l.key.as_str());
        log::warn!(key = key, reason = reason; "Lock lost");
    }

    fn stop_holding(&mut self) {
        self.permit.revoke();
        self.leading = false;
        if let Some(since) = self.held_since.take() {
            self.metrics
                .lock_held_seconds
                .inc_by(since.elapsed().as_secs_f64());
        }
        self.metrics.lock_held.set(0);
        self.metrics.epoch.set(0);
    }

    /// Hands the lease over while this instance cannot do the leader's work (its database is
    /// unreachable): a standby that can reach PostgreSQL takes it at its next try.
    pub fn step_down(&mut self, reason: &str) {
        if !self.leading || self.lease.is_none() {
            return;
        }
        log::warn!(key = self.key().as_str(), reason = reason; "Stepping down as leader");
        let deadline = self.deadline.unwrap_or_else(BootInstant::now);
        self.release(deadline);
        // Taking it straight back would only fail again at the epoch; wait a retry period.
        self.next_tick = Instant::now() + self.retry_every;
    }

    /// Gives the lease up (shutdown, step-down), if we may still hold it, once none of our
    /// requests is running: until then the key must keep standbys out. Requests end before
    /// the lease could expire (see [`Permit`]), so this waits at most until then, or until
    /// `give_up_at`, after which the key is left to expire by itself.
    pub fn release(&mut self, give_up_at: BootInstant) {
        self.stop_holding();
        let Some(deadline) = self.deadline.take() else {
            return;
        };
        if self.lease.is_none() {
            return;
        }
        let key = self.key();
        if !self.permit.wait_idle(deadline.min(give_up_at)) {
            log::warn!(
                key = key.as_str(), running = self.permit.running();
                "Requests still running when the lease could expire; leaving the lock to expire"
            );
            return;
        }
        match self.lease().release() {
            Ok(true) => log::info!(key = key.as_str(); "Lock released"),
            Ok(false) => {
                log::debug!(key = key.as_str(); "Lock was no longer ours at release")
            }
            Err(e) => {
                log::warn!(key = key.as_str(), error = e.to_string().as_str(); "Cannot release the lock; it expires by itself")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_starts_only_if_it_ends_before_the_deadline() {
        let permit = Permit::revoked(Duration::from_secs(2));
        assert!(permit.begin_request().is_none());
        assert_eq!(permit.running(), 0);
        permit.grant_until(BootInstant::now() + Duration::from_secs(1));
        assert!(permit.allows());
        assert!(!permit.allows_request());
        assert!(permit.begin_request().is_none());
        permit.grant_until(BootInstant::now() + Duration::from_secs(3));
        let request = permit.begin_request().expect("2s fit in 3s");
        assert_eq!(permit.running(), 1);
        permit.revoke();
        assert!(!permit.wait_idle(BootInstant::now() + Duration::from_millis(30)));
        drop(request);
        assert!(permit.wait_idle(BootInstant::now()));
    }

    #[test]
    fn without_a_lease_requests_always_start() {
        let permit = Permit::unlimited(Duration::from_secs(3600));
        assert!(permit.allows_request());
        let _a = permit.begin_request().unwrap();
        let _b = permit.begin_request().unwrap();
        assert_eq!(permit.running(), 2);
    }
}
