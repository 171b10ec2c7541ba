//! The operators' SQL: backlog status, failed events, one event in full, replay and purge.
//!
//! Every statement reads an index that holds only the rows it is about (see
//! migrations/0002_operations.sql): the backlog per topic and its oldest event are one
//! index-only scan of the claim index; failed rows come from the failed index, kept published
//! rows from the published index. Replay and purge work in chunks of [`CHUNK`] rows, each its own
//! transaction, so a replay of millions never holds one giant transaction or its locks.

use super::{held_until, ClaimTx, Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Postgres, QueryBuilder, Row};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Rows per replay or purge transaction.
pub const CHUNK: i64 = 10_000;

/// How often a running relay writes its row in `<table>_relays`.
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A relay counts as running while its heartbeat row is younger than three heartbeats.
pub const RELAY_SEEN_WITHIN: std::time::Duration =
    std::time::Duration::from_secs(3 * HEARTBEAT_EVERY.as_secs());

/// Which rows an operator command is about. Empty: every row of the status.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub event_ids: Vec<Uuid>,
    /// A topic, or a glob (`*` any run, `?` one character).
    pub topic: Option<String>,
    pub aggregate_id: Option<String>,
    /// On the event's `occurred_at`: from (inclusive) and until (exclusive).
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// A piece of `last_error`, case-insensitive.
    pub error: Option<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.event_ids.is_empty()
            && self.topic.is_none()
            && self.aggregate_id.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.error.is_none()
    }
}

/// The rows a command works on: failed ones, or kept published ones (republishing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Failed,
    Published,
}

impl Target {
    /// A literal, never a parameter: the partial indexes only match a literal status.
    fn status(self) -> &'static str {
        match self {
            Target::Failed => "failed",
            Target::Published => "published",
        }
    }
}

/// `*` and `?` to LIKE's `%` and `_`, everything else literal.
fn like_pattern(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() + 4);
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn contains_pattern(text: &str) -> String {
    let mut out = String::from("%");
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Appends `WHERE status = '<target>' AND <filter>` to `q`.
fn push_where(q: &mut QueryBuilder<'_, Postgres>, target: Target, f: &Filter) {
    q.push(format!(" WHERE status = '{}'", target.status()));
    if !f.event_ids.is_empty() {
        q.push(" AND event_id = ANY(");
        q.push_bind(f.event_ids.clone());
        q.push(")");
    }
    if let Some(t) = &f.topic {
        if t.contains(['*', '?']) {
            q.push(" AND topic LIKE ");
            q.push_bind(like_pattern(t));
        } else {
            q.push(" AND topic = ");
            q.push_bind(t.clone());
        }
    }
    if let Some(a) = &f.aggregate_id {
        q.push(" AND aggregate_id = ");
        q.push_bind(a.clone());
    }
    if let Some(s) = f.since {
        q.push(" AND occurred_at >= ");
        q.push_bind(s);
        if target == Target::Published {
            // Implied (an event is published after it occurred), and it bounds the scan of
            // the published index.
            q.push(" AND published_at >= ");
            q.push_bind(s);
        }
    }
    if let Some(u) = f.until {
        q.push(" AND occurred_at < ");
        q.push_bind(u);
    }
    if let Some(e) = &f.error {
        q.push(" AND last_error ILIKE ");
        q.push_bind(contains_pattern(e));
    }
}

/// One topic's line in `status`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TopicStatus {
    pub topic: String,
    /// Pending and due now.
    pub due: i64,
    /// Pending, waiting for a retry.
    pub scheduled: i64,
    /// Pending, held behind a failed event of their aggregate.
    pub held: i64,
    pub failed: i64,
    /// Kept published rows (`relay.published_retention`).
    pub published: i64,
}

/// A running relay, from its heartbeat row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RelayInstance {
    pub instance: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
    pub in_flight: i32,
    pub published: i64,
    pub failed: i64,
    /// Partitions (of 256) it owns now, from `<table>_partitions`.
    pub partitions: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Totals {
    pub pending: i64,
    pub due: i64,
    pub scheduled: i64,
    pub held: i64,
    /// Handed to a backend and not yet acknowledged, as the running relays last reported.
    pub in_flight: i64,
    pub failed: i64,
    pub published: i64,
}

