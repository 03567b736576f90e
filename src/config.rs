//! Configuration, parsed once from the environment into a typed value.
//!
//! Every other module receives a `&Config` and never reads the environment itself, so a bad
//! value is caught at start with one error naming the variable, and the effective settings can
//! be printed (secrets redacted) by `check-config`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use url::Url;

use crate::connect::{self, RedisSettings};
use crate::error::Error;

/// What the daemon needs to know, with every default already applied.
#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    /// DB_SSL_ROOT_CERT: overrides `sslrootcert` in DATABASE_URL.
    pub db_ssl_root_cert: Option<PathBuf>,
    /// REDIS_URL (or its parts), REDIS_CA_CERT, REDIS_SENTINELS, REDIS_SENTINEL_MASTER.
    pub redis: RedisSettings,
    pub server_host: String,
    pub server_port: u16,
    /// Required by `serve` and `check-config`; `migrate` and the helpers do without it.
    pub webhook_url: Option<Url>,
    pub webhook_timeout: Duration,
    /// The decoded key of a `whsec_…` secret.
    pub webhook_secret: Option<Vec<u8>>,
    /// Consecutive transient failures that open the webhook's circuit.
    pub webhook_circuit_threshold: u32,
    /// Requests per second at most; None = no limit.
    pub webhook_rate_limit: Option<f64>,
    /// SSL_CERT_FILE: a PEM bundle of the CAs trusted for an https webhook (as OpenSSL and Go
    /// read it), instead of the built-in Mozilla roots.
    pub webhook_ca_file: Option<PathBuf>,
    /// Zero means continuous mode.
    pub processing_interval: Duration,
    pub max_processing_time: Duration,
    pub batch_size: u32,
    pub worker_count: u32,
    pub max_attempts: u32,
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
    pub content_max_length: usize,
    /// MESSAGE_TTL: a message inserted without `expires_at` expires this long after it was
    /// created; None = never. Stored in PostgreSQL at start, for the insert trigger.
    pub message_ttl: Option<Duration>,
    pub lock_enabled: bool,
    pub lock_ttl: Duration,
    pub lock_key: String,
    pub api_token: Option<String>,
    /// SENT_RETENTION: `sent` rows older than this are deleted; None = kept for ever.
    pub sent_retention: Option<Duration>,
    /// FAILED_RETENTION: the same for `failed`, `expired` and `cancelled` rows.
    pub failed_retention: Option<Duration>,
    pub log_level: log::LevelFilter,
    pub log_format: LogFormat,
    /// RUST_LOG, when set, overrides LOG_LEVEL with env_logger's filter syntax.
    pub rust_log: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// With RETRY_BASE_DELAY 5s doubling up to RETRY_MAX_DELAY 10m, the 20th attempt comes at
/// least 65 minutes after the first (jitter only shortens a delay to half): a message outlives
/// an hour of receiver trouble even before the circuit breaker stops spending attempts.
const DEFAULT_MAX_ATTEMPTS: u64 = 20;
const DEFAULT_RETRY_BASE_DELAY: &str = "5s";

