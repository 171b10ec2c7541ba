use crate::config::{redact_url, Config};
use crate::relay::retry::Backoff;
use crate::relay::Relay;
use anyhow::Context;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Exit once nothing is due and nothing is in flight (for demos, scripts and benchmarks)
    #[arg(long)]
    pub drain: bool,
}

/// What a stop may take beyond `relay.shutdown_timeout`: recording the last results, handing
/// the partitions over, closing the backends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub async fn run(cfg: &Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    tracing::info!(
        database = %redact_url(cfg.database.url.expose()),
        instance = %cfg.instance_id(),
        "starting"
    );
    let shutdown = CancellationToken::new();
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
    // A service waits for what it needs (Postgres, the migrated outbox, its brokers), as it
    // would under an orchestrator starting everything at once; `--drain` is a one-shot
    // command and reports the first failure instead.
    let mut attempt: u32 = 0;
    let relay = loop {
        match start(cfg).await {
            Ok(relay) => break relay,
            Err(e) if !args.drain && worth_waiting_for(&e) => {
                attempt += 1;
                let wait = START_RETRY.step(attempt);
                tracing::warn!(attempt, retry_in = ?wait, "cannot start yet: {e:#}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
                }
            }
            Err(e) => return Err(e),
        }
    };
    if attempt > 0 {
        tracing::info!(attempts = attempt + 1, "started");
    }
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

/// Waits between start-up attempts: 0.5 s, doubling, at most 30 s.
const START_RETRY: Backoff = Backoff {
    initial: Duration::from_millis(250),
    max: Duration::from_secs(30),
};

/// Connects, builds the backends, and checks that Postgres answers and the outbox is migrated.
async fn start(cfg: &Config) -> anyhow::Result<Relay> {
    let relay = crate::wiring::relay(cfg).await?;
    relay.store().probe().await?;
    relay
        .store()
        .check_schema()
        .await
        .context("the outbox is not ready")?;
    Ok(relay)
}

/// Whether a start-up failure may go away by itself (a server not up yet, a migration still
/// running), rather than needing a change of configuration.
fn worth_waiting_for(e: &anyhow::Error) -> bool {
    use crate::relay::RelayError;
    use crate::store::StoreError;
    let store = |s: &StoreError| !matches!(s, StoreError::Url { .. });
    if let Some(s) = e.downcast_ref::<StoreError>() {
        return store(s);
    }
    match e.downcast_ref::<RelayError>() {
        Some(RelayError::Store(s)) => store(s),
        Some(RelayError::Tracing(_)) => false,
        _ => true,
    }
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
