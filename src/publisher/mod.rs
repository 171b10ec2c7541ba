//! The publisher seam: how the relay hands events to a backend and hears back.
//!
//! # Contract
//!
//! * The relay calls [`Publisher::publish`] with a burst of [`Outgoing`] messages. The call
//!   returns once the backend has *taken* every message (queued it with its client, written it
//!   to its socket, ...); it must not wait for the broker's acknowledgement. It may wait for
//!   room (backpressure) but must never drop a message to make room.
//! * Each message carries an [`AckTicket`]. The backend resolves every ticket exactly once with
//!   the broker's verdict: [`AckTicket::ack`] for success, [`AckTicket::nack`] with a classified
//!   [`PublishError`] otherwise. A ticket dropped unresolved (a backend bug, or a backend shut
//!   down with messages inside) resolves itself as a retryable error, so the relay always gets
//!   exactly one result per message on the ACK channel.
//! * A burst is not atomic: each message succeeds or fails on its own. Messages are taken in the
//!   order given, within a burst and across calls. A backend whose [`Publisher::keeps_order`]
//!   is true must also deliver messages of one topic and key in that order (the relay then
//!   sends several events of one aggregate at once in pipelined mode); for any other backend
//!   the relay keeps at most one event per aggregate in flight.
//! * A success means the broker has the message durably as far as the backend is configured to
//!   know (Kafka acks=all, a JetStream PubAck, a flushed stdout). A JetStream PubAck flagged
//!   `duplicate` is a success: the server already has that event id.
//! * Implementations are `Send + Sync` and used from many tasks; `publish` may be called again
//!   before earlier results arrive.
//! * [`Publisher::close`] flushes what was taken, waiting at most the given time, and resolves
//!   every outstanding ticket before it returns.
//! * [`Publisher::health`] reports whether the backend can currently reach its broker, for
//!   `check` and readiness; it must not publish anything.
//! * [`Publisher::reconnects`] counts how often the backend had to re-establish its connection
//!   (or replace its client) since start, for the metrics; backends without one report 0.

pub mod kafka;
pub mod memory;
pub mod nats;
pub mod pulsar;
pub mod stdout;

use crate::envelope::{BodyFormat, Event};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Whether a failure may succeed on a later attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Timeouts, queue full, broker unavailable, leader changes: try again after a backoff.
    Retryable,
    /// Too large, not authorised, invalid topic, no route: retrying cannot help; mark failed.
    Permanent,
    /// The broker was not reached or never answered (not connected, all brokers down, a
    /// timeout with no answer, the client's queue full): nothing was learned about the event
    /// itself, so it waits for the broker and no attempt is counted. An outage of any length
    /// fails no event.
    Unavailable,
}

/// A classified publish failure with the backend's (or broker's) reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct PublishError {
    pub kind: ErrorKind,
    pub reason: String,
}

impl PublishError {
    pub fn retryable(reason: impl Into<String>) -> Self {
        PublishError {
            kind: ErrorKind::Retryable,
            reason: reason.into(),
        }
    }
    pub fn permanent(reason: impl Into<String>) -> Self {
        PublishError {
            kind: ErrorKind::Permanent,
            reason: reason.into(),
        }
    }
    /// The broker could not be asked: see [`ErrorKind::Unavailable`].
    pub fn unavailable(reason: impl Into<String>) -> Self {
        PublishError {
            kind: ErrorKind::Unavailable,
            reason: reason.into(),
        }
    }
    /// Whether a later attempt may succeed (retryable or unavailable).
    pub fn is_retryable(&self) -> bool {
        self.kind != ErrorKind::Permanent
    }
}

/// One result on the ACK channel.
#[derive(Debug, Clone)]
pub struct AckResult {
    /// The outbox row (its position).
    pub row_id: i64,
    /// Identifies the hand-off this result answers; results of an abandoned hand-off are ignored.
    pub token: u64,
    pub outcome: Result<(), PublishError>,
    /// When the backend decided (the one clock reading a result costs, on the client's thread).
    pub at: DateTime<Utc>,
    /// When the relay handed the message over (read once per burst of hand-offs).
    pub handed_at: DateTime<Utc>,
    /// The backend it was handed to (the relay's index) and the event's occurred_at, for the
    /// latency metrics; see [`AckTicket::with_origin`].
    pub backend: usize,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl AckResult {
    /// From the hand-off to the backend's decision (wall clock: never negative, whatever the
    /// clock did meanwhile).
    pub fn publish_latency(&self) -> Duration {
        (self.at - self.handed_at)
            .to_std()
            .unwrap_or(Duration::ZERO)
    }
}

/// The sending half of the ACK channel.
pub type AckSender = mpsc::UnboundedSender<AckResult>;

/// A promise to report exactly one result for one message.
#[derive(Debug)]
pub struct AckTicket {
    row_id: i64,
    token: u64,
    handed_at: DateTime<Utc>,
    backend: usize,
    occurred_at: Option<DateTime<Utc>>,
    tx: Option<AckSender>,
}

impl AckTicket {
    pub fn new(row_id: i64, token: u64, tx: AckSender) -> Self {
        Self::handed_at(row_id, token, tx, Utc::now())
    }