/// The variables this program reads; anything else in the environment is not its business.
pub const VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_USER",
    "DB_PASSWORD",
    "DB_NAME",
    "DB_SSL_ROOT_CERT",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_CA_CERT",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "SERVER_HOST",
    "SERVER_PORT",
    "WEBHOOK_URL",
    "WEBHOOK_TIMEOUT",
    "WEBHOOK_SECRET",
    "WEBHOOK_CIRCUIT_THRESHOLD",
    "WEBHOOK_RATE_LIMIT",
    "SSL_CERT_FILE",
    "PROCESSING_INTERVAL",
    "MAX_PROCESSING_TIME",
    "BATCH_SIZE",
    "WORKER_COUNT",
    "MAX_ATTEMPTS",
    "RETRY_BASE_DELAY",
    "RETRY_MAX_DELAY",
    "CONTENT_MAX_LENGTH",
    "MESSAGE_TTL",
    "DISTRIBUTED_LOCK_ENABLED",
    "DISTRIBUTED_LOCK_TTL",
    "DISTRIBUTED_LOCK_KEY",
    "API_TOKEN",
    "SENT_RETENTION",
    "FAILED_RETENTION",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "RUST_LOG",
];

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, Error> {
        let vars = std::env::vars()
            .filter(|(k, _)| VARIABLES.contains(&k.as_str()))
            .collect();
        Config::from_vars(&vars)
    }

    /// Parses a set of variables; empty values count as unset, as in most env files.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Config, Error> {
        let env = Env(vars);
        let config = Config {
            database_url: database_url(&env)?,
            db_ssl_root_cert: env.get("DB_SSL_ROOT_CERT").map(PathBuf::from),
            redis: redis_settings(&env)?,
            server_host: env.get("SERVER_HOST").unwrap_or("0.0.0.0").to_owned(),
            server_port: env.parse_num("SERVER_PORT", 8080, 0, u16::MAX.into())? as u16,
            webhook_url: env.get("WEBHOOK_URL").map(webhook_url).transpose()?,
            webhook_timeout: env.duration("WEBHOOK_TIMEOUT", "10s", false)?,
            webhook_secret: env.get("WEBHOOK_SECRET").map(webhook_secret).transpose()?,
            webhook_circuit_threshold: env.parse_num("WEBHOOK_CIRCUIT_THRESHOLD", 5, 1, 10_000)?
                as u32,
            webhook_rate_limit: rate_limit(&env)?,
            webhook_ca_file: env.get("SSL_CERT_FILE").map(PathBuf::from),
            processing_interval: env.duration("PROCESSING_INTERVAL", "2m", true)?,
            max_processing_time: env.duration("MAX_PROCESSING_TIME", "30s", false)?,
            batch_size: env.parse_num("BATCH_SIZE", 2, 1, 10_000)? as u32,
            worker_count: env.parse_num("WORKER_COUNT", 4, 1, 1_024)? as u32,
            max_attempts: env.parse_num("MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, 1, 1_000)? as u32,
            retry_base_delay: env.duration("RETRY_BASE_DELAY", DEFAULT_RETRY_BASE_DELAY, false)?,
            retry_max_delay: env.duration("RETRY_MAX_DELAY", "10m", false)?,
            content_max_length: env.parse_num("CONTENT_MAX_LENGTH", 160, 1, 1_000_000)? as usize,
            message_ttl: message_ttl(&env)?,
            lock_enabled: env.boolean("DISTRIBUTED_LOCK_ENABLED", false)?,
            lock_ttl: env.duration("DISTRIBUTED_LOCK_TTL", "3m", false)?,
            lock_key: env
                .get("DISTRIBUTED_LOCK_KEY")
                .unwrap_or("message-dispatcher:lock")
                .to_owned(),
            api_token: env.get("API_TOKEN").map(str::to_owned),
            sent_retention: env.optional_duration("SENT_RETENTION")?,
            failed_retention: env.optional_duration("FAILED_RETENTION")?,
            log_level: log_level(&env)?,
            log_format: log_format(&env)?,
            rust_log: env.get("RUST_LOG").map(str::to_owned),
        };
        config.check_relations()?;
        Ok(config)
    }

    /// Rules between variables, which no single value can break on its own.
    fn check_relations(&self) -> Result<(), Error> {
        self.postgres()?;
        if self.lock_enabled {
            connect::Redis::new(&self.redis)?;
        }
        if self.retry_base_delay > self.retry_max_delay {
            return Err(Error::Config(format!(
                "RETRY_BASE_DELAY: {} is longer than RETRY_MAX_DELAY ({})",
                fmt_duration(self.retry_base_delay),
                fmt_duration(self.retry_max_delay)
            )));
        }
        if self.lock_enabled && self.lock_ttl <= self.recovery_timeout() {
            return Err(Error::Config(format!(
                "DISTRIBUTED_LOCK_TTL: {} must be longer than MAX_PROCESSING_TIME + WEBHOOK_TIMEOUT ({}), \
                 or a holder's sends could outlive its lease",
                fmt_duration(self.lock_ttl),
                fmt_duration(self.recovery_timeout())
            )));
        }
        Ok(())
    }

    /// The PostgreSQL server with its TLS settings resolved.
    pub fn postgres(&self) -> Result<connect::Postgres, Error> {
        connect::Postgres::new(&self.database_url, self.db_ssl_root_cert.as_deref())
    }

    /// `serve` and `check-config` cannot run without a webhook.
    /// WEBHOOK_URL, and the CA bundle of SSL_CERT_FILE loads (serve and check-config).
    pub fn require_webhook(&self) -> Result<&Url, Error> {
        let url = self.webhook_url.as_ref().ok_or_else(|| {
            Error::Config("WEBHOOK_URL: required, e.g. http://localhost:9090/webhook".into())
        })?;
        if let Some(path) = &self.webhook_ca_file {
            crate::webhook::load_roots(path)?;
        }
        Ok(url)
    }

    /// How long a claimed message may stay `sending` before it counts as abandoned.
    pub fn recovery_timeout(&self) -> Duration {
        self.max_processing_time + self.webhook_timeout
    }

    pub fn continuous(&self) -> bool {
        self.processing_interval.is_zero()
    }

    /// How often a holder extends its lease, and a standby tries to take it.
    pub fn lease_retry_period(&self) -> Duration {
        let third = self.lock_ttl / 3;
        if self.continuous() {
            third
        } else {
            third.min(self.processing_interval)
        }
    }

    /// How often the holder extends its lease: every TTL/3, or more often when a whole webhook
    /// request would not otherwise fit between two extensions (a request starts only if it can
    /// end before the lease could expire, so an extension must come before that window closes).
    pub fn lease_extend_period(&self) -> Duration {
        let window = self
            .lock_ttl
            .saturating_sub(self.lease_margin())
            .saturating_sub(self.webhook_timeout);
        (self.lock_ttl / 3)
            .min(window / 2)
            .max(Duration::from_millis(10))
    }

    /// Taken off the lease's lifetime as measured here: covers clock-rate drift between us and
    /// Redis and a little scheduling slack.
    pub fn lease_margin(&self) -> Duration {
        (self.lock_ttl / 10).max(Duration::from_millis(20))
    }

    pub fn listen_addr(&self) -> String {
        if self.server_host.contains(':') {
            format!("[{}]:{}", self.server_host, self.server_port)
        } else {
            format!("{}:{}", self.server_host, self.server_port)
        }
    }
}

