//! The Kafka backend against a real Kafka-protocol broker (tansu on 127.0.0.1:9092, or
//! TEST_KAFKA_BROKERS), read back by a separate consumer in a consumer group. Each test has its
//! own topic; the tests that take the broker away run one of their own.

mod common;

use common::conformance;
use common::kafka::{self as k, GroupReader, KafkaUnderTest, PrivateKafka};
use common::{numbered_on, spawn, wait_for, wait_for_or_dump, watchdog, TestDb};
use outbox_relay::config::{BackendConfig, Config, Dur, Provisioning, RouteConfig};
use outbox_relay::publisher::kafka::config::{CleanupPolicy, Compression, TopicSettings};
use outbox_relay::publisher::kafka::{provision, KafkaPublisher};
use outbox_relay::store::NewEvent;
use outbox_relay::wiring::open_backend;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(120);

// The broker frozen then killed (restart) and the producer's size limit are the suite's cases,
// with the hooks in tests/common/kafka.rs; Kafka has no ephemeral topics.
crate::conformance_suite!(
    suite,
    KafkaUnderTest::new().await,
    pipelined,
    restart,
    size_limit
);

fn routes() -> Vec<RouteConfig> {
    vec![common::route("*", "kafka")]
}

#[tokio::test]
async fn provisioning_creates_topics_with_partitions_and_retention_and_validates_drift() {
    let topic = k::unique_topic();
    let mut cfg = k::config(&k::brokers());
    cfg.topics.insert(
        topic.clone(),
        TopicSettings {
            partitions: Some(3),
            retention: Some(Dur::secs(2 * 86_400)),
            cleanup_policy: Some(CleanupPolicy::Delete),
            compression: Some(Compression::Zstd),
            compression_level: Some(5),
            ..TopicSettings::default()
        },
    );
    let mut full = Config::default();
    full.backends
        .insert("kafka".into(), BackendConfig::Kafka(cfg.clone()));

    // validate_only first: it does not exist, and stays so.
    let (_, report) = open_backend(
        "kafka",
        &full.backends["kafka"],
        &full,
        Some(Provisioning::ValidateOnly),
    )
    .await
    .unwrap();
    assert_eq!(report.drift, vec![format!("{topic}: does not exist")]);
    assert!(provision::describe_topic(&cfg, &topic, Dur::secs(30))
        .await
        .is_err());

    let (_, report) = open_backend(
        "kafka",
        &full.backends["kafka"],
        &full,
        Some(Provisioning::CreateOnly),
    )
    .await
    .unwrap();
    assert_eq!(report.created, vec![topic.clone()]);
    let (partitions, configs) = provision::describe_topic(&cfg, &topic, Dur::secs(30))
        .await
        .unwrap();
    assert_eq!(partitions, 3, "partitions in the metadata");
    assert_eq!(configs["retention.ms"], "172800000", "{configs:?}");
    assert_eq!(configs["cleanup.policy"], "delete");
    assert_eq!(configs["compression.type"], "zstd");
    assert_eq!(configs["compression.zstd.level"], "5");

    // The same settings again: nothing to do.
    let (_, report) = open_backend(
        "kafka",
        &full.backends["kafka"],
        &full,
        Some(Provisioning::ValidateOnly),
    )
    .await
    .unwrap();
    assert_eq!(report, Default::default(), "no drift");

    // A changed setting: reported by validate_only, left alone.
    cfg.topics.get_mut(&topic).unwrap().retention = Some(Dur::secs(86_400));
    cfg.topics.get_mut(&topic).unwrap().partitions = Some(6);
    full.backends
        .insert("kafka".into(), BackendConfig::Kafka(cfg.clone()));
    let (_, report) = open_backend(
        "kafka",
        &full.backends["kafka"],
        &full,
        Some(Provisioning::ValidateOnly),
    )
    .await
    .unwrap();
    assert_eq!(report.drift.len(), 1, "{report:?}");
    assert!(
        report.drift[0].contains("partitions 3, configured 6")
            && report.drift[0].contains("retention.ms 172800000, configured 86400000"),
        "{report:?}"
    );
    let (partitions, configs) = provision::describe_topic(&cfg, &topic, Dur::secs(30))
        .await
        .unwrap();
    assert_eq!(
        (partitions, configs["retention.ms"].as_str()),
        (3, "172800000")
    );
}

#[tokio::test]
async fn invalid_topic_settings_stop_the_start_naming_topic_and_key() {
    let topic = "orders.events";
    let mut cfg = k::config(&k::brokers());
    cfg.topics.insert(
        topic.into(),
        TopicSettings {
            compression: Some(Compression::Gzip),
            compression_level: Some(20),
            ..TopicSettings::default()
        },
    );
    let mut full = Config::default();
    full.backends
        .insert("kafka".into(), BackendConfig::Kafka(cfg));
    full.apply_defaults();
    let err = full.validate().unwrap_err().to_string();
    assert!(
        err.contains("backends.kafka.topics.\"orders.events\".compression_level")
            && err.contains("20 is not allowed for gzip, must be 1 to 9"),
        "{err}"
    );
}

