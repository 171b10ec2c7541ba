//! The relay's housekeeping, beside the pipeline: one service per file, as river's maintenance
//! services are.
//!
//! - [`probes`]: Postgres and every backend answering (readiness, connection gauges);
//! - [`backlog`]: the backlog in figures and its thresholds, and rows that would never come due;
//! - [`heartbeat`]: this relay's row in the heartbeat table (`outbox-relay status`);
//! - [`pruning`]: published rows kept for `relay.published_retention`, deleted past it.
//!
//! Everything here runs on a task of its own (the probes and the chores as two loops joined on
//! it) and only reads what the loop publishes through
//! atomics, so neither a slow probe nor a slow count ever holds up claims. The probes have a
//! loop of their own: the counts, the heartbeat and pruning query a database that may be away,
//! each waiting up to the pool's acquire timeout, and readiness must turn within a probe
//! interval of an outage, not after a run of such waits. What they see goes into the
//! [`Observed`] snapshot the HTTP server reads.

mod backlog;
mod heartbeat;
mod probes;
mod pruning;

pub(crate) use heartbeat::heartbeat_row;

use crate::config::{MonitorConfig, RelayConfig};
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::snapshot::{Observed, Stats};
use crate::store::{Heartbeat, Store};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What the services read and write.
pub(crate) struct Housekeeping {
    pub store: Arc<Store>,
    pub backends: Vec<(String, Arc<dyn Publisher>)>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    pub observed: Arc<Observed>,
    pub cfg: MonitorConfig,
    pub relay: RelayConfig,
    pub heartbeat: Heartbeat,
}

impl Housekeeping {
    /// Runs until `stop`; then removes this relay's heartbeat row.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut probes = probes::Probes {
            store: &self.store,
            backends: &self.backends,
            metrics: &self.metrics,
            observed: &self.observed,
            every: self.cfg.health_interval.0,
        };
        let mut backlog = backlog::BacklogWatch::new(
            &self.store,
            &self.metrics,
            &self.observed,
            &self.cfg,
            self.relay.prune_batch,
        );
        let mut heartbeat = heartbeat::HeartbeatRow {
            store: &self.store,
            stats: &self.stats,
            row: self.heartbeat.clone(),
        };
        let pruning = pruning::Pruning {
            store: &self.store,
            metrics: &self.metrics,
            retention: self.relay.published_retention.0,
            batch: self.relay.prune_batch,
        };
        tokio::join!(
            probes.run(&stop),
            self.chores(&stop, &mut backlog, &mut heartbeat, &pruning)
        );
        heartbeat.leave().await;
    }

    /// The backlog counts, the heartbeat row and pruning, one at a time on one task.
    async fn chores(
        &self,
        stop: &CancellationToken,
        backlog: &mut backlog::BacklogWatch<'_>,
        heartbeat: &mut heartbeat::HeartbeatRow<'_>,
        pruning: &pruning::Pruning<'_>,
    ) {
        let mut count = tokio::time::interval(self.cfg.backlog_interval.0);
        let mut beat = tokio::time::interval(heartbeat::EVERY);
        let mut prune = tokio::time::interval(self.relay.prune_interval.0);
        for t in [&mut count, &mut beat, &mut prune] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let keep = pruning.on();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = count.tick() => backlog.count_and_settle().await,
                _ = beat.tick() => heartbeat.beat().await,
                _ = prune.tick(), if keep => pruning.prune().await,
            }
        }
    }
}
