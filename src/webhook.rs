//! The webhook request and what its answer means.
//!
//! One `ureq` agent is shared by all workers, so connections to the receiver are kept alive and
//! reused. The request is the SPEC's: `POST {"to","content"}` with `Idempotency-Key` and
//! `webhook-id` stable across attempts, signed as Standard Webhooks 1.0 when a secret is set.

use std::path::Path;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use ureq::http::header::CONTENT_TYPE;
use ureq::http::{HeaderName, HeaderValue, Uri};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    ConnectProxyConnector, Connector, NextTimeout, RustlsConnector,
};
use ureq::{Agent, ProxyProtocol};
use url::Url;

use crate::backoff;
use crate::circuit::Health;
use crate::config::Config;
use crate::error::Error;
use crate::message::{Claimed, Delivery};
use crate::transport::PolledTcpConnector;

/// How much of a response body we read: enough for `{"messageId": …}` or an error text.
const MAX_RESPONSE_BODY: u64 = 64 * 1024;
/// How much of an error answer is kept in `last_error`.
const MAX_ERROR_TEXT: usize = 200;
/// ureq gives each connection an input and an output buffer, zero-filled to full size on first
/// use: 128 KiB each by default, a quarter of a megabyte resident per pooled connection, i.e.
/// per worker (331 MB at WORKER_COUNT=1024). What we send is a small JSON body and a few headers
/// (a longer body goes out in several writes); what we read is a status line and headers (at
/// most [`MAX_RESPONSE_HEADER`]), then a body read in pieces. ureq itself wants 10 KiB of the
/// input buffer free as scratch space while it sends.
const INPUT_BUFFER: usize = 12 * 1024;
const OUTPUT_BUFFER: usize = 4 * 1024;
/// Larger response headers fail the request with a clear error ("response header too large");
/// kept under [`INPUT_BUFFER`], which must hold them whole. Real APIs answer with 1–2 KiB.
const MAX_RESPONSE_HEADER: usize = 11 * 1024;
/// How long a resolved webhook address is reused before the host name is looked up again.
const RESOLVE_TTL: Duration = Duration::from_secs(5);

/// The request's header names and fixed value, made once (a name that HTTP does not define, or
/// a value given as text, would otherwise be copied into a new allocation on every request).
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// One request's result: what it means for the message, what it says about the receiver, and
/// the answer's status code (None when no answer came).
pub struct Attempted {
    pub delivery: Delivery,
    pub health: Health,
    pub status: Option<u16>,
}

/// The CAs an https webhook's certificate must chain to: those of SSL_CERT_FILE when set (a
/// private CA), else the Mozilla roots built into the binary.
fn roots(config: &Config) -> Result<RootCerts, Error> {
    Ok(match &config.webhook_ca_file {
        Some(path) => RootCerts::from(load_roots(path)?),
        None => RootCerts::WebPki,
    })
}

