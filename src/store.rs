//! All PostgreSQL access: migrations, claiming, recording outcomes, the cluster-wide state row,
//! and the queries behind the HTTP API.
//!
//! Keeping every statement here makes the database contract reviewable in one place. The hot
//! statements (claim, record) are one round trip per batch and are fenced by the leadership epoch:
//! they lock the state row `FOR SHARE`, so an epoch bump by a new lease holder either waits for
//! them or makes them match nothing.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime};

use postgres::error::SqlState;
use postgres::Statement;

use crate::clock::BootInstant;
use crate::connect::{Postgres, QUERY_DEADLINE};
use crate::error::Error;
use crate::message::{Attempt, Claimed, Delivery};
use crate::pg::Client;
use crate::shutdown::Shutdown;

mod operations;
pub use operations::{Change, Ended, Enqueued, Message, NewMessage, RETRYABLE};

/// The migrations in `sql/`, applied in this order, each once.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_messages", include_str!("../sql/0001_messages.sql")),
    ("0002_integrity", include_str!("../sql/0002_integrity.sql")),
    ("0003_expiry", include_str!("../sql/0003_expiry.sql")),
    (
        "0004_attempt_history",
        include_str!("../sql/0004_attempt_history.sql"),
    ),
    (
        "0005_operations",
        include_str!("../sql/0005_operations.sql"),
    ),
    (
        "0006_history_without_foreign_key",
        include_str!("../sql/0006_history_without_foreign_key.sql"),
    ),
    (
        "0007_pending_searches_in_index_order",
        include_str!("../sql/0007_pending_searches_in_index_order.sql"),
    ),
    (
        "0008_claim_searches_in_index_order",
        include_str!("../sql/0008_claim_searches_in_index_order.sql"),
    ),
    (
        "0009_outcome_write_in_hash_joins",
        include_str!("../sql/0009_outcome_write_in_hash_joins.sql"),
    ),
];

/// Serialises migrations across instances starting at the same time (a session-level
/// advisory lock; public so that tests can hold it).
pub const MIGRATION_LOCK: i64 = 0x6d64_6d69_6772; // "mdmigr"

/// How often a start asks again for the migration lock while another instance holds it.
const MIGRATION_LOCK_POLL: Duration = Duration::from_millis(200);

/// How long a migration statement waits for a table lock (`lock_timeout`) before the start
/// fails (exit 1, "the next start tries again"). Longer than STATEMENT_TIMEOUT, so the statements
/// of instances still running — each ends within it, and with it any lock it holds — never fail
/// a migration; short, because a lock held longer belongs to something else (an open
/// transaction, an operator's session) that will not end soon, and while an `ALTER TABLE`
/// waits, every later statement on that table queues behind it: the running instances would
/// stall for as long as the migration waits.
pub const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The channel the insert trigger notifies (see `sql/0001_messages.sql`).
pub const NOTIFY_CHANNEL: &str = "message_dispatcher";

/// At most this many rows are marked `expired` by one claim; the claim skips expired rows
/// whether marked or not, so a larger backlog only takes a few more cycles to show.
pub const EXPIRE_LIMIT: u32 = 1000;

