//! The backend-agnostic conformance suite. Every backend runs it, end to end: real Postgres,
//! a real relay, and the backend's own independent reader of what arrived (the memory log; a
//! stdout reader; a Kafka consumer group; a JetStream pull consumer; a Pulsar subscription).
//!
//! A backend's test file runs the whole suite with one line, [`conformance_suite!`], naming
//! what the backend can do; the file keeps only what is specific to the backend.

use super::{numbered_on, wait_for, wait_for_or_dump, watchdog, TestDb};
use base64::Engine as _;
use outbox_relay::config::{Config, Dur, OrderingMode, RelayConfig, RouteConfig};
use outbox_relay::envelope::{BodyFormat, EnvelopeJson};
use outbox_relay::publisher::{AckSender, AckTicket, Outgoing, Publisher};
use outbox_relay::relay::Stats;
use outbox_relay::store::NewEvent;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// One message as an independent reader saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub key: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// What a backend provides to run the suite.
pub trait BackendUnderTest {
    fn publisher(&self) -> Arc<dyn Publisher>;
    /// A topic (or subject) this backend can publish to in the test.
    fn topic(&self) -> String;
    /// Everything the reader has seen so far.
    fn received(&self) -> impl std::future::Future<Output = Vec<Received>> + Send;
    /// What the backend checks on every message beyond the suite's own checks (JetStream:
    /// the de-duplication id is the event id).
    fn check_message(&self, _r: &Received) {}
    /// Removes what the test made on the broker (a stream), once the case is done.
    fn clean_up(&self) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }
}

/// `restart`: the backend can run on a broker of the test's own, which the case takes away
/// mid-stream and brings back.
pub trait Restart {
    type OnItsOwnBroker: BrokerAway;
    /// A backend as the suite's (its own topic or stream, its own reader) on a broker of the
    /// test's own.
    fn on_a_broker_of_its_own() -> impl Future<Output = Self::OnItsOwnBroker>;
}

/// How a broker is taken away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Frozen (SIGSTOP): connections stay open and nothing answers; thawed (SIGCONT).
    Frozen,
    /// Killed (SIGKILL), as a crash would; started again on the same port.
    Killed,
}

/// What a broker brought back still has of what it had stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    Everything,
    /// A fresh, empty broker (tansu stores in memory): only what comes after is checked.
    Nothing,
}

/// A backend on a broker of the test's own, for [`the_broker_stopped_and_restarted_mid_stream_loses_nothing`].
pub trait BrokerAway: BackendUnderTest {
    /// The outages the case puts the broker through, one after the other.
    const OUTAGES: &'static [Outage];
    /// The relay's publish timeout in the case (how long a hand-off to a broker that does not
    /// answer waits); the relay's default unless the backend says.
    fn publish_timeout(&self) -> Dur {
        RelayConfig::default().publish_timeout
    }
    /// Takes the broker away (the reader too, where it would wait on a dead broker).
    fn take_away(&mut self, how: Outage) -> impl Future<Output = ()>;
    /// Brings the broker back (and a reader, where the case's was taken away with it).
    fn bring_back(&mut self, how: Outage) -> impl Future<Output = Kept>;
    /// What the backend checks at the end beyond the case's own checks, on what the reader
    /// has and the events the broker was to keep (JetStream: the client saw the disconnect;
    /// the stream holds each event once).
    fn check_after_the_outages(&self, _got: &[Received], _sent: &[NewEvent]) {}
}

/// `size_limit`: the backend refuses a message over a size limit, and topics it cannot take.
pub trait SizeLimit: BackendUnderTest + Sized {
    /// The backend with a limit on a message's size, however it is set (the producer's, the
    /// stream's, the client's).
    fn with_a_size_limit() -> impl Future<Output = Self>;
    /// A payload's size past the limit.
    fn oversized(&self) -> usize;
    /// What an oversized message's reason says (each of these).
    fn oversized_reason(&self) -> &'static [&'static str];
    /// Topics the backend refuses (a name it cannot take; NATS: also a subject no stream
    /// covers), each with what its row's reason says.
    fn refused_topics(&self) -> Vec<(String, Vec<String>)>;
}

/// `ephemeral`: a topic can be configured ephemeral (not stored), which a subscriber connected
/// before the first event receives.
pub trait Ephemeral {
    type Live: BackendUnderTest;
    /// A backend whose topic is configured ephemeral, read by a live subscriber.
    fn with_an_ephemeral_topic() -> impl Future<Output = Self::Live>;
}