/// The certificates of a PEM bundle; an error names SSL_CERT_FILE when the file cannot be read
/// or holds none.
pub fn load_roots(path: &Path) -> Result<Vec<Certificate<'static>>, Error> {
    let what = |e: String| Error::Config(format!("SSL_CERT_FILE: {}: {e}", path.display()));
    let pem = std::fs::read(path).map_err(|e| what(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let PemItem::Certificate(cert) = item.map_err(|e| what(e.to_string()))? {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err(what("no PEM certificate in it".into()));
    }
    Ok(certs)
}

pub struct Webhook {
    agent: Agent,
    url: Url,
    /// `url` parsed once for ureq (cloning it is cheap); None if ureq cannot parse it, and then
    /// every request fails as before with ureq's error.
    uri: Option<Uri>,
    secret: Option<Vec<u8>>,
    max_attempts: u32,
    retry_base: Duration,
    retry_max: Duration,
}

impl Webhook {
    /// Fails (naming SSL_CERT_FILE) when the CA file cannot be read or holds no certificate.
    pub fn new(config: &Config, url: &Url) -> Result<Webhook, Error> {
        let agent_config = Agent::config_builder()
            .timeout_global(Some(config.webhook_timeout))
            .http_status_as_error(false)
            // A redirect is retried later, not followed: the receiver must be configured right.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .input_buffer_size(INPUT_BUFFER)
            .output_buffer_size(OUTPUT_BUFFER)
            .max_response_header_size(MAX_RESPONSE_HEADER)
            .max_idle_connections(config.worker_count as usize * 2)
            .max_idle_connections_per_host(config.worker_count as usize * 2)
            .user_agent(concat!("message-dispatcher/", env!("CARGO_PKG_VERSION")))
            .tls_config(TlsConfig::builder().root_certs(roots(config)?).build())
            .build();
        // ureq's default connector chains TLS in for every scheme, and its connect path then
        // takes 12 KiB of each worker's stack (resident for good once touched: 8 MB at
        // WORKER_COUNT=1024); an http webhook reached directly or through an http proxy
        // (HTTP_PROXY and the like, which ureq reads) never needs it.
        let needs_tls = url.scheme() == "https"
            || agent_config
                .proxy()
                .is_some_and(|p| p.protocol() == ProxyProtocol::Https);
        let plain = ().chain(ConnectProxyConnector::default()).chain(PolledTcpConnector);
        let agent = if needs_tls {
            let tls = plain.chain(RustlsConnector::default());
            Agent::with_parts(agent_config, tls, CachingResolver::default())
        } else {
            Agent::with_parts(agent_config, plain, CachingResolver::default())
        };
        Ok(Webhook {
            agent,
            url: url.clone(),
            uri: url.as_str().parse().ok(),
            secret: config.webhook_secret.clone(),
            max_attempts: config.max_attempts,
            retry_base: config.retry_base_delay,
            retry_max: config.retry_max_delay,
        })
    }

    /// Makes one request for `message`; `probe` when it tests an open circuit (its failure
    /// does not count toward MAX_ATTEMPTS).
    pub fn deliver(&self, message: &Claimed, probe: bool) -> Attempted {
        let body = serde_json::to_vec(&Body {
            to: &message.recipient,
            content: &message.content,
        })
        .expect("strings always serialise");
        let webhook_id = format!("msg_{}", message.id);
        let request = match &self.uri {
            Some(uri) => self.agent.post(uri.clone()),
            None => self.agent.post(self.url.as_str()),
        };
        let mut request = request.header(CONTENT_TYPE, JSON);
        if let Some(key) = &self.secret {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            request = request
                .header(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp))
                .header(WEBHOOK_SIGNATURE, sign(key, &webhook_id, timestamp, &body));
        }
        // The names are constants and the values move in: no copy of either per request.
        let request = request
            .header(IDEMPOTENCY_KEY, HeaderValue::from(message.id))
            .header(WEBHOOK_ID, webhook_id);
        let (status, answer) = match request.send(&body[..]) {
            Ok(response) => {
                let status = response.status().as_u16();
                (Some(status), read_answer(response))
            }
            Err(e) => (
                None,
                Answer::Transient {
                    error: format!("request failed: {e}"),
                },
            ),
        };
        Attempted {
            health: answer.health(),
            delivery: self.decide(message, answer, probe),
            status,
        }
    }

    /// Turns an answer into a delivery, giving up once MAX_ATTEMPTS requests that count were
    /// made.
    fn decide(&self, message: &Claimed, answer: Answer, probe: bool) -> Delivery {
        match answer {
            Answer::Delivered { remote_id } => Delivery::Sent { remote_id },
            Answer::Permanent { error } => Delivery::Failed { error },
            // "Slow down" says nothing about the message: it goes back for when the receiver
            // asked, and never ends `failed` for it.
            Answer::SlowDown { error, retry_after } => Delivery::Retry {
                error,
                delay: retry_after
                    .unwrap_or(crate::circuit::SLOW_DOWN_DEFAULT)
                    .min(self.retry_max),
                charged: false,
            },
            Answer::Transient { error } => {
                let charged = message.charged.max(1) as u32;
                if probe {
                    // The receiver is still down: the message waits like any other.
                    let delay = backoff::delay(self.retry_base, self.retry_max, charged);
                    return Delivery::Retry {
                        error,
                        delay,
                        charged: false,
                    };
                }
                if charged >= self.max_attempts {
                    return Delivery::Failed {
                        error: format!("{error} (gave up after {charged} attempts)"),
                    };
                }
                let delay = backoff::delay(self.retry_base, self.retry_max, charged);
                Delivery::Retry {
                    error,
                    delay,
                    charged: true,
                }
            }
        }
    }
}

