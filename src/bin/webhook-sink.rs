//! `webhook-sink`: a local receiver that answers like the real webhook
//! (202 `{"message":"Accepted","messageId":<uuid>}`), for the demo and benchmarks. Flags make it
//! slow or failing, to watch retries and failover.
//!
//! Each connection has a thread of its own that reads its requests (HTTP/1.1 with keep-alive,
//! `Content-Length` or chunked bodies) and writes their answers. `--threads` handler threads take
//! the requests read, count them, decide their status and print their line. Without `--delay`
//! the handler answers at once. With it, the handler hands the answer, due `--delay` after the
//! request was read, to the scheduler thread and takes the next request: the delay is the same
//! for every request, so a FIFO channel holds them in due order and the scheduler sleeps only
//! until the front one is due, then passes it to the connection's thread. A delayed request holds
//! no handler thread, so the rate is bounded by the connections (`connections / delay`), not by
//! `--threads`.
//!
//! It does not use tiny_http (the daemon's API server): tiny_http hands connections to a thread
//! pool that queues a new connection behind busy ones when it arrives while an idle thread is
//! still waking up, and a keep-alive connection keeps its thread busy until it closes, so under
//! a burst of connections (any load test) some were never read while the others stayed open.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

const USAGE: &str = "\
Usage: webhook-sink [--addr HOST:PORT] [--status CODE] [--fail-every N] [--delay DURATION]
                    [--threads N] [--quiet]

Accepts POSTs on any path and answers 202 {\"message\":\"Accepted\",\"messageId\":\"<uuid>\"},
printing one line per request as it arrives.

  --addr HOST:PORT   where to listen (default 0.0.0.0:9090)
  --status CODE      answer every request with CODE instead of 202
  --fail-every N     answer every Nth request with 503 (e.g. 3: one in three fails)
  --delay DURATION   answer this long after the request arrived (e.g. 200ms); waiting requests
                     hold no thread, so any number of connections wait at the same time
  --threads N        handler threads, which count the requests and decide the answers (default 8)
  --quiet            do not print a line per request";

/// The most a request's line and headers, and its body, may take.
const MAX_HEAD: u64 = 64 * 1024;
const MAX_BODY: u64 = 16 * 1024 * 1024;

struct Options {
    addr: String,
    status: u16,
    fail_every: u64,
    delay: Duration,
    threads: usize,
    quiet: bool,
}

/// A request read by its connection's thread, for a handler.
struct Incoming {
    method: String,
    target: String,
    key: String,
    body: String,
    /// Where the connection's thread waits for the answer.
    reply: Sender<Answer>,
}

/// An answer: status and JSON body.
struct Answer {
    status: u16,
    body: String,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1).collect()) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("webhook-sink: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match listen(&options.addr) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("webhook-sink: cannot listen on {}: {e}", options.addr);
            return ExitCode::from(1);
        }
    };
    eprintln!("webhook-sink: listening on {}", options.addr);
    // SIGTERM/SIGINT end it at once, with 0: as PID 1 of a container (compose's webhook-sink)
    // a signal without a handler is ignored, and `docker stop` would wait 10 s to SIGKILL it.
    // Requests still waiting for their delay are not answered; their connections just close.
    let _ = ctrlc::set_handler(|| std::process::exit(0));
    let scheduler = (!options.delay.is_zero()).then(start_scheduler);
    let (requests, incoming) = crossbeam_channel::unbounded::<Incoming>();
    let options = Arc::new(options);
    let counter = Arc::new(AtomicU64::new(0));
    for _ in 0..options.threads {
        let (incoming, options, counter) = (incoming.clone(), options.clone(), counter.clone());
        let scheduler = scheduler.clone();
        std::thread::spawn(move || handle(&incoming, &options, &counter, scheduler.as_ref()));
    }
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let requests = requests.clone();
                let spawned = std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || serve_connection(stream, &requests));
                if let Err(e) = spawned {
                    eprintln!("webhook-sink: no thread for a connection: {e}");
                }
            }
            Err(e) => {
                // Out of file descriptors, say: wait a little instead of spinning.
                eprintln!("webhook-sink: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    ExitCode::SUCCESS
}

/// A listener with a long accept queue: std's `listen` backlog of 128 overflows when a load test
/// opens hundreds of connections at once, and each connection whose SYN was dropped then waits a
/// second or more for the retransmit before its first request.
fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    // Listening again on a listening socket only changes its backlog (the kernel caps it at
    // net.core.somaxconn); should it fail, the old backlog stays, which is fine.
    #[cfg(unix)]
    // SAFETY: `listen` on the socket's own descriptor, which `listener` keeps open.
    unsafe {
        libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096);
    }
    Ok(listener)
}