/// The effective configuration as `check-config` prints it: one `NAME=value` a line, secrets
/// replaced by `<redacted>`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |present: bool| if present { "<redacted>" } else { "<unset>" };
        let webhook = self
            .webhook_url
            .as_ref()
            .map_or("<unset>".to_owned(), |u| redact_url(u.as_str()));
        let pg = self.postgres().ok();
        let retention = |d: Option<Duration>| d.map_or("<unset>".into(), fmt_duration);
        let lines: [(&str, String); 35] = [
            ("DATABASE_URL", redact_url(&self.database_url)),
            ("DB_SSL_ROOT_CERT", path_or_unset(&self.db_ssl_root_cert)),
            (
                "database_tls",
                pg.as_ref()
                    .map_or("<invalid>".into(), |p| p.tls().to_string()),
            ),
            ("REDIS_URL", redact_url(&self.redis.url)),
            ("REDIS_CA_CERT", path_or_unset(&self.redis.ca_cert)),
            (
                "REDIS_SENTINELS",
                if self.redis.sentinels.is_empty() {
                    "<unset>".into()
                } else {
                    self.redis.sentinels.join(",")
                },
            ),
            (
                "REDIS_SENTINEL_MASTER",
                self.redis
                    .sentinel_master
                    .clone()
                    .unwrap_or("<unset>".into()),
            ),
            ("SERVER_HOST", self.server_host.clone()),
            ("SERVER_PORT", self.server_port.to_string()),
            ("WEBHOOK_URL", webhook),
            ("WEBHOOK_TIMEOUT", fmt_duration(self.webhook_timeout)),
            ("WEBHOOK_SECRET", set(self.webhook_secret.is_some()).into()),
            ("SSL_CERT_FILE", path_or_unset(&self.webhook_ca_file)),
            (
                "WEBHOOK_CIRCUIT_THRESHOLD",
                self.webhook_circuit_threshold.to_string(),
            ),
            (
                "WEBHOOK_RATE_LIMIT",
                self.webhook_rate_limit
                    .map_or("<unset>".into(), |r| format!("{r}/s")),
            ),
            (
                "PROCESSING_INTERVAL",
                fmt_duration(self.processing_interval),
            ),
            (
                "MAX_PROCESSING_TIME",
                fmt_duration(self.max_processing_time),
            ),
            ("BATCH_SIZE", self.batch_size.to_string()),
            ("WORKER_COUNT", self.worker_count.to_string()),
            ("MAX_ATTEMPTS", self.max_attempts.to_string()),
            ("RETRY_BASE_DELAY", fmt_duration(self.retry_base_delay)),
            ("RETRY_MAX_DELAY", fmt_duration(self.retry_max_delay)),
            ("CONTENT_MAX_LENGTH", self.content_max_length.to_string()),
            (
                "MESSAGE_TTL",
                self.message_ttl.map_or("<unset>".into(), fmt_duration),
            ),
            ("DISTRIBUTED_LOCK_ENABLED", self.lock_enabled.to_string()),
            ("DISTRIBUTED_LOCK_TTL", fmt_duration(self.lock_ttl)),
            ("DISTRIBUTED_LOCK_KEY", self.lock_key.clone()),
            ("API_TOKEN", set(self.api_token.is_some()).into()),
            ("SENT_RETENTION", retention(self.sent_retention)),
            ("FAILED_RETENTION", retention(self.failed_retention)),
            ("LOG_LEVEL", self.log_level.to_string().to_lowercase()),
            (
                "LOG_FORMAT",
                match self.log_format {
                    LogFormat::Json => "json".into(),
                    LogFormat::Text => "text".into(),
                },
            ),
            (
                "RUST_LOG",
                self.rust_log.clone().unwrap_or("<unset>".into()),
            ),
            ("mode", mode(self)),
            ("recovery_timeout", fmt_duration(self.recovery_timeout())),
        ];
        for (name, value) in lines {
            writeln!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

fn path_or_unset(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or("<unset>".into(), |p| p.display().to_string())
}

fn mode(config: &Config) -> String {
    let cadence = if config.continuous() {
        "continuous (LISTEN/NOTIFY)".to_owned()
    } else {
        format!(
            "every {} up to {} messages",
            fmt_duration(config.processing_interval),
            config.batch_size
        )
    };
    let lease = if config.lock_enabled {
        "Redis lease"
    } else {
        "single instance"
    };
    format!("{cadence}, {lease}")
}

/// A duration as people write it (`2m`, `1s 500ms`), to the millisecond.
pub fn fmt_duration(d: Duration) -> String {
    let ms = Duration::from_millis(d.as_millis() as u64);
    if ms.is_zero() {
        if d.is_zero() {
            "0".into()
        } else {
            "<1ms".into()
        }
    } else {
        humantime::format_duration(ms).to_string()
    }
}

/// Hides the password of a `scheme://user:password@host/…` URL.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("<redacted>"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<unparsable>".into(),
    }
}

