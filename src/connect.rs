//! How we reach PostgreSQL and Redis in production: TLS with rustls (so the static image needs
//! no OpenSSL), Redis Sentinel, and timeouts on everything that can hang.
//!
//! `sslmode` follows libpq: `disable`; `prefer` and `require` encrypt without checking the
//! certificate (unless a root certificate is given, which makes `require` act as `verify-ca`);
//! `verify-ca` checks the chain; `verify-full` checks the chain and the host name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use url::Url;

use crate::error::Error;
use crate::pg;

// --- Bounded I/O to PostgreSQL -------------------------------------------------------------
//
// A path to PostgreSQL can fail in two silent ways, and a blocking client waits forever on
// either unless told otherwise:
// - the peer's kernel is gone (a dropped route, a crashed host, a firewall that forgot the
//   flow): our bytes stay unacknowledged, or, on an idle connection, nothing happens at all.
//   TCP_USER_TIMEOUT closes the socket once sent data has been unacknowledged for 12 s, and
//   keepalive probes an idle connection after 5 s, every 2 s, 3 times (about 11 s; with
//   TCP_USER_TIMEOUT set, Linux closes it once probes went unanswered for 12 s).
// - something on the path acknowledges our bytes but never answers (a hung proxy or
//   pooler, a half-dead NAT): no TCP timer fires. Only a deadline in the client helps:
//   PostgreSQL gives up on any statement of ours after STATEMENT_TIMEOUT and reports it, so a
//   live server always answers within that; we wait QUERY_DEADLINE, the statement timeout plus
//   room for that answer, and then drop the connection.
// A slow but alive server is not cut off: its kernel acknowledges data and keepalive probes
// while a statement runs, and it answers (if only with its own timeout) before our deadline.
// So every statement, heartbeat and connection attempt ends within 12 s (connecting: 5 s),
// and a leader on a silent path logs `Database unavailable` within about 12 s of its first
// unanswered statement. Values given in DATABASE_URL (connect_timeout, keepalives,
// keepalives_idle, keepalives_interval, keepalives_retries, tcp_user_timeout) win.

/// PostgreSQL cancels a statement of ours after this. None of the daemon's statements takes
/// more than milliseconds; migrations (which may rewrite big tables) have no limit.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(8);
/// How long we wait for any answer from PostgreSQL before dropping the connection: the
/// statement timeout plus room for the server's own error to arrive.
pub const QUERY_DEADLINE: Duration = Duration::from_secs(12);
/// The default `connect_timeout`: the whole connection setup (TCP, TLS, authentication).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(12);
const KEEPALIVES_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVES_RETRIES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    fn parse(raw: &str) -> Option<TlsMode> {
        Some(match raw {
            "disable" | "allow" => TlsMode::Disable,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        })
    }
}

/// A PostgreSQL server to connect to, with its TLS settings resolved.
#[derive(Clone)]
pub struct Postgres {
    config: tokio_postgres::Config,
    tls: TlsMode,
    connector: MakeRustlsConnect,
}

