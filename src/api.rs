//! The HTTP side: `/health` and the probes `/livez` and `/readyz`, the small operations API,
//! `/metrics` and `/openapi.json`, served by `tiny_http` (no async runtime).
//!
//! # Probes
//!
//! - `/livez` (liveness): is this process working — its scheduler loop made progress within the
//!   watchdog timeout ([`Status::live`]). Answered on the connection's own thread from an atomic,
//!   so neither a slow database nor busy database threads can fail it. Restart on failure.
//! - `/readyz` (readiness): can this instance do its work — the dependencies in use answer
//!   (PostgreSQL; Redis with the lease). Fails during an outage; never a reason to restart.
//! - `/health`: the Go service's endpoint, kept as it was: the dependencies, with details.
//!
//! # Threads, and why a slow client cannot stall `/health`
//!
//! `tiny_http` reads request headers (and bodies of at most 1 KiB) on a thread per connection,
//! but everything else that touches a client's socket happens on whichever thread holds the
//! `Request`: reading a larger or chunked body, writing the response, and — when the request is
//! dropped — reading and discarding whatever body is left. The socket has no timeouts and
//! `tiny_http` offers no way to set any, so each of those can block for as long as the client
//! likes. If they ran on a small shared pool, eight clients that send half a body and wait
//! would take every thread and `/health` would stop answering.
//!
//! So the work is split by what may block:
//! - the **accept thread** only takes requests from `tiny_http` and hands each to the thread of
//!   its connection, never touching a socket;
//! - a **connection thread** per client connection (spawned on its first request, gone when the
//!   connection has nothing queued — the same shape as `tiny_http`'s own reader threads) does
//!   all socket I/O: reads the body with a size limit, validates, writes the answer. A client
//!   that stalls blocks only its own thread; pipelined requests of one connection stay in order
//!   on that thread;
//! - a few **database threads** each own a PostgreSQL (and, with the lease, a Redis)
//!   connection and run the queries behind `/health`, `/metrics` and the API. They receive
//!   finished, validated jobs over a channel and never see a socket, so they are always free for
//!   the next `/health` unless the database itself is slow.
//!
//! Every route is listed once, in [`ROUTES`]; the router and the test that compares the table
//! with `openapi.json` both read it, so the served API and its description cannot drift apart.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tiny_http::{Header, Request, Response, Server};

use crate::config::Config;
use crate::error::Error;
use crate::metrics::{self, Metrics};
use crate::status::Status;
use crate::store::{NewMessage, Store};

/// Threads running database work for the API: enough that a slow query does not hold up
/// `/health`, few enough to stay a small share of PostgreSQL's connections.
const DB_THREADS: usize = 4;
/// Jobs waiting for a database thread.
const JOB_QUEUE: usize = 64;
/// How long a request waits for a database thread (queueing plus the query) before it is
/// answered 503.
const JOB_WAIT: Duration = Duration::from_secs(30);
/// Largest request body accepted.
pub const MAX_BODY: u64 = 64 * 1024;
const SENT_PAGE_DEFAULT: u32 = 50;
const SENT_PAGE_MAX: u32 = 1000;
/// Longest recipient accepted: E.164 numbers, e-mail addresses and chat handles all fit.
pub const RECIPIENT_MAX: usize = 254;

/// The OpenAPI document of this API, kept beside the code that it describes. `/openapi.json`
/// serves it with `content`'s `maxLength` set to this instance's CONTENT_MAX_LENGTH.
pub const OPENAPI: &str = include_str!("openapi.json");

mod messages;
pub use messages::{
    check_idempotency_key, parse_bulk_retry, parse_id, parse_list_query, parse_retry_body,
    parse_time, BULK_RETRY_MAX, STATUSES,
};

