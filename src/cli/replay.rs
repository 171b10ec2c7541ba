//! `outbox-relay replay`: failed events (or, with `--status published`, kept published ones)
//! back to pending; `outbox-relay purge`: failed events deleted. Both release the events held
//! behind the failures they touch, work in chunks, and keep ids, so each aggregate's events go
//! out again in their order.
//!
//! Without a filter they touch every event of the status, which needs `--all --yes`; otherwise
//! they exit 2 saying how many events that would be. `--dry-run` lists what would change and
//! changes nothing. `--json` prints `{"dry_run": bool, "matched": N, "events": [...]}` for a dry
//! run (the first 100 in id order, as `failed --json` lists them) and
//! `{"replayed" | "purged": N, "released": N}` otherwise.

use super::filter::{operator_store, table, when, FilterArgs};
use crate::config::Config;
use crate::store::ops::{Filter, Target};
use crate::store::Store;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    Failed,
    Published,
}

/// The flags replay and purge share beside the filter.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BulkArgs {
    /// Every event of the status (with --yes)
    #[arg(long)]
    pub all: bool,
    /// Show what would change; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm a change of every event (--all)
    #[arg(long)]
    pub yes: bool,
    /// Print one JSON document
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Which events: failed ones, or published ones kept by relay.published_retention (republish)
    #[arg(long, value_enum, default_value = "failed")]
    pub status: StatusArg,
    #[command(flatten)]
    pub bulk: BulkArgs,
}

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub bulk: BulkArgs,
}

pub async fn replay(cfg: &Config, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let target = match args.status {
        StatusArg::Failed => Target::Failed,
        StatusArg::Published => Target::Published,
    };
    run(cfg, "replay", target, &args.filter, &args.bulk).await
}

pub async fn purge(cfg: &Config, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    run(cfg, "purge", Target::Failed, &args.filter, &args.bulk).await
}

async fn run(
    cfg: &Config,
    verb: &str,
    target: Target,
    filter: &FilterArgs,
    bulk: &BulkArgs,
) -> anyhow::Result<ExitCode> {
    let BulkArgs {
        all,
        dry_run,
        yes,
        json,
    } = *bulk;
    let f = filter.filter();
    let what = match target {
        Target::Failed => "failed",
        Target::Published => "published",
    };
    if all && !f.is_empty() {
        eprintln!("outbox-relay: {verb}: --all selects every {what} event; drop it or the filters");
        return Ok(ExitCode::from(2));
    }
    let store = operator_store(cfg, verb).await?;
    let matched = store.count_matching(target, &f).await?;
    if f.is_empty() && !dry_run && !(all && yes) {
        eprintln!(
            "outbox-relay: {verb} without a filter touches every {what} event ({matched}); \
             narrow it (--event-id, --topic, --aggregate, --since, --until, --error) or confirm \
             with --all --yes"
        );
        return Ok(ExitCode::from(2));
    }
    if dry_run {
        dry_run_report(&store, verb, target, what, &f, matched, json).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let done = match verb {
        "purge" => store.purge(&f).await?,
        _ => store.replay(target, &f).await?,
    };
    let key = if verb == "purge" {
        "purged"
    } else {
        "replayed"
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                key: done.events, "released": done.released
            }))?
        );
    } else {
        println!(
            "{key} {} {what} events; released {} events held behind them",
            done.events, done.released
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What a run would touch (`what`: the target's name): the count and the first 100 events,
/// changing nothing.
async fn dry_run_report(
    store: &Store,
    verb: &str,
    target: Target,
    what: &str,
    f: &Filter,
    matched: i64,
    json: bool,
) -> anyhow::Result<()> {
    let events = store.list(target, f, 100).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": true, "matched": matched, "events": events
            }))?
        );
    } else {
        let rows: Vec<Vec<String>> = events
            .iter()
            .map(|e| {
                vec![
                    e.event_id.to_string(),
                    e.topic.clone(),
                    e.aggregate_id.clone(),
                    when(e.occurred_at),
                ]
            })
            .collect();
        if !rows.is_empty() {
            print!(
                "{}",
                table(&["EVENT ID", "TOPIC", "AGGREGATE", "OCCURRED AT"], &rows)
            );
        }
        println!("dry run: {verb} would touch {matched} {what} events; nothing changed");
    }
    Ok(())
}
