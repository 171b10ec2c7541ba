//! The event envelope: a claimed outbox row, its validation, and its wire encodings.
//!
//! Every backend puts the same metadata on the wire (see [`Event::wire_headers`]) and chooses
//! the body by the route's [`BodyFormat`]: the raw payload, or the whole envelope as JSON in the
//! EventBus format so that existing EventBus subscribers consume it unchanged.

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Header names put on every message, on Kafka and NATS alike.
pub mod headers {
    pub const EVENT_ID: &str = "X-Event-ID";
    pub const AGGREGATE_ID: &str = "X-Aggregate-ID";
    pub const AGGREGATE_TYPE: &str = "X-Aggregate-Type";
    pub const EVENT_TYPE: &str = "X-Event-Type";
    pub const EVENT_VERSION: &str = "X-Event-Version";
    pub const OCCURRED_AT: &str = "X-Occurred-At";
    pub const CORRELATION_ID: &str = "X-Correlation-ID";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const TRACEPARENT: &str = "traceparent";
}

/// One outbox row as the relay claimed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The row's position in the outbox (its primary key); the per-aggregate order.
    pub id: i64,
    pub event_id: Uuid,
    pub topic: String,
    pub aggregate_id: String,
    pub aggregate_type: Option<String>,
    pub event_type: String,
    pub event_version: i32,
    pub payload: Vec<u8>,
    /// The row's own headers, validated as a JSON object of strings.
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub traceparent: Option<String>,
    pub correlation_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    /// Failed publish attempts so far.
    pub attempts: i32,
}

/// How a message body is made from an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// The payload bytes as written by the producer.
    #[default]
    Raw,
    /// The EventBus envelope as JSON: snake_case keys, payload as base64.
    Envelope,
}

/// Why a row cannot be published. Each is permanent: the row is marked failed with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("topic {topic:?}: {reason}")]
    Topic { topic: String, reason: TopicError },
    #[error("field {field}: must not be empty")]
    Empty { field: &'static str },
    #[error("field event_version: {value} is not allowed, must be 1 or more")]
    Version { value: i32 },
    #[error("field payload: {size} bytes is more than the limit of {limit} bytes (relay.max_payload_bytes)")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("field headers: {0}")]
    Headers(String),
    #[error(
        "field traceparent: {value:?} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"
    )]
    Traceparent { value: String },
}

/// What is wrong with a topic name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    TooLong { len: usize },
    BadChar { ch: char, position: usize },
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Empty => write!(f, "is empty, a topic needs 1 to 255 characters"),
            TopicError::TooLong { len } => {
                write!(f, "is {len} characters long, at most 255 are allowed")
            }
            TopicError::BadChar { ch, position } => {
                let what = if ch.is_whitespace() {
                    "white space"
                } else if ch.is_control() {
                    "a control character"
                } else {
                    "not ASCII"
                };
                write!(
                    f,
                    "character {ch:?} (U+{:04X}) at position {position} is {what}; topics allow printable ASCII without spaces",
                    *ch as u32
                )
            }
        }
    }
}

/// Checks a topic name: 1-255 characters, printable ASCII, no spaces. Positions count from 1.
///
/// Kafka silently never delivers messages on non-ASCII topics, which is why this is checked
/// before anything is sent.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    for (i, ch) in topic.chars().enumerate() {
        if !ch.is_ascii() || ch.is_ascii_control() || ch == ' ' {
            return Err(TopicError::BadChar {
                ch,
                position: i + 1,
            });
        }
    }
    // All ASCII from here on, so bytes are characters.
    if topic.len() > 255 {
        return Err(TopicError::TooLong { len: topic.len() });
    }
    Ok(())
}

/// Parses a JSON headers column into string pairs, naming the key whose value is not a string.
pub fn parse_headers(value: Option<&serde_json::Value>) -> Result<Vec<(String, String)>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(format!(
                    "value of {k:?} is {}, header values must be strings",
                    json_kind(other)
                )),
            })
            .collect(),
        Some(other) => Err(format!(
            "is {}, must be a JSON object of string to string",
            json_kind(other)
        )),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The trace id of a W3C traceparent (`00-<trace id>-<parent id>-<flags>`), if well formed.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let parts: Vec<&str> = traceparent.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000"
    {
        Some(parts[1])
    } else {
        None
    }
}

