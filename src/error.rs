//! The one error type of the crate, and what each kind means as an exit code.
//!
//! Operators script around exit codes: 2 says "fix your configuration or command line",
//! 1 says "something outside us failed" (database, Redis, the network).

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// A bad or missing setting: the message starts with the variable's name.
    Config(String),
    /// A command line the program does not understand.
    Usage(String),
    Database(postgres::Error),
    Redis(redis::RedisError),
    Io(std::io::Error),
    /// Anything else, already worded for the log.
    Other(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            _ => 1,
        }
    }

    /// True when PostgreSQL refused a statement for the data it carried (SQLSTATE classes 22,
    /// data exception, and 23, integrity constraint violation): the database itself works, and
    /// the same statement would fail again however often it is retried.
    pub fn is_data_error(&self) -> bool {
        let Error::Database(e) = self else {
            return false;
        };
        e.as_db_error()
            .is_some_and(|db| matches!(db.code().code().get(..2), Some("22" | "23")))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg) => write!(f, "configuration error: {msg}"),
            Error::Usage(msg) => write!(f, "usage error: {msg}"),
            Error::Database(e) => write!(f, "database: {}", database_detail(e)),
            Error::Redis(e) => write!(f, "redis: {e}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Other(msg) => f.write_str(msg),
        }
    }
}

/// The postgres crate's Display hides the server's message behind "db error"; show it.
fn database_detail(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

impl std::error::Error for Error {}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        Error::Database(e)
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Redis(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}
