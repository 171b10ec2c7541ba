//! Settings: layered (relay.toml, then `RELAY__SECTION__KEY` environment variables, then
//! command-line flags), unknown keys rejected, every value validated with the key named.
//!
//! Every key, its default and its meaning are documented in the repository's `relay.toml`.

use crate::envelope::BodyFormat;
use crate::publisher::kafka::KafkaConfig;
use crate::publisher::nats::NatsConfig;
use figment::providers::{Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// A configuration problem, naming the key and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration file {path}: {message}")]
    File { path: String, message: String },
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A value that must never be printed (a URL with a password, a token).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A duration written as `250ms`, `30s`, `5m`, `2h` or `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn ms(n: u64) -> Self {
        Dur(Duration::from_millis(n))
    }
    pub const fn secs(n: u64) -> Self {
        Dur(Duration::from_secs(n))
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{s:?} has no unit; write it like 250ms, 30s, 5m, 2h or 1d"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 30s, 5m, 2h or 1d"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => {
            return Err(format!(
                "{s:?} has unit {other:?}; allowed units are ms, s, m, h, d"
            ))
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration string like 250ms, 30s, 5m, 2h or 1d")
        })?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub schema: String,
    pub table: String,
    pub max_connections: u32,
    pub connect_timeout: Dur,
    pub statement_timeout: Dur,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/postgres"),
            schema: "outbox".into(),
            table: "outbox".into(),
            max_connections: 0,
            connect_timeout: Dur::secs(5),
            statement_timeout: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub batch_size: u32,
    pub pipeline_depth: u32,
    pub max_attempts: u32,
    pub backoff_initial: Dur,
    pub backoff_max: Dur,
    pub poll_interval: Dur,
    pub listen: bool,
    pub debounce: Dur,
    pub publish_timeout: Dur,
    pub shutdown_timeout: Dur,
    pub blocked_retry: Dur,
    pub max_payload_bytes: usize,
    pub summary_interval: Dur,
    pub instance_id: Option<String>,
    /// Published rows are deleted at once (0) or kept this long, then pruned in batches.
    pub published_retention: Dur,
    pub prune_interval: Dur,
    pub prune_batch: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 1000,
            pipeline_depth: 4,
            max_attempts: 10,
            backoff_initial: Dur::ms(500),
            backoff_max: Dur::secs(300),
            poll_interval: Dur::secs(1),
            listen: true,
            debounce: Dur::ms(0),
            publish_timeout: Dur::secs(30),
            shutdown_timeout: Dur::secs(10),
            blocked_retry: Dur::ms(50),
            max_payload_bytes: 1024 * 1024,
            summary_interval: Dur::secs(10),
            instance_id: None,
            published_retention: Dur::secs(0),
            prune_interval: Dur::secs(10),
            prune_batch: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The HTTP endpoints: /metrics, /livez, /readyz, /health.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port` to listen on; empty: no HTTP server.
    pub address: String,
}

/// The relay's view of itself and the backlog: how often it is refreshed and when it alarms.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Probe Postgres and every backend (readiness, connection gauges) this often.
    pub health_interval: Dur,
    /// Count the backlog (pending, failed, oldest pending age) this often. One index-only scan
    /// of the backlog: cheap on a small backlog, a noticeable read on tens of millions.
    pub backlog_interval: Dur,
    /// Backlog thresholds; 0 turns one off. Crossing one logs once and sets
    /// `outbox_relay_backlog_state`.
    pub pending_warning: u64,
    pub pending_critical: u64,
    pub age_warning: Dur,
    pub age_critical: Dur,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            health_interval: Dur::secs(5),
            backlog_interval: Dur::secs(15),
            pending_warning: 0,
            pending_critical: 0,
            age_warning: Dur::secs(0),
            age_critical: Dur::secs(0),
        }
    }
}

/// OpenTelemetry traces over OTLP/HTTP; off while `otlp_endpoint` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces`; empty: no tracing.
    pub otlp_endpoint: String,
    pub service_name: String,
    /// Share of traces started here (rows without a traceparent) that are sampled, 0.0 to 1.0.
    /// Rows with a traceparent follow its sampled flag.
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: String::new(),
            service_name: "outbox-relay".into(),
            sample_ratio: 1.0,
        }
    }
}

