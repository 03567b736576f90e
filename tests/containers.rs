//! The deployment channels for real, not just their files: the container image built and run,
//! Compose with three instances, the systemd unit under a real systemd, and the Debian package.
//!
//! One test binary with its own `main` (`harness = false` in Cargo.toml): the steps share one
//! Docker engine, one built image and one systemd root file system, and run one after another
//! (they measure fail-over times and use fixed container names). Each step reports like a
//! libtest test and the run ends with libtest's `test result:` line.
//!
//! What it needs it makes or reuses (tests/containers/setup.sh): a Docker engine (Debian's
//! docker.io, started as `dockerd --bridge=none --iptables=false` when none answers, and stopped
//! at the end); the image (`scripts/image.sh`, static binaries built on the host when no builder
//! image can be pulled); a Debian 12 root fs with systemd (debootstrap, cached); PostgreSQL and
//! Redis stand-in images from Debian's packages; cargo-deb. Every container uses the host's
//! network: all traffic stays on 127.0.0.1. Each container is removed by its id.
//!
//!   cargo test --test containers                 every step
//!   cargo test --test containers -- systemd      the steps whose name contains "systemd"
//!   MD_CONTAINER_TESTS=skip cargo test ...       skip them all, saying so (never silently)

mod common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

const IMAGE: &str = "message-dispatcher:local";
const SYSTEMD_IMAGE: &str = "message-dispatcher-test/systemd:bookworm";
const POSTGRES_IMAGE: &str = "message-dispatcher-test/postgres:15";
const REDIS_IMAGE: &str = "message-dispatcher-test/redis:7";
const MAX_IMAGE_BYTES: u64 = 15_000_000;
const LONG: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------------------ plumbing

fn setup_script() -> PathBuf {
    project_root().join("tests/containers/setup.sh")
}