impl Postgres {
    /// Parses a connection string (URL or `key=value` form), taking `sslmode` and `sslrootcert`
    /// out of it; `root_cert` (DB_SSL_ROOT_CERT) overrides `sslrootcert`. Errors name
    /// DATABASE_URL or DB_SSL_ROOT_CERT.
    pub fn new(database_url: &str, root_cert: Option<&Path>) -> Result<Postgres, Error> {
        let (rest, mode, url_root) = split_tls_params(database_url)?;
        let root_cert = root_cert.map(Path::to_path_buf).or(url_root);
        let mut tls = mode.unwrap_or(TlsMode::Prefer);
        if tls == TlsMode::Require && root_cert.is_some() {
            tls = TlsMode::VerifyCa;
        }
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            Error::Config(format!(
                "DATABASE_URL: not a PostgreSQL connection string ({e})"
            ))
        })?;
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        bound_io(&mut config, &given_params(&rest));
        let roots = match &root_cert {
            Some(path) => load_roots(path)
                .map_err(|e| Error::Config(format!("DB_SSL_ROOT_CERT: {}: {e}", path.display())))?,
            None => default_roots(),
        };
        let connector = MakeRustlsConnect::new(client_config(tls, roots));
        Ok(Postgres {
            config,
            tls,
            connector,
        })
    }

    pub fn tls(&self) -> TlsMode {
        self.tls
    }

    pub fn set_application_name(&mut self, name: &str) {
        if self.config.get_application_name().is_none() {
            self.config.application_name(name);
        }
    }

    /// Connects, naming the server in the error (and never the password). Every statement
    /// is bounded: by STATEMENT_TIMEOUT on the server and QUERY_DEADLINE here.
    pub fn connect(&self, purpose: Option<&str>) -> Result<pg::Client, Error> {
        let mut client = self.open(purpose, Some(QUERY_DEADLINE))?;
        client.batch_execute(&format!(
            "SET statement_timeout = {}",
            STATEMENT_TIMEOUT.as_millis()
        ))?;
        Ok(client)
    }

    /// Connects for statements that may legitimately run long (migrations): no statement
    /// timeout and no deadline; TCP keepalive still ends the wait on a dead peer.
    pub fn connect_unbounded(&self, purpose: Option<&str>) -> Result<pg::Client, Error> {
        self.open(purpose, None)
    }

    fn open(&self, purpose: Option<&str>, deadline: Option<Duration>) -> Result<pg::Client, Error> {
        let mut config = self.config.clone();
        if let Some(purpose) = purpose {
            let name = config
                .get_application_name()
                .unwrap_or("message-dispatcher");
            let name = format!("{name}/{purpose}");
            config.application_name(&name);
        }
        // connect_timeout bounds each TCP connect in tokio-postgres; like libpq, we bound the
        // whole setup with it, per host tried (none: `connect_timeout=0` in DATABASE_URL).
        let hosts = config.get_hosts().len().max(1) as u32;
        let limit = config.get_connect_timeout().map(|t| *t * hosts);
        pg::Client::connect(&config, self.connector.clone(), limit, deadline).map_err(|e| {
            Error::Other(format!(
                "cannot connect to PostgreSQL at {} (sslmode={}): {e}",
                self.address(),
                self.tls,
            ))
        })
    }

    fn address(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }
}

