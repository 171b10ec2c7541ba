//! `[relay]`: claiming, publishing, retrying, ordering and partition ownership.

use super::value::{in_range, invalid, non_zero, ConfigError, Dur};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub batch_size: u32,
    pub pipeline_depth: u32,
    pub max_attempts: u32,
    pub backoff_initial: Dur,
    pub backoff_max: Dur,
    pub poll_interval: Dur,
    pub listen: bool,
    pub debounce: Dur,
    pub publish_timeout: Dur,
    pub shutdown_timeout: Dur,
    pub blocked_retry: Dur,
    pub max_payload_bytes: usize,
    /// A claim returns rows while their payloads and headers fit in this many bytes (at least
    /// one row), so large payloads cannot exhaust memory.
    pub batch_max_bytes: usize,
    pub summary_interval: Dur,
    pub instance_id: Option<String>,
    /// Published rows are deleted at once (0) or kept this long, then pruned in batches.
    pub published_retention: Dur,
    pub prune_interval: Dur,
    pub prune_batch: u32,
    /// How events of one aggregate may overlap on the way to the broker.
    pub ordering: OrderingMode,
    /// Pipelined ordering: events of one aggregate in flight at once, at most.
    pub aggregate_window: u32,
    /// How often a relay looks at the other relays and takes or gives up partitions.
    pub rebalance_interval: Dur,
}

/// How events of one aggregate may overlap on the way to the broker (`relay.ordering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OrderingMode {
    /// Up to `relay.aggregate_window` events of an aggregate in flight at once, on backends
    /// that keep the order of what is sent on one connection; if one fails after later ones
    /// were sent, those later ones may reach consumers before its redelivery.
    Pipelined,
    /// One event of an aggregate in flight at a time: a consumer never sees event n+1 before
    /// the first delivery of event n.
    #[default]
    Strict,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 1000,
            pipeline_depth: 4,
            max_attempts: 10,
            backoff_initial: Dur::ms(500),
            backoff_max: Dur::secs(300),
            poll_interval: Dur::secs(1),
            listen: true,
            debounce: Dur::ms(0),
            publish_timeout: Dur::secs(30),
            shutdown_timeout: Dur::secs(10),
            blocked_retry: Dur::ms(50),
            max_payload_bytes: 1024 * 1024,
            batch_max_bytes: 8 * 1024 * 1024,
            summary_interval: Dur::secs(10),
            instance_id: None,
            published_retention: Dur::secs(0),
            prune_interval: Dur::secs(10),
            prune_batch: 10_000,
            ordering: OrderingMode::Strict,
            aggregate_window: 256,
            rebalance_interval: Dur::secs(1),
        }
    }
}

impl RelayConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        in_range("relay.batch_size", self.batch_size as u64, 1, 50_000)?;
        in_range("relay.pipeline_depth", self.pipeline_depth as u64, 1, 64)?;
        in_range(
            "relay.aggregate_window",
            self.aggregate_window as u64,
            1,
            10_000,
        )?;
        if self.rebalance_interval.0 < Duration::from_millis(10)
            || self.rebalance_interval.0 > Duration::from_secs(60)
        {
            return Err(invalid(
                "relay.rebalance_interval",
                format!(
                    "{:?} is out of range: 10ms to 60s",
                    self.rebalance_interval.0
                ),
            ));
        }
        in_range("relay.max_attempts", self.max_attempts as u64, 1, 1_000_000)?;
        in_range(
            "relay.max_payload_bytes",
            self.max_payload_bytes as u64,
            1,
            1 << 30,
        )?;
        in_range(
            "relay.batch_max_bytes",
            self.batch_max_bytes as u64,
            1024,
            1 << 32,
        )?;
        if self.backoff_initial.0.is_zero() {
            return Err(invalid("relay.backoff_initial", "must be more than 0"));
        }
        if self.backoff_max < self.backoff_initial {
            return Err(invalid(
                "relay.backoff_max",
                format!(
                    "{:?} is less than relay.backoff_initial ({:?})",
                    self.backoff_max.0, self.backoff_initial.0
                ),
            ));
        }
        non_zero(&[
            ("relay.poll_interval", self.poll_interval),
            ("relay.publish_timeout", self.publish_timeout),
            ("relay.summary_interval", self.summary_interval),
            ("relay.blocked_retry", self.blocked_retry),
            ("relay.prune_interval", self.prune_interval),
        ])?;
        in_range("relay.prune_batch", self.prune_batch as u64, 1, 1_000_000)?;
        if let Some(id) = &self.instance_id {
            if id.is_empty() || id.len() > 40 || !id.chars().all(|c| c.is_ascii_graphic()) {
                return Err(invalid(
                    "relay.instance_id",
                    format!("{id:?} is not allowed: 1 to 40 printable ASCII characters"),
                ));
            }
        }
        Ok(())
    }
}
