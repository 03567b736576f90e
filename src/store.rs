//! All PostgreSQL access: migrations, claiming, recording outcomes, the cluster-wide state row,
//! and the queries behind the HTTP API.
//!
//! Keeping every statement here makes the database contract reviewable in one place. The hot
//! statements (claim, record) are one round trip per batch and are fenced by the leadership epoch:
//! they lock the state row `FOR SHARE`, so an epoch bump by a new lease holder either waits for
//! them or makes them match nothing.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use postgres::Statement;

use crate::connect::Postgres;
use crate::error::Error;
use crate::message::{Attempt, Claimed, Delivery};
use crate::pg::Client;

mod operations;
pub use operations::{Change, Ended, Enqueued, Message, NewMessage, RETRYABLE};

/// The migrations in `sql/`, applied in this order, each once.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_messages", include_str!("../sql/0001_messages.sql")),
    ("0002_integrity", include_str!("../sql/0002_integrity.sql")),
    (
        "0004_attempt_history",
        include_str!("../sql/0004_attempt_history.sql"),
    ),
    (
        "0005_operations",
        include_str!("../sql/0005_operations.sql"),
    ),
];

/// Serialises migrations across instances starting at the same time.
const MIGRATION_LOCK: i64 = 0x6d64_6d69_6772; // "mdmigr"

/// The channel the insert trigger notifies (see `sql/0001_messages.sql`).
pub const NOTIFY_CHANNEL: &str = "message_dispatcher";

const CLAIM: &str = "
WITH fence AS (
    SELECT 1 FROM dispatcher_state
    WHERE processing_enabled AND ($2::bigint IS NULL OR epoch = $2)
    FOR SHARE
), due AS (
    SELECT id FROM messages
    WHERE status = 'pending' AND next_attempt_at <= now() AND EXISTS (SELECT 1 FROM fence)
    ORDER BY next_attempt_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE messages AS m
SET status = 'sending', attempts = m.attempts + 1,
    claimed_epoch = $2, claimed_by = $3, claimed_at = now(), updated_at = now()
FROM due WHERE m.id = due.id
RETURNING m.id, m.recipient, m.content, m.attempts, m.attempts_base";

const RECORD: &str = "
WITH fence AS (
    SELECT 1 FROM dispatcher_state WHERE $7::bigint IS NULL OR epoch = $7 FOR SHARE
), history AS (
    -- What was requested is history whoever leads now: not fenced.
    INSERT INTO message_attempts
        (message_id, attempt, started_at, duration_ms, status_code, error, instance_id, epoch)
    SELECT h.id, h.attempt, h.started_at, h.duration_ms, h.status_code, h.error, $8, $7
    FROM unnest($9::bigint[], $10::int[], $11::timestamptz[], $12::int[], $13::smallint[],
                $14::text[])
         AS h(id, attempt, started_at, duration_ms, status_code, error)
    WHERE EXISTS (SELECT 1 FROM messages WHERE id = h.id)
    ON CONFLICT DO NOTHING
)
UPDATE messages AS m SET
    status = o.status,
    attempts = m.attempts - o.unsent,
    sent_at = CASE WHEN o.status = 'sent' THEN now() ELSE m.sent_at END,
    last_error = COALESCE(o.error, m.last_error),
    remote_message_id = COALESCE(o.remote_id, m.remote_message_id),
    next_attempt_at = CASE WHEN o.status = 'pending'
                           THEN now() + o.delay_ms * interval '1 millisecond'
                           ELSE m.next_attempt_at END,
    claimed_epoch = NULL, claimed_by = NULL, claimed_at = NULL,
    updated_at = now()
FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[])
         AS o(id, status, unsent, error, remote_id, delay_ms)
WHERE m.id = o.id AND m.status = 'sending'
  AND m.claimed_epoch IS NOT DISTINCT FROM $7 AND m.claimed_by = $8
  AND EXISTS (SELECT 1 FROM fence)";

const RECOVER: &str = "
WITH fence AS (
    SELECT 1 FROM dispatcher_state WHERE $3::bigint IS NULL OR epoch = $3 FOR SHARE
)
UPDATE messages
SET status = CASE WHEN attempts - attempts_base >= $4 THEN 'failed' ELSE 'pending' END,
    last_error = CASE WHEN attempts - attempts_base >= $4
        THEN 'abandoned in sending state during its last allowed attempt (the receiver may have got it)'
        ELSE last_error END,
    claimed_epoch = NULL, claimed_by = NULL, claimed_at = NULL,
    updated_at = now()