/// Runs a command, returns its output; panics only if it cannot be started.
fn exec(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// Runs `docker ARGS`, panics unless it succeeds, returns its stdout.
fn docker(args: &[&str]) -> String {
    let out = exec("docker", args);
    assert!(
        out.status.success(),
        "docker {} failed: {}{}",
        args.join(" "),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `docker ARGS` that may fail: (success, stdout + stderr).
fn docker_try(args: &[&str]) -> (bool, String) {
    let out = exec("docker", args);
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

fn inspect(id: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, id])
}

/// A container of this run, removed (by id) when dropped.
struct Container {
    id: String,
    name: String,
}

impl Container {
    /// `docker run -d --network host ARGS`.
    fn run(name: &str, args: &[&str]) -> Container {
        let mut all = vec!["run", "-d", "--network", "host"];
        all.extend_from_slice(args);
        let id = docker(&all);
        Container {
            id,
            name: name.into(),
        }
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.id.as_str()];
        all.extend_from_slice(args);
        exec("docker", &all)
    }

    /// Runs a shell command inside (systemd containers have a shell); panics unless it succeeds.
    fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script]);
        assert!(
            out.status.success(),
            "in {}: `{script}` failed ({}): {}{}",
            self.name,
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn logs(&self) -> String {
        let out = exec("docker", &["logs", &self.id]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    fn state(&self, field: &str) -> String {
        inspect(&self.id, &format!("{{{{.State.{field}}}}}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last logs of {} ---\n{}",
                self.name,
                tail(&self.logs(), 40)
            );
        }
        let _ = exec("docker", &["rm", "-f", "-v", &self.id]);
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// An HTTP GET from the host: the status code, or None while nothing answers.
fn status_of(url: &str) -> Option<u16> {
    request("GET", url, None, &[]).map(|(s, _)| s)
}

fn health(port: u16) -> Option<(u16, serde_json::Value)> {
    get(&format!("http://127.0.0.1:{port}/health"))
}

fn holds_lock(port: u16) -> bool {
    health(port).is_some_and(|(_, h)| h["lock"]["held"] == true)
}

/// The `-e` arguments for `docker run`.
fn env_args(env: &[(&str, String)]) -> Vec<String> {
    env.iter()
        .flat_map(|(k, v)| ["-e".to_string(), format!("{k}={v}")])
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Settings of a dispatcher in a container on the host's network.
fn container_env(db: &TestDb, webhook: &str, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("WEBHOOK_URL", webhook.to_string()),
        ("SERVER_HOST", "127.0.0.1".into()),
        ("SERVER_PORT", port.to_string()),
        ("PROCESSING_INTERVAL", "200ms".into()),
        ("BATCH_SIZE", "10".into()),
        ("WEBHOOK_TIMEOUT", "2s".into()),
        ("MAX_PROCESSING_TIME", "2s".into()),
        ("RETRY_BASE_DELAY", "100ms".into()),
        ("LOG_LEVEL", "debug".into()),
    ]
}

// ------------------------------------------------------------------------------ the steps

/// Static binaries extracted from the image (what users get), for the systemd and .deb steps.
static BINARIES: Mutex<Option<PathBuf>> = Mutex::new(None);

fn image_binaries() -> PathBuf {
    let mut cached = BINARIES.lock().unwrap();
    if let Some(dir) = cached.as_ref() {
        return dir.clone();
    }
    let dir = std::env::temp_dir().join(unique("md_image_bin"));
    std::fs::create_dir_all(&dir).unwrap();
    let id = docker(&["create", IMAGE]);
    for bin in ["message-dispatcher", "add-test-messages", "webhook-sink"] {
        let (ok, out) = docker_try(&[
            "cp",
            &format!("{id}:/app/{bin}"),
            dir.join(bin).to_str().unwrap(),
        ]);
        assert!(ok, "docker cp {bin}: {out}");
    }
    docker(&["rm", &id]);
    *cached = Some(dir.clone());
    dir
}

fn build_image() {
    let out = Command::new(project_root().join("scripts/image.sh"))
        .arg(IMAGE)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(out.success(), "scripts/image.sh failed");
}

fn image_is_small_non_root_with_a_liveness_healthcheck() {
    let size: u64 = inspect(IMAGE, "{{.Size}}").parse().unwrap();
    eprintln!("    image size: {size} bytes ({:.1} MB)", size as f64 / 1e6);
    assert!(
        size <= MAX_IMAGE_BYTES,
        "image is {size} bytes, over {MAX_IMAGE_BYTES}"
    );
    assert_eq!(inspect(IMAGE, "{{.Config.User}}"), "65532:65532");
    assert_eq!(
        inspect(IMAGE, "{{json .Config.Healthcheck.Test}}"),
        r#"["CMD","/app/message-dispatcher","healthcheck","live"]"#
    );
    assert_eq!(
        inspect(IMAGE, "{{json .Config.Entrypoint}}"),
        r#"["/app/message-dispatcher"]"#
    );
    // Nothing but the binaries and the CA bundle: no shell to run.
    let (ok, _) = docker_try(&[
        "run",
        "--rm",
        "--network",
        "host",
        "--entrypoint",
        "/bin/sh",
        IMAGE,
        "-c",
        "true",
    ]);
    assert!(!ok, "the image must have no shell");
}

fn container_delivers_turns_healthy_and_stops_cleanly() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let port = free_port();
    let env = env_args(&container_env(&db, &receiver.url(), port));
    let mut args = vec!["--health-interval", "1s", "--health-start-period", "0s"];
    args.extend(strs(&env));
    args.push(IMAGE);
    let c = Container::run("single", &args);

    wait_until(LONG, "the container's /livez", || {
        status_of(&format!("http://127.0.0.1:{port}/livez")) == Some(200)
    });
    // It runs as 65532, not root: the main process as the host sees it.
    let pid = c.state("Pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65532"),
        "runs as {uid_line}"
    );
    wait_until(LONG, "HEALTHCHECK healthy", || {
        c.state("Health.Status") == "healthy"
    });

    // Delivery, of rows inserted by SQL and by /app/add-test-messages in the container.
    db.insert(5);
    let out = c.exec(&["/app/add-test-messages", "7"]);
    assert!(out.status.success(), "add-test-messages: {out:?}");
    wait_until(LONG, "12 messages sent", || db.count("sent") == 12);
    assert_eq!(receiver.count(), 12);

    // docker stop = SIGTERM: a clean stop, exit 0.
    let t = Instant::now();
    docker(&["stop", "-t", "30", &c.id]);
    eprintln!("    docker stop took {:?}", t.elapsed());
    assert_eq!(c.state("ExitCode"), "0", "{}", tail(&c.logs(), 10));
    assert!(c.logs().contains("Message dispatcher stopped"));

    // The image's webhook-sink (compose's stand-in receiver) stops on SIGTERM too.
    let sink_port = free_port();
    let sink = Container::run(
        "sink",
        &[
            "--entrypoint",
            "/app/webhook-sink",
            IMAGE,
            "--addr",
            &format!("127.0.0.1:{sink_port}"),
        ],
    );
    wait_until(LONG, "webhook-sink listening", || {
        std::net::TcpStream::connect(("127.0.0.1", sink_port)).is_ok()
    });
    let t = Instant::now();
    docker(&["stop", "-t", "10", &sink.id]);
    assert_eq!(sink.state("ExitCode"), "0");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "webhook-sink ignored SIGTERM"
    );
}

fn https_webhook_with_a_private_ca_from_the_environment() {
    let dir = std::env::temp_dir().join(unique("md_https"));
    std::fs::create_dir_all(&dir).unwrap();
    let sh = |cmd: &str| {
        let out = Command::new("sh")
            .args(["-c", cmd])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=md-private-ca \
        -keyout ca.key -out ca.pem 2>/dev/null",
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key \
        -out server.csr 2>/dev/null",
    );
    sh(
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext && \
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile san.ext -out server.pem 2>/dev/null",
    );
    // Readable by the image's user 65532.
    sh("chmod 0755 . && chmod 0644 ca.pem");

    // A TLS receiver answering 202, counting the POSTs it gets.
    let port = free_port();
    let server = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(202); self.send_header("Content-Type", "application/json")
        self.end_headers(); self.wfile.write(b'{"messageId":"tls-ok"}')
        print("POST", self.path, flush=True)
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain("server.pem", "server.key")
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"#;
    let mut tls = Command::new("python3")
        .args(["-c", server, &port.to_string()])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child, PathBuf);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _tls = Kill(&mut tls, dir.clone());
    wait_until(LONG, "the TLS receiver", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let db = TestDb::migrated();
    let url = format!("https://localhost:{port}/hook");
    // Without the CA: the certificate is refused, nothing is delivered.
    let refused_port = free_port();
    let mut args = strs(&env_args(&container_env(&db, &url, refused_port)))
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.push(IMAGE.into());
    let ids = db.insert(1);
    let without = Container::run("https-no-ca", &strs(&args));
    wait_until(LONG, "a failed TLS attempt", || {
        db.row(ids[0]).2.is_some_and(|e| !e.is_empty())
    });
    let (status, _, error, _) = db.row(ids[0]);
    assert_ne!(status, "sent");
    let error = error.unwrap();
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "the failure should name the certificate: {error}"
    );
    drop(without);

    // With SSL_CERT_FILE naming the private CA, mounted read-only: delivered.
    let with_port = free_port();
    let mut env = container_env(&db, &url, with_port);
    env.push(("SSL_CERT_FILE", "/certs/ca.pem".into()));
    let volume = format!("{}:/certs:ro", dir.display());
    let mut args = vec!["-v".to_string(), volume];
    args.extend(env_args(&env));
    args.push(IMAGE.into());
    let _with = Container::run("https-private-ca", &strs(&args));
    db.insert(3);
    wait_until(LONG, "4 messages sent over https", || db.count("sent") == 4);
    let remote: String = db
        .client()
        .query_one(
            "SELECT remote_message_id FROM messages WHERE id = $1",
            &[&ids[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(remote, "tls-ok");
}

fn three_containers_one_sender_failover_and_return() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let key = unique("md:containers:lock");
    let ttl = Duration::from_secs(6);
    let ports = free_ports::<3>();
    let mut instances: Vec<Container> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut env = container_env(
            &db,
            &format!(
                "{}/instance-{}",
                receiver.url().trim_end_matches('/'),
                i + 1
            ),
            *port,
        );
        env.extend([
            ("REDIS_URL", redis_url()),
            ("DISTRIBUTED_LOCK_ENABLED", "true".into()),
            ("DISTRIBUTED_LOCK_KEY", key.clone()),
            ("DISTRIBUTED_LOCK_TTL", format!("{}s", ttl.as_secs())),
        ]);
        let mut args = vec!["--name".to_string(), unique(&format!("md_lease_{}", i + 1))];
        args.extend(env_args(&env));
        args.push(IMAGE.into());
        instances.push(Container::run(&format!("lease-{}", i + 1), &strs(&args)));
    }
    let holders = || ports.iter().filter(|p| holds_lock(**p)).count();
    wait_until(LONG, "one lease holder", || holders() == 1);
    db.insert(30);
    wait_until(LONG, "30 sent", || db.count("sent") == 30);
    // One sender: every request came from the one instance that holds the lease.
    let leader = (0..3).find(|i| holds_lock(ports[*i])).expect("a holder");
    let senders: std::collections::BTreeSet<String> =
        receiver.seen().iter().map(|s| s.path.clone()).collect();
    let holder_path = format!("/instance-{}", leader + 1);
    assert!(
        senders.len() == 1 && senders.iter().all(|p| p.ends_with(&holder_path)),
        "only the holder ({holder_path}) sends: {senders:?}"
    );
    assert_eq!(holders(), 1);
    for (i, c) in instances.iter().enumerate() {
        if i != leader {
            assert!(
                c.logs()
                    .contains("Another instance is processing, skipping this cycle"),
                "standby {} logs its skips",
                i + 1
            );
        }
    }

    // docker stop of the leader: another takes over within the TTL.
    let stopped_at = Instant::now();
    docker(&["stop", "-t", "30", &instances[leader].id]);
    assert_eq!(instances[leader].state("ExitCode"), "0");
    assert!(instances[leader].logs().contains("Lock released"));
    wait_until(ttl, "a new holder within the TTL", || holders() == 1);
    let takeover = stopped_at.elapsed();
    eprintln!("    docker stop of the leader -> new holder after {takeover:?} (TTL {ttl:?})");
    let new_leader = (0..3).find(|i| holds_lock(ports[*i])).unwrap();
    assert_ne!(new_leader, leader);
    db.insert(10);
    wait_until(LONG, "40 sent", || db.count("sent") == 40);

    // docker start: it comes back as a standby.
    docker(&["start", &instances[leader].id]);
    wait_until(LONG, "the restarted instance answers", || {
        health(ports[leader]).is_some()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!holds_lock(ports[leader]), "it came back as a standby");
    assert!(
        holds_lock(ports[new_leader]),
        "the new leader kept the lease"
    );
    wait_until(LONG, "the restarted instance skips as a standby", || {
        instances[leader]
            .logs()
            .rsplit("Message dispatcher started")
            .next()
            .unwrap()
            .contains("Another instance is processing, skipping this cycle")
    });
}

// ------------------------------------------------------------------------------ systemd

/// A Debian 12 container running systemd as PID 1, on the host's network.
fn boot_systemd(name: &str) -> Container {
    let c = Container::run(
        name,
        &[
            "--cap-add",
            "SYS_ADMIN",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "--hostname",
            name,
            SYSTEMD_IMAGE,
            "/lib/systemd/systemd",
        ],
    );
    wait_until(LONG, "systemd running", || {
        let out = c.exec(&["systemctl", "is-system-running"]);
        matches!(text(&out.stdout).as_str(), "running" | "degraded")
    });
    c
}

fn unit_prop(c: &Container, prop: &str) -> String {
    c.sh(&format!(
        "systemctl show -p {prop} --value message-dispatcher"
    ))
}

/// The env file of a test instance: the host's PostgreSQL and the test's receiver.
fn unit_env(db: &TestDb, webhook: &str, port: u16) -> String {
    format!(
        "DATABASE_URL={}\nWEBHOOK_URL={webhook}\nSERVER_HOST=127.0.0.1\nSERVER_PORT={port}\n\
         PROCESSING_INTERVAL=200ms\nBATCH_SIZE=10\nMAX_PROCESSING_TIME=2s\nWEBHOOK_TIMEOUT=2s\n",
        db.url
    )
}

fn write_file(c: &Container, path: &str, mode: &str, content: &str) {
    let local = std::env::temp_dir().join(unique("md_file"));
    std::fs::write(&local, content).unwrap();
    docker(&["cp", local.to_str().unwrap(), &format!("{}:{path}", c.id)]);
    let _ = std::fs::remove_file(local);
    c.sh(&format!("chown root:root {path} && chmod {mode} {path}"));
}

fn wait_restarted(c: &Container, port: u16, restarts_before: u32, old_pid: &str) {
    wait_until(LONG, "systemd restarted the daemon", || {
        let n: u32 = unit_prop(c, "NRestarts").parse().unwrap_or(0);
        n > restarts_before
            && unit_prop(c, "ActiveState") == "active"
            && unit_prop(c, "MainPID") != old_pid
    });
    wait_until(LONG, "/health after the restart", || {
        health(port).is_some_and(|(s, _)| s == 200)
    });
}

fn unit_under_systemd() {
    let bin = image_binaries();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let port = free_port();
    let c = boot_systemd(&unique("md-systemd").replace('_', "-"));
    let version = c.sh("systemctl --version | head -1");
    eprintln!("    {version}");

    // The binary at the unit's path, and the repo's unit unmodified.
    docker(&[
        "cp",
        bin.join("message-dispatcher").to_str().unwrap(),
        &format!("{}:/usr/bin/", c.id),
    ]);
    docker(&[
        "cp",
        project_root()
            .join("systemd/message-dispatcher.service")
            .to_str()
            .unwrap(),
        &format!("{}:/etc/systemd/system/message-dispatcher.service", c.id),
    ]);
    c.sh("install -d -m 0755 /etc/message-dispatcher");
    write_file(
        &c,
        "/etc/message-dispatcher/env",
        "0600",
        &unit_env(&db, &receiver.url(), port),
    );
    c.sh("systemctl daemon-reload");

    // `systemctl start` returns once READY=1 came, which is sent when /health serves.
    c.sh("systemctl start message-dispatcher");
    let (code, body) = health(port).expect("/health answers as soon as start returned");
    assert_eq!(code, 200, "{body}");
    assert_eq!(unit_prop(&c, "ActiveState"), "active");
    assert_eq!(unit_prop(&c, "SubState"), "running");
    db.insert(5);
    wait_until(LONG, "5 sent under systemd", || db.count("sent") == 5);

    // The journal holds the daemon's JSON lines.
    let journal = c.sh("journalctl -u message-dispatcher -o cat --no-pager");
    let json: Vec<serde_json::Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        json.iter()
            .any(|j| j["msg"] == "Message dispatcher started" && j["level"] == "info"),
        "journal: {journal}"
    );

    // The sandbox applies: a dynamic user, no capabilities, no new privileges, a seccomp
    // filter, and a read-only view of the system with a private /tmp.
    let pid = unit_prop(&c, "MainPID");
    let status = c.sh(&format!("cat /proc/{pid}/status"));
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_string())
            .unwrap()
    };
    let uid = field("Uid:");
    assert!(!uid.starts_with("0"), "runs as root: {uid}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapBnd:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    // Root in the service's mount namespace, entered from the host (inside the container even
    // root lacks CAP_SYS_PTRACE to open another user's /proc/PID/ns/mnt).
    let host_pid = docker(&["top", &c.id, "-o", "pid,comm"])
        .lines()
        .find(|l| l.contains("message-dispat"))
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .expect("the daemon in docker top");
    let in_ns = |cmd: &str| exec("nsenter", &["-t", &host_pid, "-m", "--", "sh", "-c", cmd]);
    for path in ["/usr/bin/x", "/etc/x", "/var/lib/x"] {
        let out = in_ns(&format!("touch {path}"));
        assert!(
            !out.status.success(),
            "the service's namespace lets root write {path}"
        );
        assert!(
            text(&out.stderr).contains("Read-only"),
            "{path}: {}",
            text(&out.stderr)
        );
    }
    c.sh("touch /root/outside-secret");
    let home = in_ns("test -e /root/outside-secret");
    assert!(!home.status.success(), "ProtectHome: /root must be hidden");
    assert!(
        in_ns("touch /tmp/private-x").status.success(),
        "its /tmp is writable"
    );
    assert!(
        !c.exec(&["test", "-e", "/tmp/private-x"]).status.success(),
        "its /tmp is private"
    );
    let score = c.sh("systemd-analyze security message-dispatcher --no-pager | tail -1");
    eprintln!("    {score}");
    let value: f64 = score
        .rsplit(": ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in {score:?}"));
    assert!(value <= 2.0, "exposure {value} > 2.0");

    // The watchdog: a daemon stopped with SIGSTOP is killed and restarted (WatchdogSec is
    // shortened by a drop-in here only).
    c.sh(
        "mkdir -p /etc/systemd/system/message-dispatcher.service.d && \
          printf '[Service]\\nWatchdogSec=3s\\nRestartSec=1s\\n' \
          > /etc/systemd/system/message-dispatcher.service.d/test.conf && \
          systemctl daemon-reload && systemctl restart message-dispatcher",
    );
    wait_until(LONG, "/health after the restart", || {
        health(port).is_some_and(|(s, _)| s == 200)
    });
    let restarts: u32 = unit_prop(&c, "NRestarts").parse().unwrap();
    let pid = unit_prop(&c, "MainPID");
    let stopped = Instant::now();
    c.sh(&format!("kill -STOP {pid}"));
    wait_restarted(&c, port, restarts, &pid);
    eprintln!(
        "    SIGSTOP -> watchdog restart after {:?}",
        stopped.elapsed()
    );
    let journal = c.sh("journalctl -u message-dispatcher --no-pager");
    assert!(
        journal.contains("Watchdog timeout"),
        "{}",
        tail(&journal, 20)
    );

    // A crash (SIGKILL) is restarted too.
    let restarts: u32 = unit_prop(&c, "NRestarts").parse().unwrap();
    let pid = unit_prop(&c, "MainPID");
    c.sh(&format!("kill -KILL {pid}"));
    wait_restarted(&c, port, restarts, &pid);
    db.insert(3);
    wait_until(LONG, "8 sent after the restarts", || db.count("sent") == 8);

    // `systemctl stop`: the graceful stop, Result=success.
    c.sh("systemctl stop message-dispatcher");
    assert_eq!(unit_prop(&c, "Result"), "success");
    assert_eq!(unit_prop(&c, "ExecMainStatus"), "0");

    // Bad configuration: exit 2, and no restart.
    c.sh("echo BATCH_SIZE=lots >> /etc/message-dispatcher/env");
    c.sh("systemctl reset-failed message-dispatcher || true");
    let restarts: u32 = unit_prop(&c, "NRestarts").parse().unwrap();
    let started = c.exec(&["systemctl", "start", "message-dispatcher"]);
    assert!(
        !started.status.success(),
        "start with a bad configuration must fail"
    );
    assert_eq!(unit_prop(&c, "ExecMainStatus"), "2");
    std::thread::sleep(Duration::from_secs(3)); // > RestartSec=1s of the drop-in
    assert_eq!(unit_prop(&c, "ActiveState"), "failed");
    assert_eq!(unit_prop(&c, "NRestarts").parse::<u32>().unwrap(), restarts);
    let journal = c.sh("journalctl -u message-dispatcher -o cat --no-pager | tail -5");
    assert!(
        journal.contains("BATCH_SIZE"),
        "the journal names the variable: {journal}"
    );
}

