//! Claiming and finishing: the relay's hot path. A claim locks due rows and returns them
//! decoded; finishing writes every verdict of a claim in one transaction and commits.

use super::columns::{ClaimColumns, ProbeColumns};
use super::decode::{self, decode_claimed};
use super::names::{held_until, RowStatus, LOCK_FENCE};
use super::{Store, StoreError};
use crate::envelope::Event;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{Postgres, Transaction};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The nearest earlier unfinished row of the same aggregate, as the claim saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prev {
    pub id: i64,
    pub status: RowStatus,
    pub next_attempt_at: DateTime<Utc>,
}

/// One claimed row.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Shared from the start: decoded on the claim's task straight into its final place, so
    /// the relay's loop never moves the envelope again.
    pub event: Arc<Event>,
    /// Set when a column could not be decoded into the envelope (bad headers JSON).
    pub invalid: Option<String>,
    pub prev: Option<Prev>,
}

/// Why a row is deferred, and until when.
#[derive(Debug, Clone)]
pub enum DeferUntil {
    /// Its predecessor is in flight elsewhere: look again after `relay.blocked_retry`.
    Soon,
    /// Wait as long as the predecessor does: until its retry time, or (failed predecessor)
    /// until it is replayed or purged. Applied only if the predecessor is still as seen.
    Predecessor(Prev),
}

/// Every verdict of one claim, written in one transaction by [`Store::finish`].
#[derive(Debug, Default)]
pub struct Marks {
    pub published: Vec<i64>,
    /// (row, counts as a publish attempt, reason)
    pub failed: Vec<(i64, bool, String)>,
    /// (row, delay in seconds, reason, counts as a publish attempt)
    pub retry: Vec<(i64, f64, String, bool)>,
    pub deferred: Vec<(i64, DeferUntil)>,
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        self.published.is_empty()
            && self.failed.is_empty()
            && self.retry.is_empty()
            && self.deferred.is_empty()
    }
}

/// Whether a row written by transaction `written_by` needs its predecessor probe, given the
/// walk that began when `young` was the oldest transaction running (both 32-bit xids, as
/// Postgres compares them: modulo 2^32, within 2^31 of each other). Rows written by an older
/// transaction were committed before the walk began, so every earlier unfinished row of their
/// aggregate was visible to the walk when it passed its key. A frozen or bootstrap xid (below
/// 3) is older than anything running.
pub(crate) fn written_during_walk(written_by: i64, young: i64) -> bool {
    let (w, y) = (written_by as u32, young as u32);
    w >= 3 && (w.wrapping_sub(y) as i32) >= 0
}

/// The partitions a relay's claim may take rows from, and the relay's name they must still
/// carry in `<table>_partitions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub owner: String,
    /// Sorted, distinct.
    pub parts: Vec<i16>,
}

/// Where a claim starts in the due index: after this (next_attempt_at, id).
pub type Cursor = (DateTime<Utc>, i64);

/// Where a claim stands in the claims' walk through the due index, which decides the rows
/// whose predecessor probe it may skip (see `Store::probe_predecessors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// From the front: a new walk begins, with the oldest transaction running now.
    Front,
    /// Past the key the previous claim took last, in the walk that began with that xid.
    After(Cursor, i64),
    /// Every row gets its probe (rows locked by another claim may come back unchanged).
    ProbeAll(Option<Cursor>),
}

/// What a claim brought back.
pub struct Claim {
    pub tx: ClaimTx,
    pub rows: Vec<Claimed>,
    /// Where the next claim may start (the last key taken), if this one was full.
    pub next: Option<Cursor>,
    /// The byte budget cut the claim short: more rows are due at once (locked by this claim
    /// until it commits, so the next claim starts from the front).
    pub cut: bool,
    /// The oldest transaction running when this claim's walk began from the front (a 32-bit
    /// xid), for the claims that continue it.
    pub walk_xmin: Option<i64>,
}

/// An open claim: the transaction holding the row locks.
pub type ClaimTx = Transaction<'static, Postgres>;
/// A claim's rows as taken: the last key among them (the next claim's cursor) and whether the
/// byte budget cut the claim short (it locked rows it did not return).
#[derive(Default)]
struct Taken {
    rows: Vec<Claimed>,
    last: Option<Cursor>,
    cut: bool,
}

impl Store {
    /// The claim statement's text (`$1` = batch size), for EXPLAIN in tests and benchmarks.
    pub fn claim_statement(&self) -> &str {
        &self.stmts.claim
    }

    /// The claim statement with a cursor (`$2`, `$3`: the key to start after).
    pub fn claim_statement_after(&self) -> &str {
        &self.stmts.claim_after
    }

