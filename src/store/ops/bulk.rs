//! Replay and purge: in chunks of [`CHUNK`] rows, each its own transaction, so a replay of
//! millions never holds one giant transaction or its locks; the rows held behind a replayed or
//! purged failure are released in the same transaction.

use super::{push_where, Filter, Target, CHUNK};
use crate::store::{held_until, ClaimTx, Store, StoreError};
use serde::Serialize;
use sqlx::QueryBuilder;

/// What a replay or purge did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Changed {
    /// Rows replayed (back to pending) or purged (deleted).
    pub events: u64,
    /// Pending rows that waited behind a failed event and were released.
    pub released: u64,
}

impl Store {
    /// Puts matching failed rows (or kept published rows: republishing) back to pending with
    /// their attempts reset, releasing the rows held behind replayed failures, a chunk per
    /// transaction; then wakes the relays. Ids are kept, so each aggregate's order holds: the
    /// relay publishes an aggregate's rows in id order.
    pub async fn replay(&self, target: Target, filter: &Filter) -> Result<Changed, StoreError> {
        let extra = match target {
            Target::Failed => "",
            Target::Published => ", published_at = NULL",
        };
        let t = self.sql_t();
        let done = self
            .in_chunks(
                target,
                filter,
                &format!(
                    "UPDATE {t} SET status = 'pending', attempts = 0, next_attempt_at = now(), \
                       last_error = NULL{extra} FROM ("
                ),
                &format!(") c WHERE {t}.id = c.id RETURNING {t}.aggregate_id"),
            )
            .await?;
        if done.events > 0 {
            self.notify().await?;
        }
        Ok(done)
    }

    /// Deletes matching failed rows, releasing the rows held behind them, a chunk per
    /// transaction.
    pub async fn purge(&self, filter: &Filter) -> Result<Changed, StoreError> {
        let t = self.sql_t();
        let done = self
            .in_chunks(
                Target::Failed,
                filter,
                &format!("DELETE FROM {t} USING ("),
                &format!(") c WHERE {t}.id = c.id RETURNING {t}.aggregate_id"),
            )
            .await?;
        if done.released > 0 {
            self.notify().await?;
        }
        Ok(done)
    }

    /// Runs `head (SELECT id ... one chunk of matching rows) tail`, a statement returning the
    /// aggregates it touched, until no row matches; releases held rows of failed targets in the
    /// same transaction, after the change (see the `defer` statement).
    async fn in_chunks(
        &self,
        target: Target,
        filter: &Filter,
        head: &str,
        tail: &str,
    ) -> Result<Changed, StoreError> {
        let t = self.sql_t();
        let mut done = Changed::default();
        loop {
            let mut full = QueryBuilder::new(head);
            full.push(format!("SELECT id FROM {t}"));
            push_where(&mut full, target, filter);
            full.push(format!(" ORDER BY id LIMIT {CHUNK} FOR UPDATE"));
            full.push(tail);
            let mut tx = self.pool.begin().await.map_err(StoreError::sql("begin"))?;
            let aggregates: Vec<String> = full
                .build_query_scalar()
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::sql("replay or purge a chunk"))?;
            if target == Target::Failed && !aggregates.is_empty() {
                done.released += self.release_held(&mut tx, &aggregates).await?;
            }
            tx.commit().await.map_err(StoreError::sql("commit"))?;
            done.events += aggregates.len() as u64;
            if (aggregates.len() as i64) < CHUNK {
                return Ok(done);
            }
        }
    }
}

impl Store {
    /// Releases events held behind a failed predecessor in the given aggregates.
    ///
    /// In passes until one releases nothing. A relay may be holding a row behind a *held*
    /// predecessor at this very moment: its hold checked the predecessor (still held, under a
    /// share lock) before this transaction reached it, so a pass waits for that hold to commit
    /// and then releases the predecessor, but the pass's snapshot, taken before the hold
    /// committed, does not see the newly held row. The next pass does. Holds checked after a
    /// pass locked their predecessor see the lock and defer briefly instead of holding, so the
    /// passes end.
    pub(crate) async fn release_held(
        &self,
        tx: &mut ClaimTx,
        aggregates: &[String],
    ) -> Result<u64, StoreError> {
        let mut aggs = aggregates.to_vec();
        aggs.sort();
        aggs.dedup();
        let sql = format!(
            "UPDATE {} SET next_attempt_at = now() \
             WHERE aggregate_id = ANY($1) AND status = 'pending' AND next_attempt_at = $2",
            self.names.qualified()
        );
        let mut total = 0;
        loop {
            let n = sqlx::query(&sql)
                .bind(&aggs)
                .bind(held_until())
                .execute(&mut **tx)
                .await
                .map_err(StoreError::sql("release held events"))?
                .rows_affected();
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Puts failed events back to pending (attempts reset) and releases the events of their
    /// aggregates that were held behind them; returns how many events were replayed. The
    /// by-id case of [`Store::replay`].
    pub async fn replay_failed(&self, event_ids: &[uuid::Uuid]) -> Result<u64, StoreError> {
        let filter = Filter {
            event_ids: event_ids.to_vec(),
            ..Default::default()
        };
        Ok(self.replay(Target::Failed, &filter).await?.events)
    }
}
