//! Several relays on one outbox: they divide the aggregates by partition, hand partitions over
//! when one joins or leaves, take a dead relay's share over, and never work on one aggregate
//! at once. In process, with one memory log shared by every relay's backend, so the log shows
//! which relay handed which event when; and as processes for SIGKILL and SIGTERM.

mod common;

use common::nats as n;
use common::{interleaved, relay_bin, spawn, wait_for, watchdog, TestDb};
use outbox_relay::config::{Config, Dur};
use outbox_relay::publisher::memory::{MemoryLog, MemoryPublisher, RecordKind, Verdict};
use outbox_relay::relay::Relay;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn config(db: &TestDb) -> Config {
    let mut cfg = db.config();
    cfg.relay.rebalance_interval = Dur::ms(100);
    cfg.relay.batch_size = 100;
    cfg
}

async fn relay(db: &TestDb, cfg: &Config, log: &MemoryLog, name: &str) -> Relay {
    let publisher = MemoryPublisher::shared(log.clone(), name);
    db.relay(cfg, Arc::new(publisher))
        .await
        .with_monitor(cfg.monitor.clone(), name.to_string())
}

/// Partitions per owner, from the table.
async fn owners(db: &TestDb) -> HashMap<Option<String>, i64> {
    sqlx::query_as::<_, (Option<String>, i64)>(&format!(
        "SELECT owner, count(*) FROM {}_partitions GROUP BY owner",
        db.names.qualified()
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Every event handed exactly once, by one relay per aggregate at any time, in order per
/// aggregate; returns how many events each relay handed.
fn check_log(log: &MemoryLog, expected: usize) -> HashMap<String, usize> {
    let records = log.records();
    let mut handed: HashMap<uuid::Uuid, usize> = HashMap::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let mut per_relay: HashMap<String, usize> = HashMap::new();
    // Per aggregate: the relay with an event in flight, and how many.
    let mut busy: HashMap<String, (String, usize)> = HashMap::new();
    for r in &records {
        let agg = r.event.aggregate_id.clone();
        match r.kind {
            RecordKind::Handed => {
                *handed.entry(r.event.event_id).or_default() += 1;
                *per_relay.entry(r.relay.clone()).or_default() += 1;
                let body: serde_json::Value = serde_json::from_slice(&r.event.payload).unwrap();
                let seq = body["seq"].as_i64().unwrap();
                let prev = last_seq.insert(agg.clone(), seq);
                assert_eq!(prev.map_or(0, |p| p + 1), seq, "order of {agg}");
                let entry = busy.entry(agg.clone()).or_insert((r.relay.clone(), 0));
                assert!(
                    entry.1 == 0 || entry.0 == r.relay,
                    "{agg} handed by {} while {} has it in flight",
                    r.relay,
                    entry.0
                );
                *entry = (r.relay.clone(), entry.1 + 1);
            }
            RecordKind::Acked | RecordKind::Failed(_) => {
                if let Some(e) = busy.get_mut(&agg) {
                    e.1 = e.1.saturating_sub(1);
                }
            }
        }
    }
    assert_eq!(handed.len(), expected, "every event handed");
    let twice: Vec<_> = handed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handed more than once: {twice:?}");
    per_relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_joining_and_leaving_under_load_divide_the_aggregates() {
    let db = TestDb::new().await;
    let cfg = config(&db);
    let log = MemoryLog::new();
    let events = db.enqueue_interleaved(300, 30).await;
    let (a, stop_a) = spawn(relay(&db, &cfg, &log, "a").await);
    wait_for(DEADLINE, "relay a to publish some", || async {
        log.acked().len() >= 1000
    })
    .await;
    let (b, stop_b) = spawn(relay(&db, &cfg, &log, "b").await);
    wait_for(DEADLINE, "relay b to publish some", || async {
        log.records()
            .iter()
            .any(|r| r.relay == "b" && r.kind == RecordKind::Acked)
    })
    .await;
    let (c, stop_c) = spawn(relay(&db, &cfg, &log, "c").await);
    wait_for(DEADLINE, "three owners", || async {
        let o = owners(&db).await;
        ["a", "b", "c"]
            .iter()
            .all(|n| o.get(&Some(n.to_string())).is_some_and(|k| *k >= 85))
    })
    .await;
    // b leaves (the SIGTERM path): its partitions go to a and c.
    stop_b.cancel();
    let b = b.await.unwrap();
    wait_for(DEADLINE, "a and c own everything", || async {
        let o = owners(&db).await;
        o.get(&Some("a".into())).copied().unwrap_or(0)
            + o.get(&Some("c".into())).copied().unwrap_or(0)
            == 256
    })
    .await;
    // More load after the hand-over.
    let more = interleaved(300, 5, 30);
    db.enqueue(&more).await;
    wait_for(DEADLINE, "everything published", || async {
        db.count("status = 'pending'").await == 0
    })
    .await;
    stop_a.cancel();
    stop_c.cancel();
    let (a, c) = (a.await.unwrap(), c.await.unwrap());
    let per_relay = check_log(&log, events.len() + more.len());
    for r in ["a", "b", "c"] {
        assert!(
            per_relay.get(r).copied().unwrap_or(0) > 0,
            "{r} handed nothing: {per_relay:?}"
        );
    }
    // Relays never step around each other: no deferral write at all.
    let deferred: Vec<u64> = [&a, &b, &c]
        .iter()
        .map(|r| r.stats().deferred.load(Ordering::Relaxed))
        .collect();
    assert_eq!(deferred, vec![0, 0, 0], "deferrals of a, b, c");
    assert_eq!(db.total().await, 0);
    assert_eq!(
        owners(&db).await.get(&None).copied(),
        Some(256),
        "all handed back"
    );
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_aggregate_is_pipelined_and_strict_mode_keeps_one_in_flight() {
    for strict in [false, true] {
        let db = TestDb::new().await;
        let mut cfg = config(&db);
        cfg.relay.batch_size = 500;
        cfg.relay.ordering = if strict {
            outbox_relay::config::OrderingMode::Strict
        } else {
            outbox_relay::config::OrderingMode::Pipelined
        };
        let events: Vec<_> = (0..2000).map(|i| common::numbered("hot", i)).collect();
        for chunk in events.chunks(1000) {
            db.enqueue(chunk).await;
        }
        let log = MemoryLog::new();
        // Acknowledgements take a moment, as a broker's do.
        let publisher = MemoryPublisher::shared(log.clone(), "r")
            .with_script(Arc::new(|_, _| Verdict::AckAfter(Duration::from_millis(1))));
        let r = db
            .relay(&cfg, Arc::new(publisher))
            .await
            .with_monitor(cfg.monitor.clone(), "r".into());
        let (h, stop) = spawn(r);
        wait_for(DEADLINE, "the hot aggregate published", || async {
            db.count("status = 'pending'").await == 0
        })
        .await;
        stop.cancel();
        h.await.unwrap();
        check_log(&log, events.len());
        // The most events of the aggregate in flight at once.
        let mut in_flight = 0i64;
        let mut most = 0;
        for rec in log.records() {
            match rec.kind {
                RecordKind::Handed => in_flight += 1,
                _ => in_flight -= 1,
            }
            most = most.max(in_flight);
        }
        if strict {
            assert_eq!(most, 1, "strict: one in flight");
        } else {
            assert!(most > 1, "pipelined: several in flight, saw {most}");
            assert!(
                most <= cfg.relay.aggregate_window as i64,
                "window kept: {most}"
            );
        }
        db.drop_schema().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_failure_defers_the_waiting_events_and_the_rest_follow_after_the_retry() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.relay.ordering = outbox_relay::config::OrderingMode::Pipelined;
    cfg.relay.aggregate_window = 4;
    let events: Vec<_> = (0..40).map(|i| common::numbered("hot", i)).collect();
    db.enqueue(&events).await;
    let log = MemoryLog::new();
    // Event 10 fails on its first attempt, after a while; the others are acknowledged at once.
    let publisher = MemoryPublisher::shared(log.clone(), "r").with_script(Arc::new(|e, seen| {
        let seq = serde_json::from_slice::<serde_json::Value>(&e.payload).unwrap()["seq"]
            .as_i64()
            .unwrap();
        if seq == 10 && seen == 0 {
            Verdict::FailAfter(
                Duration::from_millis(20),
                outbox_relay::publisher::PublishError::retryable("scripted"),
            )
        } else {
            Verdict::AckAfter(Duration::from_millis(2))
        }
    }));
    let r = db.relay(&cfg, Arc::new(publisher)).await;
    let (h, stop) = spawn(r);
    wait_for(DEADLINE, "all published", || async {
        db.count("true").await == 0
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    // What a consumer sees: the successful deliveries in the order they were sent (the
    // first hand-off of event 10 failed). Event 10's retry comes after the events already in
    // flight behind it (at most window - 1 of them), and everything after those waits for it.
    let mut first10 = true;
    let mut acked: Vec<i64> = Vec::new();
    for rec in log.records() {
        if rec.kind != RecordKind::Handed {
            continue;
        }
        let seq = serde_json::from_slice::<serde_json::Value>(&rec.event.payload).unwrap()["seq"]
            .as_i64()
            .unwrap();
        if seq == 10 && first10 {
            first10 = false;
            continue;
        }
        acked.push(seq);
    }
    let pos10 = acked.iter().position(|s| *s == 10).expect("10 published");
    let overtaking: Vec<i64> = acked[..pos10].iter().copied().filter(|s| *s > 10).collect();
    assert!(
        overtaking.len() <= 3,
        "only events already in flight overtake: {overtaking:?}"
    );
    let after: Vec<i64> = acked[pos10 + 1..].to_vec();
    let mut sorted = after.clone();
    sorted.sort();
    assert_eq!(after, sorted, "the rest in order after the retry");
    assert!(after.iter().all(|s| *s > 10));
    let all: HashSet<i64> = acked.iter().copied().collect();
    assert_eq!(all.len(), 40);
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_session_was_terminated_is_never_committed_and_its_rows_come_back() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    let instance = format!("dead-{}", db.schema());
    cfg.relay.instance_id = Some(instance.clone());
    let events = db.enqueue_interleaved(20, 10).await;
    let log = MemoryLog::new();
    // Every acknowledgement waits long enough for the test to end the claim's session.
    let publisher = MemoryPublisher::shared(log.clone(), "r").with_script(Arc::new(|_, seen| {
        if seen == 0 {
            Verdict::AckAfter(Duration::from_millis(1500))
        } else {
            Verdict::Ack
        }
    }));
    let r = db
        .relay(&cfg, Arc::new(publisher))
        .await
        .with_monitor(cfg.monitor.clone(), "r".into());
    let stats = r.stats();
    let (h, stop) = spawn(r);
    wait_for(DEADLINE, "events in flight", || async {
        log.handed_count() > 0
    })
    .await;
    // End every session of this relay that holds a claim open.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1 AND state = 'idle in transaction'",
    )
    .bind(format!("outbox-relay {instance}"))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(killed > 0, "a claim session to end");
    wait_for(DEADLINE, "every event published after all", || async {
        db.total().await == 0
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    assert!(
        stats.lost_claims.load(Ordering::Relaxed) > 0,
        "the dead claim was not committed"
    );
    // Each event of the dead claims went out again, with its id.
    let acked: HashSet<uuid::Uuid> = log.acked().iter().map(|e| e.event_id).collect();
    assert_eq!(acked.len(), events.len());
    db.drop_schema().await;
}

/// A relay process on the stdout backend (its output discarded) with fast rebalancing.
fn start_process(db: &TestDb, name: &str) -> Child {
    start_process_with(db, name, &[])
}

fn start_process_with(db: &TestDb, name: &str, env: &[(&str, String)]) -> Child {
    let dir = std::env::temp_dir();
    Command::new(relay_bin())
        .current_dir(dir)
        .args(["--database-url", &db.url, "--schema", db.schema(), "run"])
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .env("RELAY__MONITOR__HEALTH_INTERVAL", "100ms")
        .env("RELAY__RELAY__REBALANCE_INTERVAL", "200ms")
        .env("RELAY__RELAY__POLL_INTERVAL", "100ms")
        .env("RELAY__RELAY__BATCH_SIZE", "100")
        .env("RELAY__RELAY__INSTANCE_ID", name)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the relay binary")
}

/// `/health` of a relay process, as JSON.
fn health(port: u16) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_moves_the_share_within_a_second_and_sigterm_hands_it_over() {
    let db = TestDb::new().await;
    let port = common::free_port();
    let mut a = start_process(&db, "proc-a");
    let mut b = start_process_with(
        &db,
        "proc-b",
        &[("RELAY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))],
    );
    wait_for(DEADLINE, "two owners", || async {
        let o = owners(&db).await;
        o.get(&Some("proc-a".into())) == Some(&128) && o.get(&Some("proc-b".into())) == Some(&128)
    })
    .await;
    // `status` shows who owns how many.
    wait_for(
        DEADLINE,
        "status shows both relays with 128 each",
        || async {
            let out = Command::new(relay_bin())
                .current_dir(std::env::temp_dir())
                .args([
                    "--database-url",
                    &db.url,
                    "--schema",
                    db.schema(),
                    "status",
                    "--json",
                ])
                .output()
                .unwrap();
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let mut owned: Vec<(String, i64)> = s["relays"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .map(|r| {
                            (
                                r["instance"].as_str().unwrap_or("").to_string(),
                                r["partitions"].as_i64().unwrap_or(-1),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            owned.sort();
            owned == vec![("proc-a".into(), 128), ("proc-b".into(), 128)]
                && s["partitions_unowned"] == 0
        },
    )
    .await;
    // kill -9: Postgres ends its sessions, the survivor takes everything at its next look.
    signal(&a, "KILL");
    let _ = a.wait();
    let killed_at = std::time::Instant::now();
    wait_for(DEADLINE, "b owns every partition", || async {
        owners(&db).await.get(&Some("proc-b".into())) == Some(&256)
    })
    .await;
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(3), "take-over took {took:?}");
    // `/health` of the survivor shows its share.
    wait_for(DEADLINE, "/health shows 256 owned", || async {
        health(port).is_some_and(|h| h["partitions"]["owned"] == 256)
    })
    .await;
    // A new relay joins and gets its half; then SIGTERM hands it back.
    let mut c = start_process(&db, "proc-c");
    wait_for(DEADLINE, "c owns half", || async {
        owners(&db).await.get(&Some("proc-c".into())) == Some(&128)
    })
    .await;
    db.enqueue_interleaved(50, 20).await;
    signal(&c, "TERM");
    let status = c.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status}");
    wait_for(DEADLINE, "b owns every partition again", || async {
        owners(&db).await.get(&Some("proc-b".into())) == Some(&256)
    })
    .await;
    wait_for(DEADLINE, "everything published", || async {
        db.total().await == 0
    })
    .await;
    signal(&b, "TERM");
    assert!(b.wait().unwrap().success());
    db.drop_schema().await;
}

/// Three relay processes on JetStream, killed with SIGKILL at random moments and started
/// again while a writer keeps adding events: an independent consumer reading the stream sees
/// every event, each aggregate's in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_killed_at_random_keep_every_aggregate_in_order_on_jetstream() {
    let _watchdog = watchdog(
        "three_relays_killed_at_random_keep_every_aggregate_in_order_on_jetstream",
        Duration::from_secs(300),
    );
    let db = TestDb::new().await;
    let url = n::nats_url();
    let (prefix, stream) = n::unique();
    let js = n::create_stream(&url, &stream, &prefix).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            "[backends.js]\ntype = \"nats\"\nservers = [\"{url}\"]\n\n\
             [[routes]]\ntopic = \"*\"\nbackend = \"js\"\n"
        ),
    )
    .unwrap();
    let start = |i: usize| {
        Command::new(relay_bin())
            .current_dir(dir.path())
            .args(["--database-url", &db.url, "--schema", db.schema(), "run"])
            .env("RELAY__RELAY__REBALANCE_INTERVAL", "200ms")
            .env("RELAY__RELAY__POLL_INTERVAL", "100ms")
            .env("RELAY__RELAY__BATCH_SIZE", "50")
            .env("RELAY__RELAY__INSTANCE_ID", format!("k{i}"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the relay binary")
    };
    let mut relays: Vec<Child> = (0..3).map(start).collect();
    let topic = format!("{prefix}.orders");
    let stored = || async {
        js.get_stream(&stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    };
    let mut all = Vec::new();
    for round in 0..12 {
        let batch: Vec<_> = (0..300)
            .map(|i| common::numbered_on(&topic, &format!("a{}", i % 60), round * 5 + i / 60))
            .collect();
        db.enqueue(&batch).await;
        all.extend(batch);
        // Kill once some of the new events are out, at a random point of the stream.
        let target = stored().await + rand::thread_rng().gen_range(20..200);
        wait_for(DEADLINE, "the stream to grow", || async {
            stored().await >= target.min(all.len() as u64)
        })
        .await;
        let victim = rand::thread_rng().gen_range(0..3);
        signal(&relays[victim], "KILL");
        let _ = relays[victim].wait();
        relays[victim] = start(victim);
    }
    wait_for(DEADLINE, "every event published", || async {
        db.total().await == 0
    })
    .await;
    // Every relay running again (the last one restarted has taken its share), so SIGTERM
    // meets its handler.
    wait_for(DEADLINE, "three owners again", || async {
        let o = owners(&db).await;
        (0..3).all(|i| o.get(&Some(format!("k{i}"))).is_some_and(|k| *k >= 85))
    })
    .await;
    for r in &relays {
        signal(r, "TERM");
    }
    for r in &mut relays {
        assert!(r.wait().unwrap().success());
    }
    let got = n::read_stream(&js, &stream).await;
    common::conformance::assert_every_event_arrived(&got, &all);
    common::conformance::assert_in_order(&got);
    let _ = js.delete_stream(&stream).await;
    db.drop_schema().await;
}
