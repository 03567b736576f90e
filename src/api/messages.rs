//! Enqueueing and the operations on messages (issue #12): `POST /messages` (idempotent with an
//! `Idempotency-Key`, scheduled with `send_at`), `GET /messages/{id}` with the attempt history,
//! `GET /messages?status=…`, `POST /messages/{id}/retry`, `POST /messages/retry` and
//! `POST /messages/{id}/cancel`.
//!
//! As everywhere in the API, a connection thread validates ([`Front::messages_job`]) and a
//! database thread runs the finished job ([`answer`]).

use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};
use tiny_http::Request;

use super::{bad, parse_new_message, parse_page_query, read_body, Endpoint, Front, Reply};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::{Change, Enqueued, NewMessage, Store};

/// Longest Idempotency-Key accepted (as Stripe and the IETF draft's examples use).
pub const IDEMPOTENCY_KEY_MAX: usize = 255;
/// `POST /messages/retry` requeues at most this many messages per call (default 1000).
pub const BULK_RETRY_MAX: u32 = 10_000;
const BULK_RETRY_DEFAULT: u32 = 1000;
/// The statuses a message can have.
pub const STATUSES: &[&str] = &[
    "pending",
    "sending",
    "sent",
    "failed",
    "expired",
    "cancelled",
];
/// The statuses `POST /messages/retry` takes (a cancellation is undone one message at a time).
pub const BULK_RETRYABLE: &[&str] = &["failed", "expired"];
/// How often `/metrics` counts the ended rows for `queue_depth`.
const ENDED_COUNT_PERIOD: Duration = Duration::from_secs(60);

/// Validated work for a database thread.
pub(super) enum Job {
    Enqueue {
        message: NewMessage,
        key: Option<String>,
    },
    Get(i64),
    List {
        status: Option<String>,
        limit: u32,
        before: Option<i64>,
    },
    /// `ttl`: MESSAGE_TTL, the expiry from now that a retried `expired` message gets when the
    /// request gives none.
    Retry {
        id: i64,
        expires_at: Option<SystemTime>,
        ttl: Option<Duration>,
    },
    RetryMany(BulkRetry, Option<Duration>),
    Cancel(i64),
}

/// A valid `POST /messages/retry` body.
#[derive(Debug, PartialEq, Eq)]
pub struct BulkRetry {
    pub status: String,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub limit: u32,
}

impl Front {
    /// Reads and validates a request to one of this module's routes (the token is checked).
    pub(super) fn messages_job(
        &self,
        endpoint: Endpoint,
        request: &mut Request,
        query: &str,
        params: &[&str],
    ) -> Result<Job, Reply> {
        let id = || parse_id(params.first().copied().unwrap_or_default()).map_err(|m| bad(&m));
        Ok(match endpoint {
            Endpoint::Enqueue => {
                let key = idempotency_key(request)?;
                let body = read_body(request)?;
                let message =
                    parse_new_message(&body, self.content_max_length).map_err(|m| bad(&m))?;
                Job::Enqueue { message, key }
            }
            Endpoint::Message => Job::Get(id()?),
            Endpoint::Messages => {
                let (status, limit, before) = parse_list_query(query).map_err(|m| bad(&m))?;
                Job::List {
                    status,
                    limit,
                    before,
                }
            }
            Endpoint::Retry => {
                let id = id()?;
                let body = read_body(request)?;
                let expires_at = parse_retry_body(&body).map_err(|m| bad(&m))?;
                Job::Retry {
                    id,
                    expires_at,
                    ttl: self.message_ttl,
                }
            }
            Endpoint::RetryMany => {
                let body = read_body(request)?;
                let bulk = parse_bulk_retry(&body).map_err(|m| bad(&m))?;
                Job::RetryMany(bulk, self.message_ttl)
            }
            Endpoint::Cancel => Job::Cancel(id()?),
            other => unreachable!("{other:?} is not a messages route"),
        })
    }
}