/// The scheduler thread; returns where to send `(due, where to answer, answer)`, in due order.
fn start_scheduler() -> Sender<(Instant, Sender<Answer>, Answer)> {
    let (due_tx, due_rx) = crossbeam_channel::unbounded::<(Instant, Sender<Answer>, Answer)>();
    std::thread::spawn(move || {
        for (due, reply, answer) in due_rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // The connection's thread writes it (a send here never blocks); if the connection
            // closed meanwhile, nobody waits for it.
            let _ = reply.send(answer);
        }
    });
    due_tx
}

/// A handler thread: counts each request, decides its status, prints its line and answers it,
/// now or through the scheduler.
fn handle(
    incoming: &Receiver<Incoming>,
    options: &Options,
    counter: &AtomicU64,
    scheduler: Option<&Sender<(Instant, Sender<Answer>, Answer)>>,
) {
    for request in incoming {
        let due = Instant::now() + options.delay;
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let status = if options.fail_every > 0 && n % options.fail_every == 0 {
            503
        } else {
            options.status
        };
        if !options.quiet {
            println!(
                "#{n} {} {} key={} -> {status} {}",
                request.method, request.target, request.key, request.body
            );
        }
        let reply = if (200..300).contains(&status) {
            serde_json::json!({"message": "Accepted", "messageId": uuid::Uuid::new_v4().to_string()})
        } else {
            serde_json::json!({"error": "simulated failure"})
        };
        let answer = Answer {
            status,
            body: reply.to_string(),
        };
        match scheduler {
            // The channel is FIFO and every request waits the same delay, so it stays in due
            // order (up to the few microseconds between two handlers taking the time).
            Some(scheduler) => {
                let _ = scheduler.send((due, request.reply, answer));
            }
            None => {
                let _ = request.reply.send(answer);
            }
        }
    }
}

/// The request line and the headers that matter here.
struct Head {
    method: String,
    target: String,
    key: Option<String>,
    length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
    http10: bool,
    expects_continue: bool,
}

/// A connection's thread: reads its requests one after another, hands each to the handlers and
/// writes its answer when it comes; ends when the client closes, asks to, or sends nonsense.
fn serve_connection(stream: TcpStream, requests: &Sender<Incoming>) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let head = match read_head(&mut reader) {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(Bad(status)) => {
                let _ = write_answer(&mut writer, status, "", false, false, false);
                return;
            }
        };
        if head.expects_continue && writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        let body = match read_body(&mut reader, &head) {
            Ok(body) => body,
            Err(Bad(status)) => {
                let _ = write_answer(&mut writer, status, "", false, false, false);
                return;
            }
        };
        let (reply, answer) = crossbeam_channel::bounded(1);
        let request = Incoming {
            method: head.method.clone(),
            target: head.target,
            key: head.key.unwrap_or_default(),
            body: String::from_utf8_lossy(&body).into_owned(),
            reply,
        };
        if requests.send(request).is_err() {
            return;
        }
        let Ok(answer) = answer.recv() else {
            return;
        };
        let written = write_answer(
            &mut writer,
            answer.status,
            &answer.body,
            head.method == "HEAD",
            head.keep_alive,
            head.http10,
        );
        if written.is_err() || !head.keep_alive {
            return;
        }
    }
}

/// A request that cannot be read: answered with this status, then the connection closes.
struct Bad(u16);

impl From<std::io::Error> for Bad {
    fn from(_: std::io::Error) -> Bad {
        Bad(400)
    }
}