impl Event {
    /// Checks everything about the row that does not depend on a backend.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), InvalidEvent> {
        validate_topic(&self.topic).map_err(|reason| InvalidEvent::Topic {
            topic: self.topic.clone(),
            reason,
        })?;
        if self.aggregate_id.is_empty() {
            return Err(InvalidEvent::Empty {
                field: "aggregate_id",
            });
        }
        if self.event_type.is_empty() {
            return Err(InvalidEvent::Empty {
                field: "event_type",
            });
        }
        if self.event_version < 1 {
            return Err(InvalidEvent::Version {
                value: self.event_version,
            });
        }
        if self.payload.len() > max_payload_bytes {
            return Err(InvalidEvent::PayloadTooLarge {
                size: self.payload.len(),
                limit: max_payload_bytes,
            });
        }
        if let Some(tp) = &self.traceparent {
            if trace_id_of(tp).is_none() {
                return Err(InvalidEvent::Traceparent { value: tp.clone() });
            }
        }
        Ok(())
    }

    /// The metadata headers every backend puts on the wire, then the row's own headers.
    /// The row's headers cannot replace the relay's: a clashing name is skipped.
    pub fn wire_headers(&self) -> Vec<(&str, String)> {
        let mut out: Vec<(&str, String)> = Vec::with_capacity(8 + self.headers.len());
        out.push((headers::EVENT_ID, self.event_id.to_string()));
        out.push((headers::AGGREGATE_ID, self.aggregate_id.clone()));
        if let Some(t) = &self.aggregate_type {
            out.push((headers::AGGREGATE_TYPE, t.clone()));
        }
        out.push((headers::EVENT_TYPE, self.event_type.clone()));
        out.push((headers::EVENT_VERSION, self.event_version.to_string()));
        out.push((
            headers::OCCURRED_AT,
            self.occurred_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        ));
        if let Some(ct) = &self.content_type {
            out.push((headers::CONTENT_TYPE, ct.clone()));
        }
        if let Some(tp) = &self.traceparent {
            out.push((headers::TRACEPARENT, tp.clone()));
        }
        if let Some(c) = &self.correlation_id {
            out.push((headers::CORRELATION_ID, c.clone()));
        }
        let fixed = out.len();
        for (k, v) in &self.headers {
            if !out[..fixed].iter().any(|(n, _)| n.eq_ignore_ascii_case(k)) {
                out.push((k.as_str(), v.clone()));
            }
        }
        out
    }

    /// The message body in the given format.
    pub fn body(&self, format: BodyFormat) -> Vec<u8> {
        match format {
            BodyFormat::Raw => self.payload.clone(),
            BodyFormat::Envelope => serde_json::to_vec(&EnvelopeJson::from(self))
                .expect("serialising a struct of strings cannot fail"),
        }
    }
}

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

#[cfg(test)]
pub(crate) fn sample_event(id: i64, aggregate: &str) -> Event {
    Event {
        id,
        event_id: Uuid::new_v4(),
        topic: "orders.created".into(),
        aggregate_id: aggregate.into(),
        aggregate_type: Some("order".into()),
        event_type: "OrderCreated".into(),
        event_version: 1,
        payload: br#"{"n":1}"#.to_vec(),
        headers: vec![("tenant".into(), "acme".into())],
        content_type: Some("application/json".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        correlation_id: Some("corr-1".into()),
        occurred_at: Utc::now(),
        attempts: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_with_non_ascii_character_names_it_and_its_position() {
        let err = validate_topic("orders.crééd").unwrap_err();
        assert_eq!(
            err,
            TopicError::BadChar {
                ch: 'é',
                position: 10
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("'é'") && text.contains("position 10"),
            "{text}"
        );
    }

    #[test]
    fn topic_rules_cover_space_control_length_and_empty() {
        assert_eq!(
            validate_topic("a b"),
            Err(TopicError::BadChar {
                ch: ' ',
                position: 2
            })
        );
        assert_eq!(
            validate_topic("a\tb"),
            Err(TopicError::BadChar {
                ch: '\t',
                position: 2
            })
        );
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert_eq!(validate_topic(&"x".repeat(255)), Ok(()));
        assert_eq!(
            validate_topic(&"x".repeat(256)),
            Err(TopicError::TooLong { len: 256 })
        );
        assert_eq!(validate_topic("orders.v1-created_EU"), Ok(()));
    }

    #[test]
    fn headers_must_be_an_object_of_strings() {
        let ok = serde_json::json!({"a": "1"});
        assert_eq!(
            parse_headers(Some(&ok)).unwrap(),
            vec![("a".into(), "1".into())]
        );
        let bad = serde_json::json!({"a": 1});
        let err = parse_headers(Some(&bad)).unwrap_err();
        assert!(err.contains("\"a\"") && err.contains("a number"), "{err}");
        let arr = serde_json::json!(["a"]);
        assert!(parse_headers(Some(&arr)).unwrap_err().contains("an array"));
        assert!(parse_headers(None).unwrap().is_empty());
    }

    #[test]
    fn validate_names_the_field() {
        let mut e = sample_event(1, "a");
        assert_eq!(e.validate(1024), Ok(()));
        e.payload = vec![0; 2000];
        let err = e.validate(1024).unwrap_err().to_string();
        assert!(err.contains("payload") && err.contains("2000") && err.contains("1024"));
        let mut e = sample_event(1, "");
        assert!(e
            .validate(1024)
            .unwrap_err()
            .to_string()
            .contains("aggregate_id"));
        e.aggregate_id = "a".into();
        e.event_version = 0;
        assert!(e
            .validate(1024)
            .unwrap_err()
            .to_string()
            .contains("event_version"));
        e.event_version = 1;
        e.traceparent = Some("nope".into());
        assert!(e
            .validate(1024)
            .unwrap_err()
            .to_string()
            .contains("traceparent"));
    }

    #[test]
    fn wire_headers_carry_metadata_and_row_headers_without_overriding() {
        let mut e = sample_event(7, "order-1");
        e.headers.push(("X-Event-ID".into(), "spoofed".into()));
        let h = e.wire_headers();
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("X-Event-ID"), Some(e.event_id.to_string().as_str()));
        assert_eq!(get("X-Aggregate-ID"), Some("order-1"));
        assert_eq!(get("X-Event-Version"), Some("1"));
        assert_eq!(get("tenant"), Some("acme"));
        assert_eq!(
            h.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("x-event-id"))
                .count(),
            1
        );
    }

    #[test]
    fn envelope_body_is_eventbus_json_with_base64_payload() {
        let e = sample_event(7, "order-1");
        let body = e.body(BodyFormat::Envelope);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["event_id"], e.event_id.to_string());
        assert_eq!(v["aggregate_id"], "order-1");
        assert_eq!(v["event_type"], "OrderCreated");
        assert_eq!(v["event_version"], 1);
        assert_eq!(v["payload"], "eyJuIjoxfQ==");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["correlation_id"], "corr-1");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(e.body(BodyFormat::Raw), e.payload);
    }
}
