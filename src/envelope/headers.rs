//! Header names: the relay's own (on every message, on Kafka and NATS alike), the rules each
//! wire puts on a row's own headers, and the `headers` column read into them.

use super::shown;

pub const EVENT_ID: &str = "X-Event-ID";
pub const AGGREGATE_ID: &str = "X-Aggregate-ID";
pub const AGGREGATE_TYPE: &str = "X-Aggregate-Type";
pub const EVENT_TYPE: &str = "X-Event-Type";
pub const EVENT_VERSION: &str = "X-Event-Version";
pub const OCCURRED_AT: &str = "X-Occurred-At";
pub const CORRELATION_ID: &str = "X-Correlation-ID";
pub const CONTENT_TYPE: &str = "content-type";
pub const TRACEPARENT: &str = "traceparent";

/// Header names the relay sets on every message; a row's own header may not use them (compared
/// without regard to case, as HTTP-minded consumers read them).
pub const RELAY_HEADERS: [&str; 9] = [
    EVENT_ID,
    AGGREGATE_ID,
    AGGREGATE_TYPE,
    EVENT_TYPE,
    EVENT_VERSION,
    OCCURRED_AT,
    CORRELATION_ID,
    CONTENT_TYPE,
    TRACEPARENT,
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
