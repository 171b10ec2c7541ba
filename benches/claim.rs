//! Claim cost against table size: the same claim (1000 rows, then rolled back, so every round
//! takes the same rows) timed with 10 thousand, 1 million and 10 million pending rows in the
//! table. The claim walks a partial index and stops after its batch, so the figures should not
//! grow with the table.
//!
//!   cargo bench --bench claim                            # 10k, 1M, 10M rows
//!   BENCH_CLAIM_SIZES=10000,1000000 cargo bench --bench claim
//!
//! Under `cargo test` it runs a 2 000-row smoke pass.

use outbox_relay::store::{migrate, Names, Store};
use std::time::{Duration, Instant};

fn url() -> String {
    std::env::var("BENCH_DATABASE_URL")
        .or_else(|_| std::env::var("TEST_DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn grow_to(pool: &sqlx::PgPool, names: &Names, from: u64, to: u64) {
    let t = names.qualified();
    let mut at = from;
    while at < to {
        let m = (to - at).min(500_000);
        sqlx::query(&format!(
            "INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'bench.events', 'agg-' || (g % 100000), 'BenchEvent', \
                    convert_to(rpad(g::text, 200, 'x'), 'UTF8') \
             FROM generate_series($1::bigint, $2::bigint) g"
        ))
        .bind(at as i64)
        .bind((at + m - 1) as i64)
        .execute(pool)
        .await
        .expect("fill");
        at += m;
    }
    sqlx::raw_sql(&format!("VACUUM ANALYZE {t}"))
        .execute(pool)
        .await
        .expect("vacuum");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<u64> = if bench {
        std::env::var("BENCH_CLAIM_SIZES")
            .unwrap_or_else(|_| "10000,1000000,10000000".into())
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("BENCH_CLAIM_SIZES: comma-separated numbers")
            })
            .collect()
    } else {
        vec![2_000]
    };
    let rounds = if bench { 300 } else { 5 };
    let schema = format!("bench_claim_{}", std::process::id());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url())
        .await
        .expect("connect to Postgres");
    let names = Names::new(schema.clone(), "outbox");
    migrate::run(&pool, &names).await.unwrap();
    let store = Store::with_pool(pool.clone(), names.clone());
    println!("claim benchmark: 1000-row claim + rollback, {rounds} rounds per size");
    let mut have = 0;
    for n in sizes {
        grow_to(&pool, &names, have, n).await;
        have = n;
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t0 = Instant::now();
            let (tx, rows) = store.claim(1000).await.unwrap();
            times.push(t0.elapsed());
            assert_eq!(rows.len() as u64, n.min(1000));
            tx.rollback().await.unwrap();
        }
        times.sort();
        println!(
            "{n:>9} pending rows: claim of 1000 p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms",
            percentile(&times, 0.5).as_secs_f64() * 1000.0,
            percentile(&times, 0.9).as_secs_f64() * 1000.0,
            percentile(&times, 0.99).as_secs_f64() * 1000.0,
        );
    }
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