// ------------------------------------------------------------------------------ .deb

fn build_deb() -> PathBuf {
    let out_dir = std::env::temp_dir().join(unique("md_deb"));
    let out = Command::new(project_root().join("scripts/deb.sh"))
        .arg(&out_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/deb.sh failed");
    let deb = PathBuf::from(text(&out.stdout).lines().last().unwrap_or_default());
    assert!(deb.is_file(), "no .deb at {}: {out:?}", deb.display());
    deb
}

fn deb_package_installs_configures_upgrades_and_purges() {
    let deb = build_deb();
    let info = exec("dpkg-deb", &["--info", deb.to_str().unwrap()]);
    let contents = text(&exec("dpkg-deb", &["--contents", deb.to_str().unwrap()]).stdout);
    for path in [
        "./usr/bin/message-dispatcher",
        "./usr/bin/add-test-messages",
        "./usr/bin/webhook-sink",
        "./etc/message-dispatcher/env",
        "message-dispatcher.service",
    ] {
        assert!(
            contents.contains(path),
            "{path} in the package:\n{contents}"
        );
    }
    let env_line = contents
        .lines()
        .find(|l| l.ends_with("./etc/message-dispatcher/env"))
        .unwrap();
    assert!(
        env_line.starts_with("-rw-------"),
        "env is 0600: {env_line}"
    );
    let conffiles = exec("dpkg-deb", &["-I", deb.to_str().unwrap(), "conffiles"]);
    assert!(
        text(&conffiles.stdout).contains("/etc/message-dispatcher/env"),
        "env is a conffile: {info:?}"
    );

    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let port = free_port();
    let c = boot_systemd(&unique("md-deb").replace('_', "-"));
    docker(&[
        "cp",
        deb.to_str().unwrap(),
        &format!("{}:/tmp/md.deb", c.id),
    ]);
    c.sh("dpkg -i /tmp/md.deb");
    // Installed, not started (and not enabled) before it is configured.
    assert_eq!(unit_prop(&c, "ActiveState"), "inactive");
    assert_eq!(
        text(
            &c.exec(&["systemctl", "is-enabled", "message-dispatcher"])
                .stdout
        ),
        "disabled"
    );
    let exec_start = unit_prop(&c, "ExecStart");
    assert!(
        exec_start.contains("path=/usr/bin/message-dispatcher"),
        "{exec_start}"
    );
    assert_eq!(
        c.sh("stat -c '%a %U' /etc/message-dispatcher/env"),
        "600 root"
    );

    // Configure, enable, start, deliver.
    write_file(
        &c,
        "/etc/message-dispatcher/env",
        "0600",
        &unit_env(&db, &receiver.url(), port),
    );
    c.sh("systemctl enable --now message-dispatcher");
    assert!(health(port).is_some_and(|(s, _)| s == 200));
    db.insert(4);
    wait_until(LONG, "4 sent from the package", || db.count("sent") == 4);

    // Upgrade over itself: the edited conffile is kept, the running daemon is restarted (on
    // the new binary) and delivers.
    let pid = unit_prop(&c, "MainPID");
    c.sh("dpkg -i /tmp/md.deb");
    assert_ne!(unit_prop(&c, "MainPID"), pid, "restarted by the upgrade");
    assert!(c
        .sh("cat /etc/message-dispatcher/env")
        .contains(&format!("SERVER_PORT={port}")));
    wait_until(LONG, "running after the upgrade", || {
        unit_prop(&c, "ActiveState") == "active" && health(port).is_some_and(|(s, _)| s == 200)
    });
    eprintln!(
        "    upgrade: main pid {pid} -> {}",
        unit_prop(&c, "MainPID")
    );
    db.insert(2);
    wait_until(LONG, "6 sent after the upgrade", || db.count("sent") == 6);

    // Purge: stopped, and nothing left behind.
    c.sh("dpkg --purge message-dispatcher");
    assert!(health(port).is_none(), "stopped by the purge");
    assert!(!c
        .exec(&["test", "-e", "/etc/message-dispatcher"])
        .status
        .success());
    assert!(!c
        .exec(&["test", "-e", "/usr/bin/message-dispatcher"])
        .status
        .success());
    let _ = std::fs::remove_dir_all(deb.parent().unwrap());
}

// ------------------------------------------------------------------------------ Compose

/// docker-compose 1.29 (Debian 12's), or Compose v2 when that is what the machine has.
fn compose_command() -> Vec<String> {
    // (On a fresh machine there is no docker-compose at all: not an error, the setup installs it.)
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if works("docker-compose", &["version"]) {
        vec!["docker-compose".into()]
    } else if works("docker", &["compose", "version"]) {
        vec!["docker".into(), "compose".into()]
    } else {
        let out = exec(setup_script().to_str().unwrap(), &["compose"]);
        assert!(out.status.success(), "no Compose: {out:?}");
        vec!["docker-compose".into()]
    }
}

/// The shipped multi-instance file, as Compose resolves it, moved onto the host's network:
/// every service `network_mode: host` (no published ports), each server on its own free port
/// of 127.0.0.1, and its own data volume. Everything else — images, commands, health checks,
/// dependencies, container names, the dispatchers' settings — is the file's own.
fn host_network_variant(resolved: &str, ports: &ComposePorts, volume: &str) -> String {
    use serde_yaml_ng::Value;
    let mut doc: Value = serde_yaml_ng::from_str(resolved).unwrap();
    let s = |v: &str| Value::String(v.into());
    let list = |items: &[&str]| Value::Sequence(items.iter().map(|i| s(i)).collect());
    let services = doc["services"].as_mapping_mut().expect("services");
    for (name, service) in services.iter_mut() {
        let name = name.as_str().unwrap().to_string();
        let m = service.as_mapping_mut().unwrap();
        m.remove("ports");
        m.remove("networks");
        service["network_mode"] = s("host");
        match name.as_str() {
            "postgres" => {
                service["environment"]["PGPORT"] = s(&ports.postgres.to_string());
                // Loopback only, on the host's network.
                service["command"] = list(&["postgres", "-c", "listen_addresses=127.0.0.1"]);
                service["healthcheck"]["interval"] = s("1s");
                service["healthcheck"]["retries"] = Value::Number(60.into());
            }
            "redis" => {
                let p = ports.redis.to_string();
                service["command"] = list(&[
                    "redis-server",
                    "--port",
                    &p,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]);
                service["healthcheck"]["test"] = list(&["CMD", "redis-cli", "-p", &p, "ping"]);
                service["healthcheck"]["interval"] = s("1s");
                service["healthcheck"]["retries"] = Value::Number(60.into());
            }
            "webhook-sink" => {
                service["command"] = list(&["--addr", &format!("127.0.0.1:{}", ports.sink)]);
            }
            dispatcher => {
                let n: usize = dispatcher.rsplit('-').next().unwrap().parse().unwrap();
                for (k, v) in [
                    ("DB_HOST", "127.0.0.1".to_string()),
                    ("DB_PORT", ports.postgres.to_string()),
                    ("REDIS_HOST", "127.0.0.1".into()),
                    ("REDIS_PORT", ports.redis.to_string()),
                    ("SERVER_HOST", "127.0.0.1".into()),
                    ("SERVER_PORT", ports.dispatchers[n - 1].to_string()),
                    (
                        "WEBHOOK_URL",
                        format!("http://127.0.0.1:{}/webhook", ports.sink),
                    ),
                ] {
                    service["environment"][k] = s(&v);
                }
                // Quicker health checks, so `up` needs no long wait (the check is the same).
                service["healthcheck"]["interval"] = s("2s");
                service["healthcheck"]["start_period"] = s("0s");
            }
        }
    }
    if let Some(m) = doc.as_mapping_mut() {
        m.remove("networks");
    }
    doc["volumes"]["postgres-data"]["name"] = s(volume);
    // JSON, which Compose reads as YAML: no YAML 1.1 reading of `no` as false by 1.29.
    serde_json::to_string_pretty(&doc).unwrap()
}

struct ComposePorts {
    postgres: u16,
    redis: u16,
    sink: u16,
    dispatchers: [u16; 3],
}

fn compose_quick_start_three_instances_failover_and_return() {
    let compose = compose_command();
    let file = project_root().join("compose/docker-compose.multi-instance.yml");
    let mut version_args: Vec<&str> = compose[1..].iter().map(String::as_str).collect();
    version_args.push("version");
    let version = exec(&compose[0], &version_args);
    eprintln!(
        "    {}",
        text(&version.stdout).lines().next().unwrap_or_default()
    );
    let run_compose = |args: &[&str], env: &[(&str, &str)]| -> Output {
        let mut cmd = Command::new(&compose[0]);
        cmd.args(&compose[1..]).args(args).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let images = [
        ("POSTGRES_IMAGE", POSTGRES_IMAGE),
        ("REDIS_IMAGE", REDIS_IMAGE),
    ];
    // The shipped file, resolved by Compose itself (anchors, merges, the image variables).
    let resolved = run_compose(&["-f", file.to_str().unwrap(), "config"], &images);
    assert!(
        resolved.status.success(),
        "compose config: {}",
        text(&resolved.stderr)
    );
    let resolved = text(&resolved.stdout);
    assert!(resolved.contains(POSTGRES_IMAGE) && resolved.contains(REDIS_IMAGE));

    let [postgres, redis, sink, d1, d2, d3] = free_ports();
    let ports = ComposePorts {
        postgres,
        redis,
        sink,
        dispatchers: [d1, d2, d3],
    };
    let project = unique("mdcompose").replace('_', "");
    let volume = format!("{project}_postgres-data");
    let dir = std::env::temp_dir().join(&project);
    std::fs::create_dir_all(&dir).unwrap();
    let variant = dir.join("docker-compose.multi-instance.yml");
    std::fs::write(&variant, host_network_variant(&resolved, &ports, &volume)).unwrap();
    let f = variant.to_str().unwrap().to_string();
    let base = ["-p", project.as_str(), "-f", f.as_str()];
    let with = |more: &[&str]| -> Vec<String> {
        base.iter()
            .chain(more.iter())
            .map(|s| s.to_string())
            .collect()
    };
    struct Down<'a>(&'a dyn Fn(&[&str]) -> Output, Vec<String>, PathBuf);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let logs = (self.0)(&strs(
                    &[self.1.clone(), vec!["logs".into(), "--no-color".into()]].concat(),
                ));
                eprintln!("--- compose logs ---\n{}", tail(&text(&logs.stdout), 60));
            }
            let args = [
                self.1.clone(),
                vec!["down".into(), "-v".into(), "-t".into(), "20".into()],
            ]
            .concat();
            let _ = (self.0)(&strs(&args));
            let _ = std::fs::remove_dir_all(&self.2);
        }
    }
    // The file's fixed container names must be free: never remove someone's running quick start.
    for name in [
        "message_dispatcher_1",
        "message_dispatcher_2",
        "message_dispatcher_3",
        "messages_postgres_ha",
        "messages_redis_ha",
        "messages_webhook_sink_ha",
    ] {
        let (exists, _) = docker_try(&["inspect", "-f", "{{.Id}}", name]);
        assert!(!exists, "a container named {name} exists already (a quick start running here?): remove it, then run again");
    }
    let call = |args: &[&str]| run_compose(args, &images);
    let _down = Down(&call, with(&[]), dir.clone());

    // The quick start: up, three dispatchers, one holds the lease.
    let t = Instant::now();
    let up = call(&strs(&with(&["up", "-d"])));
    assert!(up.status.success(), "compose up: {}", text(&up.stderr));
    eprintln!("    compose up -d: {:?}", t.elapsed());
    let holders = || ports.dispatchers.iter().filter(|p| holds_lock(**p)).count();
    wait_until(
        LONG,
        "three dispatchers healthy, one holding the lease",
        || {
            ports
                .dispatchers
                .iter()
                .all(|p| health(*p).is_some_and(|(s, _)| s == 200))
                && holders() == 1
        },
    );
    for i in 1..=3 {
        wait_until(LONG, "compose health check healthy", || {
            inspect(
                &format!("message_dispatcher_{i}"),
                "{{.State.Health.Status}}",
            ) == "healthy"
        });
    }

    // docker exec message_dispatcher_1 /app/add-test-messages, as the quick start does.
    let out = exec(
        "docker",
        &[
            "exec",
            "message_dispatcher_1",
            "/app/add-test-messages",
            "10",
        ],
    );
    assert!(out.status.success(), "add-test-messages: {out:?}");
    let db_url = format!(
        "postgres://postgres:postgres@127.0.0.1:{}/messages",
        ports.postgres
    );
    let sent = || -> i64 {
        postgres::Client::connect(&db_url, postgres::NoTls)
            .and_then(|mut c| {
                c.query_one("SELECT count(*) FROM messages WHERE status = 'sent'", &[])
            })
            .map(|r| r.get(0))
            .unwrap_or(-1)
    };
    wait_until(LONG, "10 test messages sent", || sent() == 10);
    let logs = text(&call(&strs(&with(&["logs", "--no-color"]))).stdout);
    assert_eq!(
        logs.matches("\"Lock acquired\"").count(),
        1,
        "one Lock acquired:\n{}",
        tail(&logs, 30)
    );
    assert!(logs.contains("Another instance is processing, skipping this cycle"));
    let lock = exec(
        "docker",
        &[
            "exec",
            "messages_redis_ha",
            "redis-cli",
            "-p",
            &ports.redis.to_string(),
            "GET",
            "message-dispatcher:lock",
        ],
    );
    assert!(
        !text(&lock.stdout).is_empty(),
        "the lease key holds a token"
    );

    // docker stop of the leader: another takes the lease.
    let leader = (1..=3)
        .find(|i| holds_lock(ports.dispatchers[i - 1]))
        .unwrap();
    let stopped_at = Instant::now();
    docker(&["stop", &format!("message_dispatcher_{leader}")]);
    wait_until(
        Duration::from_secs(15),
        "a new holder within the TTL (15s)",
        || holders() == 1,
    );
    eprintln!(
        "    compose: docker stop of the leader -> new holder after {:?}",
        stopped_at.elapsed()
    );
    let new_leader = (1..=3)
        .find(|i| holds_lock(ports.dispatchers[i - 1]))
        .unwrap();
    assert_ne!(new_leader, leader);
    let out = exec(
        "docker",
        &[
            "exec",
            &format!("message_dispatcher_{new_leader}"),
            "/app/add-test-messages",
            "6",
        ],
    );
    assert!(out.status.success());
    wait_until(LONG, "16 sent after the failover", || sent() == 16);

    // docker start: back as a standby.
    docker(&["start", &format!("message_dispatcher_{leader}")]);
    wait_until(LONG, "the old leader answers again", || {
        health(ports.dispatchers[leader - 1]).is_some_and(|(s, _)| s == 200)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !holds_lock(ports.dispatchers[leader - 1]),
        "it came back as a standby"
    );
    assert_eq!(holders(), 1);

    let down = call(&strs(&with(&["down", "-v", "-t", "20"])));
    assert!(
        down.status.success(),
        "compose down: {}",
        text(&down.stderr)
    );
    let (gone, _) = docker_try(&["inspect", "message_dispatcher_1"]);
    assert!(!gone, "down removed the containers");
}

