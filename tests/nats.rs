//! The NATS backend against the real nats-server with JetStream (127.0.0.1:4222, or
//! TEST_NATS_URL), read back by an independent pull consumer. Each test has its own stream and
//! subject prefix; the tests that take the server away run one of their own.

mod common;

use common::conformance;
use common::nats::{self as n, JetStream, PrivateNats};
use common::{numbered_on, spawn, wait_for, watchdog, TestDb};
use outbox_relay::config::{BackendConfig, Dur, Provisioning, RouteConfig};
use outbox_relay::envelope::BodyFormat;
use outbox_relay::publisher::nats::config::{Persistence, StreamSettings, TopicSettings};
use outbox_relay::publisher::nats::NatsPublisher;
use outbox_relay::publisher::{AckTicket, Outgoing, Publisher};
use outbox_relay::store::NewEvent;
use outbox_relay::wiring::open_backend;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(90);

// JetStream's restart (killed, back on its store), size limit (the stream's) and ephemeral
// topics (core NATS) are the suite's cases, with the hooks in tests/common/nats.rs.
crate::conformance_suite!(
    suite,
    JetStream::new().await,
    pipelined,
    restart,
    size_limit,
    ephemeral
);

fn routes() -> Vec<RouteConfig> {
    vec![common::route("*", "nats")]
}

/// As after a crash between publish and mark: the events went out once already, the rows are
/// still pending, and the relay publishes them again. The stream keeps one copy of each (the
/// server drops the re-publish by Nats-Msg-Id) and the rows still end published.
#[tokio::test]
async fn a_republish_is_deduplicated_and_the_rows_still_end_published() {
    let b = JetStream::new().await;
    let db = TestDb::new().await;
    let topic = format!("{}.orders", b.prefix);
    let events: Vec<NewEvent> = (0..100)
        .map(|i| numbered_on(&topic, &format!("a{}", i % 10), i / 10))
        .collect();
    db.enqueue(&events).await;

    // The first round, straight through the publisher: delivered, never marked.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut burst = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let ev = Arc::new(outbox_relay::envelope::Event {
            id: i as i64,
            event_id: e.event_id,
            topic: e.topic.clone(),
            aggregate_id: e.aggregate_id.clone(),
            aggregate_type: None,
            event_type: e.event_type.clone(),
            event_version: 1,
            payload: e.payload.clone(),
            headers: vec![],
            content_type: None,
            traceparent: None,
            correlation_id: None,
            occurred_at: chrono::Utc::now(),
            attempts: 0,
        });
        let ticket = AckTicket::new(i as i64, 0, tx.clone());
        burst.push(Outgoing {
            event: ev,
            format: BodyFormat::Raw,
            ticket,
        });
    }
    b.publisher.publish(burst).await;
    for _ in 0..events.len() {
        let r = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(r.outcome.is_ok(), "{:?}", r.outcome);
    }
    assert_eq!(db.count("status = 'pending'").await, 100);

    // The second round, by the relay: every PubAck says duplicate, which is a success.
    let relay = db
        .relay_with(&db.config(), vec![("nats", b.publisher.clone())], &routes())
        .await;
    let stats = relay.stats();
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "every row published", || async {
        db.total().await == 0
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    assert_eq!(stats.published(), 100);
    let got = n::read_stream(&b.js, &b.stream).await;
    assert_eq!(got.len(), 100, "one copy of each event in the stream");
    db.drop_schema().await;
    b.delete().await;
}

