//! Servers of a test's own, as child processes it stops by pid: `redis-server` (plain, TLS or
//! a replica) and a whole PostgreSQL cluster (initdb + pg_ctl), for the tests that stop, restart
//! or reconfigure them under a running daemon.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// A `redis-server` child process of the test's own, on a fixed port, killed by its pid.
pub struct PrivateRedis {
    pub port: u16,
    /// A configuration file, given first (sentinels need one they can rewrite).
    config_file: Option<PathBuf>,
    /// Arguments after the port, bind and no-persistence ones.
    extra: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// None (with the reason printed) when redis-server is not installed.
    pub fn start() -> Option<PrivateRedis> {
        PrivateRedis::start_with(free_port(), Vec::new())
    }

    /// A server on `port` with more arguments, e.g. `--replicaof`; with `--tls-port` give `port`
    /// as the TLS port and `--port 0` among `extra`.
    pub fn start_with(port: u16, extra: Vec<String>) -> Option<PrivateRedis> {
        let mut redis = PrivateRedis {
            port,
            config_file: None,
            extra,
            child: None,
        };
        if let Err(e) = redis.restart() {
            eprintln!("SKIPPED: cannot run redis-server: {e}");
            return None;
        }
        Some(redis)
    }

    /// A Sentinel on `port` with its configuration file `config` (which it rewrites).
    pub fn sentinel(port: u16, config: PathBuf) -> Option<PrivateRedis> {
        let mut redis = PrivateRedis {
            port,
            config_file: Some(config),
            extra: vec!["--sentinel".into()],
            child: None,
        };
        if let Err(e) = redis.restart() {
            eprintln!("SKIPPED: cannot run redis-server --sentinel: {e}");
            return None;
        }
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub fn restart(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(&self.config_file)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(10), "redis-server to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Ok(())
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the server, by its pid.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills the server (SIGKILL, by pid) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL cluster of the test's own (initdb + pg_ctl in a temporary directory), so the
/// test can stop and start the server under a running daemon. PostgreSQL refuses to run as
/// root, so as root the cluster belongs to the `postgres` user.
pub struct PrivatePg {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
    /// More `-c name=value` server settings (e.g. TLS).
    settings: String,
}

impl PrivatePg {
    /// None (with the reason printed) when no PostgreSQL server binaries are installed.
    pub fn start() -> Option<PrivatePg> {
        PrivatePg::start_with(&[])
    }

    /// A cluster started with more server settings, e.g. `("ssl", "on")`.
    pub fn start_with(settings: &[(&str, &str)]) -> Option<PrivatePg> {
        let Some(bin) = pg_bin_dir() else {
            eprintln!("SKIPPED: no PostgreSQL server binaries (initdb, pg_ctl) found");
            return None;
        };
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(unique("md_pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = PrivatePg {
            dir,
            bin,
            port: free_port(),
            as_postgres,
            settings: settings
                .iter()
                .map(|(k, v)| format!(" -c {k}={v}"))
                .collect(),
        };
        if as_postgres {
            let out = Command::new("chown")
                .args(["postgres:postgres", pg.dir.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(out.status.success(), "chown: {out:?}");
        }
        let data = pg.data();
        let out = pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb failed: {out:?}");
        pg.start_server();
        Some(pg)
    }

    pub fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_owned()
    }

    /// The URL of database `db` in this cluster (`postgres` always exists).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` and applies the schema with the real `migrate` command.
    pub fn create_migrated(&self, db: &str) -> String {
        if db != "postgres" {
            self.client("postgres")
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .unwrap();
        }
        let url = self.url(db);
        migrate(&url);
        url
    }

    pub fn run(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args).current_dir(&self.dir).output().unwrap()
    }

    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.dir.display(),
            self.settings
        );
        let log = self.dir.join("server.log");
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {out:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `pg_ctl stop -m fast`: disconnects every client and shuts down.
    pub fn stop_server(&self) {
        let out = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"],
        );
        assert!(out.status.success(), "pg_ctl stop failed: {out:?}");
    }

    pub fn client(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(db), postgres::NoTls).unwrap()
    }

    pub fn count(&self, db: &str, status: &str) -> i64 {
        self.client(db)
            .query_one(
                "SELECT count(*) FROM messages WHERE status = $1",
                &[&status],
            )
            .unwrap()
            .get(0)
    }

    pub fn insert(&self, db: &str, n: usize) {
        self.client(db)
            .execute(
                "INSERT INTO messages (recipient, content)
                 SELECT '+90555' || lpad(i::text, 7, '0'), 'message ' || i
                 FROM generate_series(1, $1) AS i",
                &[&(n as i32)],
            )
            .unwrap();
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.data();
        let stopped = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let pid_file = Path::new(&data).join("postmaster.pid");
        if !stopped.status.success() {
            // Still running and pg_ctl could not stop it: kill the postmaster by its pid, the
            // first line of its pid file.
            if let Ok(text) = std::fs::read_to_string(pid_file) {
                if let Some(pid) = text.lines().next().filter(|p| p.parse::<u32>().is_ok()) {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Where initdb and pg_ctl live: $PG_BIN, the newest /usr/lib/postgresql/*/bin, or pg_config's.
pub fn pg_bin_dir() -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").exists() && d.join("pg_ctl").exists();
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Some(PathBuf::from(dir)).filter(|d| has_tools(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_tools(d))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())).filter(|d| has_tools(d))
}

/// Runs `migrate` against `url` and returns how it ended.
pub fn try_migrate(url: &str) -> std::process::Output {
    run(
        DISPATCHER,
        &["migrate"],
        &[("DATABASE_URL".into(), url.into())],
    )
}

/// Runs `migrate` against `url`; it must succeed.
pub fn migrate(url: &str) {
    let out = try_migrate(url);
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
