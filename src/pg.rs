//! A blocking PostgreSQL client whose every round trip has a deadline.
//!
//! The `postgres` crate blocks for as long as the server takes to answer, and on a path that
//! silently drops packets — or through a middlebox that hung while its kernel still
//! acknowledges our bytes — the answer never comes: no reset, no error, and the server-side
//! `statement_timeout` cannot help because the statement never arrived. TCP keepalive and
//! `TCP_USER_TIMEOUT` (set in [`crate::connect`]) catch a peer whose kernel is gone, but not a
//! peer that acknowledges and never answers. So this client, like the `postgres` crate, runs
//! `tokio-postgres` on a single-threaded runtime of its own (no thread, no async code outside
//! this file) and gives every call a deadline: when it passes, the call fails with "timeout
//! waiting for server" and the connection is abandoned — its protocol state is unknown — so the
//! caller reconnects.
//!
//! The methods mirror the `postgres` crate's and return its error type, so callers see the
//! same API.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Error, Notification, Row, Statement, ToStatement};

/// How long a polite close may take when a client is dropped: milliseconds on a live
/// connection. On a silent path it never completes (tokio-postgres sends Terminate only after
/// every answer it still expects), so the socket is then simply closed.
const CLOSE_WAIT: Duration = Duration::from_millis(100);

/// The error of a call that outlived its deadline ("timeout waiting for server"): the
/// constructor tokio-postgres exposes for the `postgres` crate's own timeouts.
fn timed_out() -> Error {
    Error::__private_api_timeout()
}

