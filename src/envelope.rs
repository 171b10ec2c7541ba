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

/// Why a row cannot be published. Each is permanent: the row is marked failed with this text,
/// which names the field, the value (shortened when long, see [`shown`]) and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("topic {topic}: {reason}")]
    Topic { topic: String, reason: TopicError },
    #[error("field {field}: must not be empty")]
    Empty { field: &'static str },
    #[error("field event_version: {value} is not allowed, must be 1 or more")]
    Version { value: i32 },
    #[error("field payload: {size} bytes is more than the limit of {limit} bytes (relay.max_payload_bytes)")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("field headers: {0}")]
    Headers(String),
    #[error("field headers: {count} headers, at most {limit} are allowed")]
    TooManyHeaders { count: usize, limit: usize },
    #[error(
        "field headers: {size} bytes of names and values, at most {limit} are allowed \
         (put large data in the payload)"
    )]
    HeadersTooLarge { size: usize, limit: usize },
    /// A row header's name or value that the wire cannot carry; `name` is already [`shown`].
    #[error("field headers: header {name}: {problem}")]
    Header { name: String, problem: String },
    /// A row header that would stand in for one the relay or the broker sets.
    #[error("field headers: header {name} is reserved for {owner}; use another name")]
    ReservedHeader { name: String, owner: &'static str },
    /// A row field the relay sends as a header, with a character that header cannot carry.
    #[error("field {field}: {value} {problem} (sent as header {header})")]
    HeaderField {
        field: &'static str,
        header: &'static str,
        value: String,
        problem: String,
    },
    #[error("field traceparent: {value} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")]
    Traceparent { value: String },
    /// The message as the backend would send it is larger than the broker takes.
    #[error(
        "field payload: the {backend} message would be {size} bytes (payload {payload}, \
         headers and key {overhead}), more than the {limit_name} of {limit} bytes"
    )]
    MessageTooLarge {
        backend: &'static str,
        size: usize,
        payload: usize,
        overhead: usize,
        limit_name: &'static str,
        limit: usize,
    },
    /// The topic breaks the backend's own naming rules (a NATS subject, a Kafka topic name).
    #[error("field topic: {0}")]
    BackendTopic(String),
    /// The body could not be made in the route's format.
    #[error("field payload: cannot be encoded as {format}: {reason}")]
    Body {
        format: &'static str,
        reason: String,
    },
}

/// How many headers a row may carry, and how many bytes of names and values in all. Headers are
/// metadata: brokers count them against the same per-message limit as the payload, and a
/// consumer holds them all in memory before it reads the body.
pub const MAX_HEADERS: usize = 256;
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A value for an error text: quoted and escaped like Rust's `{:?}` (so a CR, a LF or any other
/// control character is visible), and at most 64 characters of it, with the full length, so
/// that a reason stays short whatever a row holds.
pub fn shown(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        None => format!("{value:?}"),
        Some((cut, _)) => {
            let head = value.get(..cut).unwrap_or_default();
            format!("{head:?}... ({} bytes)", value.len())
        }
    }
}

/// Which wire format's rules a row must follow, beyond [`Event::validate`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// NATS headers (HPUB): names printable ASCII without ':' and values without CR or LF;
    /// `Nats-*` names are the server's control headers.
    Nats,
    /// Kafka record headers: names are strings, values any bytes; librdkafka takes names as C
    /// strings, so no NUL.
    Kafka,
}

/// Header names the relay sets on every message; a row's own header may not use them (compared
/// without regard to case, as HTTP-minded consumers read them).
pub const RELAY_HEADERS: [&str; 9] = [
    headers::EVENT_ID,
    headers::AGGREGATE_ID,
    headers::AGGREGATE_TYPE,
    headers::EVENT_TYPE,
    headers::EVENT_VERSION,
    headers::OCCURRED_AT,
    headers::CORRELATION_ID,
    headers::CONTENT_TYPE,
    headers::TRACEPARENT,
];