WHERE status = 'sending'
  AND claimed_at < now() - $1::bigint * interval '1 millisecond'
  AND NOT (claimed_by = $2 AND claimed_epoch IS NOT DISTINCT FROM $3)
  AND EXISTS (SELECT 1 FROM fence)";

/// The attempt-history columns of one outcome write.
struct History<'a> {
    ids: Vec<i64>,
    attempts: Vec<i32>,
    started_at: Vec<std::time::SystemTime>,
    duration_ms: Vec<i32>,
    status_codes: Vec<Option<i16>>,
    errors: Vec<Option<Cow<'a, str>>>,
}

impl<'a> History<'a> {
    fn with_capacity(n: usize) -> History<'a> {
        History {
            ids: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            started_at: Vec::with_capacity(n),
            duration_ms: Vec::with_capacity(n),
            status_codes: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, id: i64, attempt: &Attempt, error: Option<Cow<'a, str>>) {
        self.ids.push(id);
        self.attempts.push(attempt.number);
        self.started_at.push(attempt.started_at);
        self.duration_ms
            .push(attempt.duration.as_millis().min(i32::MAX as u128) as i32);
        self.status_codes
            .push(attempt.status.map(|s| s.min(i16::MAX as u16) as i16));
        self.errors.push(error);
    }
}

/// The cluster-wide state row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    pub processing_enabled: bool,
    pub epoch: i64,
}

/// One row of `GET /messages/sent`.
#[derive(Debug, serde::Serialize)]
pub struct SentMessage {
    pub id: i64,
    pub recipient: String,
    pub content: String,
    pub sent_at: Option<String>,
    pub remote_message_id: Option<String>,
}

/// A connection that reconnects on the next call after it broke.
pub struct Store {
    server: Postgres,
    instance_id: String,
    conn: Option<Connection>,
    /// Since when every statement has failed for a reason other than its data; any success
    /// ends the outage.
    down_since: Option<Instant>,
}

struct Connection {
    client: Client,
    claim: Statement,
    record: Statement,
    recover: Statement,
}

impl Store {
    /// Takes the server as configured; connects on first use.
    pub fn new(mut server: Postgres, instance_id: &str) -> Store {
        server.set_application_name(&format!("message-dispatcher/{instance_id}"));
        Store {
            server,
            instance_id: instance_id.to_owned(),
            conn: None,
            down_since: None,
        }
    }

    /// When the current database outage began, as seen by this connection's statements.
    pub fn down_since(&self) -> Option<Instant> {
        self.down_since
    }

    /// A plain client for a connection with a special purpose (LISTEN), named
    /// `message-dispatcher/<instance>/<purpose>` in `pg_stat_activity`.
    pub fn connect_for(&self, purpose: &str) -> Result<Client, Error> {
        self.server.connect(Some(purpose))
    }