/// One served route. `GET` routes also answer `HEAD`. A path segment `{name}` matches any
/// non-empty segment; a path without one wins over one with (`/messages/sent` is not the message
/// `sent`), as OpenAPI resolves them.
#[derive(Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    /// With API_TOKEN set, the route needs `Authorization: Bearer <token>`: every route that
    /// reads or changes messages or the processing switch. Probes, the scrape and the document
    /// stay open.
    pub needs_token: bool,
    endpoint: Endpoint,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Health,
    Live,
    Ready,
    Metrics,
    OpenApi,
    SentMessages,
    Start,
    Stop,
    Enqueue,
    Message,
    Messages,
    Retry,
    RetryMany,
    Cancel,
}

/// Every route the API serves: the router dispatches from this table, `405`'s `Allow` header
/// is built from it, and a test checks it against `openapi.json` both ways.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/health",
        needs_token: false,
        endpoint: Endpoint::Health,
    },
    Route {
        method: "GET",
        path: "/livez",
        needs_token: false,
        endpoint: Endpoint::Live,
    },
    Route {
        method: "GET",
        path: "/readyz",
        needs_token: false,
        endpoint: Endpoint::Ready,
    },
    Route {
        method: "GET",
        path: "/metrics",
        needs_token: false,
        endpoint: Endpoint::Metrics,
    },
    Route {
        method: "GET",
        path: "/openapi.json",
        needs_token: false,
        endpoint: Endpoint::OpenApi,
    },
    Route {
        method: "GET",
        path: "/messages/sent",
        needs_token: true,
        endpoint: Endpoint::SentMessages,
    },
    Route {
        method: "POST",
        path: "/messages",
        needs_token: true,
        endpoint: Endpoint::Enqueue,
    },
    Route {
        method: "POST",
        path: "/processing/start",
        needs_token: true,
        endpoint: Endpoint::Start,
    },
    Route {
        method: "POST",
        path: "/processing/stop",
        needs_token: true,
        endpoint: Endpoint::Stop,
    },
    // Operations on messages (issue #12): src/api/messages.rs.
    Route {
        method: "GET",
        path: "/messages",
        needs_token: true,
        endpoint: Endpoint::Messages,
    },
    Route {
        method: "GET",
        path: "/messages/{id}",
        needs_token: true,
        endpoint: Endpoint::Message,
    },
    Route {
        method: "POST",
        path: "/messages/{id}/retry",
        needs_token: true,
        endpoint: Endpoint::Retry,
    },
    Route {
        method: "POST",
        path: "/messages/{id}/cancel",
        needs_token: true,
        endpoint: Endpoint::Cancel,
    },
    Route {
        method: "POST",
        path: "/messages/retry",
        needs_token: true,
        endpoint: Endpoint::RetryMany,
    },
];

/// The routes that serve `path` (all of one path template: the one with the fewest `{…}`
/// segments among those that match) and the values of its `{…}` segments; None when no route
/// does.
pub fn routes_for(path: &str) -> Option<(Vec<&'static Route>, Vec<&str>)> {
    let mut best: Option<(&'static str, Vec<&str>)> = None;
    for route in ROUTES {
        let Some(params) = match_template(route.path, path) else {
            continue;
        };
        if best.as_ref().is_none_or(|(_, p)| params.len() < p.len()) {
            best = Some((route.path, params));
        }
    }
    let (template, params) = best?;
    let routes = ROUTES.iter().filter(|r| r.path == template).collect();
    Some((routes, params))
}

/// The values of `template`'s `{…}` segments in `path`, if it matches.
fn match_template<'p>(template: &str, path: &'p str) -> Option<Vec<&'p str>> {
    let mut params = Vec::new();
    let mut segments = path.split('/');
    for expected in template.split('/') {
        let segment = segments.next()?;
        if expected.starts_with('{') && expected.ends_with('}') {
            if segment.is_empty() {
                return None;
            }
            params.push(segment);
        } else if expected != segment {
            return None;
        }
    }
    segments.next().is_none().then_some(params)
}

pub struct Api {
    server: Arc<Server>,
    accept: JoinHandle<()>,
    db_threads: Vec<JoinHandle<()>>,
    stop: Sender<()>,
}