/// `outbox-relay status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub outbox: String,
    pub at: DateTime<Utc>,
    pub totals: Totals,
    pub oldest_pending_at: Option<DateTime<Utc>>,
    pub oldest_pending_age_seconds: Option<f64>,
    /// Aggregates with a failed event, which holds back their later events.
    pub aggregates_held: i64,
    pub topics: Vec<TopicStatus>,
    /// Partitions no running relay owns (while relays start, stop or rebalance; all 256 when
    /// none runs): their events wait.
    pub partitions_unowned: i64,
    pub relays: Vec<RelayInstance>,
}

/// One failed (or kept published) event, as listed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Listed {
    pub id: i64,
    pub event_id: Uuid,
    pub topic: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub attempts: i32,
    pub occurred_at: DateTime<Utc>,
    /// When it failed (failed rows) or was published (kept rows).
    pub at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// One row in full (`inspect`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FullRow {
    pub id: i64,
    pub event_id: Uuid,
    pub topic: String,
    pub aggregate_id: String,
    pub aggregate_type: Option<String>,
    pub event_type: String,
    pub event_version: i32,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub headers: Option<serde_json::Value>,
    pub content_type: Option<String>,
    pub traceparent: Option<String>,
    pub correlation_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub published_at: Option<DateTime<Utc>>,
}

/// What a replay or purge did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Changed {
    /// Rows replayed (back to pending) or purged (deleted).
    pub events: u64,
    /// Pending rows that waited behind a failed event and were released.
    pub released: u64,
}

impl Store {
    fn sql_t(&self) -> String {
        self.names.qualified()
    }

