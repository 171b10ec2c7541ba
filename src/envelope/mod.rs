//! The event envelope: a claimed outbox row, its validation, and its wire encodings.
//!
//! Every backend puts the same metadata on the wire (see [`Event::wire_headers`]) and chooses
//! the body by the route's [`BodyFormat`]: the raw payload, the whole envelope as JSON in the
//! EventBus format so that existing EventBus subscribers consume it unchanged, or a CloudEvent
//! 1.0 in binary or structured mode (`cloudevents.rs`, [`Event::message`]).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;
use uuid::Uuid;

pub(crate) mod cloudevents;
mod eventbus;
pub(crate) mod headers;
mod validate;

pub use cloudevents::{CloudEventAttribute, CloudEventAttributes};
pub use eventbus::EnvelopeJson;
pub use headers::{
    is_nats_control_header, is_relay_header, kafka_header_name_problem, nats_header_name_problem,
    nats_header_value_problem, parse_headers, RELAY_HEADERS,
};
pub use validate::{validate_topic, TopicError};

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

/// How a message body (and, for CloudEvents, its attribute headers) is made from an event.
///
/// `Copy`, because the dispatcher copies a row's route with every hand-off; that is why a
/// CloudEvents route's source is an interned [`CeSource`] rather than a `String`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyFormat {
    /// The payload bytes as written by the producer.
    #[default]
    Raw,
    /// The EventBus envelope as JSON: snake_case keys, payload as base64.
    Envelope,
    /// A CloudEvent 1.0 (see `cloudevents.rs`).
    CloudEvents(CloudEventsFormat),
}

impl BodyFormat {
    /// The name a route's `format` key gives it.
    pub fn name(&self) -> &'static str {
        match self {
            BodyFormat::Raw => "raw",
            BodyFormat::Envelope => "envelope",
            BodyFormat::CloudEvents(_) => "cloudevents",
        }
    }
}

impl fmt::Display for BodyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyFormat::CloudEvents(ce) => write!(
                f,
                "cloudevents ({}, source {:?})",
                ce.mode.name(),
                ce.source.as_str()
            ),
            other => f.write_str(other.name()),
        }
    }
}

/// A CloudEvents route's settings: the content mode and the `source` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudEventsFormat {
    pub mode: CloudEventsMode,
    pub source: CeSource,
}

/// Where a CloudEvent's attributes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudEventsMode {
    /// The payload as the body, the attributes as headers (`ce_*` on Kafka, `ce-*` on NATS):
    /// consumers that know nothing of CloudEvents read the same body as with `raw`.
    #[default]
    Binary,
    /// The whole event as `application/cloudevents+json` in the body, the payload in `data`
    /// (JSON content types) or `data_base64` (anything else).
    Structured,
}

impl CloudEventsMode {
    pub fn name(&self) -> &'static str {
        match self {
            CloudEventsMode::Binary => "binary",
            CloudEventsMode::Structured => "structured",
        }
    }
}

/// A route's CloudEvents `source`, interned: each distinct value is kept once for the life of
/// the process (a handful of strings from the configuration), so [`BodyFormat`] stays `Copy`.
/// Config validation checks it (`cloudevents::source_problem`); the encoder refuses an
/// empty one rather than send an event without a source.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CeSource(&'static str);

