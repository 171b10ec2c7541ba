//! Kafka backend: librdkafka's producer, asynchronous, with every delivery report turned into a
//! result on the ACK channel.
//!
//! * Each message carries its [`AckTicket`] as librdkafka's per-message opaque; the delivery
//!   callback (on the producer's polling thread) resolves it. No future or task per message.
//! * Key = aggregate id, so an aggregate's events share a partition. The relay keeps at most
//!   one event per aggregate in flight, so order holds whatever librdkafka does with retries;
//!   idempotence (on by default) still keeps librdkafka's own retries from duplicating.
//! * When librdkafka's queue is full, [`KafkaPublisher::publish`] waits for room: the relay
//!   slows down, nothing is dropped.
//! * Topics are provisioned once at start-up ([`provision`]), never per message.
//! * A producer that can no longer produce (a fatal librdkafka error, or a broker that refuses
//!   everything for a while, as after losing an idempotent producer's state) is replaced by a
//!   new one at most every 10 s; the relay itself never restarts for it.

pub mod config;
pub mod error;
pub mod provision;
mod topics;

pub use config::KafkaConfig;

use super::{AckTicket, Health, Outgoing, PublishError, Publisher};
use crate::config::value::Dur;
use crate::envelope::{BodyFormat, Event, InvalidEvent, Wire};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, PurgeConfig, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What the delivery reports say about the producer's state, shared by the producers a
/// publisher has had (a rebuilt producer reports into the same place).
#[derive(Default)]
pub struct ProducerHealth {
    /// Failures the broker *answered* with since the last success (not timeouts or transport
    /// errors: those mean the broker is away, and a new producer would not help).
    answered_failures: AtomicU64,
    /// Any failures since the last success.
    failures: AtomicU64,
    /// No success for this long while messages keep failing: replace the producer. Twice the
    /// message timeout, so a broker that is merely slow never triggers it.
    stall_after_ms: AtomicU64,
    /// Successes so far. A delivery report only counts (no clock reading per message); the
    /// time of the last success is taken when `wedged` next finds the count moved.
    successes: AtomicU64,
    /// `successes` as `wedged` last saw it.
    successes_seen: AtomicU64,
    /// Milliseconds since `epoch` of the last success (as of the last `wedged`).
    last_ok_ms: AtomicU64,
    /// librdkafka raised a fatal error: this producer instance can never produce again.
    fatal: AtomicBool,
    /// The broker refused this producer's own state (fenced, unknown producer id, a stale
    /// epoch or sequence): such results spend no attempts (see `error::is_producer_state`),
    /// so the producer is replaced at the next hand-off instead of after a stall.
    refused_state: AtomicBool,
    epoch: OnceInstant,
}

/// An `Instant` fixed at first use, so times fit in atomics as milliseconds.
#[derive(Default)]
struct OnceInstant(std::sync::OnceLock<Instant>);

impl OnceInstant {
    fn ms(&self) -> u64 {
        self.0.get_or_init(Instant::now).elapsed().as_millis() as u64
    }
}

