//! CloudEvents 1.0: the attributes an event maps to, their names in each protocol binding,
//! and the checks the spec asks of their values.
//!
//! | attribute | from |
//! |---|---|
//! | `specversion` | `1.0` |
//! | `id` | `event_id` |
//! | `source` | the route's `cloudevents_source` |
//! | `type` | `event_type` |
//! | `subject` | `aggregate_id` |
//! | `time` | `occurred_at` (RFC 3339, UTC, microseconds) |
//! | `datacontenttype` | `content_type`, when set and not empty |
//! | `traceparent` | `traceparent`, when set (the Distributed Tracing extension) |
//! | `partitionkey` | `aggregate_id` (the Partitioning extension: the Kafka key, the order) |
//! | `aggregatetype` | `aggregate_type`, when set and not empty |
//! | `correlationid` | `correlation_id`, when set and not empty |
//! | `eventversion` | `event_version` (an Integer) |
//!
//! Extension names are lowercase letters and digits, at most 20 characters, as the spec asks.

use super::{headers, shown, CloudEventsFormat, CloudEventsMode, Event, InvalidEvent, Wire};
use base64::Engine as _;
use chrono::SecondsFormat;
use serde::Serialize;
use std::borrow::Cow;

pub const SPECVERSION: &str = "1.0";
/// The `content-type` of a structured-mode message (the JSON event format).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";
/// The attribute prefix of the Kafka binding's binary mode.
pub const KAFKA_PREFIX: &str = "ce_";
/// The attribute prefix of the NATS (and HTTP) binding's binary mode.
pub const NATS_PREFIX: &str = "ce-";
/// The longest `cloudevents_source` taken: it travels with every message.
pub const MAX_SOURCE_BYTES: usize = 1024;

/// Every attribute the relay writes, in the order it writes them: (name, Kafka header,
/// NATS header). Kafka carries `datacontenttype` as `content-type` instead.
pub const ATTRIBUTES: [(&str, &str, &str); 12] = [
    ("specversion", "ce_specversion", "ce-specversion"),
    ("id", "ce_id", "ce-id"),
    ("source", "ce_source", "ce-source"),
    ("type", "ce_type", "ce-type"),
    ("subject", "ce_subject", "ce-subject"),
    ("time", "ce_time", "ce-time"),
    (
        "datacontenttype",
        "ce_datacontenttype",
        "ce-datacontenttype",
    ),
    ("traceparent", "ce_traceparent", "ce-traceparent"),
    ("partitionkey", "ce_partitionkey", "ce-partitionkey"),
    ("aggregatetype", "ce_aggregatetype", "ce-aggregatetype"),
    ("correlationid", "ce_correlationid", "ce-correlationid"),
    ("eventversion", "ce_eventversion", "ce-eventversion"),
];

/// Whether a row header would read as a CloudEvents attribute in binary mode (under either
/// binding's prefix, in any case). Such a header fails the row on CloudEvents routes: it
/// could stand in for the event's id or source, and SDKs take any `ce_` header on Kafka as
/// the sign of binary mode.
pub fn is_attribute_header(name: &str) -> bool {
    name.get(..3).is_some_and(|p| {
        p.eq_ignore_ascii_case(KAFKA_PREFIX) || p.eq_ignore_ascii_case(NATS_PREFIX)
    })
}

/// Whether a media type is JSON: `application/json`, `text/json` or any `*/*+json`,
/// parameters and case aside. Such a payload goes into `data` as JSON in structured mode.
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    !kind.is_empty()
        && (subtype == "json"
            && ["application", "text"]
                .iter()
                .any(|k| k.eq_ignore_ascii_case(kind))
            || subtype.len() > "+json".len() && subtype.ends_with("+json"))
}

/// Whether a content type marks a structured CloudEvent (`application/cloudevents...`):
/// consumers decide the mode by it, so a binary-mode message must not carry it.
pub fn is_structured_media_type(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..23)
        .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents"))
}

