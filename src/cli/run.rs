use crate::config::{redact_url, Config};
use crate::relay::Relay;
use anyhow::Context;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Exit once nothing is due and nothing is in flight (for demos, scripts and benchmarks)
    #[arg(long)]
    pub drain: bool,
}

/// What a stop may take beyond `relay.shutdown_timeout`: recording the last results, handing
/// the partitions over, closing the backends.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn run(cfg: &Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    tracing::info!(
        database = %redact_url(cfg.database.url.expose()),
        instance = %cfg.instance_id(),
        "starting"
    );
    let relay = Relay::from_config(cfg).await?;
    relay
        .store()
        .check_schema()
        .await
        .context("the outbox is not ready")?;
    let shutdown = CancellationToken::new();
    let http = if cfg.http.address.is_empty() {
        None
    } else {
        let state = crate::http::AppState {
            metrics: relay.metrics(),
            observed: relay.observed(),
            stats: relay.stats(),
            instance: relay.instance().to_string(),
        };
        let stop = CancellationToken::new();
        let (addr, task) = crate::http::serve(&cfg.http.address, state, stop.clone())
            .await
            .with_context(|| format!("http.address {}: cannot listen", cfg.http.address))?;
        tracing::info!(address = %addr, "HTTP endpoints: /metrics /livez /readyz /health");
        Some((stop, task))
    };
    let signals = shutdown.clone();
    let limit = cfg.relay.shutdown_timeout.0 + SHUTDOWN_GRACE;
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
        // The relay waits `shutdown_timeout` for results, then records what it has; a broker
        // or a Postgres that stopped answering must not keep the process up past that.
        tokio::time::sleep(limit).await;
        tracing::error!(
            ?limit,
            "shutdown did not finish in time (a broker or Postgres is not answering): exiting \
             now; events without a recorded result stay pending and are published again \
             (same event ids)"
        );
        std::process::exit(1);
    });
    if args.drain {
        relay.run_until_drained(shutdown).await?;
    } else {
        relay.run(shutdown).await?;
    }
    if let Some((stop, task)) = http {
        stop.cancel();
        let _ = task.await;
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
