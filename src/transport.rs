//! The webhook's TCP connections, with only the system calls a request needs.
//!
//! ureq's own TCP transport keeps its socket blocking and bounds each read and write with
//! SO_RCVTIMEO or SO_SNDTIMEO, set again whenever the time left has changed (on nearly every
//! call, since it shrinks); and it checks that a pooled connection is still open by switching
//! the socket to non-blocking, reading, and switching it back, once when the connection is
//! taken from the pool and once when it is returned. `strace` of a drain: 12 system calls a
//! request beside its write and read (4 `ioctl`, 3 `setsockopt`, 2 probing reads and a second
//! write), a third of them under the pool's one lock.
//!
//! Here the socket stays non-blocking. A write or read that cannot go on at once waits in
//! `poll(2)` for at most the time ureq says is left, and a read right after a write (the
//! answer, which is not there yet) waits first; the open check is one peek; a request's head
//! waits for its body, and both leave in one `writev`, so the receiver gets one segment. The
//! same drain: 7.7 system calls a message in all where there were 16.5 (a write, a `poll`, a
//! read, two peeks, and the `futex` calls of the channels and the pool's lock). Only the
//! connect path is ureq's in spirit: every resolved address is tried in turn within the
//! connect timeout.
//!
//! TLS (rustls) and a CONNECT proxy chain onto this transport as they do onto ureq's. Its
//! sockets are not registered for `Agent::shutdown`, which the daemon never calls (a shutdown
//! lets requests in flight finish): ureq keeps every registered socket in a list that each
//! checkout and return of a pooled connection walks under the pool's lock, which at
//! WORKER_COUNT=1024 was the daemon's busiest code in a profile.

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use ureq::unversioned::transport::{
    time as ureq_time, Buffers, ConnectionDetails, Connector, Either, NextTimeout, Transport,
};
use ureq::Timeout;

/// Opens plain TCP connections as [`PolledTcp`]; passes a connection made earlier in the chain
/// (a CONNECT proxy's) through untouched.
#[derive(Debug, Default)]
pub struct PolledTcpConnector;

impl<In: Transport> Connector<In> for PolledTcpConnector {
    type Out = Either<In, PolledTcp>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if let Some(chained) = chained {
            return Ok(Some(Either::A(chained)));
        }
        // Counted from ureq's reading of the clock when it computed the timeout, not from now:
        // a CONNECT proxy's host is looked up in between, and that time is spent already.
        let deadline = Deadline::since(details.now, details.timeout)?;
        let stream = connect(&details.addrs, deadline)?;
        if details.config.no_delay() {
            stream.set_nodelay(true)?;
        }
        stream.set_nonblocking(true)?;
        let config = details.config;
        Ok(Some(Either::B(PolledTcp {
            stream,
            buffers: ZeroedBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
            held: Vec::new(),
            answer_due: false,
            broken: false,
            first_call_ends: deadline.at,
        })))
    }
}

/// Writes up to this size wait for the next (see [`PolledTcp::transmit_output`]); a request's
/// head is a few hundred bytes.
const HOLD_LIMIT: usize = 2048;

/// The scratch space ureq's own buffers keep for a chunked request body.
const MIN_SCRATCH: usize = 10 * 1024;

/// The least time one of several addresses gets to connect.
const MIN_CONNECT_SHARE: std::time::Duration = std::time::Duration::from_millis(10);

/// Tries each address in turn; each gets half of the time left, the last all of it (a host
/// whose first address is dead still gets a chance on the next).
fn connect(addrs: &[SocketAddr], deadline: Deadline) -> Result<TcpStream, ureq::Error> {
    let mut last_error = None;
    for (i, addr) in addrs.iter().enumerate() {
        let attempt = match deadline.left() {
            None => TcpStream::connect(addr),
            Some(left) if left.is_zero() => break,
            Some(left) if i + 1 < addrs.len() => {
                TcpStream::connect_timeout(addr, (left / 2).max(MIN_CONNECT_SHARE))
            }
            Some(left) => TcpStream::connect_timeout(addr, left),
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(e) if e.kind() != io::ErrorKind::TimedOut => e.into(),
        Some(_) => ureq::Error::Timeout(Timeout::Connect),
        None if addrs.is_empty() => io::Error::from(io::ErrorKind::ConnectionRefused).into(),
        None => ureq::Error::Timeout(deadline.reason),
    })
}