/// ureq looks the host up before every request, even one that reuses a pooled connection, and
/// with a timeout configured it does so on a thread spawned for the purpose: a thread (and, for
/// a host name, a DNS query) per message. This keeps the answer for [`RESOLVE_TTL`] instead. New
/// connections still go to the current address within seconds of a DNS change; failures are
/// not kept.
#[derive(Debug, Default)]
struct CachingResolver {
    inner: DefaultResolver,
    /// (scheme, authority, when resolved, addresses) of the last lookup.
    last: RwLock<Option<(String, String, Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let scheme = uri.scheme_str().unwrap_or_default();
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        if let Some((s, a, at, addrs)) = &*self.last.read().unwrap_or_else(|e| e.into_inner()) {
            if s == scheme && a == authority && at.elapsed() < RESOLVE_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        *self.last.write().unwrap_or_else(|e| e.into_inner()) = Some((
            scheme.to_owned(),
            authority.to_owned(),
            Instant::now(),
            addrs.clone(),
        ));
        Ok(addrs)
    }
}

/// The receiver's answer, before the attempt count is taken into account.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Delivered {
        remote_id: Option<String>,
    },
    /// Connection error, timeout, 408, 5xx, a redirect: try again later.
    Transient {
        error: String,
    },
    /// 429, or 503 with `Retry-After`: the receiver works but wants fewer requests.
    SlowDown {
        error: String,
        retry_after: Option<Duration>,
    },
    Permanent {
        error: String,
    },
}

impl Answer {
    fn health(&self) -> Health {
        match self {
            Answer::Delivered { .. } | Answer::Permanent { .. } => Health::Working,
            Answer::Transient { .. } => Health::Trouble,
            Answer::SlowDown { retry_after, .. } => Health::SlowDown(*retry_after),
        }
    }
}

fn read_answer(mut response: ureq::http::Response<ureq::Body>) -> Answer {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    // Reading the body to its end lets the connection go back to the pool.
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BODY)
        .read_to_vec()
        .unwrap_or_default();
    classify(status, &body, retry_after)
}

fn classify(status: u16, body: &[u8], retry_after: Option<Duration>) -> Answer {
    match status {
        200..=299 => Answer::Delivered {
            remote_id: remote_message_id(body),
        },
        429 => Answer::SlowDown {
            error: error_text(status, body),
            retry_after,
        },
        503 if retry_after.is_some() => Answer::SlowDown {
            error: error_text(status, body),
            retry_after,
        },
        408 | 500..=599 | 300..=399 => Answer::Transient {
            error: error_text(status, body),
        },
        _ => Answer::Permanent {
            error: error_text(status, body),
        },
    }
}

/// The request body, `{"to": …, "content": …}`, serialised without building a JSON tree.
#[derive(serde::Serialize)]
struct Body<'a> {
    to: &'a str,
    content: &'a str,
}