/// The claim: first the expiry sweep (pending rows past `expires_at` become `expired`, at most
/// $4 of them), then up to $1 due messages that have not expired become `sending`. One round
/// trip; both parts are fenced by the state row like before, so a replaced leader and a stopped
/// cluster change nothing. The two parts take disjoint rows (`expires_at <= now()` and `>`).
/// Returns the claimed rows (with the seconds each has left) and the ids of the expired ones.
/// Public for the benchmark, which shows its plan (EXPLAIN ANALYZE) on a large table.
pub const CLAIM: &str = "
WITH fence AS (
    SELECT 1 FROM dispatcher_state
    WHERE processing_enabled AND ($2::bigint IS NULL OR epoch = $2)
    FOR SHARE
), expired AS (
    UPDATE messages AS m
    SET status = 'expired',
        last_error = 'expired at ' || messages_expiry_text(m.expires_at)
                     || ' before it could be sent'
                     || COALESCE(' (last error: ' || m.last_error || ')', ''),
        updated_at = now()
    -- (sql/0007: the function keeps the plan on messages_expiry_idx; fenced, it looks at none.)
    -- `= ANY (ARRAY(…))` rather than a join: found by primary key, however small the table
    -- looks to the planner (a join is planned as a hash of the whole table when it is small).
    WHERE m.id = ANY (ARRAY(
        SELECT past.id
        FROM messages_past_expiry(CASE WHEN EXISTS (SELECT 1 FROM fence) THEN $4::bigint ELSE 0 END)
             AS past(id)))
    RETURNING m.id
), claimed AS (
    UPDATE messages AS m
    SET status = 'sending', attempts = m.attempts + 1,
        claimed_epoch = $2, claimed_by = $3, claimed_at = now(), updated_at = now()
    -- (sql/0008: the due messages in index order, locked; fenced, none.)
    WHERE m.id = ANY (ARRAY(
        SELECT due.id
        FROM messages_due(CASE WHEN EXISTS (SELECT 1 FROM fence) THEN $1::bigint ELSE 0 END)
             AS due(id)))
    RETURNING m.id, m.recipient, m.content, m.attempts, m.attempts - m.attempts_free AS charged,
              CASE WHEN isfinite(m.expires_at)
                   THEN EXTRACT(EPOCH FROM m.expires_at - now())::float8 END AS expires_in
)
SELECT true, id, recipient, content, attempts, charged, expires_in FROM claimed
UNION ALL
SELECT false, id, NULL, NULL, NULL, NULL, NULL FROM expired";

