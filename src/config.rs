//! Settings: layered (relay.toml, then `RELAY__SECTION__KEY` environment variables, then
//! command-line flags), unknown keys rejected, every value validated with the key named.
//!
//! Every key, its default and its meaning are documented in the repository's `relay.toml`.

use crate::envelope::{cloudevents, BodyFormat, CeSource, CloudEventsFormat, CloudEventsMode};
use crate::publisher::kafka::KafkaConfig;
use crate::publisher::nats::NatsConfig;
use crate::publisher::pulsar::PulsarConfig;
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
///
/// It takes any scalar (a numeric password given as `RELAY__...=12345` arrives as a number),
/// and its deserialization errors never carry the value: serde's "invalid type: found ..."
/// messages would otherwise print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor("a string (a secret; its value is not shown)"))
            .map(Secret)
    }
}

/// Any scalar as its text; anything else is an error that names only its kind.
struct ScalarVisitor(&'static str);

impl<'de> serde::de::Visitor<'de> for ScalarVisitor {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
}

/// A map of names to scalars, each kept as its text (librdkafka properties: `linger.ms = 5`
/// and `linger.ms = "5"` alike). A value of the wrong kind is reported without the value.
pub fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    struct Scalar(#[serde(deserialize_with = "scalar")] String);
    fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(ScalarVisitor("a string, number or boolean"))
    }
    let m: BTreeMap<String, Scalar> = BTreeMap::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
}

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
    /// TLS: "" (the URL's sslmode, else prefer; on a loopback host with no TLS setting at all,
    /// plaintext where the server takes it), disable, prefer, require, verify-ca or
    /// verify-full.
    pub ssl_mode: String,
    /// PEM file of the CA(s) that sign the server's certificate; "" = the URL's sslrootcert,
    /// else the system's store.
    pub ssl_root_cert: String,
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
            ssl_mode: String::new(),
            ssl_root_cert: String::new(),
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
    /// A claim returns rows while their payloads and headers fit in this many bytes (at least
    /// one row), so large payloads cannot exhaust memory.
    pub batch_max_bytes: usize,
    pub summary_interval: Dur,
    pub instance_id: Option<String>,
    /// Published rows are deleted at once (0) or kept this long, then pruned in batches.
    pub published_retention: Dur,
    pub prune_interval: Dur,
    pub prune_batch: u32,
    /// How events of one aggregate may overlap on the way to the broker.
    pub ordering: OrderingMode,
    /// Pipelined ordering: events of one aggregate in flight at once, at most.
    pub aggregate_window: u32,
    /// How often a relay looks at the other relays and takes or gives up partitions.
    pub rebalance_interval: Dur,
}

/// How events of one aggregate may overlap on the way to the broker (`relay.ordering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OrderingMode {
    /// Up to `relay.aggregate_window` events of an aggregate in flight at once, on backends
    /// that keep the order of what is sent on one connection; if one fails after later ones
    /// were sent, those later ones may reach consumers before its redelivery.
    Pipelined,
    /// One event of an aggregate in flight at a time: a consumer never sees event n+1 before
    /// the first delivery of event n.
    #[default]
    Strict,
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
            batch_max_bytes: 8 * 1024 * 1024,
            summary_interval: Dur::secs(10),
            instance_id: None,
            published_retention: Dur::secs(0),
            prune_interval: Dur::secs(10),
            prune_batch: 10_000,
            ordering: OrderingMode::Strict,
            aggregate_window: 256,
            rebalance_interval: Dur::secs(1),
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
    /// Apache Pulsar through pulsar-rs.
    Pulsar(PulsarConfig),
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Memory {} => "memory",
            BackendConfig::Stdout {} => "stdout",
            BackendConfig::Kafka(_) => "kafka",
            BackendConfig::Nats(_) => "nats",
            BackendConfig::Pulsar(_) => "pulsar",
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
#[serde(try_from = "RouteToml")]
pub struct RouteConfig {
    /// Glob over the topic: `*` any run of characters, `?` one character.
    pub topic: String,
    pub backend: String,
    /// The body format, with a CloudEvents route's mode and source inside it.
    pub format: BodyFormat,
}