impl Api {
    /// Binds the port and starts the accept and database threads.
    pub fn start(
        config: &Config,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Result<Api, Error> {
        let addr = config.listen_addr();
        let server = Server::http(&addr)
            .map_err(|e| Error::Other(format!("cannot listen on {addr}: {e}")))?;
        let server = Arc::new(server);

        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(JOB_QUEUE);
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let mut db_threads = Vec::with_capacity(DB_THREADS);
        for n in 0..DB_THREADS {
            let mut backend = Backend::new(config, status.clone(), metrics.clone())?;
            let (jobs, stopped) = (jobs_rx.clone(), stopped.clone());
            let handle = std::thread::Builder::new()
                .name(format!("http-db-{n}"))
                .spawn(move || backend.run(&jobs, &stopped))?;
            db_threads.push(handle);
        }

        let front = Arc::new(Front {
            status,
            jobs: jobs_tx,
            metrics,
            token_digest: config.api_token.as_deref().map(digest),
            content_max_length: config.content_max_length,
            message_ttl: config.message_ttl,
            openapi: openapi_document(config.content_max_length),
        });
        let connections = Arc::new(Connections {
            queues: Mutex::new(HashMap::new()),
            front,
        });
        let accept_server = server.clone();
        let accept = std::thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || {
                while let Ok(request) = accept_server.recv() {
                    connections.dispatch(request);
                }
            })?;
        log::info!(addr = addr.as_str(); "HTTP API listening");
        Ok(Api {
            server,
            accept,
            db_threads,
            stop,
        })
    }

    /// Stops taking requests and ends the database threads, waiting for them until `by` at
    /// most: one inside a statement on a silent path ends only at the connection's deadline.
    /// Connection threads still writing an answer finish on their own.
    pub fn stop(self, by: Instant) {
        self.server.unblock();
        let _ = self.accept.join();
        drop(self.stop);
        while !self.db_threads.iter().all(JoinHandle::is_finished) && Instant::now() < by {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The `/openapi.json` body: the document with this instance's content limit filled in.
fn openapi_document(content_max_length: usize) -> Arc<Vec<u8>> {
    let mut doc: Value =
        serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON (tested)");
    if let Some(max) =
        doc.pointer_mut("/components/schemas/NewMessage/properties/content/maxLength")
    {
        *max = json!(content_max_length);
    }
    Arc::new(serde_json::to_vec(&doc).expect("a Value always serialises"))
}

/// The queues of the connections that have a thread right now, by the client's address (which
/// names one TCP connection).
struct Connections {
    queues: Mutex<HashMap<SocketAddr, Sender<Request>>>,
    front: Arc<Front>,
}

impl Connections {
    /// Hands `request` to its connection's thread, starting one when there is none. Never blocks
    /// on a client.
    fn dispatch(self: &Arc<Self>, request: Request) {
        let Some(addr) = request.remote_addr().copied() else {
            // Not TCP (never the case here): a thread for this one request.
            let front = self.front.clone();
            let _ = std::thread::Builder::new()
                .name("http-conn".into())
                .spawn(move || front.serve(request));
            return;
        };
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let request = match queues.get(&addr) {
            Some(queue) => match queue.send(request) {
                Ok(()) => return,
                Err(crossbeam_channel::SendError(request)) => request,
            },
            None => request,
        };
        let (queue, pending) = crossbeam_channel::unbounded();
        queues.insert(addr, queue);
        drop(queues);
        let connections = self.clone();
        let spawned = std::thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || connections.serve_connection(addr, request, pending));
        if let Err(e) = spawned {
            // The request went down with the closure (tiny_http answers it 500).
            log::warn!(error = e.to_string().as_str(); "Cannot start a thread for an HTTP connection");
            self.queues
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&addr);
        }
    }

    /// Serves the requests of one connection in order, and ends when none is queued. The check
    /// for more and the removal happen under the lock `dispatch` sends under, so no request is
    /// left behind in a queue without a thread.
    fn serve_connection(&self, addr: SocketAddr, first: Request, pending: Receiver<Request>) {
        let mut request = first;
        loop {
            self.front.serve(request);
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            match pending.try_recv() {
                Ok(next) => request = next,
                Err(_) => {
                    queues.remove(&addr);
                    return;
                }
            }
        }
    }
}

/// What a connection thread needs: validation, authorisation, and the way to the database
/// threads.
struct Front {
    status: Arc<Status>,
    jobs: Sender<(Job, Sender<Reply>)>,
    metrics: Arc<Metrics>,
    /// SHA-256 of API_TOKEN: comparing digests keeps the comparison constant-time whatever the
    /// lengths.
    token_digest: Option<[u8; 32]>,
    content_max_length: usize,
    message_ttl: Option<Duration>,
    openapi: Arc<Vec<u8>>,
}

/// Database work, validated and ready to run.
enum Job {
    Health,
    Ready,
    Metrics,
    Switch(bool),
    Sent {
        limit: u32,
        before: Option<i64>,
    },
    /// Enqueue and the operations on messages (src/api/messages.rs).
    Messages(messages::Job),
}

/// An answer, built without touching the socket.
struct Reply {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            body: body.to_string().into_bytes(),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    fn error(status: u16, msg: &str) -> Reply {
        Reply::json(status, &json!({ "error": msg }))
    }