/// Outcomes and the attempt history, one statement per batch (sql/0009's function, which joins
/// them in hashes). A message going back to `pending` (a retry, or returned unsent) whose
/// `expires_at` would have passed by the time it falls due ends `expired` at once instead:
/// retries never go past the expiry. Returns how many messages changed, and the ids of those that
/// ended `expired`. `$16`: written again (see [`Store::record`]). Public for the benchmark.
pub const RECORD: &str = "SELECT rows_written, expired_ids
    FROM messages_record($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

const RECOVER: &str = "
WITH fence AS (
    SELECT 1 FROM dispatcher_state WHERE $3::bigint IS NULL OR epoch = $3 FOR SHARE
)
UPDATE messages
SET status = CASE WHEN attempts - attempts_free >= $4 THEN 'failed' ELSE 'pending' END,
    last_error = CASE WHEN attempts - attempts_free >= $4
        THEN 'abandoned in sending state during its last allowed attempt (the receiver may have got it)'
        ELSE last_error END,
    claimed_epoch = NULL, claimed_by = NULL, claimed_at = NULL,
    updated_at = now()
WHERE status = 'sending'
  AND claimed_at < now() - $1::bigint * interval '1 millisecond'
  AND NOT (id = ANY($2::bigint[]))
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

/// What one claim did.
#[derive(Debug, Default)]
pub struct Claim {
    /// The messages now `sending` for this instance, by id.
    pub messages: Vec<Claimed>,
    /// Pending messages past their `expires_at` that this claim marked `expired`.
    pub expired: u64,
}

/// What one outcome write did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Rows changed: fewer than given means the epoch was superseded (or rows were recovered).
    pub written: u64,
    /// Of those, the messages that ended `expired` (the outcome said so, or a retry or a
    /// return to pending would have come after `expires_at`).
    pub expired: Vec<i64>,
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
    /// Whether the last statement worked.
    last_ok: bool,
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
            last_ok: true,
        }
    }

    /// When the current database outage began, as seen by this connection's statements.
    pub fn down_since(&self) -> Option<Instant> {
        self.down_since
    }

    /// Whether the last statement on this connection worked.
    pub fn last_ok(&self) -> bool {
        self.last_ok
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
        self.last_ok = result.is_ok();
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
    ///
    /// `None` when `shutdown` started while another instance held the migration lock; once the
    /// lock is ours, a shutdown stops before the next migration (the next start applies it).
    pub fn migrate(&mut self, shutdown: &Shutdown) -> Result<Option<Vec<&'static str>>, Error> {
        // A dedicated connection: `open` refuses to work on an unmigrated database. Migrations
        // may run long, so no statement timeout; but none waits on a table lock for longer
        // than MIGRATION_LOCK_TIMEOUT, and our own quick statements have a deadline.
        let mut client = self.server.connect_unbounded(Some("migrate"))?;
        client.within(QUERY_DEADLINE, |c| {
            c.batch_execute(&format!(
                "SET lock_timeout = {}",
                MIGRATION_LOCK_TIMEOUT.as_millis()
            ))
        })?;
        if !take_migration_lock(&mut client, shutdown)? {
            return Ok(None);
        }
        let result = apply_migrations(&mut client, shutdown);
        let _ = client.within(QUERY_DEADLINE, |c| {
            c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        });
        result.map(Some)
    }

    /// Claims up to `limit` due messages for this instance under `epoch` (None without lease),
    /// and first marks up to [`EXPIRE_LIMIT`] pending messages past their `expires_at`
    /// `expired`. Nothing changes while processing is stopped or the epoch is no longer current.
    pub fn claim(&mut self, limit: u32, epoch: Option<i64>) -> Result<Claim, Error> {
        let instance = self.instance_id.clone();
        // Taken before PostgreSQL reads its clock, so a deadline counted from here is never
        // later than the real expiry.
        let asked = BootInstant::now();
        let rows = self.with(|c| {
            c.client.query(
                &c.claim,
                &[
                    &i64::from(limit),
                    &epoch,
                    &instance,
                    &i64::from(EXPIRE_LIMIT),
                ],
            )
        })?;
        let mut claim = Claim::default();
        for r in &rows {
            if !r.get::<_, bool>(0) {
                claim.expired += 1;
                continue;
            }
            let expires_in: Option<f64> = r.get(6);
            claim.messages.push(Claimed {
                id: r.get(1),
                recipient: r.get(2),
                content: r.get(3),
                attempts: r.get(4),
                charged: r.get(5),
                expires: expires_in.map(|secs| {
                    asked + Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
                }),
            });
        }
        claim.messages.sort_by_key(|m| m.id);
        Ok(claim)
    }

    /// Records the outcomes of messages claimed under `epoch`, and the attempt history of the
    /// requests made, in one statement. `again` when some of them may have been written already
    /// (an earlier write's answer was lost): their history rows are then not added twice.
    pub fn record<'a>(
        &mut self,
        epoch: Option<i64>,
        outcomes: impl ExactSizeIterator<Item = (i64, &'a Delivery, Option<&'a Attempt>)>,
        again: bool,
    ) -> Result<Recorded, Error> {
        let n = outcomes.len();
        let mut ids = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut unsent = Vec::with_capacity(n);
        let mut errors: Vec<Option<Cow<str>>> = Vec::with_capacity(n);
        let mut remote_ids: Vec<Option<Cow<str>>> = Vec::with_capacity(n);
        let mut delays = Vec::with_capacity(n);
        let mut free = Vec::with_capacity(n);
        let mut history = History::with_capacity(n);
        for (id, delivery, attempt) in outcomes {
            ids.push(id);
            // The claim counted the attempt; a message that was never sent gives it back, and
            // one whose request said nothing about it keeps it free of MAX_ATTEMPTS.
            let (status, returned, error, remote, delay) = match delivery {
                Delivery::Sent { remote_id } => ("sent", 0, None, remote_id.as_deref(), 0),
                Delivery::Retry { error, delay, .. } => (
                    "pending",
                    0,
                    Some(error.as_str()),
                    None,
                    delay.as_millis() as i64,
                ),
                Delivery::Failed { error } => ("failed", 0, Some(error.as_str()), None, 0),
                Delivery::Unsent => ("pending", 1, None, None, 0),
                Delivery::Expired => ("expired", 1, None, None, 0),
            };
            if let Some(attempt) = attempt {
                history.push(id, attempt, error.map(storable));
            }
            free.push(i32::from(matches!(
                delivery,
                Delivery::Retry { charged: false, .. }
            )));
            statuses.push(status);
            unsent.push(returned);
            errors.push(error.map(storable));
            remote_ids.push(remote.map(storable));
            delays.push(delay);
        }
        let instance = self.instance_id.clone();
        let row = self.with(|c| {
            c.client.query_one(
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
                    &free,
                    &again,
                ],
            )
        })?;
        Ok(Recorded {
            written: row.get::<_, i64>(0) as u64,
            expired: row.get(1),
        })
    }

    /// Returns to `pending` rows left `sending` longer than `timeout`, except the ones this
    /// instance still `held`; those whose claim was their last allowed attempt (the request may
    /// have been made) end `failed` instead. Returns how many.
    pub fn recover_abandoned(
        &mut self,
        timeout: Duration,
        held: &[i64],
        epoch: Option<i64>,
        max_attempts: u32,
    ) -> Result<u64, Error> {
        let ms = timeout.as_millis() as i64;
        let max = max_attempts as i32;
        self.with(|c| c.client.execute(&c.recover, &[&ms, &held, &epoch, &max]))
    }

    /// Starts a new leadership epoch held by this instance, but only while its lease cannot have
    /// expired (`valid_until`): an epoch raised later — a statement held up on a silent path
    /// and delivered when it heals — would fence out whoever holds the key by then. PostgreSQL
    /// checks that itself, on its own clock: one round trip reads that clock, so only the two
    /// clocks' rates need agree, not their settings.
    pub fn begin_epoch(&mut self, valid_until: BootInstant) -> Result<i64, Error> {
        let instance = self.instance_id.clone();
        let left = valid_until.saturating_duration_since(BootInstant::now());
        let raised = self.with(|c| {
            c.client.within(left, |client| {
                let server_now: SystemTime =
                    client.query_one("SELECT clock_timestamp()", &[])?.get(0);
                // The server read its clock before we got the answer: what is left of the lease
                // from now on is also left from then on.
                let left = valid_until.saturating_duration_since(BootInstant::now());
                let server_deadline = server_now + left;
                client
                    .query_opt(
                        "UPDATE dispatcher_state
                         SET epoch = epoch + 1, holder = $1, epoch_started_at = now()
                         WHERE clock_timestamp() < $2
                         RETURNING epoch",
                        &[&instance, &server_deadline],
                    )
                    .map(|r| r.map(|r| r.get(0)))
            })
        })?;
        raised.ok_or_else(|| {
            Error::Other("the lease could have expired before the epoch was started".into())
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

    /// Stores MESSAGE_TTL (None = no TTL) for the insert trigger of `sql/0003_expiry.sql`; it
    /// applies to every row inserted from now on, by any program. Returns the value it replaced.
    pub fn set_message_ttl(&mut self, ttl: Option<Duration>) -> Result<Option<Duration>, Error> {
        let micros = ttl.map(|d| d.as_micros().min(i64::MAX as u128) as i64);
        let before: Option<i64> = self.with(|c| {
            c.client
                .query_one(
                    "UPDATE dispatcher_state AS s
                     SET message_ttl = $1::bigint * interval '1 microsecond'
                     FROM (SELECT message_ttl FROM dispatcher_state FOR UPDATE) AS old
                     RETURNING (EXTRACT(EPOCH FROM old.message_ttl) * 1000000)::bigint",
                    &[&micros],
                )
                .map(|r| r.get(0))
        })?;
        Ok(before.map(|us| Duration::from_micros(us.max(0) as u64)))
    }

    /// How long until the scheduler has work again: the earliest pending message falls due or
    /// expires, or the earliest row another holder left `sending` may be recovered (zero when
    /// now).
    pub fn next_due_in(
        &mut self,
        recovery_timeout: Duration,
        held: &[i64],
    ) -> Result<Option<Duration>, Error> {
        let ms = recovery_timeout.as_millis() as i64;
        let secs: Option<f64> = self.with(|c| {
            c.client
                .query_one(
                    // (sql/0007: the function reads the first entry of each index.)
                    "SELECT EXTRACT(EPOCH FROM (LEAST(
                         pending.next_attempt_at,
                         pending.expires_at,
                         (SELECT min(claimed_at) FROM messages
                          WHERE status = 'sending' AND NOT (id = ANY($2::bigint[])))
                           + $1::bigint * interval '1 millisecond'
                     ) - now()))::float8
                     FROM messages_next_pending() AS pending",
                    &[&ms, &held],
                )
                .map(|r| r.get(0))
        })?;
        // Far away (or `infinity`, which PostgreSQL 17 turns into an infinite number): at
        // least a day, which any caller caps anyway.
        Ok(secs.map(|s| {
            Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::from_secs(86_400))
        }))
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
        let page = rows
            .iter()
            .map(|r| SentMessage {
                id: r.get(0),
                recipient: r.get(1),
                content: r.get(2),
                sent_at: r.get(3),
                remote_message_id: r.get(4),
            })
            .collect();
        Ok(keyset_page(page, limit, |m| m.id))
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

