//! The statements behind the operations API (issue #12) and retention: reading a message with
//! its attempt history, listing by status, manual and bulk retry, cancel, idempotent enqueue,
//! pruning old rows, and the queue figures for `/metrics`.
//!
//! None of them touches a `sending` row or the claim's fence: a retry or a cancel changes only
//! rows no instance holds (`failed`/`expired`/`cancelled`, resp. `pending`), under the row lock
//! the claim's `FOR UPDATE SKIP LOCKED` respects, so each races a claim with exactly one winner.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

use super::{Store, NOTIFY_CHANNEL};
use crate::error::Error;

/// A timestamp column as RFC 3339 in UTC with microseconds (`2026-11-25T14:22:15.123456Z`).
macro_rules! ts {
    ($column:literal) => {
        concat!(
            "to_char(",
            $column,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    };
}

/// The columns of [`Message`], in its field order.
const MESSAGE_COLUMNS: &str = concat!(
    "m.id, m.recipient, m.content, m.status, m.attempts, ",
    ts!("m.created_at"),
    ", ",
    ts!("m.updated_at"),
    ", ",
    ts!("m.send_at"),
    ", ",
    ts!("m.next_attempt_at"),
    ", ",
    ts!("m.expires_at"),
    ", ",
    ts!("m.sent_at"),
    ", m.last_error, m.remote_message_id, m.idempotency_key, m.claimed_by, ",
    ts!("m.claimed_at")
);

/// The attempt history of `m`, oldest first, as a JSON array (text).
const HISTORY: &str = concat!(
    "(SELECT COALESCE(json_agg(json_build_object(",
    "'attempt', a.attempt, 'at', ",
    ts!("a.started_at"),
    ", 'duration_ms', a.duration_ms, 'status_code', a.status_code, 'error', a.error, ",
    "'instance_id', a.instance_id) ORDER BY a.attempt), '[]')::text ",
    "FROM message_attempts a WHERE a.message_id = m.id)"
);

/// The statuses a manual retry starts again from.
pub const RETRYABLE: &[&str] = &["failed", "expired", "cancelled"];

/// What a manual retry sets: `pending`, due now (or at `send_at` if later), a fresh
/// MAX_ATTEMPTS (`attempts_free`), and the expiry: the one given, else for an `expired` message
/// now + MESSAGE_TTL (none without a TTL), else unchanged. `$1` expires_at given, `$2` the TTL in
/// milliseconds.
const REQUEUE_SET: &str = "
    status = 'pending',
    attempts_free = m.attempts,
    next_attempt_at = GREATEST(now(), COALESCE(m.send_at, now())),
    expires_at = CASE WHEN $1::timestamptz IS NOT NULL THEN $1::timestamptz
                      WHEN m.status = 'expired' THEN now() + $2::bigint * interval '1 millisecond'
                      ELSE m.expires_at END,
    updated_at = now()";

/// One message as `GET /messages/{id}` and `GET /messages` show it.
#[derive(Debug, Serialize)]
pub struct Message {
    pub id: i64,
    pub recipient: String,
    pub content: String,
    pub status: String,
    pub attempts: i32,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub send_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub expires_at: Option<String>,
    pub sent_at: Option<String>,
    pub last_error: Option<String>,
    pub remote_message_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub claimed_by: Option<String>,
    pub claimed_at: Option<String>,
    /// Only in `GET /messages/{id}`: the attempt history, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Value>,
}

impl Message {
    fn from_row(r: &postgres::Row) -> Message {
        Message {
            id: r.get(0),
            recipient: r.get(1),
            content: r.get(2),
            status: r.get(3),
            attempts: r.get(4),
            created_at: r.get(5),
            updated_at: r.get(6),
            send_at: r.get(7),
            next_attempt_at: r.get(8),
            expires_at: r.get(9),
            sent_at: r.get(10),
            last_error: r.get(11),
            remote_message_id: r.get(12),
            idempotency_key: r.get(13),
            claimed_by: r.get(14),
            claimed_at: r.get(15),
            history: None,
        }
    }
}

/// A new message as `POST /messages` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub recipient: String,
    pub content: String,
    /// Not sent before this instant.
    pub send_at: Option<SystemTime>,
    /// None (absent or null): MESSAGE_TTL applies, if set. A time already past is accepted,
    /// as an INSERT would be: the message expires at the next claim without being sent.
    pub expires_at: Option<SystemTime>,
}

impl NewMessage {
    /// SHA-256 of the request's meaning (not its bytes: key order, white space and the way a
    /// time is written do not count), stored with an Idempotency-Key to recognise a repeat.
    /// Every field of the request must be in it.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for text in [&self.recipient, &self.content] {
            h.update((text.len() as u64).to_be_bytes());
            h.update(text.as_bytes());
        }
        for time in [self.send_at, self.expires_at] {
            match time {
                None => h.update([0]),
                Some(at) => {
                    let micros = match at.duration_since(SystemTime::UNIX_EPOCH) {
                        Ok(d) => d.as_micros() as i128,
                        Err(e) => -(e.duration().as_micros() as i128),
                    };
                    h.update([1]);
                    h.update(micros.to_be_bytes());
                }
            }
        }
        h.finalize().into()
    }
}

