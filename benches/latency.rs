//! Commit-to-acknowledgement latency at a steady rate: producers commit small transactions
//! into the outbox at BENCH_RATE events/s (default 10 000: 20 events per transaction) for
//! BENCH_SECS seconds (default 10), while the relay publishes to a backend that acknowledges at
//! once. Latency is from the producer's COMMIT returning to the backend's acknowledgement, both
//! read from this process's clock; the first second is warm-up and not counted.
//!
//!   cargo bench --bench latency
//!
//! Under `cargo test` it runs a one-second smoke pass at a low rate.

mod common;

use common::{percentile_ms, BenchDb};
use futures::future::BoxFuture;
use futures::FutureExt;
use outbox_relay::publisher::{Health, Outgoing, Publisher};
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outbox_relay::allocator::tune();
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
    let relay = common::relay(&db.config(), "watch", Arc::new(watch.clone())).await;
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
        "latency benchmark: {:.0} events/s offered ({} per transaction, {} producers), {} measured",
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