/// Why `value` cannot be a CloudEvents String: the spec forbids control characters
/// (U+0000-U+001F, U+007F-U+009F) and Unicode noncharacters (surrogates cannot occur in
/// Rust strings).
pub fn string_problem(value: &str) -> Option<String> {
    let (i, ch) = value.chars().enumerate().find(|(_, c)| {
        let u = *c as u32;
        c.is_control() || (0xFDD0..=0xFDEF).contains(&u) || u & 0xFFFE == 0xFFFE
    })?;
    let what = if ch.is_control() {
        "a control character"
    } else {
        "a Unicode noncharacter"
    };
    Some(format!(
        "has {what} (U+{:04X}) at position {}, which CloudEvents strings cannot hold",
        ch as u32,
        i + 1
    ))
}

/// The NATS binding's header value encoding: space, `"`, `%` and everything outside
/// printable ASCII percent-encoded as UTF-8 bytes, upper-case hex.
pub fn percent_encode(value: &str) -> Cow<'_, str> {
    let plain = |b: u8| (0x21..=0x7E).contains(&b) && b != b'"' && b != b'%';
    if value.bytes().all(plain) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xF) as usize] as char);
        }
    }
    Cow::Owned(out)
}

/// Why `source` cannot be a route's `cloudevents_source`: it must be a non-empty
/// URI-reference (RFC 3986) of at most [`MAX_SOURCE_BYTES`], written in its characters
/// (percent-encode the others), and a scheme, if any, starts with a letter.
pub fn source_problem(source: &str) -> Option<String> {
    const EXAMPLES: &str =
        "e.g. \"https://orders.example.com\", \"urn:example:orders\" or \"/orders/service\"";
    if source.is_empty() {
        return Some(format!(
            "is required when format = \"cloudevents\": a URI-reference naming the \
             producer, {EXAMPLES}"
        ));
    }
    if source.len() > MAX_SOURCE_BYTES {
        return Some(format!(
            "is {} bytes long, at most {MAX_SOURCE_BYTES} are allowed",
            source.len()
        ));
    }
    let bytes = source.as_bytes();
    for (position, (i, ch)) in source.char_indices().enumerate() {
        let allowed = ch.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=%".contains(ch);
        if !allowed {
            return Some(format!(
                "{}: character {ch:?} (U+{:04X}) at position {} is not allowed in a \
                 URI-reference (RFC 3986); percent-encode it, {EXAMPLES}",
                super::shown(source),
                ch as u32,
                position + 1
            ));
        }
        let hex = |j: usize| bytes.get(j).is_some_and(|b| b.is_ascii_hexdigit());
        if ch == '%' && !(hex(i + 1) && hex(i + 2)) {
            return Some(format!(
                "{}: '%' at position {} is not followed by two hex digits",
                super::shown(source),
                position + 1
            ));
        }
    }
    // A colon before any '/', '?' or '#' ends a scheme, which RFC 3986 starts with a letter
    // followed by letters, digits, '+', '-' or '.'.
    let head = source.split(['/', '?', '#']).next().unwrap_or_default();
    if let Some((scheme, _)) = head.split_once(':') {
        let mut chars = scheme.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !ok {
            return Some(format!(
                "{}: {scheme:?} before ':' is not a URI scheme (a letter, then letters, \
                 digits, '+', '-' or '.'); {EXAMPLES}",
                super::shown(source)
            ));
        }
    }
    None
}

/// The attributes of one event as a CloudEvent, checked; see the module's table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CloudEventAttributes<'a> {
    pub specversion: &'static str,
    pub id: String,
    pub source: &'static str,
    #[serde(rename = "type")]
    pub ty: &'a str,
    pub subject: &'a str,
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<&'a str>,
    pub partitionkey: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregatetype: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<&'a str>,
    pub eventversion: i32,
}

