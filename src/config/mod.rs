//! Settings: layered (relay.toml, then `RELAY__SECTION__KEY` environment variables, then
//! command-line flags), unknown keys rejected, every value validated with the key named.
//!
//! Every key, its default and its meaning are documented in the repository's `relay.toml`.

mod backends;
mod database;
mod observe;
mod relay;
pub(crate) mod secrets;
pub(crate) mod value;

pub use crate::routing::RouteConfig;
pub use backends::BackendConfig;
pub use database::{connection_hint, DatabaseConfig, DatabaseTls};
pub use observe::{HttpConfig, LogConfig, LogFormat, MonitorConfig, TracingConfig};
pub use relay::{OrderingMode, RelayConfig};
pub use secrets::{is_secret_key, redact_secrets, redact_url};
pub use value::{parse_duration, validate_identifier, ConfigError, Dur, Provisioning, Secret};

use crate::envelope::BodyFormat;
use figment::providers::{Format, Toml};
use figment::Figment;
use secrets::{collect_secrets, register_url_secrets};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use value::{in_range, invalid};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub relay: RelayConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub monitor: MonitorConfig,
    pub tracing: TracingConfig,
    /// Named backends. None configured: one `stdout` backend named "stdout".
    pub backends: BTreeMap<String, BackendConfig>,
    /// Topic pattern -> backend, first match wins. None configured with exactly one backend:
    /// every topic goes to it.
    pub routes: Vec<RouteConfig>,
}

/// Values given on the command line; they override the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub database_url: Option<String>,
    pub log_format: Option<LogFormat>,
    pub schema: Option<String>,
}

impl Config {
    /// Reads `path` (if given; `relay.toml` in the working directory if present otherwise),
    /// then the `RELAY__` environment, then `overrides`, and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from(path, overrides, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (for tests).
    pub fn load_from(
        path: Option<&Path>,
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::new();
        match path {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigError::File {
                        path: p.display().to_string(),
                        message: "does not exist".into(),
                    });
                }
                fig = fig.merge(Toml::file(p));
            }
            None => {
                if Path::new("relay.toml").exists() {
                    fig = fig.merge(Toml::file("relay.toml"));
                }
            }
        }
        // figment reads the process environment itself; collect ours so tests can inject it.
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("RELAY__"))
            .collect();
        for (k, v) in &vars {
            let key = k["RELAY__".len()..].to_ascii_lowercase().replace("__", ".");
            if key.is_empty() {
                return Err(invalid(k, "names no key"));
            }
            let value = parse_env_value(v);
            fig = fig.merge(figment::providers::Serialized::global(&key, value));
        }
        if let Ok(raw) = fig.extract::<figment::value::Value>() {
            collect_secrets("", &raw);
        }
        if let Some(url) = &overrides.database_url {
            register_url_secrets(url);
        }
        let mut cfg: Config = fig.extract().map_err(|e| {
            let mut parts = Vec::new();
            for err in e {
                let secret = err.path.last().is_some_and(|k| is_secret_key(k));
                let mut text = if secret {
                    value_free(&err.kind)
                } else {
                    err.kind.to_string()
                };
                if !err.path.is_empty() {
                    text = format!("key {}: {text}", err.path.join("."));
                }
                if let Some(meta) = &err.metadata {
                    text.push_str(&format!(" (from {})", meta.name));
                }
                parts.push(redact_secrets(&text));
            }
            ConfigError::Parse(parts.join("; "))
        })?;
        if let Some(url) = &overrides.database_url {
            cfg.database.url = Secret::new(url.clone());
        }
        if let Some(f) = overrides.log_format {
            cfg.log.format = f;
        }
        if let Some(s) = &overrides.schema {
            cfg.database.schema = s.clone();
        }
        cfg.apply_defaults();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Fills the embedded defaults: a stdout backend when none is configured, and a catch-all
    /// route when there is exactly one backend and no route.
    pub fn apply_defaults(&mut self) {
        if self.backends.is_empty() {
            self.backends
                .insert("stdout".into(), BackendConfig::Stdout {});
        }
        if self.routes.is_empty() && self.backends.len() == 1 {
            let name = self.backends.keys().next().unwrap().clone();
            self.routes.push(RouteConfig {
                topic: "*".into(),
                backend: name,
                format: BodyFormat::Raw,
            });
        }
        if self.database.max_connections == 0 {
            // One per batch in flight, one for LISTEN, one for housekeeping.
            self.database.max_connections = self.relay.pipeline_depth + 2;
        }
    }

    /// Every section's own checks (the backends' given `relay.publish_timeout`, the routes'
    /// given the backends' names), then the pool size against `relay.pipeline_depth`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.relay.validate()?;
        self.monitor.validate()?;
        self.http.validate()?;
        self.tracing.validate()?;
        self.log.validate()?;
        backends::validate(&self.backends, self.relay.publish_timeout)?;
        let names: Vec<&str> = self.backends.keys().map(String::as_str).collect();
        crate::routing::validate_routes(&self.routes, &names)?;
        in_range(
            "database.max_connections",
            self.database.max_connections as u64,
            (self.relay.pipeline_depth + 1) as u64,
            1000,
        )
        .map_err(|e| match e {
            ConfigError::Invalid { key, message } => ConfigError::Invalid {
                key,
                message: format!("{message} (relay.pipeline_depth + 1 at least)"),
            },
            other => other,
        })
    }

    /// The name this relay gives its database sessions (`application_name`).
    pub fn instance_id(&self) -> String {
        self.relay.instance_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
            format!(
                "{}-{}",
                host.chars().take(24).collect::<String>(),
                std::process::id()
            )
        })
    }
}

/// A figment error about a secret key, without the value serde put into it.
fn value_free(kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    let what = |a: &Actual| match a {
        Actual::Bool(_) => "a boolean".to_string(),
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer".into(),
        Actual::Float(_) => "a float".into(),
        Actual::Char(_) | Actual::Str(_) => "a string".into(),
        Actual::Bytes(_) => "bytes".into(),
        Actual::Other(_) => "a value".into(),
        other => other.to_string(),
    };
    match kind {
        Kind::InvalidType(a, exp) => format!("invalid type: {}, expected {exp}", what(a)),
        Kind::InvalidValue(a, exp) => format!("invalid value: {}, expected {exp}", what(a)),
        Kind::Message(_) => "invalid value (not shown: a secret)".into(),
        other => other.to_string(),
    }
}

/// Environment values are TOML scalars when they parse as one (numbers, booleans) and read back
/// the same, else strings: a password "007" stays "007".
fn parse_env_value(v: &str) -> figment::value::Value {
    use figment::value::{Num, Value};
    let t = v.trim();
    if let Ok(b) = t.parse::<bool>() {
        return Value::from(b);
    }
    if let Ok(n) = t.parse::<i64>() {
        if n.to_string() == t {
            return Value::Num(figment::value::Tag::Default, Num::I64(n));
        }
    }
    Value::from(v.to_string())
}

#[cfg(test)]
mod tests;
