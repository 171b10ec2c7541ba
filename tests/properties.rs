//! Property: whatever a row holds, parsing, validation and every backend's encoding either
//! produce a message or a reason naming the field; nothing panics. Pure: no database and no
//! broker (the Kafka record and the NATS headers are built the way the backends build them).
//!
//! 2000 cases per property (PROPTEST_CASES overrides), a few seconds in all.

use chrono::{DateTime, Utc};
use outbox_relay::envelope::{parse_headers, BodyFormat, Event, Wire};
use outbox_relay::internals::glob_match;
use outbox_relay::publisher::kafka::kafka_message;
use outbox_relay::publisher::nats::nats_message;
use outbox_relay::publisher::stdout::render_line;
use outbox_relay::publisher::{AckTicket, Outgoing};
use proptest::prelude::*;
use serde_json::Value;
use std::sync::Arc;

const CASES: u32 = 2000;

/// Text as rows hold it: anything (control characters, non-ASCII), the characters that break
/// headers and subjects, or ordinary names.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9.]{1,20}",
        "[ -~\r\n\t\u{0}\u{7f}é:*>.]{0,24}",
        Just(String::new()),
        (0usize..400).prop_map(|n| "x".repeat(n)),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<i64>().prop_map(|i| Value::Number(i.into())),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((text(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A headers column: mostly objects of strings (the ones that get as far as the backends),
/// and any JSON, nested up to 300 levels, or many keys.
fn headers_column() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        4 => proptest::collection::vec((text(), text()), 0..8).prop_map(|kv| Some(Value::Object(
            kv.into_iter().map(|(k, v)| (k, Value::String(v))).collect()
        ))),
        2 => json().prop_map(Some),
        1 => (0usize..300).prop_map(|depth| {
            let mut v = Value::String("deep".into());
            for _ in 0..depth {
                v = serde_json::json!({ "a": v });
            }
            Some(v)
        }),
        1 => (250usize..300).prop_map(|n| Some(Value::Object(
            (0..n).map(|i| (format!("h{i}"), Value::String("v".into()))).collect()
        ))),
        1 => Just(None),
    ]
}

fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        Just(DateTime::<Utc>::MIN_UTC),
        Just(DateTime::<Utc>::MAX_UTC),
        Just(DateTime::UNIX_EPOCH),
        any::<i64>()
            .prop_map(|us| DateTime::from_timestamp_micros(us).unwrap_or(DateTime::UNIX_EPOCH)),
        (-8_334_601_228_800i64..8_210_266_876_799)
            .prop_map(|s| { DateTime::from_timestamp(s, 0).unwrap_or(DateTime::<Utc>::MAX_UTC) }),
    ]
}

prop_compose! {
    fn event()(
        topic in prop_oneof![text(), "t[a-z]{0,6}\\.[a-z]{1,6}"],
        aggregate_id in text(),
        aggregate_type in proptest::option::of(text()),
        event_type in text(),
        event_version in prop_oneof![any::<i32>(), Just(1), Just(0)],
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        headers in headers_column(),
        content_type in proptest::option::of(text()),
        traceparent in proptest::option::of(prop_oneof![
            text(),
            Just("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string()),
        ]),
        correlation_id in proptest::option::of(text()),
        occurred_at in timestamp(),
    ) -> (Event, Result<(), String>) {
        let parsed = parse_headers(headers.as_ref());
        let event = Event {
            id: 1,
            event_id: uuid::Uuid::nil(),
            topic,
            aggregate_id,
            aggregate_type,
            event_type,
            event_version,
            payload,
            headers: parsed.clone().unwrap_or_default(),
            content_type,
            traceparent,
            correlation_id,
            occurred_at,
            attempts: 0,
        };
        (event, parsed.map(|_| ()))
    }
}

/// A reason names what it is about: a field ("field headers: ...") or the topic.
fn names_a_field(reason: &str) -> bool {
    reason.starts_with("field ") || reason.starts_with("topic ")
}

fn formats() -> impl Strategy<Value = BodyFormat> {
    prop_oneof![Just(BodyFormat::Raw), Just(BodyFormat::Envelope)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn any_row_encodes_or_gives_a_reason_naming_the_field(
        (event, parsed) in event(),
        format in formats(),
        max_payload in prop_oneof![Just(1usize << 20), 0usize..400],
        broker_limit in prop_oneof![Just(None), Just(Some(1_000_000usize)), (0usize..2000).prop_map(Some)],
    ) {
        if let Err(reason) = parsed {
            prop_assert!(!reason.is_empty());
        }
        let common = event.validate(max_payload);
        if let Err(e) = &common {
            prop_assert!(names_a_field(&e.to_string()), "{e}");
        }
        for wire in [Wire::Nats, Wire::Kafka] {
            if let Err(e) = event.validate_for(wire) {
                prop_assert!(names_a_field(&e.to_string()), "{e}");
            }
        }
        let nats = nats_message(&event, format, broker_limit);
        match &nats {
            Ok(m) => {
                prop_assert!(m.headers.get("Nats-Msg-Id").is_some());
                prop_assert_eq!(m.body.to_vec(), event.body(format));
            }
            Err(e) => prop_assert!(names_a_field(&e.to_string()), "{e}"),
        }
        let kafka = kafka_message(&event, format, broker_limit);
        if let Err(e) = &kafka {
            prop_assert!(names_a_field(&e.to_string()), "{e}");
        }
        // What passes validation for a backend encodes for it: the checks are complete,
        // so no row reaches a client library that would refuse (or panic on) it.
        if common.is_ok() && event.validate_for(Wire::Nats).is_ok() && broker_limit.is_none() {
            let subject_ok = outbox_relay::publisher::nats::config::validate_subject(&event.topic).is_ok();
            prop_assert_eq!(nats.is_ok(), subject_ok, "{:?}", nats.as_ref().err());
        }
        if common.is_ok() && event.validate_for(Wire::Kafka).is_ok() && broker_limit.is_none() {
            let topic_ok = outbox_relay::publisher::kafka::config::validate_kafka_topic(&event.topic).is_ok();
            prop_assert_eq!(kafka.is_ok(), topic_ok, "{:?}", kafka.as_ref().err());
        }
        if format == BodyFormat::Envelope {
            let body: Value = serde_json::from_slice(&event.body(format)).expect("envelope JSON");
            prop_assert!(body["event_id"].is_string());
        }
        // The stdout backend renders any event as one JSON line.
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let event = Arc::new(event);
        let o = Outgoing {
            ticket: AckTicket::new(1, 1, tx),
            event,
            format,
        };
        let line = render_line(&o);
        prop_assert_eq!(line.last(), Some(&b'\n'));
        prop_assert!(serde_json::from_slice::<Value>(&line).is_ok());
    }

    #[test]
    fn any_json_headers_parse_or_give_a_reason(v in json()) {
        match parse_headers(Some(&v)) {
            Ok(h) => prop_assert!(matches!(v, Value::Object(_) | Value::Null) && h.len() <= v.as_object().map_or(0, |o| o.len())),
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn routing_globs_never_panic(pattern in text(), topic in text()) {
        let _ = glob_match(&pattern, &topic);
        prop_assert!(glob_match("*", &topic));
        prop_assert!(glob_match(&topic, &topic));
    }
}
