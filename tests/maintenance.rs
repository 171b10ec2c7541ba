//! Keeping the table small: published rows kept for a retention and pruned in batches, and the
//! table's autovacuum settings holding the table and its indexes at a steady size through many
//! fill-and-drain cycles.

mod common;

use common::{interleaved, spawn, wait_for, watchdog, PrivatePostgres, TestDb};
use outbox_relay::config::Dur;
use outbox_relay::publisher::memory::MemoryPublisher;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn published_rows_are_kept_for_the_retention_then_pruned() {
    let db = TestDb::new().await;
    let mut cfg = db.config();
    cfg.relay.published_retention = Dur::secs(2);
    cfg.relay.prune_interval = Dur::ms(100);
    cfg.relay.prune_batch = 7;
    let mem = MemoryPublisher::new();
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let metrics = relay.metrics();
    let (h, stop) = spawn(relay);
    db.enqueue(&interleaved(5, 10, 0)).await;
    wait_for(DEADLINE, "50 rows kept as published", || async {
        db.count("status = 'published' AND published_at IS NOT NULL")
            .await
            == 50
    })
    .await;
    assert_eq!(mem.log().acked().len(), 50);
    // Kept, not claimed again: nothing pending, nothing published twice.
    assert_eq!(db.count("status <> 'published'").await, 0);
    // The counter is added once the pruning pass ends, a moment after its last DELETE commits.
    wait_for(
        DEADLINE,
        "the kept rows pruned after 2 s, and counted",
        || async { db.total().await == 0 && metrics.pruned.get() >= 50 },
    )
    .await;
    assert_eq!(metrics.pruned.get(), 50);
    assert_eq!(mem.log().acked().len(), 50, "pruning publishes nothing");
    stop.cancel();
    h.await.unwrap();
    db.drop_schema().await;
}

/// Many cycles of filling the outbox and draining it, at full speed, with autovacuum waking
/// every second (its default is a minute, which would make this test slow, not different): the
/// table and its indexes stop growing once vacuum keeps up, instead of growing with every
/// cycle's dead rows.
#[tokio::test]
async fn the_table_and_its_indexes_stay_at_a_steady_size_over_many_cycles() {
    let _watchdog = watchdog(
        "the_table_and_its_indexes_stay_at_a_steady_size_over_many_cycles",
        Duration::from_secs(600),
    );
    let pg = PrivatePostgres::start_with(&[("autovacuum_naptime", "1")]);
    let db = TestDb::on(&pg.url()).await;
    let cfg = db.config();
    let relay = db.relay(&cfg, Arc::new(MemoryPublisher::new())).await;
    let (h, stop) = spawn(relay);
    let size = || async {
        let t = db.names.qualified();
        sqlx::query_scalar::<_, i64>(&format!("SELECT pg_total_relation_size('{t}')"))
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let vacuums = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT autovacuum_count FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'outbox'",
        )
        .bind(db.schema())
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    // At least 40 cycles, and on until autovacuum has run 5 times: a faster relay finishes 40
    // cycles in fewer of autovacuum's one-second naps, and the claim is about the table once
    // vacuum keeps up, not about how many naps 40 cycles take.
    const CYCLES: usize = 40;
    const MAX_CYCLES: usize = 200;
    const PER_CYCLE: usize = 5_000;
    let mut sizes = Vec::with_capacity(CYCLES);
    let mut cycle = 0;
    while cycle < CYCLES || (cycle < MAX_CYCLES && vacuums().await < 5) {
        let events = interleaved(500, PER_CYCLE / 500, cycle * PER_CYCLE);
        for chunk in events.chunks(1000) {
            db.enqueue(chunk).await;
        }
        wait_for(DEADLINE, "the cycle drained", || async {
            db.total().await == 0
        })
        .await;
        sizes.push(size().await);
        cycle += 1;
    }
    stop.cancel();
    h.await.unwrap();
    let vacuums = vacuums().await;
    let cycles = sizes.len();
    let mb = |b: i64| b as f64 / 1e6;
    let early = *sizes[..cycles / 2].iter().max().unwrap();
    let late = *sizes[cycles / 2..].iter().max().unwrap();
    eprintln!(
        "sizes per cycle (MB): {:?}; autovacuum runs: {vacuums}",
        sizes
            .iter()
            .map(|&s| (mb(s) * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    // 200k rows or more went through; without vacuum the heap alone would hold them all
    // (~60 MB).
    assert!(
        vacuums >= 5,
        "autovacuum ran {vacuums} times in {cycles} cycles"
    );
    assert!(
        late as f64 <= early as f64 * 1.5,
        "the second half of the cycles grew the table and indexes from {:.1} MB to {:.1} MB",
        mb(early),
        mb(late)
    );
    db.drop_schema().await;
}