type Poller = Box<dyn FnMut(&mut Context<'_>) -> Poll<Option<Result<AsyncMessage, Error>>> + Send>;

/// The runtime and the connection task it drives while a call waits.
struct Driver {
    runtime: Runtime,
    connection: Poller,
    notifications: VecDeque<Notification>,
    /// The connection reported its end (closed or failed): it must not be polled again.
    ended: bool,
}

impl Driver {
    /// Polls `f` until it is ready, driving the connection meanwhile. `None` when `limit`
    /// passed first.
    fn run<T>(
        &mut self,
        limit: Option<Duration>,
        mut f: impl FnMut(&mut Context<'_>, &mut VecDeque<Notification>) -> Poll<Result<T, Error>>,
    ) -> Option<Result<T, Error>> {
        let Driver {
            runtime,
            connection,
            notifications,
            ended,
        } = self;
        runtime.block_on(async {
            let mut sleep = limit.map(|d| Box::pin(tokio::time::sleep(d)));
            std::future::poll_fn(|cx| {
                while !*ended {
                    match connection(cx) {
                        Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                            notifications.push_back(n)
                        }
                        Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                            log::debug!(severity = notice.severity(); "PostgreSQL: {}", notice.message())
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => {
                            *ended = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                        Poll::Ready(None) => *ended = true,
                        Poll::Pending => break,
                    }
                }
                if let Poll::Ready(result) = f(cx, notifications) {
                    return Poll::Ready(Some(result));
                }
                if *ended {
                    // Nothing will answer any more (only after our own close, in practice).
                    return Poll::Ready(Some(Err(timed_out())));
                }
                let expired = sleep.as_mut().is_some_and(|s| s.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            })
            .await
        })
    }
}

/// A connection to PostgreSQL; see the module documentation.
pub struct Client {
    driver: Driver,
    /// `None` only while being dropped.
    client: Option<tokio_postgres::Client>,
    deadline: Option<Duration>,
    /// A call outlived its deadline: the connection is not used again.
    abandoned: bool,
}

impl Client {
    /// Connects with `config`; the whole connection setup (TCP, TLS, authentication) must be
    /// done within `connect_limit`, and every later call within `deadline` (None: no limit).
    pub fn connect(
        config: &tokio_postgres::Config,
        tls: tokio_postgres_rustls::MakeRustlsConnect,
        connect_limit: Option<Duration>,
        deadline: Option<Duration>,
    ) -> Result<Client, crate::error::Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let connected = runtime.block_on(async {
            match connect_limit {
                Some(limit) => tokio::time::timeout(limit, config.connect(tls)).await.ok(),
                None => Some(config.connect(tls).await),
            }
        });
        let Some(connected) = connected else {
            return Err(crate::error::Error::Other(format!(
                "no answer within {} while connecting (connect_timeout)",
                crate::config::fmt_duration(connect_limit.unwrap_or_default())
            )));
        };
        let (client, mut connection) = connected?;
        Ok(Client {
            driver: Driver {
                runtime,
                connection: Box::new(move |cx| connection.poll_message(cx)),
                notifications: VecDeque::new(),
                ended: false,
            },
            client: Some(client),
            deadline,
            abandoned: false,
        })
    }

    /// Runs `f` with every call it makes bounded by `limit` too (when that is shorter than the
    /// connection's own deadline): for a statement whose answer is worthless after a moment.
    pub fn within<T>(&mut self, limit: Duration, f: impl FnOnce(&mut Client) -> T) -> T {
        let usual = self.deadline;
        self.deadline = Some(usual.map_or(limit, |d| d.min(limit)));
        let result = f(self);
        self.deadline = usual;
        result
    }

    /// Runs one call to completion, within the deadline.
    fn call<'c, T, F>(
        &'c mut self,
        make: impl FnOnce(&'c tokio_postgres::Client) -> F,
    ) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let Client {
            driver,
            client,
            deadline,
            abandoned,
        } = self;
        if *abandoned {
            return Err(timed_out());
        }
        let mut future = pin!(make(client.as_ref().expect("present until dropped")));
        match driver.run(*deadline, |cx, _| future.as_mut().poll(cx)) {
            Some(result) => result,
            None => {
                *abandoned = true;
                Err(timed_out())
            }
        }
    }

    pub fn prepare(&mut self, query: &str) -> Result<Statement, Error> {
        self.call(|c| c.prepare(query))
    }

    pub fn query<T>(&mut self, query: &T, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.call(|c| c.query(query, params))
    }

    pub fn query_one<T>(&mut self, query: &T, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.call(|c| c.query_one(query, params))
    }

    pub fn query_opt<T>(
        &mut self,
        query: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.call(|c| c.query_opt(query, params))
    }

    pub fn execute<T>(&mut self, query: &T, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.call(|c| c.execute(query, params))
    }

    pub fn batch_execute(&mut self, query: &str) -> Result<(), Error> {
        self.call(|c| c.batch_execute(query))
    }

    /// Starts a transaction; it rolls back when dropped without `commit`.
    pub fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.batch_execute("BEGIN")?;
        Ok(Transaction {
            client: self,
            done: false,
        })
    }

    /// The next notification (LISTEN), waiting up to `timeout` for one; `None` when none came.
    pub fn next_notification(&mut self, timeout: Duration) -> Result<Option<Notification>, Error> {
        if self.abandoned {
            return Err(timed_out());
        }
        if let Some(n) = self.driver.notifications.pop_front() {
            return Ok(Some(n));
        }
        let got = self.driver.run(Some(timeout), |_, notifications| {
            match notifications.pop_front() {
                Some(n) => Poll::Ready(Ok(n)),
                None => Poll::Pending,
            }
        });
        got.transpose()
    }

    /// Whether the connection is gone (or was abandoned): reconnect instead of using it.
    pub fn is_closed(&self) -> bool {
        self.abandoned
            || self.driver.ended
            || self
                .client
                .as_ref()
                .is_none_or(tokio_postgres::Client::is_closed)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Dropping the client makes the connection send Terminate and close; give that a
        // moment so the server does not log an unexpected EOF, but never wait on a dead path.
        let live = !self.is_closed();
        self.client = None;
        if live {
            let _ = self
                .driver
                .run(Some(CLOSE_WAIT), |_, _| Poll::<Result<(), Error>>::Pending);
        }
    }
}

/// A transaction on a [`Client`]: `BEGIN` … `COMMIT`, rolled back when dropped uncommitted.
pub struct Transaction<'a> {
    client: &'a mut Client,
    done: bool,
}

impl Transaction<'_> {
    pub fn query_one<T>(&mut self, query: &T, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.client.query_one(query, params)
    }

    pub fn execute<T>(&mut self, query: &T, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.client.execute(query, params)
    }

    pub fn batch_execute(&mut self, query: &str) -> Result<(), Error> {
        self.client.batch_execute(query)
    }

    pub fn commit(mut self) -> Result<(), Error> {
        self.done = true;
        self.client.batch_execute("COMMIT")
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done && !self.client.is_closed() {
            let _ = self.client.batch_execute("ROLLBACK");
        }
    }
}
