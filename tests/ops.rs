//! The operator commands (`status`, `failed`, `inspect`, `replay`, `purge`) run as the binary
//! against the real Postgres: values, `--json` shapes, filters, exit codes, and that replayed
//! events go out again in order per aggregate. States are set up with plain SQL, as the relay
//! leaves them, or by running the relay with a backend scripted to fail.

mod common;

use common::{numbered, relay_bin, sequence, spawn, wait_for, TestDb};
use outbox_relay::config::Dur;
use outbox_relay::publisher::memory::{MemoryPublisher, Verdict};
use outbox_relay::publisher::PublishError;
use serde_json::Value;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `outbox-relay <args>` on the test's schema: (exit code, stdout, stderr).
fn ops(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(relay_bin())
        .current_dir(dir.path())
        .args(["--database-url", &db.url, "--schema", db.schema()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(db: &TestDb, args: &[&str]) -> Value {
    let (code, out, err) = ops(db, args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} prints JSON ({e}): {out}"))
}

/// Rows failed as the relay fails them, with a reason.
async fn fail(db: &TestDb, filter: &str, reason: &str) {
    db.sql(&format!(
        "UPDATE {{t}} SET status = 'failed', attempts = 3, last_error = '{reason}', \
         next_attempt_at = now() WHERE {filter}"
    ))
    .await;
}

/// Rows held behind a failed predecessor, as the relay holds them.
async fn hold(db: &TestDb, filter: &str) {
    db.sql(&format!(
        "UPDATE {{t}} SET next_attempt_at = '{}' WHERE status = 'pending' AND {filter}",
        outbox_relay::store::HELD_UNTIL
    ))
    .await;
}

fn ids(v: &Value) -> Vec<String> {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn status_shows_the_backlog_per_topic_held_aggregates_and_running_relays() {
    let db = TestDb::new().await;
    let (code, out, err) = ops(&db, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("no events") && out.contains("none running"),
        "{out}"
    );

    // orders.created: a1 (3 events: first failed, 2 held), a2 (2 due), a3 (1 scheduled).
    db.enqueue(&sequence("a1", 3)).await;
    db.enqueue(&sequence("a2", 2)).await;
    db.enqueue(&sequence("a3", 1)).await;
    let mut paid = numbered("p1", 0);
    paid.topic = "orders.paid".into();
    db.enqueue(&[paid]).await;
    fail(
        &db,
        "aggregate_id = 'a1' AND id = (SELECT min(id) FROM {t} WHERE aggregate_id = 'a1')",
        "too large",
    )
    .await;
    hold(&db, "aggregate_id = 'a1'").await;
    db.sql("UPDATE {t} SET next_attempt_at = now() + interval '1 hour', attempts = 1 WHERE aggregate_id = 'a3'")
        .await;
    db.sql("UPDATE {t} SET status = 'published', published_at = now() WHERE topic = 'orders.paid'")
        .await;
    db.sql("UPDATE {t} SET occurred_at = now() - interval '90 seconds' WHERE aggregate_id = 'a2'")
        .await;
    db.sql("INSERT INTO {t}_relays VALUES ('live', 'h1', 7, '0.1.0', now(), now(), 4, 10, 1), \
            ('gone', 'h2', 8, '0.1.0', now() - interval '1 hour', now() - interval '1 minute', 9, 0, 0)")
        .await;

    let s = json(&db, &["status", "--json"]);
    let t = &s["totals"];
    assert_eq!(
        (
            &t["pending"],
            &t["due"],
            &t["scheduled"],
            &t["held"],
            &t["failed"],
            &t["published"],
            &t["in_flight"]
        ),
        (
            &5.into(),
            &2.into(),
            &1.into(),
            &2.into(),
            &1.into(),
            &1.into(),
            &4.into()
        ),
        "{s}"
    );
    assert_eq!(s["aggregates_held"], 1, "{s}");
    let age = s["oldest_pending_age_seconds"].as_f64().unwrap();
    assert!(
        (89.0..200.0).contains(&age),
        "the a2 events are 90 s old: {s}"
    );
    assert_eq!(s["outbox"], format!("{}.outbox", db.schema()));
    let topics = s["topics"].as_array().unwrap();
    assert_eq!(topics.len(), 2, "{s}");
    assert_eq!(
        topics[0],
        serde_json::json!({"topic": "orders.created", "due": 2, "scheduled": 1, "held": 2,
                           "failed": 1, "published": 0})
    );
    assert_eq!(topics[1]["published"], 1);
    let relays = s["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 1, "only the relay seen recently: {s}");
    assert_eq!(relays[0]["instance"], "live");
    assert_eq!(relays[0]["pid"], 7);
    assert!(s.get("limits").is_none());

    let (code, out, _) = ops(&db, &["status"]);
    assert_eq!(code, 0);
    for text in [
        "orders.created",
        "orders.paid",
        "held behind failures 2",
        "live",
        "aggregates held by a failed event: 1",
    ] {
        assert!(out.contains(text), "{text:?} in:\n{out}");
    }
    assert!(!out.contains("gone"), "{out}");
    db.drop_schema().await;
}

#[tokio::test]
async fn status_limits_exit_3_when_exceeded_and_0_under() {
    let db = TestDb::new().await;
    db.enqueue(&sequence("a", 4)).await;
    db.sql("UPDATE {t} SET occurred_at = now() - interval '10 minutes'")
        .await;
    assert_eq!(ops(&db, &["status", "--max-pending", "4"]).0, 0);
    let (code, out, _) = ops(&db, &["status", "--max-pending", "3"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("LIMIT EXCEEDED: pending 4 > 3"), "{out}");
    assert_eq!(ops(&db, &["status", "--max-age", "1h"]).0, 0);
    let (code, out, _) = ops(&db, &["status", "--max-age", "5m", "--json"]);
    assert_eq!(code, 3);
    let v: Value = serde_json::from_str(&out).unwrap();
    let exceeded = v["limits"]["exceeded"].as_array().unwrap();
    assert_eq!(exceeded.len(), 1);
    assert!(
        exceeded[0].as_str().unwrap().starts_with("oldest pending"),
        "{v}"
    );
    let (code, _, err) = ops(&db, &["status", "--max-age", "soon"]);
    assert_eq!(code, 2);
    assert!(err.contains("--max-age") && err.contains("soon"), "{err}");
    db.drop_schema().await;
}

#[tokio::test]
async fn failed_lists_and_filters_by_id_topic_aggregate_time_and_error() {
    let db = TestDb::new().await;
    let mut events = sequence("a1", 2);
    events.extend(sequence("a2", 2));
    let mut other = numbered("b1", 0);
    other.topic = "billing.charged".into();
    events.push(other.clone());
    db.enqueue(&events).await;
    fail(
        &db,
        "aggregate_id = 'a1'",
        "broker refused: Message too large",
    )
    .await;
    fail(&db, "aggregate_id = 'a2'", "no responders").await;
    fail(&db, "aggregate_id = 'b1'", "topic authorization failed").await;
    db.sql("UPDATE {t} SET occurred_at = now() - interval '3 hours' WHERE aggregate_id = 'a2'")
        .await;

    let all = json(&db, &["failed", "--json"]);
    assert_eq!(all["count"], 5);
    let first = &all["events"][0];
    for key in [
        "id",
        "event_id",
        "topic",
        "aggregate_id",
        "event_type",
        "attempts",
        "occurred_at",
        "at",
        "last_error",
    ] {
        assert!(first.get(key).is_some(), "{key} in {first}");
    }
    assert_eq!(first["attempts"], 3);
    let by_id = json(
        &db,
        &[
            "failed",
            "--json",
            "--event-id",
            &other.event_id.to_string(),
        ],
    );
    assert_eq!(ids(&by_id), vec![other.event_id.to_string()]);
    assert_eq!(
        json(&db, &["failed", "--json", "--topic", "orders.created"])["count"],
        4
    );
    assert_eq!(
        json(&db, &["failed", "--json", "--topic", "bill*"])["count"],
        1
    );
    assert_eq!(
        json(&db, &["failed", "--json", "--aggregate", "a2"])["count"],
        2
    );
    assert_eq!(
        json(&db, &["failed", "--json", "--since", "1h"])["count"],
        3
    );
    assert_eq!(
        json(&db, &["failed", "--json", "--until", "1h"])["count"],
        2
    );
    assert_eq!(
        json(&db, &["failed", "--json", "--error", "TOO LARGE"])["count"],
        2
    );
    let limited = json(&db, &["failed", "--json", "--limit", "2"]);
    assert_eq!(
        (limited["count"].as_i64(), ids(&limited).len()),
        (Some(5), 2)
    );
    let (code, out, _) = ops(&db, &["failed", "--aggregate", "b1"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("topic authorization failed") && out.contains("(1 failed)"),
        "{out}"
    );
    let (code, _, err) = ops(&db, &["failed", "--since", "yesterday"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--since") && err.contains("yesterday") && err.contains("RFC 3339"),
        "{err}"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn inspect_shows_json_payloads_as_json_and_binary_ones_as_hex_and_base64() {
    let db = TestDb::new().await;
    let mut j = numbered("a", 0);
    j.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let mut bin = numbered("b", 0);
    bin.payload = vec![0, 159, 146, 150, 255];
    db.enqueue(&[j.clone(), bin.clone()]).await;

    let v = json(&db, &["inspect", &j.event_id.to_string(), "--json"]);
    assert_eq!(v["payload_json"], serde_json::json!({"agg": "a", "seq": 0}));
    assert_eq!(v["status"], "pending");
    assert_eq!(
        v["published_at"],
        serde_json::Value::Null,
        "not published: no time"
    );
    assert_eq!(v["traceparent"], j.traceparent.clone().unwrap());
    assert!(v.get("payload_base64").is_none());
    let v = json(&db, &["inspect", &bin.event_id.to_string(), "--json"]);
    assert_eq!(v["payload_base64"], "AJ+Slv8=");
    assert_eq!(v["payload_bytes"], 5);
    let (code, out, _) = ops(&db, &["inspect", &bin.event_id.to_string()]);
    assert_eq!(code, 0);
    assert!(
        out.contains("00 9f 92 96 ff") && out.contains("base64: AJ+Slv8="),
        "{out}"
    );

    let missing = uuid::Uuid::new_v4().to_string();
    let (code, _, err) = ops(&db, &["inspect", &missing]);
    assert_eq!(code, 1);
    assert!(err.contains(&missing), "{err}");
    let (code, _, err) = ops(&db, &["inspect", "not-a-uuid"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("not-a-uuid") && err.contains("EVENT_ID"),
        "{err}"
    );
    db.drop_schema().await;
}

/// Real failures from the relay (a backend refusing one aggregate's first event), replayed:
/// the held events are released and the whole aggregate goes out in order.
#[tokio::test]
async fn replay_releases_held_events_and_the_aggregate_goes_out_in_order() {
    let db = TestDb::new().await;
    let mut cfg = db.config();
    cfg.relay.max_attempts = 1;
    cfg.relay.backoff_initial = Dur::ms(10);
    let bad = sequence("bad", 4);
    let good = sequence("good", 3);
    let refuse = Arc::new(AtomicBool::new(true));
    let (poison, flag) = (bad[0].event_id, refuse.clone());
    let mem = MemoryPublisher::new().with_script(Arc::new(move |e, _| {
        if e.event_id == poison && flag.load(Ordering::SeqCst) {
            Verdict::Fail(PublishError::permanent("broker refused: record too large"))
        } else {
            Verdict::Ack
        }
    }));
    db.enqueue(&bad).await;
    db.enqueue(&good).await;
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "good published, bad failed and held", || async {
        db.count("aggregate_id = 'good'").await == 0
            && db.count("status = 'failed'").await == 1
            && db
                .count(&format!(
                    "next_attempt_at = '{}'",
                    outbox_relay::store::HELD_UNTIL
                ))
                .await
                == 3
    })
    .await;
    let s = json(&db, &["status", "--json"]);
    assert_eq!(
        (s["totals"]["held"].as_i64(), s["aggregates_held"].as_i64()),
        (Some(3), Some(1))
    );
    let f = json(&db, &["failed", "--json"]);
    assert!(
        f["events"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("record too large"),
        "{f}"
    );

    refuse.store(false, Ordering::SeqCst);
    let dry = json(
        &db,
        &["replay", "--aggregate", "bad", "--dry-run", "--json"],
    );
    assert_eq!(
        (dry["dry_run"].as_bool(), dry["matched"].as_i64()),
        (Some(true), Some(1))
    );
    assert_eq!(
        db.count("status = 'failed'").await,
        1,
        "a dry run changes nothing"
    );
    let done = json(&db, &["replay", "--aggregate", "bad", "--json"]);
    assert_eq!(
        (done["replayed"].as_i64(), done["released"].as_i64()),
        (Some(1), Some(3))
    );
    wait_for(
        DEADLINE,
        "the bad aggregate published after the replay",
        || async { db.total().await == 0 },
    )
    .await;
    stop.cancel();
    h.await.unwrap();
    let seqs: Vec<i64> = mem
        .log()
        .acked()
        .iter()
        .filter(|e| e.aggregate_id == "bad")
        .map(|e| {
            serde_json::from_slice::<Value>(&e.payload).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![0, 1, 2, 3], "in order, once each");
    db.drop_schema().await;
}

#[tokio::test]
async fn replay_by_id_topic_time_and_error_and_a_bulk_replay_needs_all_and_yes() {
    let db = TestDb::new().await;
    let mut events: Vec<_> = (0..6).map(|i| numbered(&format!("a{i}"), 0)).collect();
    events[5].topic = "billing.charged".into();
    db.enqueue(&events).await;
    fail(&db, "true", "timeout").await;
    db.sql("UPDATE {t} SET last_error = 'auth refused' WHERE aggregate_id = 'a4'")
        .await;
    db.sql("UPDATE {t} SET occurred_at = now() - interval '2 days' WHERE aggregate_id = 'a3'")
        .await;
    let replayed = |v: Value| v["replayed"].as_i64().unwrap();

    let (code, _, err) = ops(&db, &["replay"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--all --yes") && err.contains("(6)"), "{err}");
    assert_eq!(ops(&db, &["replay", "--all"]).0, 2);
    assert_eq!(
        db.count("status = 'failed'").await,
        6,
        "refused: nothing changed"
    );

    let id = events[0].event_id.to_string();
    assert_eq!(
        replayed(json(&db, &["replay", "--event-id", &id, "--json"])),
        1
    );
    assert_eq!(
        replayed(json(&db, &["replay", "--topic", "billing.*", "--json"])),
        1
    );
    assert_eq!(
        replayed(json(&db, &["replay", "--until", "1d", "--json"])),
        1
    );
    assert_eq!(
        replayed(json(&db, &["replay", "--error", "auth", "--json"])),
        1
    );
    assert_eq!(db.count("status = 'failed'").await, 2);
    for (agg, status) in [
        ("a0", "pending"),
        ("a5", "pending"),
        ("a3", "pending"),
        ("a4", "pending"),
        ("a1", "failed"),
    ] {
        assert_eq!(
            db.count(&format!("aggregate_id = '{agg}' AND status = '{status}'"))
                .await,
            1,
            "{agg}"
        );
    }
    let (code, out, _) = ops(&db, &["replay", "--all", "--yes"]);
    assert_eq!(code, 0);
    assert!(out.contains("replayed 2 failed events"), "{out}");
    assert_eq!(
        db.count("status = 'pending' AND attempts = 0 AND last_error IS NULL")
            .await,
        6
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn replay_status_published_republishes_kept_rows() {
    let db = TestDb::new().await;
    let mut cfg = db.config();
    cfg.relay.published_retention = Dur::secs(3600);
    let mem = MemoryPublisher::new();
    let events = sequence("k", 3);
    db.enqueue(&events).await;
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "3 kept as published", || async {
        db.count("status = 'published'").await == 3
    })
    .await;
    assert_eq!(json(&db, &["status", "--json"])["totals"]["published"], 3);
    let dry = json(
        &db,
        &[
            "replay",
            "--status",
            "published",
            "--aggregate",
            "k",
            "--dry-run",
            "--json",
        ],
    );
    assert_eq!(dry["matched"], 3);
    let done = json(
        &db,
        &["replay", "--status", "published", "--since", "1h", "--json"],
    );
    assert_eq!(done["replayed"], 3);
    wait_for(DEADLINE, "published a second time", || async {
        mem.log().acked().len() == 6 && db.count("status = 'published'").await == 3
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    let again: Vec<uuid::Uuid> = mem.log().acked()[3..].iter().map(|e| e.event_id).collect();
    assert_eq!(
        again,
        events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        "same ids, same order"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn purge_deletes_failed_events_and_releases_the_held_ones() {
    let db = TestDb::new().await;
    db.enqueue(&sequence("x", 3)).await;
    db.enqueue(&sequence("y", 1)).await;
    fail(
        &db,
        "aggregate_id = 'x' AND id = (SELECT min(id) FROM {t} WHERE aggregate_id = 'x')",
        "poison",
    )
    .await;
    hold(&db, "aggregate_id = 'x'").await;
    fail(&db, "aggregate_id = 'y'", "other").await;
    let (code, _, err) = ops(&db, &["purge"]);
    assert_eq!(code, 2, "{err}");
    let dry = json(&db, &["purge", "--error", "poison", "--dry-run", "--json"]);
    assert_eq!(dry["matched"], 1);
    assert_eq!(db.count("status = 'failed'").await, 2);
    let done = json(&db, &["purge", "--error", "poison", "--json"]);
    assert_eq!(
        (done["purged"].as_i64(), done["released"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(db.count("aggregate_id = 'x'").await, 2);
    assert_eq!(
        db.count("aggregate_id = 'x' AND next_attempt_at <= now()")
            .await,
        2,
        "released"
    );
    let (code, out, _) = ops(&db, &["purge", "--all", "--yes"]);
    assert_eq!(code, 0);
    assert!(out.contains("purged 1 failed events"), "{out}");
    assert_eq!(db.count("status = 'failed'").await, 0);
    db.drop_schema().await;
}

/// Every operator statement reads an index, never the whole table, on a table whose statistics
/// say it is big.
#[tokio::test]
async fn every_operator_statement_stays_on_an_index() {
    let db = TestDb::new().await;
    db.sql(
        "INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload, status, published_at, last_error) \
         SELECT gen_random_uuid(), 'orders.' || (g % 7), 'a' || (g % 5000), 'T', 'xxxxxxxxxx', \
           CASE WHEN g % 10 < 6 THEN 'pending' WHEN g % 10 < 9 THEN 'published' ELSE 'failed' END, \
           CASE WHEN g % 10 BETWEEN 6 AND 8 THEN now() END, \
           CASE WHEN g % 10 = 9 THEN 'refused' END \
         FROM generate_series(1, 50000) g",
    )
    .await;
    db.sql("ANALYZE {t}").await;
    let store = outbox_relay::store::Store::connect(
        &db.config().database,
        &outbox_relay::store::Session {
            application_name: "test".into(),
            idle_in_transaction_timeout: None,
            operator: true,
        },
    )
    .await
    .unwrap();
    for (name, sql, params) in store.operator_statements() {
        let mut conn = store.pool().acquire().await.unwrap();
        // Untyped parameters: Postgres infers each one's type from its use.
        sqlx::raw_sql(&format!("PREPARE q AS {sql}"))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let args: Vec<String> = params
            .iter()
            .map(|p| format!("'{}'", p.replace('\'', "''")))
            .collect();
        let explain = if args.is_empty() {
            "EXPLAIN EXECUTE q".to_string()
        } else {
            format!("EXPLAIN EXECUTE q({})", args.join(", "))
        };
        let plan: Vec<String> = sqlx::query_scalar(&explain)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        sqlx::raw_sql("DEALLOCATE q")
            .execute(&mut *conn)
            .await
            .unwrap();
        assert!(
            !plan.contains("Seq Scan"),
            "{name} scans the table:\n{sql}\n{plan}"
        );
        assert!(plan.contains("Index"), "{name} uses an index:\n{plan}");
    }
    db.drop_schema().await;
}

#[tokio::test]
async fn status_watch_refreshes_until_interrupted() {
    use std::io::Read;
    let db = TestDb::new().await;
    db.enqueue(&sequence("w", 2)).await;
    let mut child = Command::new(relay_bin())
        .args(["--database-url", &db.url, "--schema", db.schema()])
        .args(["status", "--watch", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    while seen.matches("pending 2 (due 2").count() < 3 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let chunk = rx
            .recv_timeout(left)
            .expect("three refreshes within the deadline");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("\x1b[2J"), "each refresh clears the screen");
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success(), "exits 0 on SIGINT");
    db.drop_schema().await;
}

/// Replay and purge racing a relay that keeps holding new events behind failed ones: no event
/// is ever left held without a failed event ahead of it (it would wait forever), so once the
/// failures stop everything goes out, and every aggregate's events are acknowledged in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_purge_racing_a_relay_never_strand_a_held_event() {
    use outbox_relay::store::ops::{Filter, Target};
    use rand::Rng;
    let db = TestDb::new().await;
    let failing = Arc::new(AtomicBool::new(true));
    let flag = failing.clone();
    // While failing, every fifth event of an aggregate is refused for good: its successors
    // are held behind it until a replay or a purge.
    let mem = MemoryPublisher::new().with_script(Arc::new(move |e, _| {
        let v: Value = serde_json::from_slice(&e.payload).unwrap();
        if flag.load(Ordering::SeqCst) && v["seq"].as_i64().unwrap() % 5 == 0 {
            Verdict::Fail(PublishError::permanent("refused by the test"))
        } else {
            Verdict::Ack
        }
    }));
    let mut cfg = db.config();
    cfg.relay.poll_interval = Dur::ms(50);
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let (h, stop) = spawn(relay);
    let store =
        outbox_relay::store::Store::connect(&cfg.database, &outbox_relay::wiring::session(&cfg))
            .await
            .unwrap();
    let aggregates: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    let mut replayed = 0;
    for round in 0..12 {
        let events: Vec<_> = aggregates
            .iter()
            .flat_map(|a| (0..5).map(move |s| numbered(a, round * 5 + s)))
            .collect();
        db.enqueue(&events).await;
        // A random moment in the relay's claim, hold and defer cycle.
        let pause = rand::thread_rng().gen_range(0..40);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        // Odd aggregates are purged now and then, the rest replayed.
        if round % 4 == 3 {
            let filter = Filter {
                aggregate_id: Some(format!("r{}", (round % 10) | 1)),
                ..Default::default()
            };
            store.purge(&filter).await.unwrap();
        }
        replayed += store
            .replay(Target::Failed, &Filter::default())
            .await
            .unwrap()
            .events;
    }
    failing.store(false, Ordering::SeqCst);
    // An event refused just before the failures stopped may be recorded failed after any one
    // replay, as an operator would see: replay until nothing is left. A held event without a
    // failed one ahead of it would never be released by a replay, and this would time out.
    wait_for(
        Duration::from_secs(90),
        "every event published or purged: none stranded behind a failure that is gone",
        || async {
            store
                .replay(Target::Failed, &Filter::default())
                .await
                .unwrap();
            db.total().await == 0
        },
    )
    .await;
    stop.cancel();
    h.await.unwrap();
    let refused = mem
        .log()
        .records()
        .iter()
        .filter(|r| {
            matches!(
                r.kind,
                outbox_relay::publisher::memory::RecordKind::Failed(_)
            )
        })
        .count();
    assert!(
        refused >= 10 && replayed > 0,
        "the race did not happen: {refused} refusals, {replayed} replayed mid-flight"
    );
    // Per aggregate, acknowledgements in event order (purged events simply missing).
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for e in mem.log().acked() {
        let v: Value = serde_json::from_slice(&e.payload).unwrap();
        let (agg, seq) = (
            v["agg"].as_str().unwrap().to_string(),
            v["seq"].as_i64().unwrap(),
        );
        if let Some(prev) = last.insert(agg.clone(), seq) {
            assert!(
                seq > prev,
                "aggregate {agg}: #{seq} acknowledged after #{prev}"
            );
        }
    }
    db.drop_schema().await;
}
