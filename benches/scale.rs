//! Scale-out benchmark: several relays on one outbox, and one hot aggregate.
//!
//! 1. A backlog of BENCH_EVENTS (100 000) events of 200 bytes over 300 and over 1 000
//!    aggregates, drained by 1, 2 and 3 relays started together (each with its own pool,
//!    ownership session and backend client, in this process, as they would share the machine
//!    as processes).
//! 2. One aggregate holding BENCH_HOT (20 000) events, drained by one relay in pipelined and in
//!    strict ordering.
//!
//!   cargo bench --bench scale                       # memory backend
//!   BENCH_BACKEND=nats cargo bench --bench scale    # JetStream at BENCH_NATS_URL
//!   BENCH_BACKEND=kafka cargo bench --bench scale   # Kafka at BENCH_KAFKA_BROKERS
//!   BENCH_BACKEND=pulsar cargo bench --bench scale  # Pulsar at BENCH_PULSAR_URL
//!   BENCH_ORDERING=pipelined BENCH_WINDOW=1024       # the many-aggregate drains pipelined
//!   BENCH_ONLY_HOT=1                                 # only the one-aggregate drains
//!
//! Under `cargo test` it runs a small smoke pass on the memory backend.

#[allow(dead_code)] // the bare-client ceilings belong to the drain benchmark
mod brokers;
mod common;

use common::BenchDb;
use outbox_relay::config::{Config, Dur, OrderingMode};
use outbox_relay::publisher::kafka::KafkaPublisher;
use outbox_relay::publisher::memory::MemoryPublisher;
use outbox_relay::publisher::nats::NatsPublisher;
use outbox_relay::publisher::pulsar::PulsarPublisher;
use outbox_relay::publisher::Publisher;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

async fn publisher(backend: &str, cfg: &Config) -> std::sync::Arc<dyn Publisher> {
    match backend {
        "memory" => std::sync::Arc::new(MemoryPublisher::counting()),
        "nats" => std::sync::Arc::new(
            NatsPublisher::connect(&brokers::nats_config())
                .await
                .expect("connect to NATS"),
        ),
        "kafka" => std::sync::Arc::new(
            KafkaPublisher::new(&brokers::kafka_config(), cfg.relay.publish_timeout)
                .expect("a Kafka producer"),
        ),
        "pulsar" => std::sync::Arc::new(PulsarPublisher::connect(&brokers::pulsar_config()).await),
        other => panic!("BENCH_BACKEND={other}: memory, nats, kafka or pulsar"),
    }
}

async fn pending(db: &BenchDb) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE status = 'pending'",
        db.names.qualified()
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Starts `relays` relays at once on the filled outbox and times the drain (from the start to
/// no pending row left).
async fn drain(db: &BenchDb, cfg: &Config, backend: &str, relays: usize) -> (f64, u64) {
    let stop = CancellationToken::new();
    let mut handles = Vec::new();
    let t0 = Instant::now();
    for i in 0..relays {
        let mut cfg = cfg.clone();
        cfg.relay.instance_id = Some(format!("bench-{i}"));
        let relay = common::relay(&cfg, backend, publisher(backend, &cfg).await)
            .await
            .with_monitor(cfg.monitor.clone(), format!("bench-{i}"));
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            relay.run(stop).await.unwrap();
            relay
                .stats()
                .deferred
                .load(std::sync::atomic::Ordering::Relaxed)
        }));
    }
    loop {
        if pending(db).await == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "drain stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    stop.cancel();
    let mut deferred = 0;
    for h in handles {
        deferred += h.await.unwrap();
    }
    (secs, deferred)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outbox_relay::allocator::tune();
    let bench = common::is_bench();
    let backend = if bench {
        std::env::var("BENCH_BACKEND").unwrap_or_else(|_| "memory".into())
    } else {
        "memory".into()
    };
    let events: u64 = if bench {
        common::sizes("BENCH_EVENTS", "100000")[0]
    } else {
        3000
    };
    let hot: u64 = if bench {
        common::sizes("BENCH_HOT", "20000")[0]
    } else {
        2000
    };
    let db = BenchDb::open("scale", 2).await;
    match backend.as_str() {
        "nats" => {
            brokers::nats_stream(brokers::RELAY_STREAM, "bench.>").await;
        }
        "kafka" => brokers::kafka_topic("bench.events").await,
        _ => {}
    }
    let mut cfg = db.config();
    cfg.relay.rebalance_interval = Dur::ms(250);
    if let Ok(w) = std::env::var("BENCH_WINDOW") {
        cfg.relay.aggregate_window = w.parse().expect("BENCH_WINDOW");
    }
    if std::env::var("BENCH_ORDERING").as_deref() == Ok("pipelined") {
        cfg.relay.ordering = OrderingMode::Pipelined;
    }
    let only_hot = std::env::var("BENCH_ONLY_HOT").is_ok();
    println!(
        "scale benchmark: backend={backend} events={events} payload=200 B ordering={:?} window={}",
        cfg.relay.ordering, cfg.relay.aggregate_window
    );
    let shapes: &[u64] = if only_hot { &[] } else { &[300, 1000] };
    for &aggregates in shapes {
        let mut line = format!("{aggregates:>5} aggregates:");
        for relays in 1..=3 {
            db.fill(0, events, aggregates).await;
            let (secs, deferred) = drain(&db, &cfg, &backend, relays).await;
            line.push_str(&format!(
                " {relays} relay(s) {:>7.0} ev/s (deferred {deferred}) |",
                events as f64 / secs
            ));
        }
        println!("{line}");
    }
    for (mode, name) in [
        (OrderingMode::Pipelined, "pipelined"),
        (OrderingMode::Strict, "strict"),
    ] {
        let mut cfg = cfg.clone();
        cfg.relay.ordering = mode;
        // Strict on a slow broker is one round trip per event: fewer events to wait for.
        let n = if mode == OrderingMode::Strict {
            (hot / 10).max(100)
        } else {
            hot
        };
        db.fill(0, n, 1).await;
        let (secs, _) = drain(&db, &cfg, &backend, 1).await;
        println!(
            "one aggregate, {n} events, {name} (window {}): {:>7.0} ev/s",
            cfg.relay.aggregate_window,
            n as f64 / secs
        );
    }
    db.drop().await;
}
