//! The slow-receiver scenario (issue #14): a receiver that answers every request a fixed delay
//! after it arrived, over as many keep-alive connections as the daemon opens, and the daemon at
//! WORKER_COUNT 64 / 256 / 1,024 against delays of 50 / 100 / 250 ms. With one blocking request
//! per worker the ideal is WORKER_COUNT / delay messages per second; what the daemon reaches of
//! it, its peak RSS and its CPU per 1,000 messages are what is measured.
//!
//! The receiver is one event-loop thread in the bench process (mio, i.e. epoll), not a thread per
//! connection: it holds thousands of connections on one core's share, and its CPU is the bench
//! process's, never counted as the daemon's. Because the delay is fixed, answers fall due in the
//! order their requests were complete: one FIFO of (due, connection) and the poll's timeout until
//! its front is due are the whole timer.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use message_dispatcher::message::{Claimed, Delivery};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use crate::procs::{self, Daemon, DaemonSettings, Workdir};
use crate::report::{thousands, verdict};
use crate::{say, BenchDb, Result, Settings};

/// What the receiver answers, like the real webhook (and nginx in the other phases).
const RESPONSE: &str = concat!(
    "HTTP/1.1 202 Accepted\r\n",
    "Content-Type: application/json\r\n",
    "Content-Length: 42\r\n",
    "Connection: keep-alive\r\n",
    "\r\n",
    r#"{"message":"Accepted","messageId":"bench"}"#
);
const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// The receiver stands for a server on another machine: its thread runs at this nice value, so
/// that 1,024 daemon threads sharing the cores do not make it answer late (it needs little CPU).
const RECEIVER_NICE: libc::c_int = -10;
/// A request head this long without its end is not a webhook request.
const MAX_REQUEST: usize = 1 << 20;

/// The full run's combinations: (WORKER_COUNT, delay in ms).
const FULL: [(u32, u64); 9] = [
    (64, 50),
    (64, 100),
    (64, 250),
    (256, 50),
    (256, 100),
    (256, 250),
    (1024, 50),
    (1024, 100),
    (1024, 250),
];
/// The smoke run's one combination and its backlog: proves the scenario works, in ~1.5 s.
const SMOKE: (u32, u64, i32) = (8, 50, 200);
/// Each backlog lasts this long at the ideal rate (rounded up to whole rounds of WORKER_COUNT).
const STEADY: Duration = Duration::from_secs(6);
/// A run far below the ideal is cut at this multiple of its ideal time (plus a few seconds), so
/// that the phase stays within about three minutes whatever the daemon does.
const CUT_AFTER: f64 = 3.0;
/// How long the bare loop runs against each receiver.
const BARE_SECS: f64 = 4.0;
/// The targets of issue #14, measured against the 100 ms receiver.
const TARGET_DELAY_MS: u64 = 100;
const TARGET_RSS_MB: [(u32, f64); 2] = [(256, 32.0), (1024, 64.0)];
const TARGET_RATIO: f64 = 0.95;

/// What the receiver counted.
#[derive(Default)]
pub struct Counters {
    pub answered: AtomicU64,
    pub accepted: AtomicU64,
    pub open: AtomicU64,
    pub peak_open: AtomicU64,
    /// Requests that were not HTTP/1.1 with a Content-Length body (their connection is closed).
    pub bad: AtomicU64,
    /// accept() failures other than "nothing to accept" (e.g. EMFILE).
    pub accept_errors: AtomicU64,
    /// Answers that did not fit in the socket at once (written later, on WRITABLE).
    pub writes_blocked: AtomicU64,
    /// How late answers went out after they were due (the receiver's own lag), µs.
    pub late_us_sum: AtomicU64,
    pub late_us_max: AtomicU64,
    /// The client's turnaround: from an answer written to the next request complete on the same
    /// connection (the worker taking its next message and sending it, or waiting for one), µs.
    pub turnaround_us_sum: AtomicU64,
    pub turnaround_us_max: AtomicU64,
    pub turnarounds: AtomicU64,
    /// The event-loop thread runs at nice [`RECEIVER_NICE`] (root only).
    pub raised_priority: AtomicBool,
}