    fn with_header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn into_response(self) -> Response<std::io::Cursor<Vec<u8>>> {
        let mut response = Response::from_data(self.body)
            .with_status_code(self.status)
            .with_header(header("Content-Type", self.content_type))
            .with_header(header("Cache-Control", "no-store"));
        for (name, value) in &self.headers {
            response.add_header(header(name, value));
        }
        response
    }
}

impl Front {
    /// Answers one request; runs on the request's connection thread.
    fn serve(&self, mut request: Request) {
        let (route, method, reply) = self.route(&mut request);
        self.metrics.observe_http(route, method, reply.status);
        log::trace!(method = method, route = route, status = reply.status; "HTTP request");
        let _ = request.respond(reply.into_response());
        // Dropping the request here reads and discards what is left of its body: this
        // connection's thread is the one place where that may wait on the client.
    }

    /// Returns the route's path (or `unmatched`), the method as a metric label, and the answer.
    fn route(&self, request: &mut Request) -> (&'static str, &'static str, Reply) {
        let method = request.method().as_str().to_owned();
        let method_label = method_label(&method);
        let url = request.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        let Some((allowed, params)) = routes_for(path) else {
            return ("unmatched", method_label, Reply::error(404, "not found"));
        };
        let path_label = allowed[0].path;
        let found = allowed
            .iter()
            .find(|r| r.method == method || (method == "HEAD" && r.method == "GET"));
        let Some(route) = found else {
            return (path_label, method_label, method_not_allowed(&allowed));
        };
        let reply = self
            .authorize(route, request)
            .and_then(|()| self.endpoint(route.endpoint, request, query, &params))
            .unwrap_or_else(|r| r);
        (path_label, method_label, reply)
    }

    fn endpoint(
        &self,
        endpoint: Endpoint,
        request: &mut Request,
        query: &str,
        params: &[&str],
    ) -> Result<Reply, Reply> {
        match endpoint {
            Endpoint::OpenApi => Ok(Reply {
                status: 200,
                body: self.openapi.as_ref().clone(),
                content_type: "application/json",
                headers: Vec::new(),
            }),
            Endpoint::Health => self.run(Job::Health),
            Endpoint::Ready => self.run(Job::Ready),
            Endpoint::Live => Ok(self.live()),
            Endpoint::Metrics => self.run(Job::Metrics),
            Endpoint::SentMessages => {
                let (limit, before) = parse_sent_query(query).map_err(|msg| bad(&msg))?;
                self.run(Job::Sent { limit, before })
            }
            Endpoint::Start | Endpoint::Stop => self.run(Job::Switch(endpoint == Endpoint::Start)),
            Endpoint::Enqueue
            | Endpoint::Message
            | Endpoint::Messages
            | Endpoint::Retry
            | Endpoint::RetryMany
            | Endpoint::Cancel => {
                let job = self.messages_job(endpoint, request, query, params)?;
                self.run(Job::Messages(job))
            }
        }
    }

