//! What the benchmarks share: the database, a schema of their own, filling it with a backlog,
//! a relay with one catch-all backend, and percentiles.
#![allow(dead_code)]

use outbox_relay::config::{Config, Dur, RouteConfig, Secret};
use outbox_relay::publisher::Publisher;
use outbox_relay::relay::{Backend, Relay};
use outbox_relay::store::{migrate, Names, Store};
use outbox_relay::wiring::session;
use std::sync::Arc;
use std::time::{Duration, Instant};

// As in the binary (src/main.rs), so the benchmarks measure what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub fn url() -> String {
    std::env::var("BENCH_DATABASE_URL")
        .or_else(|_| std::env::var("TEST_DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `cargo bench` passes `--bench`; under `cargo test` a benchmark runs a small smoke pass.
pub fn is_bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Comma-separated sizes from `var` (or `default`) under `cargo bench`; 2 000 under `cargo test`.
pub fn sizes(var: &str, default: &str) -> Vec<u64> {
    if !is_bench() {
        return vec![2_000];
    }
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{var}: comma-separated numbers"))
        })
        .collect()
}

/// A migrated outbox in a schema of the benchmark's own, dropped by [`BenchDb::drop`].
pub struct BenchDb {
    pub pool: sqlx::PgPool,
    pub names: Names,
}

impl BenchDb {
    pub async fn open(prefix: &str, connections: u32) -> BenchDb {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections)
            .connect(&url())
            .await
            .expect("connect to Postgres");
        let names = Names::new(format!("{prefix}_{}", std::process::id()), "outbox");
        migrate::run(&pool, &names).await.unwrap();
        BenchDb { pool, names }
    }

    /// The default relay settings on this outbox, without the summary line.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.database.url = Secret::new(url());
        c.database.schema = self.names.schema.clone();
        c.relay.summary_interval = Dur::secs(3600);
        c.apply_defaults();
        c
    }

    /// Inserts pending rows numbered `from..to` (200-byte payloads, `aggregates` aggregates)
    /// in chunks, then VACUUM ANALYZE, as a backlog that has settled looks.
    pub async fn fill(&self, from: u64, to: u64, aggregates: u64) {
        let t = self.names.qualified();
        let mut at = from;
        while at < to {
            let m = (to - at).min(100_000);
            sqlx::query(&format!(
                "INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload) \
                 SELECT gen_random_uuid(), 'bench.events', 'agg-' || (g % $3), 'BenchEvent', \
                        convert_to(rpad(g::text, 200, 'x'), 'UTF8') \
                 FROM generate_series($1::bigint, $2::bigint) g"
            ))
            .bind(at as i64)
            .bind((at + m - 1) as i64)
            .bind(aggregates as i64)
            .execute(&self.pool)
            .await
            .expect("fill");
            at += m;
        }
        sqlx::raw_sql(&format!("VACUUM ANALYZE {t}"))
            .execute(&self.pool)
            .await
            .expect("vacuum");
    }

    /// Waits (at most 10 s) until a relay listens on this outbox's channel.
    pub async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listen = format!("LISTEN \"{}\"", self.names.channel());
        loop {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query = $1")
                    .bind(&listen)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            if n > 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the relay never started listening"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn drop(self) {
        sqlx::raw_sql(&format!("DROP SCHEMA {} CASCADE", self.names.schema))
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

/// A relay with one backend taking every topic.
pub async fn relay(cfg: &Config, name: &str, publisher: Arc<dyn Publisher>) -> Relay {
    let store = Store::connect(&cfg.database, &session(cfg)).await.unwrap();
    Relay::new(
        store,
        vec![Backend {
            name: name.into(),
            publisher,
        }],
        &[RouteConfig {
            topic: "*".into(),
            backend: name.into(),
            format: Default::default(),
        }],
        cfg.relay.clone(),
    )
}

/// The `p` percentile (0 to 1) of sorted durations, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

/// CPU seconds the whole machine spent (all processes: the relay, Postgres, the broker), from
/// /proc/stat, so the relay and the floor loop can be compared per event.
pub fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system (idle iowait excluded) irq softirq steal
    let busy: f64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| f.get(*i))
        .sum();
    busy / 100.0
}

/// CPU seconds spent so far by the processes whose command name starts with each of `names`
/// (e.g. "postgres", "tansu"), from /proc, with their reaped children's (a Postgres backend
/// that ends between two samples moves into the postmaster's count, so the difference stays
/// right). Processes of another PID namespace (a broker in a container) are not seen.
#[allow(dead_code)] // the scale benchmark's split of the machine's CPU
pub fn cpu_by_command(names: &[&str]) -> Vec<f64> {
    let mut out = vec![0.0; names.len()];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let Some(i) = names.iter().position(|n| comm.starts_with(n)) else {
            continue;
        };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime, stime, cutime, cstime (fields 14-17 of stat).
        out[i] += (ticks(11) + ticks(12) + ticks(13) + ticks(14)) / 100.0;
    }
    out
}
