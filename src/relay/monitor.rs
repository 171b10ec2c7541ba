//! The relay's view of itself, kept current beside the pipeline: probes of Postgres and every
//! backend, the backlog in figures, the backlog thresholds, this relay's heartbeat row, and the
//! pruning of kept published rows.
//!
//! Everything here runs on its own task at its own interval and only ever reads what the loop
//! publishes through atomics, so neither a slow probe nor a slow count ever holds up claims;
//! the probes have a loop of their own, so no slow count holds them up either.
//! HTTP handlers and the metrics read the [`Observed`] snapshot; a request never queries the
//! database or a broker.

use super::Stats;
use crate::config::{MonitorConfig, RelayConfig};
use crate::metrics::{BackendLabels, KindLabels, Metrics};
use crate::publisher::Health;
use crate::store::ops::HEARTBEAT_EVERY;
use crate::store::{Backlog, Heartbeat, Store};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

/// Shared between the relay, its monitor and the HTTP server.
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

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
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

/// A threshold pair's level: 0 ok, 1 warning, 2 critical.
fn level(value: f64, warning: f64, critical: f64) -> i64 {
    if critical > 0.0 && value >= critical {
        2
    } else if warning > 0.0 && value >= warning {
        1
    } else {
        0
    }
}

fn level_name(l: i64) -> &'static str {
    match l {
        0 => "ok",
        1 => "warning",
        _ => "critical",
    }
}

pub(crate) struct Monitor {
    pub store: Arc<Store>,
    pub backends: Vec<(String, Arc<dyn crate::publisher::Publisher>)>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    pub observed: Arc<Observed>,
    pub cfg: MonitorConfig,
    pub relay: RelayConfig,
    pub heartbeat: Heartbeat,
}

