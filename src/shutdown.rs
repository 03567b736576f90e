//! Graceful shutdown as a value every thread can hold.
//!
//! SIGINT/SIGTERM trip it once. Threads that sleep select on [`Shutdown::signalled`], a channel
//! that closes when the shutdown starts, so nobody has to poll a flag to notice it promptly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    triggered: AtomicBool,
    /// Dropped on trigger, which disconnects every clone of `closed`.
    sender: Mutex<Option<Sender<()>>>,
    closed: Receiver<()>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (sender, closed) = crossbeam_channel::bounded(0);
        Shutdown {
            inner: Arc::new(Inner {
                triggered: AtomicBool::new(false),
                sender: Mutex::new(Some(sender)),
                closed,
            }),
        }
    }

    /// Trips the shutdown on SIGINT and SIGTERM.
    pub fn on_signals(&self) -> Result<(), crate::error::Error> {
        let shutdown = self.clone();
        ctrlc::set_handler(move || {
            if !shutdown.is_triggered() {
                log::info!("Shutdown requested, finishing in-flight messages");
                crate::notify::stopping();
            }
            shutdown.trigger();
        })
        .map_err(|e| crate::error::Error::Other(format!("cannot install signal handler: {e}")))
    }

    pub fn trigger(&self) {
        self.inner.triggered.store(true, Ordering::SeqCst);
        self.inner
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// A channel that never delivers a message and disconnects once the shutdown starts: put it
    /// in a `select!` beside the channel a thread actually waits on.
    pub fn signalled(&self) -> &Receiver<()> {
        &self.inner.closed
    }

    /// Sleeps up to `d`; returns early (true) when the shutdown starts.
    pub fn sleep(&self, d: std::time::Duration) -> bool {
        let _ = self.inner.closed.recv_timeout(d);
        self.is_triggered()
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}
