//! The one place the parts are put together from the configuration: the database session,
//! each backend's publisher (with its topics or streams provisioned), the tracer, and the
//! relay that gets them. `run` and `check` both start here; the pipeline itself sees only the
//! publisher seam.

use crate::config::{BackendConfig, Config, Provisioning};
use crate::otel::Tracer;
use crate::publisher::kafka::{self, KafkaPublisher};
use crate::publisher::memory::MemoryPublisher;
use crate::publisher::nats::{self, NatsPublisher};
use crate::publisher::pulsar::PulsarPublisher;
use crate::publisher::stdout::StdoutPublisher;
use crate::publisher::{ProvisionReport, Publisher};
use crate::relay::{Backend, Relay, RelayError};
use crate::store::{Session, Store};
use std::sync::Arc;

/// Connects to Postgres, builds every configured backend and the tracer, and gives them to a
/// relay.
pub async fn relay(cfg: &Config) -> Result<Relay, RelayError> {
    let store = Store::connect(&cfg.database, &session(cfg)).await?;
    let backends = build_backends(cfg).await?;
    let tracer = Tracer::from_config(&cfg.tracing).map_err(RelayError::Tracing)?;
    Ok(Relay::new(store, backends, &cfg.routes, cfg.relay.clone())
        .with_monitor(cfg.monitor.clone(), cfg.instance_id())
        .with_tracer(tracer))
}

/// The database session settings of a relay.
pub fn session(cfg: &Config) -> Session {
    Session {
        application_name: format!("outbox-relay {}", cfg.instance_id()),
        // A claim is open while its events are published; past this, Postgres ends a session
        // whose relay hangs, releasing its rows.
        idle_in_transaction_timeout: Some(
            cfg.relay.publish_timeout.0 * 2 + cfg.database.statement_timeout.0,
        ),
        operator: false,
    }
}

/// Builds the publisher for each configured backend, provisioning its topics or streams as
/// configured (what changed or differs is logged).
pub async fn build_backends(cfg: &Config) -> Result<Vec<Backend>, RelayError> {
    let mut out = Vec::new();
    for (name, b) in &cfg.backends {
        let (publisher, report) = open_backend(name, b, cfg, None).await?;
        for line in report.created.iter().chain(&report.updated) {
            tracing::info!(backend = %name, "provisioning: {line}");
        }
        for line in &report.drift {
            tracing::warn!(backend = %name, "provisioning: drift {line}");
        }
        out.push(Backend {
            name: name.clone(),
            publisher,
        });
    }
    Ok(out)
}

/// Connects one backend and applies its provisioning (`strategy` overrides the configured one;
/// `check` passes `validate_only`, so it changes nothing).
pub async fn open_backend(
    name: &str,
    b: &BackendConfig,
    cfg: &Config,
    strategy: Option<Provisioning>,
) -> Result<(Arc<dyn Publisher>, ProvisionReport), RelayError> {
    let fail = |message: String| RelayError::Backend {
        name: name.to_string(),
        message,
    };
    Ok(match b {
        BackendConfig::Memory {} => (Arc::new(MemoryPublisher::new()), ProvisionReport::default()),
        BackendConfig::Stdout {} => (Arc::new(StdoutPublisher::new()), ProvisionReport::default()),
        BackendConfig::Kafka(k) => {
            let strategy = strategy.unwrap_or(k.provisioning);
            let report = kafka::provision::provision(k, strategy, cfg.relay.publish_timeout)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let publisher = KafkaPublisher::new(k, cfg.relay.publish_timeout)
                .map_err(|e| fail(e.to_string()))?;
            (Arc::new(publisher), report)
        }
        BackendConfig::Nats(n) => {
            let strategy = strategy.unwrap_or(n.provisioning);
            let publisher = NatsPublisher::connect(n)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let report = nats::provision::provision(publisher.jetstream(), n, strategy)
                .await
                .map_err(|e| fail(e.to_string()))?;
            (Arc::new(publisher), report)
        }
        // Pulsar creates topics on first use (the broker's auto-creation); nothing to provision.
        BackendConfig::Pulsar(p) => (
            Arc::new(PulsarPublisher::connect(p).await),
            ProvisionReport::default(),
        ),
    })
}
