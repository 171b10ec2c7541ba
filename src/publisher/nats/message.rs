//! An event as a NATS message: the relay's metadata, the row's own headers and `Nats-Msg-Id`
//! (the event id, JetStream's de-duplication key) as headers, and the body by the route's
//! format; checked against the server's payload limit.

use super::config;
use crate::envelope::{headers, shown, BodyFormat, Event, InvalidEvent, Wire};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

/// An event as a NATS message: its headers (the relay's metadata, the row's own headers and
/// `Nats-Msg-Id` = event id) and its body.
#[derive(Debug)]
pub struct NatsMessage<'a> {
    pub headers: HeaderMap,
    /// Borrowed from the event where the route sends its payload as it is.
    pub body: Cow<'a, [u8]>,
}

/// Builds the NATS message of an event without a connection, or says why the row cannot be
/// sent: a subject NATS refuses, headers HPUB cannot carry, a row header standing in for a
/// `Nats-*` control header, a row the route's format cannot carry (see [`Event::message`]),
/// or (with the server's `max_payload`, when known) a message larger than the server takes.
/// CloudEvents in binary mode follow the NATS binding: `ce-*` headers, values
/// percent-encoded. Never panics, whatever the row holds.
pub fn nats_message(
    event: &Event,
    format: BodyFormat,
    max_payload: Option<usize>,
) -> Result<NatsMessage<'_>, InvalidEvent> {
    config::validate_subject(&event.topic).map_err(InvalidEvent::BackendTopic)?;
    event.validate_for(Wire::Nats)?;
    let (wire, body) = event.message(format, Wire::Nats)?;
    let headers = header_map(event, wire)?;
    if let Some(limit) = max_payload.filter(|m| *m > 0) {
        let overhead = nats_headers_size(&headers);
        let size = overhead.saturating_add(body.len());
        if size > limit {
            return Err(InvalidEvent::MessageTooLarge {
                backend: "NATS",
                size,
                payload: body.len(),
                overhead,
                limit_name: "server's max_payload",
                limit,
            });
        }
    }
    Ok(NatsMessage { headers, body })
}

/// The headers of an event's NATS message in the route's format; see [`nats_message`].
pub fn nats_headers(event: &Event, format: BodyFormat) -> Result<HeaderMap, InvalidEvent> {
    event.validate_for(Wire::Nats)?;
    header_map(event, event.headers_for(format, Wire::Nats)?)
}

/// An event whose payload is a message's body as it is: the body's bytes stay in the event.
pub(super) struct Payload(pub(super) Arc<Event>);

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        &self.0.payload
    }
}

/// The message's headers as the client's map, with `Nats-Msg-Id` = event id.
fn header_map(event: &Event, wire: Vec<(&str, Cow<'_, str>)>) -> Result<HeaderMap, InvalidEvent> {
    let mut h = HeaderMap::new();
    let mut id = None;
    // validate_for has checked every name and value (and CloudEvents values are
    // percent-encoded). Names not the relay's own are parsed fallibly; a value is checked here
    // for exactly what the client's `From<String>` asserts (no CR or LF, in 0.51), so it
    // moves in without a copy and cannot panic.
    for (k, v) in wire {
        let (name, relays) = match relay_header_name(k) {
            Some(name) => (name, true),
            None => (
                HeaderName::from_str(k).map_err(|e| InvalidEvent::Header {
                    name: shown(k),
                    problem: e.to_string(),
                })?,
                false,
            ),
        };
        if v.contains(['\r', '\n']) {
            return Err(InvalidEvent::Header {
                name: shown(k),
                problem: format!(
                    "its value {}: a header value cannot contain '\\r' or '\\n'",
                    shown(&v)
                ),
            });
        }
        let v = v.into_owned();
        if k == headers::EVENT_ID {
            id = Some(v.clone());
        }
        // Checked above: the value moves in without a copy. The relay sets each of its names
        // once (a row's own header of that name is left out), so one lookup does.
        if relays {
            h.insert(name, HeaderValue::from(v));
        } else {
            h.append(name, HeaderValue::from(v));
        }
    }
    // A UUID's text: no line break.
    let id = id.unwrap_or_else(|| event.event_id.to_string());
    h.insert(async_nats::header::NATS_MESSAGE_ID, HeaderValue::from(id));
    Ok(h)
}

/// The relay's own header names, which need neither checking nor copying.
fn relay_header_name(k: &str) -> Option<HeaderName> {
    Some(match k {
        headers::EVENT_ID => HeaderName::from_static(headers::EVENT_ID),
        headers::AGGREGATE_ID => HeaderName::from_static(headers::AGGREGATE_ID),
        headers::AGGREGATE_TYPE => HeaderName::from_static(headers::AGGREGATE_TYPE),
        headers::EVENT_TYPE => HeaderName::from_static(headers::EVENT_TYPE),
        headers::EVENT_VERSION => HeaderName::from_static(headers::EVENT_VERSION),
        headers::OCCURRED_AT => HeaderName::from_static(headers::OCCURRED_AT),
        headers::CORRELATION_ID => HeaderName::from_static(headers::CORRELATION_ID),
        headers::CONTENT_TYPE => HeaderName::from_static(headers::CONTENT_TYPE),
        headers::TRACEPARENT => HeaderName::from_static(headers::TRACEPARENT),
        _ => return None,
    })
}

/// The size of a header block on the wire ("NATS/1.0\r\n", "name: value\r\n" each, "\r\n"),
/// which the server counts against max_payload with the body.
pub fn nats_headers_size(headers: &HeaderMap) -> usize {
    let mut len = "NATS/1.0\r\n".len() + "\r\n".len();
    for (k, vs) in headers.iter() {
        let name: &str = k.as_ref();
        for v in vs {
            len = len.saturating_add(name.len() + ": ".len() + v.as_str().len() + "\r\n".len());
        }
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::sample_event;

    /// The headers as they go on the wire: (name, value) for every value.
    fn on_the_wire(h: &HeaderMap) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = h
            .iter()
            .flat_map(|(k, vs)| {
                let k: &str = k.as_ref();
                vs.iter()
                    .map(move |v| (k.to_string(), v.as_str().to_string()))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_message_carries_the_set_headers_and_no_empty_name() {
        let mut event = sample_event(1, "agg-1");
        event.aggregate_type = None;
        event.correlation_id = None;
        let m = nats_message(&event, BodyFormat::Raw, None).unwrap();
        let id = event.event_id.to_string();
        let mut expected: Vec<(String, String)> = event
            .wire_headers()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_owned()))
            .chain([("Nats-Msg-Id".to_string(), id.clone())])
            .collect();
        expected.sort();
        assert_eq!(on_the_wire(&m.headers), expected);
        assert!(m.headers.get(headers::AGGREGATE_TYPE).is_none());
        assert_eq!(m.headers.get("tenant").map(|v| v.as_str()), Some("acme"));
        // The size counts only what is written: "NATS/1.0\r\n", a line per value, "\r\n".
        let lines: usize = expected.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        assert_eq!(nats_headers_size(&m.headers), 12 + lines);
    }

    #[test]
    fn a_line_break_in_a_row_header_value_is_an_error_not_a_panic() {
        let mut event = sample_event(1, "agg-1");
        event.headers = vec![("h".into(), "x\r\nNats-Msg-Id: 1".into())];
        let wire = vec![("h", Cow::Borrowed("x\r\nNats-Msg-Id: 1"))];
        let e = header_map(&event, wire).unwrap_err().to_string();
        assert!(e.contains("cannot contain"), "{e}");
    }
}