    /// `/livez`: from the scheduler's heartbeat alone, without a database thread.
    fn live(&self) -> Reply {
        let live = self.status.live();
        let body = json!({
            "status": if live { "live" } else { "stalled" },
            "instance_id": self.status.instance_id,
            "last_progress_ms": self.status.since_beat().as_millis() as u64,
            "timeout_ms": self.status.liveness_timeout().as_millis() as u64,
        });
        Reply::json(if live { 200 } else { 503 }, &body)
    }

    /// Refuses a request without the right token for a route that needs one.
    fn authorize(&self, route: &Route, request: &Request) -> Result<(), Reply> {
        let Some(expected) = &self.token_digest else {
            return Ok(());
        };
        if !route.needs_token {
            return Ok(());
        }
        let given = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .and_then(|h| bearer_token(h.value.as_str()));
        match given {
            Some(token) if bool::from(digest(token).ct_eq(expected)) => Ok(()),
            _ => Err(Reply::error(401, "missing or wrong bearer token")
                .with_header("WWW-Authenticate", "Bearer")),
        }
    }

    /// Hands a job to a database thread and waits for its answer.
    fn run(&self, job: Job) -> Result<Reply, Reply> {
        let (reply_to, reply) = crossbeam_channel::bounded(1);
        if self.jobs.send_timeout((job, reply_to), JOB_WAIT).is_err() {
            return Err(Reply::error(503, "busy: no database thread free"));
        }
        reply
            .recv_timeout(JOB_WAIT)
            .map_err(|_| Reply::error(503, "busy: the database did not answer in time"))
    }
}

/// `Bearer <token>`, the scheme name case-insensitive (RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("Bearer").then(|| token.trim())
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn method_label(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    ];
    KNOWN
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

fn method_not_allowed(routes: &[&Route]) -> Reply {
    let mut methods = Vec::new();
    for route in routes {
        methods.push(route.method);
        if route.method == "GET" {
            methods.push("HEAD");
        }
    }
    Reply::error(405, "method not allowed").with_header("Allow", &methods.join(", "))
}

/// One of the threads that run the API's database work.
struct Backend {
    store: Store,
    redis: Option<RedisCheck>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

/// A Redis connection kept for `/health`'s PING.
struct RedisCheck {
    redis: crate::connect::Redis,
    conn: Option<redis::Connection>,
}

impl RedisCheck {
    fn ping(&mut self) -> bool {
        let timeout = Duration::from_secs(1);
        if self.conn.is_none() {
            let Ok(conn) = self.redis.connect(timeout) else {
                return false;
            };
            self.conn = Some(conn);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let ok = redis::cmd("PING").query::<String>(conn).is_ok();
        if !ok {
            self.conn = None;
        }
        ok
    }
}

impl Backend {
    fn new(config: &Config, status: Arc<Status>, metrics: Arc<Metrics>) -> Result<Backend, Error> {
        let redis = if config.lock_enabled {
            Some(RedisCheck {
                redis: crate::connect::Redis::new(&config.redis)?,
                conn: None,
            })
        } else {
            None
        };
        Ok(Backend {
            store: Store::new(config.postgres()?, &status.instance_id),
            redis,
            status,
            metrics,
        })
    }

    fn run(&mut self, jobs: &Receiver<(Job, Sender<Reply>)>, stopped: &Receiver<()>) {
        loop {
            select! {
                recv(jobs) -> job => match job {
                    Ok((job, reply_to)) => {
                        let _ = reply_to.send(self.answer(job));
                    }
                    Err(_) => return,
                },
                recv(stopped) -> _ => return,
            }
        }
    }

