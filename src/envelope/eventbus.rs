//! The EventBus body format: the whole envelope as JSON, as the Go EventBus marshals it, so
//! existing EventBus subscribers consume it unchanged.

use super::{trace_id_of, Event};
use base64::Engine as _;
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};

/// The EventBus envelope as JSON, the way the Go EventBus marshals it: snake_case keys,
/// `payload` as base64 (Go's encoding of `[]byte`), RFC 3339 timestamp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeJson {
    pub event_id: String,
    pub aggregate_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_type: Option<String>,
    pub event_type: String,
    pub event_version: i64,
    pub payload: String,
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub correlation_id: String,
}

impl From<&Event> for EnvelopeJson {
    fn from(e: &Event) -> Self {
        EnvelopeJson {
            event_id: e.event_id.to_string(),
            aggregate_id: e.aggregate_id.clone(),
            aggregate_type: e.aggregate_type.clone(),
            event_type: e.event_type.clone(),
            event_version: e.event_version as i64,
            payload: base64::engine::general_purpose::STANDARD.encode(&e.payload),
            timestamp: e.occurred_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            trace_id: e
                .traceparent
                .as_deref()
                .and_then(trace_id_of)
                .unwrap_or_default()
                .to_string(),
            correlation_id: e.correlation_id.clone().unwrap_or_default(),
        }
    }
}
