//! The command line: `run`, `migrate`, `check`, and the operator commands `status`, `failed`,
//! `inspect`, `replay`, `purge`. One file per command (or pair of commands).
//!
//! Exit codes: 0 success, 1 a failure at run time (database, backend), 2 a configuration or
//! usage error.

mod check;
mod failed;
mod filter;
mod migrate;
mod replay;
mod run;
mod status;

use crate::config::{Config, LogFormat, Overrides};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Publishes events from a Postgres outbox table to Kafka and NATS, at least once, in order per aggregate",
    long_about = None
)]
pub struct Cli {
    /// Configuration file [default: relay.toml in the working directory, if present]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Postgres URL; overrides database.url from the file and RELAY__DATABASE__URL
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Schema of the outbox table; overrides database.schema
    #[arg(long, global = true, value_name = "NAME")]
    pub schema: Option<String>,
    /// Log format; overrides log.format
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: claim pending events, publish them, mark them (until SIGTERM/SIGINT)
    Run(run::RunArgs),
    /// Create or upgrade the outbox table, its indexes, trigger and enqueue function
    Migrate,
    /// Validate the configuration and connect to Postgres and every backend; exit 1 on problems
    Check,
    /// The backlog per topic, the oldest pending event, held aggregates, running relays; exit 3 past --max-pending/--max-age
    Status(status::StatusArgs),
    /// List failed events (filterable)
    Failed(failed::FailedArgs),
    /// Show one event in full
    Inspect(failed::InspectArgs),
    /// Put failed events (or kept published ones) back to pending, in order per aggregate
    Replay(replay::ReplayArgs),
    /// Delete failed events, releasing the events held behind them
    Purge(replay::PurgeArgs),
}

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        database_url: cli.database_url.clone(),
        log_format: cli.log_format.map(|f| match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }),
        schema: cli.schema.clone(),
    };
    let cfg = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            // The loader keeps secrets out of its messages; this catches what it cannot know.
            eprintln!(
                "outbox-relay: {}",
                crate::config::redact_secrets(&e.to_string())
            );
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(&cfg.log);
    let result = match cli.command {
        Command::Run(args) => run::run(&cfg, args).await,
        Command::Migrate => migrate::migrate(&cfg).await,
        Command::Check => check::check(&cfg, cli.config.as_deref()).await,
        Command::Status(args) => status::status(&cfg, args).await,
        Command::Failed(args) => failed::failed(&cfg, args).await,
        Command::Inspect(args) => failed::inspect(&cfg, args).await,
        Command::Replay(args) => replay::replay(&cfg, args).await,
        Command::Purge(args) => replay::purge(&cfg, args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // The whole cause chain, on one line.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let mut text = crate::config::redact_secrets(&chain.join(": "));
            if let Some(hint) = crate::config::connection_hint(&text) {
                text.push_str(&format!(" ({hint})"));
            }
            tracing::error!(error = %text, "failed");
            eprintln!("outbox-relay: {text}");
            ExitCode::from(1)
        }
    }
}
