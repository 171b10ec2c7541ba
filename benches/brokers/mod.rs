//! Broker setup for the drain benchmark, and the bare-client ceilings: the same number of
//! 200-byte messages published by a plain client loop, as fast as that client goes.

use async_nats::jetstream;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use outbox_relay::publisher::kafka::KafkaConfig;
use outbox_relay::publisher::nats::NatsConfig;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

type PubAck = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

pub const RELAY_STREAM: &str = "BENCH_RELAY";
const BARE_STREAM: &str = "BENCH_BARE";

pub fn nats_url() -> String {
    std::env::var("BENCH_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("BENCH_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn nats_config() -> NatsConfig {
    NatsConfig {
        servers: vec![nats_url()],
        ..NatsConfig::default()
    }
}

pub fn kafka_config() -> KafkaConfig {
    let mut c = KafkaConfig {
        bootstrap_servers: kafka_brokers(),
        ..KafkaConfig::default()
    };
    // To compare producer settings: BENCH_KAFKA_LINGER=1 sets linger.ms.
    if let Ok(ms) = std::env::var("BENCH_KAFKA_LINGER") {
        c.properties.insert("linger.ms".into(), ms);
    }
    // Any other librdkafka property: BENCH_KAFKA_PROPS="socket.nagle.disable=true,k=v".
    if let Ok(props) = std::env::var("BENCH_KAFKA_PROPS") {
        for kv in props.split(',').filter(|kv| !kv.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("BENCH_KAFKA_PROPS: {kv:?} is not key=value"));
            c.properties.insert(k.trim().into(), v.trim().into());
        }
    }
    c
}

/// A fresh file-backed stream over `subjects`.
pub async fn nats_stream(name: &str, subjects: &str) -> jetstream::Context {
    let client = async_nats::connect(nats_url())
        .await
        .expect("connect to NATS");
    let js = jetstream::new(client);
    let _ = js.delete_stream(name).await;
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        ..Default::default()
    })
    .await
    .expect("create the benchmark stream");
    js
}

/// A topic with 6 partitions (created if missing).
pub async fn kafka_topic(name: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("a Kafka admin client");
    let topic = NewTopic::new(name, 6, TopicReplication::Fixed(1));
    let _ = admin.create_topics([&topic], &AdminOptions::new()).await;
}

fn payload(i: u64) -> Vec<u8> {
    let mut p = format!("{i}").into_bytes();
    p.resize(200, b'x');
    p
}

/// Publishes `n` messages to JetStream with a PubAck window of 4096, each with a Nats-Msg-Id,
/// and returns the seconds it took until the last PubAck.
pub async fn bare_nats(n: u64) -> f64 {
    let js = nats_stream(BARE_STREAM, "bare.>").await;
    let t0 = Instant::now();
    let mut window: FuturesUnordered<PubAck> = FuturesUnordered::new();
    for i in 0..n {
        if window.len() >= 4096 {
            window.next().await.unwrap().expect("a PubAck");
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            uuid::Uuid::now_v7().to_string().as_str(),
        );
        let ack = js
            .publish_with_headers(format!("bare.{}", i % 16), headers, payload(i).into())
            .await
            .expect("publish");
        window.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(r) = window.next().await {
        r.expect("a PubAck");
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = js.delete_stream(BARE_STREAM).await;
    let _ = js.delete_stream(RELAY_STREAM).await;
    secs
}

/// Counts delivery reports, so the bare loop is held to the same "every message acknowledged".
#[derive(Default)]
struct Counting {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Publishes `n` keyed messages with librdkafka (the relay's own producer settings: idempotent,
/// acks=all, linger 5 ms) and returns the seconds until every delivery report is in.
pub async fn bare_kafka(n: u64) -> f64 {
    let topic = "bench.bare";
    kafka_topic(topic).await;
    let mut conf = ClientConfig::new();
    for (k, v) in kafka_config().client_properties(outbox_relay::config::Dur::secs(30)) {
        conf.set(k, v);
    }
    tokio::task::spawn_blocking(move || {
        let producer: ThreadedProducer<Counting> = conf
            .create_with_context(Counting::default())
            .expect("a Kafka producer");
        let t0 = Instant::now();
        for i in 0..n {
            let key = format!("agg-{}", i % 10_000);
            let body = payload(i);
            let mut record = BaseRecord::to(topic).key(&key).payload(&body);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(120)).expect("flush");
        let secs = t0.elapsed().as_secs_f64();
        let ctx = producer.context();
        assert_eq!(
            ctx.ok.load(Ordering::Relaxed),
            n,
            "every message acknowledged"
        );
        assert_eq!(ctx.failed.load(Ordering::Relaxed), 0);
        secs
    })
    .await
    .unwrap()
}

pub fn pulsar_url() -> String {
    std::env::var("BENCH_PULSAR_URL").unwrap_or_else(|_| "pulsar://127.0.0.1:6650".into())
}

pub fn pulsar_config() -> outbox_relay::publisher::pulsar::PulsarConfig {
    outbox_relay::publisher::pulsar::PulsarConfig {
        service_url: pulsar_url(),
        ..Default::default()
    }
}

/// Publishes `n` keyed 200-byte messages with a bare pulsar-rs producer (the relay's producer
/// options: batching as configured, a window of `max_pending_messages` receipts) and returns
/// the seconds until every receipt is in.
pub async fn bare_pulsar(n: u64) -> f64 {
    use pulsar::{producer::Message, Pulsar, TokioExecutor};
    let cfg = pulsar_config();
    let client: Pulsar<TokioExecutor> = Pulsar::builder(cfg.service_url.clone(), TokioExecutor)
        .with_outbound_channel_size(cfg.max_pending_messages as usize)
        .build()
        .await
        .expect("connect to Pulsar");
    let topic = format!(
        "persistent://public/default/bench-bare-{}",
        uuid::Uuid::new_v4().simple()
    );
    let mut producer = client
        .producer()
        .with_topic(topic)
        .with_options(outbox_relay::publisher::pulsar::producer_options(&cfg))
        .build()
        .await
        .expect("a Pulsar producer");
    let t0 = Instant::now();
    let mut window: FuturesUnordered<pulsar::producer::SendFuture> = FuturesUnordered::new();
    for i in 0..n {
        if window.len() >= cfg.max_pending_messages as usize {
            window.next().await.unwrap().expect("a send receipt");
        }
        let key = format!("agg-{}", i % 10_000);
        let msg = Message {
            payload: payload(i),
            partition_key: Some(key.clone()),
            ordering_key: Some(key.into_bytes()),
            properties: [("X-Event-ID".to_string(), uuid::Uuid::now_v7().to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        window.push(producer.send_non_blocking(msg).await.expect("send"));
    }
    while let Some(r) = window.next().await {
        r.expect("a send receipt");
    }
    t0.elapsed().as_secs_f64()
}
