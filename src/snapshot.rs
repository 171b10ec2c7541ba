//! What a running relay shows of itself, below both the relay (which writes it) and the HTTP
//! server and heartbeat (which read it): the running totals ([`Stats`]) and the last
//! observations of its housekeeping ([`Observed`]: probes and backlog counts). Reading either
//! never touches the database or a broker.

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::RwLock;

/// Running totals, readable while the relay runs.
#[derive(Debug, Default)]
pub struct Stats {
    pub claims: AtomicU64,
    pub claimed: AtomicU64,
    pub published: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub deferred: AtomicU64,
    pub released: AtomicU64,
    pub lost_claims: AtomicU64,
    /// Claimed and not yet recorded, now: handed to a backend and unanswered, or waiting
    /// behind an earlier event of their aggregate.
    pub in_flight: AtomicU64,
    /// Partitions this relay may claim from, now.
    pub owned_partitions: AtomicU64,
    /// Relays working on the outbox at the last look (this one included).
    pub members: AtomicU64,
    /// Changes of this relay's share of the partitions.
    pub rebalances: AtomicU64,
}

impl Stats {
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

/// One component's state as last probed.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentState {
    pub name: String,
    pub kind: String,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub reconnects: u64,
}

/// The backlog as last counted.
#[derive(Debug, Clone, Serialize)]
pub struct BacklogView {
    pub pending: i64,
    pub due: i64,
    pub failed: i64,
    pub oldest_pending_age_seconds: f64,
    pub oldest_pending_at: Option<DateTime<Utc>>,
    pub counted_at: DateTime<Utc>,
    /// "ok", "warning" or "critical", per threshold kind.
    pub pending_state: &'static str,
    pub age_state: &'static str,
}

/// What `/health` and `/readyz` report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// False until the first probe of every component is done.
    pub probed: bool,
    pub database: Option<ComponentState>,
    pub backends: Vec<ComponentState>,
    pub backlog: Option<BacklogView>,
}

/// Shared between the relay, its housekeeping and the HTTP server.
#[derive(Debug, Default)]
pub struct Observed {
    snapshot: RwLock<Snapshot>,
    /// Milliseconds since the epoch of the last batch with a published event; 0: none yet.
    last_publish_ms: AtomicI64,
}

impl Observed {
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.snapshot.write().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn published_now(&self) {
        self.last_publish_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub fn last_publish(&self) -> Option<DateTime<Utc>> {
        match self.last_publish_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// Ready: Postgres and every backend answered their last probe.
    pub fn ready(&self) -> Result<(), String> {
        self.snapshot().ready()
    }
}

impl Snapshot {
    /// Ready: Postgres and every backend answered their last probe.
    pub fn ready(&self) -> Result<(), String> {
        if !self.probed {
            return Err("not probed yet".into());
        }
        let down: Vec<String> = self
            .database
            .iter()
            .chain(&self.backends)
            .filter(|c| !c.up)
            .map(|c| {
                format!(
                    "{} ({}) down: {}",
                    c.name,
                    c.kind,
                    c.error.as_deref().unwrap_or("no answer")
                )
            })
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(down.join("; "))
        }
    }
}
