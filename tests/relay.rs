//! The pipeline's guarantees, against the real Postgres: delivery, validation, retries,
//! ordering (with retries and two relays), isolation of a failing aggregate, wake-ups,
//! shutdown, and the claim's plan.

mod common;

use common::{interleaved, route, sequence, spawn, wait_for, TestDb};
use outbox_relay::config::Dur;
use outbox_relay::publisher::memory::{MemoryLog, MemoryPublisher, Record, RecordKind, Verdict};
use outbox_relay::publisher::PublishError;
use outbox_relay::store::NewEvent;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn seq_of(r: &Record) -> (String, i64) {
    let v: serde_json::Value = serde_json::from_slice(&r.event.payload).unwrap();
    (
        v["agg"].as_str().unwrap().to_string(),
        v["seq"].as_i64().unwrap(),
    )
}

/// The ordering invariant over a shared log: an event is never handed over before the
/// previous event of its aggregate was acknowledged as published.
fn assert_handed_only_after_predecessor_acked(records: &[Record]) {
    let mut acked_at: HashMap<(String, i64), u64> = HashMap::new();
    for r in records {
        if r.kind == RecordKind::Acked {
            acked_at.entry(seq_of(r)).or_insert(r.seq);
        }
    }
    for r in records.iter().filter(|r| r.kind == RecordKind::Handed) {
        let (agg, seq) = seq_of(r);
        if seq == 0 {
            continue;
        }
        let prev = acked_at.get(&(agg.clone(), seq - 1)).unwrap_or_else(|| {
            panic!(
                "{agg}#{seq} handed but {agg}#{} never acknowledged",
                seq - 1
            )
        });
        assert!(
            *prev < r.seq,
            "{agg}#{seq} handed (log seq {}) before {agg}#{} was acknowledged (log seq {prev})",
            r.seq,
            seq - 1
        );
    }
}

/// Runs two relays on one outbox, writes `events` once both own a share of the partitions
/// (relays divide the aggregates; one that started alone would have taken them all until
/// its next look), drains the outbox, then stops both.
async fn drain_with_two_relays(
    db: &TestDb,
    cfg: &outbox_relay::config::Config,
    a: MemoryPublisher,
    b: MemoryPublisher,
    events: &[outbox_relay::store::NewEvent],
) {
    let mut cfg = cfg.clone();
    cfg.relay.rebalance_interval = outbox_relay::config::Dur::ms(100);
    let cfg = &cfg;
    let (ha, sa) = spawn(db.relay(cfg, Arc::new(a)).await);
    let (hb, sb) = spawn(db.relay(cfg, Arc::new(b)).await);
    wait_for(DEADLINE, "both relays own a share", || async {
        let owners: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT owner, count(*) FROM {}_partitions WHERE owner IS NOT NULL GROUP BY owner",
            db.names.qualified()
        ))
        .fetch_all(&db.pool)
        .await
        .unwrap();
        owners.len() == 2 && owners.iter().map(|o| o.1).sum::<i64>() == 256
    })
    .await;
    for chunk in events.chunks(1000) {
        db.enqueue(chunk).await;
    }
    wait_for(Duration::from_secs(120), "outbox empty", || async {
        db.total().await == 0
    })
    .await;
    sa.cancel();
    sb.cancel();
    ha.await.unwrap();
    hb.await.unwrap();
}

#[tokio::test]
async fn every_event_is_published_once_and_its_row_removed() {
    let db = TestDb::new().await;
    let sent = db.enqueue_interleaved(50, 40).await;
    let mem = MemoryPublisher::new();
    let relay = db.relay(&db.config(), Arc::new(mem.clone())).await;
    let stats = relay.stats();
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "outbox empty", || async { db.total().await == 0 }).await;
    stop.cancel();
    h.await.unwrap();
    let acked = mem.log().acked();
    assert_eq!(acked.len(), sent.len());
    let ids: HashSet<_> = acked.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), sent.len(), "no event twice");
    assert!(sent.iter().all(|e| ids.contains(&e.event_id)));
    assert_eq!(stats.published(), sent.len() as u64);
    assert_handed_only_after_predecessor_acked(&mem.log().records());
    db.drop_schema().await;
}

