//! `outbox-relay status`: the backlog per topic, the oldest pending event, aggregates held by
//! failed events, the running relays. `--json` prints [`crate::store::ops::Status`] as one
//! JSON document:
//!
//! ```text
//! {"outbox": "outbox.outbox", "at": "...",
//!  "totals": {"pending", "due", "scheduled", "held", "in_flight", "failed", "published"},
//!  "oldest_pending_at": "..." | null, "oldest_pending_age_seconds": 1.5 | null,
//!  "aggregates_held": 0, "partitions_unowned": 0,
//!  "topics": [{"topic", "due", "scheduled", "held", "failed", "published"}],
//!  "relays": [{"instance", "host", "pid", "version", "started_at", "seen_at", "in_flight",
//!              "published", "failed", "partitions"}],
//!  "limits": {"exceeded": ["pending 12 > 10"]}}   (only with --max-pending / --max-age)
//! ```
//!
//! Exit codes: 0, or 3 when `--max-pending` or `--max-age` is exceeded (for cron and probes);
//! 1 when the database cannot be read.

use super::filter::{operator_store, table, when};
use crate::config::{parse_duration, Config};
use crate::store::ops::Status;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print one JSON document instead of tables
    #[arg(long)]
    pub json: bool,
    /// Refresh every SECS seconds until interrupted
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<u64>,
    /// Exit 3 when more events than this are pending
    #[arg(long, value_name = "N")]
    pub max_pending: Option<i64>,
    /// Exit 3 when the oldest pending event is older than this (30s, 5m, 1h)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_age: Option<Duration>,
}

/// Exit code for a limit exceeded.
pub const LIMIT_EXCEEDED: u8 = 3;

pub async fn status(cfg: &Config, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = operator_store(cfg, "status").await?;
    loop {
        let s = store.status().await?;
        let exceeded = limits(&s, &args);
        if args.json {
            let mut v = serde_json::to_value(&s)?;
            if args.max_pending.is_some() || args.max_age.is_some() {
                v["limits"] = serde_json::json!({ "exceeded": exceeded });
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            if args.watch.is_some() {
                // Clear the screen and go home, like watch(1).
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&s));
            for e in &exceeded {
                println!("LIMIT EXCEEDED: {e}");
            }
        }
        match args.watch {
            Some(secs) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(secs.max(1))) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                }
            }
            None => {
                return Ok(if exceeded.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(LIMIT_EXCEEDED)
                });
            }
        }
    }
}

fn limits(s: &Status, args: &StatusArgs) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(max) = args.max_pending {
        if s.totals.pending > max {
            out.push(format!("pending {} > {max}", s.totals.pending));
        }
    }
    if let (Some(max), Some(age)) = (args.max_age, s.oldest_pending_age_seconds) {
        if age > max.as_secs_f64() {
            out.push(format!(
                "oldest pending {age:.1}s > {:.1}s",
                max.as_secs_f64()
            ));
        }
    }
    out
}

fn render(s: &Status) -> String {
    let t = &s.totals;
    let mut out = format!("outbox {}  at {}\n\n", s.outbox, when(s.at));
    out.push_str(&format!(
        "pending {} (due {}, scheduled for retry {}, held behind failures {})  in flight {}  failed {}  published (kept) {}\n",
        t.pending, t.due, t.scheduled, t.held, t.in_flight, t.failed, t.published
    ));
    out.push_str(&match (s.oldest_pending_at, s.oldest_pending_age_seconds) {
        (Some(at), Some(age)) => format!("oldest pending {age:.1}s old (occurred {})\n", when(at)),
        _ => "oldest pending: none\n".to_string(),
    });
    out.push_str(&format!(
        "aggregates held by a failed event: {}\n\n",
        s.aggregates_held
    ));
    topics_table(s, &mut out);
    out.push('\n');
    relays_table(s, &mut out);
    out
}

/// Per topic: due, scheduled, held, failed and kept published rows.
fn topics_table(s: &Status, out: &mut String) {
    if s.topics.is_empty() {
        out.push_str("no events\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .topics
            .iter()
            .map(|t| {
                vec![
                    t.topic.clone(),
                    t.due.to_string(),
                    t.scheduled.to_string(),
                    t.held.to_string(),
                    t.failed.to_string(),
                    t.published.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["TOPIC", "DUE", "SCHEDULED", "HELD", "FAILED", "PUBLISHED"],
            &rows,
        ));
    }
}

/// The relays seen lately, and the partitions nobody owns.
fn relays_table(s: &Status, out: &mut String) {
    if s.relays.is_empty() {
        out.push_str("relays: none running\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .relays
            .iter()
            .map(|r| {
                vec![
                    r.instance.clone(),
                    r.host.clone(),
                    r.pid.to_string(),
                    r.version.clone(),
                    when(r.started_at),
                    when(r.seen_at),
                    r.in_flight.to_string(),
                    r.published.to_string(),
                    r.failed.to_string(),
                    r.partitions.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "RELAY",
                "HOST",
                "PID",
                "VERSION",
                "STARTED",
                "SEEN",
                "IN FLIGHT",
                "PUBLISHED",
                "FAILED",
                "PARTITIONS",
            ],
            &rows,
        ));
        if s.partitions_unowned > 0 {
            out.push_str(&format!(
                "partitions without an owner: {} of 256 (their events wait)\n",
                s.partitions_unowned
            ));
        }
    }
}
