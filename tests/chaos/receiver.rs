//! The webhook receiver of the campaign: a plain HTTP/1.1 server on raw sockets (so that it can
//! reset connections, answer garbage or never answer), one thread per connection, recording
//! every request: when it arrived and ended, who sent it (the path names the instance and its
//! incarnation), its Idempotency-Key and what it was answered.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::proxy::reset;
use crate::now_us;
use crate::plan::{behaviour, Behaviour};

/// How a request ended at the receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Still in progress when looked at.
    Open,
    /// The whole answer was written, with this status.
    Answered(u16),
    /// The client closed the connection before the answer (it gave up, or died).
    ClientGone,
    /// We reset or closed the connection without an answer, or wrote a non-HTTP one.
    Dropped,
    /// Held for the longest hang and closed by us.
    GaveUp,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub seq: usize,
    pub slot: usize,
    pub gen: usize,
    pub key: i64,
    /// How many requests with this key came before (0 = first).
    pub n: usize,
    pub behaviour: Behaviour,
    /// Microseconds since the Unix epoch: the request fully read.
    pub arrived: i64,
    /// When it ended (see `end`); `arrived` while still open.
    pub ended: i64,
    pub end: End,
    /// The messageId of a 2xx JSON answer.
    pub remote_id: Option<String>,
}

impl Request {
    /// A 2xx was written to a client that was still waiting.
    pub fn delivered(&self) -> bool {
        matches!(self.end, End::Answered(200..=299))
    }
}

pub struct Config {
    pub seed: u64,
    pub misbehaviour: f64,
    pub exclude: Vec<String>,
}

struct Shared {
    config: Config,
    /// Misbehaviour off: every request gets a plain 202.
    quiet: AtomicBool,
    requests: Mutex<Vec<Request>>,
    per_key: Mutex<HashMap<i64, usize>>,
    stopped: AtomicBool,
}

pub struct Receiver {
    pub port: u16,
    shared: Arc<Shared>,
}

/// The longest a request is held unanswered.
const LONGEST_HANG: Duration = Duration::from_secs(15);