/// One backend, by its `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// In-process; for tests and demos.
    Memory {},
    /// One JSON line per event on standard output.
    Stdout {},
    /// Kafka through librdkafka.
    Kafka(KafkaConfig),
    /// NATS: JetStream or core, per topic.
    Nats(NatsConfig),
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Memory {} => "memory",
            BackendConfig::Stdout {} => "stdout",
            BackendConfig::Kafka(_) => "kafka",
            BackendConfig::Nats(_) => "nats",
        }
    }
}

/// What the relay does at start-up about the topics (Kafka) or streams (JetStream) it is
/// configured with. Never per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Provisioning {
    /// Assume they exist; no admin calls at all.
    #[default]
    Skip,
    /// Create the missing ones; leave existing ones as they are.
    CreateOnly,
    /// Create the missing ones and bring existing ones to the configured settings.
    CreateOrUpdate,
    /// Change nothing; report every difference from the configured settings.
    ValidateOnly,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Glob over the topic: `*` any run of characters, `?` one character.
    pub topic: String,
    pub backend: String,
    #[serde(default)]
    pub format: BodyFormat,
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
        let mut cfg: Config = fig.extract().map_err(|e| {
            let mut parts = Vec::new();
            for err in e {
                let mut text = err.kind.to_string();
                if !err.path.is_empty() {
                    text = format!("key {}: {text}", err.path.join("."));
                }
                if let Some(meta) = &err.metadata {
                    text.push_str(&format!(" (from {})", meta.name));
                }
                parts.push(text);
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

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_identifier("database.schema", &self.database.schema, 63)?;
        // Index and trigger names append up to 23 characters to the table name.
        validate_identifier("database.table", &self.database.table, 40)?;
        let r = &self.relay;
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(invalid(
                    key,
                    format!("{v} is not allowed, must be {lo} to {hi}"),
                ))
            } else {
                Ok(())
            }
        };
        range("relay.batch_size", r.batch_size as u64, 1, 50_000)?;
        range("relay.pipeline_depth", r.pipeline_depth as u64, 1, 64)?;
        range("relay.max_attempts", r.max_attempts as u64, 1, 1_000_000)?;
        range(
            "database.max_connections",
            self.database.max_connections as u64,
            (r.pipeline_depth + 1) as u64,
            1000,
        )
        .map_err(|e| match e {
            ConfigError::Invalid { key, message } => ConfigError::Invalid {
                key,
                message: format!("{message} (relay.pipeline_depth + 1 at least)"),
            },
            other => other,
        })?;
        range(
            "relay.max_payload_bytes",
            r.max_payload_bytes as u64,
            1,
            1 << 30,
        )?;
        if r.backoff_initial.0.is_zero() {
            return Err(invalid("relay.backoff_initial", "must be more than 0"));
        }
        if r.backoff_max < r.backoff_initial {
            return Err(invalid(
                "relay.backoff_max",
                format!(
                    "{:?} is less than relay.backoff_initial ({:?})",
                    r.backoff_max.0, r.backoff_initial.0
                ),
            ));
        }
        for (key, d) in [
            ("relay.poll_interval", r.poll_interval),
            ("relay.publish_timeout", r.publish_timeout),
            ("relay.summary_interval", r.summary_interval),
            ("relay.blocked_retry", r.blocked_retry),
            ("relay.prune_interval", r.prune_interval),
            ("monitor.health_interval", self.monitor.health_interval),
            ("monitor.backlog_interval", self.monitor.backlog_interval),
            (
                "database.statement_timeout",
                self.database.statement_timeout,
            ),
            ("database.connect_timeout", self.database.connect_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be more than 0"));
            }
        }
        range("relay.prune_batch", r.prune_batch as u64, 1, 1_000_000)?;
        let m = &self.monitor;
        if m.pending_warning > 0 && m.pending_critical > 0 && m.pending_critical < m.pending_warning
        {
            return Err(invalid(
                "monitor.pending_critical",
                format!(
                    "{} is less than monitor.pending_warning ({})",
                    m.pending_critical, m.pending_warning
                ),
            ));
        }
        if !m.age_warning.0.is_zero()
            && !m.age_critical.0.is_zero()
            && m.age_critical < m.age_warning
        {
            return Err(invalid(
                "monitor.age_critical",
                format!(
                    "{:?} is less than monitor.age_warning ({:?})",
                    m.age_critical.0, m.age_warning.0
                ),
            ));
        }
        if !self.http.address.is_empty()
            && self.http.address.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "http.address",
                format!(
                    "{:?} is not a listen address like 127.0.0.1:9464 or 0.0.0.0:9464 (empty: no HTTP server)",
                    self.http.address
                ),
            ));
        }
        let t = &self.tracing;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(invalid(
                "tracing.sample_ratio",
                format!("{} is not allowed, must be 0.0 to 1.0", t.sample_ratio),
            ));
        }
        let is_url = ["http://", "https://"]
            .iter()
            .any(|p| t.otlp_endpoint.starts_with(p));
        if !t.otlp_endpoint.is_empty() && !is_url {
            return Err(invalid(
                "tracing.otlp_endpoint",
                format!(
                    "{:?} is not an http:// or https:// URL (empty: tracing off)",
                    t.otlp_endpoint
                ),
            ));
        }
        if t.service_name.is_empty() {
            return Err(invalid("tracing.service_name", "must not be empty"));
        }
        if let Some(id) = &r.instance_id {
            if id.is_empty() || id.len() > 40 || !id.chars().all(|c| c.is_ascii_graphic()) {
                return Err(invalid(
                    "relay.instance_id",
                    format!("{id:?} is not allowed: 1 to 40 printable ASCII characters"),
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("{:?}: {e}", self.log.level)))?;
        for name in self.backends.keys() {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(invalid(
                    format!("backends.{name}"),
                    "backend names use ASCII letters, digits, '-' and '_'",
                ));
            }
        }
        for (name, b) in &self.backends {
            let key = format!("backends.{name}");
            match b {
                BackendConfig::Kafka(k) => k.validate(&key, self.relay.publish_timeout)?,
                BackendConfig::Nats(n) => n.validate(&key)?,
                BackendConfig::Memory {} | BackendConfig::Stdout {} => {}
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if !self.backends.contains_key(&route.backend) {
                let known: Vec<&str> = self.backends.keys().map(|s| s.as_str()).collect();
                return Err(invalid(
                    format!("routes[{i}].backend"),
                    format!(
                        "{:?} is not a configured backend; configured: {}",
                        route.backend,
                        known.join(", ")
                    ),
                ));
            }
            if route.topic.is_empty() || route.topic.contains(char::is_whitespace) {
                return Err(invalid(
                    format!("routes[{i}].topic"),
                    format!(
                        "{:?} is not a topic pattern: non-empty, no spaces",
                        route.topic
                    ),
                ));
            }
        }
        Ok(())
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

/// Environment values are TOML scalars when they parse as one (numbers, booleans), else strings.
fn parse_env_value(v: &str) -> figment::value::Value {
    use figment::value::{Num, Value};
    let t = v.trim();
    if let Ok(b) = t.parse::<bool>() {
        return Value::from(b);
    }
    if let Ok(n) = t.parse::<i64>() {
        return Value::Num(figment::value::Tag::Default, Num::I64(n));
    }
    Value::from(v.to_string())
}

/// A lowercase SQL identifier, so it never needs quoting and is safe to put into SQL text.
pub fn validate_identifier(key: &str, value: &str, max: usize) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "{value:?} is not allowed: a lowercase SQL identifier of 1 to {max} characters \
                 (a-z, 0-9, _; not starting with a digit)"
            ),
        ))
    }
}