/// Lookup over the collected variables, turning every problem into an error that names the
/// variable.
struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn parse_num(&self, name: &str, default: u64, min: u64, max: u64) -> Result<u64, Error> {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        match raw.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(Error::Config(format!(
                "{name}: expected a whole number from {min} to {max}, got {raw:?}"
            ))),
        }
    }

    fn duration(&self, name: &str, default: &str, zero_allowed: bool) -> Result<Duration, Error> {
        let raw = self.get(name).unwrap_or(default);
        let parsed = humantime::parse_duration(raw).map_err(|e| {
            Error::Config(format!(
                "{name}: expected a duration such as 500ms, 30s, 2m or 1h, got {raw:?} ({e})"
            ))
        })?;
        if parsed.is_zero() && !zero_allowed {
            return Err(Error::Config(format!("{name}: must be longer than 0")));
        }
        Ok(parsed)
    }

    /// A duration longer than 0, or None when unset.
    fn optional_duration(&self, name: &str) -> Result<Option<Duration>, Error> {
        match self.get(name) {
            None => Ok(None),
            Some(raw) => self.duration(name, raw, false).map(Some),
        }
    }

    fn boolean(&self, name: &str, default: bool) -> Result<bool, Error> {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(other) => Err(Error::Config(format!(
                "{name}: expected true or false, got {other:?}"
            ))),
        }
    }
}