/// The whole suite for one backend, one test per case, each on a backend made afresh by the
/// expression: `conformance_suite!(kafka, KafkaUnderTest::new().await, pipelined, restart)`.
/// The trailing words say what the backend can do, each adding its cases:
/// - `pipelined`: it keeps the order of what is sent on one connection, so the pipelined
///   ordering mode is run too;
/// - `restart`: its broker can be taken away mid-stream and brought back ([`Restart`]);
/// - `size_limit`: it refuses a message over a size limit, and topics it cannot take
///   ([`SizeLimit`]);
/// - `ephemeral`: a topic can be configured ephemeral, for live subscribers only
///   ([`Ephemeral`]).
///
/// The cases that make a backend of their own (on a broker of its own, with a size limit) are
/// handed the expression as a closure they never call: it names the backend's type, whose
/// feature trait makes the one they need.
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $make:expr $(, $feature:ident)*) => {
        mod $name {
            use super::*;
            use $crate::common::conformance as the_suite;

            #[tokio::test]
            async fn delivers_every_event_in_order_with_key_and_headers() {
                let b = $make;
                the_suite::delivers_every_event_in_order_with_key_and_headers(&b).await;
                the_suite::BackendUnderTest::clean_up(&b).await;
            }

            #[tokio::test]
            async fn envelope_body_decodes_to_the_original_payload() {
                let b = $make;
                the_suite::envelope_body_decodes_to_the_original_payload(&b).await;
                the_suite::BackendUnderTest::clean_up(&b).await;
            }

            #[tokio::test]
            async fn gives_one_result_per_message() {
                let b = $make;
                the_suite::one_result_per_message(&b).await;
                the_suite::BackendUnderTest::clean_up(&b).await;
            }

            #[tokio::test]
            async fn ten_thousand_events_arrive_once_keyed_in_order_and_end_published() {
                let b = $make;
                the_suite::ten_thousand_events(&b, outbox_relay::config::OrderingMode::Strict).await;
                the_suite::BackendUnderTest::clean_up(&b).await;
            }

            $( $crate::conformance_suite!(@feature $feature, $make); )*
        }
    };
    (@feature pipelined, $make:expr) => {
        #[tokio::test]
        async fn ten_thousand_events_in_pipelined_mode_keep_each_aggregates_order() {
            let b = $make;
            the_suite::ten_thousand_events(&b, outbox_relay::config::OrderingMode::Pipelined).await;
            the_suite::BackendUnderTest::clean_up(&b).await;
        }
    };
    (@feature restart, $make:expr) => {
        #[tokio::test]
        async fn the_broker_stopped_and_restarted_mid_stream_loses_nothing() {
            the_suite::the_broker_stopped_and_restarted_mid_stream_loses_nothing(|| async { $make })
                .await;
        }
    };
    (@feature size_limit, $make:expr) => {
        #[tokio::test]
        async fn oversized_messages_and_refused_topics_fail_with_the_reason_while_the_others_flow() {
            the_suite::oversized_messages_and_refused_topics_fail_with_the_reason(|| async { $make })
                .await;
        }
    };
    (@feature ephemeral, $make:expr) => {
        #[tokio::test]
        async fn an_ephemeral_topic_reaches_a_live_subscriber_once_in_order() {
            the_suite::an_ephemeral_topic_reaches_a_live_subscriber(|| async { $make }).await;
        }
    };
}

const DEADLINE: Duration = Duration::from_secs(60);

/// For the cases with thousands of events.
const LONG: Duration = Duration::from_secs(120);

async fn run_until_published<B: BackendUnderTest>(
    b: &B,
    db: &TestDb,
    format: BodyFormat,
    n: usize,
) {
    run_until_published_with(b, db, &db.config(), format, n, DEADLINE).await;
}