    fn answer(&mut self, job: Job) -> Reply {
        let result = match job {
            Job::Health => Ok(self.health()),
            Job::Ready => Ok(self.ready()),
            Job::Metrics => Ok(self.metrics()),
            Job::Switch(enabled) => self.switch(enabled),
            Job::Sent { limit, before } => {
                self.store.sent_page(limit, before).map(|(messages, next)| {
                    Reply::json(200, &json!({ "messages": messages, "next": next }))
                })
            }
            Job::Messages(job) => messages::answer(&mut self.store, job),
        };
        result.unwrap_or_else(unavailable)
    }

    fn health(&mut self) -> Reply {
        let (healthy, body) = self.dependencies();
        Reply::json(if healthy { 200 } else { 503 }, &body)
    }

    /// `/readyz`: the same verdict as `/health`, in a short body.
    fn ready(&mut self) -> Reply {
        let (ready, health) = self.dependencies();
        let body = json!({
            "status": if ready { "ready" } else { "not ready" },
            "dependencies": health["dependencies"],
        });
        Reply::json(if ready { 200 } else { 503 }, &body)
    }

    /// Asks PostgreSQL (and Redis, with the lease) and returns whether all answered, with the
    /// `/health` body.
    fn dependencies(&mut self) -> (bool, Value) {
        let state = self.store.state();
        let database_ok = state.is_ok();
        if let Ok(state) = &state {
            self.status
                .processing_enabled
                .store(state.processing_enabled, Ordering::Relaxed);
        }
        let redis = self.redis.as_mut().map(RedisCheck::ping);
        let healthy = database_ok && redis.unwrap_or(true);
        let word = |ok: bool| if ok { "healthy" } else { "unhealthy" };
        let processing = self.status.processing_enabled.load(Ordering::Relaxed);
        let body = json!({
            "status": word(healthy),
            "processing_status": if processing { "running" } else { "stopped" },
            "instance_id": self.status.instance_id,
            "lock": {
                "enabled": self.status.lock_enabled,
                "held": self.status.holds_lock(),
            },
            "dependencies": {
                "database": word(database_ok),
                "redis": redis.map_or("disabled", word),
            },
            "webhook": {
                "circuit": self.status.circuit.state().as_str(),
                "paused": self.status.circuit.paused_until().is_some(),
            },
        });
        (healthy, body)
    }

    fn metrics(&mut self) -> Reply {
        if let Ok((pending, sending)) = self.store.queue_depth() {
            self.metrics.set_queue_depth(pending, sending);
        }
        messages::refresh_metrics(&mut self.store, &self.metrics);
        if let Ok(state) = self.store.state() {
            self.status
                .processing_enabled
                .store(state.processing_enabled, Ordering::Relaxed);
        }
        let processing = self.status.processing_enabled.load(Ordering::Relaxed);
        self.metrics.processing_enabled.set(i64::from(processing));
        Reply {
            status: 200,
            body: self.metrics.render().into_bytes(),
            content_type: metrics::CONTENT_TYPE,
            headers: Vec::new(),
        }
    }

    fn switch(&mut self, enabled: bool) -> Result<Reply, Error> {
        let enabled = self.store.set_processing(enabled)?;
        self.status
            .processing_enabled
            .store(enabled, Ordering::Relaxed);
        let word = if enabled { "running" } else { "stopped" };
        log::info!(processing_status = word; "Processing switched");
        Ok(Reply::json(200, &json!({ "processing_status": word })))
    }
}

/// Parses `GET /messages/sent`'s query; the error names the parameter.
pub fn parse_sent_query(query: &str) -> Result<(u32, Option<i64>), String> {
    parse_page_query(query, |_, _| Ok(false))
}

/// Parses a page's `limit` and `before`; `other` takes the route's own parameters (true when it
/// knows the name). The error names the parameter.
fn parse_page_query(
    query: &str,
    mut other: impl FnMut(&str, &str) -> Result<bool, String>,
) -> Result<(u32, Option<i64>), String> {
    let mut limit = SENT_PAGE_DEFAULT;
    let mut before = None;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=SENT_PAGE_MAX).contains(n))
                    .ok_or_else(|| {
                        format!("limit: expected a whole number from 1 to {SENT_PAGE_MAX}")
                    })?;
            }
            "before" => {
                before = Some(
                    value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or("before: expected a positive message id")?,
                );
            }
            name => {
                if !other(name, &value)? {
                    return Err(format!("{name}: unknown query parameter"));
                }
            }
        }
    }
    Ok((limit, before))
}