/// The longest MESSAGE_TTL: far beyond any use, and `created_at + ttl` stays a valid timestamp.
const MESSAGE_TTL_MAX: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

fn message_ttl(env: &Env) -> Result<Option<Duration>, Error> {
    if env.get("MESSAGE_TTL").is_none() {
        return Ok(None);
    }
    let ttl = env.duration("MESSAGE_TTL", "0", false)?;
    if ttl < Duration::from_millis(1) || ttl > MESSAGE_TTL_MAX {
        return Err(Error::Config(format!(
            "MESSAGE_TTL: expected a duration from 1ms to 10 years (unset = never expire), got {}",
            fmt_duration(ttl)
        )));
    }
    Ok(Some(ttl))
}

fn rate_limit(env: &Env) -> Result<Option<f64>, Error> {
    let Some(raw) = env.get("WEBHOOK_RATE_LIMIT") else {
        return Ok(None);
    };
    let per_second = raw.strip_suffix("/s").unwrap_or(raw).trim();
    match per_second.parse::<f64>() {
        Ok(r) if r.is_finite() && (0.01..=1_000_000.0).contains(&r) => Ok(Some(r)),
        _ => Err(Error::Config(format!(
            "WEBHOOK_RATE_LIMIT: expected requests per second, a number from 0.01 to 1000000 \
             (e.g. 50 or 0.5), got {raw:?}"
        ))),
    }
}

fn database_url(env: &Env) -> Result<String, Error> {
    if let Some(url) = env.get("DATABASE_URL") {
        // Checked, with its TLS settings, by `Config::postgres` once everything is read.
        return Ok(url.to_owned());
    }
    let mut url = url_from_parts(env, "postgres", "DB", 5432, Some("postgres"))?;
    url.set_path(env.get("DB_NAME").unwrap_or("messages"));
    Ok(url.to_string())
}

/// `scheme://[user][:password]@host:port/` from `{PREFIX}_HOST`, `_PORT`, `_USER` and
/// `_PASSWORD`, percent-encoded as needed.
fn url_from_parts(
    env: &Env,
    scheme: &str,
    prefix: &str,
    default_port: u16,
    default_user: Option<&str>,
) -> Result<Url, Error> {
    let var = |part: &str| format!("{prefix}_{part}");
    let port = env.parse_num(&var("PORT"), default_port.into(), 1, u16::MAX.into())?;
    let mut url = Url::parse(&format!("{scheme}://localhost/")).expect("static URL");
    url.set_host(Some(env.get(&var("HOST")).unwrap_or("localhost")))
        .map_err(|e| Error::Config(format!("{}: {e}", var("HOST"))))?;
    let _ = url.set_port(Some(port as u16));
    if let Some(user) = env.get(&var("USER")).or(default_user) {
        let _ = url.set_username(user);
    }
    if let Some(password) = env.get(&var("PASSWORD")) {
        let _ = url.set_password(Some(password));
    }
    Ok(url)
}