/// Runs a job on a database thread.
pub(super) fn answer(store: &mut Store, job: Job) -> Result<Reply, Error> {
    Ok(match job {
        Job::Enqueue { message, key } => {
            let fingerprint = message.fingerprint();
            let key = key.as_deref().map(|k| (k, &fingerprint[..]));
            match store.enqueue(&message, key)? {
                Enqueued::Created(id) => Reply::json(201, &json!({ "id": id })),
                Enqueued::Repeated(id) => Reply::json(200, &json!({ "id": id })),
                Enqueued::KeyConflict(id) => Reply::error(
                    409,
                    &format!("Idempotency-Key: already used for message {id} with another request"),
                ),
            }
        }
        Job::Get(id) => match store.message(id)? {
            Some(message) => Reply::json(200, &json!(message)),
            None => not_found(id),
        },
        Job::List {
            status,
            limit,
            before,
        } => {
            let (messages, next) = store.message_page(status.as_deref(), limit, before)?;
            Reply::json(200, &json!({ "messages": messages, "next": next }))
        }
        Job::Retry {
            id,
            expires_at,
            ttl,
        } => match store.retry(id, expires_at, ttl)? {
            Change::Done => {
                log::info!(id = id; "Message requeued by hand");
                Reply::json(200, &json!({ "id": id, "status": "pending" }))
            }
            Change::NotFound => not_found(id),
            Change::Refused(status) => Reply::error(
                409,
                &format!(
                    "message {id} is {status}: only failed, expired or cancelled messages can be retried"
                ),
            ),
        },
        Job::RetryMany(bulk, ttl) => {
            let n = store.retry_many(
                &bulk.status,
                bulk.since,
                bulk.until,
                bulk.limit,
                ttl,
            )?;
            log::info!(status = bulk.status.as_str(), requeued = n; "Messages requeued by hand");
            Reply::json(200, &json!({ "requeued": n }))
        }
        Job::Cancel(id) => match store.cancel(id)? {
            Change::Done => {
                log::info!(id = id; "Message cancelled");
                Reply::json(200, &json!({ "id": id, "status": "cancelled" }))
            }
            Change::NotFound => not_found(id),
            Change::Refused(status) => Reply::error(
                409,
                &format!("message {id} is {status}: only a pending message can be cancelled"),
            ),
        },
    })
}

fn not_found(id: i64) -> Reply {
    Reply::error(404, &format!("message {id} not found"))
}

/// The queue figures of `/metrics` beyond pending and sending: the age of the oldest due
/// message at every scrape, the ended statuses at most every [`ENDED_COUNT_PERIOD`]. A failure
/// leaves the last values.
pub(super) fn refresh_metrics(store: &mut Store, metrics: &Metrics) {
    if let Ok(age) = store.oldest_due_age() {
        metrics.oldest_due_age.set(age.as_secs_f64());
    }
    if metrics.ended_count_due(ENDED_COUNT_PERIOD) {
        if let Ok(counts) = store.ended_counts() {
            for (status, n) in counts {
                metrics.set_depth(status, n);
            }
        }
    }
}

/// The `{id}` of a path: a positive whole number.
pub fn parse_id(segment: &str) -> Result<i64, String> {
    segment
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0 && segment.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| "id: expected a positive message id".into())
}

/// The `Idempotency-Key` header: at most one, 1 to 255 characters, no control characters.
fn idempotency_key(request: &Request) -> Result<Option<String>, Reply> {
    let mut keys = request
        .headers()
        .iter()
        .filter(|h| h.field.equiv("Idempotency-Key"))
        .map(|h| h.value.as_str());
    let Some(key) = keys.next() else {
        return Ok(None);
    };
    if keys.next().is_some() {
        return Err(bad("Idempotency-Key: given more than once"));
    }
    check_idempotency_key(key).map_err(|m| bad(&m))?;
    Ok(Some(key.to_owned()))
}

/// 1 to 255 visible ASCII characters and spaces, not starting or ending with a space (what an
/// HTTP header value can carry unchanged).
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    let printable = key.bytes().all(|b| (0x20..0x7f).contains(&b));
    if key.is_empty()
        || key.len() > IDEMPOTENCY_KEY_MAX
        || !printable
        || key.starts_with(' ')
        || key.ends_with(' ')
    {
        return Err(format!(
            "Idempotency-Key: expected 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters \
             (spaces only inside)"
        ));
    }
    Ok(())
}

/// Parses `GET /messages`' query: `status` (any of the six; all when absent), `limit`,
/// `before`. The error names the parameter.
pub fn parse_list_query(query: &str) -> Result<(Option<String>, u32, Option<i64>), String> {
    let mut status = None;
    let (limit, before) = parse_page_query(query, |name, value| {
        if name != "status" {
            return Ok(false);
        }
        if !STATUSES.contains(&value) {
            return Err(format!(
                "status: expected one of {}, got {value:?}",
                STATUSES.join(", ")
            ));
        }
        status = Some(value.to_owned());
        Ok(true)
    })?;
    Ok((status, limit, before))
}

