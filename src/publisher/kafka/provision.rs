//! Topic provisioning at start-up through the admin API: create, update or validate the topics
//! named in the backend's `topics` table (patterns apply to existing topics that match).

use super::config::{is_pattern, KafkaConfig, TopicSettings};
use crate::config::value::{Dur, Provisioning};
use crate::publisher::ProvisionReport as Report;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("provisioning topic {topic}: {message}")]
pub struct ProvisionError {
    pub topic: String,
    pub message: String,
}

fn perr(topic: &str, message: impl Into<String>) -> ProvisionError {
    ProvisionError {
        topic: topic.to_string(),
        // librdkafka's configuration errors quote values.
        message: crate::config::secrets::redact_secrets(&message.into()),
    }
}

/// Applies `strategy` to the configured topics. `skip` makes no call at all.
pub async fn provision(
    cfg: &KafkaConfig,
    strategy: Provisioning,
    publish_timeout: Dur,
) -> Result<Report, ProvisionError> {
    let mut report = Report::default();
    if strategy == Provisioning::Skip || cfg.topics.is_empty() {
        return Ok(report);
    }
    let timeout = cfg.health_timeout.0.max(Duration::from_secs(5));
    let admin = Admin {
        client: admin_client(cfg, publish_timeout)?,
        opts: AdminOptions::new().request_timeout(Some(timeout)),
        strategy,
    };
    // What exists now, with partition counts.
    let existing = existing_topics(&admin.client, timeout).await?;
    let wanted = wanted_topics(cfg, &existing);
    admin
        .create_missing(&wanted, &existing, &mut report)
        .await?;
    // Existing topics: compare partitions and configs.
    for (name, s) in &wanted {
        let Some(&partitions) = existing.get(name) else {
            continue;
        };
        let mut diffs = Vec::new();
        admin
            .partitions(name, partitions, s, &mut diffs, &mut report)
            .await?;
        admin.configs(name, s, &mut diffs, &mut report).await?;
        if !diffs.is_empty() && strategy == Provisioning::ValidateOnly {
            report.drift.push(format!("{name}: {}", diffs.join("; ")));
        }
    }
    Ok(report)
}

/// An admin client from the producer's connection settings.
fn admin_client(
    cfg: &KafkaConfig,
    publish_timeout: Dur,
) -> Result<Arc<AdminClient<DefaultClientContext>>, ProvisionError> {
    let mut conf = ClientConfig::new();
    for (k, v) in cfg.client_properties(publish_timeout) {
        // Producer-only properties make the admin client log warnings; leave them out.
        if ![
            "enable.idempotence",
            "acks",
            "linger.ms",
            "batch.num.messages",
            "message.timeout.ms",
        ]
        .contains(&k.as_str())
        {
            conf.set(k, v);
        }
    }
    Ok(Arc::new(
        conf.create().map_err(|e| perr("*", e.to_string()))?,
    ))
}

/// The concrete topics: named ones, and existing ones a pattern matches.
fn wanted_topics(
    cfg: &KafkaConfig,
    existing: &BTreeMap<String, i32>,
) -> BTreeMap<String, TopicSettings> {
    let mut wanted: BTreeMap<String, TopicSettings> = BTreeMap::new();
    for (name, s) in &cfg.topics {
        if !is_pattern(name) {
            wanted.insert(name.clone(), s.resolved());
        }
    }
    for name in existing.keys() {
        if !wanted.contains_key(name) {
            if let Some(s) = cfg.settings_for(name) {
                wanted.insert(name.clone(), s.resolved());
            }
        }
    }
    wanted
}

/// The admin client, its request options and what it may change.
struct Admin {
    client: Arc<AdminClient<DefaultClientContext>>,
    opts: AdminOptions,
    strategy: Provisioning,
}

