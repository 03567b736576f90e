//! `webhook-sink`: a local receiver that answers like the real webhook
//! (202 `{"message":"Accepted","messageId":<uuid>}`), for the demo and benchmarks. Flags make it
//! slow or failing, to watch retries and failover.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tiny_http::{Header, Response, Server};

const USAGE: &str = "\
Usage: webhook-sink [--addr HOST:PORT] [--status CODE] [--fail-every N] [--delay DURATION]
                    [--threads N] [--quiet]

Accepts POSTs on any path and answers 202 {\"message\":\"Accepted\",\"messageId\":\"<uuid>\"},
printing one line per request.

  --addr HOST:PORT   where to listen (default 0.0.0.0:9090)
  --status CODE      answer every request with CODE instead of 202
  --fail-every N     answer every Nth request with 503 (e.g. 3: one in three fails)
  --delay DURATION   wait this long before answering (e.g. 200ms)
  --threads N        handler threads (default 8)
  --quiet            do not print a line per request";

struct Options {
    addr: String,
    status: u16,
    fail_every: u64,
    delay: Duration,
    threads: usize,
    quiet: bool,
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
    let server = match Server::http(&options.addr) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            eprintln!("webhook-sink: cannot listen on {}: {e}", options.addr);
            return ExitCode::from(1);
        }
    };
    eprintln!("webhook-sink: listening on {}", options.addr);
    // SIGTERM/SIGINT end it at once, with 0: as PID 1 of a container (compose's webhook-sink)
    // a signal without a handler is ignored, and `docker stop` would wait 10 s to SIGKILL it.
    let _ = ctrlc::set_handler(|| std::process::exit(0));
    let options = Arc::new(options);
    let counter = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..options.threads)
        .map(|_| {
            let (server, options, counter) = (server.clone(), options.clone(), counter.clone());
            std::thread::spawn(move || serve(&server, &options, &counter))
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
    ExitCode::SUCCESS
}

fn serve(server: &Server, options: &Options, counter: &AtomicU64) {
    let json = Header::from_bytes("Content-Type", "application/json").expect("valid header");
    while let Ok(mut request) = server.recv() {
        let mut body = String::new();
        let _ = request.as_reader().read_to_string(&mut body);
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if !options.delay.is_zero() {
            std::thread::sleep(options.delay);
        }
        let status = if options.fail_every > 0 && n % options.fail_every == 0 {
            503
        } else {
            options.status
        };
        let key = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Idempotency-Key"))
            .map(|h| h.value.as_str().to_owned())
            .unwrap_or_default();
        if !options.quiet {
            println!(
                "#{n} {} {} key={key} -> {status} {body}",
                request.method(),
                request.url()
            );
        }
        let reply = if (200..300).contains(&status) {
            serde_json::json!({"message": "Accepted", "messageId": uuid::Uuid::new_v4().to_string()})
        } else {
            serde_json::json!({"error": "simulated failure"})
        };
        let response = Response::from_string(reply.to_string())
            .with_status_code(status)
            .with_header(json.clone());
        let _ = request.respond(response);
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
