//! Commit-to-acknowledgement latency at a steady rate: producers commit small transactions
//! into the outbox at BENCH_RATE events/s (default 10 000: 20 events per transaction) for
//! BENCH_SECS seconds (default 10), while the relay publishes to a backend that acknowledges at
//! once, or through a real broker. Latency is from the producer's COMMIT returning to the
//! backend's acknowledgement, both read from this process's clock; the first second is warm-up
//! and not counted.
//!
//!   cargo bench --bench latency
//!   BENCH_BACKEND=kafka cargo bench --bench latency   # acknowledged by Kafka (BENCH_KAFKA_BROKERS)
//!   BENCH_BACKEND=nats cargo bench --bench latency    # acknowledged by JetStream (BENCH_NATS_URL)
//!
//! Under `cargo test` it runs a one-second smoke pass at a low rate.

#[allow(dead_code)] // the bare-client ceilings belong to the drain benchmark
mod brokers;
mod common;

use common::{percentile_ms, BenchDb};
use futures::future::BoxFuture;
use futures::FutureExt;
use outbox_relay::publisher::kafka::KafkaPublisher;
use outbox_relay::publisher::nats::NatsPublisher;
use outbox_relay::publisher::{AckSender, AckTicket, Health, Outgoing, Publisher};
use outbox_relay::store::{NewEvent, Outbox};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Acknowledges at once and notes when.
#[derive(Clone, Default)]
struct Stopwatch {
    acked: Arc<Mutex<HashMap<Uuid, Instant>>>,
}

impl Publisher for Stopwatch {
    fn kind(&self) -> &'static str {
        "stopwatch"
    }
    fn publish(&self, burst: Vec<Outgoing>) -> BoxFuture<'_, ()> {
        let now = Instant::now();
        let mut acked = self.acked.lock().unwrap();
        for o in burst {
            acked.entry(o.event.event_id).or_insert(now);
            o.ticket.ack();
        }
        futures::future::ready(()).boxed()
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        futures::future::ready(Health::Up).boxed()
    }
    fn close(&self, _: Duration) -> BoxFuture<'_, ()> {
        futures::future::ready(()).boxed()
    }
}

/// Hands events to a real broker's publisher and notes when each one's acknowledgement comes
/// back from it (the relay's ticket is resolved right after, with the same outcome).
struct Timed {
    inner: Arc<dyn Publisher>,
    /// By row id: the event id and the relay's ticket.
    waiting: Arc<Mutex<HashMap<i64, (Uuid, AckTicket)>>>,
    tx: AckSender,
}

impl Timed {
    fn new(inner: Arc<dyn Publisher>, acked: Arc<Mutex<HashMap<Uuid, Instant>>>) -> Self {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<outbox_relay::publisher::AckResult>();
        let waiting: Arc<Mutex<HashMap<i64, (Uuid, AckTicket)>>> = Arc::default();
        let (w, a) = (waiting.clone(), acked.clone());
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let waiting = w.lock().unwrap().remove(&r.row_id);
                if let Some((event_id, t)) = waiting {
                    if r.outcome.is_ok() {
                        a.lock()
                            .unwrap()
                            .entry(event_id)
                            .or_insert_with(Instant::now);
                    }
                    t.resolve(r.outcome);
                }
            }
        });
        Timed { inner, waiting, tx }
    }
}