/// Parses `POST /messages/{id}/retry`'s optional body: nothing, or `{"expires_at"?: …}`.
pub fn parse_retry_body(body: &[u8]) -> Result<Option<SystemTime>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let fields = object(body, "expires_at")?;
    if let Some(unknown) = fields.keys().find(|k| k.as_str() != "expires_at") {
        return Err(format!("{unknown}: unknown field"));
    }
    optional_time(&fields, "expires_at")
}

/// Parses `POST /messages/retry`'s body: `{"status","since"?,"until"?,"limit"?}`.
pub fn parse_bulk_retry(body: &[u8]) -> Result<BulkRetry, String> {
    let fields = object(body, "status")?;
    if let Some(unknown) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "status" | "since" | "until" | "limit"))
    {
        return Err(format!("{unknown}: unknown field"));
    }
    let status = match fields.get("status") {
        Some(Value::String(s)) if BULK_RETRYABLE.contains(&s.as_str()) => s.clone(),
        None => return Err("status: required".into()),
        Some(_) => return Err(format!("status: expected {}", BULK_RETRYABLE.join(" or "))),
    };
    // `until` before `since` is an empty range: nothing is requeued.
    let since = optional_time(&fields, "since")?;
    let until = optional_time(&fields, "until")?;
    let limit = match fields.get("limit") {
        None => BULK_RETRY_DEFAULT,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u64::from(BULK_RETRY_MAX)).contains(n))
            .ok_or_else(|| format!("limit: expected a whole number from 1 to {BULK_RETRY_MAX}"))?
            as u32,
    };
    Ok(BulkRetry {
        status,
        since,
        until,
        limit,
    })
}

/// A JSON object body; the error says which field it is about.
fn object(body: &[u8], main_field: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(format!("body: expected a JSON object with {main_field}")),
        Err(e) => Err(format!("body: not valid JSON ({e})")),
    }
}

fn optional_time(fields: &Map<String, Value>, name: &str) -> Result<Option<SystemTime>, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(at)) => parse_time(name, at).map(Some),
        Some(_) => Err(format!("{name}: expected an RFC 3339 date-time string")),
    }
}