/// A page of rows fetched with one row more than `limit` (newest first), and the `before` value
/// of the next page: the last id kept, when there was more.
pub(crate) fn keyset_page<T>(
    mut rows: Vec<T>,
    limit: u32,
    id: impl Fn(&T) -> i64,
) -> (Vec<T>, Option<i64>) {
    if rows.len() <= limit as usize {
        return (rows, None);
    }
    rows.truncate(limit as usize);
    let next = rows.last().map(id);
    (rows, next)
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

/// Takes the migration lock, polling while another instance holds it (and saying so once).
/// False when `shutdown` started first.
fn take_migration_lock(client: &mut Client, shutdown: &Shutdown) -> Result<bool, Error> {
    let mut said = false;
    while !shutdown.is_triggered() {
        let taken: bool = client
            .within(QUERY_DEADLINE, |c| {
                c.query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            })?
            .get(0);
        if taken {
            if said {
                log::info!("Migration lock taken");
            }
            return Ok(true);
        }
        if !said {
            said = true;
            let holder = migration_lock_holder(client);
            log::info!(holder = holder.as_str(); "Waiting for another instance's migration");
        }
        shutdown.sleep(MIGRATION_LOCK_POLL);
    }
    Ok(false)
}

/// Who holds the migration lock, for the log (`application_name (pid N)`), as far as this
/// role may see.
fn migration_lock_holder(client: &mut Client) -> String {
    let row = client.within(QUERY_DEADLINE, |c| {
        c.query_opt(
            "SELECT a.application_name, l.pid FROM pg_locks l
             LEFT JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND (l.classid::bigint << 32 | l.objid::bigint) = $1",
            &[&MIGRATION_LOCK],
        )
    });
    match row {
        Ok(Some(row)) => {
            let name: Option<String> = row.get(0);
            let pid: i32 = row.get(1);
            match name.filter(|n| !n.is_empty()) {
                Some(name) => format!("{name} (pid {pid})"),
                None => format!("pid {pid}"),
            }
        }
        _ => "unknown".into(),
    }
}

fn apply_migrations(client: &mut Client, shutdown: &Shutdown) -> Result<Vec<&'static str>, Error> {
    // A statement cancelled by lock_timeout says so, and that the next start tries again.
    let blocked = |step: &str, e: postgres::Error| -> Error {
        if e.code() != Some(&SqlState::LOCK_NOT_AVAILABLE) {
            return Error::Other(format!("migration {step} failed: {}", Error::from(e)));
        }
        Error::Other(format!(
            "migration {step} failed: waited {} (lock_timeout) for a table lock that another \
             session holds, e.g. an open transaction; nothing of it was applied, the next start \
             tries again",
            crate::config::fmt_duration(MIGRATION_LOCK_TIMEOUT)
        ))
    };
    let setup = "schema_migrations";
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    TEXT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
        )
        .map_err(|e| blocked(setup, e))?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let done = client
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .map_err(|e| blocked(setup, e))?
            .is_some();
        if done {
            continue;
        }
        if shutdown.is_triggered() {
            break;
        }
        let mut tx = client.transaction().map_err(|e| blocked(version, e))?;
        tx.batch_execute(sql).map_err(|e| blocked(version, e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .map_err(|e| blocked(version, e))?;
        tx.commit().map_err(|e| blocked(version, e))?;
        applied.push(*version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::{storable, MIGRATIONS};

    #[test]
    fn running_instances_never_fail_a_migration_by_lock_timeout() {
        // Any lock a running instance holds ends with its statement, within STATEMENT_TIMEOUT.
        assert!(super::MIGRATION_LOCK_TIMEOUT > crate::connect::STATEMENT_TIMEOUT);
    }

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
