//! What a row must be to be published at all ([`Event::validate`]: topic, fields, sizes,
//! headers), and what each wire adds ([`Event::validate_for`]).

use super::headers::{
    is_nats_control_header, is_relay_header, kafka_header_name_problem, nats_header_name_problem,
    nats_header_value_problem,
};
use super::{shown, trace_id_of, Event, InvalidEvent, Wire, MAX_HEADERS, MAX_HEADER_BYTES};
use std::fmt;

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
}