#[tokio::test]
async fn provisioning_creates_streams_with_limits_validates_drift_and_updates() {
    let (prefix, stream) = n::unique();
    let mut cfg = n::config(&n::nats_url());
    let settings = StreamSettings {
        subjects: vec![format!("{prefix}.>")],
        storage: outbox_relay::publisher::nats::config::Storage::Memory,
        retention: outbox_relay::publisher::nats::config::Retention::Limits,
        max_age: Dur::secs(3600),
        max_bytes: 10_000_000,
        max_messages: 50_000,
        max_message_size: 4096,
        replicas: 1,
        discard: outbox_relay::publisher::nats::config::Discard::New,
        duplicate_window: Dur::secs(300),
    };
    cfg.streams.insert(stream.clone(), settings.clone());
    cfg.topics.insert(
        format!("{prefix}.orders"),
        TopicSettings {
            persistence: Persistence::Persistent,
        },
    );
    let mut full = outbox_relay::config::Config::default();
    full.backends
        .insert("nats".into(), BackendConfig::Nats(cfg.clone()));

    // validate_only before it exists: the named persistent topic has no stream, which stops
    // the start naming the topic; nothing is created.
    let err = open_backend(
        "nats",
        &full.backends["nats"],
        &full,
        Some(Provisioning::ValidateOnly),
    )
    .await
    .err()
    .expect("a start-up error")
    .to_string();
    assert!(err.contains(&format!("topic {prefix}.orders")), "{err}");
    let client = async_nats::connect(n::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    assert!(js.get_stream(&stream).await.is_err());

    // create_only: the stream, as configured.
    let (_, report) = open_backend(
        "nats",
        &full.backends["nats"],
        &full,
        Some(Provisioning::CreateOnly),
    )
    .await
    .unwrap();
    assert_eq!(report.created, vec![stream.clone()]);
    let mut s = js.get_stream(&stream).await.unwrap();
    let c = s.info().await.unwrap().config.clone();
    assert_eq!(c.subjects, vec![format!("{prefix}.>")]);
    assert_eq!(
        c.storage,
        async_nats::jetstream::stream::StorageType::Memory
    );
    assert_eq!(c.max_age, Duration::from_secs(3600));
    assert_eq!(c.max_bytes, 10_000_000);
    assert_eq!(c.max_messages, 50_000);
    assert_eq!(c.max_message_size, 4096);
    assert_eq!(c.discard, async_nats::jetstream::stream::DiscardPolicy::New);
    assert_eq!(c.duplicate_window, Duration::from_secs(300));

    // validate_only with a changed setting: reported, not changed.
    let mut changed = cfg.clone();
    changed.streams.get_mut(&stream).unwrap().max_messages = 70_000;
    full.backends
        .insert("nats".into(), BackendConfig::Nats(changed));
    let (_, report) = open_backend(
        "nats",
        &full.backends["nats"],
        &full,
        Some(Provisioning::ValidateOnly),
    )
    .await
    .unwrap();
    assert_eq!(report.drift.len(), 1, "{report:?}");
    assert!(
        report.drift[0].contains("max_messages 50000, configured 70000"),
        "{report:?}"
    );
    assert_eq!(s.info().await.unwrap().config.max_messages, 50_000);

    // create_or_update: changed.
    let (_, report) = open_backend(
        "nats",
        &full.backends["nats"],
        &full,
        Some(Provisioning::CreateOrUpdate),
    )
    .await
    .unwrap();
    assert_eq!(report.updated.len(), 1, "{report:?}");
    assert_eq!(s.info().await.unwrap().config.max_messages, 70_000);
    let _ = js.delete_stream(&stream).await;
}

/// A relay running on a private server's stream (its own JetStream, for the tests that take the
/// server away), with the given publish timeout and retry budget.
struct Away {
    server: PrivateNats,
    js: async_nats::jetstream::Context,
    stream: String,
    topic: String,
    db: TestDb,
    stats: Arc<outbox_relay::relay::Stats>,
    h: tokio::task::JoinHandle<outbox_relay::relay::Relay>,
    stop: tokio_util::sync::CancellationToken,
}

impl Away {
    async fn start(
        publish_timeout: Dur,
        backoff_initial: Dur,
        backoff_max: Dur,
        max_attempts: u32,
    ) -> Away {
        Away::acking_within(
            Dur::secs(5),
            publish_timeout,
            backoff_initial,
            backoff_max,
            max_attempts,
        )
        .await
    }

    /// As `start`, with the publisher waiting `ack_timeout` for each PubAck.
    async fn acking_within(
        ack_timeout: Dur,
        publish_timeout: Dur,
        backoff_initial: Dur,
        backoff_max: Dur,
        max_attempts: u32,
    ) -> Away {
        let server = PrivateNats::start();
        let (prefix, stream) = n::unique();
        let js = n::create_stream(&server.url(), &stream, &prefix).await;
        let db = TestDb::new().await;
        let nats = outbox_relay::publisher::nats::NatsConfig {
            ack_timeout,
            ..n::config(&server.url())
        };
        let publisher = Arc::new(NatsPublisher::connect(&nats).await.unwrap());
        let mut cfg = db.config();
        cfg.relay.publish_timeout = publish_timeout;
        cfg.relay.backoff_initial = backoff_initial;
        cfg.relay.backoff_max = backoff_max;
        cfg.relay.max_attempts = max_attempts;
        let relay = db
            .relay_with(&cfg, vec![("nats", publisher)], &routes())
            .await;
        let stats = relay.stats();
        let (h, stop) = spawn(relay);
        Away {
            server,
            js,
            stream,
            topic: format!("{prefix}.orders"),
            db,
            stats,
            h,
            stop,
        }
    }
}

/// Round `r` of an outage test: 50 events on `topic` over 10 aggregates, 5 each, numbered on
/// from round `r - 1`.
fn round(topic: &str, r: usize) -> Vec<NewEvent> {
    (0..50)
        .map(|i| numbered_on(topic, &format!("a{}", i % 10), r * 5 + i / 10))
        .collect()
}

/// While the server is away: waits until the ten aggregates' head events were each tried well
/// past a budget of 3 attempts, then checks that none failed.
async fn waited_past_the_budget(db: &TestDb, stats: &outbox_relay::relay::Stats, what: &str) {
    let retried = || stats.retried.load(std::sync::atomic::Ordering::Relaxed);
    wait_for(
        DEADLINE,
        &format!("each waiting event tried past the budget {what}"),
        || async { retried() > 10 * 3 * 4 },
    )
    .await;
    assert_eq!(
        db.count("status = 'failed'").await,
        0,
        "events failed {what}"
    );
}

/// The end of an outage test: every row published (within the deadline), the relay stopped,
/// nothing failed, and the stream holds `sent`, in order per aggregate.
async fn published_in_order_once_back<'a>(
    db: TestDb,
    stats: &outbox_relay::relay::Stats,
    h: tokio::task::JoinHandle<outbox_relay::relay::Relay>,
    stop: tokio_util::sync::CancellationToken,
    url: &str,
    stream: &str,
    sent: impl IntoIterator<Item = &'a NewEvent>,
) {
    wait_for(
        DEADLINE,
        "every event published once the server is back",
        || async { db.total().await == 0 },
    )
    .await;
    stop.cancel();
    h.await.unwrap();
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 0);
    let client = async_nats::connect(url).await.unwrap();
    let got = n::read_stream(&async_nats::jetstream::new(client), stream).await;
    conformance::assert_every_event_arrived(&got, sent);
    conformance::assert_in_order(&got);
    db.drop_schema().await;
}