    /// Opens a claim: up to `limit` due pending rows, locked until [`Store::finish`] or until
    /// the transaction ends otherwise (which releases them unchanged).
    pub async fn claim(&self, limit: u32) -> Result<(ClaimTx, Vec<Claimed>), StoreError> {
        let (tx, rows, _) = self.claim_after(limit, None).await?;
        Ok((tx, rows))
    }

    /// As [`Store::claim`], starting past `cursor` in claim order; also returns the cursor
    /// for the next claim (the last key taken).
    pub async fn claim_after(
        &self,
        limit: u32,
        cursor: Option<Cursor>,
    ) -> Result<(ClaimTx, Vec<Claimed>, Option<Cursor>), StoreError> {
        self.bounded("claim", self.claim_after_unbounded(limit, cursor))
            .await
    }

    async fn claim_after_unbounded(
        &self,
        limit: u32,
        cursor: Option<Cursor>,
    ) -> Result<(ClaimTx, Vec<Claimed>, Option<Cursor>), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::sql("begin"))?;
        let sql = match cursor {
            None => &self.stmts.claim,
            Some(_) => &self.stmts.claim_after,
        };
        let mut q = sqlx::query(sql).bind(limit as i64).bind(self.payload_cap);
        if let Some((at, id)) = cursor {
            q = q.bind(at).bind(id);
        }
        // No walk to speak of: every row gets its probe.
        let taken = self.take_claim(&mut tx, q, None).await?;
        Ok((tx, taken.rows, taken.last))
    }

    /// As [`Store::claim_after`], for a relay that owns a share of the partitions: only rows
    /// of `share`'s partitions, and only while every one of them is still fenced for this
    /// claim (see `claim_share_sql`). Partitions whose fence is taken (another relay is taking
    /// them over) are left out of this claim.
    ///
    /// `walk` is where the claims' walk through the due index stands (see [`Walk`]).
    pub async fn claim_share(
        &self,
        limit: u32,
        walk: Walk,
        share: &Share,
    ) -> Result<Claim, StoreError> {
        self.bounded("claim", self.claim_share_unbounded(limit, walk, share))
            .await
    }

    async fn claim_share_unbounded(
        &self,
        limit: u32,
        walk: Walk,
        share: &Share,
    ) -> Result<Claim, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::sql("begin"))?;
        let (fenced, running): (Vec<i16>, Option<i64>) = sqlx::query_as(&self.stmts.fence)
            .bind(self.names.lock_space(LOCK_FENCE))
            .bind(&share.parts)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::sql("fence the claim's partitions"))?;
        let (Some(&lo), Some(&hi)) = (fenced.first(), fenced.last()) else {
            return Ok(Claim {
                tx,
                rows: Vec::new(),
                next: None,
                cut: false,
                walk_xmin: None,
            });
        };
        let (cursor, walk_xmin) = match walk {
            Walk::Front => (None, running),
            Walk::After(cursor, xmin) => (Some(cursor), Some(xmin)),
            Walk::ProbeAll(cursor) => (cursor, None),
        };
        let contiguous = (hi - lo + 1) as usize == fenced.len();
        let sql = if cursor.is_some() {
            &self.stmts.claim_share_after
        } else {
            &self.stmts.claim_share
        };
        let limit = self.rows_to_ask(limit);
        let mut q = sqlx::query(sql)
            .bind(limit as i64)
            .bind(self.payload_cap)
            .bind(&fenced)
            .bind(&share.owner)
            .bind(lo)
            .bind(hi)
            .bind(contiguous);
        if let Some((at, id)) = cursor {
            q = q.bind(at).bind(id);
        }
        let taken = self.take_claim(&mut tx, q, walk_xmin).await?;
        let next = if taken.rows.len() as u32 == limit {
            taken.last
        } else {
            None
        };
        Ok(Claim {
            tx,
            rows: taken.rows,
            next,
            cut: taken.cut,
            walk_xmin,
        })
    }

    /// A partitioned claim's row limit: `limit`, or fewer where the byte budget held fewer at
    /// the last claim's row sizes (the claim then tells it came back full by its `next`).
    fn rows_to_ask(&self, limit: u32) -> u32 {
        limit.min(self.rows_that_fit.load(Ordering::Relaxed)).max(1)
    }

    /// Runs a claim statement and takes its rows as they arrive, while they fit the byte
    /// budget (see `claim_sql`); then probes the predecessors of those that need it
    /// ([`Store::probe_predecessors`]). `young`: the oldest transaction running when the
    /// claims' walk began (`None`: every row is probed).
    async fn take_claim(
        &self,
        tx: &mut ClaimTx,
        claim: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        young: Option<i64>,
    ) -> Result<Taken, StoreError> {
        let mut taken = Taken::default();
        let mut bytes = 0i64;
        let mut probe: Vec<(usize, bool)> = Vec::new();
        let mut waiting = false;
        let mut columns: Option<ClaimColumns> = None;
        {
            let mut rows = claim.fetch(&mut **tx);
            while let Some(row) = rows.try_next().await.map_err(StoreError::sql("claim"))? {
                if taken.cut {
                    continue;
                }
                let at = ClaimColumns::kept(&mut columns, &row)
                    .map_err(StoreError::sql("decode claimed row"))?;
                let meta = decode::claim_meta(&row, &at, self.payload_cap);
                if !taken.rows.is_empty() && bytes >= self.batch_max_bytes {
                    // Locked past the budget: released unchanged at commit. The rest is read
                    // to its end and dropped, not left unread: a statement still sending
                    // would keep running (its timeout counting, the session's idle timeout
                    // not) through the whole publish, and an error in it would only surface
                    // at the finish.
                    taken.cut = true;
                    continue;
                }
                bytes = bytes.saturating_add(meta.size);
                let (c, key) = decode_claimed(&row, &at, self.payload_cap)
                    .map_err(StoreError::sql("decode claimed row"))?;
                if taken.last.is_none_or(|l| key > l) {
                    taken.last = Some(key);
                }
                waiting |= meta.waiting;
                let must = !meta.fresh
                    || match (young, meta.written_by) {
                        (Some(y), Some(w)) => written_during_walk(w, y),
                        _ => true,
                    };
                if must || waiting {
                    probe.push((taken.rows.len(), must));
                }
                taken.rows.push(c);
            }
        }
        if let Some(per_row) = bytes.checked_div(taken.rows.len() as i64) {
            // As many rows of that size as the budget keeps (the last one starts under it):
            // rows alike come back as a full claim, which the next one continues.
            let per_row = per_row.max(1);
            let fit = self.batch_max_bytes.saturating_add(per_row - 1) / per_row;
            self.rows_that_fit
                .store(u32::try_from(fit).unwrap_or(u32::MAX), Ordering::Relaxed);
        }
        if !probe.is_empty() {
            self.probe_predecessors(tx, &mut taken.rows, &probe).await?;
        }
        Ok(taken)
    }

    /// Finds the nearest unfinished predecessor of the claimed rows `which` (index into
    /// `rows`, and whether the row is probed whatever `_waiting_idx` says), in the claim's
    /// transaction. A row needs it only where the claim order can have missed one; elsewhere
    /// the relay's own memory of the aggregate's rows is the whole story (`relay::dispatch`
    /// chains every row behind its aggregate's rows in memory, probed or not):
    ///
    /// * the row is not fresh (retried, deferred, held, scheduled): its key sorts it after every
    ///   fresh row, so a fresh predecessor may not have been walked yet;
    /// * it was written by a transaction at least as new as the oldest one running when the
    ///   claims' walk began from the front: only then can an earlier event of its aggregate
    ///   have committed *behind* the walk (a producer that writes an aggregate's events one
    ///   transaction after another), where the cursor would not see it;
    /// * its aggregate has a row that is not fresh before it: a retry, deferral, hold or
    ///   failure is waiting there. Only asked (one descent of `_waiting_idx` in the probe)
    ///   when the claim saw that index hold anything.
    ///
    /// Otherwise every earlier unfinished row of the aggregate is fresh and was visible to the
    /// walk when it passed its key: it is in this claim, in an earlier claim this relay still
    /// tracks, or done. The probe runs after the claim statement, on a later snapshot; what it
    /// sees in addition (an earlier row committed since) only holds the row back.
    async fn probe_predecessors(
        &self,
        tx: &mut ClaimTx,
        rows: &mut [Claimed],
        which: &[(usize, bool)],
    ) -> Result<(), StoreError> {
        let ids: Vec<i64> = which.iter().map(|&(i, _)| rows[i].event.id).collect();
        let must: Vec<bool> = which.iter().map(|&(_, m)| m).collect();
        let found = sqlx::query(&self.stmts.probe)
            .bind(&ids)
            .bind(&must)
            .fetch_all(&mut **tx)
            .await
            .map_err(StoreError::sql("probe predecessors"))?;
        let at: HashMap<i64, usize> = which.iter().map(|&(i, _)| (rows[i].event.id, i)).collect();
        let columns = match found.first() {
            Some(row) => ProbeColumns::of(row).map_err(StoreError::sql("probe predecessors"))?,
            None => return Ok(()),
        };
        for row in &found {
            let (id, prev) = decode::decode_prev(row, &columns)
                .map_err(StoreError::sql("decode predecessor"))?;
            let Some(&i) = at.get(&id) else { continue };
            match prev {
                Ok(p) => rows[i].prev = Some(p),
                // Without it this row's order cannot be known; it stays unpublished (failed,
                // with the reason) rather than risk overtaking its predecessor.
                Err(reason) => {
                    let r = &mut rows[i].invalid;
                    *r = Some(match r.take() {
                        Some(before) => format!("{before}; {reason}"),
                        None => reason,
                    });
                }
            }
        }
        Ok(())
    }

    /// The predecessor probe's statement (see `probe_sql`), for EXPLAIN in tests.
    pub fn probe_statement(&self) -> &str {
        &self.stmts.probe
    }

    /// The partitioned claim's statement (see `claim_share_sql`), for EXPLAIN in tests.
    pub fn claim_share_statement(&self) -> &str {
        &self.stmts.claim_share
    }

    /// Writes the verdicts of a claim and commits it. Rows without a verdict are released
    /// unchanged.
    pub async fn finish(
        &self,
        tx: ClaimTx,
        marks: &Marks,
        blocked_retry: Duration,
    ) -> Result<(), StoreError> {
        self.bounded(
            "record a claim's results",
            self.finish_unbounded(tx, marks, blocked_retry),
        )
        .await
    }

    async fn finish_unbounded(
        &self,
        mut tx: ClaimTx,
        marks: &Marks,
        blocked_retry: Duration,
    ) -> Result<(), StoreError> {
        if !marks.published.is_empty() {
            let sql = if self.keep_published {
                &self.stmts.keep_published
            } else {
                &self.stmts.delete
            };
            sqlx::query(sql)
                .bind(&marks.published)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::sql("mark published"))?;
        }
        // Failures before deferrals: a deferral in this same transaction then sees its
        // predecessor already failed and holds the row behind it.
        if !marks.failed.is_empty() {
            let ids: Vec<i64> = marks.failed.iter().map(|f| f.0).collect();
            let inc: Vec<i32> = marks.failed.iter().map(|f| f.1 as i32).collect();
            let err: Vec<&str> = marks.failed.iter().map(|f| f.2.as_str()).collect();
            sqlx::query(&self.stmts.fail)
                .bind(&ids)
                .bind(&inc)
                .bind(&err)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::sql("mark failed"))?;
        }
        if !marks.retry.is_empty() {
            let ids: Vec<i64> = marks.retry.iter().map(|f| f.0).collect();
            let delay: Vec<f64> = marks.retry.iter().map(|f| f.1).collect();
            let err: Vec<&str> = marks.retry.iter().map(|f| f.2.as_str()).collect();
            let inc: Vec<i32> = marks.retry.iter().map(|f| f.3 as i32).collect();
            sqlx::query(&self.stmts.retry)
                .bind(&ids)
                .bind(&delay)
                .bind(&err)
                .bind(&inc)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::sql("schedule retry"))?;
        }
        if !marks.deferred.is_empty() {
            self.defer(&mut tx, &marks.deferred, blocked_retry).await?;
        }
        tx.commit().await.map_err(StoreError::sql("commit"))
    }

    /// Defers rows: behind their predecessor as the claim saw it (until its retry time, or
    /// held while it is failed), or for `blocked_retry` when it is in flight elsewhere.
    async fn defer(
        &self,
        tx: &mut ClaimTx,
        deferred: &[(i64, DeferUntil)],
        blocked_retry: Duration,
    ) -> Result<(), StoreError> {
        let mut ids = Vec::with_capacity(deferred.len());
        let mut prev = Vec::with_capacity(deferred.len());
        let mut prev_status = Vec::with_capacity(deferred.len());
        let mut until = Vec::with_capacity(deferred.len());
        for (id, d) in deferred {
            ids.push(*id);
            match d {
                DeferUntil::Soon => {
                    prev.push(0i64);
                    prev_status.push("none");
                    until.push(Utc::now());
                }
                DeferUntil::Predecessor(p) => {
                    prev.push(p.id);
                    prev_status.push(p.status.as_str());
                    until.push(if p.status == RowStatus::Failed {
                        held_until()
                    } else {
                        p.next_attempt_at
                    });
                }
            }
        }
        sqlx::query(&self.stmts.defer)
            .bind(&ids)
            .bind(&prev)
            .bind(&prev_status)
            .bind(&until)
            .bind(blocked_retry.as_secs_f64())
            .execute(&mut **tx)
            .await
            .map_err(StoreError::sql("defer blocked rows"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Postgres' `age(written_by) <= age(young)`: modulo 2^32, frozen rows always old.
    #[test]
    fn a_row_is_young_if_written_since_the_walk_began() {
        assert!(written_during_walk(1000, 1000));
        assert!(written_during_walk(1001, 1000));
        assert!(!written_during_walk(999, 1000));
        // Across the wrap of the 32-bit counter.
        assert!(written_during_walk(5, u32::MAX as i64 - 5));
        assert!(!written_during_walk(u32::MAX as i64 - 5, 5));
        // Frozen (2) and bootstrap (1) xids are older than anything running.
        assert!(!written_during_walk(2, u32::MAX as i64 - 5));
        assert!(!written_during_walk(1, 3));
    }
}