impl Counters {
    fn add(sum: &AtomicU64, max: &AtomicU64, d: Duration) {
        let us = d.as_micros() as u64;
        sum.fetch_add(us, Ordering::Relaxed);
        max.fetch_max(us, Ordering::Relaxed);
    }
}

/// The receiver: its event-loop thread, stopped (and joined) by [`SlowReceiver::stop`] or drop.
pub struct SlowReceiver {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    pub counters: Arc<Counters>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl SlowReceiver {
    pub fn start(delay: Duration) -> Result<SlowReceiver> {
        // std's and mio's bind listen with a backlog of 128: 1,024 workers connecting at once
        // would overflow it and wait a second for the SYN to be sent again.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        let std_listener: std::net::TcpListener = socket.into();
        let addr = std_listener.local_addr()?;
        let mut listener = TcpListener::from_std(std_listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut event_loop = EventLoop {
            poll,
            listener,
            conns: HashMap::new(),
            due: VecDeque::new(),
            next_token: 2,
            delay,
            counters: counters.clone(),
        };
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("slow-receiver".into())
            .spawn(move || {
                // SAFETY: plain syscalls about this thread.
                let raised = unsafe {
                    libc::setpriority(
                        libc::PRIO_PROCESS,
                        libc::gettid() as libc::id_t,
                        RECEIVER_NICE,
                    )
                } == 0;
                let c = &event_loop.counters;
                c.raised_priority.store(raised, Ordering::Relaxed);
                event_loop.run(&stopping)
            })?;
        Ok(SlowReceiver {
            addr,
            stop,
            waker,
            counters,
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    /// Stops the event loop; fails if it failed, or if it saw a request it could not parse or a
    /// connection it could not accept.
    pub fn stop(mut self) -> Result<Arc<Counters>> {
        self.halt()?;
        let c = &self.counters;
        let (bad, accept) = (
            c.bad.load(Ordering::Relaxed),
            c.accept_errors.load(Ordering::Relaxed),
        );
        if bad > 0 || accept > 0 {
            return Err(format!(
                "the slow receiver saw {bad} malformed requests and {accept} failed accepts"
            )
            .into());
        }
        Ok(self.counters.clone())
    }

    fn halt(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.store(true, Ordering::Relaxed);
        self.waker.wake()?;
        thread
            .join()
            .map_err(|_| "the slow receiver panicked")?
            .map_err(|e| format!("the slow receiver failed: {e}"))?;
        Ok(())
    }
}

impl Drop for SlowReceiver {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// One client connection.
struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet parsed into a complete request.
    input: Vec<u8>,
    /// Answers due and not yet written (from `written` on).
    output: Vec<u8>,
    written: usize,
    /// Complete requests whose answer is not due yet.
    waiting: usize,
    /// The client closed its side; answers still due are written, then the connection closed.
    eof: bool,
    /// A request said `Connection: close`: nothing after it is read.
    close_after: bool,
    /// Registered for WRITABLE too (a write would have blocked).
    wants_write: bool,
    /// When the last answer was handed to the kernel, while no request is waiting.
    answered_at: Option<Instant>,
}

struct EventLoop {
    poll: Poll,
    listener: TcpListener,
    /// Tokens are never reused, so an answer due for a closed connection cannot go to a new one.
    conns: HashMap<Token, Conn>,
    /// (due, connection) in due order: the delay is fixed, so arrival order is due order.
    due: VecDeque<(Instant, Token)>,
    next_token: usize,
    delay: Duration,
    counters: Arc<Counters>,
}

impl EventLoop {
    fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) {
            let timeout = self
                .due
                .front()
                .map(|(at, _)| at.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.accept()?,
                    WAKER => {}
                    token => self.ready(
                        token,
                        event.is_readable() || event.is_read_closed() || event.is_error(),
                        event.is_writable() || event.is_write_closed(),
                    ),
                }
            }
            self.answer_due();
        }
        Ok(())
    }

    fn accept(&mut self) -> io::Result<()> {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    // Answers are small and written whole: never hold one back for an ACK.
                    let _ = stream.set_nodelay(true);
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    self.poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE)?;
                    self.conns.insert(
                        token,
                        Conn {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            written: 0,
                            waiting: 0,
                            eof: false,
                            close_after: false,
                            wants_write: false,
                            answered_at: None,
                        },
                    );
                    let c = &self.counters;
                    c.accepted.fetch_add(1, Ordering::Relaxed);
                    let open = c.open.fetch_add(1, Ordering::Relaxed) + 1;
                    c.peak_open.fetch_max(open, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: counted, and the run fails at the end. Edge-triggered,
                    // the next connection's arrival tries again.
                    self.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                    say(&format!("slow receiver: accept failed: {e}"));
                    return Ok(());
                }
            }
        }
    }

    /// A connection is readable and/or writable: read and parse what came, write what is due.
    fn ready(&mut self, token: Token, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut ok = true;
        // Edge-triggered: read until the socket would block, parsing after every read so that
        // only an unfinished request is ever buffered.
        let mut buf = [0u8; 16 * 1024];
        while readable && ok && !conn.eof && !conn.close_after {
            let n = match conn.stream.read(&mut buf) {
                Ok(0) => {
                    conn.eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    ok = false;
                    break;
                }
            };
            conn.input.extend_from_slice(&buf[..n]);
            let complete = Instant::now();
            let requests = match parse(conn) {
                Ok(requests) if conn.input.len() <= MAX_REQUEST => requests,
                _ => {
                    self.counters.bad.fetch_add(1, Ordering::Relaxed);
                    ok = false;
                    break;
                }
            };
            if let Some(at) = conn.answered_at.filter(|_| requests > 0) {
                let c = &self.counters;
                Counters::add(&c.turnaround_us_sum, &c.turnaround_us_max, complete - at);
                c.turnarounds.fetch_add(1, Ordering::Relaxed);
                conn.answered_at = None;
            }
            for _ in 0..requests {
                self.due.push_back((complete + self.delay, token));
            }
        }
        if ok && writable {
            ok = flush(conn, token, self.poll.registry(), &self.counters);
        }
        self.close_if_done(token, ok);
    }

    /// Answers every request whose delay has passed.
    fn answer_due(&mut self) {
        while let Some(&(at, token)) = self.due.front() {
            let now = Instant::now();
            if at > now {
                break;
            }
            self.due.pop_front();
            let Some(conn) = self.conns.get_mut(&token) else {
                continue; // closed meanwhile
            };
            conn.waiting -= 1;
            conn.output.extend_from_slice(RESPONSE.as_bytes());
            let c = &self.counters;
            c.answered.fetch_add(1, Ordering::Relaxed);
            Counters::add(&c.late_us_sum, &c.late_us_max, now - at);
            // Blocked already: the WRITABLE event writes it, after what is before it.
            let ok = conn.wants_write || flush(conn, token, self.poll.registry(), &self.counters);
            if conn.waiting == 0 && conn.output.is_empty() {
                conn.answered_at = Some(Instant::now());
            }
            self.close_if_done(token, ok);
        }
    }

    fn close_if_done(&mut self, token: Token, ok: bool) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let finished =
            (conn.eof || conn.close_after) && conn.waiting == 0 && conn.output.is_empty();
        if ok && !finished {
            return;
        }
        if let Some(mut conn) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            self.counters.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Takes every complete request (head and Content-Length body) off the front of the input, and
