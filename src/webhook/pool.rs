//! The webhook's idle connections, kept for reuse in place of ureq's own pool.
//!
//! ureq's pool is one lock under which every checkout walks all idle connections (twice,
//! comparing each one's scheme and host) and probes the one it picks with three system calls;
//! every return walks them again. With hundreds of workers whose answers come back together,
//! they queue on that lock: at WORKER_COUNT=1024 the walk was the daemon's busiest code. Here
//! a checkout pops the connection used last and a return pushes it, constant work under the
//! lock, and the probe runs outside it.
//!
//! ureq is told to keep nothing, so a connection it would have kept is dropped as soon as it
//! decides so; it decides only after its probe found the connection open ([`Transport::is_open`],
//! called for nothing else while its pool is empty), and that is what brings a connection back
//! here. A connection ureq closes (an answer with `Connection: close`, a body not read to its
//! end, an error) never had that probe and is closed with it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ureq::http::uri::{Authority, Scheme};
use ureq::http::Uri;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, NextTimeout, ShutdownHandle, Transport,
};

/// A connector chain whose connections to the webhook's host are reused.
#[derive(Debug)]
pub struct Pooled<C> {
    chain: C,
    /// The webhook's scheme and host: the only connections kept. (A CONNECT proxy's own
    /// connection is made through this connector too, and must not be taken for one.)
    target: Option<(Scheme, Authority)>,
    idle: Arc<Idle>,
}

impl<C> Pooled<C> {
    /// Keeps connections to `webhook`'s host, at most `max_idle` of them, each for at most
    /// `max_age` after its last use.
    pub fn new(chain: C, (webhook, max_idle, max_age): (Option<&Uri>, usize, Duration)) -> Self {
        let target =
            webhook.and_then(|uri| Some((uri.scheme()?.clone(), uri.authority()?.clone())));
        Pooled {
            chain,
            target,
            idle: Arc::new(Idle {
                connections: Mutex::new(VecDeque::new()),
                max_idle,
                max_age,
            }),
        }
    }

    fn is_target(&self, uri: &Uri) -> bool {
        self.target.as_ref().is_some_and(|(scheme, authority)| {
            uri.scheme() == Some(scheme) && uri.authority() == Some(authority)
        })
    }
}

impl<C: Connector> Connector for Pooled<C> {
    type Out = Reusable;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<Reusable>, ureq::Error> {
        let pooled = self.is_target(details.uri);
        if pooled {
            if let Some(transport) = self.idle.take() {
                return Ok(Some(Reusable::new(transport, Arc::downgrade(&self.idle))));
            }
        }
        // Sockets are not registered for `Agent::shutdown` (never called here: a shutdown
        // lets requests in flight finish): ureq would keep each in a list that every return
        // of a connection walks under its lock.
        let details = ConnectionDetails {
            addrs: details.addrs.clone(),
            current_time: details.current_time.clone(),
            run_connector: details.run_connector.clone(),
            register_shutdown: Arc::new(|_: Weak<dyn ShutdownHandle>| Ok(())),
            ..*details
        };
        let Some(transport) = self.chain.connect(&details, chained)? else {
            return Ok(None);
        };
        let home = if pooled {
            Arc::downgrade(&self.idle)
        } else {
            Weak::new()
        };
        Ok(Some(Reusable::new(transport.boxed(), home)))
    }
}

/// The idle connections, the one used last at the back.
struct Idle {
    connections: Mutex<VecDeque<(Instant, Box<dyn Transport>)>>,
    max_idle: usize,
    max_age: Duration,
}

impl fmt::Debug for Idle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idle")
            .field("max_idle", &self.max_idle)
            .finish()
    }
}

impl Idle {
    /// The connection used last, if it is still open (the receiver may have closed it while it
    /// was idle) and not older than `max_age`. Connections found closed or too old are closed.
    fn take(&self) -> Option<Box<dyn Transport>> {
        loop {
            let (since, mut transport) = self.lock().pop_back()?;
            if since.elapsed() > self.max_age {
                // The newest is too old, so are all the others.
                let stale = std::mem::take(&mut *self.lock());
                drop(stale);
                return None;
            }
            if transport.is_open() {
                return Some(transport);
            }
        }
    }

    /// Keeps `transport` for the next request; the oldest go when there are too many.
    fn put(&self, transport: Box<dyn Transport>) {
        let now = Instant::now();
        let mut evicted = Vec::new();
        {
            let mut idle = self.lock();
            idle.push_back((now, transport));
            while idle.len() > self.max_idle
                || idle
                    .front()
                    .is_some_and(|(since, _)| now.duration_since(*since) > self.max_age)
            {
                evicted.extend(idle.pop_front());
            }
        }
        // Closing sockets waits for no one, but not under the lock either.
        drop(evicted);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Box<dyn Transport>)>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection lent to ureq for one request; it comes back to [`Idle`] when ureq, after the
/// answer, found it open and let go of it.
pub struct Reusable {
    /// Always present until dropped.
    transport: Option<Box<dyn Transport>>,
    home: Weak<Idle>,
    /// Set by ureq's probe after the answer was read whole; any later I/O clears it.
    reusable: bool,
}

impl Reusable {
    fn new(transport: Box<dyn Transport>, home: Weak<Idle>) -> Self {
        Reusable {
            transport: Some(transport),
            home,
            reusable: false,
        }
    }