/// Sets our timeouts (see the top of this file) where the connection string gave none.
fn bound_io(config: &mut tokio_postgres::Config, given: &[String]) {
    let unset = |key: &str| !given.iter().any(|k| k == key);
    if unset("connect_timeout") {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if unset("tcp_user_timeout") {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if unset("keepalives") {
        config.keepalives(true);
    }
    if unset("keepalives_idle") {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if unset("keepalives_interval") {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if unset("keepalives_retries") {
        config.keepalives_retries(KEEPALIVES_RETRIES);
    }
}

/// The parameter names a connection string sets (URL query or `key=value` form).
fn given_params(raw: &str) -> Vec<String> {
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        Url::parse(raw)
            .map(|url| url.query_pairs().map(|(k, _)| k.into_owned()).collect())
            .unwrap_or_default()
    } else {
        raw.split_whitespace()
            .filter_map(|part| part.split_once('=').map(|(k, _)| k.trim().to_owned()))
            .collect()
    }
}

/// Removes `sslmode` and `sslrootcert` from a connection string: the postgres crate knows only
/// some of libpq's modes, so we resolve them ourselves.
fn split_tls_params(raw: &str) -> Result<(String, Option<TlsMode>, Option<PathBuf>), Error> {
    let bad_mode = |m: &str| {
        Error::Config(format!(
            "DATABASE_URL: sslmode must be disable, prefer, require, verify-ca or verify-full, got {m:?}"
        ))
    };
    let mut mode = None;
    let mut root = None;
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        let mut url =
            Url::parse(raw).map_err(|e| Error::Config(format!("DATABASE_URL: not a URL ({e})")))?;
        let mut kept = Vec::new();
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" => mode = Some(TlsMode::parse(&v).ok_or_else(|| bad_mode(&v))?),
                "sslrootcert" => root = Some(PathBuf::from(v.as_ref())),
                _ => kept.push((k.into_owned(), v.into_owned())),
            }
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        Ok((url.to_string(), mode, root))
    } else {
        let mut kept = Vec::new();
        for part in raw.split_whitespace() {
            match part.split_once('=') {
                Some(("sslmode", v)) => mode = Some(TlsMode::parse(v).ok_or_else(|| bad_mode(v))?),
                Some(("sslrootcert", v)) => root = Some(PathBuf::from(v)),
                _ => kept.push(part),
            }
        }
        Ok((kept.join(" "), mode, root))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide rustls provider, for libraries that build their own configs.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn default_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())?;
    for cert in certs {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(roots)
}

fn client_config(mode: TlsMode, roots: RootCertStore) -> ClientConfig {
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("a root store with certificates builds a verifier");
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        TlsMode::VerifyFull => webpki,
        TlsMode::VerifyCa => Arc::new(ChainOnly {
            inner: webpki,
            check_chain: true,
            provider: provider.clone(),
        }),
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => Arc::new(ChainOnly {
            inner: webpki,
            check_chain: false,
            provider: provider.clone(),
        }),
    };
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth()
}

/// `verify-ca` (the chain, not the name) and, with `check_chain` off, libpq's `require`
/// (encryption only). Signatures of the handshake are always verified.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
    check_chain: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where the lease lives: one Redis server (`redis://` or `rediss://`), or the master that a
/// set of Sentinels points at — asked anew on every reconnect, so the lease follows a failover.
///
/// Every step is bounded by the timeout given to [`Redis::connect`]: each TCP connect, TLS
/// handshake and authentication, each Sentinel's answer, the master's `ROLE`, and every read
/// and write on the connection returned.
pub struct Redis {
    target: Target,
}

enum Target {
    Direct(redis::Client),
    Sentinel(Sentinels),
}

/// Finds the master through Redis Sentinel ourselves, as the Sentinel client guidelines
/// describe: ask each Sentinel in turn for the master's address, skipping one that fails or
/// does not answer in time, then connect to that address and check with `ROLE` that it is the
/// master. (The redis crate's Sentinel client waits on the Sentinels and the master without any
/// timeout, so one hung Sentinel stopped the lease, and `/health`, for good.)
///
/// A lookup takes at most about (Sentinels + 1) × 2 timeouts, when every Sentinel accepts and
/// none answers; normally one round trip to the first Sentinel and the master's handshake.
struct Sentinels {
    /// As configured, but the Sentinel that last named a working master comes first, so that a
    /// hung Sentinel early in REDIS_SENTINELS costs one timeout, not one on every reconnect.
    addrs: Mutex<Vec<(String, u16)>>,
    master_name: String,
    /// How to reach the master: TLS (`rediss://` in REDIS_URL) with REDIS_CA_CERT's CA, and
    /// REDIS_PASSWORD. The Sentinels themselves are asked over plain TCP without a password.
    tls: bool,
    ca: Option<Vec<u8>>,
    password: Option<String>,
}

/// What the Redis side of the configuration says.
#[derive(Clone, Debug, Default)]
pub struct RedisSettings {
    pub url: String,
    pub ca_cert: Option<PathBuf>,
    pub sentinels: Vec<String>,
    pub sentinel_master: Option<String>,
    pub password: Option<String>,
}

impl Redis {
    pub fn new(settings: &RedisSettings) -> Result<Redis, Error> {
        let ca =
            match &settings.ca_cert {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    Error::Config(format!("REDIS_CA_CERT: {}: {e}", path.display()))
                })?),
                None => None,
            };
        if let Some(master) = &settings.sentinel_master {
            let mut addrs = Vec::new();
            for s in &settings.sentinels {
                addrs.push(parse_host_port(s).ok_or_else(|| {
                    Error::Config(format!("REDIS_SENTINELS: expected host:port, got {s:?}"))
                })?);
            }
            if addrs.is_empty() {
                return Err(Error::Config(
                    "REDIS_SENTINELS: at least one host:port is needed with REDIS_SENTINEL_MASTER"
                        .into(),
                ));
            }
            return Ok(Redis {
                target: Target::Sentinel(Sentinels {
                    addrs: Mutex::new(addrs),
                    master_name: master.clone(),
                    tls: settings.url.starts_with("rediss://"),
                    ca,
                    password: settings.password.clone(),
                }),
            });
        }
        let client = match &ca {
            Some(_) => redis::Client::build_with_tls(settings.url.as_str(), certificates(&ca)),
            None => redis::Client::open(settings.url.as_str()),
        }
        .map_err(|e| Error::Config(format!("REDIS_URL: {e}")))?;
        Ok(Redis {
            target: Target::Direct(client),
        })
    }

    /// A connection whose every read and write gives up after `timeout`; connecting (through
    /// the Sentinels, when configured) is bounded by it step by step.
    pub fn connect(&self, timeout: Duration) -> Result<redis::Connection, Error> {
        match &self.target {
            Target::Direct(client) => Ok(open_bounded(client, timeout)?),
            Target::Sentinel(sentinels) => sentinels.master(timeout),
        }
    }
}