impl CeSource {
    pub fn new(source: &str) -> CeSource {
        use std::collections::BTreeSet;
        use std::sync::{Mutex, OnceLock};
        static INTERNED: OnceLock<Mutex<BTreeSet<&'static str>>> = OnceLock::new();
        let mut set = INTERNED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = set.get(source) {
            return CeSource(s);
        }
        let s: &'static str = Box::leak(source.to_owned().into_boxed_str());
        set.insert(s);
        CeSource(s)
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl fmt::Debug for CeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
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
    /// A field that becomes a CloudEvents attribute holds what the attribute cannot.
    #[error("field {field}: {value} {problem} (CloudEvents attribute {attribute})")]
    CloudEventsAttribute {
        field: &'static str,
        attribute: &'static str,
        value: String,
        problem: String,
    },
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

/// `occurred_at` as RFC 3339 in UTC with microseconds (`2026-11-29T14:05:09.123456Z`), as
/// chrono's `to_rfc3339_opts(SecondsFormat::Micros, true)` writes it, without its formatting
/// machinery for the years 0-9999 (every event's header carries one; chrono is a tenth of a
/// hand-off's cost there). Other years go through chrono.
pub fn rfc3339_micros(at: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let year = at.year();
    if !(0..=9999).contains(&year) {
        return at.to_rfc3339_opts(SecondsFormat::Micros, true);
    }
    // A leap second is nanosecond 1e9 and more: chrono writes it as the next second (60).
    let nanos = at.nanosecond();
    let (second, micros) = if nanos >= 1_000_000_000 {
        (at.second() + 1, (nanos - 1_000_000_000) / 1000)
    } else {
        (at.second(), nanos / 1000)
    };
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for k in (at..at + width).rev() {
            b[k] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, at.month());
    put(8, 2, at.day());
    put(11, 2, at.hour());
    put(14, 2, at.minute());
    put(17, 2, second);
    put(20, 6, micros);
    // Only ASCII digits and separators were written.
    String::from_utf8_lossy(&b).into_owned()
}

/// A message as headers (name, value) and a body; see [`Event::message`].
/// The body borrows the payload where the format is the payload itself (raw): the Kafka
/// client copies it into its own buffer anyway, so a copy of ours would be one per event for
/// nothing.
pub type WireMessage<'a> = (Vec<(&'a str, Cow<'a, str>)>, Cow<'a, [u8]>);

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
    ///
    /// Values the row holds are borrowed: a backend that copies them anyway (librdkafka does)
    /// pays no allocation for them here.
    pub fn wire_headers(&self) -> Vec<(&str, Cow<'_, str>)> {
        let mut out: Vec<(&str, Cow<'_, str>)> = Vec::with_capacity(9 + self.headers.len());
        out.push((headers::EVENT_ID, Cow::Owned(self.event_id.to_string())));
        out.push((headers::AGGREGATE_ID, Cow::Borrowed(&self.aggregate_id)));
        if let Some(t) = &self.aggregate_type {
            out.push((headers::AGGREGATE_TYPE, Cow::Borrowed(t)));
        }
        out.push((headers::EVENT_TYPE, Cow::Borrowed(&self.event_type)));
        out.push((
            headers::EVENT_VERSION,
            Cow::Owned(self.event_version.to_string()),
        ));
        out.push((
            headers::OCCURRED_AT,
            Cow::Owned(rfc3339_micros(self.occurred_at)),
        ));
        if let Some(ct) = &self.content_type {
            out.push((headers::CONTENT_TYPE, Cow::Borrowed(ct)));
        }
        if let Some(tp) = &self.traceparent {
            out.push((headers::TRACEPARENT, Cow::Borrowed(tp)));
        }
        if let Some(c) = &self.correlation_id {
            out.push((headers::CORRELATION_ID, Cow::Borrowed(c)));
        }
        for (k, v) in &self.headers {
            if !is_relay_header(k) {
                out.push((k.as_str(), Cow::Borrowed(v)));
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
            BodyFormat::CloudEvents(ce) => {
                let attributes = self.cloudevent(&ce)?;
                self.cloudevent_body(attributes, ce.mode)
            }
        }
    }

    /// As [`Event::try_body`], for callers that checked the event first
    /// ([`Event::validate_format`]): an empty body stands in for an error rather than a panic.
    pub fn body(&self, format: BodyFormat) -> Vec<u8> {
        self.try_body(format).unwrap_or_default()
    }

    /// Checks what the route's format needs beyond [`Event::validate`]: for CloudEvents, the
    /// attributes' values (see [`Event::cloudevent`]). Raw and envelope take any valid row.
    pub fn validate_format(&self, format: BodyFormat) -> Result<(), InvalidEvent> {
        match format {
            BodyFormat::CloudEvents(ce) => self.cloudevent(&ce).map(drop),
            BodyFormat::Raw | BodyFormat::Envelope => Ok(()),
        }
    }

    /// The headers and body of the event's message on `wire` in the route's format, or why
    /// the row cannot be sent that way. Raw and envelope: [`Event::wire_headers`] and
    /// [`Event::try_body`]. CloudEvents: see [`Event::headers_for`].
    pub fn message(&self, format: BodyFormat, wire: Wire) -> Result<WireMessage<'_>, InvalidEvent> {
        match format {
            BodyFormat::CloudEvents(ce) => {
                let attributes = self.cloudevent(&ce)?;
                let headers = self.cloudevent_headers(&attributes, ce.mode, wire);
                Ok((
                    headers,
                    Cow::Owned(self.cloudevent_body(attributes, ce.mode)?),
                ))
            }
            BodyFormat::Raw => Ok((self.wire_headers(), Cow::Borrowed(&self.payload))),
            other => Ok((self.wire_headers(), Cow::Owned(self.try_body(other)?))),
        }
    }

    /// The message headers on `wire` in the route's format. Raw and envelope:
    /// [`Event::wire_headers`]. CloudEvents keep those (so deduplication by `X-Event-ID` and
    /// trace propagation work the same on every route), leave out an empty `content-type`,
    /// and add:
    /// * binary mode: every attribute as a header, `ce_<name>` with the value as UTF-8 on
    ///   Kafka (`datacontenttype` is the `content-type` header there, per the Kafka binding),
    ///   `ce-<name>` percent-encoded on NATS (`ce-datacontenttype` too, per the NATS binding);
    /// * structured mode: `content-type` = `application/cloudevents+json; charset=UTF-8` and no
    ///   `ce` header (SDKs read any `ce_` header on Kafka as binary mode).
    pub fn headers_for(
        &self,
        format: BodyFormat,
        wire: Wire,
    ) -> Result<Vec<(&str, Cow<'_, str>)>, InvalidEvent> {
        match format {
            BodyFormat::CloudEvents(ce) => {
                let attributes = self.cloudevent(&ce)?;
                Ok(self.cloudevent_headers(&attributes, ce.mode, wire))
            }
            BodyFormat::Raw | BodyFormat::Envelope => Ok(self.wire_headers()),
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
    use base64::Engine as _;

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
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_ref());
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

    fn ce(mode: CloudEventsMode) -> BodyFormat {
        BodyFormat::CloudEvents(CloudEventsFormat {
            mode,
            source: CeSource::new("https://orders.example.com/relay"),
        })
    }

    /// The header's time text is chrono's, byte for byte, for any instant (leap seconds and
    /// years outside 0-9999 included).
    #[test]
    fn occurred_at_is_written_as_chrono_writes_it() {
        use chrono::{NaiveDate, TimeZone};
        let chrono_text = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut times: Vec<DateTime<Utc>> = vec![
            DateTime::UNIX_EPOCH,
            Utc.with_ymd_and_hms(2026, 11, 29, 14, 5, 9).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            NaiveDate::from_ymd_opt(2016, 12, 31)
                .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 1_999_999))
                .unwrap()
                .and_utc(),
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
        ];
        let mut x: i64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            // A spread of instants from year -9000 to 9999, with any microsecond.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = x.rem_euclid(346_000_000_000) - 346_000_000_000 + 253_402_300_799;
            let micros = (x >> 20).rem_euclid(1_000_000) as u32;
            times.push(DateTime::from_timestamp(secs, micros * 1000).unwrap());
        }
        for t in times {
            assert_eq!(rfc3339_micros(t), chrono_text(t), "{t:?}");
        }
    }

    fn header<'a>(h: &'a [(&str, Cow<'_, str>)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_ref())
    }

    #[test]
    fn cloudevents_binary_mode_on_kafka_follows_the_kafka_binding() {
        let e = sample_event(7, "order-1");
        let (h, body) = e.message(ce(CloudEventsMode::Binary), Wire::Kafka).unwrap();
        assert_eq!(body, e.payload, "the payload is the body");
        let id = e.event_id.to_string();
        let time = e.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        for (name, want) in [
            ("ce_specversion", "1.0"),
            ("ce_id", id.as_str()),
            ("ce_source", "https://orders.example.com/relay"),
            ("ce_type", "OrderCreated"),
            ("ce_subject", "order-1"),
            ("ce_time", time.as_str()),
            ("ce_partitionkey", "order-1"),
            ("ce_aggregatetype", "order"),
            ("ce_correlationid", "corr-1"),
            ("ce_eventversion", "1"),
            (
                "ce_traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            // datacontenttype travels as content-type on Kafka, and only there.
            ("content-type", "application/json"),
            // The relay's own headers stay, so deduplication and tracing read the same.
            ("X-Event-ID", id.as_str()),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tenant", "acme"),
        ] {
            assert_eq!(header(&h, name), Some(want), "{name}");
        }
        assert!(time.ends_with('Z'), "{time}");
        assert_eq!(header(&h, "ce_datacontenttype"), None);
        assert!(h.iter().all(|(k, _)| !k.starts_with("ce-")));
    }

    #[test]
    fn cloudevents_binary_mode_on_nats_percent_encodes_ce_headers() {
        let mut e = sample_event(7, "ordér 1");
        e.event_type = "Order \"Created\" 100%".into();
        let (h, body) = e.message(ce(CloudEventsMode::Binary), Wire::Nats).unwrap();
        assert_eq!(body, e.payload);
        assert_eq!(header(&h, "ce-subject"), Some("ord%C3%A9r%201"));
        assert_eq!(header(&h, "ce-partitionkey"), Some("ord%C3%A9r%201"));
        assert_eq!(
            header(&h, "ce-type"),
            Some("Order%20%22Created%22%20100%25")
        );
        assert_eq!(header(&h, "ce-datacontenttype"), Some("application/json"));
        assert_eq!(
            header(&h, "ce-source"),
            Some("https://orders.example.com/relay")
        );
        // The relay's header keeps the value as it is, as on every route.
        assert_eq!(header(&h, "X-Aggregate-ID"), Some("ordér 1"));
        assert!(h.iter().all(|(k, _)| !k.starts_with("ce_")));
        assert_eq!(
            cloudevents::percent_encode("Euro \u{20AC} \u{1F600}"),
            "Euro%20%E2%82%AC%20%F0%9F%98%80",
            "the binding's own example"
        );
    }

    #[test]
    fn cloudevents_structured_mode_embeds_json_payloads_verbatim() {
        let mut e = sample_event(7, "order-1");
        // Beyond 64-bit integers and floats: re-parsing would change it, verbatim does not.
        e.payload = br#" {"n": 123456789012345678901234567890, "x": 1e400} "#.to_vec();
        let (h, body) = e
            .message(ce(CloudEventsMode::Structured), Wire::Kafka)
            .unwrap();
        assert_eq!(
            header(&h, "content-type"),
            Some(cloudevents::STRUCTURED_CONTENT_TYPE)
        );
        assert!(
            h.iter().all(|(k, _)| !cloudevents::is_attribute_header(k)),
            "no ce_ header in structured mode: SDKs would read it as binary"
        );
        let text = std::str::from_utf8(&body).unwrap();
        assert!(
            text.contains(r#""data":{"n": 123456789012345678901234567890, "x": 1e400}"#),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text.replace("1e400", "1")).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], e.event_id.to_string());
        assert_eq!(v["source"], "https://orders.example.com/relay");
        assert_eq!(v["type"], "OrderCreated");
        assert_eq!(v["subject"], "order-1");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["partitionkey"], "order-1");
        assert_eq!(v["aggregatetype"], "order");
        assert_eq!(v["correlationid"], "corr-1");
        assert_eq!(v["eventversion"], 1);
        assert_eq!(
            v["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(v.get("data_base64").is_none());
        assert_eq!(e.body(ce(CloudEventsMode::Structured)), *body);
    }

    #[test]
    fn cloudevents_structured_mode_uses_data_base64_for_anything_but_valid_json() {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let cases: &[(Option<&str>, &[u8], bool)] = &[
            // (content type, payload, goes as JSON data)
            (Some("application/json"), br#"{"a":1}"#, true),
            (
                Some("application/vnd.orders+json; charset=utf-8"),
                b"[1,2]",
                true,
            ),
            (Some("TEXT/JSON"), b"\"s\"", true),
            (None, br#"{"a":1}"#, true),
            (None, b"\x00\x01binary", false),
            (Some("application/protobuf"), br#"{"a":1}"#, false),
            (Some("text/plain"), b"hello", false),
            // Declared JSON but not: invalid UTF-8, a syntax error, two values, a BOM.
            (Some("application/json"), b"{\"a\":\"\xff\xfe\"}", false),
            (Some("application/json"), b"{\"a\":", false),
            (Some("application/json"), b"{} {}", false),
            (Some("application/json"), b"\xef\xbb\xbf{}", false),
        ];
        for (ct, payload, json) in cases {
            let mut e = sample_event(1, "a");
            e.content_type = ct.map(str::to_string);
            e.payload = payload.to_vec();
            let body = e.try_body(ce(CloudEventsMode::Structured)).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if *json {
                let want: serde_json::Value = serde_json::from_slice(payload).unwrap();
                assert_eq!(v["data"], want, "{ct:?}");
                assert!(v.get("data_base64").is_none(), "{ct:?}");
            } else {
                assert_eq!(v["data_base64"], b64(payload), "{ct:?} {payload:?}");
                assert!(v.get("data").is_none(), "{ct:?}");
            }
            assert_eq!(v.get("datacontenttype").and_then(|v| v.as_str()), *ct);
        }
        // An empty payload is an event without data.
        let mut e = sample_event(1, "a");
        e.payload.clear();
        let v: serde_json::Value =
            serde_json::from_slice(&e.try_body(ce(CloudEventsMode::Structured)).unwrap()).unwrap();
        assert!(
            v.get("data").is_none() && v.get("data_base64").is_none(),
            "{v}"
        );
    }

    #[test]
    fn cloudevents_leave_out_empty_optional_fields() {
        let mut e = sample_event(1, "a");
        e.content_type = Some(String::new());
        e.aggregate_type = Some(String::new());
        e.correlation_id = None;
        e.traceparent = None;
        for wire in [Wire::Kafka, Wire::Nats] {
            let (h, _) = e.message(ce(CloudEventsMode::Binary), wire).unwrap();
            for absent in [
                "content-type",
                "ce_aggregatetype",
                "ce-aggregatetype",
                "ce_correlationid",
                "ce_traceparent",
                "ce-datacontenttype",
            ] {
                assert_eq!(header(&h, absent), None, "{absent}");
            }
        }
        let body = e.try_body(ce(CloudEventsMode::Structured)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for absent in [
            "datacontenttype",
            "aggregatetype",
            "correlationid",
            "traceparent",
        ] {
            assert!(v.get(absent).is_none(), "{absent}: {v}");
        }
    }

    #[test]
    fn cloudevents_refuse_what_attributes_cannot_hold_naming_field_and_attribute() {
        type Set = fn(&mut Event);
        let cases: &[(Set, &str)] = &[
            (|e| e.aggregate_id = "a\tb".into(), "field aggregate_id: \"a\\tb\" has a control character (U+0009) at position 2"),
            (|e| e.event_type = "T\u{85}".into(), "(CloudEvents attribute type)"),
            (|e| e.aggregate_type = Some("x\u{7f}".into()), "(CloudEvents attribute aggregatetype)"),
            (|e| e.correlation_id = Some("c\u{FFFF}".into()), "a Unicode noncharacter"),
            (|e| e.content_type = Some("text/plain\n".into()), "(CloudEvents attribute datacontenttype)"),
            (
                |e| e.occurred_at = "+12000-01-01T00:00:00Z".parse().unwrap(),
                "field occurred_at: \"+12000-01-01T00:00:00.000000Z\" is outside the years 0001-9999",
            ),
            (|e| e.occurred_at = "-0044-03-15T12:00:00Z".parse().unwrap(), "(CloudEvents attribute time)"),
            (|e| e.headers.push(("ce_id".into(), "spoofed".into())), "header \"ce_id\" is reserved for CloudEvents"),
            (|e| e.headers.push(("CE-Source".into(), "x".into())), "header \"CE-Source\" is reserved"),
            (|e| e.aggregate_id.clear(), "field aggregate_id: must not be empty"),
        ];
        for (set, want) in cases {
            let mut e = sample_event(1, "a");
            set(&mut e);
            for mode in [CloudEventsMode::Binary, CloudEventsMode::Structured] {
                for wire in [Wire::Kafka, Wire::Nats] {
                    let err = e.message(ce(mode), wire).unwrap_err().to_string();
                    assert!(err.contains(want), "{mode:?} {wire:?}: {err}");
                }
                assert!(e.validate_format(ce(mode)).is_err());
                assert_eq!(e.body(ce(mode)), Vec::<u8>::new());
            }
            // Raw and envelope routes take these rows as before (the headers aside).
            assert_eq!(e.validate_format(BodyFormat::Raw), Ok(()));
        }
    }

    #[test]
    fn a_structured_content_type_is_refused_in_binary_mode_only() {
        let mut e = sample_event(1, "a");
        e.content_type = Some("Application/CloudEvents+json".into());
        let err = e
            .message(ce(CloudEventsMode::Binary), Wire::Kafka)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("field content_type:") && err.contains("structured CloudEvent"),
            "{err}"
        );
        assert!(e
            .message(ce(CloudEventsMode::Structured), Wire::Kafka)
            .is_ok());
    }

    #[test]
    fn a_cloudevents_route_without_a_source_sends_nothing() {
        let f = BodyFormat::CloudEvents(CloudEventsFormat {
            mode: CloudEventsMode::Binary,
            source: CeSource::new(""),
        });
        let err = sample_event(1, "a").message(f, Wire::Kafka).unwrap_err();
        assert!(err.to_string().contains("cloudevents_source"), "{err}");
    }

    #[test]
    fn cloudevents_attribute_names_follow_the_spec() {
        for (name, kafka, nats) in cloudevents::ATTRIBUTES {
            assert!(
                !name.is_empty()
                    && name.len() <= 20
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                "{name}: lowercase letters and digits, at most 20"
            );
            assert_eq!(kafka, format!("ce_{name}"));
            assert_eq!(nats, format!("ce-{name}"));
        }
        // The JSON keys of structured mode are the same names.
        let e = sample_event(1, "a");
        let v: serde_json::Value = serde_json::to_value(
            e.cloudevent(&CloudEventsFormat {
                mode: CloudEventsMode::Structured,
                source: CeSource::new("/x"),
            })
            .unwrap(),
        )
        .unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in &keys {
            assert!(
                cloudevents::ATTRIBUTES.iter().any(|(n, _, _)| n == k),
                "{k} is not in ATTRIBUTES"
            );
        }
    }

    #[test]
    fn cloudevents_sources_must_be_uri_references() {
        for ok in [
            "https://orders.example.com/relay",
            "urn:example:orders",
            "/orders/service",
            "orders",
            "mailto:ops@example.com",
            "https://example.com/a%20b?x=1#frag",
            "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
        ] {
            assert_eq!(cloudevents::source_problem(ok), None, "{ok}");
        }
        for (bad, want) in [
            ("", "is required"),
            ("https://example.com/a b", "' ' (U+0020) at position 22"),
            ("https://exämple.com", "'ä'"),
            ("a%2", "'%' at position 2"),
            ("a%zz", "two hex digits"),
            ("1http://x", "not a URI scheme"),
            (":x", "not a URI scheme"),
            ("line\nbreak", "'\\n'"),
        ] {
            let problem = cloudevents::source_problem(bad).unwrap_or_default();
            assert!(problem.contains(want), "{bad:?}: {problem}");
        }
        let long = format!("urn:{}", "x".repeat(cloudevents::MAX_SOURCE_BYTES));
        assert!(cloudevents::source_problem(&long)
            .unwrap()
            .contains("at most 1024"));
        // Interned: one copy per distinct value.
        assert_eq!(
            CeSource::new("urn:a").as_str().as_ptr(),
            CeSource::new(&String::from("urn:a")).as_str().as_ptr()
        );
    }

    #[test]
    fn json_media_types_are_recognised_by_their_essence() {
        for t in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "text/json",
            "application/cloudevents+json",
            "application/vnd.api+json",
        ] {
            assert!(cloudevents::is_json_media_type(t), "{t}");
        }
        for t in [
            "",
            "json",
            "application/jsonx",
            "application/+json",
            "text/plain",
            "/json",
        ] {
            assert!(!cloudevents::is_json_media_type(t), "{t}");
        }
    }

    #[test]
    fn cloudevents_encoding_never_panics_on_hostile_rows() {
        let payloads: [&[u8]; 6] = [
            b"",
            b"\xff",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"\"\\ud800\"",
            b"nul\x00l",
            b"{\"a\":\"\\u0000\"}",
        ];
        let strings = [
            "",
            "\u{0}",
            "\u{10FFFF}",
            "\u{FDD0}",
            "a\r\nb",
            "%",
            "\"",
            "\u{1F600}",
        ];
        for payload in payloads {
            for s in strings {
                let mut e = sample_event(1, "a");
                e.payload = payload.to_vec();
                e.content_type = Some(s.to_string());
                e.correlation_id = Some(s.to_string());
                for mode in [CloudEventsMode::Binary, CloudEventsMode::Structured] {
                    for wire in [Wire::Kafka, Wire::Nats] {
                        if let Ok((h, _)) = e.message(ce(mode), wire) {
                            if wire == Wire::Nats {
                                for (k, v) in h.iter().filter(|(k, _)| k.starts_with("ce-")) {
                                    assert!(
                                        v.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                                        "{k}: {v:?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// Whatever a row holds, CloudEvents encoding gives a message or a reason, never a
        /// panic; what it gives is valid: structured bodies are JSON with the event's id, and
        /// NATS `ce-` values are printable ASCII.
        #[test]
        fn any_row_encodes_as_a_cloudevent_or_says_why(
            aggregate in "\\PC{0,12}|[\\x00-\\x7f]{0,6}",
            kind in "\\PC{0,8}",
            content_type in proptest::option::of("\\PC{0,12}|application/json|text/plain"),
            correlation in proptest::option::of("\\PC{0,8}"),
            header in "(ce[-_])?[a-zA-Z]{0,4}",
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            json_payload in proptest::bool::ANY,
            year in -5000i32..15000,
        ) {
            use chrono::TimeZone as _;
            let mut e = sample_event(1, &aggregate);
            e.event_type = kind;
            e.content_type = content_type;
            e.correlation_id = correlation;
            e.headers = vec![(header, "v".into())];
            e.payload = if json_payload { br#"{"a":[1,2.5,"x"]}"#.to_vec() } else { payload };
            if let chrono::LocalResult::Single(t) = Utc.with_ymd_and_hms(year, 1, 2, 3, 4, 5) {
                e.occurred_at = t;
            }
            for mode in [CloudEventsMode::Binary, CloudEventsMode::Structured] {
                for wire in [Wire::Kafka, Wire::Nats] {
                    match e.message(ce(mode), wire) {
                        Ok((h, body)) => {
                            if mode == CloudEventsMode::Structured {
                                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                proptest::prop_assert_eq!(&v["id"], &e.event_id.to_string());
                            } else {
                                proptest::prop_assert_eq!(&body, &e.payload);
                            }
                            for (k, v) in h.iter().filter(|(k, _)| k.starts_with("ce-")) {
                                proptest::prop_assert!(
                                    v.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                                    "{}: {:?}", k, v
                                );
                            }
                        }
                        Err(err) => proptest::prop_assert!(!err.to_string().is_empty()),
                    }
                }
            }
        }
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