/// One line of the head, without its CRLF; None at the end of the stream.
fn read_line(reader: &mut BufReader<TcpStream>, left: &mut u64) -> Result<Option<String>, Bad> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(*left).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    *left -= n as u64;
    if line.last() != Some(&b'\n') {
        // Cut off by the limit, or the stream ended mid-line.
        return Err(Bad(if *left == 0 { 431 } else { 400 }));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    // Bytes that are not UTF-8 (in a header value, say) are shown as U+FFFD, not refused.
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// The next request's head; None when the client closed the connection between requests.
fn read_head(reader: &mut BufReader<TcpStream>) -> Result<Option<Head>, Bad> {
    let mut left = MAX_HEAD;
    // Empty lines before a request line are allowed (RFC 9112 §2.2).
    let request_line = loop {
        match read_line(reader, &mut left) {
            Ok(None) => return Ok(None),
            Ok(Some(line)) if line.is_empty() => continue,
            Ok(Some(line)) => break line,
            Err(e) => return Err(e),
        }
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Bad(400));
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(Bad(505)),
        _ => return Err(Bad(400)),
    };
    if method.is_empty() || target.is_empty() {
        return Err(Bad(400));
    }
    let mut head = Head {
        method: method.to_owned(),
        target: target.to_owned(),
        key: None,
        length: None,
        chunked: false,
        keep_alive: !http10,
        http10,
        expects_continue: false,
    };
    loop {
        let line = read_line(reader, &mut left)?.ok_or(Bad(400))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or(Bad(400))?;
        if name.is_empty() || name.ends_with([' ', '\t']) || line.starts_with([' ', '\t']) {
            return Err(Bad(400));
        }
        let value = value.trim_matches([' ', '\t']);
        let tokens = || value.split(',').map(|t| t.trim().to_ascii_lowercase());
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let length: u64 = value.parse().map_err(|_| Bad(400))?;
                if head.length.is_some_and(|l| l != length) {
                    return Err(Bad(400));
                }
                head.length = Some(length);
            }
            "transfer-encoding" => {
                if tokens().next_back().as_deref() != Some("chunked") {
                    return Err(Bad(501));
                }
                head.chunked = true;
            }
            "connection" => {
                if tokens().any(|t| t == "close") {
                    head.keep_alive = false;
                } else if tokens().any(|t| t == "keep-alive") {
                    head.keep_alive = true;
                }
            }
            "expect" => {
                if !value.eq_ignore_ascii_case("100-continue") {
                    return Err(Bad(417));
                }
                head.expects_continue = !http10;
            }
            "idempotency-key" if head.key.is_none() => head.key = Some(value.to_owned()),
            _ => {}
        }
    }
    if head.chunked && head.length.is_some() {
        return Err(Bad(400));
    }
    Ok(Some(head))
}

/// The body: `Content-Length` bytes, or the chunks of a chunked one (trailers skipped).
fn read_body(reader: &mut BufReader<TcpStream>, head: &Head) -> Result<Vec<u8>, Bad> {
    let mut body = Vec::new();
    if !head.chunked {
        let length = head.length.unwrap_or(0);
        if length > MAX_BODY {
            return Err(Bad(413));
        }
        reader.by_ref().take(length).read_to_end(&mut body)?;
        return if body.len() as u64 == length {
            Ok(body)
        } else {
            Err(Bad(400))
        };
    }
    let mut left = MAX_HEAD;
    loop {
        let line = read_line(reader, &mut left)?.ok_or(Bad(400))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| Bad(400))?;
        if size == 0 {
            break;
        }
        if body.len() as u64 + size > MAX_BODY {
            return Err(Bad(413));
        }
        let before = body.len();
        reader.by_ref().take(size).read_to_end(&mut body)?;
        if (body.len() - before) as u64 != size
            || !read_line(reader, &mut left)?.is_some_and(|l| l.is_empty())
        {
            return Err(Bad(400));
        }
    }
    // Trailer fields, up to the empty line.
    while !read_line(reader, &mut left)?.ok_or(Bad(400))?.is_empty() {}
    Ok(body)
}

/// Writes one answer (JSON, or nothing for an error of our own) in one write.
fn write_answer(
    writer: &mut TcpStream,
    status: u16,
    body: &str,
    head_only: bool,
    keep_alive: bool,
    http10: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nDate: {}\r\n",
        reason(status),
        httpdate::fmt_http_date(SystemTime::now())
    );
    // 1xx, 204 and 304 answers have no body (`--status 204` makes such answers).
    let bodiless = status < 200 || status == 204 || status == 304;
    let body = if bodiless { "" } else { body };
    if !bodiless {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if !body.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    } else if http10 {
        out.push_str("Connection: keep-alive\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    writer.write_all(out.as_bytes())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

fn parse(args: Vec<String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        addr: "0.0.0.0:9090".into(),
        status: 202,
        fail_every: 0,
        delay: Duration::ZERO,
        threads: 8,
        quiet: false,
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name}: needs a value"));
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--addr" => options.addr = value("--addr")?,
            "--status" => {
                let raw = value("--status")?;
                options.status =
                    raw.parse()
                        .ok()
                        .filter(|c| (100..=599).contains(c))
                        .ok_or(format!(
                            "--status: expected an HTTP status code, got {raw:?}"
                        ))?;
            }
            "--fail-every" => {
                let raw = value("--fail-every")?;
                options.fail_every = raw
                    .parse()
                    .map_err(|_| format!("--fail-every: expected a whole number, got {raw:?}"))?;
            }
            "--delay" => {
                let raw = value("--delay")?;
                options.delay = humantime::parse_duration(&raw).map_err(|e| {
                    format!("--delay: expected a duration like 200ms, got {raw:?} ({e})")
                })?;
            }
            "--threads" => {
                let raw = value("--threads")?;
                options.threads = raw
                    .parse()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or(format!("--threads: expected 1 to 1024, got {raw:?}"))?;
            }
            "--quiet" => options.quiet = true,
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    Ok(Some(options))
}