/// A non-blocking TCP connection that waits in `poll(2)`, bounded by ureq's timeouts.
pub struct PolledTcp {
    stream: TcpStream,
    buffers: ZeroedBuffers,
    /// A write not sent yet (see `transmit_output`); normally empty between requests.
    held: Vec<u8>,
    /// A request went out and nothing was read since: the next read waits before it tries.
    answer_due: bool,
    /// A send failed, perhaps after sending part of what it had: nothing more may follow.
    broken: bool,
    /// When the call that opened the connection must end (its global timeout), until the
    /// connection first goes back to the pool. ureq gives every read of a CONNECT proxy's
    /// answer the same timeout, so a proxy that sends a byte now and then could otherwise hold
    /// that call for as long as it likes. (It is ureq's connect timeout, which is the global
    /// one: the daemon sets no shorter connect timeout, which would end the whole first call.)
    first_call_ends: Option<Instant>,
}

/// Only the peer: the buffers hold requests, i.e. message contents.
impl std::fmt::Debug for PolledTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolledTcp")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

impl PolledTcp {
    /// The deadline of one read or write: ureq's `timeout`, but no later than the end of the
    /// call that opened the connection. Fails once a send has failed.
    fn deadline(&self, timeout: NextTimeout) -> Result<Deadline, ureq::Error> {
        if self.broken {
            let e = io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on this connection failed",
            );
            return Err(e.into());
        }
        Ok(Deadline::new(timeout)?.no_later_than(self.first_call_ends))
    }

    /// Sends what is held, then the first `amount` bytes of the output. On success nothing is
    /// held any longer; on failure part of it may have gone out, so sending it again would
    /// repeat the start of a request (ureq goes on after a timeout while it waits for a
    /// `100 Continue`): the connection is broken for good.
    fn send_held(&mut self, amount: usize, deadline: Deadline) -> Result<(), ureq::Error> {
        let output = &self.buffers.output[..amount];
        let result = send(&self.stream, [&self.held, output], deadline);
        match result {
            Ok(()) => self.held.clear(),
            Err(_) => self.broken = true,
        }
        result
    }
}

