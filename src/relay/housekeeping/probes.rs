//! Probes of Postgres and every backend, at `monitor.health_interval`: readiness
//! (`/readyz`, `/health`), the up gauges and the backends' reconnect counters.

use crate::metrics::{BackendLabels, Metrics};
use crate::publisher::{Health, Publisher};
use crate::snapshot::{ComponentState, Observed};
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(super) struct Probes<'a> {
    pub store: &'a Store,
    pub backends: &'a [(String, Arc<dyn Publisher>)],
    pub metrics: &'a Metrics,
    pub observed: &'a Observed,
    pub every: Duration,
}

impl Probes<'_> {
    pub(super) async fn run(&mut self, stop: &CancellationToken) {
        let mut health = tokio::time::interval(self.every);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconnects_seen = vec![0u64; self.backends.len()];
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = health.tick() => self.probe(&mut reconnects_seen).await,
            }
        }
    }

    async fn probe(&self, reconnects_seen: &mut [u64]) {
        let limit = self.every.max(Duration::from_secs(1));
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
}