fn redis_settings(env: &Env) -> Result<RedisSettings, Error> {
    let sentinels: Vec<String> = env
        .get("REDIS_SENTINELS")
        .map(|list| {
            list.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let sentinel_master = env.get("REDIS_SENTINEL_MASTER").map(str::to_owned);
    if sentinels.is_empty() != sentinel_master.is_none() {
        return Err(Error::Config(
            "REDIS_SENTINELS: set together with REDIS_SENTINEL_MASTER (or neither)".into(),
        ));
    }
    if let Some(bad) = sentinels
        .iter()
        .find(|s| connect::parse_host_port(s).is_none())
    {
        return Err(Error::Config(format!(
            "REDIS_SENTINELS: expected host:port,host:port,…, got {bad:?}"
        )));
    }
    Ok(RedisSettings {
        url: redis_url(env)?,
        ca_cert: env.get("REDIS_CA_CERT").map(PathBuf::from),
        sentinels,
        sentinel_master,
        password: env.get("REDIS_PASSWORD").map(str::to_owned),
    })
}

fn redis_url(env: &Env) -> Result<String, Error> {
    if let Some(url) = env.get("REDIS_URL") {
        redis::Client::open(url)
            .map_err(|e| Error::Config(format!("REDIS_URL: not a Redis URL ({e})")))?;
        return Ok(url.to_owned());
    }
    Ok(url_from_parts(env, "redis", "REDIS", 6379, None)?.to_string())
}

fn webhook_url(raw: &str) -> Result<Url, Error> {
    let url = Url::parse(raw)
        .map_err(|e| Error::Config(format!("WEBHOOK_URL: not a URL ({e}), got {raw:?}")))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(url),
        _ => Err(Error::Config(format!(
            "WEBHOOK_URL: expected an http:// or https:// URL with a host, got {raw:?}"
        ))),
    }
}

fn webhook_secret(raw: &str) -> Result<Vec<u8>, Error> {
    let encoded = raw.strip_prefix("whsec_").ok_or_else(|| {
        Error::Config("WEBHOOK_SECRET: expected whsec_<base64 key> (the value is not shown)".into())
    })?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| {
            Error::Config(
                "WEBHOOK_SECRET: the part after whsec_ is not valid base64 (the value is not shown)"
                    .into(),
            )
        })?;
    if key.is_empty() {
        return Err(Error::Config("WEBHOOK_SECRET: the key is empty".into()));
    }
    Ok(key)
}

fn log_level(env: &Env) -> Result<log::LevelFilter, Error> {
    let raw = env.get("LOG_LEVEL").unwrap_or("info");
    match raw.to_ascii_lowercase().as_str() {
        "error" => Ok(log::LevelFilter::Error),
        "warn" | "warning" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        "trace" => Ok(log::LevelFilter::Trace),
        _ => Err(Error::Config(format!(
            "LOG_LEVEL: expected error, warn, info, debug or trace, got {raw:?}"
        ))),
    }
}