    fn inner(&mut self) -> &mut Box<dyn Transport> {
        self.transport
            .as_mut()
            .expect("a connection's transport is present until it is dropped")
    }
}

impl fmt::Debug for Reusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reusable")
            .field("transport", &self.transport)
            .field("reusable", &self.reusable)
            .finish()
    }
}

impl Transport for Reusable {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner().buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.reusable = false;
        self.inner().transmit_output(amount, timeout)
    }

    fn maybe_await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.reusable = false;
        self.inner().maybe_await_input(timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.reusable = false;
        self.inner().await_input(timeout)
    }

    fn is_open(&mut self) -> bool {
        self.reusable = self.inner().is_open();
        self.reusable
    }

    fn is_tls(&self) -> bool {
        self.transport.as_ref().is_some_and(|t| t.is_tls())
    }
}

impl Drop for Reusable {
    fn drop(&mut self) {
        if !self.reusable {
            return;
        }
        if let (Some(transport), Some(idle)) = (self.transport.take(), self.home.upgrade()) {
            idle.put(transport);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use url::Url;

    use crate::config::Config;
    use crate::message::{Claimed, Delivery};
    use crate::webhook::Webhook;

    /// How the receiver treats a connection after answering on it.
    #[derive(Clone, Copy)]
    enum After {
        KeepAlive,
        /// Closes it at once (as a server whose keep-alive timeout ran out would, later).
        Close,
        /// Says `Connection: close` but leaves the socket open: reusing it would hang.
        SayCloseStayOpen,
    }

    /// Connections the receiver accepted, and closed.
    #[derive(Default)]
    struct Counts {
        accepted: AtomicUsize,
        closed: AtomicUsize,
    }

    /// A receiver on a real socket answering 202 to every request.
    fn receiver(after: After) -> (Url, Arc<Counts>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}/hook", listener.local_addr().unwrap())).unwrap();
        let counts = Arc::new(Counts::default());
        let seen = counts.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                std::thread::spawn(move || {
                    serve(stream.unwrap(), after);
                    // The socket is closed by now: its FIN is on its way (on loopback, there).
                    seen.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (url, counts)
    }

    fn serve(stream: TcpStream, after: After) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        loop {
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            reader.read_exact(&mut vec![0; length]).unwrap();
            let connection = match after {
                After::SayCloseStayOpen => "Connection: close\r\n",
                _ => "",
            };
            let body = r#"{"messageId":"m"}"#;
            let answer = format!(
                "HTTP/1.1 202 Accepted\r\n{connection}Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            writer.write_all(answer.as_bytes()).unwrap();
            match after {
                After::KeepAlive => {}
                After::Close => return,
                After::SayCloseStayOpen => {
                    std::thread::sleep(Duration::from_secs(60));
                    return;
                }
            }
        }
    }

    fn sends(webhook: &Webhook) -> bool {
        let message = Claimed {
            id: 1,
            recipient: "+905550000001".into(),
            content: "hi".into(),
            attempts: 1,
            charged: 1,
            expires: None,
        };
        matches!(
            webhook.deliver(&message, false).delivery,
            Delivery::Sent { .. }
        )
    }

    fn webhook(url: &Url) -> Webhook {
        let vars = [
            ("WEBHOOK_URL".to_owned(), url.to_string()),
            ("WEBHOOK_TIMEOUT".to_owned(), "5s".to_owned()),
        ]
        .into();
        Webhook::new(&Config::from_vars(&vars).unwrap(), url).unwrap()
    }

    #[test]
    fn a_connection_is_reused_for_the_next_request() {
        let (url, counts) = receiver(After::KeepAlive);
        let webhook = webhook(&url);
        for _ in 0..5 {
            assert!(sends(&webhook));
        }
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_connection_the_receiver_closed_while_idle_is_not_used_again() {
        let (url, counts) = receiver(After::Close);
        let webhook = webhook(&url);
        assert!(sends(&webhook));
        let deadline = Instant::now() + Duration::from_secs(5);
        while counts.closed.load(Ordering::SeqCst) < 1 {
            assert!(Instant::now() < deadline, "the receiver never closed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            sends(&webhook),
            "the second request failed on the closed connection"
        );
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn an_answer_saying_connection_close_ends_the_connection() {
        let (url, counts) = receiver(After::SayCloseStayOpen);
        let webhook = webhook(&url);
        assert!(sends(&webhook));
        assert!(
            sends(&webhook),
            "the second request went to the connection said closed"
        );
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
    }
}