/// Runs a relay until no row is left and the reader has seen `n` messages; the relay's stats.
async fn run_until_published_with<B: BackendUnderTest>(
    b: &B,
    db: &TestDb,
    cfg: &Config,
    format: BodyFormat,
    n: usize,
    deadline: Duration,
) -> Arc<Stats> {
    let routes = [RouteConfig {
        topic: "*".into(),
        backend: "main".into(),
        format,
    }];
    let relay = db
        .relay_with(cfg, vec![("main", b.publisher())], &routes)
        .await;
    let stats = relay.stats();
    let (h, stop) = super::spawn(relay);
    wait_for(deadline, "every row published", || async {
        db.total().await == 0
    })
    .await;
    wait_for(deadline, "the reader to see every message", || async {
        b.received().await.len() >= n
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    stats
}

fn events(topic: &str, aggregates: usize, per: usize) -> Vec<NewEvent> {
    let mut out = Vec::new();
    for seq in 0..per {
        for a in 0..aggregates {
            let mut e = NewEvent::json(
                topic,
                format!("agg-{a}"),
                "ThingHappened",
                &serde_json::json!({"agg": format!("agg-{a}"), "seq": seq}),
            )
            .unwrap();
            e.aggregate_type = Some("thing".into());
            e.event_version = 2;
            e.headers = Some(serde_json::json!({"tenant": "acme"}));
            e.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
            e.correlation_id = Some(format!("corr-{a}-{seq}"));
            out.push(e);
        }
    }
    out
}

/// Every event arrives once, keyed by its aggregate, with the metadata headers and the raw
/// payload as body; per aggregate in order.
pub async fn delivers_every_event_in_order_with_key_and_headers<B: BackendUnderTest>(b: &B) {
    let db = TestDb::new().await;
    let sent = events(&b.topic(), 10, 30);
    db.enqueue(&sent).await;
    run_until_published(b, &db, BodyFormat::Raw, sent.len()).await;
    let got = b.received().await;
    let mut by_id: HashMap<String, &Received> = HashMap::new();
    for r in &got {
        let id = r
            .headers
            .get("X-Event-ID")
            .expect("X-Event-ID header")
            .clone();
        assert!(
            by_id.insert(id.clone(), r).is_none(),
            "event {id} arrived twice"
        );
    }
    assert_eq!(by_id.len(), sent.len());
    for e in &sent {
        let r = by_id[&e.event_id.to_string()];
        assert_eq!(r.topic, e.topic);
        assert_eq!(r.key, e.aggregate_id);
        assert_eq!(r.headers["X-Aggregate-ID"], e.aggregate_id);
        assert_eq!(r.headers["X-Aggregate-Type"], "thing");
        assert_eq!(r.headers["X-Event-Type"], "ThingHappened");
        assert_eq!(r.headers["X-Event-Version"], "2");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["traceparent"], e.traceparent.clone().unwrap());
        assert_eq!(
            r.headers["X-Correlation-ID"],
            e.correlation_id.clone().unwrap()
        );
        assert_eq!(r.headers["tenant"], "acme");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let sent_body: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(body, sent_body);
    }
    assert_in_order(&got);
    db.drop_schema().await;
}

/// 10 000 events over 200 aggregates, in the given ordering mode: each arrives (strict: once),
/// keyed by its aggregate, with the relay's headers, in order per aggregate; every row ends
/// published.
pub async fn ten_thousand_events<B: BackendUnderTest>(b: &B, ordering: OrderingMode) {
    let db = TestDb::new().await;
    let topic = b.topic();
    let events: Vec<NewEvent> = (0..50)
        .flat_map(|seq| (0..200).map(move |a| (a, seq)))
        .map(|(a, seq)| numbered_on(&topic, &format!("a{a}"), seq))
        .collect();
    for chunk in events.chunks(1000) {
        db.enqueue(chunk).await;
    }
    let mut cfg = db.config();
    cfg.relay.ordering = ordering;
    let stats = run_until_published_with(b, &db, &cfg, BodyFormat::Raw, events.len(), LONG).await;
    let got = b.received().await;
    for r in &got {
        assert_eq!(r.key, r.headers["X-Aggregate-ID"]);
        assert_eq!(r.headers["X-Event-Type"], "OrderCreated");
        assert_eq!(r.headers["X-Event-Version"], "1");
        assert_eq!(r.topic, topic);
        b.check_message(r);
    }
    assert_every_event_arrived(&got, &events);
    if ordering == OrderingMode::Strict {
        let ids: HashSet<&str> = got
            .iter()
            .map(|r| r.headers["X-Event-ID"].as_str())
            .collect();
        assert_eq!(
            got.len(),
            events.len(),
            "each event once ({} distinct; relay stats: {stats:?})",
            ids.len()
        );
        assert_in_order(&got);
    } else {
        // Pipelined, hundreds of an aggregate's events in flight: on a loaded machine a
        // hand-off can go unanswered in time and go again, so an event may arrive twice
        // (same id); the first deliveries stay in order.
        assert_first_deliveries_in_order(&got);
    }
    db.drop_schema().await;
}

/// Every event of `sent` is among `got`, by its `X-Event-ID` header.
pub fn assert_every_event_arrived<'a>(
    got: &[Received],
    sent: impl IntoIterator<Item = &'a outbox_relay::store::NewEvent>,
) {
    let ids: std::collections::HashSet<&str> = got
        .iter()
        .map(|r| r.headers["X-Event-ID"].as_str())
        .collect();
    for e in sent {
        assert!(
            ids.contains(e.event_id.to_string().as_str()),
            "event {} lost",
            e.event_id
        );
    }
}