/// What became of an enqueue.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// A new row.
    Created(i64),
    /// The Idempotency-Key was used before with the same request: its message.
    Repeated(i64),
    /// The Idempotency-Key was used before with another request.
    KeyConflict(i64),
}

/// What became of a retry or a cancel of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Done,
    NotFound,
    /// The message is in this status, from which the change is not allowed.
    Refused(String),
}

/// Which ended rows retention deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// `sent`, by `sent_at`.
    Sent,
    /// `failed`, `expired` and `cancelled`, by when they ended (`updated_at`).
    Unsent,
}

impl Ended {
    pub fn statuses(self) -> &'static [&'static str] {
        match self {
            Ended::Sent => &["sent"],
            Ended::Unsent => RETRYABLE,
        }
    }
}

impl Store {
    /// One message with its attempt history, or None.
    pub fn message(&mut self, id: i64) -> Result<Option<Message>, Error> {
        let sql = format!("SELECT {MESSAGE_COLUMNS}, {HISTORY} FROM messages m WHERE m.id = $1");
        let row = self.with(|c| c.client.query_opt(sql.as_str(), &[&id]))?;
        Ok(row.map(|r| {
            let history: String = r.get(16);
            let mut message = Message::from_row(&r);
            message.history =
                Some(serde_json::from_str(&history).expect("PostgreSQL's json_agg is JSON"));
            message
        }))
    }

    /// A page of messages (of one status, or all), newest first, and the `before` value of the
    /// next page.
    pub fn message_page(
        &mut self,
        status: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<(Vec<Message>, Option<i64>), Error> {
        // Two texts rather than `$1 IS NULL OR status = $1`, so that the partial indexes on
        // status match whatever the plan.
        let filter = if status.is_some() {
            "m.status = $3"
        } else {
            "$3::text IS NULL"
        };
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m
             WHERE {filter} AND ($2::bigint IS NULL OR m.id < $2)
             ORDER BY m.id DESC LIMIT $1"
        );
        let rows = self.with(|c| {
            c.client
                .query(sql.as_str(), &[&(i64::from(limit) + 1), &before, &status])
        })?;
        let page = rows.iter().map(Message::from_row).collect();
        Ok(super::keyset_page(page, limit, |m: &Message| m.id))
    }

