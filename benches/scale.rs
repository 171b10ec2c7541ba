//! Scale-out benchmark: several relays on one outbox, and one hot aggregate.
//!
//! 1. A backlog of BENCH_EVENTS (100 000) events of 200 bytes over 300 and over 1 000
//!    aggregates, drained by 1, 2 and 3 relays started together (each with its own pool,
//!    ownership session and backend client, in this process, as they would share the machine
//!    as processes); then again by relays already running and settled on their shares when
//!    the backlog is committed.
//! 2. One aggregate holding BENCH_HOT (20 000) events, drained by one relay in pipelined and in
//!    strict ordering.
//!
//!   cargo bench --bench scale                       # memory backend
//!   BENCH_BACKEND=nats cargo bench --bench scale    # JetStream at BENCH_NATS_URL
//!   BENCH_BACKEND=kafka cargo bench --bench scale   # Kafka at BENCH_KAFKA_BROKERS
//!   BENCH_BACKEND=pulsar cargo bench --bench scale  # Pulsar at BENCH_PULSAR_URL
//!   BENCH_ORDERING=pipelined BENCH_WINDOW=1024       # the many-aggregate drains pipelined
//!   BENCH_ONLY_HOT=1                                 # only the one-aggregate drains
//!   BENCH_AGGREGATES=300 BENCH_RELAYS=1,3            # some shapes and relay counts only
//!   BENCH_ONLY_SETTLED=1                             # only the drains of settled relays
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
use outbox_relay::relay::Stats;
use std::sync::atomic::Ordering;
use std::sync::Arc;
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

/// Starts `relays` relays at once (each with its own pool, ownership session and client), until
/// `stop`: their stats and their tasks.
async fn start(
    cfg: &Config,
    backend: &str,
    relays: usize,
    stop: &CancellationToken,
) -> Vec<(Arc<Stats>, tokio::task::JoinHandle<()>)> {
    let mut started = Vec::new();
    for i in 0..relays {
        let mut cfg = cfg.clone();
        cfg.relay.instance_id = Some(format!("bench-{i}"));
        let relay = common::relay(&cfg, backend, publisher(backend, &cfg).await)
            .await
            .with_monitor(cfg.monitor.clone(), format!("bench-{i}"));
        let stop = stop.clone();
        started.push((
            relay.stats(),
            tokio::spawn(async move { relay.run(stop).await.unwrap() }),
        ));
    }
    started
}

/// Starts `relays` relays at once on the filled outbox and times the drain (from the start to
/// no pending row left).
async fn drain(db: &BenchDb, cfg: &Config, backend: &str, relays: usize) -> (f64, u64) {
    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let started = start(cfg, backend, relays, &stop).await;
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
    for (stats, task) in started {
        task.await.unwrap();
        deferred += stats.deferred.load(Ordering::Relaxed);
    }
    (secs, deferred)
}

/// As `drain`, with the relays already running and settled on their shares when the backlog
/// arrives (one INSERT of `events` rows, committed at once): the steady state of relays
/// run for availability, without the joining and hand-over of partitions that relays
/// started together on a backlog go through first. Timed from the commit; also returns the
/// CPU seconds the whole machine spent meanwhile, and per event the microseconds of each of
/// `SPLIT`.
async fn drain_settled(
    db: &BenchDb,
    cfg: &Config,
    backend: &str,
    relays: usize,
    events: u64,
    aggregates: u64,
) -> (f64, f64, Vec<f64>) {
    let stop = CancellationToken::new();
    let started = start(cfg, backend, relays, &stop).await;
    let owned = |s: &Arc<Stats>| s.owned_partitions.load(Ordering::Relaxed);
    // Settled: the shares are the targets' sizes (in some order) and stay so for two
    // rebalance intervals, so no hand-over falls inside the timed drain.
    let mut want: Vec<u64> = (0..relays)
        .map(|i| outbox_relay::internals::partitions_of_relay(i, relays).len() as u64)
        .collect();
    want.sort_unstable();
    let t = Instant::now();
    let mut since: Option<Instant> = None;
    loop {
        let mut have: Vec<u64> = started.iter().map(|(s, _)| owned(s)).collect();
        have.sort_unstable();
        since = if have == want {
            since.or(Some(Instant::now()))
        } else {
            None
        };
        if since.is_some_and(|s| s.elapsed() >= 2 * cfg.relay.rebalance_interval.0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "relays did not settle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query(&format!(
        "INSERT INTO {} (event_id, topic, aggregate_id, event_type, payload) \
         SELECT gen_random_uuid(), 'bench.events', 'agg-' || (g % $2), 'BenchEvent', \
                convert_to(rpad(g::text, 200, 'x'), 'UTF8') \
         FROM generate_series(1, $1::bigint) g",
        db.names.qualified()
    ))
    .bind(events as i64)
    .bind(aggregates as i64)
    .execute(&db.pool)
    .await
    .expect("fill");
    let t0 = Instant::now();
    let m0 = common::machine_cpu_seconds();
    let p0 = common::cpu_by_command(&SPLIT);
    while pending(db).await > 0 {
        assert!(t0.elapsed() < Duration::from_secs(600), "drain stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let machine = common::machine_cpu_seconds() - m0;
    let split: Vec<f64> = common::cpu_by_command(&SPLIT)
        .iter()
        .zip(&p0)
        .map(|(a, b)| (a - b) / events as f64 * 1e6)
        .collect();
    stop.cancel();
    for (_, task) in started {
        task.await.unwrap();
    }
    (secs, machine, split)
}

/// Whose CPU the settled drains report per event: the relays (this process), Postgres, and
/// the brokers of the benchmarks.
const SPLIT: [&str; 5] = ["scale-", "postgres", "tansu", "pulsar-lite", "nats-server"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outbox_relay::tune_allocator();
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
    let shapes = if only_hot {
        vec![]
    } else if bench {
        common::sizes("BENCH_AGGREGATES", "300,1000")
    } else {
        vec![300, 1000]
    };
    let counts = if bench {
        common::sizes("BENCH_RELAYS", "1,2,3")
    } else {
        vec![1, 2, 3]
    };
    let together = std::env::var("BENCH_ONLY_SETTLED").is_err();
    for &aggregates in &shapes {
        let mut line = format!("{aggregates:>5} aggregates:");
        for &relays in counts.iter().filter(|_| together) {
            let relays = relays as usize;
            db.fill(0, events, aggregates).await;
            let (secs, deferred) = drain(&db, &cfg, &backend, relays).await;
            line.push_str(&format!(
                " {relays} relay(s) {:>7.0} ev/s (deferred {deferred}) |",
                events as f64 / secs
            ));
        }
        if together {
            println!("{line}");
        }
        let mut line = format!("{aggregates:>5} aggregates, relays settled first:");
        for &relays in &counts {
            let relays = relays as usize;
            let (secs, machine, split) =
                drain_settled(&db, &cfg, &backend, relays, events, aggregates).await;
            line.push_str(&format!(
                " {relays} relay(s) {:>7.0} ev/s, machine {:.1} us/ev (relays {:.1}, \
                 postgres {:.1}, broker {:.1}) |",
                events as f64 / secs,
                machine / events as f64 * 1e6,
                split[0],
                split[1],
                split[2] + split[3] + split[4]
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