impl ProducerHealth {
    /// Records one delivery outcome: `Ok` or the error's code, where it has one.
    fn on_result(&self, result: Result<(), Option<RDKafkaErrorCode>>) {
        use RDKafkaErrorCode as C;
        let code = match result {
            Ok(()) => {
                if self.failures.load(Ordering::Relaxed) > 0 {
                    self.failures.store(0, Ordering::Relaxed);
                    self.answered_failures.store(0, Ordering::Relaxed);
                }
                self.successes.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(code) => code,
        };
        match code {
            // Backpressure and our own purges say nothing about the producer's state.
            Some(C::QueueFull | C::PurgeQueue | C::PurgeInflight) => return,
            Some(C::Fatal) => self.fatal.store(true, Ordering::Relaxed),
            Some(c) if error::is_producer_state(c) => {
                self.refused_state.store(true, Ordering::Relaxed);
                self.answered_failures.fetch_add(1, Ordering::Relaxed);
            }
            Some(
                C::MessageTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::RequestTimedOut,
            )
            | None => {}
            Some(_) => {
                self.answered_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Why the producer should be replaced, if it should: a fatal error; the broker refusing
    /// everything for a while; or messages failing with no success for twice the message
    /// timeout (an idempotent producer stuck re-initialising against a broker that lost its
    /// state, say). Replacing a producer costs a reconnect and retries of what it held, so
    /// doing it while a broker is simply down is harmless.
    fn wedged(&self) -> Option<String> {
        if self.fatal.load(Ordering::Relaxed) {
            return Some("librdkafka raised a fatal error".into());
        }
        if self.refused_state.load(Ordering::Relaxed) {
            return Some("the broker refused the producer's id, epoch or sequence".into());
        }
        let now = self.epoch.ms();
        let successes = self.successes.load(Ordering::Relaxed);
        if self.successes_seen.swap(successes, Ordering::Relaxed) != successes {
            self.last_ok_ms.store(now, Ordering::Relaxed);
        }
        // The last success as of this look (delivery reports only count them): at worst
        // later than it was, which delays a rebuild by the gap between two hand-offs.
        let since_ok = now.saturating_sub(self.last_ok_ms.load(Ordering::Relaxed));
        let refused = self.answered_failures.load(Ordering::Relaxed);
        if refused >= 50 && since_ok >= 5_000 {
            return Some(format!(
                "{refused} refusals from the broker and no success for {since_ok} ms"
            ));
        }
        let failures = self.failures.load(Ordering::Relaxed);
        let stall = self.stall_after_ms.load(Ordering::Relaxed);
        (failures > 0 && since_ok >= stall)
            .then(|| format!("{failures} failures and no success for {since_ok} ms"))
    }

    fn reset(&self) {
        self.answered_failures.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.fatal.store(false, Ordering::Relaxed);
        self.refused_state.store(false, Ordering::Relaxed);
        self.last_ok_ms.store(self.epoch.ms(), Ordering::Relaxed);
    }
}

/// Receives librdkafka's delivery reports and errors.
pub struct RelayContext {
    health: Arc<ProducerHealth>,
}

impl ClientContext for RelayContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.health.fatal.store(true, Ordering::Relaxed);
        }
        // librdkafka reports transport errors for every reconnect attempt; they are expected
        // while a broker is down, so they are warnings, not errors.
        tracing::warn!(error = %error, reason, "kafka client");
    }
}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = Box<AckTicket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<AckTicket>) {
        match result {
            Ok(_) => {
                self.health.on_result(Ok(()));
                ticket.ack()
            }
            Err((err, _)) => {
                self.health.on_result(Err(err.rdkafka_error_code()));
                ticket.nack(error::classify(err))
            }
        }
    }
}

type RelayProducer = ThreadedProducer<RelayContext>;

pub struct KafkaPublisher {
    producer: RwLock<Arc<RelayProducer>>,
    conf: ClientConfig,
    health: Arc<ProducerHealth>,
    rebuilt_at: Mutex<Instant>,
    rebuilds: AtomicU64,
    health_timeout: Duration,
    /// The producer's `message.max.bytes`: a record larger than this fails before it is sent.
    max_message_bytes: usize,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// An event as the parts of a Kafka record; its topic and key (the aggregate id) are the
/// event's own.
pub struct KafkaMessage<'a> {
    pub headers: OwnedHeaders,
    pub body: std::borrow::Cow<'a, [u8]>,
}