impl Publisher for Timed {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn keeps_order(&self) -> bool {
        self.inner.keeps_order()
    }
    fn publish(&self, burst: Vec<Outgoing>) -> BoxFuture<'_, ()> {
        let mut waiting = self.waiting.lock().unwrap();
        let burst: Vec<Outgoing> = burst
            .into_iter()
            .map(|o| {
                let ticket = AckTicket::new(o.event.id, 0, self.tx.clone());
                waiting.insert(o.event.id, (o.event.event_id, o.ticket));
                Outgoing { ticket, ..o }
            })
            .collect();
        drop(waiting);
        self.inner.publish(burst)
    }
    fn health(&self) -> BoxFuture<'_, Health> {
        self.inner.health()
    }
    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        self.inner.close(timeout)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outbox_relay::tune_allocator();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rate, secs) = if common::is_bench() {
        (env("BENCH_RATE", 10_000), env("BENCH_SECS", 10))
    } else {
        (400, 2)
    };
    let per_tx = 20u64;
    let producers = 2u64;
    let db = BenchDb::open("bench_latency", producers as u32 + 1).await;
    let watch = Stopwatch::default();
    let backend = if common::is_bench() {
        std::env::var("BENCH_BACKEND").unwrap_or_else(|_| "memory".into())
    } else {
        "memory".into()
    };
    let cfg = db.config();
    let publisher: Arc<dyn Publisher> = match backend.as_str() {
        "memory" => Arc::new(watch.clone()),
        "kafka" => {
            brokers::kafka_topic("bench.latency").await;
            let kafka = KafkaPublisher::new(&brokers::kafka_config(), cfg.relay.publish_timeout)
                .expect("a Kafka producer");
            Arc::new(Timed::new(Arc::new(kafka), watch.acked.clone()))
        }
        "nats" => {
            brokers::nats_stream(brokers::RELAY_STREAM, "bench.>").await;
            let nats = NatsPublisher::connect(&brokers::nats_config())
                .await
                .expect("connect to NATS");
            Arc::new(Timed::new(Arc::new(nats), watch.acked.clone()))
        }
        other => panic!("BENCH_BACKEND={other}: memory, nats or kafka"),
    };
    let relay = common::relay(&cfg, &backend, publisher).await;
    let stop = CancellationToken::new();
    let relay_task = {
        let stop = stop.clone();
        tokio::spawn(async move { relay.run(stop).await.unwrap() })
    };
    db.wait_listening().await;

    // Producers: each commits `per_tx` events every tick, together `rate` events/s.
    let start = Instant::now();
    let warmup = start + Duration::from_secs(1);
    let mut tasks = Vec::new();
    for p in 0..producers {
        let pool = db.pool.clone();
        let outbox = Outbox::new(&db.names.schema, &db.names.table).unwrap();
        let period = Duration::from_secs_f64(per_tx as f64 * producers as f64 / rate as f64);
        tasks.push(tokio::spawn(async move {
            let mut committed: Vec<(Uuid, Instant)> = Vec::new();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut n = 0u64;
            while start.elapsed() < Duration::from_secs(secs) {
                tick.tick().await;
                let evs: Vec<NewEvent> = (0..per_tx)
                    .map(|i| {
                        NewEvent::new(
                            "bench.latency",
                            format!("p{p}-agg-{}", (n + i) % 1000),
                            "E",
                            vec![b'x'; 200],
                        )
                    })
                    .collect();
                n += per_tx;
                let mut tx = pool.begin().await.unwrap();
                outbox.enqueue(&mut tx, &evs).await.unwrap();
                tx.commit().await.unwrap();
                let at = Instant::now();
                committed.extend(evs.iter().map(|e| (e.event_id, at)));
            }
            committed
        }));
    }
    let mut committed = Vec::new();
    for t in tasks {
        committed.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Wait (bounded) for the last acknowledgements.
    let deadline = Instant::now() + Duration::from_secs(30);
    while watch.acked.lock().unwrap().len() < committed.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    relay_task.await.unwrap();
    let acked = watch.acked.lock().unwrap().clone();
    assert_eq!(acked.len(), committed.len(), "every event acknowledged");
    let mut lat: Vec<Duration> = committed
        .iter()
        .filter(|(_, at)| *at >= warmup)
        .map(|(id, at)| acked[id].saturating_duration_since(*at))
        .collect();
    lat.sort();
    println!(
        "latency benchmark: backend={backend}, {:.0} events/s offered ({} per transaction, {} producers), {} measured",
        committed.len() as f64 / elapsed,
        per_tx,
        producers,
        lat.len()
    );
    println!(
        "commit -> ack: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        percentile_ms(&lat, 0.5),
        percentile_ms(&lat, 0.9),
        percentile_ms(&lat, 0.99),
        percentile_ms(&lat, 1.0)
    );
    db.drop().await;
}
