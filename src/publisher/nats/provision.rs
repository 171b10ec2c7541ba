//! Stream provisioning at start-up: create, update or validate the configured JetStream
//! streams, then check that every persistent topic named in the config has a stream.

use super::config::{
    subject_matches, Discard, NatsConfig, Persistence, Retention, Storage, StreamSettings,
};
use crate::config::value::Provisioning;
use crate::publisher::ProvisionReport;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{Context, ErrorCode};
use futures::TryStreamExt;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("provisioning stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("topic {topic} is persistent (JetStream) but no stream covers its subject; streams: {streams}")]
    Uncovered { topic: String, streams: String },
    #[error("listing JetStream streams: {0}")]
    List(String),
}

/// The server-side stream config for our settings.
pub fn stream_config(name: &str, s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: s.subjects.clone(),
        storage: match s.storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        },
        retention: match s.retention {
            Retention::Limits => RetentionPolicy::Limits,
            Retention::Interest => RetentionPolicy::Interest,
            Retention::WorkQueue => RetentionPolicy::WorkQueue,
        },
        max_age: s.max_age.0,
        max_bytes: s.max_bytes,
        max_messages: s.max_messages,
        max_message_size: s.max_message_size,
        num_replicas: s.replicas,
        discard: match s.discard {
            Discard::Old => DiscardPolicy::Old,
            Discard::New => DiscardPolicy::New,
        },
        duplicate_window: s.duplicate_window.0,
        ..Default::default()
    }
}

/// The settings we own that differ between `have` and `want`, readable.
pub fn differences(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{key} {a}, configured {b}"));
        }
    };
    let mut hs = have.subjects.clone();
    let mut ws = want.subjects.clone();
    hs.sort();
    ws.sort();
    cmp("subjects", format!("{hs:?}"), format!("{ws:?}"));
    cmp(
        "storage",
        format!("{:?}", have.storage),
        format!("{:?}", want.storage),
    );
    cmp(
        "retention",
        format!("{:?}", have.retention),
        format!("{:?}", want.retention),
    );
    cmp(
        "max_age",
        format!("{:?}", have.max_age),
        format!("{:?}", want.max_age),
    );
    cmp(
        "max_bytes",
        have.max_bytes.to_string(),
        want.max_bytes.to_string(),
    );
    cmp(
        "max_messages",
        have.max_messages.to_string(),
        want.max_messages.to_string(),
    );
    // The server reports "no limit" on message size as 0 or -1.
    let size = |v: i32| if v <= 0 { -1 } else { v };
    cmp(
        "max_message_size",
        size(have.max_message_size).to_string(),
        size(want.max_message_size).to_string(),
    );
    cmp(
        "replicas",
        have.num_replicas.max(1).to_string(),
        want.num_replicas.to_string(),
    );
    cmp(
        "discard",
        format!("{:?}", have.discard),
        format!("{:?}", want.discard),
    );
    cmp(
        "duplicate_window",
        format!("{:?}", have.duplicate_window),
        format!("{:?}", want.duplicate_window),
    );
    out
}

fn serr(stream: &str, message: impl ToString) -> ProvisionError {
    ProvisionError::Stream {
        stream: stream.to_string(),
        message: message.to_string(),
    }
}

/// Applies `strategy` to the configured streams; `skip` makes no call at all.
pub async fn provision(
    js: &Context,
    cfg: &NatsConfig,
    strategy: Provisioning,
) -> Result<ProvisionReport, ProvisionError> {
    let mut report = ProvisionReport::default();
    if strategy == Provisioning::Skip {
        return Ok(report);
    }
    for (name, settings) in &cfg.streams {
        provision_stream(
            js,
            name,
            stream_config(name, settings),
            strategy,
            &mut report,
        )
        .await?;
    }
    every_topic_has_a_stream(js, cfg).await?;
    Ok(report)
}

/// Creates the stream, brings it to the configured settings, or reports how it differs, as
/// `strategy` says.
async fn provision_stream(
    js: &Context,
    name: &String,
    want: stream::Config,
    strategy: Provisioning,
    report: &mut ProvisionReport,
) -> Result<(), ProvisionError> {
    match js.get_stream(name).await {
        Ok(mut existing) => {
            let have = existing
                .info()
                .await
                .map_err(|e| serr(name, e))?
                .config
                .clone();
            let diffs = differences(&have, &want);
            if diffs.is_empty() {
                return Ok(());
            }
            match strategy {
                Provisioning::CreateOrUpdate => {
                    // Keep what we do not manage (description, sources, ...).
                    let merged = stream::Config {
                        subjects: want.subjects.clone(),
                        storage: want.storage,
                        retention: want.retention,
                        max_age: want.max_age,
                        max_bytes: want.max_bytes,
                        max_messages: want.max_messages,
                        max_message_size: want.max_message_size,
                        num_replicas: want.num_replicas,
                        discard: want.discard,
                        duplicate_window: want.duplicate_window,
                        ..have
                    };
                    js.update_stream(merged).await.map_err(|e| serr(name, e))?;
                    report.updated.push(format!("{name}: {}", diffs.join("; ")));
                }
                _ => report.drift.push(format!("{name}: {}", diffs.join("; "))),
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                GetStreamErrorKind::JetStream(api)
                    if api.error_code() == ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            if strategy == Provisioning::ValidateOnly {
                report.drift.push(format!("{name}: does not exist"));
            } else {
                js.create_stream(want).await.map_err(|e| serr(name, e))?;
                report.created.push(name.clone());
            }
        }
        Err(e) => return Err(serr(name, e)),
    }
    Ok(())
}

/// Every persistent topic the config names must land in some stream.
async fn every_topic_has_a_stream(js: &Context, cfg: &NatsConfig) -> Result<(), ProvisionError> {
    let named: Vec<&String> = cfg
        .topics
        .keys()
        .filter(|t| !t.contains(['*', '?']) && cfg.persistence_for(t) == Persistence::Persistent)
        .collect();
    if !named.is_empty() {
        let streams: Vec<stream::Info> = js
            .streams()
            .try_collect()
            .await
            .map_err(|e| ProvisionError::List(e.to_string()))?;
        // With a create_* strategy configured, `run` creates the configured streams, so they
        // count even where this call (check's validate_only) did not create them.
        let will_create = matches!(
            cfg.provisioning,
            Provisioning::CreateOnly | Provisioning::CreateOrUpdate
        );
        for topic in named {
            let covered = streams
                .iter()
                .any(|s| s.config.subjects.iter().any(|f| subject_matches(f, topic)))
                || (will_create
                    && cfg
                        .streams
                        .values()
                        .any(|s| s.subjects.iter().any(|f| subject_matches(f, topic))));
            if !covered {
                let mut list: Vec<String> = streams
                    .iter()
                    .take(10)
                    .map(|s| format!("{} {:?}", s.config.name, s.config.subjects))
                    .collect();
                if streams.len() > 10 {
                    list.push(format!("and {} more", streams.len() - 10));
                }
                return Err(ProvisionError::Uncovered {
                    topic: topic.clone(),
                    streams: if list.is_empty() {
                        "none".into()
                    } else {
                        list.join(", ")
                    },
                });
            }
        }
    }
    Ok(())
}