/// Per key, the first delivery of each event comes in sequence (from the first one seen);
/// re-deliveries of events already seen (at-least-once, same event id) may come at any point.
pub fn assert_first_deliveries_in_order(got: &[Received]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in got {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        match last.get(&r.key).copied() {
            Some(prev) if seq <= prev => {}
            Some(prev) => assert_eq!(prev + 1, seq, "order broken for {}", r.key),
            None => {}
        }
        let top = last.entry(r.key.clone()).or_insert(seq);
        *top = (*top).max(seq);
    }
}

/// Per aggregate (the key), the `seq` numbers of the bodies arrive as 0, 1, 2, ...
pub fn assert_in_order(got: &[Received]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in got {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        let prev = last.insert(r.key.clone(), seq);
        assert_eq!(
            prev.map(|p| p + 1).unwrap_or(0),
            seq,
            "order broken for {}",
            r.key
        );
    }
}

/// With the envelope format, the body is the EventBus JSON and its payload decodes back.
pub async fn envelope_body_decodes_to_the_original_payload<B: BackendUnderTest>(b: &B) {
    let db = TestDb::new().await;
    let sent = events(&b.topic(), 3, 2);
    db.enqueue(&sent).await;
    run_until_published(b, &db, BodyFormat::Envelope, sent.len()).await;
    let got = b.received().await;
    assert_eq!(got.len(), sent.len());
    for r in got {
        let env: EnvelopeJson = serde_json::from_slice(&r.body).expect("envelope JSON body");
        let e = sent
            .iter()
            .find(|e| e.event_id.to_string() == env.event_id)
            .expect("a sent event");
        assert_eq!(env.aggregate_id, e.aggregate_id);
        assert_eq!(env.event_type, "ThingHappened");
        assert_eq!(env.event_version, 2);
        assert_eq!(env.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(env.correlation_id, e.correlation_id.clone().unwrap());
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&env.payload)
            .unwrap();
        assert_eq!(payload, e.payload);
    }
    db.drop_schema().await;
}

/// Message `i` for the publisher seam: a small event on `topic`, aggregate `k<i>`, raw body,
/// its result going to `tx`.
pub fn outgoing(i: i64, topic: &str, tx: &AckSender) -> Outgoing {
    let event = Arc::new(outbox_relay::envelope::Event {
        id: i,
        event_id: uuid::Uuid::new_v4(),
        topic: topic.into(),
        aggregate_id: format!("k{i}"),
        aggregate_type: None,
        event_type: "T".into(),
        event_version: 1,
        payload: b"{}".to_vec(),
        headers: vec![],
        content_type: None,
        traceparent: None,
        correlation_id: None,
        occurred_at: chrono::Utc::now(),
        attempts: 0,
    });
    let ticket = AckTicket::new(i, i as u64, tx.clone());
    Outgoing {
        event,
        format: BodyFormat::Raw,
        ticket,
    }
}

/// Straight at the seam: every message handed over gets exactly one result.
pub async fn one_result_per_message<B: BackendUnderTest>(b: &B) {
    let p = b.publisher();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let n = 200;
    let mut burst = Vec::new();
    for i in 0..n {
        burst.push(outgoing(i, &b.topic(), &tx));
    }
    p.publish(burst).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let r = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("a result within the deadline")
            .expect("channel open");
        assert!(r.outcome.is_ok(), "{:?}", r.outcome);
        assert!(seen.insert(r.row_id), "two results for row {}", r.row_id);
    }
    drop(tx);
    p.close(Duration::from_secs(5)).await;
    assert!(rx.try_recv().is_err(), "more results than messages");
}