    /// The backlog by topic, its oldest event, held aggregates and the running relays.
    pub async fn status(&self) -> Result<Status, StoreError> {
        let t = self.sql_t();
        let (topics, oldest) = self.status_by_topic(&t).await?;
        let aggregates_held: i64 = sqlx::query_scalar(&status_held_sql(&t))
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::sql("status: held aggregates"))?;
        let relays = self.status_relays(&t).await?;
        let topics: Vec<TopicStatus> = topics.into_values().collect();
        let sum = |f: fn(&TopicStatus) -> i64| topics.iter().map(f).sum::<i64>();
        let (due, scheduled, held) = (sum(|t| t.due), sum(|t| t.scheduled), sum(|t| t.held));
        let now = Utc::now();
        Ok(Status {
            outbox: t,
            at: now,
            totals: Totals {
                pending: due + scheduled + held,
                due,
                scheduled,
                held,
                in_flight: relays.iter().map(|r| r.in_flight as i64).sum(),
                failed: sum(|t| t.failed),
                published: sum(|t| t.published),
            },
            oldest_pending_at: oldest,
            oldest_pending_age_seconds: oldest
                .map(|o| (now - o).num_milliseconds().max(0) as f64 / 1000.0),
            aggregates_held,
            partitions_unowned: crate::store::PARTITIONS as i64
                - relays.iter().map(|r| r.partitions).sum::<i64>(),
            topics,
            relays,
        })
    }

    /// Pending (due, scheduled, held), failed and kept published rows per topic, and the
    /// oldest pending row's time.
    async fn status_by_topic(
        &self,
        t: &str,
    ) -> Result<(BTreeMap<String, TopicStatus>, Option<DateTime<Utc>>), StoreError> {
        let mut topics: BTreeMap<String, TopicStatus> = BTreeMap::new();
        let mut oldest: Option<DateTime<Utc>> = None;
        let rows = sqlx::query(&status_pending_sql(t))
            .bind(held_until())
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::sql("status: pending"))?;
        for r in rows {
            let topic: String = r.get(0);
            let e = topics.entry(topic.clone()).or_insert_with(|| TopicStatus {
                topic,
                ..Default::default()
            });
            e.due = r.get(1);
            e.scheduled = r.get(2);
            e.held = r.get(3);
            let o: Option<DateTime<Utc>> = r.get(4);
            oldest = match (oldest, o) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        for (sql, published) in [
            (status_count_sql(t, Target::Failed), false),
            (status_count_sql(t, Target::Published), true),
        ] {
            let rows: Vec<(String, i64)> = sqlx::query_as(&sql)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::sql("status: counts"))?;
            for (topic, n) in rows {
                let e = topics.entry(topic.clone()).or_insert_with(|| TopicStatus {
                    topic,
                    ..Default::default()
                });
                if published {
                    e.published = n;
                } else {
                    e.failed = n;
                }
            }
        }
        Ok((topics, oldest))
    }

    /// The relays seen lately, from their heartbeat rows.
    async fn status_relays(&self, t: &str) -> Result<Vec<RelayInstance>, StoreError> {
        let relays = sqlx::query(&status_relays_sql(t))
            .bind(RELAY_SEEN_WITHIN.as_secs_f64())
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::sql("status: relays"))?
            .into_iter()
            .map(|r| RelayInstance {
                instance: r.get(0),
                host: r.get(1),
                pid: r.get(2),
                version: r.get(3),
                started_at: r.get(4),
                seen_at: r.get(5),
                in_flight: r.get(6),
                published: r.get(7),
                failed: r.get(8),
                partitions: r.get(9),
            })
            .collect::<Vec<_>>();
        Ok(relays)
    }

    /// Failed (or kept published) rows matching `filter`, in id order, at most `limit`.
    pub async fn list(
        &self,
        target: Target,
        filter: &Filter,
        limit: i64,
    ) -> Result<Vec<Listed>, StoreError> {
        let mut q = list_query(&self.sql_t(), target, filter);
        q.push(" ORDER BY id LIMIT ");
        q.push_bind(limit);
        let rows = q
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::sql("list events"))?;
        Ok(rows
            .into_iter()
            .map(|r| Listed {
                id: r.get(0),
                event_id: r.get(1),
                topic: r.get(2),
                aggregate_id: r.get(3),
                event_type: r.get(4),
                attempts: r.get(5),
                occurred_at: r.get(6),
                at: r.get(7),
                last_error: r.get(8),
            })
            .collect())
    }

    /// How many rows match.
    pub async fn count_matching(&self, target: Target, filter: &Filter) -> Result<i64, StoreError> {
        let mut q = QueryBuilder::new(format!("SELECT count(*) FROM {}", self.sql_t()));
        push_where(&mut q, target, filter);
        q.build_query_scalar()
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::sql("count events"))
    }

    /// One row in full, in any status.
    pub async fn inspect(&self, event_id: Uuid) -> Result<Option<FullRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT id, event_id, topic, aggregate_id, aggregate_type, event_type, event_version, \
               payload, {headers}, content_type, traceparent, correlation_id, {occurred}, \
               status, attempts, {next}, last_error, {published} \
             FROM {} WHERE event_id = $1",
            self.sql_t(),
            // Shown as text when serde_json cannot read it (numbers past f64, deep nesting).
            headers = "CASE WHEN headers IS NULL THEN NULL \
                       ELSE jsonb_build_object('unreadable_headers_as_text', headers::text) END",
            occurred = shown("occurred_at"),
            next = shown("next_attempt_at"),
            published = shown("published_at"),
        ))
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::sql("inspect"))?;
        Ok(row.map(|r| FullRow {
            id: r.get(0),
            event_id: r.get(1),
            topic: r.get(2),
            aggregate_id: r.get(3),
            aggregate_type: r.get(4),
            event_type: r.get(5),
            event_version: r.get(6),
            payload: r.get(7),
            headers: r
                .try_get::<Option<serde_json::Value>, _>(8)
                .ok()
                .flatten()
                .map(|v| match v.get("unreadable_headers_as_text") {
                    Some(serde_json::Value::String(text)) => serde_json::from_str(text)
                        .unwrap_or_else(|_| serde_json::Value::String(text.clone())),
                    _ => v,
                }),
            content_type: r.get(9),
            traceparent: r.get(10),
            correlation_id: r.get(11),
            occurred_at: r.get(12),
            status: r.get(13),
            attempts: r.get(14),
            next_attempt_at: r.get(15),
            last_error: r.get(16),
            published_at: r.get(17),
        }))
    }

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

    /// Every operator statement with sample values, for EXPLAIN in tests: (name, SQL with
    /// `$n` parameters, the parameters as text).
    pub fn operator_statements(&self) -> Vec<(&'static str, String, Vec<String>)> {
        let t = self.sql_t();
        let mut out = vec![
            (
                "status: pending",
                status_pending_sql(&t),
                vec![crate::store::HELD_UNTIL.to_string()],
            ),
            (
                "status: failed",
                status_count_sql(&t, Target::Failed),
                vec![],
            ),
            (
                "status: published",
                status_count_sql(&t, Target::Published),
                vec![],
            ),
            ("status: held aggregates", status_held_sql(&t), vec![]),
        ];
        let full = Filter {
            event_ids: vec![Uuid::nil()],
            topic: Some("orders.*".into()),
            aggregate_id: Some("a1".into()),
            since: Some(Utc::now() - chrono::Duration::hours(1)),
            until: Some(Utc::now()),
            error: Some("refused".into()),
        };
        for (name, target, f) in [
            ("failed: no filter", Target::Failed, Filter::default()),
            (
                "failed: topic",
                Target::Failed,
                Filter {
                    topic: Some("orders.created".into()),
                    ..Default::default()
                },
            ),
            ("failed: every filter", Target::Failed, full.clone()),
            (
                "published: since",
                Target::Published,
                Filter {
                    since: full.since,
                    ..Default::default()
                },
            ),
        ] {
            let mut q = list_query(&t, target, &f);
            q.push(" ORDER BY id LIMIT 100");
            out.push((name, q.sql().to_string(), binds_as_text(target, &f)));
        }
        out.push((
            "inspect",
            format!("SELECT * FROM {t} WHERE event_id = $1"),
            vec![Uuid::nil().to_string()],
        ));
        out
    }
}

