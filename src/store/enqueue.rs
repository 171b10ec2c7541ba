//! The producer side in Rust: enqueue envelopes inside the caller's own transaction.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> anyhow::Result<()> {
//! use outbox_relay::store::{NewEvent, Outbox};
//! let outbox = Outbox::new("outbox", "outbox")?;
//! let mut tx = pool.begin().await?;
//! // ... business writes on &mut *tx ...
//! outbox
//!     .enqueue(&mut tx, &[NewEvent::json("orders.created", "order-42", "OrderCreated", &serde_json::json!({"total": 10}))?])
//!     .await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use super::Names;
use crate::config::validate_identifier;
use crate::envelope::{validate_topic, TopicError};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

/// An event to write into the outbox. `event_id` defaults to a fresh UUIDv7 (time ordered, so
/// the unique index stays compact).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub topic: String,
    pub aggregate_id: String,
    pub aggregate_type: Option<String>,
    pub event_type: String,
    pub event_version: i32,
    pub payload: Vec<u8>,
    pub headers: Option<serde_json::Value>,
    pub content_type: Option<String>,
    pub traceparent: Option<String>,
    pub correlation_id: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
}

/// Why an event cannot be enqueued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("topic {topic:?}: {reason}")]
    Topic { topic: String, reason: TopicError },
    #[error("field {0}: must not be empty")]
    Empty(&'static str),
    #[error("serialising the payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("outbox name: {0}")]
    Name(String),
    #[error("enqueue: {0}")]
    Sql(#[from] sqlx::Error),
}

impl NewEvent {
    /// An event with raw payload bytes.
    pub fn new(
        topic: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        NewEvent {
            event_id: Uuid::now_v7(),
            topic: topic.into(),
            aggregate_id: aggregate_id.into(),
            aggregate_type: None,
            event_type: event_type.into(),
            event_version: 1,
            payload: payload.into(),
            headers: None,
            content_type: None,
            traceparent: None,
            correlation_id: None,
            occurred_at: None,
        }
    }

    /// An event whose payload is `value` as JSON (content type application/json).
    pub fn json(
        topic: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        value: &impl serde::Serialize,
    ) -> Result<Self, EnqueueError> {
        let mut e = NewEvent::new(topic, aggregate_id, event_type, serde_json::to_vec(value)?);
        e.content_type = Some("application/json".into());
        Ok(e)
    }

    fn check(&self) -> Result<(), EnqueueError> {
        validate_topic(&self.topic).map_err(|reason| EnqueueError::Topic {
            topic: self.topic.clone(),
            reason,
        })?;
        if self.aggregate_id.is_empty() {
            return Err(EnqueueError::Empty("aggregate_id"));
        }
        if self.event_type.is_empty() {
            return Err(EnqueueError::Empty("event_type"));
        }
        Ok(())
    }
}

/// A handle on one outbox table for producers.
#[derive(Debug, Clone)]
pub struct Outbox {
    names: Names,
    insert: String,
}

impl Outbox {
    pub fn new(schema: &str, table: &str) -> Result<Self, EnqueueError> {
        validate_identifier("schema", schema, 63).map_err(|e| EnqueueError::Name(e.to_string()))?;
        validate_identifier("table", table, 40).map_err(|e| EnqueueError::Name(e.to_string()))?;
        let names = Names::new(schema, table);
        // unnest keeps the arrays' order, and identity values are drawn in that order, so a
        // batch's events get ids (their publishing order) in the order given.
        let insert = format!(
            "INSERT INTO {} (event_id, topic, aggregate_id, aggregate_type, event_type, \
               event_version, payload, headers, content_type, traceparent, correlation_id, \
               occurred_at) \
             SELECT e, t, a, at, et, v, p, h, ct, tp, c, coalesce(o, now()) \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                         $6::int[], $7::bytea[], $8::jsonb[], $9::text[], $10::text[], \
                         $11::text[], $12::timestamptz[]) \
                  AS u(e, t, a, at, et, v, p, h, ct, tp, c, o)",
            names.qualified()
        );
        Ok(Outbox { names, insert })
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Writes the events, in order, inside the caller's transaction. Nothing is visible to the
    /// relay until that transaction commits.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[NewEvent],
    ) -> Result<(), EnqueueError> {
        self.enqueue_on(tx, events).await
    }

    /// As [`Outbox::enqueue`], on any connection (its own transaction if not in one).
    pub async fn enqueue_on(
        &self,
        conn: &mut PgConnection,
        events: &[NewEvent],
    ) -> Result<(), EnqueueError> {
        if events.is_empty() {
            return Ok(());
        }
        for e in events {
            e.check()?;
        }
        let col = |f: fn(&NewEvent) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
        sqlx::query(&self.insert)
            .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.topic.clone()).collect::<Vec<_>>())
            .bind(
                events
                    .iter()
                    .map(|e| e.aggregate_id.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(col(|e| e.aggregate_type.clone()))
            .bind(
                events
                    .iter()
                    .map(|e| e.event_type.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(events.iter().map(|e| e.event_version).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.headers.clone()).collect::<Vec<_>>())
            .bind(col(|e| e.content_type.clone()))
            .bind(col(|e| e.traceparent.clone()))
            .bind(col(|e| e.correlation_id.clone()))
            .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
            .execute(conn)
            .await?;
        Ok(())
    }
}
