//! `outbox-relay failed`: the failed events, filtered; `outbox-relay inspect EVENT_ID`: one
//! event in full.
//!
//! `failed --json` prints `{"count": N, "events": [{"id", "event_id", "topic", "aggregate_id",
//! "event_type", "attempts", "occurred_at", "at" (when it failed), "last_error"}]}`, where
//! `count` is every match and `events` the first `--limit` in id order.
//!
//! `inspect --json` prints every column (`id`, `event_id`, `topic`, `aggregate_id`,
//! `aggregate_type`, `event_type`, `event_version`, `headers`, `content_type`, `traceparent`,
//! `correlation_id`, `occurred_at`, `status`, `attempts`, `next_attempt_at`, `last_error`,
//! `published_at`) plus the payload: `payload_json` when it is JSON, else `payload_base64`, and
//! `payload_bytes`. An unknown id exits 1.

use super::filter::{cut, operator_store, table, when, FilterArgs};
use crate::config::Config;
use crate::store::ops::{FullRow, Target};
use base64::Engine;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct FailedArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Show at most this many (the count covers all)
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    /// Print one JSON document instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The event's id
    pub event_id: uuid::Uuid,
    /// Print one JSON document
    #[arg(long)]
    pub json: bool,
}

pub async fn failed(cfg: &Config, args: FailedArgs) -> anyhow::Result<ExitCode> {
    if args.limit < 1 {
        eprintln!(
            "outbox-relay: --limit {} is not allowed, must be 1 or more",
            args.limit
        );
        return Ok(ExitCode::from(2));
    }
    let store = operator_store(cfg, "failed").await?;
    let f = args.filter.filter();
    let count = store.count_matching(Target::Failed, &f).await?;
    let events = store.list(Target::Failed, &f, args.limit).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "count": count, "events": events }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if events.is_empty() {
        println!("no failed events match");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.event_id.to_string(),
                e.topic.clone(),
                e.aggregate_id.clone(),
                e.attempts.to_string(),
                when(e.at),
                cut(e.last_error.as_deref().unwrap_or(""), 100),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "EVENT ID",
                "TOPIC",
                "AGGREGATE",
                "ATTEMPTS",
                "FAILED AT",
                "LAST ERROR"
            ],
            &rows
        )
    );
    if count > events.len() as i64 {
        println!("({} of {count} shown; --limit for more)", events.len());
    } else {
        println!("({count} failed)");
    }
    Ok(ExitCode::SUCCESS)
}

/// How many payload bytes the readable preview shows.
const PREVIEW: usize = 256;

pub async fn inspect(cfg: &Config, args: InspectArgs) -> anyhow::Result<ExitCode> {
    let store = operator_store(cfg, "inspect").await?;
    let Some(row) = store.inspect(args.event_id).await? else {
        eprintln!(
            "outbox-relay: no event {} in {}",
            args.event_id,
            store.names().qualified()
        );
        return Ok(ExitCode::from(1));
    };
    let json: Option<serde_json::Value> = serde_json::from_slice(&row.payload).ok();
    if args.json {
        print_json(&row, json)?;
    } else {
        print_fields(&row);
        print_payload(&row, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The row as one JSON document, the payload inline when it is JSON, else in base64.
fn print_json(row: &FullRow, json: Option<serde_json::Value>) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(row)?;
    v["payload_bytes"] = row.payload.len().into();
    match json {
        Some(j) => v["payload_json"] = j,
        None => {
            v["payload_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&row.payload)
                .into()
        }
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Every column but the payload, one per line.
fn print_fields(row: &FullRow) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let fields = [
        ("id", row.id.to_string()),
        ("event_id", row.event_id.to_string()),
        ("status", row.status.clone()),
        ("topic", row.topic.clone()),
        ("aggregate_id", row.aggregate_id.clone()),
        ("aggregate_type", opt(&row.aggregate_type)),
        ("event_type", row.event_type.clone()),
        ("event_version", row.event_version.to_string()),
        ("occurred_at", row.occurred_at.to_rfc3339()),
        ("attempts", row.attempts.to_string()),
        ("next_attempt_at", row.next_attempt_at.to_rfc3339()),
        (
            "published_at",
            row.published_at
                .map(|t| t.to_rfc3339())
                .unwrap_or("-".into()),
        ),
        ("last_error", opt(&row.last_error)),
        ("content_type", opt(&row.content_type)),
        ("traceparent", opt(&row.traceparent)),
        ("correlation_id", opt(&row.correlation_id)),
        (
            "headers",
            row.headers
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or("-".into()),
        ),
    ];
    for (k, v) in fields {
        println!("{k:<16} {v}");
    }
}

/// The payload: pretty JSON, or a hex preview and the whole in base64.
fn print_payload(row: &FullRow, json: Option<serde_json::Value>) -> anyhow::Result<()> {
    println!("payload          {} bytes", row.payload.len());
    match json {
        Some(j) => println!("{}", serde_json::to_string_pretty(&j)?),
        None => {
            println!(
                "(not JSON; hex of the first {} bytes, then base64 of all)",
                PREVIEW.min(row.payload.len())
            );
            for chunk in row.payload[..PREVIEW.min(row.payload.len())].chunks(16) {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                let text: String = chunk
                    .iter()
                    .map(|&b| {
                        if b.is_ascii_graphic() || b == b' ' {
                            b as char
                        } else {
                            '.'
                        }
                    })
                    .collect();
                println!("  {:<48} {text}", hex.join(" "));
            }
            println!(
                "base64: {}",
                base64::engine::general_purpose::STANDARD.encode(&row.payload)
            );
        }
    }
    Ok(())
}
