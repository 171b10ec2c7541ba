use crate::config::{redact_url, Config};
use crate::store::{migrate, Store};
use crate::wiring::session;
use anyhow::Context;
use std::process::ExitCode;

pub async fn migrate(cfg: &Config) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&cfg.database, &session(cfg)).await?;
    let applied = migrate::run(store.pool(), store.names())
        .await
        .with_context(|| format!("migrating {}", redact_url(cfg.database.url.expose())))?;
    if applied.is_empty() {
        tracing::info!(outbox = %store.names().qualified(), "outbox schema is up to date");
    } else {
        tracing::info!(outbox = %store.names().qualified(), versions = ?applied, "applied migrations");
    }
    Ok(ExitCode::SUCCESS)
}
