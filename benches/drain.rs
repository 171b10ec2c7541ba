//! Drain benchmark: pre-fill N pending rows (200-byte payloads, 10 000 aggregates), run the
//! relay until every row is marked, and measure events/s, the relay's CPU seconds and peak
//! memory. In the same run, two ceilings: the SQL-only one (the relay's own claim and mark
//! statements, as many at once as its pipeline, with no publishing) and, for a broker, a bare
//! client loop publishing the same number of 200-byte messages to the same broker.
//!
//!   cargo bench --bench drain                          # memory backend, 100k and 1M
//!   BENCH_SIZES=200000 cargo bench --bench drain       # other sizes
//!   BENCH_BACKEND=nats cargo bench --bench drain       # JetStream at BENCH_NATS_URL
//!   BENCH_BACKEND=kafka cargo bench --bench drain      # Kafka at BENCH_KAFKA_BROKERS
//!   BENCH_BACKEND=pulsar cargo bench --bench drain     # Pulsar at BENCH_PULSAR_URL
//!   BENCH_ONLY_RELAY=1 ...                             # the relay's drain alone (to profile)
//!   BENCH_WORKERS=1 ...                                # the runtime's worker threads (default 2)
//!
//! Under `cargo test` (no `--bench` flag) it runs a 2 000-row smoke pass and checks the drain.

mod brokers;
mod common;

use common::BenchDb;
use outbox_relay::config::Config;
use outbox_relay::publisher::kafka::KafkaPublisher;
use outbox_relay::publisher::memory::MemoryPublisher;
use outbox_relay::publisher::nats::NatsPublisher;
use outbox_relay::publisher::pulsar::PulsarPublisher;
use outbox_relay::publisher::Publisher;
use outbox_relay::store::{Marks, Store};
use outbox_relay::wiring::session;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// User+system CPU seconds of this process (the relay, its pool and runtime), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident memory in MB, and reset the peak (Linux clear_refs 5).
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The default settings, with BENCH_BATCH and BENCH_DEPTH applied.
fn config(db: &BenchDb) -> Config {
    let mut c = db.config();
    if let Ok(b) = std::env::var("BENCH_BATCH") {
        c.relay.batch_size = b.parse().expect("BENCH_BATCH");
    }
    if let Ok(d) = std::env::var("BENCH_DEPTH") {
        c.relay.pipeline_depth = d.parse().expect("BENCH_DEPTH");
        c.database.max_connections = c.relay.pipeline_depth + 2;
    }
    c
}

struct Figures {
    rows: u64,
    secs: f64,
    cpu: f64,
    rss: f64,
}

async fn drain_with_relay(cfg: &Config, n: u64, backend: &str) -> Figures {
    let mem = MemoryPublisher::counting();
    let publisher: Arc<dyn Publisher> = match backend {
        "memory" => Arc::new(mem.clone()),
        "nats" => {
            brokers::nats_stream(brokers::RELAY_STREAM, "bench.>").await;
            Arc::new(
                NatsPublisher::connect(&brokers::nats_config())
                    .await
                    .expect("connect to NATS"),
            )
        }
        "kafka" => {
            brokers::kafka_topic("bench.events").await;
            Arc::new(
                KafkaPublisher::new(&brokers::kafka_config(), cfg.relay.publish_timeout)
                    .expect("a Kafka producer"),
            )
        }
        "pulsar" => Arc::new(PulsarPublisher::connect(&brokers::pulsar_config()).await),
        other => panic!("BENCH_BACKEND={other}: memory, nats, kafka or pulsar"),
    };
    let relay = common::relay(cfg, backend, publisher).await;
    let stats = relay.stats();
    reset_peak_rss();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    relay
        .run_until_drained(CancellationToken::new())
        .await
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    assert_eq!(stats.published(), n, "every event published");
    if backend == "memory" {
        assert_eq!(mem.acked_count(), n);
    }
    Figures {
        rows: n,
        secs,
        cpu,
        rss: peak_rss_mb(),
    }
}