/// One row of `ATTRIBUTES`: (name, Kafka header, NATS header).
pub type CloudEventAttribute = (&'static str, &'static str, &'static str);

impl CloudEventAttributes<'_> {
    /// Each attribute that is set, with its canonical string, in `ATTRIBUTES`'
    /// order.
    pub fn values(&self) -> Vec<(&'static CloudEventAttribute, String)> {
        let all = [
            Some(self.specversion.to_string()),
            Some(self.id.clone()),
            Some(self.source.to_string()),
            Some(self.ty.to_string()),
            Some(self.subject.to_string()),
            Some(self.time.clone()),
            self.datacontenttype.map(str::to_string),
            self.traceparent.map(str::to_string),
            Some(self.partitionkey.to_string()),
            self.aggregatetype.map(str::to_string),
            self.correlationid.map(str::to_string),
            Some(self.eventversion.to_string()),
        ];
        ATTRIBUTES
            .iter()
            .zip(all)
            .filter_map(|(a, v)| v.map(|v| (a, v)))
            .collect()
    }
}

/// A structured-mode CloudEvent: the attributes, then the payload as `data` (JSON, verbatim)
/// or `data_base64`; neither for an empty payload (an event without data).
#[derive(Serialize)]
struct StructuredCloudEvent<'a> {
    #[serde(flatten)]
    attributes: CloudEventAttributes<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a serde_json::value::RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