/// A server away for far longer than the whole retry budget (3 attempts, backoff capped at
/// 100 ms): every event waits for it instead of using its attempts up, and all are published
/// once it is back; none fails.
#[tokio::test]
async fn an_outage_longer_than_the_retry_budget_fails_nothing() {
    let _watchdog = watchdog(
        "an_outage_longer_than_the_retry_budget_fails_nothing",
        Duration::from_secs(300),
    );
    let Away {
        mut server,
        js,
        stream,
        topic,
        db,
        stats,
        h,
        stop,
    } = Away::start(Dur::secs(2), Dur::ms(20), Dur::ms(100), 3).await;
    let first = round(&topic, 0);
    db.enqueue(&first).await;
    wait_for(DEADLINE, "the first events through", || async {
        db.total().await == 0
    })
    .await;
    server.stop_server();
    // Events keep arriving while the server is away.
    let during = round(&topic, 1);
    db.enqueue(&during).await;
    waited_past_the_budget(&db, &stats, "while the server is away").await;
    server.start_server();
    drop(js);
    published_in_order_once_back(
        db,
        &stats,
        h,
        stop,
        &server.url(),
        &stream,
        first.iter().chain(&during),
    )
    .await;
}

/// "No responders" while JetStream is not answering (here: the server back without JetStream,
/// as while a stream's leader is elected) says nothing about the event: it waits, far past
/// the retry budget, and is published once JetStream is back. Only "no stream covers the
/// subject", which JetStream itself answers, fails an event (see the suite's
/// `size_limit` case, whose refused topics include one no stream covers).
#[tokio::test]
async fn no_responders_while_jetstream_is_away_fail_nothing() {
    let _watchdog = watchdog(
        "no_responders_while_jetstream_is_away_fail_nothing",
        Duration::from_secs(300),
    );
    let Away {
        mut server,
        js,
        stream,
        topic,
        db,
        stats,
        h,
        stop,
    } = Away::start(Dur::secs(2), Dur::ms(20), Dur::ms(100), 3).await;
    let first = round(&topic, 0);
    db.enqueue(&first).await;
    wait_for(DEADLINE, "the first events through", || async {
        db.total().await == 0
    })
    .await;

    server.stop_server();
    server.start_server_without_jetstream();
    let waiting = round(&topic, 1);
    db.enqueue(&waiting).await;
    waited_past_the_budget(&db, &stats, "without JetStream (no responders)").await;
    // The probes' answers: JetStream could not say which stream covers the subject.
    let probed =
        "last_error LIKE '%no responders for subject%' AND last_error LIKE 'waiting for the broker%'";
    wait_for(DEADLINE, "a probe's reason on its row", || async {
        db.count(probed).await > 0
    })
    .await;

    server.stop_server();
    server.start_server();
    drop(js);
    published_in_order_once_back(
        db,
        &stats,
        h,
        stop,
        &server.url(),
        &stream,
        first.iter().chain(&waiting),
    )
    .await;
}