/// This process's heartbeat row, before any counts.
pub(crate) fn heartbeat(instance: String) -> Heartbeat {
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

impl Monitor {
    /// Runs until `stop`; then removes this relay's heartbeat row.
    ///
    /// The probes run in a loop of their own: the counts, the heartbeat and pruning query a
    /// database that may be away, each waiting up to the pool's acquire timeout, and readiness
    /// must turn within a probe interval of an outage, not after a run of such waits.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let heartbeat = self.heartbeat.clone();
        tokio::join!(self.probes(&stop), self.chores(&stop, heartbeat));
        if let Err(e) = self.store.leave(&self.heartbeat.instance).await {
            tracing::debug!(error = %e, "could not remove the relay's heartbeat row");
        }
    }

    async fn probes(&self, stop: &CancellationToken) {
        let mut health = tokio::time::interval(self.cfg.health_interval.0);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconnects_seen = vec![0u64; self.backends.len()];
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = health.tick() => self.probe(&mut reconnects_seen).await,
            }
        }
    }

    /// The backlog counts and thresholds, the heartbeat row and pruning.
    async fn chores(&self, stop: &CancellationToken, mut heartbeat: Heartbeat) {
        let mut backlog = tokio::time::interval(self.cfg.backlog_interval.0);
        let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
        let mut prune = tokio::time::interval(self.relay.prune_interval.0);
        for t in [&mut backlog, &mut beat, &mut prune] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut levels = (0i64, 0i64);
        let keep = !self.relay.published_retention.0.is_zero();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = backlog.tick() => {
                    self.count(&mut levels).await;
                    self.settle_never_due().await;
                }
                _ = beat.tick() => self.beat(&mut heartbeat).await,
                _ = prune.tick(), if keep => self.prune().await,
            }
        }
    }

    async fn probe(&self, reconnects_seen: &mut [u64]) {
        let limit = self.cfg.health_interval.0.max(Duration::from_secs(1));
        let db = match tokio::time::timeout(limit, self.store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {limit:?}")),
        };
        self.metrics.database_up.set(db.is_none() as i64);
        let mut backends = Vec::with_capacity(self.backends.len());
        for (i, (name, p)) in self.backends.iter().enumerate() {
            let h = match tokio::time::timeout(limit, p.health()).await {
                Ok(h) => h,
                Err(_) => Health::Down(format!("no answer within {limit:?}")),
            };
            let labels = BackendLabels {
                backend: name.clone(),
            };
            self.metrics
                .backend_up
                .get_or_create(&labels)
                .set((h == Health::Up) as i64);
            let total = p.reconnects();
            if total > reconnects_seen[i] {
                self.metrics
                    .backend_reconnects
                    .get_or_create(&labels)
                    .inc_by(total - reconnects_seen[i]);
                reconnects_seen[i] = total;
            }
            backends.push(ComponentState {
                name: name.clone(),
                kind: p.kind().to_string(),
                up: h == Health::Up,
                error: match h {
                    Health::Up => None,
                    Health::Down(why) => Some(why),
                },
                reconnects: total,
            });
        }
        self.observed.update(|s| {
            s.probed = true;
            s.database = Some(ComponentState {
                name: "postgres".into(),
                kind: "postgres".into(),
                up: db.is_none(),
                error: db,
                reconnects: 0,
            });
            s.backends = backends;
        });
    }

    async fn count(&self, levels: &mut (i64, i64)) {
        let b: Backlog = match self.store.backlog().await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "could not count the backlog");
                return;
            }
        };
        let now = Utc::now();
        let age = b
            .oldest_pending
            .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        let m = &self.metrics;
        m.pending.set(b.pending);
        m.pending_due.set(b.due);
        m.failed_events.set(b.failed);
        m.oldest_pending_age.set(age);
        let c = &self.cfg;
        let pending = level(
            b.pending as f64,
            c.pending_warning as f64,
            c.pending_critical as f64,
        );
        let aged = level(
            age,
            c.age_warning.0.as_secs_f64(),
            c.age_critical.0.as_secs_f64(),
        );
        for (kind, now_level, was, value, warn, crit) in [
            (
                "pending",
                pending,
                &mut levels.0,
                format!("{} pending events", b.pending),
                c.pending_warning.to_string(),
                c.pending_critical.to_string(),
            ),
            (
                "age",
                aged,
                &mut levels.1,
                format!("oldest pending event {age:.1}s old"),
                format!("{:?}", c.age_warning.0),
                format!("{:?}", c.age_critical.0),
            ),
        ] {
            m.backlog_state
                .get_or_create(&KindLabels { kind: kind.into() })
                .set(now_level);
            if now_level != *was {
                match now_level {
                    0 => tracing::info!(kind, %value, "backlog back under its thresholds"),
                    1 => {
                        tracing::warn!(kind, %value, threshold = %warn, "backlog past its warning threshold")
                    }
                    _ => {
                        tracing::error!(kind, %value, threshold = %crit, "backlog past its critical threshold")
                    }
                }
                *was = now_level;
            }
        }
        self.observed.update(|s| {
            s.backlog = Some(BacklogView {
                pending: b.pending,
                due: b.due,
                failed: b.failed,
                oldest_pending_age_seconds: age,
                oldest_pending_at: b.oldest_pending,
                counted_at: now,
                pending_state: level_name(pending),
                age_state: level_name(aged),
            })
        });
    }

    async fn beat(&self, heartbeat: &mut Heartbeat) {
        let s = &self.stats;
        heartbeat.in_flight = s.in_flight.load(Ordering::Relaxed) as i32;
        heartbeat.published = s.published.load(Ordering::Relaxed) as i64;
        heartbeat.failed = s.failed.load(Ordering::Relaxed) as i64;
        heartbeat.partitions = s.owned_partitions.load(Ordering::Relaxed) as i32;
        if let Err(e) = self.store.heartbeat(heartbeat).await {
            tracing::debug!(error = %e, "could not write the relay's heartbeat");
        }
    }

    async fn settle_never_due(&self) {
        match self.store.settle_never_due(self.relay.prune_batch).await {
            Ok((0, 0)) => {}
            Ok((failed, due)) => tracing::warn!(
                failed,
                made_due = due,
                "rows with a next_attempt_at that never comes: the first of each aggregate failed naming it"
            ),
            Err(e) => tracing::warn!(error = %e, "could not look for rows that are never due"),
        }
    }

    async fn prune(&self) {
        match self
            .store
            .prune_published(self.relay.published_retention.0, self.relay.prune_batch)
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.pruned.inc_by(n);
                tracing::debug!(rows = n, "pruned published rows past their retention");
            }
            Err(e) => tracing::warn!(error = %e, "could not prune published rows"),
        }
    }
}
