//! `outbox-relay status`: the backlog per topic (due, scheduled, held), failed and kept rows,
//! held aggregates and the relays running, each from an index that holds only those rows.

use super::Target;
use super::RELAY_SEEN_WITHIN;
use crate::store::statements::OLDEST_OCCURRED_AT;
use crate::store::{held_until, Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use std::collections::BTreeMap;

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
    /// Claimed and not yet recorded (handed to a backend and unanswered, or waiting behind an
    /// earlier event of their aggregate), as the running relays last reported.
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

impl Store {
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
}

pub(super) fn status_pending_sql(t: &str) -> String {
    format!(
        "SELECT topic, \
           count(*) FILTER (WHERE next_attempt_at <= now()), \
           count(*) FILTER (WHERE next_attempt_at > now() AND next_attempt_at < $1), \
           count(*) FILTER (WHERE next_attempt_at >= $1), \
           {OLDEST_OCCURRED_AT} \
         FROM {t} WHERE status = 'pending' GROUP BY topic"
    )
}

pub(super) fn status_count_sql(t: &str, target: Target) -> String {
    format!(
        "SELECT topic, count(*) FROM {t} WHERE status = '{}' GROUP BY topic",
        target.status()
    )
}

pub(super) fn status_held_sql(t: &str) -> String {
    format!("SELECT count(DISTINCT aggregate_id) FROM {t} WHERE status = 'failed'")
}

fn status_relays_sql(t: &str) -> String {
    format!(
        "SELECT instance, host, pid, version, started_at, seen_at, in_flight, published, failed, \
           (SELECT count(*) FROM {t}_partitions p WHERE p.owner = r.instance) \
         FROM {t}_relays r WHERE seen_at > now() - $1 * interval '1 second' ORDER BY instance"
    )
}