/// A route as written in the file: `format` names the format, and a CloudEvents route adds
/// `cloudevents_mode` and `cloudevents_source` beside it (flat keys, like every other
/// section). [`Config::validate`] checks the source, naming the key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteToml {
    topic: String,
    backend: String,
    #[serde(default)]
    format: FormatName,
    cloudevents_mode: Option<CloudEventsMode>,
    cloudevents_source: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FormatName {
    #[default]
    Raw,
    Envelope,
    Cloudevents,
}

impl TryFrom<RouteToml> for RouteConfig {
    type Error = String;

    fn try_from(r: RouteToml) -> Result<Self, String> {
        let format = match r.format {
            FormatName::Cloudevents => BodyFormat::CloudEvents(CloudEventsFormat {
                mode: r.cloudevents_mode.unwrap_or_default(),
                // A missing source is reported by `validate` with the route's index.
                source: CeSource::new(r.cloudevents_source.as_deref().unwrap_or_default()),
            }),
            other => {
                // A CloudEvents key on another format is a mistake the route would ignore.
                let stray = [
                    ("cloudevents_mode", r.cloudevents_mode.is_some()),
                    ("cloudevents_source", r.cloudevents_source.is_some()),
                ];
                if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "route {:?}: {key} applies only to format = \"cloudevents\", this \
                         route's format is {:?}",
                        r.topic,
                        format!("{other:?}").to_ascii_lowercase()
                    ));
                }
                match other {
                    FormatName::Envelope => BodyFormat::Envelope,
                    _ => BodyFormat::Raw,
                }
            }
        };
        Ok(RouteConfig {
            topic: r.topic,
            backend: r.backend,
            format,
        })
    }
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

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
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
        range(
            "relay.aggregate_window",
            r.aggregate_window as u64,
            1,
            10_000,
        )?;
        if r.rebalance_interval.0 < Duration::from_millis(10)
            || r.rebalance_interval.0 > Duration::from_secs(60)
        {
            return Err(ConfigError::Invalid {
                key: "relay.rebalance_interval".into(),
                message: format!("{:?} is out of range: 10ms to 60s", r.rebalance_interval.0),
            });
        }
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
        range(
            "relay.batch_max_bytes",
            r.batch_max_bytes as u64,
            1024,
            1 << 32,
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
                BackendConfig::Pulsar(p) => p.validate(&key, self.relay.publish_timeout)?,
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
            if let BodyFormat::CloudEvents(ce) = route.format {
                if let Some(problem) = cloudevents::source_problem(ce.source.as_str()) {
                    return Err(invalid(format!("routes[{i}].cloudevents_source"), problem));
                }
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

/// Names whose values are secrets, wherever they appear: configuration keys, librdkafka
/// properties, URL query parameters, libpq `key=value` words.
///
/// A name holding "password", "secret", "token", "seed", "credential", "jaas",
/// "oauthbearer.config" or "key" is secret, unless it names a file (ends in `location`, `file`,
/// `path` or `keytab`): `ssl.key.password` and `ssl.key.pem` are, `ssl.key.location` is not.
/// Masking a harmless value costs little; printing a secret one cannot be undone.
pub fn is_secret_key(name: &str) -> bool {
    let k = name.to_ascii_lowercase();
    let file = [
        ".location",
        "_location",
        ".file",
        "_file",
        ".path",
        "_path",
        "keytab",
    ];
    if file.iter().any(|f| k.ends_with(f)) {
        return false;
    }
    [
        "password",
        "passwd",
        "secret",
        "token",
        "seed",
        "credential",
        "jaas",
        "oauthbearer.config",
        "key",
        ".pem",
    ]
    .iter()
    .any(|w| k.contains(w))
}

/// `%XX` decoded (and `+` as a space in a query), for comparing URL parts with what a client
/// sends.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A URL cut into what redaction and validation need.
struct UrlParts<'a> {
    scheme: &'a str,
    /// Between `://` and the last `@` before the path or query; None without an `@`.
    userinfo: Option<&'a str>,
    /// After the userinfo, up to the query.
    rest: &'a str,
    /// The raw query pairs, undecoded.
    query: Vec<(&'a str, &'a str)>,
}

fn url_parts(url: &str) -> Option<UrlParts<'_>> {
    let s = url.find("://")?;
    let scheme = &url[..s];
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return None;
    }
    let after = &url[s + 3..];
    let (before_query, query) = match after.find('?') {
        Some(q) => (&after[..q], &after[q + 1..]),
        None => (after, ""),
    };
    // A raw '/' or '@' in a password is common; the host is after the last '@'.
    let (userinfo, rest) = match before_query.rfind('@') {
        Some(at) => (Some(&before_query[..at]), &before_query[at + 1..]),
        None => (None, before_query),
    };
    let query = query
        .split('#')
        .next()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    Some(UrlParts {
        scheme,
        userinfo,
        rest,
        query,
    })
}