/// Is `name` one of the relay's own headers?
pub fn is_relay_header(name: &str) -> bool {
    RELAY_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Is `name` a NATS control header (`Nats-Msg-Id`, `Nats-Expected-Stream`, ...)? The server
/// acts on these, whatever their case.
pub fn is_nats_control_header(name: &str) -> bool {
    name.get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
}

/// Why `name` cannot be a NATS header name: printable ASCII, no space, no ':'.
pub fn nats_header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an empty name is not allowed".into());
    }
    let (i, ch) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii_graphic() || *c == ':')?;
    Some(format!(
        "character {ch:?} (U+{:04X}) at position {} is {}; NATS header names are printable \
         ASCII without spaces or ':'",
        ch as u32,
        i + 1,
        char_kind(ch)
    ))
}

/// Why `value` cannot be a NATS header value: a CR or LF would end the header line.
pub fn nats_header_value_problem(value: &str) -> Option<String> {
    let (i, ch) = value
        .chars()
        .enumerate()
        .find(|(_, c)| *c == '\r' || *c == '\n')?;
    let what = if ch == '\r' {
        "a carriage return"
    } else {
        "a line feed"
    };
    Some(format!(
        "contains {what} (U+{:04X}) at position {}; NATS header values cannot contain CR or LF",
        ch as u32,
        i + 1
    ))
}

/// Why `name` cannot be a Kafka header name.
pub fn kafka_header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an empty name is not allowed".into());
    }
    let i = name.chars().position(|c| c == '\0')?;
    Some(format!(
        "character '\\0' (U+0000) at position {}; librdkafka reads header names as C strings",
        i + 1
    ))
}

fn char_kind(ch: char) -> &'static str {
    if ch == ' ' {
        "a space"
    } else if ch == ':' {
        "a colon"
    } else if ch.is_control() {
        "a control character"
    } else if !ch.is_ascii() {
        "not ASCII"
    } else {
        "not allowed"
    }
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
/// SQL NULL and JSON null both mean no headers.
pub fn parse_headers(value: Option<&serde_json::Value>) -> Result<Vec<(String, String)>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(format!(
                    "value of {} is {}, header values must be strings",
                    shown(k),
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
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none()
        && hex(version, 2)
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace != "00000000000000000000000000000000")
        .then_some(trace)
}

