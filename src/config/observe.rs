//! How the relay is watched: `[log]`, `[http]`, `[monitor]` and `[tracing]`.

use super::value::{invalid, non_zero, ConfigError, Dur};
use serde::Deserialize;

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

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| invalid("log.level", format!("{:?}: {e}", self.level)))
    }
}

impl HttpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.address.is_empty() && self.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.address",
                format!(
                    "{:?} is not a listen address like 127.0.0.1:9464 or 0.0.0.0:9464 (empty: no HTTP server)",
                    self.address
                ),
            ));
        }
        Ok(())
    }
}

impl MonitorConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        non_zero(&[
            ("monitor.health_interval", self.health_interval),
            ("monitor.backlog_interval", self.backlog_interval),
        ])?;
        if self.pending_warning > 0
            && self.pending_critical > 0
            && self.pending_critical < self.pending_warning
        {
            return Err(invalid(
                "monitor.pending_critical",
                format!(
                    "{} is less than monitor.pending_warning ({})",
                    self.pending_critical, self.pending_warning
                ),
            ));
        }
        if !self.age_warning.0.is_zero()
            && !self.age_critical.0.is_zero()
            && self.age_critical < self.age_warning
        {
            return Err(invalid(
                "monitor.age_critical",
                format!(
                    "{:?} is less than monitor.age_warning ({:?})",
                    self.age_critical.0, self.age_warning.0
                ),
            ));
        }
        Ok(())
    }
}

impl TracingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "tracing.sample_ratio",
                format!("{} is not allowed, must be 0.0 to 1.0", self.sample_ratio),
            ));
        }
        let is_url = ["http://", "https://"]
            .iter()
            .any(|p| self.otlp_endpoint.starts_with(p));
        if !self.otlp_endpoint.is_empty() && !is_url {
            return Err(invalid(
                "tracing.otlp_endpoint",
                format!(
                    "{:?} is not an http:// or https:// URL (empty: tracing off)",
                    self.otlp_endpoint
                ),
            ));
        }
        if self.service_name.is_empty() {
            return Err(invalid("tracing.service_name", "must not be empty"));
        }
        Ok(())
    }
}