/// An RFC 3339 date-time (`2026-11-25T14:22:15Z`, `2026-11-25T17:22:15.5+03:00`); digits
/// beyond nanoseconds are ignored (PostgreSQL keeps microseconds). The error names `field`.
pub fn parse_time(field: &str, text: &str) -> Result<SystemTime, String> {
    crate::timestamp::parse_rfc3339(text).map_err(|e| format!("{field}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn secs(text: &str) -> i64 {
        let t = parse_time("t", text).unwrap();
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(secs("1970-01-01T00:00:00Z"), 0);
        assert_eq!(secs("2026-11-25T14:22:15Z"), 1_795_616_535);
        assert_eq!(secs("2026-11-25T17:22:15+03:00"), 1_795_616_535);
        assert_eq!(secs("2026-11-25t11:52:15-02:30"), 1_795_616_535);
        assert_eq!(secs("2024-02-29 00:00:00z"), 1_709_164_800);
        assert_eq!(secs("1969-12-31T23:59:59Z"), -1);
        assert_eq!(secs("0001-01-01T00:00:00Z"), -62_135_596_800);
        assert_eq!(secs("0000-03-01T00:00:00Z"), -62_162_035_200);
        assert_eq!(secs("9999-12-31T23:59:59-01:00"), 253_402_304_399);
        let t = parse_time("t", "2026-11-25T14:22:15.123456789Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().subsec_nanos(),
            123_456_789
        );
        let t = parse_time("t", "2026-11-25T14:22:15.5Z").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().subsec_millis(), 500);
        for bad in [
            "",
            "2026-11-25",
            "2026-11-25T14:22Z",
            "2026-11-25T14:22:15",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-31T00:00:00Z",
            "2026-11-25T24:00:00Z",
            "2026-11-25T14:60:00Z",
            "2026-11-25T14:22:15.Z",
            "2026-11-25T14:22:15+0300",
            "2026-11-25T14:22:15+24:00",
            "2026-11-25T14:22:15Zjunk",
            "+2026-11-25T14:22:15Z",
            "now",
            "infinity",
            "٢٠٢٦-11-25T14:22:15Z",
        ] {
            let err = parse_time("send_at", bad).unwrap_err();
            assert!(err.starts_with("send_at: "), "{bad}: {err}");
        }
    }

    #[test]
    fn ids_are_positive_decimal_numbers() {
        assert_eq!(parse_id("42"), Ok(42));
        for bad in [
            "0",
            "-1",
            "+1",
            "1.0",
            "abc",
            "",
            "99999999999999999999",
            "{id}",
            "%31",
        ] {
            assert!(parse_id(bad).unwrap_err().starts_with("id: "), "{bad}");
        }
    }

    #[test]
    fn list_query() {
        assert_eq!(parse_list_query(""), Ok((None, 50, None)));
        assert_eq!(
            parse_list_query("status=failed&limit=5&before=9"),
            Ok((Some("failed".into()), 5, Some(9)))
        );
        for (query, name) in [
            ("status=done", "status"),
            ("status=", "status"),
            ("status=FAILED", "status"),
            ("limit=0", "limit"),
            ("colour=red", "colour"),
        ] {
            let err = parse_list_query(query).unwrap_err();
            assert!(err.starts_with(&format!("{name}: ")), "{query}: {err}");
        }
    }

    #[test]
    fn retry_bodies() {
        assert_eq!(parse_retry_body(b""), Ok(None));
        assert_eq!(parse_retry_body(b" \r\n"), Ok(None));
        assert_eq!(parse_retry_body(b"{}"), Ok(None));
        assert_eq!(parse_retry_body(br#"{"expires_at":null}"#), Ok(None));
        assert!(
            parse_retry_body(br#"{"expires_at":"2030-01-01T00:00:00Z"}"#)
                .unwrap()
                .is_some()
        );
        for (body, name) in [
            (&b"x"[..], "body"),
            (b"[]", "body"),
            (br#"{"expires_at":5}"#, "expires_at"),
            (br#"{"expires_at":"soon"}"#, "expires_at"),
            (br#"{"send_at":"2030-01-01T00:00:00Z"}"#, "send_at"),
        ] {
            let err = parse_retry_body(body).unwrap_err();
            assert!(err.starts_with(&format!("{name}: ")), "{err}");
        }
    }

    #[test]
    fn bulk_retry_bodies() {
        let b = parse_bulk_retry(br#"{"status":"failed"}"#).unwrap();
        assert_eq!(
            (b.status.as_str(), b.limit, b.since, b.until),
            ("failed", 1000, None, None)
        );
        let b = parse_bulk_retry(
            br#"{"status":"expired","since":"2026-01-01T00:00:00Z","until":"2026-01-02T00:00:00Z","limit":5}"#,
        )
        .unwrap();
        assert_eq!(
            (b.limit, b.since.is_some(), b.until.is_some()),
            (5, true, true)
        );
        for (body, name) in [
            (&b"{}"[..], "status"),
            (b"", "body"),
            (br#"{"status":"sent"}"#, "status"),
            (br#"{"status":"cancelled"}"#, "status"),
            (br#"{"status":"failed","limit":0}"#, "limit"),
            (br#"{"status":"failed","limit":10001}"#, "limit"),
            (br#"{"status":"failed","limit":1.5}"#, "limit"),
            (br#"{"status":"failed","limit":null}"#, "limit"),
            (br#"{"status":"failed","since":"x"}"#, "since"),
            (br#"{"status":"failed","extra":1}"#, "extra"),
        ] {
            let err = parse_bulk_retry(body).unwrap_err();
            assert!(err.starts_with(&format!("{name}: ")), "{body:?}: {err}");
        }
    }

    #[test]
    fn idempotency_keys() {
        assert!(check_idempotency_key("a").is_ok());
        assert!(check_idempotency_key(&"k".repeat(255)).is_ok());
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key(&"k".repeat(256)).is_err());
        assert!(check_idempotency_key("a b").is_ok());
        assert!(check_idempotency_key("a\tb").is_err());
        assert!(check_idempotency_key(" a").is_err());
        assert!(check_idempotency_key("é").is_err());
    }

    #[test]
    fn fingerprints_follow_meaning_not_bytes() {
        let parse = |b: &str| parse_new_message(b.as_bytes(), 160).unwrap().fingerprint();
        let a = parse(r#"{"recipient":"a","content":"b","send_at":"2030-01-01T03:00:00+03:00"}"#);
        assert_eq!(
            a,
            parse(r#"{ "send_at":"2030-01-01T00:00:00Z", "content":"b", "recipient":"a" }"#)
        );
        assert_ne!(a, parse(r#"{"recipient":"a","content":"b"}"#));
        assert_ne!(
            parse(r#"{"recipient":"ab","content":"c"}"#),
            parse(r#"{"recipient":"a","content":"bc"}"#)
        );
    }
}