/// returns how many; what is left is the start of the next one. Err: not a request we take.
fn parse(conn: &mut Conn) -> std::result::Result<usize, ()> {
    let (mut start, mut complete) = (0, 0);
    while !conn.close_after {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        let head = match request.parse(&conn.input[start..]) {
            Ok(httparse::Status::Complete(head)) => head,
            Ok(httparse::Status::Partial) => break,
            Err(_) => return Err(()),
        };
        let mut length = 0usize;
        for h in request.headers.iter() {
            let value = std::str::from_utf8(h.value).map_err(|_| ())?.trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                length = value.parse().map_err(|_| ())?;
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(()); // the daemon always sends a Content-Length
            } else if h.name.eq_ignore_ascii_case("connection") {
                conn.close_after = value.eq_ignore_ascii_case("close");
            }
        }
        if request.version == Some(0) {
            conn.close_after = true; // HTTP/1.0: one request per connection
        }
        let total = head.checked_add(length).ok_or(())?;
        if conn.input.len() - start < total {
            conn.close_after = false; // not complete yet: decided when it is
            break;
        }
        start += total;
        complete += 1;
        conn.waiting += 1;
    }
    conn.input.drain(..start);
    Ok(complete)
}

/// Writes what is due; on WouldBlock waits for WRITABLE. False on a broken connection.
fn flush(conn: &mut Conn, token: Token, registry: &Registry, counters: &Counters) -> bool {
    while conn.written < conn.output.len() {
        match conn.stream.write(&conn.output[conn.written..]) {
            Ok(0) => return false,
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                counters.writes_blocked.fetch_add(1, Ordering::Relaxed);
                if !conn.wants_write {
                    conn.wants_write = true;
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    return registry
                        .reregister(&mut conn.stream, token, interest)
                        .is_ok();
                }
                return true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    conn.output.clear();
    conn.written = 0;
    if conn.wants_write {
        conn.wants_write = false;
        return registry
            .reregister(&mut conn.stream, token, Interest::READABLE)
            .is_ok();
    }
    true
}

/// Proves the receiver right before it is trusted with the daemon: a request arriving in pieces,
/// a client that leaves with a request unanswered, and many pipelined requests whose answers
/// (sent to a client reading only once it has sent them all, with a small receive buffer) do not
/// fit in the socket — each answered in order, and not before its delay.
fn self_check() -> Result<()> {
    const PIPELINED: usize = 50_000;
    let delay = Duration::from_millis(30);
    let receiver = SlowReceiver::start(delay)?;
    let addr = receiver.addr;
    let request = format!(
        "POST /webhook HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{}",
        crate::BODY.len(),
        crate::BODY
    );
    let connect = |rcvbuf: Option<usize>| -> Result<std::net::TcpStream> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size)?;
        }
        socket.connect(&addr.into())?;
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(socket.into())
    };
    let read_answers = |stream: &mut std::net::TcpStream, n: usize| -> Result<()> {
        let want = RESPONSE.len() * n;
        let mut got = Vec::with_capacity(want);
        let mut buf = [0u8; 64 * 1024];
        while got.len() < want {
            match stream.read(&mut buf)? {
                0 => return Err("self-check: the receiver closed the connection".into()),
                k => got.extend_from_slice(&buf[..k]),
            }
        }
        if got.len() != want || got.chunks(RESPONSE.len()).any(|a| a != RESPONSE.as_bytes()) {
            return Err("self-check: the answers are not the expected ones".into());
        }
        Ok(())
    };

    // In pieces: head split mid-line, body split; timed from the last piece.
    let mut stream = connect(None)?;
    let bytes = request.as_bytes();
    let cuts = [0, 10, bytes.len() - 20, bytes.len()];
    for piece in cuts.windows(2) {
        std::thread::sleep(Duration::from_millis(5));
        stream.write_all(&bytes[piece[0]..piece[1]])?;
    }
    let sent = Instant::now();
    read_answers(&mut stream, 1)?;
    if sent.elapsed() < delay {
        return Err(format!(
            "self-check: answered after {:?} (< {delay:?})",
            sent.elapsed()
        )
        .into());
    }

    // A client that leaves before its answer is due.
    let mut gone = connect(None)?;
    gone.write_all(bytes)?;
    drop(gone);

    // Pipelined, in one go, to a client with a small receive buffer that reads only at the end.
    let mut pipelined = connect(Some(4096))?;
    pipelined.write_all(request.repeat(PIPELINED).as_bytes())?;
    std::thread::sleep(delay + Duration::from_millis(300)); // all due: more than the socket holds
    read_answers(&mut pipelined, PIPELINED)?;
    drop((stream, pipelined));
    std::thread::sleep(delay * 2);
    let c = receiver.stop()?;
    let (answered, blocked, open) = (
        c.answered.load(Ordering::Relaxed),
        c.writes_blocked.load(Ordering::Relaxed),
        c.open.load(Ordering::Relaxed),
    );
    if answered < 1 + PIPELINED as u64 || blocked == 0 || open != 0 {
        return Err(format!(
            "self-check: {answered} answered, {blocked} writes blocked, {open} connections left open"
        )
        .into());
    }
    say(&format!(
        "slow receiver self-check passed: partial request, client gone, {PIPELINED} pipelined \
         ({blocked} writes waited for WRITABLE)"
    ));
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit when it is below `want` (the receiver holds
/// a socket per worker, and the daemon, which inherits the limit, one more each). Returns the
/// soft limit in force.
fn raise_nofile(want: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    if limit.rlim_cur < want && limit.rlim_cur < limit.rlim_max {
        let old = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        say(&format!(
            "slow: RLIMIT_NOFILE raised from {old} to {} (the daemon inherits it)",
            limit.rlim_cur
        ));
    }
    Ok(limit.rlim_cur)
}

/// WORKER_COUNT threads sending through the daemon's own `Webhook::deliver` (one shared agent,
/// as the daemon's workers do) for `secs`, no database: the sum of the threads' rates, each its
/// requests over the time of its last answer, so that neither the first round (connecting) nor
/// the last (started before the end, answered after it) is counted by halves.
fn bare_loop(url: &str, workers: u32, secs: f64) -> Result<f64> {
    let (_, webhook) = crate::webhook_for(url, None, workers)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..workers)
        .map(|n| {
            let webhook = webhook.clone();
            std::thread::spawn(move || -> Option<f64> {
                let message = Claimed {
                    id: i64::from(n) + 1,
                    recipient: crate::RECIPIENT.into(),
                    content: crate::CONTENT.into(),
                    attempts: 0,
                    charged: 0,
                    expires: None,
                };
                let mut sent = 0u32;
                while Instant::now() < deadline {
                    let result = webhook.deliver(&message, false);
                    if !matches!(result.delivery, Delivery::Sent { .. }) {
                        return None;
                    }
                    sent += 1;
                }
                Some(f64::from(sent) / started.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut total = 0.0;
    for t in threads {
        total += t
            .join()
            .map_err(|_| "a bare-loop thread panicked")?
            .ok_or("the slow receiver did not accept a bare-loop request")?;
    }
    Ok(total)
}

/// One combination's figures.
pub struct SlowRun {
    pub workers: u32,
    pub delay: Duration,
    pub batch_size: u32,
    pub backlog: i32,
    pub sent: i64,
    /// Backlog committed → last `sent_at` (PostgreSQL's clock).
    pub seconds: f64,
    /// First → last `sent_at`, for comparison (it leaves out one round of requests).
    pub first_to_last: f64,
    pub peak_rss_kb: u64,
    pub cpu_ms_per_1000: f64,
    /// Connections the receiver accepted (one per worker expected).
    pub connections: u64,
    /// The run reached its time bound before the backlog was sent.
    pub cut: bool,
    /// The receiver's lateness (answer written − due), mean and max, ms.
    pub late_ms: (f64, f64),
    /// The daemon's turnaround per connection (answer written → next request), mean and max, ms.
    pub turnaround_ms: (f64, f64),
    /// The bare loop against the same receiver (WORKER_COUNT threads calling the daemon's
    /// `Webhook::deliver` through one agent, no database): msgs/s, the sending side's ceiling.
    pub bare: f64,
    /// The daemon's context switches (all threads, voluntary and not) per message.
    pub switches_per_msg: f64,
}

impl SlowRun {
    pub fn ideal(&self) -> f64 {
        f64::from(self.workers) / self.delay.as_secs_f64()
    }

    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-6)
    }

    pub fn ratio(&self) -> f64 {
        self.rate() / self.ideal()
    }

    pub fn rss_mb(&self) -> f64 {
        self.peak_rss_kb as f64 * 1024.0 / 1e6
    }

    fn delay_ms(&self) -> u64 {
        self.delay.as_millis() as u64
    }

    fn describe(&self) -> String {
        format!(
            "slow WORKER_COUNT={} delay={} ms BATCH_SIZE={}: {} of {} msgs in {:.2} s = {:.0} msgs/s \
             = {:.3}× ideal {:.0} (first→last sent_at {:.0}/s), peak RSS {} kB, CPU {:.1} ms / \
             1,000 msgs, {} connections; receiver late by {:.2} ms mean ({:.1} max), \
             daemon's turnaround {:.2} ms mean ({:.1} max), {:.1} context switches / msg; \
             bare loop {:.0} msgs/s = {:.3}× ideal{}",
            self.workers,
            self.delay_ms(),
            self.batch_size,
            self.sent,
            self.backlog,
            self.seconds,
            self.rate(),
            self.ratio(),
            self.ideal(),
            self.sent.saturating_sub(1) as f64 / self.first_to_last.max(1e-6),
            self.peak_rss_kb,
            self.cpu_ms_per_1000,
            self.connections,
            self.late_ms.0,
            self.late_ms.1,
            self.turnaround_ms.0,
            self.turnaround_ms.1,
            self.switches_per_msg,
            self.bare,
            self.bare / self.ideal(),
            if self.cut { " (CUT at the time bound)" } else { "" }
        )
    }
}

/// The combinations to run: the full set, the smoke run's one, or BENCH_SLOW's
/// (e.g. `1024x50,256x100`, for development).
fn combinations(s: &Settings) -> Result<Vec<(u32, u64, i32)>> {
    let backlog = |workers: u32, ms: u64| -> i32 {
        let rounds = STEADY.as_millis().div_ceil(u128::from(ms)) as i32;
        workers as i32 * rounds
    };
    if let Some(list) = std::env::var("BENCH_SLOW")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        return list
            .split(',')
            .map(|c| {
                let (w, d) = c
                    .trim()
                    .split_once('x')
                    .ok_or("BENCH_SLOW: expected e.g. 1024x50,256x100")?;
                let (w, d): (u32, u64) = (w.parse()?, d.parse()?);
                Ok((w, d, if s.full { backlog(w, d) } else { SMOKE.2 }))
            })
            .collect();
    }
    Ok(if s.full {
        FULL.iter().map(|&(w, d)| (w, d, backlog(w, d))).collect()
    } else {
        vec![SMOKE]
    })
}

/// The phase: every combination against its own receiver, database and daemon.
pub fn phase(s: &Settings, work: &Workdir) -> Result<Vec<SlowRun>> {
    let runs = combinations(s)?;
    let most = runs.iter().map(|r| r.0).max().unwrap_or(0);
    let limit = raise_nofile(u64::from(most) * 4 + 256)?;
    if limit < u64::from(most) * 2 + 64 {
        return Err(format!(
            "RLIMIT_NOFILE is {limit}: too low for {most} connections in the receiver and the daemon"
        )
        .into());
    }
    let started = Instant::now();
    self_check()?;
    let mut out = Vec::new();
    for (workers, ms, backlog) in runs {
        let run = one(s, work, workers, Duration::from_millis(ms), backlog)?;
        say(&run.describe());
        out.push(run);
    }
    say(&format!(
        "slow phase: {} combinations in {:.0} s",
        out.len(),
        started.elapsed().as_secs_f64()
    ));
    if !s.full {
        if let Some(r) = out.iter().find(|r| r.cut || r.ratio() < 0.5) {
            return Err(
                format!("smoke: the slow-receiver run fell short: {}", r.describe()).into(),
            );
        }
    }
    Ok(out)
}

fn one(
    s: &Settings,
    work: &Workdir,
    workers: u32,
    delay: Duration,
    backlog: i32,
) -> Result<SlowRun> {
    // One blocking request per worker: a claim of WORKER_COUNT refills the pipeline (it holds
    // at most 2 × BATCH_SIZE and claims again once half of it is back), so every worker always
    // has a message waiting — the setting a user would pick for a slow receiver.
    // BENCH_SLOW_BATCH (development) tries another BATCH_SIZE for every combination.
    let batch_size = match std::env::var("BENCH_SLOW_BATCH") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|_| "BENCH_SLOW_BATCH")?,
        _ => workers,
    };
    // First the bare loop, against a receiver of its own (its counters are not the daemon's).
    let bare = {
        let receiver = SlowReceiver::start(delay)?;
        let secs = if s.full { BARE_SECS } else { 1.0 };
        let rate = bare_loop(&receiver.url(), workers, secs)?;
        receiver.stop()?;
        rate
    };
    let receiver = SlowReceiver::start(delay)?;
    let tag = format!("slow_{workers}_{}", delay.as_millis());
    let current = crate::Variant::current();
    let db = BenchDb::create(&s.admin_url, &tag, current.binary)?;
    let url = receiver.url();
    let mut daemon = Daemon::start(
        &db,
        work,
        &DaemonSettings {
            binary: current.binary,
            webhook: &url,
            batch_size,
            workers,
            tag: &tag,
            env: current.env,
        },
    )?;
    let pid = daemon.pid();
    let mut c = db.client()?;
    let cpu_before = procs::cpu_ticks(pid)?;
    let (_, switches_before) = procs::cpu_ns_and_switches(pid)?;
    c.execute(crate::INSERT_BACKLOG, &[&backlog])?;
    let committed: f64 = c
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])?
        .get(0);
    let ideal_secs = f64::from(backlog) * delay.as_secs_f64() / f64::from(workers);
    let bound = Duration::from_secs_f64(ideal_secs * CUT_AFTER + 5.0);
    let waited = Instant::now();
    let mut cut = false;
    loop {
        let left: bool = c.query_one(crate::REMAINING, &[])?.get(0);
        if !left {
            break;
        }
        daemon.check_alive()?;
        if waited.elapsed() > bound {
            cut = true;
            break;
        }
        std::thread::sleep(crate::POLL);
    }
    let cpu_after = procs::cpu_ticks(pid)?;
    let (_, switches_after) = procs::cpu_ns_and_switches(pid)?;
    let peak_rss_kb = procs::status_kb(pid, "VmHWM")?;
    let row = c.query_one(
        "SELECT count(*), extract(epoch FROM min(sent_at))::float8,
                extract(epoch FROM max(sent_at))::float8
         FROM messages WHERE status = 'sent'",
        &[],
    )?;
    let (sent, first, last): (i64, Option<f64>, Option<f64>) = (row.get(0), row.get(1), row.get(2));
    daemon.stop()?;
    let counters = receiver.stop()?;
    if !counters.raised_priority.load(Ordering::Relaxed) {
        say("slow: the receiver could not raise its priority (not root?): it may answer late");
    }
    if !cut && sent != i64::from(backlog) {
        return Err(format!("slow: only {sent} of {backlog} messages were sent").into());
    }
    let (first, last) = (first.unwrap_or(committed), last.unwrap_or(committed));
    let ticks = cpu_after.saturating_sub(cpu_before) as f64;
    Ok(SlowRun {
        workers,
        delay,
        batch_size,
        backlog,
        sent,
        seconds: last - committed,
        first_to_last: last - first,
        peak_rss_kb,
        cpu_ms_per_1000: ticks / procs::clock_ticks() * 1e6 / (sent.max(1) as f64),
        connections: counters.accepted.load(Ordering::Relaxed),
        cut,
        late_ms: mean_max(
            &counters.late_us_sum,
            &counters.late_us_max,
            &counters.answered,
        ),
        turnaround_ms: mean_max(
            &counters.turnaround_us_sum,
            &counters.turnaround_us_max,
            &counters.turnarounds,
        ),
        bare,
        switches_per_msg: switches_after.saturating_sub(switches_before) as f64
            / (sent.max(1) as f64),
    })
}

