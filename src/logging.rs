//! Log lines the way operators grep them: one JSON object per line on stderr,
//! `{"ts","level","msg",…fields}`, or a plain text line with LOG_FORMAT=text.
//!
//! Fields are `log`'s key-values (`info!(key = k; "Lock acquired")`), so call sites stay plain
//! `log` macros and the wording the SPEC fixes lives where the event happens.

use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use serde_json::{Map, Value as Json};

use crate::config::{Config, LogFormat};

/// Our own crates log at LOG_LEVEL; dependencies only at warn, so a debug run is still readable.
const OWN_CRATES: &[&str] = &["message_dispatcher", "webhook_sink", "add_test_messages"];

/// Installs the global logger. Safe to call once per process.
pub fn init(config: &Config) {
    init_with(
        config.log_level,
        config.log_format,
        config.rust_log.as_deref(),
    );
}

pub fn init_with(level: log::LevelFilter, format: LogFormat, rust_log: Option<&str>) {
    let mut builder = env_logger::Builder::new();
    builder.target(env_logger::Target::Stderr);
    match rust_log {
        Some(filters) => {
            builder.parse_filters(filters);
        }
        None => {
            builder.filter_level(log::LevelFilter::Warn);
            for name in OWN_CRATES {
                builder.filter_module(name, level);
            }
        }
    }
    builder.format(move |buf, record| {
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let mut fields = Fields::default();
        let _ = record.key_values().visit(&mut fields);
        match format {
            LogFormat::Json => {
                let mut line = Map::new();
                line.insert("ts".into(), ts.to_string().into());
                line.insert("level".into(), level_word(record.level()).into());
                line.insert("msg".into(), record.args().to_string().into());
                for (k, v) in fields.0 {
                    line.entry(k).or_insert(v);
                }
                writeln!(buf, "{}", Json::Object(line))
            }
            LogFormat::Text => {
                write!(buf, "{ts} {:<5} {}", record.level(), record.args())?;
                for (k, v) in fields.0 {
                    match v {
                        Json::String(s) => write!(buf, " {k}={s}")?,
                        other => write!(buf, " {k}={other}")?,
                    }
                }
                writeln!(buf)
            }
        }
    });
    let _ = builder.try_init();
}

fn level_word(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

/// Collects key-values, keeping numbers and booleans typed in the JSON.
#[derive(Default)]
struct Fields(Vec<(String, Json)>);

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let json = if let Some(b) = value.to_bool() {
            Json::Bool(b)
        } else if let Some(n) = value.to_u64() {
            Json::from(n)
        } else if let Some(n) = value.to_i64() {
            Json::from(n)
        } else if let Some(f) = value.to_f64() {
            Json::from(f)
        } else {
            Json::String(value.to_string())
        };
        self.0.push((key.as_str().to_owned(), json));
        Ok(())
    }
}