/// Builds the Kafka record of an event without a broker, or says why the row cannot be sent:
/// a topic name Kafka refuses, a header name librdkafka cannot take, a row the route's format
/// cannot carry (see [`Event::message`]), or a record larger than `max_message_bytes` (the
/// producer's `message.max.bytes`, when given; librdkafka checks it again with its own
/// framing). Kafka takes any bytes in header values and keys, so the fields the relay sends as
/// headers need no check here. CloudEvents in binary mode follow the Kafka binding: `ce_*`
/// headers with UTF-8 values, `datacontenttype` as `content-type`. Never panics, whatever the
/// row holds.
pub fn kafka_message(
    event: &Event,
    format: BodyFormat,
    max_message_bytes: Option<usize>,
) -> Result<KafkaMessage<'_>, InvalidEvent> {
    // Also what keeps librdkafka's topic CString free of NUL bytes.
    config::validate_kafka_topic(&event.topic).map_err(InvalidEvent::BackendTopic)?;
    event.validate_for(Wire::Kafka)?;
    let (wire, body) = event.message(format, Wire::Kafka)?;
    let mut headers = OwnedHeaders::new_with_capacity(wire.len());
    let mut overhead = event.aggregate_id.len();
    for (k, v) in &wire {
        overhead = overhead.saturating_add(k.len() + v.len());
        // Asserts only that the headers are writable, which fresh ones always are.
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    if let Some(limit) = max_message_bytes {
        let size = overhead.saturating_add(body.len());
        if size > limit {
            return Err(InvalidEvent::MessageTooLarge {
                backend: "Kafka",
                size,
                payload: body.len(),
                overhead,
                limit_name: "producer's message.max.bytes",
                limit,
            });
        }
    }
    Ok(KafkaMessage { headers, body })
}

/// Shortest time between two producer rebuilds.
const REBUILD_COOLDOWN: Duration = Duration::from_secs(10);

impl KafkaPublisher {
    /// Creates the producer. It connects in the background; a broker that is down now is not
    /// an error (messages wait in librdkafka's queue and the relay's retries take over).
    pub fn new(cfg: &KafkaConfig, publish_timeout: Dur) -> Result<Self, KafkaError> {
        let mut conf = ClientConfig::new();
        for (k, v) in cfg.client_properties(publish_timeout) {
            conf.set(k, v);
        }
        let health = Arc::new(ProducerHealth::default());
        let message_timeout_ms: u64 = cfg
            .client_properties(publish_timeout)
            .get("message.timeout.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(30_000);
        health
            .stall_after_ms
            .store((2 * message_timeout_ms).max(5_000), Ordering::Relaxed);
        health.reset();
        let producer = Self::create(&conf, &health)?;
        let max_message_bytes = conf
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        Ok(KafkaPublisher {
            producer: RwLock::new(Arc::new(producer)),
            conf,
            health,
            rebuilt_at: Mutex::new(Instant::now()),
            rebuilds: AtomicU64::new(0),
            health_timeout: cfg.health_timeout.0,
            max_message_bytes,
        })
    }

    fn create(
        conf: &ClientConfig,
        health: &Arc<ProducerHealth>,
    ) -> Result<RelayProducer, KafkaError> {
        conf.create_with_context(RelayContext {
            health: health.clone(),
        })
    }

    fn current(&self) -> Arc<RelayProducer> {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces a producer that can no longer produce (see [`ProducerHealth::wedged`]). What the
    /// old one still holds is purged: those tickets resolve as unavailable
    /// (no attempt spent), the rows stay pending.
    fn heal(&self) {
        let Some(why) = self.health.wedged() else {
            return;
        };
        let mut at = self.rebuilt_at.lock().unwrap_or_else(|p| p.into_inner());
        if at.elapsed() < REBUILD_COOLDOWN {
            return;
        }
        *at = Instant::now();
        match Self::create(&self.conf, &self.health) {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *self.producer.write().unwrap_or_else(|p| p.into_inner()),
                    Arc::new(fresh),
                );
                self.health.reset();
                self.rebuilds.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = %why, "kafka: replaced the producer");
                tokio::task::spawn_blocking(move || {
                    old.purge(PurgeConfig::default().queue().inflight());
                    let _ = old.flush(Duration::from_secs(1));
                });
            }
            Err(e) => tracing::error!(error = %e, "kafka: could not create a new producer"),
        }
    }

    /// Times the producer was replaced since start.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// Hands one message to librdkafka, waiting while its queue is full.
    async fn send(&self, producer: &RelayProducer, o: Outgoing) {
        let Outgoing {
            event,
            format,
            ticket,
        } = o;
        let KafkaMessage { headers, body } =
            match kafka_message(&event, format, Some(self.max_message_bytes)) {
                Ok(m) => m,
                Err(e) => {
                    ticket.nack(PublishError::permanent(e.to_string()));
                    return;
                }
            };
        let mut record = BaseRecord::with_opaque_to(&event.topic, Box::new(ticket))
            .key(event.aggregate_id.as_bytes())
            .payload(&*body)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    // The polling thread frees room as delivery reports arrive.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((err, back)) => {
                    self.health.on_result(Err(err.rdkafka_error_code()));
                    back.delivery_opaque.nack(error::classify(&err));
                    return;
                }
            }
        }
    }
}

