//! The operators' SQL: backlog status, failed events, one event in full, replay and purge.
//!
//! Every statement reads an index that holds only the rows it is about (see
//! migrations/0002_operations.sql): the backlog per topic and its oldest event are one
//! index-only scan of the claim index; failed rows come from the failed index, kept published
//! rows from the published index. Replay and purge work in chunks of [`CHUNK`] rows, each its own
//! transaction, so a replay of millions never holds one giant transaction or its locks.

use super::statements::envelope_select;
use super::{Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

mod bulk;
mod status;
pub use bulk::Changed;
use status::{status_count_sql, status_held_sql, status_pending_sql};
pub use status::{RelayInstance, Status, TopicStatus, Totals};

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

impl Store {
    pub(super) fn sql_t(&self) -> String {
        self.names.qualified()
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
        let row = sqlx::query(&inspect_sql(&self.sql_t()))
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::sql("inspect"))?;
        let Some(r) = row else { return Ok(None) };
        let decoded = (|| -> Result<FullRow, sqlx::Error> {
            Ok(FullRow {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                topic: r.try_get("topic")?,
                aggregate_id: r.try_get("aggregate_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                event_type: r.try_get("event_type")?,
                event_version: r.try_get("event_version")?,
                payload: r.try_get("payload")?,
                headers: r
                    .try_get::<Option<serde_json::Value>, _>("headers")
                    .ok()
                    .flatten()
                    .map(|v| match v.get("unreadable_headers_as_text") {
                        Some(serde_json::Value::String(text)) => serde_json::from_str(text)
                            .unwrap_or_else(|_| serde_json::Value::String(text.clone())),
                        _ => v,
                    }),
                content_type: r.try_get("content_type")?,
                traceparent: r.try_get("traceparent")?,
                correlation_id: r.try_get("correlation_id")?,
                occurred_at: r.try_get("occurred_at")?,
                status: r.try_get("status")?,
                attempts: r.try_get("attempts")?,
                next_attempt_at: r.try_get("next_attempt_at")?,
                last_error: r.try_get("last_error")?,
                published_at: r.try_get("published_at")?,
            })
        })();
        decoded.map(Some).map_err(StoreError::sql("inspect"))
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
        out.push(("inspect", inspect_sql(&t), vec![Uuid::nil().to_string()]));
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

/// `inspect`'s statement: one row by event id, every column.
fn inspect_sql(t: &str) -> String {
    format!(
        "SELECT {envelope}, status, {next} AS next_attempt_at, last_error, \
           CASE WHEN published_at IS NULL THEN NULL ELSE {published} END AS published_at \
         FROM {t} WHERE event_id = $1",
        next = shown("next_attempt_at"),
        // `greatest` passes over a NULL, so an unpublished row keeps its NULL only this way.
        published = shown("published_at"),
        envelope = envelope_select(&[
            // Shown as text when serde_json cannot read it (numbers past f64, deep nesting).
            (
                "headers",
                "CASE WHEN headers IS NULL THEN NULL \
                 ELSE jsonb_build_object('unreadable_headers_as_text', headers::text) END",
            ),
            ("occurred_at", &shown("occurred_at")),
        ]),
    )
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
