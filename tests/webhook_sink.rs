//! webhook-sink, the bundled test receiver: a delayed request holds no handler thread, so many
//! wait at once; the answers and the per-request line keep their format; SIGTERM ends it at once
//! even with requests waiting.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// A webhook-sink child process, its stdout lines arriving on a channel; killed by pid if the
/// test ends without stopping it.
struct Sink {
    child: Child,
    url: String,
    lines: mpsc::Receiver<String>,
}

impl Sink {
    fn start(args: &[&str]) -> Sink {
        let port = free_port();
        let mut child = Command::new(WEBHOOK_SINK)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        wait_until(Duration::from_secs(10), "webhook-sink listening", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Sink {
            child,
            url: format!("http://127.0.0.1:{port}"),
            lines,
        }
    }

    /// The next `n` printed lines, waiting at most `timeout` in all.
    fn take_lines(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        (0..n)
            .map(|i| {
                let left = deadline.saturating_duration_since(Instant::now());
                self.lines.recv_timeout(left).unwrap_or_else(|_| {
                    panic!("webhook-sink printed only {i} of {n} lines within {timeout:?}")
                })
            })
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// POSTs a message with `Idempotency-Key: key`; (status, body, how long the answer took).
fn try_post(url: &str, key: usize) -> Result<(u16, String, Duration), ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let started = Instant::now();
    let mut response = agent
        .post(format!("{url}/webhook/{key}"))
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", key.to_string())
        .send(format!(
            r#"{{"to":"+905550000001","content":"message {key}"}}"#
        ))?;
    let body = response.body_mut().read_to_string()?;
    Ok((response.status().as_u16(), body, started.elapsed()))
}

fn post(url: &str, key: usize) -> (u16, String, Duration) {
    try_post(url, key).unwrap_or_else(|e| panic!("request {key} was not answered: {e}"))
}

/// POSTs `n` requests at once, one connection each; their answers by key.
fn post_concurrently(url: &str, n: usize) -> Vec<(u16, String, Duration)> {
    let threads: Vec<_> = (0..n)
        .map(|key| {
            let url = url.to_owned();
            std::thread::spawn(move || post(&url, key))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn delayed_requests_wait_concurrently_without_holding_handler_threads() {
    // One handler thread and 40 clients with a 1 s delay: if the delay held the handler, the
    // answers would come one a second (40 s); waiting together they all come after about 1 s.
    const CLIENTS: usize = 40;
    let delay = Duration::from_secs(1);
    let sink = Sink::start(&["--delay", "1s", "--threads", "1"]);
    let started = Instant::now();
    let answers = post_concurrently(&sink.url, CLIENTS);
    let took = started.elapsed();

    let mut ids = HashSet::new();
    for (key, (status, body, elapsed)) in answers.iter().enumerate() {
        assert_eq!(*status, 202, "request {key}: {body}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["message"], "Accepted", "request {key}: {body}");
        let id = json["messageId"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "request {key}: {body}");
        assert!(ids.insert(id.to_owned()), "messageId {id} given twice");
        assert_eq!(json.as_object().unwrap().len(), 2, "request {key}: {body}");
        assert!(
            *elapsed >= delay,
            "request {key} was answered after {elapsed:?}, before its {delay:?} delay"
        );
    }
    assert!(
        took < Duration::from_secs(15),
        "{CLIENTS} requests delayed 1 s with one handler thread took {took:?}: they waited one \
         after another (sequentially: {CLIENTS} s), not together"
    );

    // One line per request, in the old format: `#N POST /path key=K -> 202 BODY`.
    let lines = sink.take_lines(CLIENTS, Duration::from_secs(10));
    let mut numbers = HashSet::new();
    let mut keys = HashSet::new();
    for line in &lines {
        let (number, rest) = line.split_once(' ').unwrap();
        numbers.insert(number.strip_prefix('#').unwrap().parse::<usize>().unwrap());
        let (path, rest) = rest.strip_prefix("POST ").unwrap().split_once(' ').unwrap();
        let key = path.strip_prefix("/webhook/").unwrap();
        assert_eq!(
            rest,
            format!(r#"key={key} -> 202 {{"to":"+905550000001","content":"message {key}"}}"#),
            "{line}"
        );
        keys.insert(key.parse::<usize>().unwrap());
    }
    assert_eq!(numbers, (1..=CLIENTS).collect(), "{lines:#?}");
    assert_eq!(keys, (0..CLIENTS).collect(), "{lines:#?}");
}

#[test]
fn delayed_failures_keep_their_count_and_no_delay_answers_at_once() {
    // --fail-every still counts every request, delayed or not.
    let sink = Sink::start(&[
        "--delay",
        "200ms",
        "--threads",
        "2",
        "--fail-every",
        "2",
        "--quiet",
    ]);
    let answers = post_concurrently(&sink.url, 10);
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 503).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 202).count(),
        5,
        "{statuses:?}"
    );
    for (status, body, elapsed) in &answers {
        assert!(*elapsed >= Duration::from_millis(200), "{elapsed:?}");
        if *status == 503 {
            assert_eq!(body, r#"{"error":"simulated failure"}"#);
        }
    }

    // Without --delay the answer comes at once (well within the 1 s a delay would need).
    let sink = Sink::start(&["--status", "500", "--quiet"]);
    let (status, body, elapsed) = post(&sink.url, 1);
    assert_eq!(
        (status, body.as_str()),
        (500, r#"{"error":"simulated failure"}"#)
    );
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
}

#[test]
fn sigterm_ends_it_at_once_with_requests_waiting() {
    let mut sink = Sink::start(&["--delay", "60s"]);
    let url = sink.url.clone();
    // The clients see their connections close; their outcome does not matter here.
    for key in 0..3 {
        let url = url.clone();
        std::thread::spawn(move || {
            let _ = try_post(&url, key);
        });
    }
    sink.take_lines(3, Duration::from_secs(10));
    let sent = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &sink.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = loop {
        if let Some(status) = sink.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "webhook-sink still running 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn speaks_http_1_1_pipelining_chunked_bodies_and_http_1_0() {
    let sink = Sink::start(&["--delay", "100ms", "--threads", "1"]);
    let addr = sink.url.trim_start_matches("http://").to_owned();
    let exchange = |request: &[u8]| -> String {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut answer = Vec::new();
        // Every exchange here ends with the server closing the connection.
        stream.read_to_end(&mut answer).unwrap();
        String::from_utf8(answer).unwrap()
    };

    // Two pipelined requests on one connection, the second chunked and the last: both answered,
    // in order, then the connection closes.
    let answer = exchange(
        b"POST /one HTTP/1.1\r\nHost: x\r\nIdempotency-Key: 1\r\nContent-Length: 5\r\n\r\nfirst\
          POST /two HTTP/1.1\r\nHost: x\r\nIdempotency-Key: 2\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n3;x=y\r\nsec\r\n3\r\nond\r\n0\r\nTrailer: t\r\n\r\n",
    );
    let answers: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 2, "{answer}");
    for (i, a) in answers.iter().enumerate() {
        assert!(a.starts_with("202 Accepted\r\n"), "{answer}");
        assert!(a.contains("Content-Type: application/json\r\n"), "{answer}");
        assert!(
            a.contains(r#"{"message":"Accepted","messageId":""#),
            "{answer}"
        );
        assert_eq!(a.contains("Connection: close\r\n"), i == 1, "{answer}");
    }
    assert_eq!(
        sink.take_lines(2, Duration::from_secs(10)),
        [
            "#1 POST /one key=1 -> 202 first",
            "#2 POST /two key=2 -> 202 second"
        ]
    );

    // HTTP/1.0 without keep-alive: answered, then closed.
    let answer = exchange(b"POST /old HTTP/1.0\r\nContent-Length: 3\r\n\r\nold");
    assert!(answer.starts_with("HTTP/1.1 202 Accepted\r\n"), "{answer}");
    assert!(answer.contains("Connection: close\r\n"), "{answer}");

    // Not HTTP: 400, closed, and nothing counted.
    let answer = exchange(b"hello there\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert_eq!(
        sink.take_lines(1, Duration::from_secs(10)),
        ["#3 POST /old key= -> 202 old"]
    );
}