fn binds_as_text(target: Target, f: &Filter) -> Vec<String> {
    let mut v = Vec::new();
    if !f.event_ids.is_empty() {
        v.push(format!(
            "{{{}}}",
            f.event_ids
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if let Some(t) = &f.topic {
        v.push(if t.contains(['*', '?']) {
            like_pattern(t)
        } else {
            t.clone()
        });
    }
    if let Some(a) = &f.aggregate_id {
        v.push(a.clone());
    }
    if let Some(s) = f.since {
        v.push(s.to_rfc3339());
        if target == Target::Published {
            v.push(s.to_rfc3339());
        }
    }
    if let Some(u) = f.until {
        v.push(u.to_rfc3339());
    }
    if let Some(e) = &f.error {
        v.push(contains_pattern(e));
    }
    v
}

/// A timestamp column as the operator commands read it: Postgres accepts `infinity` and years
/// past what chrono decodes, so those are shown at the edge of the readable range instead of
/// failing the listing.
fn shown(col: &str) -> String {
    format!(
        "least(greatest({col}, '0001-01-01 00:00:00+00'::timestamptz), \
         '9999-12-31 23:59:59+00'::timestamptz)"
    )
}

fn list_query(t: &str, target: Target, f: &Filter) -> QueryBuilder<'static, Postgres> {
    let at = match target {
        Target::Failed => "next_attempt_at",
        Target::Published => "published_at",
    };
    let mut q = QueryBuilder::new(format!(
        "SELECT id, event_id, topic, aggregate_id, event_type, attempts, {}, {}, \
           last_error FROM {t}",
        shown("occurred_at"),
        shown(at)
    ));
    push_where(&mut q, target, f);
    q
}

fn status_pending_sql(t: &str) -> String {
    format!(
        "SELECT topic, \
           count(*) FILTER (WHERE next_attempt_at <= now()), \
           count(*) FILTER (WHERE next_attempt_at > now() AND next_attempt_at < $1), \
           count(*) FILTER (WHERE next_attempt_at >= $1), \
           min(occurred_at) FILTER (WHERE isfinite(occurred_at)) \
         FROM {t} WHERE status = 'pending' GROUP BY topic"
    )
}

fn status_count_sql(t: &str, target: Target) -> String {
    format!(
        "SELECT topic, count(*) FROM {t} WHERE status = '{}' GROUP BY topic",
        target.status()
    )
}

fn status_held_sql(t: &str) -> String {
    format!("SELECT count(DISTINCT aggregate_id) FROM {t} WHERE status = 'failed'")
}

fn status_relays_sql(t: &str) -> String {
    format!(
        "SELECT instance, host, pid, version, started_at, seen_at, in_flight, published, failed, \
           (SELECT count(*) FROM {t}_partitions p WHERE p.owner = r.instance) \
         FROM {t}_relays r WHERE seen_at > now() - $1 * interval '1 second' ORDER BY instance"
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_like_patterns_with_everything_else_literal() {
        assert_eq!(like_pattern("orders.*"), "orders.%");
        assert_eq!(like_pattern("a?c"), "a_c");
        assert_eq!(like_pattern("100%_x\\"), "100\\%\\_x\\\\");
        assert_eq!(contains_pattern("50% off"), "%50\\% off%");
    }

    #[test]
    fn an_empty_filter_is_empty_and_any_field_makes_it_not() {
        assert!(Filter::default().is_empty());
        assert!(!Filter {
            error: Some("x".into()),
            ..Default::default()
        }
        .is_empty());
    }
}
