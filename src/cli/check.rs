use crate::config::{connection_hint, redact_secrets, redact_url, Config};
use crate::config::{BackendConfig, Provisioning};
use crate::publisher::nats::config::Persistence;
use crate::publisher::Health;
use crate::store::Store;
use crate::wiring::{open_backend, session};
use std::path::Path;
use std::process::ExitCode;

/// Prints one line per component and exits 1 if any has a problem.
pub async fn check(cfg: &Config, path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let source = match path {
        Some(p) => p.display().to_string(),
        None if Path::new("relay.toml").exists() => "relay.toml".into(),
        None => "built-in defaults".into(),
    };
    println!("ok       config     {source}");
    let store = Store::connect(&cfg.database, &session(cfg)).await?;
    let mut problems = database(cfg, &store).await;
    if problems == 0 {
        match store.check_schema().await {
            Ok(()) => println!("ok       outbox     {}", store.names().qualified()),
            Err(e) => {
                problems += 1;
                println!("PROBLEM  outbox     {e}");
            }
        }
    }
    for (name, b) in &cfg.backends {
        problems += backend(cfg, name, b).await;
    }
    for r in &cfg.routes {
        println!(
            "ok       route      {} -> {} ({} body)",
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

/// The database line: the server's version and whether the session is encrypted, as the
/// server sees it (what an operator checking a TLS set-up wants confirmed). The problems found.
async fn database(cfg: &Config, store: &Store) -> u32 {
    let url = redact_url(cfg.database.url.expose());
    match store.session_tls().await {
        Ok((v, ssl, tls)) => {
            let mode = cfg.database.tls().mode.unwrap_or_else(|| "prefer".into());
            let tls = match (ssl, tls) {
                (true, Some(t)) => format!("{t}, sslmode {mode}"),
                (true, None) => format!("TLS, sslmode {mode}"),
                (false, _) if store.plaintext_loopback() => {
                    "no TLS: a loopback host and no sslmode given".to_string()
                }
                (false, _) => format!("no TLS, sslmode {mode}"),
            };
            println!("ok       database   {url} (PostgreSQL {v}; {tls})");
            0
        }
        Err(e) => {
            // The pool only says it timed out; one direct connection names the cause.
            let e = match (&e, store.probe().await) {
                (sqlx::Error::PoolTimedOut, Err(cause)) => cause.to_string(),
                _ => e.to_string(),
            };
            let e = redact_secrets(&e);
            match connection_hint(&e) {
                Some(hint) => println!("PROBLEM  database   {url}: {e} ({hint})"),
                None => println!("PROBLEM  database   {url}: {e}"),
            }
            1
        }
    }
}

/// One backend's lines: reachable, provisioning drift (validate_only: check changes nothing),
/// and where its topics go. The problems found.
async fn backend(cfg: &Config, name: &str, b: &BackendConfig) -> u32 {
    let mut problems = 0;
    let (publisher, report) =
        match open_backend(name, b, cfg, Some(Provisioning::ValidateOnly)).await {
            Ok(opened) => opened,
            Err(e) => {
                println!("PROBLEM  backend    {}", redact_secrets(&e.to_string()));
                return 1;
            }
        };
    match publisher.health().await {
        Health::Up => println!("ok       backend    {name} ({})", publisher.kind()),
        Health::Down(why) => {
            problems += 1;
            let why = redact_secrets(&why);
            println!("PROBLEM  backend    {name} ({}): {why}", publisher.kind());
        }
    }
    let strategy = match b {
        BackendConfig::Kafka(k) => k.provisioning,
        BackendConfig::Nats(n) => n.provisioning,
        _ => Provisioning::Skip,
    };
    for line in &report.drift {
        let line = redact_secrets(line);
        if strategy == Provisioning::ValidateOnly {
            problems += 1;
            println!("PROBLEM  drift      {name}: {line}");
        } else if strategy != Provisioning::Skip {
            println!("notice   drift      {name}: {line} (run fixes it: {strategy:?})");
        }
    }
    topics(name, b);
    publisher.close(std::time::Duration::from_secs(1)).await;
    problems
}

/// Where each configured topic of a NATS or Pulsar backend goes (persistence, full name).
fn topics(name: &str, b: &BackendConfig) {
    if let BackendConfig::Nats(n) = b {
        for (topic, t) in &n.topics {
            println!(
                "ok       topic      {topic} -> {name}: {} ({:?} configured)",
                mode(n.persistence_for(topic)),
                t.persistence
            );
        }
        println!(
            "ok       topic      (others) -> {name}: {}",
            mode(n.default_persistence())
        );
    }
    if let BackendConfig::Pulsar(p) = b {
        for (topic, t) in &p.topics {
            println!(
                "ok       topic      {topic} -> {name}: {}://{}/{}/{topic}",
                p.persistence_for(topic).scheme(),
                t.tenant.as_deref().unwrap_or(&p.tenant),
                t.namespace.as_deref().unwrap_or(&p.namespace),
            );
        }
        println!(
            "ok       topic      (others) -> {name}: {}://{}/{}/<topic>",
            p.default_persistence().scheme(),
            p.tenant,
            p.namespace
        );
    }
}

fn mode(p: Persistence) -> &'static str {
    match p {
        Persistence::Ephemeral => "ephemeral (core NATS)",
        _ => "persistent (JetStream)",
    }
}