impl Receiver {
    pub fn start(config: Config) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            config,
            quiet: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            per_key: Mutex::new(HashMap::new()),
            stopped: AtomicBool::new(false),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accepting.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let shared = accepting.clone();
                std::thread::spawn(move || serve(stream, &shared));
            }
        });
        Receiver { port, shared }
    }

    pub fn url(&self, slot: usize, gen: usize) -> String {
        format!("http://127.0.0.1:{}/i{slot}/g{gen}", self.port)
    }

    pub fn set_quiet(&self, quiet: bool) {
        self.shared.quiet.store(quiet, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One parsed request: path and Idempotency-Key.
struct Head {
    path: String,
    key: Option<i64>,
}

/// Reads one request off the connection; None at the end of the stream or on garbage.
fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Head> {
    // Idle keep-alive connections stay open far longer than any pause in the campaign: a
    // client that reuses one we had closed would count an attempt we never saw.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3600)));
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_owned();
    let mut length = 0usize;
    let mut chunked = false;
    let mut key = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().ok()?,
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "idempotency-key" => key = value.parse().ok(),
            _ => {}
        }
    }
    buf.drain(..header_end);
    if chunked {
        // size CRLF data CRLF … 0 CRLF CRLF
        let end = loop {
            if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                break i + 5;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..end);
    } else {
        while buf.len() < length {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
    }
    Some(Head { path, key })
}

/// `/i<slot>/g<gen>` → (slot, gen); anything else → (99, 0).
fn sender(path: &str) -> (usize, usize) {
    let mut parts = path.trim_start_matches('/').split('/');
    let slot = parts
        .next()
        .and_then(|p| p.strip_prefix('i'))
        .and_then(|p| p.parse().ok());
    let gen = parts
        .next()
        .and_then(|p| p.strip_prefix('g'))
        .and_then(|p| p.parse().ok());
    match (slot, gen) {
        (Some(s), Some(g)) => (s, g),
        _ => (99, 0),
    }
}

/// Waits `delay` unless the client closes the connection first; true when it did.
fn client_left_during(stream: &mut TcpStream, delay: Duration) -> bool {
    let deadline = Instant::now() + delay;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = stream.set_read_timeout(Some(left.min(Duration::from_millis(20))));
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            // Data while waiting for our answer is not HTTP/1.1 as a client sends it.
            Ok(_) => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
}

fn response(status: u16, reason: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    while let Some(head) = read_request(&mut stream, &mut buf) {
        let arrived = now_us();
        let (slot, gen) = sender(&head.path);
        let key = head.key.unwrap_or(-1);
        let n = {
            let mut per_key = shared.per_key.lock().unwrap();
            let count = per_key.entry(key).or_default();
            *count += 1;
            *count - 1
        };
        let behaviour = if shared.quiet.load(Ordering::SeqCst) {
            Behaviour::Accept(0)
        } else {
            let c = &shared.config;
            behaviour(c.seed, c.misbehaviour, &c.exclude, key, n)
        };
        let seq = {
            let mut all = shared.requests.lock().unwrap();
            let seq = all.len();
            all.push(Request {
                seq,
                slot,
                gen,
                key,
                n,
                behaviour,
                arrived,
                ended: arrived,
                end: End::Open,
                remote_id: None,
            });
            seq
        };
        let remote = format!("r{key}.{n}");
        let (end, remote_id, keep) = answer(&mut stream, behaviour, &remote);
        let ended = now_us();
        {
            let mut all = shared.requests.lock().unwrap();
            let r = &mut all[seq];
            r.ended = ended;
            r.end = end;
            r.remote_id = remote_id;
        }
        if !keep {
            return;
        }
    }
}

/// Answers as `behaviour` says; returns how it ended, the messageId given, and whether the
/// connection stays open for the next request.
fn answer(
    stream: &mut TcpStream,
    behaviour: Behaviour,
    remote: &str,
) -> (End, Option<String>, bool) {
    let json = |id: &str| format!(r#"{{"message":"Accepted","messageId":"{id}"}}"#).into_bytes();
    let write = |stream: &mut TcpStream, bytes: &[u8], status: u16| {
        if stream.write_all(bytes).is_ok() {
            End::Answered(status)
        } else {
            End::ClientGone
        }
    };
    match behaviour {
        Behaviour::Accept(delay) => {
            if client_left_during(stream, Duration::from_millis(delay.into())) {
                return (End::ClientGone, None, false);
            }
            let bytes = response(
                202,
                "Accepted",
                &[("Content-Type", "application/json".into())],
                &json(remote),
            );
            let end = write(stream, &bytes, 202);
            let given = (end == End::Answered(202)).then(|| remote.to_owned());
            (end, given, true)
        }
        Behaviour::AcceptNul => {
            let id = format!("{remote}\\u0000nul");
            let bytes = response(
                202,
                "Accepted",
                &[("Content-Type", "application/json".into())],
                &json(&id),
            );
            let end = write(stream, &bytes, 202);
            let given = (end == End::Answered(202)).then(|| format!("{remote}\u{0}nul"));
            (end, given, true)
        }
        Behaviour::AcceptGarbage => {
            let body = b"\xff\xfe<html>ok\x00{\"messageId\":";
            let bytes = response(200, "OK", &[("Content-Type", "text/html".into())], body);
            (write(stream, &bytes, 200), None, true)
        }
        Behaviour::ServerError(status, delay, retry_after) => {
            if client_left_during(stream, Duration::from_millis(delay.into())) {
                return (End::ClientGone, None, false);
            }
            let mut headers = vec![("Content-Type", "text/plain".to_owned())];
            if let Some(secs) = retry_after {
                headers.push(("Retry-After", secs.to_string()));
            }
            let bytes = response(status, "Oops", &headers, b"server trouble");
            (write(stream, &bytes, status), None, true)
        }
        Behaviour::ServerErrorNul => {
            let bytes = response(
                500,
                "Internal Server Error",
                &[("Content-Type", "text/plain".into())],
                b"broken\x00here",
            );
            (write(stream, &bytes, 500), None, true)
        }
        Behaviour::TooMany(secs) => {
            let bytes = response(
                429,
                "Too Many Requests",
                &[("Retry-After", secs.to_string())],
                b"slow down",
            );
            (write(stream, &bytes, 429), None, true)
        }
        Behaviour::Reset => {
            // Linger 0 on the socket: closing it (when the caller drops it) sends a reset.
            if let Ok(s) = stream.try_clone() {
                reset(s);
            }
            (End::Dropped, None, false)
        }
        Behaviour::Close => {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            (End::Dropped, None, false)
        }
        Behaviour::GarbageStatus => {
            let _ = stream.write_all(b"HTPP/9.9 two hundred\r\n\x00\x01\r\n\r\n");
            let _ = stream.shutdown(std::net::Shutdown::Both);
            (End::Dropped, None, false)
        }
        Behaviour::Hang => {
            if client_left_during(stream, LONGEST_HANG) {
                (End::ClientGone, None, false)
            } else {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                (End::GaveUp, None, false)
            }
        }
        Behaviour::Reject => {
            let bytes = response(
                422,
                "Unprocessable Entity",
                &[("Content-Type", "application/json".into())],
                br#"{"error":"invalid recipient"}"#,
            );
            (write(stream, &bytes, 422), None, true)
        }
    }
}