fn log_format(env: &Env) -> Result<LogFormat, Error> {
    match env.get("LOG_FORMAT").unwrap_or("json") {
        "json" => Ok(LogFormat::Json),
        "text" => Ok(LogFormat::Text),
        other => Err(Error::Config(format!(
            "LOG_FORMAT: expected json or text, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, Error> {
        let vars = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(&vars)
    }

    fn error_of(pairs: &[(&str, &str)]) -> String {
        match parse(pairs) {
            Err(Error::Config(msg)) => msg,
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("expected an error for {pairs:?}"),
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.database_url,
            "postgres://postgres@localhost:5432/messages"
        );
        assert_eq!(c.redis.url, "redis://localhost:6379/");
        assert_eq!(c.server_port, 8080);
        assert_eq!(c.server_host, "0.0.0.0");
        assert_eq!(c.webhook_timeout, Duration::from_secs(10));
        assert_eq!(c.processing_interval, Duration::from_secs(120));
        assert_eq!(c.max_processing_time, Duration::from_secs(30));
        assert_eq!(c.batch_size, 2);
        assert_eq!(c.worker_count, 4);
        assert_eq!(c.max_attempts, 20);
        assert_eq!(c.retry_base_delay, Duration::from_secs(5));
        assert_eq!(c.retry_max_delay, Duration::from_secs(600));
        assert_eq!(c.content_max_length, 160);
        assert!(!c.lock_enabled);
        assert_eq!(c.lock_ttl, Duration::from_secs(180));
        assert_eq!(c.lock_key, "message-dispatcher:lock");
        assert_eq!(c.log_level, log::LevelFilter::Info);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.webhook_url.is_none() && c.webhook_secret.is_none() && c.api_token.is_none());
        assert_eq!(c.message_ttl, None);
    }

    #[test]
    fn urls_are_built_from_parts() {
        let c = parse(&[
            ("DB_HOST", "db.internal"),
            ("DB_PORT", "6432"),
            ("DB_USER", "app"),
            ("DB_PASSWORD", "p@ss word"),
            ("DB_NAME", "queue"),
            ("REDIS_HOST", "cache"),
            ("REDIS_PORT", "6380"),
            ("REDIS_PASSWORD", "hunter2"),
        ])
        .unwrap();
        assert_eq!(
            c.database_url,
            "postgres://app:p%40ss%20word@db.internal:6432/queue"
        );
        assert_eq!(c.redis.url, "redis://:hunter2@cache:6380/");
        let shown = c.to_string();
        assert!(
            !shown.contains("p%40ss") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn durations_accept_the_documented_units() {
        let c = parse(&[
            ("PROCESSING_INTERVAL", "500ms"),
            ("WEBHOOK_TIMEOUT", "2s"),
            ("MAX_PROCESSING_TIME", "1m"),
            ("RETRY_MAX_DELAY", "1h"),
        ])
        .unwrap();
        assert_eq!(c.processing_interval, Duration::from_millis(500));
        assert_eq!(c.webhook_timeout, Duration::from_secs(2));
        assert_eq!(c.max_processing_time, Duration::from_secs(60));
        assert_eq!(c.retry_max_delay, Duration::from_secs(3600));
        assert!(parse(&[("PROCESSING_INTERVAL", "0")]).unwrap().continuous());
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        for (name, value) in [
            ("BATCH_SIZE", "zero"),
            ("BATCH_SIZE", "0"),
            ("WORKER_COUNT", "-1"),
            ("SERVER_PORT", "99999"),
            ("WEBHOOK_TIMEOUT", "10"),
            ("WEBHOOK_TIMEOUT", "0"),
            ("PROCESSING_INTERVAL", "soon"),
            ("DISTRIBUTED_LOCK_ENABLED", "maybe"),
            ("LOG_LEVEL", "loud"),
            ("LOG_FORMAT", "xml"),
            ("WEBHOOK_URL", "ftp://example.com/"),
            ("WEBHOOK_URL", "not a url"),
            ("DATABASE_URL", "postgres://host:notaport/db"),
            ("MAX_ATTEMPTS", "0"),
            ("WEBHOOK_CIRCUIT_THRESHOLD", "0"),
            ("WEBHOOK_RATE_LIMIT", "0"),
            ("WEBHOOK_RATE_LIMIT", "-5"),
            ("WEBHOOK_RATE_LIMIT", "fast"),
            ("WEBHOOK_RATE_LIMIT", "NaN"),
            ("MESSAGE_TTL", "0"),
            ("MESSAGE_TTL", "5"),
            ("MESSAGE_TTL", "soon"),
            ("MESSAGE_TTL", "500us"),
            ("MESSAGE_TTL", "11years"),
            ("SENT_RETENTION", "0"),
            ("SENT_RETENTION", "forever"),
            ("FAILED_RETENTION", "7"),
        ] {
            let msg = error_of(&[(name, value)]);
            assert!(
                msg.starts_with(&format!("{name}: ")),
                "{name}={value}: {msg}"
            );
        }
    }

    #[test]
    fn retention_is_off_unless_set() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.sent_retention, c.failed_retention), (None, None));
        assert!(c.to_string().contains("SENT_RETENTION=<unset>\n"));
        let c = parse(&[("SENT_RETENTION", "7d"), ("FAILED_RETENTION", "30d")]).unwrap();
        assert_eq!(c.sent_retention, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.failed_retention, Some(Duration::from_secs(30 * 86400)));
        assert!(c.to_string().contains("FAILED_RETENTION=30days\n"), "{c}");
    }

    #[test]
    fn rate_limit_is_requests_per_second() {
        assert_eq!(parse(&[]).unwrap().webhook_rate_limit, None);
        for (raw, rate) in [("50", 50.0), ("0.5", 0.5), ("20/s", 20.0)] {
            let c = parse(&[("WEBHOOK_RATE_LIMIT", raw)]).unwrap();
            assert_eq!(c.webhook_rate_limit, Some(rate), "{raw}");
        }
    }

    #[test]
    fn message_ttl_is_a_duration_and_unset_means_never() {
        assert_eq!(parse(&[("MESSAGE_TTL", "")]).unwrap().message_ttl, None);
        let c = parse(&[("MESSAGE_TTL", "5m")]).unwrap();
        assert_eq!(c.message_ttl, Some(Duration::from_secs(300)));
        assert!(c.to_string().contains("MESSAGE_TTL=5m\n"), "{c}");
        assert!(parse(&[])
            .unwrap()
            .to_string()
            .contains("MESSAGE_TTL=<unset>\n"));
    }

    #[test]
    fn webhook_secret_is_checked_but_never_echoed() {
        let msg = error_of(&[("WEBHOOK_SECRET", "whsec_!!!notbase64secretvalue")]);
        assert!(msg.starts_with("WEBHOOK_SECRET: "));
        assert!(!msg.contains("notbase64secretvalue"));
        assert!(error_of(&[("WEBHOOK_SECRET", "plain")]).starts_with("WEBHOOK_SECRET: "));
        let c = parse(&[("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]).unwrap();
        assert_eq!(c.webhook_secret.as_ref().unwrap().len(), 24);
        assert!(c.to_string().contains("WEBHOOK_SECRET=<redacted>"));
    }

    #[test]
    fn lock_ttl_must_outlast_a_cycle_and_a_request() {
        let msg = error_of(&[
            ("DISTRIBUTED_LOCK_ENABLED", "true"),
            ("DISTRIBUTED_LOCK_TTL", "40s"),
        ]);
        assert!(msg.starts_with("DISTRIBUTED_LOCK_TTL: "), "{msg}");
        // The same TTL is fine while the lease is off: it is never used.
        assert!(parse(&[("DISTRIBUTED_LOCK_TTL", "40s")]).is_ok());
        assert!(parse(&[
            ("DISTRIBUTED_LOCK_ENABLED", "true"),
            ("DISTRIBUTED_LOCK_TTL", "41s"),
        ])
        .is_ok());
    }

    #[test]
    fn retry_delays_must_be_ordered() {
        let msg = error_of(&[("RETRY_BASE_DELAY", "2m"), ("RETRY_MAX_DELAY", "1m")]);
        assert!(msg.starts_with("RETRY_BASE_DELAY: "), "{msg}");
    }

    #[test]
    fn lease_periods_follow_the_spec() {
        let c = parse(&[("DISTRIBUTED_LOCK_ENABLED", "true")]).unwrap();
        assert_eq!(c.lease_extend_period(), Duration::from_secs(60));
        assert_eq!(c.lease_retry_period(), Duration::from_secs(60));
        let c = parse(&[
            ("DISTRIBUTED_LOCK_ENABLED", "true"),
            ("PROCESSING_INTERVAL", "10s"),
        ])
        .unwrap();
        assert_eq!(c.lease_retry_period(), Duration::from_secs(10));
        let c = parse(&[
            ("DISTRIBUTED_LOCK_ENABLED", "true"),
            ("PROCESSING_INTERVAL", "0"),
        ])
        .unwrap();
        assert_eq!(c.lease_retry_period(), Duration::from_secs(60));
    }

    #[test]
    fn extensions_leave_room_for_a_whole_request() {
        // TTL 3s, margin 0.3s, requests up to 2s: sending is allowed for 0.7s after each
        // extension, so the next one must come within that.
        let c = parse(&[
            ("DISTRIBUTED_LOCK_ENABLED", "true"),
            ("DISTRIBUTED_LOCK_TTL", "3s"),
            ("WEBHOOK_TIMEOUT", "2s"),
            ("MAX_PROCESSING_TIME", "500ms"),
        ])
        .unwrap();
        assert_eq!(c.lease_extend_period(), Duration::from_millis(350));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = parse(&[("BATCH_SIZE", ""), ("WEBHOOK_SECRET", " ")]).unwrap();
        assert_eq!(c.batch_size, 2);
        assert!(c.webhook_secret.is_none());
    }
}