/// Validates a `POST /messages` body; the error names the field.
pub fn parse_new_message(body: &[u8], content_max: usize) -> Result<NewMessage, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body: not valid JSON ({e})"))?;
    let Value::Object(fields) = value else {
        return Err("body: expected a JSON object with recipient and content".into());
    };
    if let Some(unknown) = fields.keys().find(|k| {
        !matches!(
            k.as_str(),
            "recipient" | "content" | "send_at" | "expires_at"
        )
    }) {
        return Err(format!("{unknown}: unknown field"));
    }
    let text = |name: &str| match fields.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{name}: expected a string")),
        None => Err(format!("{name}: required")),
    };
    let recipient = text("recipient")?;
    let content = text("content")?;
    if recipient.is_empty() {
        return Err("recipient: must not be empty".into());
    }
    if recipient.chars().count() > RECIPIENT_MAX {
        return Err(format!("recipient: at most {RECIPIENT_MAX} characters"));
    }
    if recipient.trim() != recipient || recipient.chars().any(char::is_control) {
        return Err("recipient: no control characters and no leading or trailing spaces".into());
    }
    if content.trim().is_empty() {
        return Err("content: must not be empty".into());
    }
    let length = content.chars().count();
    if length > content_max {
        return Err(format!(
            "content: {length} characters, at most {content_max} allowed"
        ));
    }
    if content.contains('\0') {
        return Err("content: must not contain NUL characters".into());
    }
    let time = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(at)) => parse_time(name, at).map(Some),
        Some(_) => Err(format!("{name}: expected an RFC 3339 date-time string")),
    };
    let send_at = time("send_at")?;
    let expires_at = time("expires_at")?;
    Ok(NewMessage {
        recipient,
        content,
        send_at,
        expires_at,
    })
}

/// Reads the body up to [`MAX_BODY`]; a larger one is refused without reading the rest (at once
/// when Content-Length says so, else as soon as one byte too many has arrived).
fn read_body(request: &mut Request) -> Result<Vec<u8>, Reply> {
    if request.body_length().is_some_and(|n| n as u64 > MAX_BODY) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|_| bad("body: could not be read"))?;
    if body.len() as u64 > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

fn too_large() -> Reply {
    Reply::error(413, &format!("body: larger than {MAX_BODY} bytes"))
}

fn bad(msg: &str) -> Reply {
    Reply::error(400, msg)
}