    /// As [`AckTicket::new`], handed over at `at`: the relay reads the clock once per burst.
    pub fn handed_at(row_id: i64, token: u64, tx: AckSender, at: DateTime<Utc>) -> Self {
        AckTicket {
            row_id,
            token,
            handed_at: at,
            backend: 0,
            occurred_at: None,
            tx: Some(tx),
        }
    }

    /// Records where the message went and when its event happened; the result carries both.
    pub fn with_origin(mut self, backend: usize, occurred_at: DateTime<Utc>) -> Self {
        self.backend = backend;
        self.occurred_at = Some(occurred_at);
        self
    }

    /// The broker has the message.
    pub fn ack(self) {
        self.resolve(Ok(()))
    }

    /// The broker (or the backend) refused or lost the message.
    pub fn nack(self, err: PublishError) {
        self.resolve(Err(err))
    }

    pub fn resolve(mut self, outcome: Result<(), PublishError>) {
        self.send(outcome);
    }

    fn send(&mut self, outcome: Result<(), PublishError>) {
        if let Some(tx) = self.tx.take() {
            // The relay may have stopped listening (shutdown); the row then stays pending and
            // is published again later, which is the at-least-once contract.
            let _ = tx.send(AckResult {
                row_id: self.row_id,
                token: self.token,
                outcome,
                at: Utc::now(),
                handed_at: self.handed_at,
                backend: self.backend,
                occurred_at: self.occurred_at,
            });
        }
    }
}

impl Drop for AckTicket {
    fn drop(&mut self) {
        self.send(Err(PublishError::retryable(
            "the backend dropped the message without a result",
        )));
    }
}

/// A message ready for the wire, with the ticket its result goes to.
#[derive(Debug)]
pub struct Outgoing {
    pub event: Arc<Event>,
    /// The body format the event's route asks for.
    pub format: BodyFormat,
    pub ticket: AckTicket,
}

impl Outgoing {
    /// Message key: the aggregate id (Kafka partition key).
    pub fn key(&self) -> &str {
        &self.event.aggregate_id
    }
    pub fn body(&self) -> Vec<u8> {
        self.event.body(self.format)
    }
}

/// A backend's view of its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Up,
    Down(String),
}

/// A backend that takes messages and reports each one's result on its ticket.
pub trait Publisher: Send + Sync + 'static {
    /// A short name for logs: the backend's kind.
    fn kind(&self) -> &'static str;

    /// Take every message of the burst; see the module contract.
    fn publish(&self, burst: Vec<Outgoing>) -> BoxFuture<'_, ()>;

    /// Can the backend reach its broker now?
    fn health(&self) -> BoxFuture<'_, Health>;

    /// Flush and resolve everything outstanding, waiting at most `timeout`.
    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()>;

    /// Reconnections (or client replacements) since start.
    fn reconnects(&self) -> u64 {
        0
    }

    /// Whether messages of one topic and key reach the broker in the order they were taken,
    /// including across the client's own retries (a Kafka partition under the idempotent
    /// producer; one NATS connection). Only then may the relay send several events of one
    /// aggregate before the first is acknowledged (`relay.ordering = "pipelined"`); otherwise
    /// it sends them one at a time.
    fn keeps_order(&self) -> bool {
        false
    }
}

/// What start-up provisioning (Kafka topics, JetStream streams) did or found, one line per
/// topic or stream and change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProvisionReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    /// Differences left in place (`validate_only`, or what the broker cannot change, such as
    /// fewer partitions).
    pub drift: Vec<String>,
}

impl ProvisionReport {
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(self.created.iter().map(|t| format!("created {t}")));
        out.extend(self.updated.iter().map(|t| format!("updated {t}")));
        out.extend(self.drift.iter().map(|t| format!("drift {t}")));
        out
    }
}
