//! message-dispatcher: delivers messages waiting in PostgreSQL to an HTTP webhook, with a Redis
//! lease choosing the one instance that sends. See README.md for the architecture.

pub mod api;
pub mod backoff;
pub mod circuit;
pub mod clock;
pub mod config;
pub mod connect;
pub mod daemon;
pub mod error;
pub mod lease;
pub mod listener;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod outcomes;
pub mod pg;
pub mod rate;
pub mod retention;
pub mod scheduler;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod timestamp;
pub mod transport;
pub mod webhook;
pub mod worker;
