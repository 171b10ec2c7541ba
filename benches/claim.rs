//! Claim cost against table size: the same claim (1000 rows, then rolled back, so every round
//! takes the same rows) timed with 10 thousand, 1 million and 10 million pending rows in the
//! table. The claim walks a partial index and stops after its batch, so the figures should not
//! grow with the table.
//!
//! Beside it, the operators' queries at each size: `status` counts the whole backlog (one
//! index-only scan of the claim index, so it grows with the backlog, not with the table), and
//! listing failed events (none here) stays on the failed index whatever the backlog.
//!
//!   cargo bench --bench claim                            # 10k, 1M, 10M rows
//!   BENCH_CLAIM_SIZES=10000,1000000 cargo bench --bench claim
//!
//! Under `cargo test` it runs a 2 000-row smoke pass.

mod common;

use common::{percentile_ms, BenchDb};
use outbox_relay::store::ops::{Filter, Target};
use outbox_relay::store::{Session, Store};
use std::time::Instant;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outbox_relay::tune_allocator();
    let sizes = common::sizes("BENCH_CLAIM_SIZES", "10000,1000000,10000000");
    let rounds = if common::is_bench() { 300 } else { 5 };
    let db = BenchDb::open("bench_claim", 2).await;
    let store = Store::with_pool(db.pool.clone(), db.names.clone());
    let database = outbox_relay::config::DatabaseConfig {
        url: outbox_relay::config::Secret::new(common::url()),
        schema: db.names.schema.clone(),
        table: db.names.table.clone(),
        max_connections: 2,
        ..Default::default()
    };
    let operator = Store::connect(
        &database,
        &Session {
            application_name: "bench operator".into(),
            idle_in_transaction_timeout: None,
            operator: true,
        },
    )
    .await
    .unwrap();
    println!("claim benchmark: 1000-row claim + rollback, {rounds} rounds per size");
    let mut have = 0;
    for n in sizes {
        db.fill(have, n, 100_000).await;
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
            percentile_ms(&times, 0.5),
            percentile_ms(&times, 0.9),
            percentile_ms(&times, 0.99),
        );
        let mut status = Vec::new();
        let mut listing = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            let s = operator.status().await.unwrap();
            status.push(t0.elapsed());
            assert_eq!(s.totals.pending as u64, n);
            let t0 = Instant::now();
            let failed = operator
                .list(Target::Failed, &Filter::default(), 100)
                .await
                .unwrap();
            listing.push(t0.elapsed());
            assert!(failed.is_empty());
        }
        status.sort();
        listing.sort();
        println!(
            "{n:>9} pending rows: status p50 {:>8.1} ms   failed list p50 {:>6.2} ms",
            percentile_ms(&status, 0.5),
            percentile_ms(&listing, 0.5),
        );
    }
    db.drop().await;
}
