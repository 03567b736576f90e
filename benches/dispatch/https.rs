//! The `https` phase (issue #14): real webhooks are https.
//!
//! The private nginx also serves https (`procs::Nginx`): a throwaway CA and a certificate for
//! `localhost` / 127.0.0.1 signed by it, made with the `openssl` command in the scratch directory;
//! TLS 1.2 and 1.3, keep-alive, a shared session cache and session tickets. At WORKER_COUNT
//! connections, one after the other: wrk over https (the receiver's limit over TLS), the bare loop
//! of the dispatcher's `Webhook::deliver` over https (SSL_CERT_FILE = the CA) and a drain of the
//! backlog by the real daemon over https. nginx logs each connection's first request, so the
//! report says how many TLS handshakes each made, and how many resumed a session.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::procs::{self, find, Sink, Workdir};
use crate::report::thousands;
use crate::{bare_loop, drain_to, say, Drain, Result, Sender, Settings, Variant, BODY, DISPATCHER};

/// The drain's BATCH_SIZE when no sweep ran before (BENCH_ONLY=https).
const ALONE_BATCH_SIZE: u32 = 500;
/// Requests of the resumption check, each on a new connection.
const RECONNECTS: usize = 3;

/// The throwaway CA (for SSL_CERT_FILE) and the server's certificate and key (for nginx).
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    /// An ECDSA P-256 CA and a server certificate for `localhost` and 127.0.0.1 signed by it,
    /// valid for two days, in `work`/tls.
    fn make(openssl: &Path, work: &Workdir) -> Result<Certs> {
        let dir = work.path("tls");
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("server.ext"),
            "subjectAltName = DNS:localhost, IP:127.0.0.1\n\
             basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\n",
        )?;
        let serial = format!(
            "0x{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let steps: [&[&str]; 3] = [
            &[
                &["req", "-x509"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
                &["-subj", "/CN=message-dispatcher bench throwaway CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
            &[
                &["req", "-new"],
                &ec[..],
                &["-keyout", "server.key", "-out", "server.csr"],
                &["-subj", "/CN=localhost"],
            ]
            .concat(),
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-sha256",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        ];
        for args in steps {
            let out = Command::new(openssl)
                .current_dir(&dir)
                .args(args)
                .output()?;
            if !out.status.success() {
                return Err(format!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
        }
        Ok(Certs {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        })
    }
}

/// The certificates for nginx when the phase will run, or why it will not.
pub fn prepare(s: &Settings, work: &Workdir) -> Result<std::result::Result<Certs, String>> {
    let nginx = find("nginx");
    let why = if !s.wants("https") {
        "not asked for (BENCH_ONLY)"
    } else if s.nginx == Some(false) {
        "BENCH_SINK=webhook-sink"
    } else if nginx.is_none() {
        "nginx is not installed"
    } else if find("openssl").is_none() {
        "the openssl command is not installed"
    } else {
        ""
    };
    if !why.is_empty() {
        return Ok(Err(why.into()));
    }
    let built = Command::new(nginx.expect("checked above"))
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    if !built.contains("http_ssl_module") {
        return Ok(Err("nginx is built without http_ssl_module".into()));
    }
    let openssl = find("openssl").expect("checked above");
    Ok(Ok(Certs::make(&openssl, work)?))
}

/// The plain-http figures of the same run, when their phases ran.
pub struct Plain<'a> {
    pub wrk: Option<f64>,
    pub bare: Option<f64>,
    pub drain: Option<&'a Drain>,
}

/// The TLS connections nginx saw during one measurement.
#[derive(Default)]
pub struct Handshakes {
    pub connections: usize,
    pub resumed: usize,
    pub protocols: Vec<String>,
}

impl Handshakes {
    fn describe(&self) -> String {
        format!(
            "{} TLS handshake{} ({}; {} resumed a session)",
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            if self.protocols.is_empty() {
                "no protocol logged".into()
            } else {
                self.protocols.join(", ")
            },
            self.resumed
        )
    }
}

/// Runs `measure` and counts the https connections nginx logged meanwhile.
fn counting<T>(
    nginx: &procs::Nginx,
    measure: impl FnOnce() -> Result<T>,
) -> Result<(T, Handshakes)> {
    let before = nginx.handshakes().len();
    let value = measure()?;
    let mut h = Handshakes::default();
    for (resumed, protocol) in nginx.handshakes().into_iter().skip(before) {
        h.connections += 1;
        h.resumed += usize::from(resumed);
        if !h.protocols.contains(&protocol) {
            h.protocols.push(protocol);
        }
    }
    Ok((value, h))
}

/// A client on the daemon's TLS stack (ureq with rustls, the CA as its only root) making
/// [`RECONNECTS`] requests, each on a new connection: does it resume its session when it has to
/// reconnect, and does the receiver let it? (The daemon itself keeps its connections.)
fn reconnecting(url: &str, ca: &Path) -> Result<()> {
    use ureq::tls::{RootCerts, TlsConfig};
    let roots = message_dispatcher::webhook::load_roots(ca)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_idle_connections(0)
        .max_idle_connections_per_host(0)
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::from(roots))
                .build(),
        )
        .build()
        .into();
    for _ in 0..RECONNECTS {
        let mut answer = agent
            .post(url)
            .header("Content-Type", "application/json")
            .header("Connection", "close")
            .send(BODY.as_bytes())?;
        answer.body_mut().read_to_vec()?;
        if !answer.status().is_success() {
            return Err(format!("the https receiver answered {}", answer.status()).into());
        }
    }
    Ok(())
}

pub struct HttpsRun {
    /// The resumption check: [`RECONNECTS`] connections, all but the first can resume.
    pub reconnect: Handshakes,
    pub wrk: Option<(f64, Handshakes)>,
    pub bare: (f64, Handshakes),
    pub drain: (Drain, Handshakes),
    pub plain_wrk: Option<f64>,
    pub plain_bare: Option<f64>,
    /// The best plain-http drain of the run: its BATCH_SIZE and msgs/s, CPU / 1,000 msgs.
    pub plain_drain: Option<(u32, f64, f64)>,
}

/// The phase's results; `skipped` says why there are none.
#[derive(Default)]
pub struct HttpsPhase {
    pub run: Option<HttpsRun>,
    pub skipped: Option<String>,
}

/// wrk, the bare loop and a drain over https, when wanted and possible. The smoke run does the
/// bare loop for half a second and drains its small backlog (no wrk).
pub fn phase(
    s: &Settings,
    work: &Workdir,
    sink: &Sink,
    certs: std::result::Result<Certs, String>,
    plain: &Plain,
) -> Result<HttpsPhase> {
    if !s.wants("https") {
        return Ok(HttpsPhase::default());
    }
    let skip = |why: String| {
        say(&format!("https phase skipped: {why}"));
        Ok(HttpsPhase {
            run: None,
            skipped: Some(why),
        })
    };
    let certs = match certs {
        Ok(c) => c,
        Err(why) => return skip(why),
    };
    let Some((nginx, url)) = sink.nginx().and_then(|n| Some((n, n.https_url()?))) else {
        return skip("the receiver is not nginx".into());
    };
    say(&format!("https receiver: nginx at {url}"));
    let ((), reconnect) = counting(nginx, || reconnecting(&url, &certs.ca))?;
    say(&format!(
        "resumption check (ureq + rustls, a new connection per request): {}",
        reconnect.describe()
    ));

    let wrk = match find("wrk") {
        Some(_) if s.full && s.wrk_secs > 0 => {
            let (rate, h) = counting(nginx, || {
                procs::wrk(work, &url, s.wrk_threads, s.workers, s.wrk_secs)
            })?;
            say(&format!(
                "wrk -t{} -c{} -d{}s over https: {rate:.0} requests/s, {}",
                s.wrk_threads,
                s.workers,
                s.wrk_secs,
                h.describe()
            ));
            Some((rate, h))
        }
        _ => None,
    };

    let secs = if s.full { s.bare_secs } else { 0.5 };
    let (rate, h) = counting(nginx, || {
        bare_loop(&url, Some(&certs.ca), s.workers, secs, Sender::Deliver)
    })?;
    say(&format!(
        "bare loop over https (Webhook::deliver, {} threads, one agent): {rate:.0} msgs/s, {}",
        s.workers,
        h.describe()
    ));
    let bare = (rate, h);

    let batch = plain.drain.map_or(
        if s.full {
            ALONE_BATCH_SIZE
        } else {
            s.batch_sizes[0]
        },
        |d| d.batch_size,
    );
    let env = [("SSL_CERT_FILE", certs.ca.display().to_string())];
    let variant = Variant {
        binary: std::path::Path::new(DISPATCHER),
        env: &env,
    };
    let (d, h) = counting(nginx, || {
        drain_to(s, &url, work, batch, 0, "https", variant)
    })?;
    say(&format!("over https: {}; {}", d.describe(), h.describe()));

    Ok(HttpsPhase {
        run: Some(HttpsRun {
            reconnect,
            wrk,
            bare,
            drain: (d, h),
            plain_wrk: plain.wrk,
            plain_bare: plain.bare,
            plain_drain: plain
                .drain
                .map(|d| (d.batch_size, d.rate, d.cpu_ms_per_1000)),
        }),
        skipped: None,
    })
}

/// The phase's rows of the headline table (no targets).
pub fn rows(phase: &HttpsPhase, s: &Settings) -> Vec<String> {
    let Some(r) = &phase.run else {
        return match (&phase.skipped, s.full) {
            (Some(why), true) => vec![format!("| https receiver | not measured: {why} | | — |")],
            _ => Vec::new(),
        };
    };
    let mut rows = Vec::new();
    let times =
        |rate: f64, of: Option<f64>, what: &str| of.map(|o| format!("{:.2}× {what}", rate / o));
    let tls_wrk = r.wrk.as_ref().map(|(w, _)| *w);
    if let Some((rate, h)) = &r.wrk {
        rows.push(format!(
            "| https receiver (the same nginx: TLS 1.2/1.3, a throwaway CA, session cache and tickets): `wrk -t{} -c{} -d{}s` over https | {} req/s{}; {} | | — |",
            s.wrk_threads,
            s.workers,
            s.wrk_secs,
            thousands(*rate),
            times(*rate, r.plain_wrk, "plain wrk").map_or(String::new(), |t| format!(" = {t}")),
            h.describe()
        ));
    }
    let (bare, h) = &r.bare;
    let parts: Vec<String> = [
        times(*bare, tls_wrk, "wrk over TLS"),
        times(*bare, r.plain_bare, "the plain bare loop"),
    ]
    .into_iter()
    .flatten()
    .collect();
    rows.push(format!(
        "| bare loop over https: {} threads, the dispatcher's `Webhook::deliver`, SSL_CERT_FILE = the CA, no database | {} msgs/s{}; {} | | — |",
        s.workers,
        thousands(*bare),
        if parts.is_empty() {
            String::new()
        } else {
            format!(" = {}", parts.join(", "))
        },
        h.describe()
    ));
    let (d, h) = &r.drain;
    let parts: Vec<String> = [
        times(d.rate, tls_wrk, "wrk over TLS"),
        times(d.rate, Some(*bare), "bare over TLS"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let plain = r.plain_drain.map_or(String::new(), |(batch, rate, _)| {
        format!(
            "; plain http {} msgs/s (BATCH_SIZE {batch}), so https = {:.2}×",
            thousands(rate),
            d.rate / rate
        )
    });
    rows.push(format!(
        "| **dispatch over https**: {} backlog, BATCH_SIZE={}, insert committed → last `sent_at` | **{} msgs/s** = {}{plain} | | — |",
        thousands(f64::from(d.messages)),
        d.batch_size,
        thousands(d.rate),
        parts.join(", ")
    ));
    rows.push(format!(
        "| … its peak RSS (VmHWM); CPU per 1,000 messages (dispatcher's utime + stime) | {:.1} MB; {:.0} ms{} | | — |",
        d.peak_rss_kb as f64 * 1024.0 / 1e6,
        d.cpu_ms_per_1000,
        r.plain_drain
            .map_or(String::new(), |(_, _, cpu)| format!(" ({cpu:.0} ms over http)"))
    ));
    let workers = s.workers as usize;
    let kept = if h.connections <= workers {
        "at most one connection per worker, kept alive for the whole drain"
    } else if h.connections <= workers * 2 {
        "kept alive (the pool holds up to 2 × WORKER_COUNT idle connections)"
    } else {
        "more connections than the pool holds: connections are not all kept alive"
    };
    rows.push(format!(
        "| … TLS handshakes the daemon made for those {} messages (nginx logs each connection's first request) | {}: {kept}. A client on the same stack (ureq + rustls) reconnecting for each of {RECONNECTS} requests: {} of {} connections resumed | | — |",
        thousands(f64::from(d.messages)),
        h.describe(),
        r.reconnect.resumed,
        r.reconnect.connections
    ));
    rows
}
