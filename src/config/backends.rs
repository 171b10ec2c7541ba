//! `[backends.NAME]`: each backend's settings, owned by the backend's own module.

use super::value::{invalid, ConfigError, Dur};
use crate::publisher::kafka::KafkaConfig;
use crate::publisher::nats::NatsConfig;
use crate::publisher::pulsar::PulsarConfig;
use serde::Deserialize;
use std::collections::BTreeMap;

/// One backend, by its `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// In-process; for tests and demos.
    Memory {},
    /// One JSON line per event on standard output.
    Stdout {},
    /// Kafka through librdkafka.
    Kafka(KafkaConfig),
    /// NATS: JetStream or core, per topic.
    Nats(NatsConfig),
    /// Apache Pulsar through pulsar-rs.
    Pulsar(PulsarConfig),
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Memory {} => "memory",
            BackendConfig::Stdout {} => "stdout",
            BackendConfig::Kafka(_) => "kafka",
            BackendConfig::Nats(_) => "nats",
            BackendConfig::Pulsar(_) => "pulsar",
        }
    }
}

/// Names are ASCII words (they appear in metrics and logs), and each backend checks its own
/// settings, naming `backends.NAME.key`.
pub(super) fn validate(
    backends: &BTreeMap<String, BackendConfig>,
    publish_timeout: Dur,
) -> Result<(), ConfigError> {
    for name in backends.keys() {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                format!("backends.{name}"),
                "backend names use ASCII letters, digits, '-' and '_'",
            ));
        }
    }
    for (name, b) in backends {
        let key = format!("backends.{name}");
        match b {
            BackendConfig::Kafka(k) => k.validate(&key, publish_timeout)?,
            BackendConfig::Nats(n) => n.validate(&key)?,
            BackendConfig::Pulsar(p) => p.validate(&key, publish_timeout)?,
            BackendConfig::Memory {} | BackendConfig::Stdout {} => {}
        }
    }
    Ok(())
}
