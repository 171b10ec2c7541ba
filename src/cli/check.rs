use crate::config::{redact_url, Config};
use crate::publisher::Health;
use crate::relay::{build_backends, session};
use crate::store::Store;
use std::path::Path;
use std::process::ExitCode;

/// Prints one line per component and exits 1 if any has a problem.
pub async fn check(cfg: &Config, path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut problems = 0;
    let source = match path {
        Some(p) => p.display().to_string(),
        None if Path::new("relay.toml").exists() => "relay.toml".into(),
        None => "built-in defaults".into(),
    };
    println!("ok       config     {source}");
    let url = redact_url(cfg.database.url.expose());
    let store = Store::connect(&cfg.database, &session(cfg)).await?;
    match sqlx::query_scalar::<_, String>("SHOW server_version")
        .fetch_one(store.pool())
        .await
    {
        Ok(v) => println!("ok       database   {url} (PostgreSQL {v})"),
        Err(e) => {
            problems += 1;
            println!("PROBLEM  database   {url}: {e}");
        }
    }
    if problems == 0 {
        match store.check_schema().await {
            Ok(()) => println!("ok       outbox     {}", store.names().qualified()),
            Err(e) => {
                problems += 1;
                println!("PROBLEM  outbox     {e}");
            }
        }
    }
    for b in build_backends(cfg).await? {
        match b.publisher.health().await {
            Health::Up => println!("ok       backend    {} ({})", b.name, b.publisher.kind()),
            Health::Down(why) => {
                problems += 1;
                println!(
                    "PROBLEM  backend    {} ({}): {why}",
                    b.name,
                    b.publisher.kind()
                );
            }
        }
    }
    for r in &cfg.routes {
        println!(
            "ok       route      {} -> {} ({:?} body)",
            r.topic, r.backend, r.format
        );
    }
    if problems > 0 {
        println!("{problems} problem(s)");
        Ok(ExitCode::from(1))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}