#[tokio::test]
async fn invalid_rows_are_failed_with_their_reason_and_the_rest_flows() {
    let db = TestDb::new().await;
    db.enqueue_interleaved(5, 4).await;
    // Producers writing plain SQL can write anything; the relay must name what is wrong.
    db.sql(
        "INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload) VALUES \
           ('00000000-0000-0000-0000-000000000001', 'orders.créé', 'bad1', 'T', 'x'), \
           ('00000000-0000-0000-0000-000000000002', 'orders.ok', '', 'T', 'x'), \
           ('00000000-0000-0000-0000-000000000004', 'orders.ok', 'bad4', 'T', repeat('x', 3000)::bytea), \
           ('00000000-0000-0000-0000-000000000005', 'billing.x', 'bad5', 'T', 'x'); \
         INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload, headers) VALUES \
           ('00000000-0000-0000-0000-000000000003', 'orders.ok', 'bad3', 'T', 'x', '{\"n\": 1}'); \
         INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload, event_version) VALUES \
           ('00000000-0000-0000-0000-000000000006', 'orders.ok', 'bad6', 'T', 'x', 0);",
    )
    .await;
    let mut cfg = db.config();
    cfg.relay.max_payload_bytes = 2048;
    let mem = MemoryPublisher::new();
    let relay = db
        .relay_with(
            &cfg,
            vec![("main", Arc::new(mem.clone()))],
            &[route("orders.*", "main")],
        )
        .await;
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "only failed rows left", || async {
        db.count("status = 'pending'").await == 0
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    assert_eq!(mem.log().acked().len(), 20);
    let reason = |n: u8| {
        let id = uuid::Uuid::from_u128(n as u128);
        let db = &db;
        async move {
            let (status, attempts, err) = db.row(id).await.expect("row kept");
            assert_eq!(status, "failed");
            assert_eq!(attempts, 0, "never attempted");
            err.unwrap()
        }
    };
    let e = reason(1).await;
    assert!(e.contains("'é'") && e.contains("position 10"), "{e}");
    assert!(reason(2).await.contains("aggregate_id"));
    let e = reason(3).await;
    assert!(
        e.contains("headers") && e.contains("\"n\"") && e.contains("number"),
        "{e}"
    );
    let e = reason(4).await;
    assert!(e.contains("3000") && e.contains("2048"), "{e}");
    let e = reason(5).await;
    assert!(e.contains("no route") && e.contains("billing.x"), "{e}");
    assert!(reason(6).await.contains("event_version"));
    db.drop_schema().await;
}

#[tokio::test]
async fn retryable_failures_back_off_and_then_succeed() {
    let db = TestDb::new().await;
    let sent = db.enqueue_interleaved(4, 5).await;
    let script = Arc::new(|_: &outbox_relay::envelope::Event, seen: u32| {
        if seen < 2 {
            Verdict::Fail(PublishError::retryable("broker busy"))
        } else {
            Verdict::Ack
        }
    });
    let mem = MemoryPublisher::new().with_script(script);
    let relay = db.relay(&db.config(), Arc::new(mem.clone())).await;
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "outbox empty", || async { db.total().await == 0 }).await;
    stop.cancel();
    let relay = h.await.unwrap();
    assert_eq!(mem.log().acked().len(), sent.len());
    assert_eq!(
        mem.log().handed_count(),
        sent.len() * 3,
        "two failures then success each"
    );
    assert!(
        relay
            .stats()
            .retried
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2 * sent.len() as u64
    );
    assert_handed_only_after_predecessor_acked(&mem.log().records());
    db.drop_schema().await;
}

