//! This relay's row in the heartbeat table, written every [`EVERY`] with its running totals
//! (`outbox-relay status` lists the relays by it) and removed on the way out.

use crate::snapshot::Stats;
use crate::store::{Heartbeat, Store};
use chrono::Utc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(super) const EVERY: Duration = crate::store::ops::HEARTBEAT_EVERY;

/// This process's heartbeat row, before any counts.
pub(crate) fn heartbeat_row(instance: String) -> Heartbeat {
    Heartbeat {
        instance,
        host: std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into()),
        pid: std::process::id() as i32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: Utc::now(),
        in_flight: 0,
        partitions: 0,
        published: 0,
        failed: 0,
    }
}

pub(super) struct HeartbeatRow<'a> {
    pub store: &'a Store,
    pub stats: &'a Stats,
    pub row: Heartbeat,
}

impl HeartbeatRow<'_> {
    pub(super) async fn beat(&mut self) {
        let s = &self.stats;
        self.row.in_flight = s.in_flight.load(Ordering::Relaxed) as i32;
        self.row.published = s.published.load(Ordering::Relaxed) as i64;
        self.row.failed = s.failed.load(Ordering::Relaxed) as i64;
        self.row.partitions = s.owned_partitions.load(Ordering::Relaxed) as i32;
        if let Err(e) = self.store.heartbeat(&self.row).await {
            tracing::debug!(error = %e, "could not write the relay's heartbeat");
        }
    }

    pub(super) async fn leave(&self) {
        if let Err(e) = self.store.leave(&self.row.instance).await {
            tracing::debug!(error = %e, "could not remove the relay's heartbeat row");
        }
    }
}
