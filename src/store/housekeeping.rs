//! The statements of the relay's housekeeping: backlog counts, the heartbeat row, settling rows
//! that would never come due, pruning kept published rows; and the pending count of the
//! relay's summary line.

use super::names::held_until;
use super::statements::OLDEST_OCCURRED_AT;
use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// One relay's row in `<table>_relays`, written every few seconds while it runs.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub instance: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub in_flight: i32,
    pub published: i64,
    pub failed: i64,
    /// Partitions owned now.
    pub partitions: i32,
}

/// The backlog in figures, as the housekeeping samples it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    pub pending: i64,
    /// Pending and due now (the rest wait for a retry or behind a failed predecessor).
    pub due: i64,
    pub failed: i64,
    pub oldest_pending: Option<DateTime<Utc>>,
}

impl Store {
    /// Settles pending rows that would never come due (a producer set `next_attempt_at` to
    /// `infinity` or past the hold marker), `batch` at a time until none is left: (failed,
    /// made due). See `never_due_sql`.
    pub async fn settle_never_due(&self, batch: u32) -> Result<(u64, u64), StoreError> {
        let (mut failed, mut due) = (0, 0);
        loop {
            let behind: Vec<bool> = sqlx::query_scalar(&self.stmts.never_due)
                .bind(held_until())
                .bind(batch as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::sql("settle rows that are never due"))?;
            let n = behind.iter().filter(|b| **b).count() as u64;
            due += n;
            failed += behind.len() as u64 - n;
            if behind.len() < batch as usize {
                return Ok((failed, due));
            }
        }
    }

    /// Deletes kept published rows older than `older_than`, `batch` at a time, until none is
    /// left; returns how many went.
    pub async fn prune_published(
        &self,
        older_than: Duration,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let mut total = 0;
        loop {
            let n = sqlx::query(&self.stmts.prune)
                .bind(cutoff)
                .bind(batch as i64)
                .execute(&self.pool)
                .await
                .map_err(StoreError::sql("prune published rows"))?
                .rows_affected();
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    /// The backlog's figures: pending (and due) with the oldest pending event from one
    /// index-only scan of the claim index, failed from the failed index.
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        let t = self.names.qualified();
        let (pending, due, oldest): (i64, i64, Option<DateTime<Utc>>) = sqlx::query_as(&format!(
            "SELECT count(*), count(*) FILTER (WHERE next_attempt_at <= now()), \
                    {OLDEST_OCCURRED_AT} \
             FROM {t} WHERE status = 'pending'"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::sql("count the backlog"))?;
        let failed: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM {t} WHERE status = 'failed'"))
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::sql("count failed events"))?;
        Ok(Backlog {
            pending,
            due,
            failed,
            oldest_pending: oldest,
        })
    }

    /// Writes this relay's row in `<table>_relays` (see `outbox-relay status`).
    pub async fn heartbeat(&self, h: &Heartbeat) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO {}_relays AS r \
               (instance, host, pid, version, started_at, seen_at, in_flight, published, failed, \
                partitions) \
             VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9) \
             ON CONFLICT (instance) DO UPDATE SET host = $2, pid = $3, version = $4, \
               started_at = $5, seen_at = now(), in_flight = $6, published = $7, failed = $8, \
               partitions = $9",
            self.names.qualified()
        ))
        .bind(&h.instance)
        .bind(&h.host)
        .bind(h.pid)
        .bind(&h.version)
        .bind(h.started_at)
        .bind(h.in_flight)
        .bind(h.published)
        .bind(h.failed)
        .bind(h.partitions)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(StoreError::sql("write the relay heartbeat"))
    }

    /// Removes this relay's row when it stops.
    pub async fn leave(&self, instance: &str) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "DELETE FROM {}_relays WHERE instance = $1",
            self.names.qualified()
        ))
        .bind(instance)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(StoreError::sql("remove the relay heartbeat"))
    }

    /// Pending rows, counted up to `cap` so the count stays cheap on any backlog.
    pub async fn count_pending(&self, cap: i64) -> Result<i64, StoreError> {
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} WHERE status = 'pending' LIMIT $1) t",
            self.names.qualified()
        );
        sqlx::query_scalar(&sql)
            .bind(cap)
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::sql("count pending"))
    }
}