fn is_postgres_scheme(scheme: &str) -> bool {
    scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")
}

/// The URL with its secrets replaced, for logs and messages: the password of the userinfo (all
/// of a userinfo without a password outside Postgres URLs: NATS takes it as a token), and every
/// query parameter with a secret name (`?password=`). Anything that is not a URL (a libpq
/// `key=value` string) is not shown at all.
pub fn redact_url(url: &str) -> String {
    let Some(p) = url_parts(url) else {
        return "(not shown: not a URL)".into();
    };
    let mut out = format!("{}://", p.scheme);
    if let Some(u) = p.userinfo {
        match u.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            None if is_postgres_scheme(p.scheme) => out.push_str(&format!("{u}@")),
            None => out.push_str("***@"),
        }
    }
    out.push_str(p.rest);
    if !p.query.is_empty() {
        let q: Vec<String> = p
            .query
            .iter()
            .map(|(k, v)| {
                if is_secret_key(&percent_decode(k, true)) {
                    format!("{k}=***")
                } else if v.is_empty() {
                    k.to_string()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// Every secret value known to this process (from the configuration), so text that reaches a
/// log line, an error or a panic message can be scrubbed of them whatever code produced it.
static SECRETS: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Secrets shorter than this are not scrubbed from free text: they would mask ordinary words.
const MIN_SCRUBBED: usize = 4;

/// Remembers `value` as a secret: [`redact_secrets`] replaces it from now on.
pub fn register_secret(value: &str) {
    let v = value.trim();
    if v.chars().count() < MIN_SCRUBBED {
        return;
    }
    let mut all = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !all.iter().any(|s| s == v) {
        all.push(v.to_string());
        // Longest first, so a secret containing another is replaced whole.
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Registers the secrets inside a URL (userinfo, secret query parameters), in the forms they
/// are written and decoded; or, for a libpq `key=value` string, the values of secret keys.
pub fn register_url_secrets(url: &str) {
    match url_parts(url) {
        Some(p) => {
            if let Some(u) = p.userinfo {
                match u.split_once(':') {
                    Some((_, pw)) => {
                        register_secret(pw);
                        register_secret(&percent_decode(pw, false));
                    }
                    None if !is_postgres_scheme(p.scheme) => {
                        register_secret(u);
                        register_secret(&percent_decode(u, false));
                    }
                    None => {}
                }
            }
            for (k, v) in p.query {
                if is_secret_key(&percent_decode(k, true)) {
                    register_secret(v);
                    register_secret(&percent_decode(v, true));
                }
            }
        }
        None => {
            for word in url.split_whitespace() {
                if let Some((k, v)) = word.split_once('=') {
                    if is_secret_key(k.trim()) {
                        register_secret(v.trim_matches(['\'', '"']));
                    }
                }
            }
        }
    }
}

/// `text` with every registered secret replaced by `***`.
pub fn redact_secrets(text: &str) -> String {
    let all = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for s in all.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

/// Registers every secret of a configuration tree before it is typed, so even a message
/// about a value of the wrong type (which serde prints) cannot show one.
fn collect_secrets(key: &str, v: &figment::value::Value) {
    use figment::value::Value;
    match v {
        Value::Dict(_, d) => {
            for (k, v) in d {
                collect_secrets(k, v);
            }
        }
        Value::Array(_, a) => {
            for v in a {
                collect_secrets(key, v);
            }
        }
        leaf => {
            let text = match serde_json::to_value(leaf) {
                Ok(serde_json::Value::String(s)) => s,
                Ok(other) => other.to_string(),
                Err(_) => return,
            };
            if is_secret_key(key) {
                register_secret(&text);
            } else if key == "url" || key == "servers" || text.contains("://") {
                register_url_secrets(&text);
            }
            if key == "creds_file" {
                register_creds_file(&text);
            }
        }
    }
}

/// A NATS creds file holds a JWT and an nkey seed between `-----` marker lines.
fn register_creds_file(path: &str) {
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with("--") && !line.contains(' ') {
                register_secret(line);
            }
        }
    }
}

/// Why a Postgres connection failed, in the terms of the settings that fix it, when the
/// driver's or the server's words alone leave it unclear.
pub fn connection_hint(error: &str) -> Option<&'static str> {
    let e = error;
    if e.contains("no encryption") {
        Some(
            "the server accepts only TLS connections from here: set sslmode=require, \
             verify-ca or verify-full (database.ssl_mode or the URL's sslmode)",
        )
    } else if e.contains("UnknownIssuer") || e.contains("BadSignature") {
        Some(
            "the server's certificate is not signed by a trusted CA: give the CA that signed \
             it in database.ssl_root_cert (or the URL's sslrootcert)",
        )
    } else if e.contains("NotValidForName") || e.contains("not valid for name") {
        Some(
            "the server's certificate does not name the host of database.url: connect by a \
             name the certificate lists (verify-full checks it, and so does verify-ca with \
             this driver, sqlx 0.8 on rustls 0.23.24 or later: sqlx issue #3793)",
        )
    } else if e.contains("server does not support TLS") {
        Some(
            "the server has TLS off: turn ssl on in the server or set sslmode to disable or \
             prefer",
        )
    } else {
        None
    }
}

/// What `ssl_mode` may be.
const SSL_MODES: [&str; 5] = ["disable", "prefer", "require", "verify-ca", "verify-full"];

/// The query parameters of a Postgres URL the driver understands.
const URL_PARAMS: [&str; 20] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
    "connect_timeout",
    "target_session_attrs",
];

/// TLS to Postgres as configured: `database.ssl_mode` and `database.ssl_root_cert`, else the
/// URL's `sslmode` and `sslrootcert`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseTls {
    /// None: the driver's default (`PGSSLMODE`, else prefer).
    pub mode: Option<String>,
    pub root_cert: Option<String>,
    /// The URL names a client certificate or key (`sslcert`, `sslkey`).
    pub client_cert: bool,
}

impl DatabaseConfig {
    /// The TLS settings from the keys and the URL together (validated: they do not disagree).
    pub fn tls(&self) -> DatabaseTls {
        let mut from_url = DatabaseTls::default();
        if let Some(p) = url_parts(self.url.expose()) {
            for (k, v) in p.query {
                match percent_decode(k, true).as_str() {
                    "sslmode" | "ssl-mode" => from_url.mode = Some(percent_decode(v, true)),
                    "sslrootcert" | "ssl-root-cert" | "ssl-ca" => {
                        from_url.root_cert = Some(percent_decode(v, true))
                    }
                    "sslcert" | "ssl-cert" | "sslkey" | "ssl-key" => from_url.client_cert = true,
                    _ => {}
                }
            }
        }
        let key = |s: &str| (!s.is_empty()).then(|| s.to_string());
        DatabaseTls {
            mode: key(&self.ssl_mode).or(from_url.mode),
            root_cert: key(&self.ssl_root_cert).or(from_url.root_cert),
            client_cert: from_url.client_cert,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        let Some(p) = url_parts(url).filter(|p| is_postgres_scheme(p.scheme)) else {
            return Err(invalid(
                "database.url",
                "is not a postgres:// URL (its value is not shown: it may hold a password); \
                 write postgres://user:password@host:5432/database?sslmode=verify-full \
                 (libpq key=value strings are not understood)",
            ));
        };
        let mut url_mode = None;
        let mut url_root = None;
        for (k, v) in &p.query {
            let name = percent_decode(k, true);
            let known = URL_PARAMS.contains(&name.as_str())
                || (name.starts_with("options[") && name.ends_with(']'));
            if !known {
                return Err(invalid(
                    "database.url",
                    format!(
                        "query parameter {name:?} is not understood; known: {}",
                        URL_PARAMS.join(", ")
                    ),
                ));
            }
            match name.as_str() {
                "sslmode" | "ssl-mode" => url_mode = Some(percent_decode(v, true)),
                "sslrootcert" | "ssl-root-cert" | "ssl-ca" => {
                    url_root = Some(percent_decode(v, true))
                }
                // libpq's, which the driver would ignore with a warning: the relay has its
                // own key, and silently different behaviour is worse than a refusal.
                "connect_timeout" | "target_session_attrs" => {
                    return Err(invalid(
                        "database.url",
                        format!(
                            "query parameter {name:?} is not supported{}",
                            if name == "connect_timeout" {
                                "; use database.connect_timeout"
                            } else {
                                ""
                            }
                        ),
                    ))
                }
                _ => {}
            }
        }
        let mode_ok = |key: &str, m: &str| {
            if SSL_MODES.contains(&m) {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!(
                        "sslmode {m:?} is not allowed; allowed: {} (\"allow\" is not \
                         supported by the driver)",
                        SSL_MODES.join(", ")
                    ),
                ))
            }
        };
        if let Some(m) = &url_mode {
            mode_ok("database.url", m)?;
        }
        if !self.ssl_mode.is_empty() {
            mode_ok("database.ssl_mode", &self.ssl_mode)?;
            if let Some(m) = url_mode.as_ref().filter(|m| **m != self.ssl_mode) {
                return Err(invalid(
                    "database.ssl_mode",
                    format!(
                        "is {:?} but database.url says sslmode={m}; set it in one place",
                        self.ssl_mode
                    ),
                ));
            }
        }
        if !self.ssl_root_cert.is_empty() {
            if let Some(r) = url_root.as_ref().filter(|r| **r != self.ssl_root_cert) {
                return Err(invalid(
                    "database.ssl_root_cert",
                    format!(
                        "is {:?} but database.url says sslrootcert={r}; set it in one place",
                        self.ssl_root_cert
                    ),
                ));
            }
        }
        let tls = self.tls();
        if let Some(root) = &tls.root_cert {
            let key = if self.ssl_root_cert.is_empty() {
                "database.url (sslrootcert)"
            } else {
                "database.ssl_root_cert"
            };
            match std::fs::read_to_string(root) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => {
                    return Err(invalid(
                        key,
                        format!("{root:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
                    ))
                }
                Err(e) => return Err(invalid(key, format!("{root:?} cannot be read: {e}"))),
            }
            let mode = tls.mode.as_deref().unwrap_or("prefer");
            if !["require", "verify-ca", "verify-full"].contains(&mode) {
                return Err(invalid(
                    key,
                    format!(
                        "a CA file is used only with sslmode require, verify-ca or \
                         verify-full; sslmode is {mode}"
                    ),
                ));
            }
        }
        Ok(())
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

    /// The Kafka, NATS and Pulsar sections of relay.toml are commented out (no broker by default);
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
        let nats: Doc = toml::from_str(&section("# ---- NATS", Some("# ---- Pulsar"))).unwrap();
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
        let pulsar: Doc = toml::from_str(&section("# ---- Pulsar", Some("# Routes:"))).unwrap();
        let BackendConfig::Pulsar(mut p) = pulsar.backends["pulsar"].clone() else {
            panic!("a pulsar backend")
        };
        assert_eq!(p.topics.len(), 1, "the example topic");
        p.topics.clear();
        p.validate("backends.pulsar", Dur::secs(30)).unwrap();
        assert_eq!(format!("{p:?}"), format!("{:?}", PulsarConfig::default()));
    }

    #[test]
    fn urls_are_redacted_in_every_form() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:5432/db?sslmode=require&password=hunter3"),
            "postgres://u:***@h:5432/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss/w@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("nats://s3cr3tt0ken@h:4222"), "nats://***@h:4222");
        let kv = redact_url("host=h user=u password=hunter2");
        assert!(!kv.contains("hunter2"), "{kv}");
    }

    #[test]
    fn secret_names_exclude_file_locations() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "token",
            "nkey_seed",
            "sasl_password",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "ssl.key.location",
            "ssl.keystore.location",
            "sasl.kerberos.keytab",
            "tls_key_file",
            "linger.ms",
            "acks",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn type_errors_about_secrets_do_not_show_them() {
        // A numeric password from the environment is a password, digits kept.
        let c = load(
            "[backends.n]\ntype = \"nats\"\nuser = \"u\"\n",
            &[("RELAY__BACKENDS__N__PASSWORD", "0071234")],
        )
        .unwrap();
        let BackendConfig::Nats(n) = &c.backends["n"] else {
            panic!("nats")
        };
        assert_eq!(n.password.as_ref().unwrap().expose(), "0071234");
        let err = load(
            "[backends.n]\ntype = \"nats\"\nuser = \"u\"\npassword = [\"hunter2-list\"]\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2-list"), "{err}");
        // A secret put where a number belongs: serde would print it.
        let err = load(
            "[backends.k]\ntype = \"kafka\"\nsasl_password = \"hunter2-pw\"\n",
            &[("RELAY__RELAY__BATCH_SIZE", "hunter2-pw")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("batch_size") && !err.contains("hunter2-pw"),
            "{err}"
        );
        let err = load(
            "[backends.k]\ntype = \"kafka\"\n[backends.k.properties]\n\
             \"sasl.password\" = { x = \"hunter2-map\" }\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2-map"), "{err}");
    }

    #[test]
    fn database_urls_are_checked_without_showing_them() {
        let err = load("[database]\nurl = \"host=h password=hunter2-kv\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database.url") && err.contains("postgres://") && !err.contains("hunter2"),
            "{err}"
        );
        let err = load(
            "[database]\nurl = \"postgres://u@h/db?sslpassword=hunter2-q\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"sslpassword\"") && !err.contains("hunter2-q"),
            "{err}"
        );
        let err = load(
            "[database]\nurl = \"postgres://u@h/db?sslmode=allow\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("verify-full") && err.contains("allow"),
            "{err}"
        );
        let err = load(
            "[database]\nurl = \"postgres://u@h/db?sslmode=require\"\nssl_mode = \"verify-full\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("database.ssl_mode"), "{err}");
        let err = load(
            "[database]\nssl_mode = \"verify-ca\"\nssl_root_cert = \"/nonexistent/ca.pem\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("database.ssl_root_cert") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
        let err = load("[database]\nssl_mode = \"strict\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database.ssl_mode") && err.contains("strict"),
            "{err}"
        );
        let c = load(
            "[database]\nurl = \"postgres://u:pw@h/db?sslmode=verify-full&application_name=x\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.database.tls().mode.as_deref(), Some("verify-full"));
        assert!(!c.database.tls().client_cert);
        // A client certificate or key in the URL is a TLS setting too.
        for param in [
            "sslcert=/c.crt",
            "ssl-cert=/c.crt",
            "sslkey=/c.key",
            "ssl-key=/c.key",
        ] {
            let c = load(
                &format!("[database]\nurl = \"postgres://u@127.0.0.1/db?{param}\"\n"),
                &[],
            )
            .unwrap();
            assert!(c.database.tls().client_cert, "{param}");
        }
    }

    #[test]
    fn registered_secrets_are_scrubbed_from_any_text() {
        register_url_secrets("postgres://u:Hunter%2F99@h/db");
        assert_eq!(
            redact_secrets("auth failed for Hunter/99 and Hunter%2F99"),
            "auth failed for *** and ***"
        );
        // Too short to scrub without masking ordinary words.
        register_secret("ab");
        assert_eq!(redact_secrets("abc"), "abc");
    }

    #[test]
    fn cloudevents_routes_take_a_mode_and_a_required_source() {
        let route = |keys: &str| {
            load(
                &format!("[backends.a]\ntype = \"stdout\"\n[[routes]]\ntopic = \"*\"\nbackend = \"a\"\n{keys}"),
                &[],
            )
        };
        let c = route("format = \"cloudevents\"\ncloudevents_source = \"urn:example:orders\"\n")
            .unwrap();
        let BodyFormat::CloudEvents(ce) = c.routes[0].format else {
            panic!("cloudevents: {:?}", c.routes[0].format)
        };
        assert_eq!(ce.mode, CloudEventsMode::Binary, "the default mode");
        assert_eq!(ce.source.as_str(), "urn:example:orders");
        let c = route(
            "format = \"cloudevents\"\ncloudevents_mode = \"structured\"\n\
             cloudevents_source = \"https://orders.example.com\"\n",
        )
        .unwrap();
        assert!(matches!(
            c.routes[0].format,
            BodyFormat::CloudEvents(CloudEventsFormat {
                mode: CloudEventsMode::Structured,
                ..
            })
        ));
        assert_eq!(
            c.routes[0].format.to_string(),
            "cloudevents (structured, source \"https://orders.example.com\")"
        );

        let err = route("format = \"cloudevents\"\n").unwrap_err().to_string();
        assert!(
            err.contains("routes[0].cloudevents_source") && err.contains("required"),
            "{err}"
        );
        let err = route("format = \"cloudevents\"\ncloudevents_source = \"orders service\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("routes[0].cloudevents_source") && err.contains("position 7"),
            "{err}"
        );
        let err = route(
            "format = \"cloudevents\"\ncloudevents_mode = \"batch\"\ncloudevents_source = \"/x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("batch") && err.contains("binary"), "{err}");
        // A CloudEvents key on another format would be ignored: it is refused, named.
        let err = route("format = \"envelope\"\ncloudevents_source = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cloudevents_source") && err.contains("\"envelope\""),
            "{err}"
        );
        let err = route("cloudevents_mode = \"binary\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cloudevents_mode") && err.contains("\"raw\""),
            "{err}"
        );
        let err = route("format = \"cloudevent\"\n").unwrap_err().to_string();
        assert!(err.contains("cloudevent"), "{err}");
        let err = route("fromat = \"raw\"\n").unwrap_err().to_string();
        assert!(err.contains("fromat"), "{err}");
    }

    /// relay.toml's commented CloudEvents route, uncommented, is a valid route.
    #[test]
    fn the_documented_cloudevents_route_parses() {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml"))
                .unwrap();
        let start = text
            .find("# A CloudEvents route")
            .expect("the example route");
        let example: String = text[start..]
            .lines()
            .skip(1)
            .map_while(|l| l.strip_prefix("# "))
            .collect::<Vec<_>>()
            .join("\n");
        #[derive(Deserialize)]
        struct Doc {
            routes: Vec<RouteConfig>,
        }
        let doc: Doc = toml::from_str(&example).unwrap();
        let BodyFormat::CloudEvents(ce) = doc.routes[0].format else {
            panic!("{example}")
        };
        assert_eq!(ce.mode, CloudEventsMode::default());
        assert_eq!(cloudevents::source_problem(ce.source.as_str()), None);
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