/// The floor the relay must beat: a plain batch loop, one transaction after another (claim
/// 1000 with SKIP LOCKED in id order, hand every row to the same backend, wait for every
/// acknowledgement, delete, commit), with no ordering machinery at all.
async fn drain_plain_loop(cfg: &Config, n: u64, publisher: Arc<dyn Publisher>) -> Figures {
    use outbox_relay::envelope::Event;
    use outbox_relay::publisher::{AckTicket, Outgoing};
    use sqlx::Row;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(cfg.database.url.expose())
        .await
        .unwrap();
    let t = format!("{}.{}", cfg.database.schema, cfg.database.table);
    let select = format!(
        "SELECT id, event_id, topic, aggregate_id, event_type, payload, occurred_at FROM {t} \
         WHERE status = 'pending' ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED"
    );
    let delete = format!("DELETE FROM {t} WHERE id = ANY($1)");
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut rows = 0u64;
    loop {
        let mut tx = pool.begin().await.unwrap();
        let got = sqlx::query(&select).fetch_all(&mut *tx).await.unwrap();
        if got.is_empty() {
            break;
        }
        let mut ids = Vec::with_capacity(got.len());
        let mut burst = Vec::with_capacity(got.len());
        for r in &got {
            let event = Event {
                id: r.get(0),
                event_id: r.get(1),
                topic: r.get(2),
                aggregate_id: r.get(3),
                aggregate_type: None,
                event_type: r.get(4),
                event_version: 1,
                payload: r.get(5),
                headers: Vec::new(),
                content_type: None,
                traceparent: None,
                correlation_id: None,
                occurred_at: r.get(6),
                attempts: 0,
            };
            ids.push(event.id);
            let ticket = AckTicket::new(event.id, 0, ack_tx.clone());
            burst.push(Outgoing {
                event: Arc::new(event),
                format: Default::default(),
                ticket,
            });
        }
        publisher.publish(burst).await;
        for _ in 0..ids.len() {
            let ack = ack_rx.recv().await.unwrap();
            assert!(ack.outcome.is_ok(), "{:?}", ack.outcome);
        }
        sqlx::query(&delete)
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        rows += ids.len() as u64;
    }
    assert_eq!(rows, n);
    Figures {
        rows,
        secs: t0.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - cpu0,
        rss: peak_rss_mb(),
    }
}