impl Admin {
    /// Creates the wanted topics that do not exist (or reports them, validating only).
    async fn create_missing(
        &self,
        wanted: &BTreeMap<String, TopicSettings>,
        existing: &BTreeMap<String, i32>,
        report: &mut Report,
    ) -> Result<(), ProvisionError> {
        let missing: Vec<(&String, &TopicSettings)> = wanted
            .iter()
            .filter(|(n, _)| !existing.contains_key(*n))
            .collect();
        if !missing.is_empty() {
            if self.strategy == Provisioning::ValidateOnly {
                for (n, _) in &missing {
                    report.drift.push(format!("{n}: does not exist"));
                }
            } else {
                let configs: Vec<Vec<(&'static str, String)>> =
                    missing.iter().map(|(_, s)| s.configs()).collect();
                let new: Vec<NewTopic> = missing
                    .iter()
                    .zip(&configs)
                    .map(|((n, s), cs)| {
                        // Unset: -1, the broker's defaults (partitions, replication factor).
                        let mut t = NewTopic::new(
                            n,
                            s.partitions(),
                            TopicReplication::Fixed(s.replication_factor()),
                        );
                        for (k, v) in cs {
                            t = t.set(k, v);
                        }
                        t
                    })
                    .collect();
                let results = self
                    .client
                    .create_topics(new.iter(), &self.opts)
                    .await
                    .map_err(|e| perr("*", e.to_string()))?;
                for r in results {
                    match r {
                        Ok(t) => report.created.push(t),
                        // Another relay created it in the meantime: fine, validated below.
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, code)) => {
                            return Err(perr(
                                &t,
                                format!("the broker refused to create it: {code}"),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds partitions up to the configured count (or reports the difference); Kafka cannot
    /// take partitions away, so more than configured is reported only.
    async fn partitions(
        &self,
        name: &str,
        partitions: i32,
        s: &TopicSettings,
        diffs: &mut Vec<String>,
        report: &mut Report,
    ) -> Result<(), ProvisionError> {
        if let Some(want) = s.partitions {
            if partitions < want {
                if self.strategy == Provisioning::CreateOrUpdate {
                    let np = NewPartitions::new(name, want as usize);
                    let res = self
                        .client
                        .create_partitions([&np], &self.opts)
                        .await
                        .map_err(|e| perr(name, e.to_string()))?;
                    for r in res {
                        if let Err((_, code)) = r {
                            return Err(perr(
                                name,
                                format!("adding partitions ({partitions} -> {want}): {code}"),
                            ));
                        }
                    }
                    report
                        .updated
                        .push(format!("{name}: partitions {partitions} -> {want}"));
                } else {
                    diffs.push(format!("partitions {partitions}, configured {want}"));
                }
            } else if partitions > want {
                // Kafka cannot take partitions away.
                report.drift.push(format!(
                    "{name}: partitions {partitions}, configured {want} (Kafka cannot reduce them)"
                ));
            }
        }
        Ok(())
    }

    /// Brings the topic's configs to the configured ones (or reports the differences).
    async fn configs(
        &self,
        name: &str,
        s: &TopicSettings,
        diffs: &mut Vec<String>,
        report: &mut Report,
    ) -> Result<(), ProvisionError> {
        let wanted_configs = s.configs();
        if !wanted_configs.is_empty() {
            let (current, own) = describe(&self.client, name, &self.opts).await?;
            let changed: Vec<String> = wanted_configs
                .iter()
                .filter(|(k, v)| current.get(*k).map(|c| c.as_str()) != Some(v.as_str()))
                .map(|(k, v)| {
                    format!(
                        "{k} {}, configured {v}",
                        current.get(*k).map(|c| c.as_str()).unwrap_or("unset")
                    )
                })
                .collect();
            if !changed.is_empty() {
                if self.strategy == Provisioning::CreateOrUpdate {
                    // AlterConfigs replaces the topic's whole set of dynamic configs: keep
                    // what was set before and change only ours.
                    let mut entries = own;
                    for (k, v) in &wanted_configs {
                        entries.insert(k.to_string(), v.clone());
                    }
                    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(name));
                    for (k, v) in &entries {
                        alter = alter.set(k, v);
                    }
                    let res = self
                        .client
                        .alter_configs([&alter], &self.opts)
                        .await
                        .map_err(|e| perr(name, e.to_string()))?;
                    for r in res {
                        if let Err((_, code)) = r {
                            return Err(perr(name, format!("changing configs: {code}")));
                        }
                    }
                    report
                        .updated
                        .push(format!("{name}: {}", changed.join("; ")));
                } else {
                    diffs.extend(changed);
                }
            }
        }
        Ok(())
    }
}

/// Topic -> partition count, from the cluster's metadata.
async fn existing_topics(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    timeout: Duration,
) -> Result<BTreeMap<String, i32>, ProvisionError> {
    // Metadata calls block: off the async threads.
    let a = admin.clone();
    let meta = tokio::task::spawn_blocking(move || a.inner().fetch_metadata(None, timeout))
        .await
        .map_err(|e| perr("*", format!("reading the cluster's metadata: {e}")))?
        .map_err(|e| perr("*", format!("reading the cluster's metadata: {e}")))?;
    Ok(meta
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// The topic's configs: every value the broker reports (to compare ours against), and the
/// ones set on the topic itself (to keep them when AlterConfigs replaces the whole set).
async fn describe(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    opts: &AdminOptions,
) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>), ProvisionError> {
    let res = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], opts)
        .await
        .map_err(|e| perr(topic, format!("describing its configs: {e}")))?;
    let mut all = BTreeMap::new();
    let mut own = BTreeMap::new();
    for r in res {
        let resource = r.map_err(|code| perr(topic, format!("describing its configs: {code}")))?;
        for e in resource.entries {
            if let Some(v) = e.value {
                if e.source == rdkafka::admin::ConfigSource::DynamicTopic {
                    own.insert(e.name.clone(), v.clone());
                }
                all.insert(e.name, v);
            }
        }
    }
    Ok((all, own))
}

/// Partition count and configs of a topic as the broker reports them (for tests and `check`).
pub async fn describe_topic(
    cfg: &KafkaConfig,
    topic: &str,
    publish_timeout: Dur,
) -> Result<(i32, BTreeMap<String, String>), ProvisionError> {
    let mut conf = ClientConfig::new();
    conf.set("bootstrap.servers", &cfg.bootstrap_servers);
    for (k, v) in cfg.client_properties(publish_timeout) {
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
            conf.set(k, v);
        }
    }
    let admin: Arc<AdminClient<DefaultClientContext>> =
        Arc::new(conf.create().map_err(|e| perr(topic, e.to_string()))?);
    let timeout = cfg.health_timeout.0.max(Duration::from_secs(5));
    let existing = existing_topics(&admin, timeout).await?;
    let partitions = *existing
        .get(topic)
        .ok_or_else(|| perr(topic, "does not exist"))?;
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let (configs, _) = describe(&admin, topic, &opts).await?;
    Ok((partitions, configs))
}
