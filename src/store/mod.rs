//! The outbox's SQL: connecting, claiming, marking, enqueueing, migrating, counting.
//!
//! Every statement the relay runs is built here once, from the configured (validated) schema
//! and table names, and each one stays on an index at any backlog size; the shape of each
//! query is explained next to it.
//!
//! # How a claim lives and dies
//! A claim is a transaction: [`Store::claim`] opens it and locks due pending rows with
//! `FOR UPDATE SKIP LOCKED`; the relay publishes them while the transaction is open and
//! [`Store::finish`] writes every verdict and commits. No claim column is ever written, so a
//! claim costs no extra row version, and a relay that dies (kill -9, lost connection, host
//! gone) releases its claims the moment Postgres ends its session: the rows are pending again,
//! unchanged, for any relay. `idle_in_transaction_session_timeout` bounds a relay that hangs
//! instead of dying.

mod claim;
mod columns;
mod decode;
pub(crate) mod enqueue;
mod housekeeping;
pub mod migrate;
mod names;
pub mod ops;
pub(crate) mod partitions;
mod session;
mod statements;

use sqlx::PgPool;
use statements::Statements;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

pub use claim::{Claim, ClaimTx, Claimed, Cursor, DeferUntil, Marks, Prev, Share, Walk};
pub use enqueue::{NewEvent, Outbox};
pub use housekeeping::{Backlog, Heartbeat};
use names::{held_until, LOCK_FENCE, LOCK_MEMBER, LOCK_PARTITION};
pub use names::{Names, RowStatus, HELD_UNTIL, PARTITIONS};
use session::PlanReset;
pub use session::Session;

/// A database failure, classified.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The cause is in the text and deliberately not the error's source (not even by the
    // field's name): error chains would print it again, twice with sqlx's I/O errors.
    #[error("database {what}: {cause}")]
    Sql {
        what: &'static str,
        cause: sqlx::Error,
    },
    #[error("database URL {url}: {message}")]
    Url { url: String, message: String },
    #[error("{0}")]
    Schema(String),
    /// A task running store work panicked or was cancelled.
    #[error("database task {0}")]
    Task(String),
    /// No answer within the client's own bound: the server's statement_timeout never fired, so
    /// the connection itself is gone quiet (a black-holed network, a frozen server). The
    /// connection is dropped with the work; an open claim is then lost, its rows pending again
    /// once Postgres ends the session.
    #[error("database {what}: no answer within {after:?}")]
    TimedOut { what: &'static str, after: Duration },
}

impl StoreError {
    fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |cause| StoreError::Sql { what, cause }
    }

    /// Whether trying again later may succeed: lost connections, restarts, timeouts,
    /// serialization failures and deadlocks. Everything else needs a person.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sql { cause, .. } => match cause {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => {
                    let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                    code == "40001"
                        || code == "40P01"
                        || code == "55P03"
                        || code == "57014"
                        || code.starts_with("08")
                        || code.starts_with("57P")
                        || code.starts_with("53")
                }
                _ => false,
            },
            StoreError::TimedOut { .. } => true,
            StoreError::Url { .. } | StoreError::Schema(_) | StoreError::Task(_) => false,
        }
    }
}

/// The outbox as the relay sees it.
pub struct Store {
    pool: PgPool,
    names: Names,
    stmts: Statements,
    /// Mark published rows instead of deleting them (`relay.published_retention` > 0).
    keep_published: bool,
    /// The longest a claim or a finish may wait for Postgres, whatever the network does.
    client_timeout: Duration,
    /// Payloads larger than this are not fetched (`relay.max_payload_bytes`).
    payload_cap: i64,
    /// A claim returns rows while their payloads and headers fit (`relay.batch_max_bytes`).
    batch_max_bytes: i64,
    /// How many rows a claim asks for at most: about what the byte budget held at the last
    /// claim's row sizes (see `claim_sql`).
    rows_that_fit: AtomicU32,
    /// Sessions go without TLS: a loopback host, no TLS setting given, and the server took a
    /// plaintext session at start-up (see `session::tls_left_to_us`).
    plaintext_loopback: bool,
    /// When a statement's cached plan went stale (see [`PlanReset`]).
    plans: Arc<PlanReset>,
}

impl Store {
    /// A store on a pool of the caller's. Only [`Store::connect`]'s pool replaces sessions
    /// whose prepared claim went stale (see `PlanReset`).
    pub fn with_pool(pool: PgPool, names: Names) -> Store {
        let stmts = Statements::new(&names);
        Store {
            pool,
            names,
            stmts,
            keep_published: false,
            client_timeout: Duration::from_secs(60),
            payload_cap: 1024 * 1024,
            batch_max_bytes: 8 * 1024 * 1024,
            rows_that_fit: AtomicU32::new(u32::MAX),
            plaintext_loopback: false,
            plans: Arc::default(),
        }
    }

    /// Bounds claims in bytes: payloads over `max_payload_bytes` are not fetched, and a claim
    /// returns rows while their payloads and headers fit in `batch_max_bytes` (at least one).
    pub fn bounded_in_bytes(mut self, max_payload_bytes: usize, batch_max_bytes: usize) -> Store {
        self.payload_cap = i64::try_from(max_payload_bytes).unwrap_or(i64::MAX);
        self.batch_max_bytes = i64::try_from(batch_max_bytes).unwrap_or(i64::MAX);
        self
    }

    /// Runs store work under the client's own bound (see [`StoreError::TimedOut`]).
    async fn bounded<T>(
        &self,
        what: &'static str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let after = self.client_timeout;
        let res = tokio::time::timeout(after, work)
            .await
            .unwrap_or(Err(StoreError::TimedOut { what, after }));
        if let Err(e) = &res {
            self.plans.note(e);
        }
        res
    }

    /// Keeps published rows (marked, with `published_at`) instead of deleting them; they are
    /// removed later by [`Store::prune_published`].
    pub fn keeping_published(mut self, keep: bool) -> Store {
        self.keep_published = keep;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Fails with a clear message when the outbox table has not been created or is behind.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        migrate::check(&self.pool, &self.names).await
    }

    /// Opens one connection outside the pool, so a failure names its cause (connection
    /// refused, authentication, TLS) where the pool would only say it timed out.
    pub async fn probe(&self) -> Result<(), StoreError> {
        use sqlx::Connection;
        let opts = self.pool.connect_options();
        let after = self.pool.options().get_acquire_timeout();
        let conn = tokio::time::timeout(after, sqlx::PgConnection::connect_with(&opts))
            .await
            .map_err(|_| StoreError::TimedOut {
                what: "connect",
                after,
            })?
            .map_err(StoreError::sql("connect"))?;
        let _ = conn.close().await;
        Ok(())
    }

    /// Is the database answering?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::sql("ping"))
    }

    /// Asks Postgres to wake listeners now (after a replay, say).
    pub async fn notify(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(self.names.channel())
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::sql("notify"))
    }
}