// ------------------------------------------------------------------------------ main

type Step = (&'static str, fn());

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filter: Option<&String> = args.iter().find(|a| !a.starts_with('-'));
    let steps: &[Step] = &[
        ("image_builds", build_image),
        (
            "image_is_small_non_root_with_a_liveness_healthcheck",
            image_is_small_non_root_with_a_liveness_healthcheck,
        ),
        (
            "container_delivers_turns_healthy_and_stops_cleanly",
            container_delivers_turns_healthy_and_stops_cleanly,
        ),
        (
            "https_webhook_with_a_private_ca_from_the_environment",
            https_webhook_with_a_private_ca_from_the_environment,
        ),
        (
            "three_containers_one_sender_failover_and_return",
            three_containers_one_sender_failover_and_return,
        ),
        (
            "systemd_unit_starts_delivers_is_sandboxed_and_restarts",
            unit_under_systemd,
        ),
        (
            "deb_package_installs_configures_upgrades_and_purges",
            deb_package_installs_configures_upgrades_and_purges,
        ),
        (
            "compose_quick_start_three_instances_failover_and_return",
            compose_quick_start_three_instances_failover_and_return,
        ),
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in steps {
            println!("{name}: test");
        }
        return;
    }
    let chosen: Vec<&Step> = steps
        .iter()
        .filter(|(name, _)| {
            filter.is_none_or(|f| name.contains(f.as_str()) || *name == "image_builds")
        })
        .collect();
    let started = Instant::now();
    if std::env::var("MD_CONTAINER_TESTS").as_deref() == Ok("skip") {
        println!("SKIPPED: MD_CONTAINER_TESTS=skip; the image, Compose, systemd and .deb were NOT tested");
        println!("\ntest result: ok. 0 passed; 0 failed; {} ignored; 0 measured; 0 filtered out; finished in 0.00s\n", chosen.len());
        return;
    }
    println!("\nrunning {} container steps", chosen.len());

    // The engine, and the images the steps share.
    let engine = exec(setup_script().to_str().unwrap(), &["engine"]);
    if !engine.status.success() {
        println!(
            "FAILED: no Docker engine could be started, so the container tests cannot run: {}",
            text(&engine.stderr)
        );
        println!("\ntest result: FAILED. 0 passed; {} failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s\n", chosen.len(), started.elapsed().as_secs_f64());
        std::process::exit(101);
    }
    let engine_pid: Option<u32> = text(&engine.stdout)
        .strip_prefix("started ")
        .and_then(|p| p.parse().ok());
    if let Some(pid) = engine_pid {
        eprintln!("[setup] started dockerd, pid {pid}; it is stopped at the end");
    }
    let needs = |prefix: &str| chosen.iter().any(|(n, _)| n.starts_with(prefix));
    // The root fs and the stand-in images are mostly downloads: made in the background while
    // the image's binaries compile.
    let mut prep_steps = Vec::new();
    if needs("systemd") || needs("deb") || needs("compose") {
        prep_steps.push(format!("{} base", setup_script().display()));
    }
    if needs("compose") {
        prep_steps.push(format!("{} standins", setup_script().display()));
    }
    let mut prep = (!prep_steps.is_empty()).then(|| {
        Command::new("bash")
            .args(["-c", &prep_steps.join(" && ")])
            .stdin(Stdio::null())
            .spawn()
            .expect("bash")
    });
    let (mut passed, mut failed) = (0, 0);
    let mut failures = Vec::new();
    let mut image_ok = true;
    for (name, step) in chosen {
        let t = Instant::now();
        if *name != "image_builds" {
            if let Some(mut child) = prep.take() {
                let t = Instant::now();
                let status = child.wait().expect("setup");
                eprintln!(
                    "[setup] root fs and stand-ins ready ({status}; waited {:?})",
                    t.elapsed()
                );
            }
        }
        let result = if !image_ok && *name != "image_builds" {
            Err("the image was not built".to_string())
        } else {
            std::panic::catch_unwind(AssertUnwindSafe(step)).map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into())
            })
        };
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1}s)", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                failed += 1;
                if *name == "image_builds" {
                    image_ok = false;
                }
                println!("test {name} ... FAILED ({:.1}s)", t.elapsed().as_secs_f64());
                failures.push((name, e));
            }
        }
    }
    if let Some(dir) = BINARIES.lock().unwrap().take() {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Some(pid) = engine_pid {
        eprintln!("[teardown] stopping dockerd (pid {pid})");
        let _ = exec("kill", &["-TERM", &pid.to_string()]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for (name, e) in &failures {
        println!("\n---- {name} ----\n{e}");
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s\n",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(101);
    }
}