/// A server that takes publishes and does not answer (frozen): each PubAck not come within
/// the publisher's `ack_timeout` is an unavailable result, never a failure, and the event goes
/// again. Once the server thaws it stores what it had queued and answers late for it (answers
/// the relay no longer waits for), and drops the re-sends as duplicates by `Nats-Msg-Id`: the
/// stream holds every event once, in order.
#[tokio::test]
async fn pub_acks_a_frozen_server_never_sends_time_out_and_the_events_are_stored_once() {
    let _watchdog = watchdog(
        "pub_acks_a_frozen_server_never_sends_time_out_and_the_events_are_stored_once",
        Duration::from_secs(300),
    );
    let Away {
        server,
        js,
        stream,
        topic,
        db,
        stats,
        h,
        stop,
    } = Away::acking_within(Dur::ms(300), Dur::secs(5), Dur::ms(20), Dur::ms(100), 3).await;
    let first = round(&topic, 0);
    db.enqueue(&first).await;
    wait_for(DEADLINE, "the first events through", || async {
        db.total().await == 0
    })
    .await;
    server.freeze(true);
    let unanswered = round(&topic, 1);
    db.enqueue(&unanswered).await;
    let retried = || stats.retried.load(std::sync::atomic::Ordering::Relaxed);
    wait_for(
        DEADLINE,
        "every unanswered event timed out at least once",
        || async { retried() >= unanswered.len() as u64 },
    )
    .await;
    wait_for(DEADLINE, "the timeout's reason on a row", || async {
        db.count("last_error LIKE '%no PubAck within 300ms%'").await > 0
    })
    .await;
    assert_eq!(db.count("status = 'failed'").await, 0, "events failed");
    server.freeze(false);
    drop(js);
    let url = server.url();
    published_in_order_once_back(
        db,
        &stats,
        h,
        stop,
        &url,
        &stream,
        first.iter().chain(&unanswered),
    )
    .await;
    let client = async_nats::connect(&url).await.unwrap();
    let got = n::read_stream(&async_nats::jetstream::new(client), &stream).await;
    assert_eq!(
        got.len(),
        first.len() + unanswered.len(),
        "every event stored once"
    );
}

