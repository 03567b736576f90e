//! The systemd notify protocol for real (a datagram socket the test owns as NOTIFY_SOCKET), and
//! the `healthcheck` subcommand a container HEALTHCHECK runs.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(30);

/// The notify socket systemd would own.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let path = std::env::temp_dir().join(format!("{}.sock", unique("md_notify")));
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket { socket, path }
    }

    /// Waits for a datagram containing `line`; returns when it arrived.
    fn expect(&self, line: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "no {line} within {timeout:?}");
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.lines().any(|l| l == line) {
                    return Instant::now();
                }
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn ready_after_health_answers_watchdog_and_stopping() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let socket = NotifySocket::bind();
    let mut env = daemon_env(&db, &receiver.url());
    set(&mut env, "NOTIFY_SOCKET", socket.path.to_str().unwrap());
    set(&mut env, "WATCHDOG_USEC", "400000");
    let mut daemon = Daemon::spawn("notified", &env);

    socket.expect("READY=1", LONG);
    // READY=1 is sent only once /health serves: it answers at once.
    let (status, _) = daemon
        .health()
        .expect("/health answers when READY=1 arrives");
    assert_eq!(status, 200);
    // WatchdogSec=400ms: the scheduler pets it every 200 ms.
    socket.expect("WATCHDOG=1", Duration::from_secs(5));
    socket.expect("WATCHDOG=1", Duration::from_secs(5));

    daemon.signal("TERM");
    socket.expect("STOPPING=1", LONG);
    assert_eq!(daemon.wait_exit(LONG).code(), Some(0));
}

#[test]
fn without_notify_socket_nothing_is_sent_and_all_works() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    db.insert(3);
    let _daemon = Daemon::start(&daemon_env(&db, &receiver.url()));
    wait_until(LONG, "delivery", || db.count("sent") == 3);
}

#[test]
fn healthcheck_subcommand_reports_live_unhealthy_and_dead_instances() {
    let db = TestDb::migrated();
    let receiver = Receiver::start();
    let env = daemon_env(&db, &receiver.url());
    let daemon = Daemon::start(&env);
    let port = [("SERVER_PORT".to_string(), daemon.port.to_string())];
    let out = run(DISPATCHER, &["healthcheck"], &port);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(daemon);

    // Unhealthy: the lease is on and its Redis is not there → /health 503.
    let mut sick = env.clone();
    set(&mut sick, "DISTRIBUTED_LOCK_ENABLED", "true");
    set(&mut sick, "DISTRIBUTED_LOCK_TTL", "10s");
    set(
        &mut sick,
        "REDIS_URL",
        &format!("redis://127.0.0.1:{}/", free_port()),
    );
    set(&mut sick, "DISTRIBUTED_LOCK_KEY", &unique("md:hc:lock"));
    let daemon = Daemon::start(&sick);
    let port = [("SERVER_PORT".to_string(), daemon.port.to_string())];
    let out = run(DISPATCHER, &["healthcheck"], &port);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("503"));
    drop(daemon);

    // Dead: nothing listens.
    let port = [("SERVER_PORT".to_string(), free_port().to_string())];
    let out = run(DISPATCHER, &["healthcheck"], &port);
    assert_eq!(out.status.code(), Some(1));
}