    /// Runs `f` on the live connection, connecting first if needed; drops the connection when it
    /// turns out to be broken so the next call starts afresh.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, postgres::Error>,
    ) -> Result<T, Error> {
        let result = self.run(f);
        match &result {
            Ok(_) => self.down_since = None,
            Err(e) if e.is_data_error() => {}
            Err(_) => {
                self.down_since.get_or_insert_with(Instant::now);
            }
        }
        result
    }

    fn run<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, postgres::Error>,
    ) -> Result<T, Error> {
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result = f(conn);
        if result.is_err() && conn.client.is_closed() {
            self.conn = None;
        }
        Ok(result?)
    }

    fn open(&self) -> Result<Connection, Error> {
        // Bounded: statement_timeout on the server, a deadline on every call (connect.rs).
        let mut client = self.server.connect(None)?;
        let schema_ready = client
            .query_one("SELECT to_regclass('dispatcher_state') IS NOT NULL", &[])?
            .get::<_, bool>(0);
        if !schema_ready {
            return Err(Error::Other(
                "the messages table does not exist yet: run `message-dispatcher migrate`".into(),
            ));
        }
        Ok(Connection {
            claim: client.prepare(CLAIM)?,
            record: client.prepare(RECORD)?,
            recover: client.prepare(RECOVER)?,
            client,
        })
    }

    /// Applies pending migrations; returns the names applied now.
    pub fn migrate(&mut self) -> Result<Vec<&'static str>, Error> {
        // A dedicated connection: `open` refuses to work on an unmigrated database.
        let mut client = self.server.connect_unbounded(Some("migrate"))?;
        client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
        let result = apply_migrations(&mut client);
        let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
        result
    }

    /// Claims up to `limit` due messages for this instance under `epoch` (None without lease).
    /// Nothing is claimed while processing is stopped or the epoch is no longer current.
    pub fn claim(&mut self, limit: u32, epoch: Option<i64>) -> Result<Vec<Claimed>, Error> {
        let instance = self.instance_id.clone();
        let rows = self.with(|c| {
            c.client
                .query(&c.claim, &[&i64::from(limit), &epoch, &instance])
        })?;
        let mut claimed: Vec<Claimed> = rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                recipient: r.get(1),
                content: r.get(2),
                attempts: r.get(3),
                attempts_base: r.get(4),
            })
            .collect();
        claimed.sort_by_key(|m| m.id);
        Ok(claimed)
    }

    /// Records the outcomes of messages claimed under `epoch`, and the attempt history of the
    /// requests made, in one statement. Returns how many messages changed: fewer than given
    /// means the epoch was superseded (or rows were recovered).
    pub fn record<'a>(
        &mut self,
        epoch: Option<i64>,
        outcomes: impl ExactSizeIterator<Item = (i64, &'a Delivery, Option<&'a Attempt>)>,
    ) -> Result<u64, Error> {
        let n = outcomes.len();
        let mut ids = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut unsent = Vec::with_capacity(n);
        let mut errors: Vec<Option<Cow<str>>> = Vec::with_capacity(n);
        let mut remote_ids: Vec<Option<Cow<str>>> = Vec::with_capacity(n);
        let mut delays = Vec::with_capacity(n);
        let mut history = History::with_capacity(n);
        for (id, delivery, attempt) in outcomes {
            ids.push(id);
            // The claim counted the attempt; a message that was never sent gives it back.
            let (status, returned, error, remote, delay) = match delivery {
                Delivery::Sent { remote_id } => ("sent", 0, None, remote_id.as_deref(), 0),
                Delivery::Retry { error, delay } => (
                    "pending",
                    0,
                    Some(error.as_str()),
                    None,
                    delay.as_millis() as i64,
                ),
                Delivery::Failed { error } => ("failed", 0, Some(error.as_str()), None, 0),
                Delivery::Unsent => ("pending", 1, None, None, 0),
            };
            if let Some(attempt) = attempt {
                history.push(id, attempt, error.map(storable));
            }
            statuses.push(status);
            unsent.push(returned);
            errors.push(error.map(storable));
            remote_ids.push(remote.map(storable));
            delays.push(delay);
        }
        let instance = self.instance_id.clone();
        self.with(|c| {
            c.client.execute(
                &c.record,
                &[
                    &ids,
                    &statuses,
                    &unsent,
                    &errors,
                    &remote_ids,
                    &delays,
                    &epoch,
                    &instance,
                    &history.ids,
                    &history.attempts,
                    &history.started_at,
                    &history.duration_ms,
                    &history.status_codes,
                    &history.errors,
                ],
            )
        })
    }

    /// Returns to `pending` rows left `sending` longer than `timeout` by anyone but this
    /// instance's current epoch; those whose claim was their last allowed attempt (the request
    /// may have been made) end `failed` instead. Returns how many.
    pub fn recover_abandoned(
        &mut self,
        timeout: Duration,
        epoch: Option<i64>,
        max_attempts: u32,
    ) -> Result<u64, Error> {
        let instance = self.instance_id.clone();
        let ms = timeout.as_millis() as i64;
        let max = max_attempts as i32;
        self.with(|c| {
            c.client
                .execute(&c.recover, &[&ms, &instance, &epoch, &max])
        })
    }

    /// Starts a new leadership epoch held by this instance, in one statement.
    pub fn begin_epoch(&mut self) -> Result<i64, Error> {
        let instance = self.instance_id.clone();
        self.with(|c| {
            c.client
                .query_one(
                    "UPDATE dispatcher_state
                     SET epoch = epoch + 1, holder = $1, epoch_started_at = now()
                     RETURNING epoch",
                    &[&instance],
                )
                .map(|r| r.get(0))
        })
    }

    pub fn state(&mut self) -> Result<State, Error> {
        self.with(|c| {
            c.client
                .query_one(
                    "SELECT processing_enabled, epoch FROM dispatcher_state",
                    &[],
                )
                .map(|r| State {
                    processing_enabled: r.get(0),
                    epoch: r.get(1),
                })
        })
    }

    /// Flips the cluster-wide processing switch and wakes sleeping schedulers.
    pub fn set_processing(&mut self, enabled: bool) -> Result<bool, Error> {
        self.with(|c| {
            let mut tx = c.client.transaction()?;
            let row = tx.query_one(
                "UPDATE dispatcher_state SET processing_enabled = $1 RETURNING processing_enabled",
                &[&enabled],
            )?;
            tx.execute("SELECT pg_notify($1, 'switch')", &[&NOTIFY_CHANNEL])?;
            tx.commit()?;
            Ok(row.get(0))
        })
    }

    /// How long until the scheduler has work again: the earliest pending message falls due, or
    /// the earliest row another holder left `sending` may be recovered (zero when now).
    pub fn next_due_in(
        &mut self,
        recovery_timeout: Duration,
        epoch: Option<i64>,
    ) -> Result<Option<Duration>, Error> {
        let instance = self.instance_id.clone();
        let ms = recovery_timeout.as_millis() as i64;
        let secs: Option<f64> = self.with(|c| {
            c.client
                .query_one(
                    "SELECT EXTRACT(EPOCH FROM (LEAST(
                         (SELECT min(next_attempt_at) FROM messages WHERE status = 'pending'),
                         (SELECT min(claimed_at) FROM messages
                          WHERE status = 'sending'
                            AND NOT (claimed_by = $2 AND claimed_epoch IS NOT DISTINCT FROM $3))
                           + $1::bigint * interval '1 millisecond'
                     ) - now()))::float8",
                    &[&ms, &instance, &epoch],
                )
                .map(|r| r.get(0))
        })?;
        Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    pub fn insert_message(&mut self, recipient: &str, content: &str) -> Result<i64, Error> {
        self.with(|c| {
            c.client
                .query_one(
                    "INSERT INTO messages (recipient, content) VALUES ($1, $2) RETURNING id",
                    &[&recipient, &content],
                )
                .map(|r| r.get(0))
        })
    }

    /// Inserts many messages in one statement; returns how many.
    pub fn insert_many(
        &mut self,
        recipients: &[String],
        contents: &[String],
    ) -> Result<u64, Error> {
        self.with(|c| {
            c.client.execute(
                "INSERT INTO messages (recipient, content)
                 SELECT * FROM unnest($1::text[], $2::text[])",
                &[&recipients, &contents],
            )
        })
    }

    /// A page of sent messages, newest first, and the `before` value of the next page.
    pub fn sent_page(
        &mut self,
        limit: u32,
        before: Option<i64>,
    ) -> Result<(Vec<SentMessage>, Option<i64>), Error> {
        let rows = self.with(|c| {
            c.client.query(
                "SELECT id, recipient, content,
                        to_char(sent_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        remote_message_id
                 FROM messages
                 WHERE status = 'sent' AND ($2::bigint IS NULL OR id < $2)
                 ORDER BY id DESC
                 LIMIT $1",
                &[&(i64::from(limit) + 1), &before],
            )
        })?;
        let mut page: Vec<SentMessage> = rows
            .iter()
            .map(|r| SentMessage {
                id: r.get(0),
                recipient: r.get(1),
                content: r.get(2),
                sent_at: r.get(3),
                remote_message_id: r.get(4),
            })
            .collect();
        let next = if page.len() > limit as usize {
            page.truncate(limit as usize);
            page.last().map(|m| m.id)
        } else {
            None
        };
        Ok((page, next))
    }

    /// Messages waiting and in flight, from the small partial indexes (cheap on any table size).
    pub fn queue_depth(&mut self) -> Result<(i64, i64), Error> {
        self.with(|c| {
            c.client
                .query_one(
                    "SELECT (SELECT count(*) FROM messages WHERE status = 'pending'),
                            (SELECT count(*) FROM messages WHERE status = 'sending')",
                    &[],
                )
                .map(|r| (r.get(0), r.get(1)))
        })
    }
}

/// Text as PostgreSQL can store it: a `text` value cannot hold U+0000, which a receiver may
/// well put in an answer; it is shown as U+FFFD instead.
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    }
}

fn apply_migrations(client: &mut Client) -> Result<Vec<&'static str>, Error> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    TEXT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let done = client
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )?
            .is_some();
        if done {
            continue;
        }
        let mut tx = client.transaction()?;
        tx.batch_execute(sql)
            .map_err(|e| Error::Other(format!("migration {version} failed: {}", Error::from(e))))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )?;
        tx.commit()?;
        applied.push(*version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::{storable, MIGRATIONS};

    #[test]
    fn nul_bytes_are_not_stored() {
        assert_eq!(storable("x\0y\0"), "x\u{fffd}y\u{fffd}");
        assert!(matches!(
            storable("plain"),
            std::borrow::Cow::Borrowed("plain")
        ));
    }

    #[test]
    fn every_file_in_sql_is_a_migration_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .map(|n| n.trim_end_matches(".sql").to_owned())
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(files, listed);
    }
}
