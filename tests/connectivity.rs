//! Production connections against private servers the tests start themselves: PostgreSQL with
//! TLS (a cluster of our own with a certificate we make), Redis over TLS, and Redis Sentinel
//! following a master failover.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use message_dispatcher::store::MIGRATION_LOCK;

use common::servers::*;
use common::*;

const LONG: Duration = Duration::from_secs(60);

/// A CA and a server certificate for `localhost` only (no IP address), in a temp dir readable
/// by the postgres user.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make() -> Certs {
        let dir = std::env::temp_dir().join(unique("md_certs"));
        std::fs::create_dir_all(&dir).unwrap();
        let sh = |script: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=md-test-ca \
            -keyout ca.key -out ca.pem",
        );
        sh("openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr");
        std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
        sh(
            "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile san.ext -out server.pem",
        );
        sh("chmod 755 . && chmod 644 ca.pem server.pem && chmod 600 server.key");
        Certs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private cluster serving TLS with the test's certificate (readable by the postgres user).
fn postgres_with_tls(certs: &Certs) -> PrivatePg {
    if is_root() {
        let out = Command::new("chown")
            .arg("-R")
            .arg("postgres:")
            .arg(&certs.dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "chown: {out:?}");
    }
    let cert = certs.path("server.pem").display().to_string();
    let key = certs.path("server.key").display().to_string();
    PrivatePg::start_with(&[
        ("ssl", "on"),
        ("ssl_cert_file", &cert),
        ("ssl_key_file", &key),
    ])
    .expect("PostgreSQL server binaries are installed on this kind of machine")
}