/// `messageId` from a JSON reply, when there is one.
fn remote_message_id(body: &[u8]) -> Option<String> {
    let reply: Reply = serde_json::from_slice(body).ok()?;
    match reply.0? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A JSON object reply, of which only `messageId` is kept: the rest is skipped, not built into
/// a tree (this runs once per message). The last `messageId` wins, as in a parsed object.
struct Reply(Option<serde_json::Value>);

impl<'de> serde::Deserialize<'de> for Reply {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Reply, D::Error> {
        #[derive(serde::Deserialize)]
        enum Key {
            #[serde(rename = "messageId")]
            MessageId,
            #[serde(other)]
            Other,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Reply;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Reply, A::Error> {
                let mut id = None;
                while let Some(key) = map.next_key()? {
                    match key {
                        Key::MessageId => id = Some(map.next_value()?),
                        Key::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(Reply(id))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

fn error_text(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return format!("HTTP {status}");
    }
    let mut snippet: String = text.chars().take(MAX_ERROR_TEXT).collect();
    if snippet.len() < text.len() {
        snippet.push('…');
    }
    format!("HTTP {status}: {snippet}")
}

/// `Retry-After` is either seconds or an HTTP date.
fn parse_retry_after(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(raw).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

/// The Standard Webhooks signature: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
pub fn sign(key: &[u8], webhook_id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_addresses_are_reused_only_for_the_same_host_and_port() {
        let resolver = CachingResolver::default();
        let config = ureq::config::Config::default();
        let port = |uri: &str| {
            let addrs = resolver
                .resolve(&uri.parse().unwrap(), &config, NextTimeout::default())
                .unwrap();
            addrs.iter().next().unwrap().port()
        };
        assert_eq!(port("http://127.0.0.1:9001/a"), 9001);
        assert_eq!(port("http://127.0.0.1:9001/b"), 9001);
        assert_eq!(port("http://127.0.0.1:9002/a"), 9002);
        assert_eq!(port("http://127.0.0.1/a"), 80);
        assert_eq!(port("https://127.0.0.1/a"), 443);
    }

    /// A receiver on a real socket answering one request per connection with `header_bytes` of
    /// extra headers, after reading the whole request; returns the URL and the request bytes.
    fn answering_with_headers(header_bytes: usize) -> (Url, std::thread::JoinHandle<Vec<u8>>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}/hook", listener.local_addr().unwrap())).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 4096];
            // Head, then Content-Length bytes of body.
            let body_len = loop {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the client closed before sending its request");
                request.extend_from_slice(&chunk[..n]);
                if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap();
                    break end + 4 + len;
                }
            };
            while request.len() < body_len {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the client closed before sending its body");
                request.extend_from_slice(&chunk[..n]);
            }
            let body = br#"{"message":"Accepted","messageId":"big-headers"}"#;
            let mut answer = format!(
                "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .into_bytes();
            for n in 0..header_bytes / 100 {
                answer.extend_from_slice(
                    format!("X-Padding-{n:04}: {}\r\n", "p".repeat(83)).as_bytes(),
                );
            }
            answer.extend_from_slice(b"\r\n");
            answer.extend_from_slice(body);
            let _ = stream.write_all(&answer);
            request
        });
        (url, server)
    }

    fn webhook_for(url: &Url) -> Webhook {
        let vars = [("WEBHOOK_URL".to_owned(), url.to_string())].into();
        Webhook::new(&Config::from_vars(&vars).unwrap(), url).unwrap()
    }

    fn message(content: String) -> Claimed {
        Claimed {
            id: 7,
            recipient: "+905550000001".into(),
            content,
            attempts: 1,
            charged: 1,
            expires: None,
        }
    }

    #[test]
    fn the_small_buffers_carry_long_bodies_and_ordinary_large_headers() {
        // A body far larger than the output buffer goes out whole, in several writes; an answer
        // with 10 KiB of headers (large for any real receiver) is read.
        let (url, server) = answering_with_headers(10 * 1024);
        let content = "ü".repeat(40_000);
        let attempted = webhook_for(&url).deliver(&message(content.clone()), false);
        assert_eq!(
            attempted.delivery,
            Delivery::Sent {
                remote_id: Some("big-headers".into())
            }
        );
        let request = server.join().unwrap();
        let body = &request[request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        let sent: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(sent["content"], content.as_str());
    }

    #[test]
    fn response_headers_over_the_limit_fail_the_attempt_with_a_clear_error() {
        let (url, server) = answering_with_headers(40 * 1024);
        let attempted = webhook_for(&url).deliver(&message("hi".into()), false);
        let Delivery::Retry { error, .. } = &attempted.delivery else {
            panic!("expected a retry, got {:?}", attempted.delivery);
        };
        assert!(error.contains("header"), "{error}");
        assert_eq!(attempted.status, None);
        let _ = server.join();
    }

    #[test]
    fn status_classes() {
        assert_eq!(
            classify(202, br#"{"message":"Accepted","messageId":"abc"}"#, None),
            Answer::Delivered {
                remote_id: Some("abc".into())
            }
        );
        assert_eq!(
            classify(200, b"not json", None),
            Answer::Delivered { remote_id: None }
        );
        for status in [408, 500, 502, 503, 504, 301, 302, 307] {
            assert!(
                matches!(classify(status, b"", None), Answer::Transient { .. }),
                "{status}"
            );
        }
        assert!(matches!(
            classify(429, b"", None),
            Answer::SlowDown {
                retry_after: None,
                ..
            }
        ));
        for status in [400, 401, 403, 404, 405, 410, 413, 422] {
            assert!(
                matches!(classify(status, b"", None), Answer::Permanent { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_on_429_and_503_means_slow_down() {
        let asked = Some(Duration::from_secs(7));
        for status in [429, 503] {
            assert_eq!(
                classify(status, b"", asked),
                Answer::SlowDown {
                    error: format!("HTTP {status}"),
                    retry_after: asked
                }
            );
            assert_eq!(
                classify(status, b"", asked).health(),
                Health::SlowDown(asked)
            );
        }
        assert_eq!(
            classify(500, b"", asked),
            Answer::Transient {
                error: "HTTP 500".into(),
            }
        );
        assert_eq!(classify(500, b"", asked).health(), Health::Trouble);
        assert_eq!(classify(404, b"", None).health(), Health::Working);
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let d = parse_retry_after(&future).unwrap();
        assert!(d > Duration::from_secs(3500) && d <= Duration::from_secs(3600));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn numeric_message_ids_are_kept() {
        assert_eq!(
            remote_message_id(br#"{"messageId": 42}"#),
            Some("42".into())
        );
        assert_eq!(
            remote_message_id(br#"{"messageId": 4.5}"#),
            Some("4.5".into())
        );
        assert_eq!(remote_message_id(br#"{"id": 42}"#), None);
    }

    #[test]
    fn message_ids_come_only_from_a_json_object() {
        let id = |body: &str| remote_message_id(body.as_bytes());
        assert_eq!(
            id(r#"{"message":"Accepted","messageId":"a\"b","extra":{"x":[1,2]}}"#),
            Some("a\"b".into())
        );
        assert_eq!(
            id(r#"{"message\u0049d":"escaped key"}"#),
            Some("escaped key".into())
        );
        assert_eq!(
            id(r#"{"messageId":"first","messageId":"last"}"#),
            Some("last".into())
        );
        for none in [
            r#"["abc"]"#,
            r#""abc""#,
            r#"{"messageId":null}"#,
            r#"{"messageId":{"x":1}}"#,
            r#"{"messageId":true}"#,
            r#"{"messageId":"x""#,
            "",
        ] {
            assert_eq!(id(none), None, "{none}");
        }
    }

    #[test]
    fn the_body_is_the_specs_json() {
        let body = serde_json::to_vec(&Body {
            to: "+90555",
            content: "say \"hi\" ✓",
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"to":"+90555","content":"say \"hi\" ✓"}"#
        );
    }

    #[test]
    fn error_text_is_bounded() {
        let long = "x".repeat(1000);
        let text = error_text(500, long.as_bytes());
        assert!(text.starts_with("HTTP 500: xxx") && text.chars().count() < 220);
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