fn unavailable(e: Error) -> Reply {
    log::warn!(error = e.to_string().as_str(); "API request failed");
    Reply::error(503, "database unavailable")
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, openapi_document, parse_new_message, parse_sent_query, ROUTES};

    fn field_of(body: &str) -> String {
        let err = parse_new_message(body.as_bytes(), 160).unwrap_err();
        err.split(':').next().unwrap().to_owned()
    }

    #[test]
    fn valid_message() {
        let m =
            parse_new_message(br#"{"recipient":"+905551111111","content":"hello"}"#, 160).unwrap();
        assert_eq!(
            (
                m.recipient.as_str(),
                m.content.as_str(),
                m.send_at,
                m.expires_at
            ),
            ("+905551111111", "hello", None, None)
        );
    }

    #[test]
    fn expires_at_is_an_optional_rfc3339_time() {
        let parse = |body: &str| parse_new_message(body.as_bytes(), 160);
        let m =
            parse(r#"{"recipient":"a","content":"x","expires_at":"2026-11-25T17:30:00+03:00"}"#)
                .unwrap();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_617_000);
        assert_eq!(m.expires_at, Some(at));
        let m = parse(r#"{"recipient":"a","content":"x","expires_at":null}"#).unwrap();
        assert_eq!(m.expires_at, None);
        // In the past is valid: the message expires unsent, as with SQL.
        let m = parse(r#"{"recipient":"a","content":"x","expires_at":"2000-01-01T00:00:00Z"}"#)
            .unwrap();
        assert!(m.expires_at.is_some());
        for bad in [
            r#""tomorrow""#,
            r#""2026-11-25T14:30:00""#,
            r#""2026-02-30T00:00:00Z""#,
            "1795617000",
            "true",
            "{}",
        ] {
            let body = format!(r#"{{"recipient":"a","content":"x","expires_at":{bad}}}"#);
            assert_eq!(field_of(&body), "expires_at", "{bad}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of("nope"), "body");
        assert_eq!(field_of("[]"), "body");
        assert_eq!(field_of(r#"{"content":"x"}"#), "recipient");
        assert_eq!(field_of(r#"{"recipient":1,"content":"x"}"#), "recipient");
        assert_eq!(field_of(r#"{"recipient":"","content":"x"}"#), "recipient");
        assert_eq!(field_of(r#"{"recipient":" a","content":"x"}"#), "recipient");
        assert_eq!(
            field_of(r#"{"recipient":"a\n","content":"x"}"#),
            "recipient"
        );
        assert_eq!(field_of(r#"{"recipient":"a"}"#), "content");
        assert_eq!(field_of(r#"{"recipient":"a","content":"  "}"#), "content");
        assert_eq!(field_of(r#"{"recipient":"a","content":null}"#), "content");
        assert_eq!(
            field_of(r#"{"recipient":"a","content":"x","extra":1}"#),
            "extra"
        );
        assert_eq!(
            field_of(r#"{"recipient":"a","content":"x\u0000"}"#),
            "content"
        );
    }

    /// Issue #10, defect 10: the fuzz test once sent these eight bytes as a recipient, meaning
    /// them to be invalid UTF-8, and failed on the 201. They are valid UTF-8 — four letters, no
    /// control character, no surrounding space — and the recipient's format is otherwise the
    /// receiver's business (see the OpenAPI document), so the API is right to accept them.
    #[test]
    fn any_non_control_recipient_is_accepted() {
        let recipient = std::str::from_utf8(&[0xde, 0xb2, 0xc6, 0x96, 0xc6, 0xb3, 0xda, 0x93])
            .expect("valid UTF-8");
        assert_eq!(recipient, "\u{7b2}ƖƳړ");
        let body = serde_json::json!({ "recipient": recipient, "content": "x" }).to_string();
        let m = parse_new_message(body.as_bytes(), 160).unwrap();
        assert_eq!((m.recipient.as_str(), m.content.as_str()), (recipient, "x"));
    }

    #[test]
    fn content_length_counts_characters_not_bytes() {
        let emoji = "😀".repeat(160);
        let body = format!(r#"{{"recipient":"a","content":"{emoji}"}}"#);
        assert!(parse_new_message(body.as_bytes(), 160).is_ok());
        let body = format!(r#"{{"recipient":"a","content":"{emoji}x"}}"#);
        assert_eq!(field_of(&body), "content");
    }

    #[test]
    fn sent_query_errors_name_the_parameter() {
        assert_eq!(parse_sent_query(""), Ok((50, None)));
        assert_eq!(parse_sent_query("limit=1000&before=7"), Ok((1000, Some(7))));
        for (query, name) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=x", "limit"),
            ("limit=", "limit"),
            ("before=0", "before"),
            ("before=-3", "before"),
            ("before=99999999999999999999", "before"),
            ("colour=red", "colour"),
        ] {
            let err = parse_sent_query(query).unwrap_err();
            assert!(err.starts_with(&format!("{name}: ")), "{query}: {err}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn served_openapi_carries_the_configured_content_limit() {
        let doc: serde_json::Value = serde_json::from_slice(&openapi_document(42)).unwrap();
        assert_eq!(
            doc["components"]["schemas"]["NewMessage"]["properties"]["content"]["maxLength"],
            42
        );
    }

    #[test]
    fn routes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        assert!(ROUTES.iter().all(|r| seen.insert((r.method, r.path))));
    }
}