/// The relay's own claim and mark statements, `depth` loops at once, no publishing.
async fn drain_sql_only(cfg: &Config, n: u64) -> Figures {
    let store = Arc::new(Store::connect(&cfg.database, &session(cfg)).await.unwrap());
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    // Each loop is one claim after another, like the relay's pipeline slots; loops take turns
    // through SKIP LOCKED as the relay's batches do.
    for _ in 0..cfg.relay.pipeline_depth {
        let store = store.clone();
        let batch = cfg.relay.batch_size;
        tasks.push(tokio::spawn(async move {
            let mut rows = 0u64;
            let mut cursor = None;
            loop {
                // The relay's cursor rule: past the last key while claims come back full.
                let (tx, claimed, last) = store.claim_after(batch, cursor).await.unwrap();
                cursor = if claimed.len() as u32 == batch {
                    last
                } else {
                    None
                };
                if claimed.is_empty() {
                    return rows;
                }
                rows += claimed.len() as u64;
                let marks = Marks {
                    published: claimed.iter().map(|c| c.event.id).collect(),
                    ..Default::default()
                };
                store
                    .finish(tx, &marks, Duration::from_millis(50))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut rows = 0;
    for t in tasks {
        rows += t.await.unwrap();
    }
    assert_eq!(rows, n);
    Figures {
        rows,
        secs: t0.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - cpu0,
        rss: peak_rss_mb(),
    }
}

fn main() {
    outbox_relay::tune_allocator();
    // BENCH_WORKERS: the runtime's worker threads (default 2, one per core here).
    let workers = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse::<usize>().ok())
        .filter(|w| *w > 0)
        .unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(bench());
}

async fn bench() {
    let sizes = common::sizes("BENCH_SIZES", "100000,1000000");
    // Under `cargo test` the smoke pass uses the memory backend only.
    let backend = if common::is_bench() {
        std::env::var("BENCH_BACKEND").unwrap_or_else(|_| "memory".into())
    } else {
        "memory".into()
    };
    let db = BenchDb::open("bench", 2).await;
    let cfg = config(&db);
    println!(
        "drain benchmark: backend={backend} batch_size={} pipeline_depth={} payload=200 B aggregates=10000",
        cfg.relay.batch_size, cfg.relay.pipeline_depth
    );
    for n in sizes {
        db.fill(0, n, 10_000).await;
        let m0 = common::machine_cpu_seconds();
        let relay = drain_with_relay(&cfg, n, &backend).await;
        let relay_machine = common::machine_cpu_seconds() - m0;
        if std::env::var_os("BENCH_ONLY_RELAY").is_some() {
            // For profiling the relay alone (perf record on this process).
            println!(
                "{n:>9} events: relay {:>9.0} ev/s ({:.2} CPU-s, machine {:.1} us/event, peak RSS {:.0} MB)",
                relay.rows as f64 / relay.secs,
                relay.cpu,
                relay_machine / n as f64 * 1e6,
                relay.rss
            );
            continue;
        }
        db.fill(0, n, 10_000).await;
        let sql = drain_sql_only(&cfg, n).await;
        let rate = relay.rows as f64 / relay.secs;
        let ceiling = sql.rows as f64 / sql.secs;
        println!(
            "{n:>9} events: relay {rate:>9.0} ev/s ({:.2}s, {:.2} CPU-s, {:.0} ev/CPU-s, peak RSS {:.0} MB) | \
             SQL-only ceiling {ceiling:>9.0} rows/s ({:.2}s) | ratio {:.2}",
            relay.secs,
            relay.cpu,
            relay.rows as f64 / relay.cpu.max(0.001),
            relay.rss,
            sql.secs,
            rate / ceiling
        );
        db.fill(0, n, 10_000).await;
        let floor_publisher: Arc<dyn Publisher> = match backend.as_str() {
            "nats" => Arc::new(
                NatsPublisher::connect(&brokers::nats_config())
                    .await
                    .expect("connect to NATS"),
            ),
            "kafka" => Arc::new(
                KafkaPublisher::new(&brokers::kafka_config(), cfg.relay.publish_timeout)
                    .expect("a Kafka producer"),
            ),
            "pulsar" => Arc::new(PulsarPublisher::connect(&brokers::pulsar_config()).await),
            _ => Arc::new(MemoryPublisher::counting()),
        };
        let m0 = common::machine_cpu_seconds();
        let floor = drain_plain_loop(&cfg, n, floor_publisher).await;
        let floor_machine = common::machine_cpu_seconds() - m0;
        let floor_rate = floor.rows as f64 / floor.secs;
        println!(
            "{n:>9} events: plain batch loop {floor_rate:>9.0} ev/s ({:.2}s, {:.2} CPU-s) | relay/loop speed {:.2} | \
             machine CPU per event: relay {:.1} us, loop {:.1} us (ratio {:.2})",
            floor.secs,
            floor.cpu,
            rate / floor_rate,
            relay_machine / n as f64 * 1e6,
            floor_machine / n as f64 * 1e6,
            relay_machine / floor_machine.max(0.001)
        );
        let bare = match backend.as_str() {
            "nats" => Some(brokers::bare_nats(n).await),
            "kafka" => Some(brokers::bare_kafka(n).await),
            "pulsar" => Some(brokers::bare_pulsar(n).await),
            _ => None,
        };
        if let Some(secs) = bare {
            let bare_rate = n as f64 / secs;
            println!(
                "{n:>9} events: bare {backend} client loop {bare_rate:>9.0} msg/s ({secs:.2}s) | relay/bare {:.2}",
                rate / bare_rate
            );
        }
    }
    db.drop().await;
}
