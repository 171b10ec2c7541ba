//! What the relay counts: each written claim added to the running totals ([`Stats`], kept in
//! [`crate::snapshot`] for the heartbeat, `/health` and tests) and to the Prometheus metrics,
//! each acknowledgement's latencies, and the periodic summary line.

use super::dispatch::{Tally, TopicTally};
use super::ownership::Assignment;
use super::Relay;
use crate::otel::Tracer;
use crate::publisher::AckResult;
use crate::snapshot::Stats;
use crate::store::Store;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Stats {
    pub(super) fn add(&self, t: &Tally) {
        self.published.fetch_add(t.published, Ordering::Relaxed);
        self.failed.fetch_add(t.failed, Ordering::Relaxed);
        self.retried.fetch_add(t.retried, Ordering::Relaxed);
        self.deferred.fetch_add(t.deferred, Ordering::Relaxed);
        self.released.fetch_add(t.released, Ordering::Relaxed);
    }
}

impl Relay {
    /// Adds a committed batch to the counters.
    pub(super) fn record(&self, tally: &Tally, by_topic: &[TopicTally]) {
        self.stats.add(tally);
        if tally.published > 0 {
            self.observed.published_now();
        }
        for t in by_topic {
            let backend = t
                .backend
                .and_then(|b| self.backends.get(b))
                .map(|b| b.name.as_str())
                .unwrap_or("none");
            let labels = self.metrics.topic_labels(&t.topic, backend);
            if t.published > 0 {
                self.metrics
                    .published
                    .get_or_create(&labels)
                    .inc_by(t.published);
            }
            if t.failed > 0 {
                self.metrics.failed.get_or_create(&labels).inc_by(t.failed);
            }
            if t.retried > 0 {
                self.metrics
                    .retried
                    .get_or_create(&labels)
                    .inc_by(t.retried);
            }
        }
    }

    /// Shows a new share of the partitions in the stats (heartbeat, `/health`) and metrics.
    pub(super) fn note_assignment(&self, a: &Assignment) {
        let s = &self.stats;
        s.owned_partitions
            .store(a.owned() as u64, Ordering::Relaxed);
        s.members.store(a.members as u64, Ordering::Relaxed);
        let before = s.rebalances.swap(a.rebalances, Ordering::Relaxed);
        self.metrics.owned_partitions.set(a.owned() as i64);
        self.metrics.relays.set(a.members as i64);
        self.metrics
            .rebalances
            .inc_by(a.rebalances.saturating_sub(before));
    }

    /// Observes one acknowledgement's latencies.
    pub(super) fn observe(&self, ack: &AckResult) {
        if self.tracer.is_on() {
            if let Some(span) = self.book().events.remove(&(ack.row_id, ack.token)) {
                Tracer::end_publish(
                    span,
                    ack.outcome
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| e.reason.as_str()),
                );
            }
        }
        if ack.outcome.is_err() {
            return;
        }
        if let Some((publish, end_to_end)) = self.latency.get(ack.backend) {
            publish.observe(ack.publish_latency().as_secs_f64());
            if let Some(at) = ack.occurred_at {
                let ms = (ack.at - at).num_microseconds().unwrap_or(i64::MAX).max(0);
                end_to_end.observe(ms as f64 / 1e6);
            }
        }
    }
}

/// The periodic summary line.
pub(super) struct Summary {
    every: Duration,
    last: Instant,
    window: Tally,
    lat_sum: Duration,
    lat_n: u64,
    lat_max: Duration,
}

impl Summary {
    pub(super) fn new(every: Duration) -> Self {
        Summary {
            every,
            last: Instant::now(),
            window: Tally::default(),
            lat_sum: Duration::ZERO,
            lat_n: 0,
            lat_max: Duration::ZERO,
        }
    }

    pub(super) fn add(&mut self, t: &Tally) {
        self.window.published += t.published;
        self.window.failed += t.failed;
        self.window.retried += t.retried;
        self.window.deferred += t.deferred;
    }

    pub(super) fn latency(&mut self, d: Duration) {
        self.lat_sum += d;
        self.lat_n += 1;
        self.lat_max = self.lat_max.max(d);
    }

    pub(super) fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }

    pub(super) fn log(&mut self, store: &Arc<Store>, in_flight: usize, partitions: usize) {
        let secs = self.last.elapsed().as_secs_f64();
        let w = std::mem::take(&mut self.window);
        let avg = if self.lat_n > 0 {
            self.lat_sum.div_f64(self.lat_n as f64)
        } else {
            Duration::ZERO
        };
        let max = self.lat_max;
        self.lat_sum = Duration::ZERO;
        self.lat_n = 0;
        self.lat_max = Duration::ZERO;
        self.last = Instant::now();
        let store = store.clone();
        // Counting may take a moment on a big backlog; never in the loop's way.
        tokio::spawn(async move {
            const CAP: i64 = 1_000_000;
            let pending = match store.count_pending(CAP).await {
                Ok(n) if n >= CAP => format!("{CAP}+"),
                Ok(n) => n.to_string(),
                Err(_) => "unknown".into(),
            };
            tracing::info!(
                published = w.published,
                failed = w.failed,
                retried = w.retried,
                deferred = w.deferred,
                rate = format!("{:.0}/s", w.published as f64 / secs),
                pending = %pending,
                in_flight,
                partitions,
                ack_latency_avg = ?avg,
                ack_latency_max = ?max,
                "summary"
            );
        });
    }

    pub(super) fn log_final(&self, s: &Stats) {
        tracing::info!(
            published = s.published.load(Ordering::Relaxed),
            failed = s.failed.load(Ordering::Relaxed),
            retried = s.retried.load(Ordering::Relaxed),
            released = s.released.load(Ordering::Relaxed),
            "relay stopped"
        );
    }
}