/// The URL with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        Config::load_from(
            Some(f.path()),
            &Overrides::default(),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn empty_file_gives_defaults_with_stdout_catch_all() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.relay.batch_size, 1000);
        assert!(matches!(c.backends["stdout"], BackendConfig::Stdout {}));
        assert_eq!(c.routes[0].topic, "*");
        assert_eq!(c.database.max_connections, c.relay.pipeline_depth + 2);
    }

    #[test]
    fn unknown_key_is_rejected_naming_it() {
        let err = load("[relay]\nbatch_sise = 10\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_sise"), "{err}");
        let err = load("[relais]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("relais"), "{err}");
        let err = load("[backends.k]\ntype = \"stdout\"\nbroker = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker"), "{err}");
    }

    #[test]
    fn environment_overrides_file_and_names_bad_keys() {
        let c = load(
            "[relay]\nbatch_size = 10\n",
            &[("RELAY__RELAY__BATCH_SIZE", "20")],
        )
        .unwrap();
        assert_eq!(c.relay.batch_size, 20);
        let c = load("", &[("RELAY__RELAY__POLL_INTERVAL", "250ms")]).unwrap();
        assert_eq!(c.relay.poll_interval.0, Duration::from_millis(250));
        let err = load("", &[("RELAY__RELAY__BATCHSIZE", "20")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("batchsize"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key_and_the_allowed_range() {
        let err = load("[relay]\nbatch_size = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("relay.batch_size") && err.contains("1 to 50000"),
            "{err}"
        );
        let err = load("[database]\ntable = \"Out-box\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database.table") && err.contains("Out-box"),
            "{err}"
        );
        let err = load("[relay]\npoll_interval = \"5 parsecs\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("poll_interval") && err.contains("parsecs"),
            "{err}"
        );
        let err = load(
            "[backends.a]\ntype = \"stdout\"\n[[routes]]\ntopic = \"*\"\nbackend = \"b\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("routes[0].backend") && err.contains("\"b\""),
            "{err}"
        );
        let err = load("[backends.a]\ntype = \"carrier-pigeon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("carrier-pigeon"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = load("[database]\nurl = \"postgres://u:hunter2@h/db\"\n", &[]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            redact_url("postgres://u:hunter2@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn the_documented_relay_toml_parses_and_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml");
        let c = Config::load_from(Some(&path), &Overrides::default(), Vec::new()).unwrap();
        let mut d = Config::default();
        d.apply_defaults();
        assert_eq!(format!("{:?}", c.database), format!("{:?}", d.database));
        assert_eq!(c.database.url.expose(), d.database.url.expose());
        assert_eq!(format!("{:?}", c.relay), format!("{:?}", d.relay));
        assert_eq!(format!("{:?}", c.log), format!("{:?}", d.log));
        assert_eq!(format!("{:?}", c.http), format!("{:?}", d.http));
        assert_eq!(format!("{:?}", c.monitor), format!("{:?}", d.monitor));
        assert_eq!(format!("{:?}", c.tracing), format!("{:?}", d.tracing));
        assert_eq!(format!("{:?}", c.backends), format!("{:?}", d.backends));
        assert_eq!(format!("{:?}", c.routes), format!("{:?}", d.routes));
    }

    /// The Kafka and NATS sections of relay.toml are commented out (no broker by default);
    /// uncommented, they must parse and state the defaults.
    #[test]
    fn the_documented_broker_sections_state_the_defaults() {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml"))
                .unwrap();
        let section = |from: &str, to: Option<&str>| -> String {
            let start = text.find(from).expect(from);
            let end = to.map(|t| text.find(t).expect(t)).unwrap_or(text.len());
            text[start..end]
                .lines()
                .filter_map(|l| l.strip_prefix("# "))
                .filter(|l| l.starts_with('[') || l.contains(" = "))
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        };
        #[derive(Deserialize)]
        struct Doc {
            backends: BTreeMap<String, BackendConfig>,
        }
        let kafka: Doc = toml::from_str(&section("# ---- Kafka", Some("# ---- NATS"))).unwrap();
        let BackendConfig::Kafka(mut k) = kafka.backends["kafka"].clone() else {
            panic!("a kafka backend")
        };
        assert_eq!(k.topics.len(), 1, "the example topic");
        k.topics.clear();
        assert_eq!(format!("{k:?}"), format!("{:?}", KafkaConfig::default()));
        let nats: Doc = toml::from_str(&section("# ---- NATS", None)).unwrap();
        let BackendConfig::Nats(mut n) = nats.backends["nats"].clone() else {
            panic!("a nats backend")
        };
        let orders = n.streams.remove("ORDERS").expect("the example stream");
        assert_eq!(
            orders,
            crate::publisher::nats::config::StreamSettings {
                subjects: vec!["orders.>".into()],
                ..Default::default()
            }
        );
        n.topics.clear();
        assert_eq!(format!("{n:?}"), format!("{:?}", NatsConfig::default()));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("\"y\""));
    }
}