/// Whether every event of `sent` is among `got`, by its `X-Event-ID` header.
/// Whether `got` holds every event of `sent` (by `X-Event-ID`).
pub fn has_every_event<'a>(got: &[Received], sent: impl IntoIterator<Item = &'a NewEvent>) -> bool {
    let ids: HashSet<&str> = got
        .iter()
        .map(|r| r.headers["X-Event-ID"].as_str())
        .collect();
    sent.into_iter()
        .all(|e| ids.contains(e.event_id.to_string().as_str()))
}

/// `restart`: a relay on a broker of the test's own, which goes away mid-stream (frozen or
/// killed, as the backend says) while events keep coming, and comes back. Rows wait, retries
/// back off, nothing fails (on the default budget of attempts), the same relay catches up by
/// itself, and the reader has every event the broker kept, each aggregate's first deliveries
/// in order. A broker that comes back empty (tansu, in memory) is checked for what came after.
///
/// `_backend` names the type of the suite's backend (the macro's expression, never called).
pub async fn the_broker_stopped_and_restarted_mid_stream_loses_nothing<R, F>(
    _backend: impl FnOnce() -> F,
) where
    R: Restart,
    F: Future<Output = R>,
{
    let _watchdog = watchdog(
        "the_broker_stopped_and_restarted_mid_stream_loses_nothing",
        Duration::from_secs(300),
    );
    let mut b = R::on_a_broker_of_its_own().await;
    let db = TestDb::new().await;
    let mut cfg = db.config();
    cfg.relay.publish_timeout = b.publish_timeout();
    cfg.relay.backoff_initial = Dur::ms(100);
    cfg.relay.backoff_max = Dur::secs(1);
    let relay = db
        .relay_with(
            &cfg,
            vec![("main", b.publisher())],
            &[super::route("*", "main")],
        )
        .await;
    let stats = relay.stats();
    let (h, stop) = super::spawn(relay);
    let retried = || stats.retried.load(Ordering::Relaxed);
    let topic = b.topic();
    // Round `r`: 500 events over 50 aggregates, 10 each, numbered on from round `r - 1`.
    let batch = |r: usize| -> Vec<NewEvent> {
        (0..500)
            .map(|i| numbered_on(&topic, &format!("a{}", i % 50), r * 10 + i / 50))
            .collect()
    };
    // Every event written so far, in order; the next round, added to them.
    let mut all: Vec<NewEvent> = Vec::new();
    let next_round = |all: &mut Vec<NewEvent>| {
        let b = batch(all.len() / 500);
        all.extend(b.iter().cloned());
        b
    };
    // From here on, the broker still has what it was sent.
    let mut kept_from = 0;
    for &how in <R::OnItsOwnBroker as BrokerAway>::OUTAGES {
        // Rows still in the table before these two rounds: some of the new ones must go
        // through (be deleted) before the broker is taken away.
        let left = db.total().await;
        for _ in 0..2 {
            db.enqueue(&next_round(&mut all)).await;
        }
        wait_for(LONG, "some of the new events through", || async {
            db.total().await < left + 1000
        })
        .await;
        let away_from = all.len();
        b.take_away(how).await;
        // Events keep coming while the broker is away, and fail into retries (the relay may
        // have drained the earlier rounds before it went).
        let before = retried();
        db.enqueue(&next_round(&mut all)).await;
        wait_for(
            LONG,
            &format!("retries while the broker is away ({how:?})"),
            || async { retried() > before },
        )
        .await;
        db.enqueue(&next_round(&mut all)).await;
        assert_eq!(
            db.count("status = 'failed'").await,
            0,
            "events failed while the broker was away ({how:?})"
        );
        if b.bring_back(how).await == Kept::Nothing {
            kept_from = away_from;
        }
        // And while it is back.
        db.enqueue(&next_round(&mut all)).await;
        wait_for_or_dump(
            LONG,
            &format!("every row published once the broker is back ({how:?})"),
            || async { db.total().await == 0 },
            || async { format!("relay: {stats:?}\nrows:\n{}", db.summary().await) },
        )
        .await;
        wait_for(
            LONG,
            &format!("the reader to have every event the broker kept ({how:?})"),
            || async { has_every_event(&b.received().await, &all[kept_from..]) },
        )
        .await;
        assert_first_deliveries_in_order(&b.received().await);
    }
    stop.cancel();
    h.await.unwrap();
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    let got = b.received().await;
    for r in &got {
        b.check_message(r);
    }
    assert_every_event_arrived(&got, &all[kept_from..]);
    assert_first_deliveries_in_order(&got);
    b.check_after_the_outages(&got, &all[kept_from..]);
    b.clean_up().await;
    db.drop_schema().await;
}