/// (mean, max) in ms of a sum and max in µs over `count`.
fn mean_max(sum: &AtomicU64, max: &AtomicU64, count: &AtomicU64) -> (f64, f64) {
    let count = count.load(Ordering::Relaxed).max(1) as f64;
    (
        sum.load(Ordering::Relaxed) as f64 / count / 1000.0,
        max.load(Ordering::Relaxed) as f64 / 1000.0,
    )
}

/// The headline table's rows: peak RSS and throughput at 256 and 1,024 workers, 100 ms.
pub fn headline(runs: &[SlowRun]) -> Vec<String> {
    let mut rows = Vec::new();
    for (workers, limit) in TARGET_RSS_MB {
        let Some(r) = runs
            .iter()
            .find(|r| r.workers == workers && r.delay_ms() == TARGET_DELAY_MS)
        else {
            continue;
        };
        rows.push(format!(
            "| slow receiver ({TARGET_DELAY_MS} ms per request): peak RSS at WORKER_COUNT={} (VmHWM) | {:.1} MB | ≤ {limit:.0} MB | {} |",
            thousands(f64::from(workers)),
            r.rss_mb(),
            verdict(Some(r.rss_mb() <= limit))
        ));
        rows.push(format!(
            "| slow receiver ({TARGET_DELAY_MS} ms per request): throughput at WORKER_COUNT={} | {} msgs/s = {:.2}× ideal ({}){} | ≥ {TARGET_RATIO:.2}× ideal | {} |",
            thousands(f64::from(workers)),
            thousands(r.rate()),
            r.ratio(),
            thousands(r.ideal()),
            if r.cut { ", cut at the time bound" } else { "" },
            verdict(Some(r.ratio() >= TARGET_RATIO && !r.cut))
        ));
    }
    rows
}

