//! A Kafka backend's per-topic settings (`[backends.<name>.topics."<pattern>"]`): presets,
//! partitions, replication, retention and the other topic configs provisioning applies, and
//! the rules of Kafka topic names.

use crate::config::value::{invalid, ConfigError, Dur};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Many partitions, lz4, one day of retention.
    High,
    /// Six partitions, snappy, three days.
    Medium,
    /// One partition, no compression, seven days.
    Low,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
    /// Keep whatever codec the producer used.
    Producer,
}

impl Compression {
    pub fn as_kafka(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Producer => "producer",
        }
    }
    /// The topic config key of the codec's level (KIP-390) and the levels allowed.
    pub fn level_key(self) -> Option<(&'static str, i32, i32)> {
        match self {
            Compression::Gzip => Some(("compression.gzip.level", 1, 9)),
            Compression::Lz4 => Some(("compression.lz4.level", 1, 17)),
            Compression::Zstd => Some(("compression.zstd.level", 1, 22)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupPolicy {
    Delete,
    Compact,
    CompactDelete,
}

impl CleanupPolicy {
    pub fn as_kafka(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
        }
    }
}

/// What to provision for a topic. Unset keys come from the preset, else the broker's defaults
/// (`num.partitions`, `default.replication.factor`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    pub preset: Option<Preset>,
    pub partitions: Option<i32>,
    pub replication_factor: Option<i32>,
    pub retention: Option<Dur>,
    /// -1 = unlimited.
    pub retention_bytes: Option<i64>,
    pub max_message_bytes: Option<i32>,
    pub cleanup_policy: Option<CleanupPolicy>,
    pub compression: Option<Compression>,
    pub compression_level: Option<i32>,
}

impl TopicSettings {
    /// The settings with the preset's values filled in where a key is unset.
    pub fn resolved(&self) -> TopicSettings {
        let (partitions, compression, retention) = match self.preset {
            Some(Preset::High) => (12, Compression::Lz4, Dur::secs(86_400)),
            Some(Preset::Medium) => (6, Compression::Snappy, Dur::secs(3 * 86_400)),
            Some(Preset::Low) => (1, Compression::None, Dur::secs(7 * 86_400)),
            None => return self.clone(),
        };
        TopicSettings {
            preset: self.preset,
            partitions: self.partitions.or(Some(partitions)),
            compression: self.compression.or(Some(compression)),
            retention: self.retention.or(Some(retention)),
            ..self.clone()
        }
    }

    /// Partitions to create the topic with; -1 asks for the broker's `num.partitions`
    /// (CreateTopics v4, Kafka 2.4 and later).
    pub fn partitions(&self) -> i32 {
        self.partitions.unwrap_or(-1)
    }

    /// Replication factor to create the topic with; -1 asks for the broker's
    /// `default.replication.factor`, so a cluster's durability policy applies unless a topic
    /// says otherwise (1 would leave a single copy on a cluster meant to keep three).
    pub fn replication_factor(&self) -> i32 {
        self.replication_factor.unwrap_or(-1)
    }

    /// The topic-level configs these settings ask for, as Kafka names and values.
    pub fn configs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(r) = self.retention {
            out.push(("retention.ms", r.0.as_millis().to_string()));
        }
        if let Some(b) = self.retention_bytes {
            out.push(("retention.bytes", b.to_string()));
        }
        if let Some(m) = self.max_message_bytes {
            out.push(("max.message.bytes", m.to_string()));
        }
        if let Some(c) = self.cleanup_policy {
            out.push(("cleanup.policy", c.as_kafka().to_string()));
        }
        if let Some(c) = self.compression {
            out.push(("compression.type", c.as_kafka().to_string()));
            if let (Some(level), Some((key, _, _))) = (self.compression_level, c.level_key()) {
                out.push((key, level.to_string()));
            }
        }
        out
    }

    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let s = self.resolved();
        if let Some(p) = s.partitions {
            if !(1..=100_000).contains(&p) {
                return Err(invalid(
                    format!("{key}.partitions"),
                    format!("{p} is not allowed, must be 1 to 100000"),
                ));
            }
        }
        if let Some(r) = s.replication_factor {
            if !(1..=32).contains(&r) {
                return Err(invalid(
                    format!("{key}.replication_factor"),
                    format!("{r} is not allowed, must be 1 to 32"),
                ));
            }
        }
        if let Some(r) = s.retention {
            if r.0.as_millis() == 0 {
                return Err(invalid(format!("{key}.retention"), "must be more than 0"));
            }
        }
        if let Some(b) = s.retention_bytes {
            if b < -1 || b == 0 {
                return Err(invalid(
                    format!("{key}.retention_bytes"),
                    format!("{b} is not allowed: -1 (unlimited) or more than 0"),
                ));
            }
        }
        if let Some(m) = s.max_message_bytes {
            if m < 1 {
                return Err(invalid(
                    format!("{key}.max_message_bytes"),
                    format!("{m} is not allowed, must be more than 0"),
                ));
            }
        }
        if let Some(level) = s.compression_level {
            match s.compression.and_then(|c| c.level_key().map(|k| (c, k))) {
                Some((c, (_, lo, hi))) if level < lo || level > hi => {
                    return Err(invalid(
                        format!("{key}.compression_level"),
                        format!(
                            "{level} is not allowed for {}, must be {lo} to {hi}",
                            c.as_kafka()
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    return Err(invalid(
                        format!("{key}.compression_level"),
                        format!(
                            "is set but compression is {}; levels apply to gzip (1 to 9), \
                             lz4 (1 to 17) and zstd (1 to 22)",
                            s.compression.map(|c| c.as_kafka()).unwrap_or("not set")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Kafka's own topic rules: 1 to 249 of `a-z A-Z 0-9 . _ -`, and not `.` or `..`.
pub fn validate_kafka_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic is empty".into());
    }
    if topic == "." || topic == ".." {
        return Err(format!("topic {topic:?} is not allowed by Kafka"));
    }
    for (i, ch) in topic.chars().enumerate() {
        if !(ch.is_ascii_alphanumeric() || ch == '.' || ch == '_' || ch == '-') {
            return Err(format!(
                "topic {topic:?}: character {ch:?} (U+{:04X}) at position {} is not allowed by \
                 Kafka; allowed are a-z, A-Z, 0-9, '.', '_' and '-'",
                ch as u32,
                i + 1
            ));
        }
    }
    if topic.len() > 249 {
        return Err(format!(
            "topic is {} characters long, Kafka allows at most 249",
            topic.len()
        ));
    }
    Ok(())
}

pub fn is_pattern(topic: &str) -> bool {
    topic.contains(['*', '?'])
}