#[test]
fn postgres_over_tls_require_and_verify_full() {
    let certs = Certs::make();
    let pg = postgres_with_tls(&certs);
    let receiver = Receiver::start();
    let ca = certs.path("ca.pem");

    // require: encrypted, certificate not checked (libpq's meaning).
    let require = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
        pg.port
    );
    // verify-full against the name in the certificate.
    let verify = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.display()
    );
    for url in [&require, &verify] {
        migrate(url);
    }
    pg.client("postgres")
        .batch_execute("INSERT INTO messages (recipient, content) SELECT 'r' || g, 'c' || g FROM generate_series(1, 20) g")
        .unwrap();

    let daemon = Daemon::start(&env_for_url(&verify, &receiver.url()));
    wait_until(LONG, "delivery over TLS", || {
        pg.count("postgres", "sent") == 20
    });
    let tls_connections: i64 = pg
        .client("postgres")
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name LIKE 'message-dispatcher/%' AND s.ssl",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(tls_connections >= 1, "the daemon's connections use TLS");
    drop(daemon);

    // The same over DB_SSL_ROOT_CERT instead of sslrootcert.
    let mut env = env_for_url(
        &format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full",
            pg.port
        ),
        &receiver.url(),
    );
    env.push(("DB_SSL_ROOT_CERT".into(), ca.display().to_string()));
    let out = run(DISPATCHER, &["migrate"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn verify_full_refuses_a_certificate_for_another_host() {
    let certs = Certs::make();
    let pg = postgres_with_tls(&certs);
    // The certificate names localhost; 127.0.0.1 is not in it.
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        certs.path("ca.pem").display()
    );
    let out = try_migrate(&url);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1"), "names the host: {stderr}");
    assert!(
        stderr.contains("certificate not valid for name"),
        "says why: {stderr}"
    );

    // verify-ca checks the chain only, so the same host passes.
    let url = url.replace("verify-full", "verify-ca");
    migrate(&url);

    // A CA that did not sign the server's certificate fails verify-ca too.
    let other = Certs::make();
    let url = url.replace(
        certs.path("ca.pem").to_str().unwrap(),
        other.path("ca.pem").to_str().unwrap(),
    );
    let out = try_migrate(&url);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
}

fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_lease_works_over_rediss() {
    let certs = Certs::make();
    let port = free_port();
    let tls_args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        certs.path("server.pem").to_str().unwrap(),
        "--tls-key-file",
        certs.path("server.key").to_str().unwrap(),
        "--tls-ca-cert-file",
        certs.path("ca.pem").to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _redis = PrivateRedis::start_with(port, tls_args).expect("redis-server is installed");
    let ca = certs.path("ca.pem");
    let cli = |args: &[&str]| {
        let mut all = vec![
            "--tls",
            "--cacert",
            ca.to_str().unwrap(),
            "-h",
            "localhost",
            "-p",
        ];
        let p = port.to_string();
        all.push(&p);
        all.extend_from_slice(args);
        redis_cli(&all)
    };
    wait_until(LONG, "the TLS redis", || cli(&["PING"]) == "PONG");

    let db = TestDb::migrated();
    let receiver = Receiver::start();
    db.insert(10);
    let key = unique("md:tls:lock");
    let mut env = daemon_env(&db, &receiver.url());
    for (k, v) in [
        ("DISTRIBUTED_LOCK_ENABLED", "true"),
        ("DISTRIBUTED_LOCK_TTL", "10s"),
        ("MAX_PROCESSING_TIME", "2s"),
        ("REDIS_URL", &format!("rediss://localhost:{port}/")),
        ("REDIS_CA_CERT", ca.to_str().unwrap()),
        ("DISTRIBUTED_LOCK_KEY", &key),
    ] {
        set(&mut env, k, v);
    }
    let out = run(DISPATCHER, &["check-config"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains(&format!("REDIS_URL=rediss://localhost:{port}/")));

    let daemon = Daemon::start(&env);
    daemon.wait_log("Lock acquired", LONG);
    wait_until(LONG, "delivery under the TLS lease", || {
        db.count("sent") == 10
    });
    assert!(cli(&["GET", &key])
        .starts_with(daemon.health().unwrap().1["instance_id"].as_str().unwrap()));
    let (status, health) = daemon.health().unwrap();
    assert_eq!(
        (status, health["dependencies"]["redis"].as_str()),
        (200, Some("healthy"))
    );
}

#[test]
fn the_lease_follows_a_sentinel_failover() {
    let master_port = free_port();
    let replica_port = free_port();
    let mut master = PrivateRedis::start_with(master_port, Vec::new()).expect("redis-server");
    let master_addr = format!("127.0.0.1 {master_port}");
    let replica_of = vec![
        "--replicaof".into(),
        "127.0.0.1".into(),
        master_port.to_string(),
    ];
    let _replica = PrivateRedis::start_with(replica_port, replica_of).expect("redis-server");
    wait_until(LONG, "the replica in sync", || {
        redis_cli(&["-p", &replica_port.to_string(), "INFO", "replication"])
            .contains("master_link_status:up")
    });

    let dir = std::env::temp_dir().join(unique("md_sentinel"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut sentinels = Vec::new();
    let mut sentinel_addrs = Vec::new();
    for i in 0..3 {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster {master_addr} 2\n\
                 sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n\
                 sentinel parallel-syncs mymaster 1\n",
                dir.display()
            ),
        )
        .unwrap();
        sentinels.push(PrivateRedis::sentinel(port, conf).expect("redis-server --sentinel"));
        sentinel_addrs.push(format!("127.0.0.1:{port}"));
    }
    for s in &sentinels {
        wait_until(LONG, "the sentinels to see each other", || {
            redis_cli(&["-p", &s.port.to_string(), "SENTINEL", "master", "mymaster"])
                .contains("num-other-sentinels\n2")
        });
    }

    let db = TestDb::migrated();
    let receiver = Receiver::start();
    receiver.respond_with(|_, _| Answer::accepted().delay(Duration::from_millis(20)));
    db.insert(400);
    let key = unique("md:sentinel:lock");
    let mut env = daemon_env(&db, &receiver.url());
    for (k, v) in [
        ("DISTRIBUTED_LOCK_ENABLED", "true"),
        ("DISTRIBUTED_LOCK_TTL", "3s"),
        ("MAX_PROCESSING_TIME", "1s"),
        ("WEBHOOK_TIMEOUT", "1s"),
        ("BATCH_SIZE", "5"),
        ("REDIS_SENTINELS", &sentinel_addrs.join(",")),
        ("REDIS_SENTINEL_MASTER", "mymaster"),
        ("DISTRIBUTED_LOCK_KEY", &key),
        ("REDIS_URL", "redis://127.0.0.1:1/"),
    ] {
        set(&mut env, k, v);
    }
    let out = run(DISPATCHER, &["check-config"], &env);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("REDIS_SENTINEL_MASTER=mymaster"), "{shown}");
    let a = Daemon::spawn("a", &env);
    let b = Daemon::spawn("b", &env);
    a.wait_healthy_or_degraded();
    b.wait_healthy_or_degraded();
    wait_until(LONG, "some deliveries", || db.count("sent") >= 40);

    master.stop();
    wait_until(LONG, "the sentinels to promote the replica", || {
        redis_cli(&[
            "-p",
            &sentinels[0].port.to_string(),
            "SENTINEL",
            "get-master-addr-by-name",
            "mymaster",
        ])
        .contains(&replica_port.to_string())
    });
    wait_until(
        Duration::from_secs(120),
        "every message delivered after the failover",
        || db.count("sent") == 400,
    );
    let keys = receiver.keys();
    assert_eq!(keys.len(), 400, "nothing lost");
    let repeats: usize = keys.values().map(|n| n - 1).sum();
    assert!(
        repeats <= 10,
        "repeats bounded by what was in flight: {repeats}"
    );
    // Each message was recorded once: `sent` rows carry exactly one attempt unless repeated.
    let double_marked: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM messages WHERE status = 'sent' AND attempts > 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(double_marked as usize <= repeats);
    let acquired = a.log_lines("Lock acquired").len() + b.log_lines("Lock acquired").len();
    assert!(acquired >= 2, "the lease was taken again on the new master");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP listener that accepts connections and never answers: a hung Sentinel (or a hung
/// proxy in front of one). Stops listening when dropped.
struct Silent {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Silent {
    fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    held.push(stream);
                }
            }
        });
        Silent {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A Redis master watched by one Sentinel of its own (quorum 1), as `mymaster`.
struct Watched {
    _master: PrivateRedis,
    sentinel: PrivateRedis,
    dir: PathBuf,
}

impl Watched {
    fn start() -> Watched {
        let master = PrivateRedis::start_with(free_port(), Vec::new()).expect("redis-server");
        let dir = std::env::temp_dir().join(unique("md_sentinel"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n",
                dir.display(),
                master.port
            ),
        )
        .unwrap();
        let sentinel = PrivateRedis::sentinel(port, conf).expect("redis-server --sentinel");
        let p = port.to_string();
        wait_until(LONG, "the sentinel to name the master", || {
            redis_cli(&["-p", &p, "SENTINEL", "get-master-addr-by-name", "mymaster"])
                .contains(&master.port.to_string())
        });
        Watched {
            _master: master,
            sentinel,
            dir,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.sentinel.port)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The environment of a daemon whose lease lives on the master `sentinels` name.
fn sentinel_env(db: &TestDb, receiver: &Receiver, sentinels: &[&str]) -> Vec<(String, String)> {
    let mut env = daemon_env(db, &receiver.url());
    for (k, v) in [
        ("DISTRIBUTED_LOCK_ENABLED", "true"),
        ("DISTRIBUTED_LOCK_TTL", "3s"),
        ("MAX_PROCESSING_TIME", "1s"),
        ("WEBHOOK_TIMEOUT", "1s"),
        ("REDIS_SENTINELS", &sentinels.join(",")),
        ("REDIS_SENTINEL_MASTER", "mymaster"),
        ("DISTRIBUTED_LOCK_KEY", &unique("md:sentinel:lock")),
        ("REDIS_URL", "redis://127.0.0.1:1/"),
    ] {
        set(&mut env, k, v);
    }
    env
}

/// A hung Sentinel first in REDIS_SENTINELS is skipped after the Redis I/O timeout: the lease
/// is taken on the master the next Sentinel names, messages go out, and /health answers.
#[test]
fn a_hung_sentinel_is_skipped() {
    let silent = Silent::start();
    let watched = Watched::start();
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    db.insert(20);
    let env = sentinel_env(&db, &receiver, &[&silent.addr, &watched.addr()]);

    let started = Instant::now();
    let daemon = Daemon::spawn("dispatcher", &env);
    daemon.wait_log("Lock acquired", Duration::from_secs(20));
    eprintln!("lease acquired after {:?}", started.elapsed());
    wait_until(Duration::from_secs(20), "delivery under the lease", || {
        db.count("sent") == 20
    });
    eprintln!("all delivered after {:?}", started.elapsed());

    let asked = Instant::now();
    let (status, health) = daemon.health().expect("/health answers");
    eprintln!("/health answered in {:?}", asked.elapsed());
    assert_eq!(
        (status, health["dependencies"]["redis"].as_str()),
        (200, Some("healthy")),
        "{health}"
    );
    assert!(asked.elapsed() < Duration::from_secs(4));
}

/// With every Sentinel hung, Redis is unavailable — said within a bounded time — rather than
/// the whole daemon hanging: /health answers 503 within seconds and SIGTERM stops it at once.
#[test]
fn only_hung_sentinels_make_redis_unavailable_without_a_hang() {
    let (one, two) = (Silent::start(), Silent::start());
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let env = sentinel_env(&db, &receiver, &[&one.addr, &two.addr]);

    let started = Instant::now();
    let mut daemon = Daemon::spawn("dispatcher", &env);
    daemon.wait_log(
        "Redis unavailable, cannot take the lock",
        Duration::from_secs(10),
    );
    eprintln!("Redis unavailable logged after {:?}", started.elapsed());
    let warning = &daemon.log_lines("Redis unavailable, cannot take the lock")[0];
    let error = warning["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&one.addr) && error.contains(&two.addr),
        "the error names the Sentinels: {error}"
    );

    daemon.wait_log("Message dispatcher started", Duration::from_secs(10));
    let asked = Instant::now();
    let (status, health) = daemon.health().expect("/health answers");
    eprintln!("/health answered in {:?}", asked.elapsed());
    assert_eq!(
        (status, health["dependencies"]["redis"].as_str()),
        (503, Some("unhealthy")),
        "{health}"
    );
    assert!(asked.elapsed() < Duration::from_secs(4));

    daemon.signal("TERM");
    let stopping = Instant::now();
    let status = daemon.wait_exit(Duration::from_secs(10));
    eprintln!("stopped {:?} after SIGTERM", stopping.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(
        daemon.log_lines("Message dispatcher stopped").len() == 1,
        "a clean stop"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "within MAX_PROCESSING_TIME + WEBHOOK_TIMEOUT"
    );
}

/// While another instance holds the migration lock, `serve` says it waits, and SIGTERM stops
/// it at once (exit 0); once the lock is free, the next start migrates and serves.
#[test]
fn sigterm_while_waiting_for_another_instances_migration() {
    let db = TestDb::new();
    let receiver = Receiver::start();
    let mut holder = db.client();
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .unwrap();
    let env = daemon_env(&db, &receiver.url());

    let mut first = Daemon::spawn("first", &env);
    first.wait_log(
        "Waiting for another instance's migration",
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    let waiting = first.log_lines("Waiting for another instance's migration");
    assert_eq!(waiting.len(), 1, "said once");
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        waiting[0]["holder"].as_str(),
        Some(format!("pid {holder_pid}").as_str()),
        "names the session holding the lock"
    );
    first.signal("TERM");
    let stopping = Instant::now();
    let status = first.wait_exit(Duration::from_secs(5));
    eprintln!("stopped {:?} after SIGTERM", stopping.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(stopping.elapsed() < Duration::from_secs(1));
    assert!(first.log_lines("Migration applied").is_empty());

    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .unwrap();
    let second = Daemon::spawn("second", &env);
    second.wait_log("Migration applied", Duration::from_secs(20));
    second.wait_healthy_or_degraded();
    assert_eq!(second.health().unwrap().0, 200);
    assert!(second
        .log_lines("Waiting for another instance's migration")
        .is_empty());
}

/// A migration that would wait behind another session's lock gives up after lock_timeout:
/// exit 1 with a message that says so; the next run, once the lock is gone, succeeds.
#[test]
fn a_migration_behind_an_open_transaction_fails_after_lock_timeout() {
    let db = TestDb::migrated();
    let mut blocker = db.client();
    let mut tx = blocker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
        .unwrap();

    let started = Instant::now();
    let mut child = Command::new(DISPATCHER)
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("migrate still waiting after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    eprintln!("migrate gave up after {took:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lock_timeout"), "says why: {stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");

    tx.rollback().unwrap();
    migrate(&db.url);
}