/// `size_limit`: a message over the backend's size limit and messages to topics it refuses
/// fail at once, each row with its reason (the oversized one after its one attempt: a
/// permanent error is not retried); the other events are published, once each.
pub async fn oversized_messages_and_refused_topics_fail_with_the_reason<B, F>(
    _backend: impl FnOnce() -> F,
) where
    B: SizeLimit,
    F: Future<Output = B>,
{
    let b = B::with_a_size_limit().await;
    let db = TestDb::new().await;
    let ok: Vec<NewEvent> = (0..20)
        .map(|i| numbered_on(&b.topic(), &format!("a{i}"), 0))
        .collect();
    let big = NewEvent::new(b.topic(), "big", "Big", vec![b'x'; b.oversized()]);
    let refused: Vec<(NewEvent, Vec<String>)> = b
        .refused_topics()
        .into_iter()
        .enumerate()
        .map(|(i, (topic, reason))| (numbered_on(&topic, &format!("refused{i}"), 0), reason))
        .collect();
    db.enqueue(&ok).await;
    let mut bad = vec![big.clone()];
    bad.extend(refused.iter().map(|(e, _)| e.clone()));
    db.enqueue(&bad).await;
    let relay = db
        .relay_with(
            &db.config(),
            vec![("main", b.publisher())],
            &[super::route("*", "main")],
        )
        .await;
    let (h, stop) = super::spawn(relay);
    let n = bad.len() as i64;
    wait_for(
        LONG,
        &format!("only the {n} bad rows left, failed"),
        || async { db.count("status = 'failed'").await == n && db.total().await == n },
    )
    .await;
    stop.cancel();
    h.await.unwrap();
    let (_, attempts, reason) = db.row(big.event_id).await.unwrap();
    let reason = reason.unwrap();
    assert_eq!(attempts, 1, "a permanent error is not retried");
    for part in b.oversized_reason() {
        assert!(
            reason.contains(part),
            "{part:?} in the oversized message's reason: {reason}"
        );
    }
    for (e, parts) in &refused {
        let (_, _, reason) = db.row(e.event_id).await.unwrap();
        let reason = reason.unwrap();
        for part in parts {
            assert!(
                reason.contains(part.as_str()),
                "{part:?} in the reason for topic {}: {reason}",
                e.topic
            );
        }
    }
    wait_for(LONG, "the 20 good events at the reader", || async {
        b.received().await.len() >= 20
    })
    .await;
    let got = b.received().await;
    for r in &got {
        b.check_message(r);
    }
    assert_every_event_arrived(&got, &ok);
    assert_eq!(
        got.len(),
        20,
        "the good events, once each, and nothing else"
    );
    b.clean_up().await;
    db.drop_schema().await;
}

/// `ephemeral`: events on a topic configured ephemeral reach a subscriber connected before
/// the first one: every event once, with its id, each aggregate's in order.
pub async fn an_ephemeral_topic_reaches_a_live_subscriber<B, F>(_backend: impl FnOnce() -> F)
where
    B: Ephemeral,
    F: Future<Output = B>,
{
    let b = B::with_an_ephemeral_topic().await;
    let db = TestDb::new().await;
    let events: Vec<NewEvent> = (0..50)
        .map(|i| numbered_on(&b.topic(), &format!("a{}", i % 5), i / 5))
        .collect();
    db.enqueue(&events).await;
    run_until_published_with(&b, &db, &db.config(), BodyFormat::Raw, events.len(), LONG).await;
    let got = b.received().await;
    assert_eq!(got.len(), events.len());
    assert!(got.iter().all(|r| r.headers.contains_key("X-Event-ID")));
    assert_every_event_arrived(&got, &events);
    assert_in_order(&got);
    b.clean_up().await;
    db.drop_schema().await;
}