impl Event {
    /// Checks everything about the row that does not depend on a backend.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), InvalidEvent> {
        validate_topic(&self.topic).map_err(|reason| InvalidEvent::Topic {
            topic: shown(&self.topic),
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
                return Err(InvalidEvent::Traceparent { value: shown(tp) });
            }
        }
        self.validate_headers()
    }

    /// The row's own headers, on any backend: a bounded number and size, named, and none
    /// standing in for the relay's metadata. Reserved names fail the row rather than being
    /// dropped or renamed: a producer that sets `X-Event-ID` expects consumers to see it, and
    /// a failed row with the reason tells it why they would not.
    fn validate_headers(&self) -> Result<(), InvalidEvent> {
        if self.headers.len() > MAX_HEADERS {
            return Err(InvalidEvent::TooManyHeaders {
                count: self.headers.len(),
                limit: MAX_HEADERS,
            });
        }
        let size: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_HEADER_BYTES {
            return Err(InvalidEvent::HeadersTooLarge {
                size,
                limit: MAX_HEADER_BYTES,
            });
        }
        for (k, _) in &self.headers {
            if k.is_empty() {
                return Err(InvalidEvent::Header {
                    name: shown(k),
                    problem: "an empty name is not allowed".into(),
                });
            }
            if is_relay_header(k) {
                return Err(InvalidEvent::ReservedHeader {
                    name: shown(k),
                    owner: "the relay's metadata",
                });
            }
        }
        Ok(())
    }

    /// Checks what `wire` cannot carry, in the row's own headers and in the fields the relay
    /// sends as headers. Backends call it before sending (after [`Event::validate`]) and fail
    /// the row with its reason.
    pub fn validate_for(&self, wire: Wire) -> Result<(), InvalidEvent> {
        match wire {
            Wire::Nats => {
                for (field, header, value) in self.header_fields() {
                    if let Some(problem) = nats_header_value_problem(value) {
                        return Err(InvalidEvent::HeaderField {
                            field,
                            header,
                            value: shown(value),
                            problem,
                        });
                    }
                }
                for (k, v) in &self.headers {
                    if is_nats_control_header(k) {
                        return Err(InvalidEvent::ReservedHeader {
                            name: shown(k),
                            owner: "the NATS server (Nats-* headers)",
                        });
                    }
                    let problem = nats_header_name_problem(k)
                        .or_else(|| nats_header_value_problem(v).map(|p| format!("its value {p}")));
                    if let Some(problem) = problem {
                        return Err(InvalidEvent::Header {
                            name: shown(k),
                            problem,
                        });
                    }
                }
            }
            Wire::Kafka => {
                for (k, _) in &self.headers {
                    if let Some(problem) = kafka_header_name_problem(k) {
                        return Err(InvalidEvent::Header {
                            name: shown(k),
                            problem,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The row's fields that travel as headers: (column, header name, value).
    fn header_fields(&self) -> impl Iterator<Item = (&'static str, &'static str, &str)> {
        [
            (
                "aggregate_id",
                headers::AGGREGATE_ID,
                Some(&self.aggregate_id),
            ),
            (
                "aggregate_type",
                headers::AGGREGATE_TYPE,
                self.aggregate_type.as_ref(),
            ),
            ("event_type", headers::EVENT_TYPE, Some(&self.event_type)),
            (
                "content_type",
                headers::CONTENT_TYPE,
                self.content_type.as_ref(),
            ),
            (
                "traceparent",
                headers::TRACEPARENT,
                self.traceparent.as_ref(),
            ),
            (
                "correlation_id",
                headers::CORRELATION_ID,
                self.correlation_id.as_ref(),
            ),
        ]
        .into_iter()
        .filter_map(|(f, h, v)| v.map(|v| (f, h, v.as_str())))
    }

    /// The metadata headers every backend puts on the wire, then the row's own headers.
    /// The row's headers cannot replace the relay's: [`Event::validate`] fails a row that
    /// tries, and a clashing name is skipped here all the same.
    pub fn wire_headers(&self) -> Vec<(&str, String)> {
        let mut out: Vec<(&str, String)> = Vec::with_capacity(9 + self.headers.len());
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
        for (k, v) in &self.headers {
            if !is_relay_header(k) {
                out.push((k.as_str(), v.clone()));
            }
        }
        out
    }

    /// The message body in the given format.
    pub fn try_body(&self, format: BodyFormat) -> Result<Vec<u8>, InvalidEvent> {
        match format {
            BodyFormat::Raw => Ok(self.payload.clone()),
            BodyFormat::Envelope => {
                serde_json::to_vec(&EnvelopeJson::from(self)).map_err(|e| InvalidEvent::Body {
                    format: "envelope",
                    reason: e.to_string(),
                })
            }
        }
    }

    /// As [`Event::try_body`]; the envelope holds only strings and integers, so it always
    /// serialises, and an empty body stands in rather than a panic if it ever did not.
    pub fn body(&self, format: BodyFormat) -> Vec<u8> {
        self.try_body(format).unwrap_or_default()
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

    #[test]
    fn row_headers_may_not_stand_in_for_the_relays_own() {
        for name in [
            "X-Event-ID",
            "x-event-id",
            "content-type",
            "TRACEPARENT",
            "X-Aggregate-Type",
        ] {
            let mut e = sample_event(1, "a");
            e.headers.push((name.into(), "v".into()));
            let err = e.validate(1024).unwrap_err().to_string();
            assert!(
                err.starts_with("field headers: header") && err.contains("reserved"),
                "{err}"
            );
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn nats_refuses_control_headers_and_what_hpub_cannot_carry() {
        let cases: &[(&str, &str, &str)] = &[
            ("Nats-Msg-Id", "x", "reserved"),
            ("nats-expected-stream", "x", "reserved"),
            ("has space", "x", "a space"),
            ("a:b", "x", "a colon"),
            ("caf\u{e9}", "x", "not ASCII"),
            ("tab\there", "x", "a control character"),
            ("ok", "line\nbreak", "a line feed"),
            ("ok", "cr\rhere", "a carriage return"),
        ];
        for (k, v, want) in cases {
            let mut e = sample_event(1, "a");
            e.headers = vec![((*k).into(), (*v).into())];
            assert_eq!(e.validate(1024), Ok(()), "{k:?} is fine for any backend");
            let err = e.validate_for(Wire::Nats).unwrap_err().to_string();
            assert!(err.starts_with("field headers: header"), "{err}");
            assert!(err.contains(want), "{k:?}={v:?}: {err}");
            // Kafka carries all of these.
            assert_eq!(e.validate_for(Wire::Kafka), Ok(()), "{k:?}");
        }
    }

    #[test]
    fn fields_sent_as_nats_headers_may_not_hold_cr_or_lf() {
        type Set = fn(&mut Event);
        let cases: &[(&str, &str, Set)] = &[
            ("aggregate_id", "X-Aggregate-ID", |e| {
                e.aggregate_id = "a\nb".into()
            }),
            ("aggregate_type", "X-Aggregate-Type", |e| {
                e.aggregate_type = Some("t\r".into())
            }),
            ("event_type", "X-Event-Type", |e| {
                e.event_type = "A\r\nB".into()
            }),
            ("content_type", "content-type", |e| {
                e.content_type = Some("text/plain\n".into())
            }),
            ("correlation_id", "X-Correlation-ID", |e| {
                e.correlation_id = Some("\nc".into())
            }),
        ];
        for (field, header, set) in cases {
            let mut e = sample_event(1, "a");
            set(&mut e);
            let err = e.validate_for(Wire::Nats).unwrap_err().to_string();
            assert!(err.starts_with(&format!("field {field}: ")), "{err}");
            assert!(err.contains(header) && err.contains("CR or LF"), "{err}");
            assert_eq!(e.validate_for(Wire::Kafka), Ok(()));
        }
        // A traceparent with a line break is no traceparent at all, on any backend.
        let mut e = sample_event(1, "a");
        e.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n".into());
        assert!(e
            .validate(1024)
            .unwrap_err()
            .to_string()
            .contains("field traceparent"));
    }

    #[test]
    fn many_or_large_headers_are_refused_with_the_limit() {
        let mut e = sample_event(1, "a");
        e.headers = (0..=MAX_HEADERS)
            .map(|i| (format!("h{i}"), "v".into()))
            .collect();
        let err = e.validate(1024).unwrap_err().to_string();
        assert!(
            err.contains("257 headers") && err.contains("at most 256"),
            "{err}"
        );
        e.headers = vec![("big".into(), "x".repeat(MAX_HEADER_BYTES))];
        let err = e.validate(1024).unwrap_err().to_string();
        assert!(
            err.contains("field headers") && err.contains("65536"),
            "{err}"
        );
        e.headers = vec![(String::new(), "v".into())];
        assert!(e
            .validate(1024)
            .unwrap_err()
            .to_string()
            .contains("empty name"));
    }

    #[test]
    fn long_values_are_shortened_in_reasons() {
        let mut e = sample_event(1, "a");
        e.topic = format!("{}\u{e9}", "x".repeat(10_000));
        let err = e.validate(1024).unwrap_err().to_string();
        assert!(err.len() < 400, "{err}");
        assert!(err.contains("(10002 bytes)"), "{err}");
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
    }

    #[test]
    fn an_empty_payload_is_a_valid_event() {
        let mut e = sample_event(1, "a");
        e.payload.clear();
        assert_eq!(e.validate(1024), Ok(()));
        assert_eq!(e.body(BodyFormat::Raw), Vec::<u8>::new());
    }

    #[test]
    fn malformed_traceparents_never_panic() {
        for tp in [
            "",
            "-",
            "---",
            "----",
            "00-",
            "00-x-y-z-w",
            "\u{e9}-\u{e9}-\u{e9}-\u{e9}",
        ] {
            assert_eq!(trace_id_of(tp), None, "{tp:?}");
        }
    }
}