#[tokio::test]
async fn retries_exhausted_mark_the_row_failed_with_the_last_error() {
    let db = TestDb::new().await;
    let e = NewEvent::new("orders.x", "a", "T", b"x".to_vec());
    db.enqueue(std::slice::from_ref(&e)).await;
    let mem = MemoryPublisher::new().with_script(Arc::new(|_, _| {
        Verdict::Fail(PublishError::retryable("leader not available"))
    }));
    let mut cfg = db.config();
    cfg.relay.max_attempts = 3;
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "row failed", || async {
        db.count("status = 'failed'").await == 1
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    let (_, attempts, err) = db.row(e.event_id).await.unwrap();
    assert_eq!(attempts, 3);
    let err = err.unwrap();
    assert!(
        err.contains("3 attempts") && err.contains("leader not available"),
        "{err}"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_permanent_error_fails_at_once_and_holds_its_aggregate_until_replayed() {
    let db = TestDb::new().await;
    let evs = sequence("a", 4);
    db.enqueue(&evs).await;
    let first = evs[0].event_id;
    let fail_first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = fail_first.clone();
    let mem = MemoryPublisher::new().with_script(Arc::new(move |e, _| {
        if e.event_id == first && flag.load(std::sync::atomic::Ordering::SeqCst) {
            Verdict::Fail(PublishError::permanent("message too large for the broker"))
        } else {
            Verdict::Ack
        }
    }));
    let relay = db.relay(&db.config(), Arc::new(mem.clone())).await;
    let store_names = db.names.clone();
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "first event failed", || async {
        db.count("status = 'failed'").await == 1
    })
    .await;
    // The rest of the aggregate is held behind it, not published out of order.
    wait_for(DEADLINE, "followers held", || async {
        db.count("status = 'pending' AND next_attempt_at > now() + interval '1 year'")
            .await
            == 3
    })
    .await;
    assert_eq!(mem.log().acked().len(), 0);
    let (_, attempts, err) = db.row(first).await.unwrap();
    assert_eq!(attempts, 1);
    assert!(err.unwrap().contains("too large"));
    // Replay it (the operator fixed the broker limit): everything flows, in order.
    fail_first.store(false, std::sync::atomic::Ordering::SeqCst);
    let store = outbox_relay::store::Store::with_pool(db.pool.clone(), store_names);
    assert_eq!(store.replay_failed(&[first]).await.unwrap(), 1);
    wait_for(DEADLINE, "outbox empty", || async { db.total().await == 0 }).await;
    stop.cancel();
    h.await.unwrap();
    let order: Vec<i64> = mem
        .log()
        .acked()
        .iter()
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(&e.payload).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(order, vec![0, 1, 2, 3]);
    db.drop_schema().await;
}

/// Random delays and random retryable failures, two relays on one outbox sharing one log:
/// an event is never handed over before its predecessor was acknowledged.
#[tokio::test]
async fn order_holds_per_aggregate_under_retries_with_two_relays() {
    let db = TestDb::new().await;
    let sent = common::interleaved(30, 30, 0);
    let log = MemoryLog::new();
    let script = || {
        Arc::new(|_: &outbox_relay::envelope::Event, _seen: u32| {
            let mut rng = rand::thread_rng();
            if rng.gen_ratio(1, 10) {
                Verdict::FailAfter(
                    Duration::from_millis(rng.gen_range(0..5)),
                    PublishError::retryable("injected"),
                )
            } else {
                Verdict::AckAfter(Duration::from_millis(rng.gen_range(0..5)))
            }
        })
    };
    let mut cfg = db.config();
    cfg.relay.batch_size = 100;
    let a = MemoryPublisher::shared(log.clone(), "relay-a").with_script(script());
    let b = MemoryPublisher::shared(log.clone(), "relay-b").with_script(script());
    drain_with_two_relays(&db, &cfg, a, b, &sent).await;
    let records = log.records();
    let acked: HashSet<_> = log.acked().iter().map(|e| e.event_id).collect();
    assert_eq!(acked.len(), sent.len());
    let relays: HashSet<_> = records.iter().map(|r| r.relay.clone()).collect();
    assert_eq!(relays.len(), 2, "both relays took part");
    assert_handed_only_after_predecessor_acked(&records);
    db.drop_schema().await;
}

#[tokio::test]
async fn two_relays_never_hand_the_same_event_over_twice() {
    let db = TestDb::new().await;
    let sent = common::interleaved(200, 20, 0);
    let log = MemoryLog::new();
    let mut cfg = db.config();
    cfg.relay.batch_size = 50;
    let slow = || {
        Arc::new(|_: &outbox_relay::envelope::Event, _| Verdict::AckAfter(Duration::from_millis(1)))
    };
    let a = MemoryPublisher::shared(log.clone(), "a").with_script(slow());
    let b = MemoryPublisher::shared(log.clone(), "b").with_script(slow());
    drain_with_two_relays(&db, &cfg, a, b, &sent).await;
    let mut handed: HashMap<uuid::Uuid, u32> = HashMap::new();
    let mut by_relay: HashMap<String, usize> = HashMap::new();
    for r in log
        .records()
        .iter()
        .filter(|r| r.kind == RecordKind::Handed)
    {
        *handed.entry(r.event.event_id).or_default() += 1;
        *by_relay.entry(r.relay.clone()).or_default() += 1;
    }
    assert_eq!(handed.len(), sent.len());
    let twice: Vec<_> = handed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handed more than once: {twice:?}");
    assert_eq!(by_relay.len(), 2, "both relays took part: {by_relay:?}");
    db.drop_schema().await;
}

#[tokio::test]
async fn a_failing_aggregate_does_not_delay_the_others() {
    let db = TestDb::new().await;
    // The stuck aggregate's events come first in the outbox.
    let stuck = sequence("stuck", 50);
    db.enqueue(&stuck).await;
    let others = db.enqueue_interleaved(100, 20).await;
    let mem = MemoryPublisher::new().with_script(Arc::new(|e, _| {
        if e.aggregate_id == "stuck" {
            Verdict::Fail(PublishError::retryable("partition offline"))
        } else {
            Verdict::Ack
        }
    }));
    let mut cfg = db.config();
    cfg.relay.backoff_initial = Dur::secs(30);
    cfg.relay.backoff_max = Dur::secs(60);
    cfg.relay.batch_size = 100;
    let (h, stop) = spawn(db.relay(&cfg, Arc::new(mem.clone())).await);
    wait_for(DEADLINE, "every other aggregate published", || async {
        db.count("aggregate_id <> 'stuck'").await == 0
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    assert_eq!(mem.log().acked().len(), others.len());
    // Only the stuck aggregate's head was ever tried; the rest of it waits behind it.
    let stuck_handed: HashSet<_> = mem
        .log()
        .records()
        .iter()
        .filter(|r| r.kind == RecordKind::Handed && r.event.aggregate_id == "stuck")
        .map(|r| r.event.event_id)
        .collect();
    assert_eq!(stuck_handed, HashSet::from([stuck[0].event_id]));
    assert_eq!(
        db.count("aggregate_id = 'stuck' AND status = 'pending'")
            .await,
        50
    );
    let (_, attempts, err) = db.row(stuck[0].event_id).await.unwrap();
    assert_eq!(attempts, 1);
    assert_eq!(err.as_deref(), Some("partition offline"));
    db.drop_schema().await;
}

#[tokio::test]
async fn a_commit_wakes_the_relay_without_waiting_for_the_poll() {
    commits_wake_the_relay(Dur::ms(0)).await;
}

/// With a debounce the claim waits after the notification (the loop does not sleep), and
/// still comes.
#[tokio::test]
async fn a_commit_wakes_the_relay_after_the_debounce() {
    commits_wake_the_relay(Dur::ms(250)).await;
}

async fn commits_wake_the_relay(debounce: Dur) {
    let db = TestDb::new().await;
    let mut cfg = db.config();
    cfg.relay.poll_interval = Dur::secs(600);
    cfg.relay.debounce = debounce;
    let mem = MemoryPublisher::new();
    let (h, stop) = spawn(db.relay(&cfg, Arc::new(mem.clone())).await);
    // Let the relay take its start-up claim and start listening.
    wait_for(DEADLINE, "listening", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
            > 0
    })
    .await;
    for round in 0..3 {
        db.enqueue(&[NewEvent::new(
            "orders.x",
            format!("a{round}"),
            "T",
            b"{}".to_vec(),
        )])
        .await;
        // Far inside the 600 s poll interval: only the notification can have woken it.
        assert!(
            mem.log()
                .wait_until(Duration::from_secs(10), |r| r
                    .iter()
                    .filter(|r| r.kind == RecordKind::Acked)
                    .count()
                    > round)
                .await,
            "event {round} not published after its commit"
        );
    }
    stop.cancel();
    h.await.unwrap();
    db.drop_schema().await;
}

#[tokio::test]
async fn shutdown_waits_for_results_in_flight_and_records_them() {
    let db = TestDb::new().await;
    db.enqueue_interleaved(100, 1).await;
    let mem = MemoryPublisher::new().with_script(Arc::new(|_, _| {
        Verdict::AckAfter(Duration::from_millis(300))
    }));
    let (h, stop) = spawn(db.relay(&db.config(), Arc::new(mem.clone())).await);
    wait_for(DEADLINE, "events handed over", || async {
        mem.log().handed_count() == 100
    })
    .await;
    assert_eq!(mem.log().acked().len(), 0, "still in flight");
    stop.cancel();
    h.await.unwrap();
    // Every hand-off got its result during the shutdown, and every result was recorded.
    assert_eq!(mem.log().acked().len(), 100);
    assert_eq!(db.total().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn shutdown_timeout_releases_unanswered_events_unchanged() {
    let db = TestDb::new().await;
    db.enqueue_interleaved(10, 1).await;
    let mem = MemoryPublisher::new().with_script(Arc::new(|_, _| {
        Verdict::AckAfter(Duration::from_secs(3600))
    }));
    let mut cfg = db.config();
    cfg.relay.shutdown_timeout = Dur::ms(200);
    let (h, stop) = spawn(db.relay(&cfg, Arc::new(mem.clone())).await);
    wait_for(DEADLINE, "events handed over", || async {
        mem.log().handed_count() == 10
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .expect("stops within the shutdown timeout")
        .unwrap();
    assert_eq!(
        db.count("status = 'pending' AND attempts = 0 AND next_attempt_at <= now()")
            .await,
        10
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn run_once_claims_publishes_and_marks_one_batch() {
    let db = TestDb::new().await;
    db.enqueue_interleaved(30, 1).await;
    let mut cfg = db.config();
    cfg.relay.batch_size = 20;
    let mem = MemoryPublisher::new();
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let t = relay.run_once().await.unwrap();
    assert_eq!(t.published, 20);
    assert_eq!(db.total().await, 10);
    let t = relay.run_once().await.unwrap();
    assert_eq!(t.published, 10);
    assert_eq!(relay.run_once().await.unwrap().published, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn enqueue_is_transactional_and_keeps_the_given_order() {
    let db = TestDb::new().await;
    let evs: Vec<NewEvent> = (0..10)
        .map(|i| NewEvent::new("orders.x", "a", format!("E{i}"), vec![i as u8]))
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    db.outbox.enqueue(&mut tx, &evs).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        db.total().await,
        0,
        "rolled back with the business transaction"
    );
    db.enqueue(&evs).await;
    let types: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT event_type FROM {} ORDER BY id",
        db.names.qualified()
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(types, (0..10).map(|i| format!("E{i}")).collect::<Vec<_>>());
    let err = NewEvent::new("bad topic", "a", "T", vec![]);
    let mut tx = db.pool.begin().await.unwrap();
    let e = db
        .outbox
        .enqueue(&mut tx, &[err])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("position 4"), "{e}");
    tx.rollback().await.unwrap();
    db.drop_schema().await;
}

#[tokio::test]
async fn the_sql_enqueue_function_writes_a_json_event() {
    let db = TestDb::new().await;
    let id: uuid::Uuid = sqlx::query_scalar(&format!(
        "SELECT {}.outbox_enqueue('orders.created', 'order-42', 'OrderCreated', '{{\"total\": 10}}')",
        db.schema()
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mem = MemoryPublisher::new();
    let relay = db.relay(&db.config(), Arc::new(mem.clone())).await;
    relay.run_once().await.unwrap();
    let e = &mem.log().acked()[0];
    assert_eq!(e.event_id, id);
    assert_eq!(e.aggregate_id, "order-42");
    assert_eq!(e.content_type.as_deref(), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
    assert_eq!(v["total"], 10);
    db.drop_schema().await;
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let db = TestDb::new().await;
    let names = outbox_relay::store::Names::new(db.schema(), "second");
    let (a, b) = tokio::join!(
        outbox_relay::store::migrate::run(&db.pool, &names),
        outbox_relay::store::migrate::run(&db.pool, &names)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let all = outbox_relay::store::migrate::MIGRATOR.iter().count();
    assert!(
        (a.len(), b.len()) == (all, 0) || (a.len(), b.len()) == (0, all),
        "one run applies all {all} migrations, the other none: {a:?} {b:?}"
    );
    assert!(outbox_relay::store::migrate::run(&db.pool, &names)
        .await
        .unwrap()
        .is_empty());
    outbox_relay::store::migrate::check(&db.pool, &names)
        .await
        .unwrap();
    let missing = outbox_relay::store::Names::new(db.schema(), "nope");
    let e = outbox_relay::store::migrate::check(&db.pool, &missing)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("outbox-relay migrate"), "{e}");
    db.drop_schema().await;
}

/// The claim stays on its partial index, and the predecessor probe on the aggregate index (its
/// gate on the waiting index), whatever the table holds and whatever the statistics say: here
/// they were taken on an empty table (as in the steady state) before a 30 000-row backlog
/// arrived.
#[tokio::test]
async fn the_claim_runs_on_the_partial_indexes_even_with_stale_statistics() {
    let db = TestDb::new().await;
    db.sql(
        "ANALYZE {t}; \
         INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload, status) \
         SELECT gen_random_uuid(), 'orders.x', 'a' || (g % 1000), 'T', '\\x00', \
                CASE WHEN g % 3 = 0 THEN 'published' ELSE 'pending' END \
         FROM generate_series(1, 30000) g;",
    )
    .await;
    let cfg = db.config();
    let store =
        outbox_relay::store::Store::connect(&cfg.database, &outbox_relay::wiring::session(&cfg))
            .await
            .unwrap();
    let nothing_but_indexes = |plan: &str| {
        assert!(
            !plan.contains("Seq Scan") && !plan.contains("Bitmap") && !plan.contains("Sort"),
            "{plan}"
        );
    };
    for with_cursor in [false, true] {
        let sql = if with_cursor {
            format!("EXPLAIN {}", store.claim_statement_after())
        } else {
            format!("EXPLAIN {}", store.claim_statement())
        };
        let mut q = sqlx::query_scalar::<_, String>(&sql)
            .bind(1000i64)
            .bind(1i64 << 20);
        if with_cursor {
            q = q
                .bind(chrono::Utc::now() - chrono::Duration::hours(1))
                .bind(0i64);
        }
        let plan = q.fetch_all(store.pool()).await.unwrap().join("\n");
        assert!(plan.contains("Index Scan using outbox_due_idx"), "{plan}");
        nothing_but_indexes(&plan);
    }
    // A relay owning a share of the partitions (one range, as after a rebalance to two
    // relays): the range is checked inside the claim index, no sort, no bitmap.
    let plan =
        sqlx::query_scalar::<_, String>(&format!("EXPLAIN {}", store.claim_share_statement()))
            .bind(1000i64)
            .bind(1i64 << 20)
            .bind((0i16..128).collect::<Vec<i16>>())
            .bind("relay-a")
            .bind(0i16)
            .bind(127i16)
            .bind(true)
            .fetch_all(store.pool())
            .await
            .unwrap()
            .join("\n");
    assert!(plan.contains("Index Scan using outbox_due_idx"), "{plan}");
    assert!(
        plan.contains("part >= "),
        "the range is an index condition: {plan}"
    );
    // Whether the waiting index holds anything at all: one look for the whole claim, on that
    // index (a scan of anything else would cost the claim the table).
    assert!(
        plan.contains("Index Only Scan using outbox_waiting_idx on outbox x"),
        "{plan}"
    );
    assert!(
        !plan.contains("outbox_aggregate_idx"),
        "no probe inside the claim: {plan}"
    );
    nothing_but_indexes(&plan);
    // The probe of the rows that need it: each claimed row by its key, then one backward probe
    // on the aggregate index behind a gate evaluated once per row, whose own look for rows
    // waiting in the aggregate is one descent of the small waiting index.
    let plan = sqlx::query_scalar::<_, String>(&format!("EXPLAIN {}", store.probe_statement()))
        .bind((1i64..=1000).collect::<Vec<i64>>())
        .bind(vec![false; 1000])
        .fetch_all(store.pool())
        .await
        .unwrap()
        .join("\n");
    assert!(plan.contains("outbox_pkey"), "{plan}");
    assert!(plan.contains("outbox_aggregate_idx"), "{plan}");
    assert!(plan.contains("One-Time Filter"), "{plan}");
    assert!(plan.contains("outbox_waiting_idx"), "{plan}");
    nothing_but_indexes(&plan);
    db.drop_schema().await;
}

#[tokio::test]
async fn publish_timeout_counts_as_a_retryable_failure() {
    let db = TestDb::new().await;
    let e = NewEvent::new("orders.x", "a", "T", b"x".to_vec());
    db.enqueue(std::slice::from_ref(&e)).await;
    let mem = MemoryPublisher::new().with_script(Arc::new(|_, seen| {
        if seen == 0 {
            Verdict::AckAfter(Duration::from_secs(3600))
        } else {
            Verdict::Ack
        }
    }));
    let mut cfg = db.config();
    cfg.relay.publish_timeout = Dur::ms(300);
    let (h, stop) = spawn(db.relay(&cfg, Arc::new(mem.clone())).await);
    wait_for(DEADLINE, "published on the second attempt", || async {
        db.total().await == 0
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    assert_eq!(mem.log().handed_count(), 2);
    db.drop_schema().await;
}

/// While the broker cannot be asked, the relay stops handing its backlog over and over: a
/// claim that reached the broker is followed by the next only after the retry backoff, and the
/// first success resumes full claims. Nothing fails, nothing is published out of order.
#[tokio::test]
async fn an_unreachable_broker_pauses_claiming_until_it_answers() {
    let db = TestDb::new().await;
    // Many aggregates: without the pause, every one of their heads would be handed (and
    // rewritten) within moments.
    let events = interleaved(1000, 2, 0);
    db.enqueue(&events).await;
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = down.clone();
    let mem = MemoryPublisher::new().with_script(Arc::new(move |_, _| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Verdict::Fail(PublishError::unavailable("not connected to the server"))
        } else {
            Verdict::Ack
        }
    }));
    let mut cfg = db.config();
    cfg.relay.batch_size = 50;
    cfg.relay.backoff_initial = Dur::ms(200);
    cfg.relay.backoff_max = Dur::secs(1);
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let stats = relay.stats();
    let (h, stop) = spawn(relay);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    wait_for(DEADLINE, "the outage noticed", || async {
        load(&stats.retried) >= 100
    })
    .await;
    let handed0 = mem.log().handed_count();
    let window = std::time::Instant::now();
    wait_for(DEADLINE, "two seconds of outage", || async {
        window.elapsed() >= Duration::from_secs(2)
    })
    .await;
    let handed = mem.log().handed_count() - handed0;
    // Probes at least 400 ms apart by then, each at most a batch: 2 s holds a few.
    assert!(
        handed <= 4 * 50,
        "{handed} hand-offs in 2 s of outage: claiming did not pause"
    );
    assert_eq!(
        db.count("status = 'failed'").await,
        0,
        "the outage failed events"
    );
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for(
        DEADLINE,
        "every event published once the broker answers",
        || async { db.total().await == 0 },
    )
    .await;
    stop.cancel();
    h.await.unwrap();
    assert_eq!(load(&stats.failed), 0);
    assert_eq!(mem.log().acked().len(), events.len());
    assert_handed_only_after_predecessor_acked(&mem.log().records());
    db.drop_schema().await;
}

/// A claim is bounded in bytes as well as rows: payloads over `relay.max_payload_bytes` are not
/// even fetched (the row fails naming its size), and a claim stops returning rows once their
/// payloads fill `relay.batch_max_bytes`; the rows it locked past that are released at commit
/// and taken by later claims, in order.
#[tokio::test]
async fn claims_are_bounded_in_bytes_and_oversized_payloads_are_never_fetched() {
    let db = TestDb::new().await;
    let mut events: Vec<NewEvent> = (0..12)
        .map(|i| {
            let agg = format!("a{}", i % 3);
            let mut e = common::numbered(&agg, i / 3);
            // Still the numbered event (the order check reads agg and seq), 300 KB large.
            e.payload = serde_json::to_vec(&serde_json::json!({
                "agg": agg, "seq": i / 3, "pad": "x".repeat(300 * 1024)
            }))
            .unwrap();
            e
        })
        .collect();
    let huge = NewEvent::new("orders.x", "h", "T", vec![b'y'; 3 * 1024 * 1024]);
    events.push(huge.clone());
    db.enqueue(&events).await;
    let mut cfg = db.config();
    cfg.relay.batch_max_bytes = 1024 * 1024;
    cfg.relay.max_payload_bytes = 1024 * 1024;
    // The store alone: 300 KB rows under a 1 MB budget come back four at a time (the fourth
    // starts under the budget), the rest of the batch stays locked until the claim ends.
    let store =
        outbox_relay::store::Store::connect(&cfg.database, &outbox_relay::wiring::session(&cfg))
            .await
            .unwrap()
            .bounded_in_bytes(cfg.relay.max_payload_bytes, cfg.relay.batch_max_bytes);
    let share = outbox_relay::store::Share {
        owner: "nobody".into(),
        parts: (0..outbox_relay::store::PARTITIONS).collect(),
    };
    sqlx::query(&format!(
        "UPDATE {}_partitions SET owner = 'nobody'",
        db.names.qualified()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let claim_front = |limit| store.claim_share(limit, outbox_relay::store::Walk::Front, &share);
    let claim = claim_front(100).await.unwrap();
    assert_eq!(claim.rows.len(), 4, "rows under a 1 MB budget");
    assert!(claim.cut, "the budget cut the claim");
    assert!(
        claim.next.is_none(),
        "a cut claim starts the next one from the front"
    );
    claim.tx.rollback().await.unwrap();
    // Four rows that all fit are not a cut claim, though the fourth ends past the budget.
    let claim = claim_front(4).await.unwrap();
    assert_eq!(claim.rows.len(), 4);
    assert!(!claim.cut, "nothing locked was left out");
    assert!(
        claim.rows.iter().all(|r| r.invalid.is_none()),
        "every row whole"
    );
    claim.tx.rollback().await.unwrap();
    // Having seen 300 KB rows, a claim of 100 asks Postgres for what the budget holds (four
    // rows), not for 100 rows of which it would drop 96 as they arrive: it comes back full at
    // that size, and says where the next one starts.
    let claim = claim_front(100).await.unwrap();
    assert_eq!(claim.rows.len(), 4);
    assert!(!claim.cut, "no row was sent past the budget");
    assert!(claim.next.is_some(), "full at the size it asked for");
    claim.tx.rollback().await.unwrap();
    sqlx::query(&format!(
        "UPDATE {}_partitions SET owner = NULL",
        db.names.qualified()
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // The relay: everything flows, in order; the oversized row fails with its size, unfetched.
    let mem = MemoryPublisher::new();
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "every small event published", || async {
        mem.log().acked().len() == 12
    })
    .await;
    wait_for(DEADLINE, "the oversized row failed", || async {
        db.count("status = 'failed'").await == 1
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    let (status, _, err) = db.row(huge.event_id).await.unwrap();
    assert_eq!(status, "failed");
    let err = err.unwrap();
    assert!(
        err.contains("field payload")
            && err.contains("3145728 bytes")
            && err.contains("relay.max_payload_bytes"),
        "{err}"
    );
    assert_handed_only_after_predecessor_acked(&mem.log().records());
    db.drop_schema().await;
}

/// A claim cut by its byte budget has read its statement to the end before it returns (rows
/// left unsent would keep the statement running through the publish, past the reach of the
/// idle-in-transaction timeout), probes on the same session, and the next claims ask Postgres
/// for as many rows as the budget holds at the sizes last seen: full claims, not cut ones.
#[tokio::test]
async fn a_claim_past_its_byte_budget_ends_its_statement_and_asks_for_what_fits() {
    let db = TestDb::new().await;
    let fill = |rows: u32, size: u32| {
        format!(
            "INSERT INTO {{t}} (event_id, topic, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'orders.x', 'a' || (g % 3), 'T', \
                    convert_to(repeat('x', {size}), 'UTF8') \
             FROM generate_series(0, {}) g ORDER BY g",
            rows - 1
        )
    };
    // 60 rows of 300 KB: 18 MB, more than the socket buffers hold.
    db.sql(&fill(60, 300 * 1024)).await;
    let mut cfg = db.config();
    cfg.relay.batch_max_bytes = 1024 * 1024;
    let store = || async {
        outbox_relay::store::Store::connect(&cfg.database, &outbox_relay::wiring::session(&cfg))
            .await
            .unwrap()
            .bounded_in_bytes(cfg.relay.max_payload_bytes, cfg.relay.batch_max_bytes)
    };
    let share = outbox_relay::store::Share {
        owner: "nobody".into(),
        parts: (0..outbox_relay::store::PARTITIONS).collect(),
    };
    db.sql("UPDATE {t}_partitions SET owner = 'nobody'").await;
    // Every row probed: the fourth row (a0's second) finds the first, in the same claim.
    let claim = store()
        .await
        .claim_share(100, outbox_relay::store::Walk::ProbeAll(None), &share)
        .await
        .unwrap();
    assert_eq!(claim.rows.len(), 4);
    assert!(claim.cut);
    assert_eq!(
        claim.rows[3].prev.as_ref().map(|p| p.id),
        Some(claim.rows[0].event.id),
        "probed after the cut, on the claim's own session"
    );
    claim.tx.rollback().await.unwrap();
    // No row needs a probe: all were written before a walk that began with a transaction
    // newer than theirs (read now, whatever else runs on the server), and nothing waits. The
    // claim statement is the claim's last, and has ended when the claim returns.
    let walk_began: i64 =
        sqlx::query_scalar("SELECT (pg_current_xact_id()::text::numeric % 4294967296)::bigint")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let store = store().await;
    // Any time before year 1 stands for the fresh rows' `-infinity` (see the claim's cursor).
    let before_year_one = chrono::NaiveDate::from_ymd_opt(-100, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let from_the_front = (before_year_one, 0);
    let claim = store
        .claim_share(
            100,
            outbox_relay::store::Walk::After(from_the_front, walk_began),
            &share,
        )
        .await
        .unwrap();
    assert_eq!((claim.rows.len(), claim.cut), (4, true));
    assert!(claim.rows.iter().all(|r| r.prev.is_none()), "no probe ran");
    let still_running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
           AND query LIKE '%FOR UPDATE SKIP LOCKED%' AND query LIKE '%' || $1 || '.%' \
           AND pid <> pg_backend_pid()",
    )
    .bind(db.schema())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        still_running, 0,
        "the claim statement ended before the claim returned"
    );
    claim.tx.rollback().await.unwrap();
    let claim_front = |limit| store.claim_share(limit, outbox_relay::store::Walk::Front, &share);
    // Rows of 100 KB after rows of 300 KB: the first claim asks for four (what the budget held
    // at 300 KB) and is full; the next asks for what holds at 100 KB: eleven, not cut.
    db.sql("DELETE FROM {t}").await;
    db.sql(&fill(60, 100 * 1024)).await;
    let claim = claim_front(100).await.unwrap();
    assert_eq!((claim.rows.len(), claim.cut), (4, false));
    assert!(claim.next.is_some(), "full at the size it asked for");
    claim.tx.rollback().await.unwrap();
    let claim = claim_front(100).await.unwrap();
    assert_eq!((claim.rows.len(), claim.cut), (11, false));
    assert!(claim.next.is_some());
    claim.tx.rollback().await.unwrap();
    // Small rows again: back to the batch size at once.
    db.sql("DELETE FROM {t}").await;
    db.sql(&fill(60, 200)).await;
    let claim = claim_front(100).await.unwrap();
    assert_eq!(claim.rows.len(), 11);
    claim.tx.rollback().await.unwrap();
    let claim = claim_front(100).await.unwrap();
    assert_eq!((claim.rows.len(), claim.cut), (60, false));
    claim.tx.rollback().await.unwrap();
    db.drop_schema().await;
}

/// An aggregate written one transaction after another by a producer whose first transaction
/// stayed open while the relay's claims walked far past its row (a long business
/// transaction): its second event, committed after the first, is claimed by a claim that
/// continues the walk, before any claim from the front has seen the first. The relay must
/// still publish the first before the second (the claim probes rows written since its walk
/// began, and finds the late one).
#[tokio::test]
async fn an_event_committed_behind_the_claims_walk_still_goes_first() {
    let db = TestDb::new().await;
    let mut cfg = db.config();
    // Small full claims keep the walk going; no poll restarts it from the front meanwhile.
    cfg.relay.batch_size = 5;
    cfg.relay.poll_interval = Dur::secs(600);
    let mem = MemoryPublisher::new();
    let (h, stop) = spawn(db.relay(&cfg, Arc::new(mem.clone())).await);
    let first = common::numbered("late", 0);
    let second = common::numbered("late", 1);
    let mut open = db.pool.begin().await.unwrap();
    db.outbox
        .enqueue(&mut open, std::slice::from_ref(&first))
        .await
        .unwrap();
    // Rows after it, committed: the walk goes past the open row's key.
    let others = common::interleaved(100, 20, 0);
    db.enqueue(&others).await;
    wait_for(DEADLINE, "the walk well past the open row", || async {
        mem.log().acked().len() >= 200
    })
    .await;
    open.commit().await.unwrap();
    db.enqueue(std::slice::from_ref(&second)).await;
    // The second is claimed by a claim continuing the walk (full claims, no poll) and must
    // wait: it is rescheduled behind the first, which the walk has passed.
    wait_for(DEADLINE, "the others published", || async {
        mem.log().acked().len() >= others.len()
    })
    .await;
    let second_waits = format!(
        "event_id = '{}' AND next_attempt_at <> '-infinity'",
        second.event_id
    );
    let second_acked = || {
        mem.log()
            .acked()
            .iter()
            .any(|a| a.event_id == second.event_id)
    };
    wait_for(
        DEADLINE,
        "the second rescheduled (or published)",
        || async { db.count(&second_waits).await == 1 || second_acked() },
    )
    .await;
    assert!(!second_acked(), "the second event overtook the first");
    // Commits wake the relay (standing in for the poll, which this test turned off); the
    // claims start from the front and find the first, then the second once it is due.
    let mut n = 0;
    wait_for(DEADLINE, "everything published", || {
        n += 1;
        let nudge = common::numbered(&format!("nudge{n}"), 0);
        let db = &db;
        async move {
            if db.total().await == 0 {
                return true;
            }
            db.enqueue(&[nudge]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            false
        }
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    let acked = mem.log().acked();
    let at = |e: &NewEvent| acked.iter().position(|a| a.event_id == e.event_id);
    let (p, r) = (at(&first).expect("first"), at(&second).expect("second"));
    assert!(p < r, "the second event overtook the first ({p} vs {r})");
    db.drop_schema().await;
}

/// Columns whose type an operator changed decode as sqlx decodes them: a `varchar` topic and
/// content type are read as text, a `bigint` event version fails its row naming the field,
/// and the schema's own types next to them come straight from the wire, unchanged.
#[tokio::test]
async fn columns_of_other_types_decode_as_before_and_fail_only_their_row() {
    let db = TestDb::new().await;
    db.sql(
        "ALTER TABLE {t} ALTER COLUMN topic TYPE varchar(200), \
                         ALTER COLUMN content_type TYPE varchar(100)",
    )
    .await;
    db.sql(
        "INSERT INTO {t} (event_id, topic, aggregate_id, event_type, event_version, payload, \
                          content_type, headers, attempts) \
         VALUES ('00000000-0000-0000-0000-00000000abcd', 'orders.x', 'a1', 'T', 7, \
                 '\\x00ff10'::bytea, 'text/plain', '{\"h\": \"v\"}', 2)",
    )
    .await;
    let cfg = db.config();
    let share = outbox_relay::store::Share {
        owner: "nobody".into(),
        parts: (0..outbox_relay::store::PARTITIONS).collect(),
    };
    db.sql("UPDATE {t}_partitions SET owner = 'nobody'").await;
    // A store of its own each time: a session's prepared claim does not survive the change
    // of its result's types.
    let claim_one = || async {
        outbox_relay::store::Store::connect(&cfg.database, &outbox_relay::wiring::session(&cfg))
            .await
            .unwrap()
            .claim_share(10, outbox_relay::store::Walk::ProbeAll(None), &share)
            .await
            .unwrap()
    };
    let claim = claim_one().await;
    assert_eq!(claim.rows.len(), 1);
    let row = &claim.rows[0];
    assert_eq!(row.invalid, None);
    let e = &row.event;
    assert_eq!(
        e.event_id,
        uuid::Uuid::parse_str("00000000-0000-0000-0000-00000000abcd").unwrap()
    );
    assert_eq!(
        (e.topic.as_str(), e.aggregate_id.as_str()),
        ("orders.x", "a1")
    );
    assert_eq!((e.event_version, e.attempts), (7, 2));
    assert_eq!(e.payload, vec![0x00, 0xff, 0x10]);
    assert_eq!(e.content_type.as_deref(), Some("text/plain"));
    assert_eq!(e.aggregate_type, None);
    assert_eq!(e.headers, vec![("h".to_string(), "v".to_string())]);
    claim.tx.rollback().await.unwrap();

    db.sql("ALTER TABLE {t} ALTER COLUMN event_version TYPE bigint")
        .await;
    let claim = claim_one().await;
    assert_eq!(claim.rows.len(), 1);
    let why = claim.rows[0].invalid.clone().unwrap_or_default();
    assert!(
        why.contains("field event_version: cannot be decoded") && why.contains("INT8"),
        "{why}"
    );
    assert_eq!(claim.rows[0].event.topic, "orders.x");
    claim.tx.rollback().await.unwrap();
}

/// A column the claim reads changes its type under a running store: the session whose
/// prepared claim went stale fails once ("cached plan must not change result type"), and
/// the pool replaces the sessions opened before, so the next claim works: no restart.
#[tokio::test]
async fn a_column_changing_type_under_a_running_store_costs_one_failed_claim() {
    let db = TestDb::new().await;
    db.sql(
        "INSERT INTO {t} (event_id, topic, aggregate_id, event_type, event_version, payload) \
         VALUES ('00000000-0000-0000-0000-00000000abce', 'orders.y', 'a1', 'T', 1, 'x')",
    )
    .await;
    db.sql("UPDATE {t}_partitions SET owner = 'nobody'").await;
    let mut cfg = db.config();
    // One session: every claim after the change runs on the one that prepared the claim
    // before it, or on the one that replaced it.
    cfg.database.max_connections = 1;
    let share = outbox_relay::store::Share {
        owner: "nobody".into(),
        parts: (0..outbox_relay::store::PARTITIONS).collect(),
    };
    let store =
        outbox_relay::store::Store::connect(&cfg.database, &outbox_relay::wiring::session(&cfg))
            .await
            .unwrap();
    let claim = || store.claim_share(10, outbox_relay::store::Walk::ProbeAll(None), &share);
    let c = claim().await.unwrap();
    assert_eq!(c.rows.len(), 1);
    c.tx.rollback().await.unwrap();

    db.sql("ALTER TABLE {t} ALTER COLUMN topic TYPE varchar(200)")
        .await;
    // The pooled session prepared the claim before the change.
    let stale = match claim().await {
        Ok(_) => panic!("the session's prepared claim should have gone stale"),
        Err(e) => e.to_string(),
    };
    assert!(
        stale.contains("cached plan must not change result type"),
        "{stale}"
    );
    for round in 0..3 {
        let c = claim()
            .await
            .unwrap_or_else(|e| panic!("claim {round} after the change: {e}"));
        assert_eq!(c.rows.len(), 1);
        assert_eq!(c.rows[0].event.topic, "orders.y");
        assert_eq!(c.rows[0].invalid, None);
        c.tx.rollback().await.unwrap();
    }
}