impl Transport for PolledTcp {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    /// A small write (a request's head, usually) is held until the next one or the next read,
    /// so that head and body leave in one `writev` and arrive in one segment: one system call
    /// here and one wake-up of the receiver instead of two of each.
    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let deadline = self.deadline(timeout.for_write())?;
        if self.held.is_empty() && amount <= HOLD_LIMIT {
            self.held.extend_from_slice(&self.buffers.output[..amount]);
        } else {
            self.send_held(amount, deadline)?;
        }
        self.answer_due = true;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let deadline = self.deadline(timeout.for_read())?;
        if !self.held.is_empty() {
            self.send_held(0, deadline)?;
        }
        if std::mem::take(&mut self.answer_due) {
            wait(&self.stream, libc::POLLIN, deadline)?;
        }
        loop {
            match (&self.stream).read(self.buffers.input_append_buf()) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(&self.stream, libc::POLLIN, deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Open means idle: nothing to read, in the socket or already read into the input (under
    /// TLS, the layer above sees only what it decrypted). An end of stream (the receiver closed
    /// it) or bytes we did not ask for (a stray answer, a TLS close alert) mean the connection
    /// must not be used again.
    fn is_open(&mut self) -> bool {
        // Asked when the connection goes back to the pool: the call that opened it is over.
        self.first_call_ends = None;
        !self.broken
            && self.buffers.input().is_empty()
            && matches!(self.stream.peek(&mut [0]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// A connection's input and output buffers, allocated zeroed. ureq's `LazyBuffers` write zeros
/// over both on first use, so all 16 KiB of them are resident for good in every pooled
/// connection (16 MB at WORKER_COUNT=1024); memory the allocator hands out zeroed is touched only
/// where an answer or a request is written, a page or so of each.
struct ZeroedBuffers {
    input: Vec<u8>,
    /// `input[consumed..filled]` is read and not yet used by ureq.
    consumed: usize,
    filled: usize,
    /// The last use of the input consumed something (ureq's sign that more input is not needed
    /// before it looks again).
    progress: bool,
    output: Vec<u8>,
}

impl ZeroedBuffers {
    fn new(input: usize, output: usize) -> ZeroedBuffers {
        ZeroedBuffers {
            input: vec![0; input],
            consumed: 0,
            filled: 0,
            progress: false,
            output: vec![0; output],
        }
    }

    /// Moves what is unread to the front when that frees more than it copies (as ureq's
    /// buffers do), so the free end of the input is as large as it can cheaply be.
    fn make_room(&mut self) {
        if self.consumed == self.filled {
            (self.consumed, self.filled) = (0, 0);
        } else if self.consumed > 0 && self.filled > self.input.len() / 2 {
            self.input.copy_within(self.consumed..self.filled, 0);
            (self.consumed, self.filled) = (0, self.filled - self.consumed);
        }
    }
}

impl Buffers for ZeroedBuffers {
    fn output(&mut self) -> &mut [u8] {
        &mut self.output
    }

    fn input(&self) -> &[u8] {
        &self.input[self.consumed..self.filled]
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        self.make_room();
        &mut self.input[self.filled..]
    }

    fn input_appended(&mut self, amount: usize) {
        self.filled += amount;
        assert!(
            self.filled <= self.input.len(),
            "more input appended than room"
        );
    }

    fn input_consume(&mut self, amount: usize) {
        self.progress = amount > 0;
        self.consumed += amount;
        assert!(
            self.consumed <= self.filled,
            "more input consumed than read"
        );
    }

    /// Scratch space for a chunked request body (ours never is) and the output. ureq ends a
    /// chunked body at an empty read, so the scratch space is never left small (as in ureq's
    /// buffers).
    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        self.make_room();
        if self.input.len() - self.filled < MIN_SCRATCH {
            self.input.resize(self.filled + MIN_SCRATCH, 0);
        }
        (&mut self.input[self.filled..], &mut self.output)
    }

    fn can_use_input(&self) -> bool {
        self.consumed < self.filled && self.progress
    }
}

/// When a wait must end: `None` when ureq set no timeout.
#[derive(Clone, Copy)]
struct Deadline {
    at: Option<Instant>,
    reason: Timeout,
}

impl Deadline {
    /// `timeout` from now.
    fn new(timeout: NextTimeout) -> Result<Deadline, ureq::Error> {
        Deadline::counted_from(Instant::now(), timeout)
    }

    /// `timeout` counted from `start`, ureq's reading of the clock when it computed it (or from
    /// now, when ureq had no reading).
    fn since(start: ureq_time::Instant, timeout: NextTimeout) -> Result<Deadline, ureq::Error> {
        match start {
            ureq_time::Instant::Exact(start) => Deadline::counted_from(start, timeout),
            _ => Deadline::new(timeout),
        }
    }

    /// Fails at once, as ureq's transport does, when no time is left.
    fn counted_from(start: Instant, timeout: NextTimeout) -> Result<Deadline, ureq::Error> {
        let deadline = Deadline {
            // None also for a timeout too far away to be an Instant.
            at: start.checked_add(*timeout.after),
            reason: timeout.reason,
        };
        if timeout.after.is_zero() || deadline.left().is_some_and(|left| left.is_zero()) {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        Ok(deadline)
    }

    /// This deadline, or `at` if that comes first (reported as the global timeout).
    fn no_later_than(self, at: Option<Instant>) -> Deadline {
        match (self.at, at) {
            (Some(mine), Some(at)) if at >= mine => self,
            (_, Some(at)) => Deadline {
                at: Some(at),
                reason: Timeout::Global,
            },
            (_, None) => self,
        }
    }

    fn left(&self) -> Option<std::time::Duration> {
        self.at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

/// Writes both parts in order, in as few `writev` calls as the socket allows. (`writev` has no
/// MSG_NOSIGNAL, but the Rust runtime ignores SIGPIPE: a reset receiver is an EPIPE here.)
fn send(stream: &TcpStream, parts: [&[u8]; 2], deadline: Deadline) -> Result<(), ureq::Error> {
    let mut slices = parts.map(IoSlice::new);
    let mut left = &mut slices[..];
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        match (&*stream).write_vectored(left) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream, libc::POLLOUT, deadline)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Waits until `stream` is ready for `events` (or has an error or hang-up to report, which the
/// next read or write then returns), or fails with the deadline's timeout.
fn wait(stream: &TcpStream, events: libc::c_short, deadline: Deadline) -> Result<(), ureq::Error> {
    loop {
        let millis = match deadline.left() {
            None => -1,
            Some(left) if left.is_zero() => return Err(ureq::Error::Timeout(deadline.reason)),
            // Rounded up: a wait never ends before its deadline only to find time left.
            Some(left) => left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
        };
        let mut fd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut fd, 1, millis) } {
            0 => {}
            n if n > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use ureq::unversioned::transport::ConnectProxyConnector;
    use ureq::Agent;

    fn agent(timeout: Duration) -> Agent {
        agent_via(timeout, None)
    }

    /// The daemon's chain: a CONNECT proxy when one is given, else straight to the receiver.
    fn agent_via(timeout: Duration, proxy: Option<ureq::Proxy>) -> Agent {
        agent_resolving(timeout, proxy, SlowResolver(Duration::ZERO))
    }

    fn agent_resolving(
        timeout: Duration,
        proxy: Option<ureq::Proxy>,
        resolver: SlowResolver,
    ) -> Agent {
        let config = Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .proxy(proxy)
            .build();
        Agent::with_parts(
            config,
            ().chain(ConnectProxyConnector::default())
                .chain(PolledTcpConnector),
            resolver,
        )
    }

    /// ureq's default resolver, answering `self.0` late: a slow DNS server.
    #[derive(Debug)]
    struct SlowResolver(Duration);

    impl ureq::unversioned::resolver::Resolver for SlowResolver {
        fn resolve(
            &self,
            uri: &ureq::http::Uri,
            config: &ureq::config::Config,
            timeout: NextTimeout,
        ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
            thread::sleep(self.0);
            ureq::unversioned::resolver::DefaultResolver::default().resolve(uri, config, timeout)
        }
    }

    /// Reads one request (headers and a Content-Length body) from `reader`; None at the end of
    /// the stream.
    fn read_request(reader: &mut io::BufReader<TcpStream>) -> Option<Vec<u8>> {
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        Some(body)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// A receiver that answers up to `answers_per_connection` requests on each connection with
    /// OK, then closes the connection, or, with `stray`, writes one more answer nobody asked
    /// for and leaves it open; reports each connection's number of requests once that is done.
    fn receiver(answers_per_connection: usize, stray: bool) -> (String, mpsc::Receiver<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut left_open = Vec::new();
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = io::BufReader::new(stream.try_clone().unwrap());
                let mut served = 0;
                while served < answers_per_connection && read_request(&mut reader).is_some() {
                    stream.write_all(OK).unwrap();
                    served += 1;
                }
                // On loopback what we write, or the end of stream of a close, has reached the
                // client when the call returns: its next request finds it.
                if stray {
                    stream.write_all(OK).unwrap();
                    left_open.push((stream, reader));
                } else {
                    drop((stream, reader));
                }
                if tx.send(served).is_err() {
                    return;
                }
            }
        });
        (url, rx)
    }

    fn post(agent: &Agent, url: &str, body: &[u8]) -> Result<u16, ureq::Error> {
        let mut response = agent.post(url).send(body)?;
        response.body_mut().read_to_vec()?;
        Ok(response.status().as_u16())
    }

    #[test]
    fn a_kept_alive_connection_carries_request_after_request() {
        let (url, served) = receiver(usize::MAX, false);
        let agent = agent(Duration::from_secs(5));
        for _ in 0..50 {
            assert_eq!(post(&agent, &url, b"{}").unwrap(), 200);
        }
        drop(agent);
        assert_eq!(served.recv_timeout(Duration::from_secs(5)).unwrap(), 50);
    }

    /// Requests to a receiver that answers once per connection and then closes it (or, with
    /// `stray`, writes an answer nobody asked for): every request after the first must find its
    /// pooled connection unusable and open a new one, not fail on it.
    fn each_request_needs_a_new_connection(stray: bool) {
        let (url, served) = receiver(1, stray);
        let agent = agent(Duration::from_secs(5));
        for i in 0..5 {
            assert_eq!(post(&agent, &url, b"{}").unwrap(), 200, "request {i}");
            assert_eq!(served.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        }
    }

    #[test]
    fn a_connection_the_receiver_closed_is_not_used_again() {
        each_request_needs_a_new_connection(false);
    }

    #[test]
    fn a_connection_with_stray_bytes_is_not_used_again() {
        each_request_needs_a_new_connection(true);
    }

    #[test]
    fn a_receiver_that_never_answers_times_out_on_time() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let held = thread::spawn(move || listener.accept().map(|(s, _)| s));
        let started = Instant::now();
        let error = post(&agent(Duration::from_millis(300)), &url, b"{}").unwrap_err();
        let took = started.elapsed();
        assert!(matches!(error, ureq::Error::Timeout(_)), "{error:?}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(held.join());
    }

    #[test]
    fn an_answer_that_trickles_in_still_ends_at_the_timeout() {
        // A byte of the status line every 50 ms, forever: each read makes progress, so only
        // the request's own deadline can end it.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_request(&mut io::BufReader::new(stream.try_clone().unwrap()));
            for byte in b"HTTP/1.1 200 OK\r\nx-pad: "
                .iter()
                .chain([b'a'].iter().cycle())
            {
                if stream.write_all(&[*byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let error = post(&agent(Duration::from_millis(500)), &url, b"{}").unwrap_err();
        let took = started.elapsed();
        assert!(matches!(error, ureq::Error::Timeout(_)), "{error:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn a_body_larger_than_the_socket_buffers_waits_for_a_slow_reader() {
        // 4 MB cannot sit in the kernel's buffers: the writes must wait for the receiver,
        // which starts reading only after a pause.
        let (tx, rx) = mpsc::channel();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            thread::sleep(Duration::from_millis(200));
            let body = read_request(&mut io::BufReader::new(stream.try_clone().unwrap()));
            stream.write_all(OK).unwrap();
            tx.send(body.map(|b| b.len())).unwrap();
        });
        let body = vec![b'x'; 4 << 20];
        assert_eq!(
            post(&agent(Duration::from_secs(10)), &url, &body).unwrap(),
            200
        );
        assert_eq!(rx.recv().unwrap(), Some(body.len()));
    }

    #[test]
    fn a_receiver_that_never_reads_times_the_write_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let held = thread::spawn(move || listener.accept().map(|(s, _)| s));
        let body = vec![b'x'; 16 << 20];
        let started = Instant::now();
        let error = post(&agent(Duration::from_millis(300)), &url, &body).unwrap_err();
        assert!(matches!(error, ureq::Error::Timeout(_)), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(held.join());
    }

    #[test]
    fn a_refused_connection_is_an_io_error_and_the_next_address_is_tried() {
        let dead = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let live = TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap();
        let timeout = NextTimeout {
            after: ureq::unversioned::transport::time::Duration::from_secs(2),
            ..NextTimeout::default()
        };
        let deadline = Deadline::new(timeout).unwrap();
        let error = connect(&[dead_addr], deadline).unwrap_err();
        assert!(
            matches!(&error, ureq::Error::Io(e) if e.kind() == io::ErrorKind::ConnectionRefused),
            "{error:?}"
        );
        let stream = connect(&[dead_addr, live_addr], deadline).unwrap();
        assert_eq!(stream.peer_addr().unwrap(), live_addr);
    }

    #[test]
    fn requests_go_through_a_connect_proxy() {
        let (url, served) = receiver(usize::MAX, false);
        let target = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        // A CONNECT proxy: reads the CONNECT request, reports its target, then relays bytes.
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
        let (asked_tx, asked) = mpsc::channel();
        thread::spawn(move || {
            let (client, _) = proxy.accept().unwrap();
            let mut reader = io::BufReader::new(client.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut line = String::new();
            while line != "\r\n" {
                line.clear();
                reader.read_line(&mut line).unwrap();
            }
            let authority = request_line.split(' ').nth(1).unwrap().to_owned();
            let upstream = TcpStream::connect(&authority).unwrap();
            (&client)
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .unwrap();
            asked_tx.send(request_line).unwrap();
            let (mut up_read, mut up_write) = (upstream.try_clone().unwrap(), upstream);
            let mut client_write = client;
            thread::spawn(move || {
                let _ = io::copy(&mut reader, &mut up_write);
                up_write.shutdown(std::net::Shutdown::Write)
            });
            let _ = io::copy(&mut up_read, &mut client_write);
        });
        let agent = agent_via(
            Duration::from_secs(5),
            Some(ureq::Proxy::new(&proxy_url).unwrap()),
        );
        for _ in 0..3 {
            assert_eq!(post(&agent, &url, b"{}").unwrap(), 200);
        }
        let asked = asked.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            asked.starts_with(&format!("CONNECT {target} ")),
            "{asked:?}"
        );
        drop(agent);
        assert_eq!(served.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
    }

    #[test]
    fn a_request_leaves_in_one_write() {
        // One write of head and body on loopback is one segment: the receiver's first read
        // returns all of it. (Sent as two, the first read could return the head alone.)
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for _ in 0..20 {
                let (mut stream, _) = listener.accept().unwrap();
                let mut first = vec![0; 64 * 1024];
                let n = stream.read(&mut first).unwrap();
                first.truncate(n);
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                    .unwrap();
                tx.send(first).unwrap();
            }
        });
        let agent = agent(Duration::from_secs(5));
        let body = br#"{"to":"+905550000001","content":"one segment"}"#;
        for _ in 0..20 {
            assert_eq!(post(&agent, &url, body).unwrap(), 200);
            let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert!(first.ends_with(body), "{}", String::from_utf8_lossy(&first));
        }
    }

    #[test]
    fn buffers_keep_unread_input_and_make_room_for_more() {
        let mut b = ZeroedBuffers::new(8, 4);
        b.input_append_buf()[..6].copy_from_slice(b"abcdef");
        b.input_appended(6);
        assert!(
            !b.can_use_input(),
            "nothing consumed yet: ureq must read first"
        );
        b.input_consume(2);
        assert_eq!(b.input(), b"cdef");
        assert!(b.can_use_input());
        // More than half full: the unread part moves to the front, freeing 4 bytes.
        assert_eq!(b.input_append_buf().len(), 4);
        assert_eq!(b.input(), b"cdef");
        b.input_consume(0);
        assert!(!b.can_use_input(), "no progress: ureq needs more input");
        b.input_consume(4);
        assert_eq!(
            b.input_append_buf().len(),
            8,
            "all read: the whole buffer is free"
        );
        let (tmp, output) = b.tmp_and_output();
        assert_eq!(
            (tmp.len(), output.len()),
            (MIN_SCRATCH, 4),
            "ureq's scratch space"
        );
    }

    #[test]
    fn after_a_failed_send_the_connection_is_not_used_again() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _peer = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut tcp = PolledTcp {
            stream,
            buffers: ZeroedBuffers::new(64, 64),
            held: b"POST / HTTP/1.1\r\n".to_vec(),
            answer_due: false,
            broken: false,
            first_call_ends: None,
        };
        assert!(tcp.is_open());
        let timeout = NextTimeout {
            after: ureq::unversioned::transport::time::Duration::from_secs(1),
            ..NextTimeout::default()
        };
        // Sending the held head fails (our side can no longer write; its read side is open).
        tcp.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(tcp.await_input(timeout).is_err());
        // The head may have gone out in part: neither it nor anything else may follow.
        assert!(!tcp.is_open());
        assert!(tcp.transmit_output(0, timeout).is_err());
        assert!(tcp.await_input(timeout).is_err());
    }

    /// Writes `start`, then one byte every 50 ms for as long as the client listens.
    fn trickle(mut stream: TcpStream, start: &[u8]) {
        for byte in start.iter().chain([b'a'].iter().cycle()) {
            if stream.write_all(&[*byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A CONNECT proxy that answers one byte every 50 ms, never finishing; its URL.
    fn trickling_proxy() -> String {
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", proxy.local_addr().unwrap());
        thread::spawn(move || {
            let (client, _) = proxy.accept().unwrap();
            read_request(&mut io::BufReader::new(client.try_clone().unwrap()));
            trickle(client, b"HTTP/1.1 200 OK\r\nx-pad: ");
        });
        url
    }

    /// The time a request through `agent` to `url` took to fail with a timeout.
    fn timed_out(agent: &Agent, url: &str) -> Duration {
        let started = Instant::now();
        let error = post(agent, url, b"{}").unwrap_err();
        assert!(matches!(error, ureq::Error::Timeout(_)), "{error:?}");
        started.elapsed()
    }

    #[test]
    fn a_connect_proxy_that_trickles_its_answer_is_cut_off_at_the_timeout() {
        // ureq gives every read of the proxy's answer the same timeout: only the deadline of
        // the call that opened the connection can end one that never completes.
        let proxy_url = trickling_proxy();
        let agent = agent_via(
            Duration::from_millis(500),
            Some(ureq::Proxy::new(&proxy_url).unwrap()),
        );
        let took = timed_out(&agent, "http://127.0.0.1:9/");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn a_tls_handshake_that_trickles_in_still_ends_at_the_timeout() {
        // The start of a 16 KiB handshake record, then a byte every 50 ms: rustls waits for the
        // whole record.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}/", listener.local_addr().unwrap());
        thread::spawn(move || trickle(listener.accept().unwrap().0, &[0x16, 3, 3, 0x40, 0]));
        let config = Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(500)))
            .build();
        let agent = Agent::with_parts(
            config,
            ().chain(PolledTcpConnector)
                .chain(ureq::unversioned::transport::RustlsConnector::default()),
            ureq::unversioned::resolver::DefaultResolver::default(),
        );
        let took = timed_out(&agent, &url);
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn a_slow_lookup_of_the_proxy_does_not_extend_the_timeout() {
        // The proxy's host is looked up inside the connect step, after ureq computed the time
        // left (`details.timeout`, as of `details.now`): that time is spent already, and the
        // proxy's answer, which trickles in, must still be cut off at the global timeout.
        let proxy_url = trickling_proxy();
        let agent = agent_resolving(
            Duration::from_millis(800),
            Some(ureq::Proxy::new(&proxy_url).unwrap()),
            SlowResolver(Duration::from_millis(600)),
        );
        let took = timed_out(&agent, "http://127.0.0.1:9/");
        assert!(took < Duration::from_millis(1100), "{took:?}");
    }
}
