//! Prometheus metrics, one naming scheme: `outbox_relay_<what>[_<unit>][_total]`.
//!
//! Counters are per topic and backend, added once per committed batch (what was written, not
//! what was attempted); latencies are observed per acknowledgement on the relay loop, a few
//! atomic adds each. Gauges about the backlog and the connections come from the relay's housekeeping
//! services (`relay/housekeeping/`), never from a query per scrape: a scrape costs no database work.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Distinct topics given their own series; the rest are counted under `topic="other"`, so a
/// producer writing unbounded topic names cannot blow up the scrape.
const MAX_TOPICS: usize = 1000;

fn latency_histogram() -> Histogram {
    // 0.25 ms to ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

type LatencyFamily = Family<BackendLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub published: Family<TopicLabels, Counter>,
    pub failed: Family<TopicLabels, Counter>,
    pub retried: Family<TopicLabels, Counter>,
    pub publish_latency: LatencyFamily,
    pub end_to_end_latency: LatencyFamily,
    pub claim_batch_size: Histogram,
    pub pending: Gauge,
    pub pending_due: Gauge,
    pub failed_events: Gauge,
    pub oldest_pending_age: Gauge<f64, AtomicU64>,
    pub in_flight: Gauge,
    pub database_up: Gauge,
    pub backend_up: Family<BackendLabels, Gauge>,
    pub backend_reconnects: Family<BackendLabels, Counter>,
    pub backlog_state: Family<KindLabels, Gauge>,
    pub pruned: Counter,
    pub lost_claims: Counter,
    pub owned_partitions: Gauge,
    pub relays: Gauge,
    pub rebalances: Counter,
    topics: Mutex<HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("outbox_relay");
        let m = Metrics {
            published: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            publish_latency: Family::new_with_constructor(latency_histogram),
            end_to_end_latency: Family::new_with_constructor(latency_histogram),
            claim_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 17)),
            pending: Gauge::default(),
            pending_due: Gauge::default(),
            failed_events: Gauge::default(),
            oldest_pending_age: Gauge::default(),
            in_flight: Gauge::default(),
            database_up: Gauge::default(),
            backend_up: Family::default(),
            backend_reconnects: Family::default(),
            backlog_state: Family::default(),
            pruned: Counter::default(),
            lost_claims: Counter::default(),
            owned_partitions: Gauge::default(),
            relays: Gauge::default(),
            rebalances: Counter::default(),
            topics: Mutex::new(HashSet::new()),
            registry: Registry::default(),
        };
        m.register_events(&mut registry);
        m.register_backlog(&mut registry);
        m.register_connections(&mut registry);
        m.register_states(&mut registry);
        Metrics { registry, ..m }
    }

    /// Per event: what was published, failed or retried, how long it took, claim sizes.
    fn register_events(&self, registry: &mut Registry) {
        registry.register(
            "events_published",
            "Events published and recorded, per topic and backend",
            self.published.clone(),
        );
        registry.register(
            "events_failed",
            "Events marked failed (permanent error, invalid, or out of attempts)",
            self.failed.clone(),
        );
        registry.register(
            "events_retried",
            "Publish attempts that failed and were scheduled again",
            self.retried.clone(),
        );
        registry.register(
            "publish_latency_seconds",
            "Hand-off to the backend until its acknowledgement",
            self.publish_latency.clone(),
        );
        registry.register(
            "end_to_end_latency_seconds",
            "The row's occurred_at until the backend's acknowledgement",
            self.end_to_end_latency.clone(),
        );
        registry.register(
            "claim_batch_size",
            "Rows per claim that found any",
            self.claim_batch_size.clone(),
        );
    }

    /// The backlog as last counted.
    fn register_backlog(&self, registry: &mut Registry) {
        registry.register(
            "pending_events",
            "Pending rows (due, waiting for a retry, or held behind a failed event)",
            self.pending.clone(),
        );
        registry.register(
            "pending_due_events",
            "Pending rows due now",
            self.pending_due.clone(),
        );
        registry.register(
            "failed_events",
            "Rows marked failed, waiting for replay or purge",
            self.failed_events.clone(),
        );
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest pending event (0 when none)",
            self.oldest_pending_age.clone(),
        );
    }

    /// What is in flight, and whether Postgres and each backend answer.
    fn register_connections(&self, registry: &mut Registry) {
        registry.register(
            "in_flight_events",
            "Events claimed by this relay and not yet recorded: handed to a backend and unanswered, or waiting behind an earlier event of their aggregate",
            self.in_flight.clone(),
        );
        registry.register(
            "database_up",
            "1 when the last probe of Postgres succeeded",
            self.database_up.clone(),
        );
        registry.register(
            "backend_up",
            "1 when the last probe of the backend's broker succeeded",
            self.backend_up.clone(),
        );
        registry.register(
            "backend_reconnects",
            "Reconnections (NATS) or producer replacements (Kafka) since start",
            self.backend_reconnects.clone(),
        );
    }

    /// Threshold states, pruning, lost claims, and the share of partitions among relays.
    fn register_states(&self, registry: &mut Registry) {
        registry.register(
            "backlog_state",
            "Backlog thresholds: 0 ok, 1 warning, 2 critical, per kind (pending, age)",
            self.backlog_state.clone(),
        );
        registry.register(
            "pruned_events",
            "Kept published rows deleted after their retention",
            self.pruned.clone(),
        );
        registry.register(
            "lost_claims",
            "Batches whose results could not be recorded (their rows are published again)",
            self.lost_claims.clone(),
        );
        registry.register(
            "owned_partitions",
            "Partitions (of 256) this relay claims from now",
            self.owned_partitions.clone(),
        );
        registry.register(
            "relays",
            "Relays working on the outbox at this relay's last look, itself included",
            self.relays.clone(),
        );
        registry.register(
            "rebalances",
            "Changes of this relay's share of the partitions",
            self.rebalances.clone(),
        );
    }

    /// The label set for a topic, folding topics past [`MAX_TOPICS`] into "other".
    pub fn topic_labels(&self, topic: &str, backend: &str) -> TopicLabels {
        let mut known = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let topic = if known.contains(topic) {
            topic.to_string()
        } else if known.len() < MAX_TOPICS {
            known.insert(topic.to_string());
            topic.to_string()
        } else {
            "other".to_string()
        };
        TopicLabels {
            topic,
            backend: backend.to_string(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