/// `close` resolves every publish still waiting for its PubAck before it returns: with the
/// server frozen none comes, and each is reported unavailable (its row would stay pending and
/// go again), not left to resolve itself later.
#[tokio::test]
async fn close_resolves_every_pub_ack_still_due() {
    let _watchdog = watchdog(
        "close_resolves_every_pub_ack_still_due",
        Duration::from_secs(120),
    );
    let server = PrivateNats::start();
    let (prefix, stream) = n::unique();
    let _js = n::create_stream(&server.url(), &stream, &prefix).await;
    let publisher = NatsPublisher::connect(&n::config(&server.url()))
        .await
        .unwrap();
    let topic = format!("{prefix}.orders");
    server.freeze(true);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let burst: Vec<Outgoing> = (0..5)
        .map(|i| conformance::outgoing(i, &topic, &tx))
        .collect();
    publisher.publish(burst).await;
    publisher.close(Duration::from_millis(300)).await;
    let mut results = Vec::new();
    while let Ok(r) = rx.try_recv() {
        results.push(r);
    }
    server.freeze(false);
    assert_eq!(
        results.len(),
        5,
        "every ticket resolved when close returned"
    );
    for r in results {
        let e = r.outcome.expect_err("no PubAck came");
        assert_eq!(
            e.kind,
            outbox_relay::publisher::ErrorKind::Unavailable,
            "{e}"
        );
    }
}

/// A burst of "no responders" for one subject asks JetStream once which stream covers it; the
/// other events wait for that answer instead of each asking. Here, on a server without
/// JetStream, the test itself answers the JetStream API ("no stream covers it") and counts
/// the questions.
#[tokio::test]
async fn a_burst_of_no_responders_asks_jetstream_once() {
    let _watchdog = watchdog(
        "a_burst_of_no_responders_asks_jetstream_once",
        Duration::from_secs(120),
    );
    let mut server = PrivateNats::start();
    server.stop_server();
    server.start_server_without_jetstream();
    let api = async_nats::connect(server.url()).await.unwrap();
    let mut questions = api.subscribe("$JS.API.STREAM.NAMES").await.unwrap();
    api.flush().await.unwrap();
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    let answers = api.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(q) = questions.next().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(reply) = q.reply {
                let none = r#"{"type":"io.nats.jetstream.api.v1.stream_names_response","total":0,"offset":0,"limit":1024,"streams":null}"#;
                let _ = answers.publish(reply, none.into()).await;
            }
        }
    });
    let publisher = NatsPublisher::connect(&n::config(&server.url()))
        .await
        .unwrap();
    let topic = "nostream.burst".to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let burst: Vec<Outgoing> = (0..100)
        .map(|i| conformance::outgoing(i, &topic, &tx))
        .collect();
    publisher.publish(burst).await;
    let mut results = Vec::new();
    while results.len() < 100 {
        let r = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("every result within the deadline")
            .unwrap();
        results.push(r);
    }
    for r in &results {
        let e = r.outcome.as_ref().expect_err("no stream took it");
        assert_eq!(e.kind, outbox_relay::publisher::ErrorKind::Permanent, "{e}");
        assert!(
            e.reason
                .contains("no JetStream stream covers subject \"nostream.burst\""),
            "{e}"
        );
    }
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one question for the burst"
    );
}