/// The section of the report with every combination.
pub fn section(runs: &[SlowRun]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nSlow receiver: every request answered exactly its delay after it arrived, over keep-alive \
         connections, by one epoll thread in the bench process (at nice -10: it stands for a server \
         on another machine); the release daemon in continuous mode, LOG_LEVEL=info, with \
         BATCH_SIZE = WORKER_COUNT (a claim of one worker's worth each keeps every worker busy); a \
         backlog of about 6 s at the ideal rate (WORKER_COUNT / delay) inserted in one statement \
         into a fresh database; msgs/s from the backlog's commit to the last `sent_at`. *Bare loop*: \
         WORKER_COUNT threads calling the daemon's `Webhook::deliver` through one agent against \
         the same receiver for 4 s, no database — the sending side's ceiling. *Receiver late*: how \
         late its answers went out on average (its own lag on the shared cores, which the ideal \
         does not allow for).",
    );
    let var = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    if var("BENCH_SLOW") || var("BENCH_SLOW_BATCH") {
        out.push_str(" Combinations or BATCH_SIZE chosen by BENCH_SLOW / BENCH_SLOW_BATCH.");
    }
    out.push_str(
        "\n\n| WORKER_COUNT | delay | ideal msgs/s | msgs/s | × ideal | peak RSS | CPU / 1,000 msgs | bare loop × ideal | receiver late |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        out.push_str(&format!(
            "| {}{} | {} ms | {} | {}{} | {:.2} | {:.1} MB | {:.0} ms | {:.2} | {:.1} ms |\n",
            thousands(f64::from(r.workers)),
            if r.batch_size == r.workers {
                String::new()
            } else {
                format!(" (BATCH_SIZE {})", r.batch_size)
            },
            r.delay_ms(),
            thousands(r.ideal()),
            thousands(r.rate()),
            if r.cut {
                format!(
                    " (cut: {} of {} sent)",
                    thousands(r.sent as f64),
                    thousands(f64::from(r.backlog))
                )
            } else {
                String::new()
            },
            r.ratio(),
            r.rss_mb(),
            r.cpu_ms_per_1000,
            r.bare / r.ideal(),
            r.late_ms.0
        ));
    }
    out
}