/// A relay running on a private broker (for the tests that take it away) with the given
/// publish timeout and retry budget, and a consumer group reading its topic.
struct Away {
    broker: PrivateKafka,
    topic: String,
    reader: GroupReader,
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
        let broker = PrivateKafka::start();
        let topic = k::unique_topic();
        k::create_topic(&broker.brokers(), &topic, 3).await;
        let reader = GroupReader::start(&broker.brokers(), &topic);
        let db = TestDb::new().await;
        let mut cfg = db.config();
        cfg.relay.publish_timeout = publish_timeout;
        cfg.relay.backoff_initial = backoff_initial;
        cfg.relay.backoff_max = backoff_max;
        cfg.relay.max_attempts = max_attempts;
        let publisher = Arc::new(
            KafkaPublisher::new(&k::config(&broker.brokers()), cfg.relay.publish_timeout).unwrap(),
        );
        let relay = db
            .relay_with(&cfg, vec![("kafka", publisher)], &routes())
            .await;
        let stats = relay.stats();
        let (h, stop) = spawn(relay);
        Away {
            broker,
            topic,
            reader,
            db,
            stats,
            h,
            stop,
        }
    }
}

/// The broker frozen (SIGSTOP: connections open, no answer) and then killed, each time for far
/// longer than the whole retry budget (3 attempts, backoff capped at 100 ms): every event waits
/// for it instead of using its attempts up; none fails; all are published once it is back.
#[tokio::test]
async fn an_outage_longer_than_the_retry_budget_fails_nothing() {
    let _watchdog = watchdog(
        "an_outage_longer_than_the_retry_budget_fails_nothing",
        Duration::from_secs(300),
    );
    let Away {
        mut broker,
        topic,
        reader,
        db,
        stats,
        h,
        stop,
    } = Away::start(Dur::secs(2), Dur::ms(20), Dur::ms(100), 3).await;
    let retried = || stats.retried.load(std::sync::atomic::Ordering::Relaxed);
    let failed = || stats.failed.load(std::sync::atomic::Ordering::Relaxed);
    let round = |r: usize| -> Vec<NewEvent> {
        (0..50)
            .map(|i| numbered_on(&topic, &format!("a{}", i % 10), r * 5 + i / 10))
            .collect()
    };
    let first = round(0);
    db.enqueue(&first).await;
    wait_for(DEADLINE, "the first events through", || async {
        db.total().await == 0
    })
    .await;

    // Frozen: every hand-off times out unanswered.
    broker.pause();
    let frozen = round(1);
    db.enqueue(&frozen).await;
    let before = retried();
    wait_for(
        DEADLINE,
        "each waiting event tried past the budget while frozen",
        || async { retried() > before + 10 * 3 * 4 },
    )
    .await;
    assert_eq!(
        db.count("status = 'failed'").await,
        0,
        "a frozen broker failed events"
    );
    broker.resume();
    wait_for_or_dump(
        DEADLINE,
        "every event published after the freeze",
        || async { db.total().await == 0 },
        || async {
            format!(
                "relay: {stats:?}\nrows:\n{}\nbroker log (tail):\n{}",
                db.summary().await,
                broker.log_tail(30)
            )
        },
    )
    .await;
    wait_for(DEADLINE, "the consumer group to have them", || async {
        reader.has_all(first.iter().chain(&frozen))
    })
    .await;
    conformance::assert_first_deliveries_in_order(&reader.received());
    drop(reader);

    // Gone (connection refused): all brokers down.
    broker.stop_server();
    let gone = round(2);
    db.enqueue(&gone).await;
    let before = retried();
    wait_for(
        DEADLINE,
        "each waiting event tried past the budget while the broker is gone",
        || async { retried() > before + 10 * 3 * 4 },
    )
    .await;
    assert_eq!(
        db.count("status = 'failed'").await,
        0,
        "a dead broker failed events"
    );
    broker.start_server();
    k::create_topic(&broker.brokers(), &topic, 3).await;
    let reader = GroupReader::start(&broker.brokers(), &topic);
    wait_for(
        DEADLINE,
        "every event published after the restart",
        || async { db.total().await == 0 },
    )
    .await;
    wait_for(DEADLINE, "the new broker to have them all", || async {
        reader.has_all(&gone)
    })
    .await;
    conformance::assert_first_deliveries_in_order(&reader.received());
    stop.cancel();
    h.await.unwrap();
    assert_eq!(failed(), 0);
    db.drop_schema().await;
}
