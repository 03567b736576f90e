//! The HTTP side: `/health` for probes, the small operations API, `/metrics` and
//! `/openapi.json`, served by `tiny_http` on a few handler threads (no async runtime).
//!
//! Each handler thread owns its own PostgreSQL and Redis connections, so a slow query on one
//! never holds a lock another needs, and `/health` checks the dependencies for real.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::status::Status;
use crate::store::Store;

/// Handler threads: enough that one slow request does not hold up `/health`.
const HANDLERS: usize = 4;
/// Largest request body accepted.
pub const MAX_BODY: u64 = 64 * 1024;
const SENT_PAGE_DEFAULT: u32 = 50;
const SENT_PAGE_MAX: u32 = 1000;
/// Longest recipient accepted: E.164 numbers, e-mail addresses and chat handles all fit.
const RECIPIENT_MAX: usize = 254;

/// The OpenAPI document of this API, kept beside the code that it describes.
pub const OPENAPI: &str = include_str!("openapi.json");

pub struct Api {
    server: Arc<Server>,
    handles: Vec<JoinHandle<()>>,
}

impl Api {
    /// Binds the port and starts the handler threads.
    pub fn start(
        config: &Config,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Result<Api, Error> {
        let addr = config.listen_addr();
        let server = Server::http(&addr)
            .map_err(|e| Error::Other(format!("cannot listen on {addr}: {e}")))?;
        let server = Arc::new(server);
        let mut handles = Vec::with_capacity(HANDLERS);
        for n in 0..HANDLERS {
            let mut handler = Handler::new(config, status.clone(), metrics.clone())?;
            let server = server.clone();
            let handle = std::thread::Builder::new()
                .name(format!("http-{n}"))
                .spawn(move || {
                    while let Ok(request) = server.recv() {
                        handler.handle(request);
                    }
                })?;
            handles.push(handle);
        }
        log::info!(addr = addr.as_str(); "HTTP API listening");
        Ok(Api { server, handles })
    }

    pub fn stop(self) {
        for _ in &self.handles {
            self.server.unblock();
        }
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}

struct Handler {
    store: Store,
    redis: Option<RedisCheck>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    api_token: Option<String>,
    content_max_length: usize,
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

type Reply = Response<std::io::Cursor<Vec<u8>>>;

impl Handler {
    fn new(config: &Config, status: Arc<Status>, metrics: Arc<Metrics>) -> Result<Handler, Error> {
        let redis = if config.lock_enabled {
            Some(RedisCheck {
                redis: crate::connect::Redis::new(&config.redis)?,
                conn: None,
            })
        } else {
            None
        };
        Ok(Handler {
            store: Store::new(config.postgres()?, &status.instance_id),
            redis,
            status,
            metrics,
            api_token: config.api_token.clone(),
            content_max_length: config.content_max_length,
        })
    }

    fn handle(&mut self, mut request: Request) {
        let reply = self.route(&mut request);
        let _ = request.respond(reply);
    }

    fn route(&mut self, request: &mut Request) -> Reply {
        self.try_route(request).unwrap_or_else(|reply| reply)
    }

    fn try_route(&mut self, request: &mut Request) -> Result<Reply, Reply> {
        let url = request.url().to_owned();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        let method = request.method().clone();
        let get = matches!(method, Method::Get | Method::Head);
        let post = method == Method::Post;
        match path {
            "/health" if get => self.health(),
            "/metrics" if get => self.metrics(),
            "/openapi.json" if get => Ok(respond(
                200,
                OPENAPI.as_bytes().to_vec(),
                "application/json",
            )),
            "/messages/sent" if get => self.sent(query),
            "/processing/start" | "/processing/stop" if post => {
                self.authorized(request)?;
                self.switch(path == "/processing/start")
            }
            "/messages" if post => {
                self.authorized(request)?;
                let body = read_body(request)?;
                self.enqueue(&body)
            }
            "/health" | "/metrics" | "/openapi.json" | "/messages/sent" => {
                Err(method_not_allowed("GET, HEAD"))
            }
            "/processing/start" | "/processing/stop" | "/messages" => {
                Err(method_not_allowed("POST"))
            }
            _ => Err(error(404, "not found")),
        }
    }

    fn authorized(&self, request: &Request) -> Result<(), Reply> {
        let Some(token) = &self.api_token else {
            return Ok(());
        };
        let given = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(error(401, "missing or wrong bearer token"))
        }
    }

    fn health(&mut self) -> Result<Reply, Reply> {
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
                "held": self.status.lock_held.load(Ordering::Relaxed),
            },
            "dependencies": {
                "database": word(database_ok),
                "redis": redis.map_or("disabled", word),
            },
        });
        Ok(json_reply(if healthy { 200 } else { 503 }, &body))
    }

    fn metrics(&mut self) -> Result<Reply, Reply> {
        if let Ok((pending, sending)) = self.store.queue_depth() {
            self.metrics.set_queue_depth(pending, sending);
        }
        Ok(respond(
            200,
            self.metrics.render().into_bytes(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ))
    }

    fn switch(&mut self, enabled: bool) -> Result<Reply, Reply> {
        let enabled = self.store.set_processing(enabled).map_err(unavailable)?;
        self.status
            .processing_enabled
            .store(enabled, Ordering::Relaxed);
        log::info!(processing_status = if enabled { "running" } else { "stopped" }; "Processing switched");
        Ok(json_reply(
            200,
            &json!({ "processing_status": if enabled { "running" } else { "stopped" } }),
        ))
    }

    fn sent(&mut self, query: &str) -> Result<Reply, Reply> {
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
                            bad(&format!(
                                "limit: expected a whole number from 1 to {SENT_PAGE_MAX}"
                            ))
                        })?;
                }
                "before" => {
                    before = Some(
                        value
                            .parse::<i64>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| bad("before: expected a positive message id"))?,
                    );
                }
                other => return Err(bad(&format!("{other}: unknown query parameter"))),
            }
        }
        let (messages, next) = self.store.sent_page(limit, before).map_err(unavailable)?;
        Ok(json_reply(
            200,
            &json!({ "messages": messages, "next": next }),
        ))
    }

    fn enqueue(&mut self, body: &[u8]) -> Result<Reply, Reply> {
        let (recipient, content) =
            parse_new_message(body, self.content_max_length).map_err(|msg| bad(&msg))?;
        let id = self
            .store
            .insert_message(&recipient, &content)
            .map_err(unavailable)?;
        Ok(json_reply(201, &json!({ "id": id })))
    }
}