impl Event {
    /// The event as a CloudEvent's attributes (see this module for the mapping), or why it
    /// cannot be one: a field with a character CloudEvents strings forbid (naming the field
    /// and the attribute), an `occurred_at` outside years 1-9999 (RFC 3339 writes four
    /// digits), a row header under a `ce_`/`ce-` prefix, in binary mode a content type that
    /// marks a structured CloudEvent, or a route without a source.
    pub fn cloudevent(
        &self,
        ce: &CloudEventsFormat,
    ) -> Result<CloudEventAttributes<'_>, InvalidEvent> {
        if ce.source.as_str().is_empty() {
            return Err(InvalidEvent::Body {
                format: "cloudevents",
                reason: "the route has no cloudevents_source".into(),
            });
        }
        for (field, value) in [
            ("aggregate_id", &self.aggregate_id),
            ("event_type", &self.event_type),
        ] {
            if value.is_empty() {
                return Err(InvalidEvent::Empty { field });
            }
        }
        // An empty optional field is left out: CloudEvents has no empty attribute values.
        fn optional(v: &Option<String>) -> Option<&str> {
            v.as_deref().filter(|v| !v.is_empty())
        }
        let attributes = CloudEventAttributes {
            specversion: SPECVERSION,
            id: self.event_id.to_string(),
            source: ce.source.as_str(),
            ty: &self.event_type,
            subject: &self.aggregate_id,
            time: self.cloudevent_time()?,
            datacontenttype: optional(&self.content_type),
            traceparent: optional(&self.traceparent),
            partitionkey: &self.aggregate_id,
            aggregatetype: optional(&self.aggregate_type),
            correlationid: optional(&self.correlation_id),
            eventversion: self.event_version,
        };
        self.check_cloudevent(&attributes, ce.mode)?;
        Ok(attributes)
    }

    /// What CloudEvents cannot carry: a string attribute with a forbidden character, in
    /// binary mode a structured content type, a row header named like an attribute.
    fn check_cloudevent(
        &self,
        attributes: &CloudEventAttributes<'_>,
        mode: CloudEventsMode,
    ) -> Result<(), InvalidEvent> {
        let strings = [
            ("event_type", "type", Some(attributes.ty)),
            ("aggregate_id", "subject", Some(attributes.subject)),
            (
                "content_type",
                "datacontenttype",
                attributes.datacontenttype,
            ),
            ("traceparent", "traceparent", attributes.traceparent),
            ("aggregate_type", "aggregatetype", attributes.aggregatetype),
            ("correlation_id", "correlationid", attributes.correlationid),
        ];
        for (field, attribute, value) in strings {
            let Some(value) = value else { continue };
            if let Some(problem) = string_problem(value) {
                return Err(InvalidEvent::CloudEventsAttribute {
                    field,
                    attribute,
                    value: shown(value),
                    problem,
                });
            }
        }
        if mode == CloudEventsMode::Binary {
            if let Some(ct) = attributes
                .datacontenttype
                .filter(|ct| is_structured_media_type(ct))
            {
                return Err(InvalidEvent::CloudEventsAttribute {
                    field: "content_type",
                    attribute: "datacontenttype",
                    value: shown(ct),
                    problem: "marks a structured CloudEvent, so consumers would read the \
                              payload of this binary-mode route as the event itself"
                        .into(),
                });
            }
        }
        for (k, _) in &self.headers {
            if is_attribute_header(k) {
                return Err(InvalidEvent::ReservedHeader {
                    name: shown(k),
                    owner: "CloudEvents attributes (ce_* and ce-* headers) on a CloudEvents route",
                });
            }
        }
        Ok(())
    }

    /// `occurred_at` as a CloudEvents `time`: RFC 3339 in UTC with microseconds (what Postgres
    /// stores), which has four-digit years; Postgres takes years up to 294276 and BC dates.
    fn cloudevent_time(&self) -> Result<String, InvalidEvent> {
        use chrono::Datelike as _;
        let text = self
            .occurred_at
            .to_rfc3339_opts(SecondsFormat::Micros, true);
        if (1..=9999).contains(&self.occurred_at.year()) {
            Ok(text)
        } else {
            Err(InvalidEvent::CloudEventsAttribute {
                field: "occurred_at",
                attribute: "time",
                value: shown(&text),
                problem: "is outside the years 0001-9999 that an RFC 3339 timestamp can hold"
                    .into(),
            })
        }
    }

    pub(super) fn cloudevent_headers(
        &self,
        attributes: &CloudEventAttributes<'_>,
        mode: CloudEventsMode,
        wire: Wire,
    ) -> Vec<(&str, Cow<'_, str>)> {
        let mut out = self.wire_headers();
        out.retain(|(k, v)| !(*k == headers::CONTENT_TYPE && v.is_empty()));
        match mode {
            CloudEventsMode::Structured => {
                let ct = Cow::Borrowed(STRUCTURED_CONTENT_TYPE);
                match out.iter_mut().find(|(k, _)| *k == headers::CONTENT_TYPE) {
                    Some((_, v)) => *v = ct,
                    None => out.push((headers::CONTENT_TYPE, ct)),
                }
            }
            CloudEventsMode::Binary => {
                for ((name, kafka, nats), value) in attributes.values() {
                    match wire {
                        // The content-type header already carries it.
                        Wire::Kafka if *name == "datacontenttype" => {}
                        Wire::Kafka => out.push((kafka, Cow::Owned(value))),
                        Wire::Nats => {
                            let value = match percent_encode(&value) {
                                std::borrow::Cow::Borrowed(_) => value,
                                std::borrow::Cow::Owned(encoded) => encoded,
                            };
                            out.push((nats, Cow::Owned(value)))
                        }
                    }
                }
            }
        }
        out
    }

    pub(super) fn cloudevent_body(
        &self,
        attributes: CloudEventAttributes<'_>,
        mode: CloudEventsMode,
    ) -> Result<Vec<u8>, InvalidEvent> {
        if mode == CloudEventsMode::Binary {
            return Ok(self.payload.clone());
        }
        // No datacontenttype means application/json in the JSON event format. A payload that
        // claims JSON but is not (invalid UTF-8, a syntax error, nesting past serde_json's
        // limit) goes as data_base64 rather than failing: consumers still get its bytes.
        let json = attributes.datacontenttype.is_none_or(is_json_media_type);
        let data = if json && !self.payload.is_empty() {
            serde_json::from_slice::<&serde_json::value::RawValue>(&self.payload).ok()
        } else {
            None
        };
        let data_base64 = (data.is_none() && !self.payload.is_empty())
            .then(|| base64::engine::general_purpose::STANDARD.encode(&self.payload));
        serde_json::to_vec(&StructuredCloudEvent {
            attributes,
            data,
            data_base64,
        })
        .map_err(|e| InvalidEvent::Body {
            format: "cloudevents",
            reason: e.to_string(),
        })
    }
}
