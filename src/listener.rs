//! Continuous mode's doorbell: a dedicated PostgreSQL connection LISTENing for the insert
//! trigger's NOTIFY, so an idle scheduler sleeps instead of polling.
//!
//! A LISTEN connection that dies silently is the classic failure of PostgreSQL-backed queues, so
//! this thread proves it is alive with a heartbeat query every second. The scheduler trusts it
//! only while that heartbeat is fresh, and polls meanwhile; after every (re)connect it rings
//! once, since anything may have arrived while nobody listened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::backoff::Backoff;
use crate::pg::Client;
use crate::shutdown::Shutdown;
use crate::store::{Store, NOTIFY_CHANNEL};

const HEARTBEAT: Duration = Duration::from_secs(1);
/// The listener counts as alive this long after its last successful heartbeat.
const STALE_AFTER: Duration = Duration::from_millis(2500);

pub struct Listener {
    wakeups: Receiver<()>,
    origin: Instant,
    /// Milliseconds after `origin` of the last proof of life; 0 = never.
    heartbeat_ms: Arc<AtomicU64>,
}

impl Listener {
    pub fn start(store: Store, shutdown: Shutdown) -> std::io::Result<Listener> {
        let (ring, wakeups) = crossbeam_channel::bounded(1);
        let origin = Instant::now();
        let heartbeat_ms = Arc::new(AtomicU64::new(0));
        let beat = heartbeat_ms.clone();
        std::thread::Builder::new()
            .name("listener".into())
            .spawn(move || listen(store, ring, origin, beat, shutdown))?;
        Ok(Listener {
            wakeups,
            origin,
            heartbeat_ms,
        })
    }

    pub fn wakeups(&self) -> &Receiver<()> {
        &self.wakeups
    }

    pub fn alive(&self) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        last != 0
            && self.origin.elapsed().as_millis() as u64 <= last + STALE_AFTER.as_millis() as u64
    }
}

fn ring(ring: &Sender<()>) {
    // A full channel already holds a wake-up: one is as good as many.
    if let Err(TrySendError::Disconnected(_)) = ring.try_send(()) {}
}

fn listen(
    store: Store,
    bell: Sender<()>,
    origin: Instant,
    beat: Arc<AtomicU64>,
    shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mark = || {
        beat.store(
            origin.elapsed().as_millis().max(1) as u64,
            Ordering::Relaxed,
        )
    };
    while !shutdown.is_triggered() {
        let mut client = match connect(&store) {
            Ok(client) => client,
            Err(e) => {
                let wait = backoff.fail();
                log::warn!(error = e.to_string().as_str(), retry_in = crate::config::fmt_duration(wait).as_str(); "Cannot LISTEN for new messages, polling meanwhile");
                shutdown.sleep(wait);
                continue;
            }
        };
        if backoff.failing() {
            log::info!("Listening for new messages again");
        }
        backoff.succeed();
        mark();
        ring(&bell);
        let broken = loop {
            if shutdown.is_triggered() {
                return;
            }
            let failed = loop {
                match client.next_notification(HEARTBEAT) {
                    // Ring at once: waiting for a quiet second first would delay every
                    // message by a second, and forever under a steady stream of inserts.
                    // A notification is proof of life too.
                    Ok(Some(_)) => {
                        mark();
                        ring(&bell);
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            if let Some(e) = failed {
                break crate::error::Error::from(e).to_string();
            }
            // Bounded by the connection's deadline: a silent path ends here within
            // QUERY_DEADLINE and we reconnect.
            match client.batch_execute("SELECT 1") {
                Ok(_) => mark(),
                Err(e) => break crate::error::Error::from(e).to_string(),
            }
        };
        beat.store(0, Ordering::Relaxed);
        log::warn!(error = broken.as_str(); "Lost the LISTEN connection, reconnecting; polling meanwhile");
        shutdown.sleep(backoff.fail());
    }
}

fn connect(store: &Store) -> Result<Client, crate::error::Error> {
    let mut client = store.connect_for("listener")?;
    client.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))?;
    Ok(client)
}