impl Sentinels {
    /// A connection to the current master, found through the Sentinels.
    fn master(&self, timeout: Duration) -> Result<redis::Connection, Error> {
        let order = self.addrs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut failures = Vec::new();
        let mut tried: Vec<(String, u16)> = Vec::new();
        for sentinel in &order {
            let named = match self.ask(sentinel, timeout) {
                Ok(named) => named,
                Err(e) => {
                    failures.push(format!("Sentinel {}: {e}", show(sentinel)));
                    continue;
                }
            };
            if tried.contains(&named) {
                continue; // Already failed this lookup; another Sentinel may know better.
            }
            match self.open_master(&named, timeout) {
                Ok(conn) => {
                    self.prefer(sentinel);
                    return Ok(conn);
                }
                Err(e) => failures.push(format!(
                    "master {} named by Sentinel {}: {e}",
                    show(&named),
                    show(sentinel)
                )),
            }
            tried.push(named);
        }
        Err(Error::Other(format!(
            "no Redis master {:?} through Redis Sentinel: {}",
            self.master_name,
            failures.join("; ")
        )))
    }

    /// What `sentinel` says the master's address is.
    fn ask(&self, sentinel: &(String, u16), timeout: Duration) -> Result<(String, u16), String> {
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp(sentinel.0.clone(), sentinel.1),
            redis: redis::RedisConnectionInfo::default(),
        };
        let client = redis::Client::open(info).map_err(|e| e.to_string())?;
        let mut conn = open_bounded(&client, timeout).map_err(|e| describe(&e, timeout))?;
        let named: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query(&mut conn)
            .map_err(|e| describe(&e, timeout))?;
        let (host, port) =
            named.ok_or_else(|| format!("does not know a master {:?}", self.master_name))?;
        let port = port
            .parse()
            .map_err(|_| format!("named the master at {host}:{port}, not a host and port"))?;
        Ok((host, port))
    }

    /// A connection to `addr` once `ROLE` confirmed it is a master.
    fn open_master(
        &self,
        addr: &(String, u16),
        timeout: Duration,
    ) -> Result<redis::Connection, String> {
        let (host, port) = addr.clone();
        let info = redis::ConnectionInfo {
            addr: if self.tls {
                redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                redis::ConnectionAddr::Tcp(host, port)
            },
            redis: redis::RedisConnectionInfo {
                password: self.password.clone(),
                ..Default::default()
            },
        };
        let client = match &self.ca {
            Some(_) if self.tls => redis::Client::build_with_tls(info, certificates(&self.ca)),
            _ => redis::Client::open(info),
        }
        .map_err(|e| e.to_string())?;
        let mut conn = open_bounded(&client, timeout).map_err(|e| describe(&e, timeout))?;
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query(&mut conn)
            .map_err(|e| describe(&e, timeout))?;
        match role.first().map(redis::from_redis_value::<String>) {
            Some(Ok(role)) if role == "master" => Ok(conn),
            Some(Ok(role)) => Err(format!("is a {role}, not the master (failover under way?)")),
            _ => Err("answered ROLE with something else than a role".into()),
        }
    }

    /// Asks `sentinel` first from now on.
    fn prefer(&self, sentinel: &(String, u16)) {
        let mut addrs = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = addrs.iter().position(|a| a == sentinel) {
            let first = addrs.remove(i);
            addrs.insert(0, first);
        }
    }
}

/// Connects within `timeout` (TCP, TLS, authentication) and bounds every later read and write
/// by it too.
fn open_bounded(
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

fn certificates(ca: &Option<Vec<u8>>) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: ca.clone(),
    }
}

/// A Redis error as said in a log line: a timeout says how long we waited.
fn describe(e: &redis::RedisError, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("no answer within {}", crate::config::fmt_duration(timeout))
    } else {
        e.to_string()
    }
}