/// Validates a `POST /messages` body; the error names the field.
pub fn parse_new_message(body: &[u8], content_max: usize) -> Result<(String, String), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body: not valid JSON ({e})"))?;
    let Value::Object(fields) = value else {
        return Err("body: expected a JSON object with recipient and content".into());
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "recipient" | "content"))
    {
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
    Ok((recipient, content))
}

/// Reads the body up to [`MAX_BODY`]; a larger one is refused without reading the rest.
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
    error(413, &format!("body: larger than {MAX_BODY} bytes"))
}

fn bad(msg: &str) -> Reply {
    error(400, msg)
}

fn unavailable(e: Error) -> Reply {
    log::warn!(error = e.to_string().as_str(); "API request failed");
    error(503, "database unavailable")
}

fn method_not_allowed(allow: &str) -> Reply {
    error(405, "method not allowed").with_header(header("Allow", allow))
}

fn error(status: u16, msg: &str) -> Reply {
    json_reply(status, &json!({ "error": msg }))
}

fn json_reply(status: u16, body: &Value) -> Reply {
    respond(status, body.to_string().into_bytes(), "application/json")
}

fn respond(status: u16, body: Vec<u8>, content_type: &str) -> Reply {
    Response::from_data(body)
        .with_status_code(status)
        .with_header(header("Content-Type", content_type))
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

#[cfg(test)]
mod tests {
    use super::parse_new_message;

    fn field_of(body: &str) -> String {
        let err = parse_new_message(body.as_bytes(), 160).unwrap_err();
        err.split(':').next().unwrap().to_owned()
    }

    #[test]
    fn valid_message() {
        let (r, c) =
            parse_new_message(br#"{"recipient":"+905551111111","content":"hello"}"#, 160).unwrap();
        assert_eq!((r.as_str(), c.as_str()), ("+905551111111", "hello"));
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
    }

    #[test]
    fn content_length_counts_characters_not_bytes() {
        let emoji = "😀".repeat(160);
        let body = format!(r#"{{"recipient":"a","content":"{emoji}"}}"#);
        assert!(parse_new_message(body.as_bytes(), 160).is_ok());
        let body = format!(r#"{{"recipient":"a","content":"{emoji}x"}}"#);
        assert_eq!(field_of(&body), "content");
    }
}
