//! The backlog in figures (pending, due, failed, the oldest pending's age) at
//! `monitor.backlog_interval`: the gauges, the `/health` view, and the `monitor.*_warning` and
//! `*_critical` thresholds, logged once as they are crossed. On the same beat, rows whose
//! `next_attempt_at` would never come are settled (see `Store::settle_never_due`).

use crate::config::MonitorConfig;
use crate::metrics::{KindLabels, Metrics};
use crate::snapshot::{BacklogView, Observed};
use crate::store::{Backlog, Store};
use chrono::Utc;

pub(super) struct BacklogWatch<'a> {
    store: &'a Store,
    metrics: &'a Metrics,
    observed: &'a Observed,
    cfg: &'a MonitorConfig,
    /// Rows settled per look (`relay.prune_batch`).
    batch: u32,
    /// The levels last logged: (pending, age).
    levels: (i64, i64),
}

impl<'a> BacklogWatch<'a> {
    pub(super) fn new(
        store: &'a Store,
        metrics: &'a Metrics,
        observed: &'a Observed,
        cfg: &'a MonitorConfig,
        batch: u32,
    ) -> Self {
        BacklogWatch {
            store,
            metrics,
            observed,
            cfg,
            batch,
            levels: (0, 0),
        }
    }

    pub(super) async fn count_and_settle(&mut self) {
        self.count().await;
        self.settle_never_due().await;
    }

    async fn count(&mut self) {
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
        let c = self.cfg;
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
                &mut self.levels.0,
                format!("{} pending events", b.pending),
                c.pending_warning.to_string(),
                c.pending_critical.to_string(),
            ),
            (
                "age",
                aged,
                &mut self.levels.1,
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

    async fn settle_never_due(&self) {
        match self.store.settle_never_due(self.batch).await {
            Ok((0, 0)) => {}
            Ok((failed, due)) => tracing::warn!(
                failed,
                made_due = due,
                "rows with a next_attempt_at that never comes: the first of each aggregate failed naming it"
            ),
            Err(e) => tracing::warn!(error = %e, "could not look for rows that are never due"),
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