    /// Enqueues a message; with an idempotency key, at most once per key: the key is stored
    /// (unique) with a hash of the request, and a repeat finds the first row instead.
    pub fn enqueue(
        &mut self,
        message: &NewMessage,
        key: Option<(&str, &[u8])>,
    ) -> Result<Enqueued, Error> {
        let (key, hash) = match key {
            Some((key, hash)) => (Some(key), Some(hash)),
            None => (None, None),
        };
        // A repeat whose first row is deleted in between (retention) inserts afresh; twice in
        // a row cannot happen in practice, a third round is never needed.
        for _ in 0..3 {
            let inserted = self.with(|c| {
                c.client.query_opt(
                    "INSERT INTO messages
                         (recipient, content, send_at, idempotency_key, request_hash, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                     RETURNING id",
                    &[
                        &message.recipient,
                        &message.content,
                        &message.send_at,
                        &key,
                        &hash,
                        &message.expires_at,
                    ],
                )
            })?;
            if let Some(row) = inserted {
                return Ok(Enqueued::Created(row.get(0)));
            }
            // ON CONFLICT waited for the other insert to commit: the row is visible now.
            let first = self.with(|c| {
                c.client.query_opt(
                    "SELECT id, request_hash FROM messages WHERE idempotency_key = $1",
                    &[&key],
                )
            })?;
            if let Some(row) = first {
                let id: i64 = row.get(0);
                let first_hash: Option<Vec<u8>> = row.get(1);
                return Ok(if first_hash.as_deref() == hash {
                    Enqueued::Repeated(id)
                } else {
                    Enqueued::KeyConflict(id)
                });
            }
        }
        Err(Error::Other(
            "idempotent insert: the key's row kept disappearing".into(),
        ))
    }

    /// Puts a `failed`, `expired` or `cancelled` message back to `pending` with a fresh
    /// MAX_ATTEMPTS (its history is kept) and wakes sleeping schedulers.
    pub fn retry(
        &mut self,
        id: i64,
        expires_at: Option<SystemTime>,
        ttl: Option<Duration>,
    ) -> Result<Change, Error> {
        let sql = format!(
            "UPDATE messages AS m SET {REQUEUE_SET}
             WHERE m.id = $3 AND m.status IN ('failed', 'expired', 'cancelled')"
        );
        let ttl = ttl.map(|t| t.as_millis() as i64);
        let changed = self.with(|c| {
            let mut tx = c.client.transaction()?;
            let n = tx.execute(sql.as_str(), &[&expires_at, &ttl, &id])?;
            if n > 0 {
                tx.execute("SELECT pg_notify($1, 'retry')", &[&NOTIFY_CHANNEL])?;
            }
            tx.commit()?;
            Ok(n)
        })?;
        if changed > 0 {
            return Ok(Change::Done);
        }
        self.refusal(id)
    }

    /// Requeues up to `limit` messages of `status` that ended (`updated_at`) in
    /// [`since`, `until`), oldest first; returns how many.
    pub fn retry_many(
        &mut self,
        status: &str,
        since: Option<SystemTime>,
        until: Option<SystemTime>,
        limit: u32,
        ttl: Option<Duration>,
    ) -> Result<u64, Error> {
        let sql = format!(
            "WITH picked AS (
                 SELECT id FROM messages
                 WHERE status = $3
                   AND ($4::timestamptz IS NULL OR updated_at >= $4)
                   AND ($5::timestamptz IS NULL OR updated_at < $5)
                 ORDER BY updated_at, id
                 LIMIT $6
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE messages AS m SET {REQUEUE_SET}
             FROM picked WHERE m.id = picked.id"
        );
        let ttl = ttl.map(|t| t.as_millis() as i64);
        let given: Option<SystemTime> = None;
        self.with(|c| {
            let mut tx = c.client.transaction()?;
            let n = tx.execute(
                sql.as_str(),
                &[&given, &ttl, &status, &since, &until, &i64::from(limit)],
            )?;
            if n > 0 {
                tx.execute("SELECT pg_notify($1, 'retry')", &[&NOTIFY_CHANNEL])?;
            }
            tx.commit()?;
            Ok(n)
        })
    }

    /// Cancels a `pending` message. A claim that locked the row first wins (the row is then
    /// `sending` and this is refused); one that comes second skips or no longer matches it.
    pub fn cancel(&mut self, id: i64) -> Result<Change, Error> {
        let changed = self.with(|c| {
            c.client.execute(
                "UPDATE messages SET status = 'cancelled', updated_at = now()
                 WHERE id = $1 AND status = 'pending'",
                &[&id],
            )
        })?;
        if changed > 0 {
            return Ok(Change::Done);
        }
        self.refusal(id)
    }

    fn refusal(&mut self, id: i64) -> Result<Change, Error> {
        let status = self.with(|c| {
            c.client
                .query_opt("SELECT status FROM messages WHERE id = $1", &[&id])
        })?;
        Ok(status.map_or(Change::NotFound, |r| Change::Refused(r.get(0))))
    }

    /// Deletes up to `limit` rows of `which` that ended more than `age` ago, oldest first, with
    /// their attempt history; returns how many of each status. Rows locked by anyone are left
    /// for the next round.
    pub fn prune(
        &mut self,
        which: Ended,
        age: Duration,
        limit: u32,
    ) -> Result<Vec<(&'static str, u64)>, Error> {
        let age_ms = age.as_millis().min(i64::MAX as u128) as i64;
        let statuses = which.statuses();
        let mut deleted = Vec::with_capacity(statuses.len());
        for status in statuses {
            // One status per statement: each is a range scan of its own index.
            let column = if *status == "sent" {
                "sent_at"
            } else {
                "updated_at"
            };
            let sql = format!(
                "DELETE FROM messages WHERE id IN (
                     SELECT id FROM messages
                     WHERE status = $1 AND {column} < now() - $2::bigint * interval '1 millisecond'
                     ORDER BY {column}
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED
                 )"
            );
            let n = self.with(|c| {
                c.client
                    .execute(sql.as_str(), &[status, &age_ms, &i64::from(limit)])
            })?;
            deleted.push((*status, n));
        }
        Ok(deleted)
    }

    /// How many messages are `sent`, `failed`, `expired` and `cancelled` (a count of the ended
    /// rows: not free on a large table, so `/metrics` runs it only now and then).
    pub fn ended_counts(&mut self) -> Result<Vec<(&'static str, i64)>, Error> {
        let row = self.with(|c| {
            c.client.query_one(
                "SELECT (SELECT count(*) FROM messages WHERE status = 'sent'),
                        (SELECT count(*) FROM messages WHERE status = 'failed'),
                        (SELECT count(*) FROM messages WHERE status = 'expired'),
                        (SELECT count(*) FROM messages WHERE status = 'cancelled')",
                &[],
            )
        })?;
        Ok(["sent", "failed", "expired", "cancelled"]
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, row.get::<_, i64>(i)))
            .collect())
    }

    /// How long the oldest due `pending` message has been due (zero when none is).
    pub fn oldest_due_age(&mut self) -> Result<Duration, Error> {
        let secs: Option<f64> = self.with(|c| {
            c.client
                .query_one(
                    "SELECT EXTRACT(EPOCH FROM (now() - min(next_attempt_at)))::float8
                     FROM messages WHERE status = 'pending' AND next_attempt_at <= now()",
                    &[],
                )
                .map(|r| r.get(0))
        })?;
        Ok(Duration::from_secs_f64(secs.unwrap_or(0.0).max(0.0)))
    }
}