impl Publisher for KafkaPublisher {
    fn reconnects(&self) -> u64 {
        Self::rebuilds(self)
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }

    /// One key goes to one partition, and the idempotent producer keeps a partition's order
    /// across librdkafka's own retries; without idempotence a retry can reorder.
    fn keeps_order(&self) -> bool {
        self.conf.get("enable.idempotence") == Some("true")
    }

    fn publish(&self, burst: Vec<Outgoing>) -> BoxFuture<'_, ()> {
        async move {
            self.heal();
            let producer = self.current();
            for o in burst {
                self.send(&producer, o).await;
            }
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        let producer = self.current();
        let timeout = self.health_timeout;
        async move {
            let probe = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(None, timeout).map(|m| {
                    m.brokers()
                        .iter()
                        .map(|b| format!("{}:{}", b.host(), b.port()))
                        .collect::<Vec<_>>()
                })
            })
            .await;
            match probe {
                Ok(Ok(brokers)) if !brokers.is_empty() => Health::Up,
                Ok(Ok(_)) => Health::Down("the cluster reports no brokers".into()),
                Ok(Err(e)) => Health::Down(format!("no metadata from the brokers: {e}")),
                Err(e) => Health::Down(format!("health probe failed: {e}")),
            }
        }
        .boxed()
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        let producer = self.current();
        async move {
            let _ = tokio::task::spawn_blocking(move || {
                if producer.flush(timeout).is_err() {
                    // What is still queued or in flight gets a "purged" delivery report, which
                    // resolves its ticket as unavailable: the rows stay pending, no attempt spent.
                    producer.purge(PurgeConfig::default().queue().inflight());
                    let _ = producer.flush(Duration::from_millis(500));
                }
            })
            .await;
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode as C;

    fn health() -> ProducerHealth {
        let h = ProducerHealth::default();
        h.stall_after_ms.store(60_000, Ordering::Relaxed);
        h.reset();
        h
    }

    #[test]
    fn a_refused_producer_state_asks_for_a_new_producer_at_once() {
        let h = health();
        h.on_result(Ok(()));
        assert_eq!(h.wedged(), None);
        h.on_result(Err(Some(C::OutOfOrderSequenceNumber)));
        let why = h.wedged().expect("replace the producer");
        assert!(why.contains("epoch or sequence"), "{why}");
        h.reset();
        assert_eq!(h.wedged(), None, "a new producer starts clean");
    }

    #[test]
    fn our_own_purges_and_an_absent_broker_ask_for_nothing_at_once() {
        let h = health();
        for code in [C::PurgeQueue, C::PurgeInflight, C::QueueFull] {
            h.on_result(Err(Some(code)));
        }
        assert_eq!(h.wedged(), None);
        for _ in 0..100 {
            h.on_result(Err(Some(C::MessageTimedOut)));
        }
        assert_eq!(
            h.wedged(),
            None,
            "a broker away: a new producer would not help"
        );
        h.on_result(Err(Some(C::Fatal)));
        assert!(h.wedged().is_some());
    }
}