fn show((host, port): &(String, u16)) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub fn parse_host_port(raw: &str) -> Option<(String, u16)> {
    let (host, port) = raw.trim().rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_are_taken_out_of_urls() {
        let (rest, mode, root) = split_tls_params(
            "postgres://u:p@db:5432/x?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/x?connect_timeout=3");
        assert_eq!(mode, Some(TlsMode::VerifyFull));
        assert_eq!(root, Some(PathBuf::from("/ca.pem")));
        let (rest, mode, _) = split_tls_params("host=db user=u sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), mode),
            ("host=db user=u", Some(TlsMode::Require))
        );
        let (rest, mode, root) = split_tls_params("postgres://db/x").unwrap();
        assert_eq!((rest.as_str(), mode, root), ("postgres://db/x", None, None));
    }

    #[test]
    fn bad_sslmode_names_the_variable() {
        let Err(Error::Config(msg)) = Postgres::new("postgres://db/x?sslmode=sometimes", None)
        else {
            panic!("expected a configuration error");
        };
        assert!(msg.starts_with("DATABASE_URL: sslmode"), "{msg}");
    }

    #[test]
    fn modes_resolve_like_libpq() {
        let pg = |url: &str, root: Option<&Path>| Postgres::new(url, root).map(|p| p.tls());
        assert_eq!(pg("postgres://db/x", None).unwrap(), TlsMode::Prefer);
        assert_eq!(
            pg("postgres://db/x?sslmode=disable", None).unwrap(),
            TlsMode::Disable
        );
        assert_eq!(
            pg("postgres://db/x?sslmode=require", None).unwrap(),
            TlsMode::Require
        );
        let missing = Path::new("/nonexistent/ca.pem");
        let Err(Error::Config(msg)) = pg("postgres://db/x?sslmode=verify-full", Some(missing))
        else {
            panic!("a missing root certificate is a configuration error");
        };
        assert!(msg.starts_with("DB_SSL_ROOT_CERT: "), "{msg}");
    }

    #[test]
    fn io_is_bounded_unless_the_url_says_otherwise() {
        let pg = |url: &str| Postgres::new(url, None).unwrap().config;
        let ours = pg("postgres://db/x");
        assert_eq!(ours.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(ours.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert!(ours.get_keepalives());
        assert_eq!(ours.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(ours.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(ours.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        // A live server answers every statement (if only with its own timeout) before we
        // give up on it; a dead idle connection is found within about the same time.
        assert!(QUERY_DEADLINE > STATEMENT_TIMEOUT + Duration::from_secs(2));
        assert!(KEEPALIVES_IDLE + KEEPALIVES_INTERVAL * KEEPALIVES_RETRIES <= QUERY_DEADLINE);

        let theirs = pg("postgres://db/x?connect_timeout=20&tcp_user_timeout=0&keepalives_idle=7200&keepalives_interval=75&keepalives_retries=9");
        assert_eq!(theirs.get_connect_timeout(), Some(&Duration::from_secs(20)));
        assert_eq!(theirs.get_tcp_user_timeout(), None, "0 turns it off");
        assert_eq!(theirs.get_keepalives_idle(), Duration::from_secs(7200));
        assert_eq!(
            theirs.get_keepalives_interval(),
            Some(Duration::from_secs(75))
        );
        assert_eq!(theirs.get_keepalives_retries(), Some(9));
        assert_eq!(
            pg("postgres://db/x?connect_timeout=0").get_connect_timeout(),
            None,
            "0 waits indefinitely, as in libpq"
        );
        assert!(!pg("host=db dbname=x keepalives=0").get_keepalives());
        let kv = pg("host=db dbname=x keepalives_idle=60 sslmode=disable");
        assert_eq!(kv.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(kv.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
    }

    #[test]
    fn a_hung_sentinel_costs_one_timeout() {
        // Accepts (the kernel completes the handshake) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent = silent.local_addr().unwrap().to_string();
        let redis = Redis::new(&RedisSettings {
            sentinels: vec![silent.clone()],
            sentinel_master: Some("mymaster".into()),
            ..RedisSettings::default()
        })
        .unwrap();
        let timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let Err(e) = redis.connect(timeout) else {
            panic!("nothing answers");
        };
        let took = started.elapsed();
        let e = e.to_string();
        assert!(
            e.contains(&silent) && e.contains("no answer within 300ms"),
            "{e}"
        );
        assert!(took >= timeout && took < timeout * 2, "{took:?}");
    }

    #[test]
    fn host_port_pairs() {
        assert_eq!(
            parse_host_port("10.0.0.1:26379"),
            Some(("10.0.0.1".into(), 26379))
        );
        assert_eq!(parse_host_port("[::1]:26379"), Some(("::1".into(), 26379)));
        assert_eq!(parse_host_port("sentinel"), None);
        assert_eq!(parse_host_port(":1"), None);
    }
}
