//! An event as a Pulsar message (key, properties, event time, body), checked against the
//! largest message the broker takes.

use super::config::PulsarConfig;
use crate::envelope::{BodyFormat, Event, InvalidEvent, Wire};
use pulsar::producer::Message;
use std::collections::HashMap;

/// Builds the Pulsar message of an event without a broker, or says why the row cannot be
/// sent: a row the route's format cannot carry, or a message larger than `limit` (see
/// [`message_limit`]). Properties are protobuf strings, so any header the row holds (a
/// JSON string) fits; CloudEvents in binary mode use the Kafka binding's `ce_*` names. Never
/// panics, whatever the row holds.
pub fn pulsar_message(
    event: &Event,
    format: BodyFormat,
    limit: usize,
) -> Result<Message, InvalidEvent> {
    let (wire, body) = event.message(format, Wire::Kafka)?;
    let mut properties = HashMap::with_capacity(wire.len());
    let mut overhead = 2 * event.aggregate_id.len();
    for (k, v) in wire {
        overhead = overhead.saturating_add(k.len() + v.len());
        properties.insert(k.to_string(), v.into_owned());
    }
    let size = overhead.saturating_add(body.len());
    if size > limit {
        return Err(InvalidEvent::MessageTooLarge {
            backend: "Pulsar",
            size,
            payload: body.len(),
            overhead,
            limit_name: "backend's limit (max_message_bytes less batching_max_bytes when \
                         batching, less 16 KiB of framing)",
            limit,
        });
    }
    let millis = event.occurred_at.timestamp_millis();
    Ok(Message {
        payload: body.into_owned(),
        properties,
        partition_key: Some(event.aggregate_id.clone()),
        ordering_key: Some(event.aggregate_id.as_bytes().to_vec()),
        // 0 means "not set" to Pulsar, so the epoch itself is left unset too.
        event_time: (millis > 0).then_some(millis as u64),
        ..Default::default()
    })
}

/// The largest message the relay hands to pulsar-rs. The broker closes the whole connection
/// on a frame over its `maxMessageSize` (pulsar-rs would then resend the same frame until it
/// expires), and a batch goes out only once it holds `batching_max_bytes`, so with batching a
/// message may ride in a frame beside that many bytes of others; 16 KiB more cover the
/// metadata and framing.
pub fn message_limit(cfg: &PulsarConfig) -> usize {
    let batch = if cfg.batching {
        cfg.batching_max_bytes as usize
    } else {
        0
    };
    (cfg.max_message_bytes as usize).saturating_sub(batch + FRAMING)
}

pub(crate) const FRAMING: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn event(payload: Vec<u8>) -> Event {
        let mut e = crate::envelope::sample_event(1, "order-1");
        e.payload = payload;
        e.event_version = 3;
        e.occurred_at = chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        e
    }

    #[test]
    fn a_message_carries_key_properties_and_event_time() {
        let e = event(b"{}".to_vec());
        let m = pulsar_message(&e, BodyFormat::Raw, 5_242_880).unwrap();
        assert_eq!(m.payload, b"{}");
        assert_eq!(m.partition_key.as_deref(), Some("order-1"));
        assert_eq!(m.ordering_key.as_deref(), Some(&b"order-1"[..]));
        assert_eq!(m.properties["X-Event-ID"], e.event_id.to_string());
        assert_eq!(m.properties["X-Event-Version"], "3");
        assert_eq!(m.properties["tenant"], "acme");
        assert_eq!(m.event_time, Some(e.occurred_at.timestamp_millis() as u64));
    }

    #[test]
    fn an_event_before_1970_has_no_event_time_but_keeps_its_header() {
        let mut e = event(b"{}".to_vec());
        e.occurred_at = chrono::Utc.with_ymd_and_hms(1900, 1, 1, 0, 0, 0).unwrap();
        let m = pulsar_message(&e, BodyFormat::Raw, 5_242_880).unwrap();
        assert_eq!(m.event_time, None);
        assert!(m.properties["X-Occurred-At"].starts_with("1900-01-01"));
    }

    #[test]
    fn an_oversized_message_names_the_limit() {
        let e = event(vec![b'x'; 2_000]);
        let err = pulsar_message(&e, BodyFormat::Raw, 1_024)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("field payload")
                && err.contains("max_message_bytes")
                && err.contains("of 1024 bytes"),
            "{err}"
        );
    }
}
