//! Bad rows never crash or stall the relay, against the real Postgres and the real brokers.
//! Each class of malformed row is written with plain SQL, as any producer could, next to 200
//! good events over 10 aggregates; a relay runs in process. Afterwards the relay is still up,
//! every good event is on the broker (read back independently, in order per aggregate), and
//! every bad row is `failed` with a `last_error` naming the field, or published where the
//! backend's wire format carries it.

mod common;

use common::conformance::{assert_in_order, Received};
use common::kafka::{
    brokers, create_topic, publisher as kafka_publisher, unique_topic, GroupReader,
};
use common::nats::{self as n, JetStream};
use common::{numbered_on, spawn, wait_for, wait_for_or_dump, watchdog, TestDb};
use outbox_relay::config::Config;
use outbox_relay::publisher::Publisher;
use outbox_relay::store::NewEvent;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Nats,
    Kafka,
}

/// What must become of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// Failed, with a last_error containing this (the field it names).
    Fails(&'static str),
    /// On the broker, row gone.
    Published,
}

/// Column -> SQL expression.
type Columns = Vec<(&'static str, String)>;

struct Case {
    what: &'static str,
    event_id: Uuid,
    /// Column -> SQL expression, over the defaults of a good row.
    columns: Vec<(&'static str, String)>,
    expect: Expect,
}

/// Every class of hostile row, with what `wire` must do with it. `topic` is the test's good
/// topic; each row has an aggregate of its own unless the case is about the aggregate id.
fn cases(wire: Wire, topic: &str) -> Vec<Case> {
    use Expect::*;
    let nats_only = |field| {
        if wire == Wire::Nats {
            Fails(field)
        } else {
            Published
        }
    };
    let nested = format!("{}\"x\"{}", "{\"a\": ".repeat(200), "}".repeat(200));
    let many: String = (0..300)
        .map(|i| format!("\"h{i}\": \"v\""))
        .collect::<Vec<_>>()
        .join(", ");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (wildcard, sep) = match wire {
        Wire::Nats => (format!("{topic}.>"), "."),
        Wire::Kafka => (format!("{topic}>"), ""),
    };
    let q = |s: &str| format!("'{s}'");
    let raw: Vec<(&'static str, Columns, Expect)> = vec![
        (
            "header name with a space",
            vec![("headers", q(r#"{"a b": "1"}"#))],
            nats_only("field headers"),
        ),
        (
            "header name with a colon",
            vec![("headers", q(r#"{"a:b": "1"}"#))],
            nats_only("field headers"),
        ),
        (
            "header name not ASCII",
            vec![("headers", q(r#"{"café": "1"}"#))],
            nats_only("field headers"),
        ),
        (
            "CR/LF in a header value",
            vec![("headers", q(r#"{"h": "x\r\nNats-Msg-Id: 1"}"#))],
            nats_only("field headers"),
        ),
        (
            "CR/LF in aggregate_id",
            vec![("aggregate_id", "E'bad\\r\\nagg'".into())],
            nats_only("field aggregate_id"),
        ),
        (
            "LF in event_type",
            vec![("event_type", "E'Order\\nCreated'".into())],
            nats_only("field event_type"),
        ),
        (
            "CR/LF in content_type",
            vec![("content_type", "E'text/plain\\r\\nX-Evil: 1'".into())],
            nats_only("field content_type"),
        ),
        (
            "LF in correlation_id",
            vec![("correlation_id", "E'c\\n1'".into())],
            nats_only("field correlation_id"),
        ),
        (
            "CR in aggregate_type",
            vec![("aggregate_type", "E'order\\r'".into())],
            nats_only("field aggregate_type"),
        ),
        (
            "CR/LF in traceparent",
            vec![("traceparent", format!("E'{tp}\\r\\n'"))],
            Fails("field traceparent"),
        ),
        (
            "headers not an object",
            vec![("headers", q(r#"["a"]"#))],
            Fails("field headers"),
        ),
        (
            "header value a number",
            vec![("headers", q(r#"{"a": 1}"#))],
            Fails("field headers"),
        ),
        (
            "header value null",
            vec![("headers", q(r#"{"a": null}"#))],
            Fails("field headers"),
        ),
        (
            "header value an object",
            vec![("headers", q(r#"{"a": {"b": "c"}}"#))],
            Fails("field headers"),
        ),
        (
            "headers number beyond f64",
            vec![("headers", q(r#"{"a": 1e400}"#))],
            Fails("field headers"),
        ),
        (
            "headers nested 200 deep",
            vec![("headers", q(&nested))],
            Fails("field headers"),
        ),
        (
            "300 headers",
            vec![("headers", q(&format!("{{{many}}}")))],
            Fails("field headers"),
        ),
        (
            "a relay header in headers",
            vec![("headers", q(r#"{"x-event-id": "spoofed"}"#))],
            Fails("field headers"),
        ),
        (
            "a NATS control header in headers",
            vec![("headers", q(r#"{"Nats-Msg-Id": "spoofed"}"#))],
            nats_only("field headers"),
        ),
        (
            "occurred_at infinity",
            vec![("occurred_at", q("infinity"))],
            Fails("field occurred_at"),
        ),
        (
            "occurred_at -infinity",
            vec![("occurred_at", q("-infinity"))],
            Fails("field occurred_at"),
        ),
        (
            "occurred_at past chrono's range",
            vec![("occurred_at", q("290000-01-01 00:00:00+00"))],
            Fails("field occurred_at"),
        ),
        (
            "occurred_at far ahead but representable",
            vec![("occurred_at", q("200000-01-01 00:00:00+00"))],
            Published,
        ),
        (
            "next_attempt_at -infinity (due, a good row)",
            vec![("next_attempt_at", q("-infinity"))],
            Published,
        ),
        (
            "next_attempt_at infinity (never due)",
            vec![("next_attempt_at", q("infinity"))],
            Fails("field next_attempt_at: infinity is never due"),
        ),
        (
            "next_attempt_at past the relay's hold marker",
            vec![("next_attempt_at", q("20000-01-01 00:00:00+00"))],
            Fails("field next_attempt_at"),
        ),
        (
            "topic not ASCII",
            vec![("topic", q(&format!("{topic}{sep}ordérs")))],
            Fails("topic"),
        ),
        (
            "topic with a space",
            vec![("topic", q(&format!("{topic}{sep}a b")))],
            Fails("topic"),
        ),
        (
            "topic too long",
            vec![("topic", q(&format!("{topic}{sep}{}", "x".repeat(300))))],
            Fails("topic"),
        ),
        (
            "topic with a wildcard",
            vec![("topic", q(&wildcard))],
            Fails("field topic"),
        ),
        (
            "payload over relay.max_payload_bytes",
            vec![("payload", "decode(repeat('ab', 5000000), 'hex')".into())],
            Fails("field payload"),
        ),
        (
            "payload over the broker's limit",
            vec![("payload", "decode(repeat('ab', 2000000), 'hex')".into())],
            Fails("field payload"),
        ),
        (
            "empty payload",
            vec![("payload", "''::bytea".into())],
            Published,
        ),
        (
            "event_version 0",
            vec![("event_version", "0".into())],
            Fails("field event_version"),
        ),
        (
            "event_version negative",
            vec![("event_version", "-5".into())],
            Fails("field event_version"),
        ),
        (
            "empty aggregate_id",
            vec![("aggregate_id", q(""))],
            Fails("field aggregate_id"),
        ),
        (
            "empty event_type",
            vec![("event_type", q(""))],
            Fails("field event_type"),
        ),
    ];
    raw.into_iter()
        .enumerate()
        .map(|(i, (what, overrides, expect))| {
            let event_id = Uuid::new_v4();
            let agg = format!("bad-{i}");
            let mut columns: Vec<(&'static str, String)> = vec![
                ("event_id", q(&event_id.to_string())),
                ("topic", q(topic)),
                ("aggregate_id", q(&agg)),
                ("event_type", q("OrderCreated")),
                (
                    "payload",
                    format!("convert_to('{{\"agg\": \"{agg}\", \"seq\": 0}}', 'UTF8')"),
                ),
            ];
            for (col, expr) in overrides {
                match columns.iter_mut().find(|(c, _)| *c == col) {
                    Some(slot) => slot.1 = expr,
                    None => columns.push((col, expr)),
                }
            }
            Case {
                what,
                event_id,
                columns,
                expect,
            }
        })
        .collect()
}

async fn insert(db: &TestDb, case: &Case) {
    let names: Vec<&str> = case.columns.iter().map(|(c, _)| *c).collect();
    let values: Vec<&str> = case.columns.iter().map(|(_, v)| v.as_str()).collect();
    db.sql(&format!(
        "INSERT INTO {{t}} ({}) VALUES ({})",
        names.join(", "),
        values.join(", ")
    ))
    .await;
}

/// 200 good events over 10 aggregates, half before and half after the hostile rows, so that
/// claims mix both.
async fn write_rows(db: &TestDb, topic: &str, cases: &[Case]) -> Vec<NewEvent> {
    let good: Vec<NewEvent> = (0..20)
        .flat_map(|seq| (0..10).map(move |a| (a, seq)))
        .map(|(a, seq)| numbered_on(topic, &format!("a{a}"), seq))
        .collect();
    db.enqueue(&good[..100]).await;
    for c in cases {
        insert(db, c).await;
    }
    db.enqueue(&good[100..]).await;
    good
}

fn config(db: &TestDb) -> Config {
    let mut cfg = db.config();
    // Above the brokers' 1 MB limits, so the backends' own size checks are exercised too.
    cfg.relay.max_payload_bytes = 4 << 20;
    cfg
}

/// Runs a relay until no row is pending, checks it is still running, and checks every
/// hostile row's fate in the table. Returns the event ids that must be on the broker.
async fn relay_all(
    db: &TestDb,
    backend: &str,
    publisher: Arc<dyn Publisher>,
    good: &[NewEvent],
    cases: &[Case],
) -> HashSet<Uuid> {
    let relay = db
        .relay_with(
            &config(db),
            vec![(backend, publisher)],
            &[common::route("*", backend)],
        )
        .await;
    let (h, stop) = spawn(relay);
    wait_for_or_dump(
        DEADLINE,
        &format!("{backend}: no row pending"),
        || async { db.count("status = 'pending'").await == 0 },
        || async { format!("relay finished: {}\n{}", h.is_finished(), pending(db).await) },
    )
    .await;
    assert!(!h.is_finished(), "the relay stopped on its own");
    let mut problems = Vec::new();
    let mut published: HashSet<Uuid> = good.iter().map(|e| e.event_id).collect();
    for c in cases {
        let row = db.row(c.event_id).await;
        match (&c.expect, &row) {
            (Expect::Published, None) => {
                published.insert(c.event_id);
            }
            (Expect::Fails(field), Some((status, _, Some(err))))
                if status == "failed" && err.contains(field) => {}
            _ => problems.push(format!(
                "{}: expected {:?}, row is {row:?}",
                c.what, c.expect
            )),
        }
    }
    assert!(problems.is_empty(), "{backend}:\n{}", problems.join("\n"));
    for e in good {
        assert_eq!(
            db.row(e.event_id).await,
            None,
            "good event {} left",
            e.event_id
        );
    }
    stop.cancel();
    h.await.expect("the relay ends without a panic");
    published
}

/// The rows still pending, for a failure message.
async fn pending(db: &TestDb) -> String {
    let rows: Vec<(i64, String, String, i32, Option<String>)> = sqlx::query_as(&format!(
        "SELECT id, left(aggregate_id, 20), next_attempt_at::text, attempts, last_error \
         FROM {} WHERE status = 'pending' ORDER BY id LIMIT 20",
        db.names.qualified()
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap_or_default();
    rows.iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn event_id(r: &Received) -> Uuid {
    r.headers
        .get("X-Event-ID")
        .and_then(|v| v.parse().ok())
        .expect("an X-Event-ID header")
}

/// Every expected event arrived (none of the failed ones), and the good ones in order.
fn check_received(got: &[Received], expected: &HashSet<Uuid>, good: &[NewEvent], cases: &[Case]) {
    let ids: HashSet<Uuid> = got.iter().map(event_id).collect();
    let missing: Vec<&Uuid> = expected.difference(&ids).collect();
    assert!(missing.is_empty(), "not on the broker: {missing:?}");
    for c in cases {
        if c.expect != Expect::Published {
            assert!(!ids.contains(&c.event_id), "{} was sent", c.what);
        }
        if c.what == "empty payload" {
            let r = got.iter().find(|r| event_id(r) == c.event_id).unwrap();
            assert!(r.body.is_empty(), "an empty payload arrives empty");
        }
    }
    let good_ids: HashSet<Uuid> = good.iter().map(|e| e.event_id).collect();
    let in_order: Vec<Received> = got
        .iter()
        .filter(|r| good_ids.contains(&event_id(r)))
        .cloned()
        .collect();
    assert_eq!(in_order.len(), good.len(), "each good event once");
    assert_in_order(&in_order);
}

#[tokio::test]
async fn hostile_rows_never_crash_or_stall_a_relay_on_jetstream() {
    let _w = watchdog("hostile jetstream", Duration::from_secs(300));
    let b = JetStream::new().await;
    let db = TestDb::new().await;
    let topic = format!("{}.orders", b.prefix);
    let cases = cases(Wire::Nats, &topic);
    let good = write_rows(&db, &topic, &cases).await;
    let expected = relay_all(&db, "nats", b.publisher.clone(), &good, &cases).await;
    let got = n::read_stream(&b.js, &b.stream).await;
    check_received(&got, &expected, &good, &cases);
    db.drop_schema().await;
    b.delete().await;
}

#[tokio::test]
async fn hostile_rows_never_crash_or_stall_a_relay_on_kafka() {
    let _w = watchdog("hostile kafka", Duration::from_secs(300));
    let topic = unique_topic();
    create_topic(&brokers(), &topic, 3).await;
    let reader = GroupReader::start(&brokers(), &topic);
    let db = TestDb::new().await;
    let cases = cases(Wire::Kafka, &topic);
    let good = write_rows(&db, &topic, &cases).await;
    let expected = relay_all(&db, "kafka", kafka_publisher(&brokers()), &good, &cases).await;
    wait_for(DEADLINE, "every published event read back", || async {
        let ids: HashSet<Uuid> = reader.received().iter().map(event_id).collect();
        expected.is_subset(&ids)
    })
    .await;
    check_received(&reader.received(), &expected, &good, &cases);
    db.drop_schema().await;
}

/// An aggregate whose first event a producer wrote with `next_attempt_at = infinity`, and two
/// good events after it: the first fails naming the value, the others are held behind it
/// (not lost, not published ahead of it), and a replay sends all three, in order.
#[tokio::test]
async fn a_never_due_head_fails_and_holds_its_aggregate_until_replayed() {
    let b = JetStream::new().await;
    let db = TestDb::new().await;
    let topic = format!("{}.orders", b.prefix);
    let events: Vec<NewEvent> = (0..3).map(|seq| numbered_on(&topic, "inf", seq)).collect();
    db.enqueue(&events).await;
    db.sql(&format!(
        "UPDATE {{t}} SET next_attempt_at = 'infinity' WHERE event_id = '{}'",
        events[0].event_id
    ))
    .await;
    let monitor = outbox_relay::config::MonitorConfig {
        backlog_interval: outbox_relay::config::Dur::ms(200),
        ..Default::default()
    };
    let relay = db
        .relay_with(
            &db.config(),
            vec![("nats", b.publisher.clone())],
            &[common::route("*", "nats")],
        )
        .await
        .with_monitor(monitor, "never-due".into());
    let (h, stop) = spawn(relay);
    let held = format!(
        "status = 'pending' AND next_attempt_at = '{}'",
        outbox_relay::store::HELD_UNTIL
    );
    wait_for(DEADLINE, "the head failed and the rest held", || async {
        db.count("status = 'failed'").await == 1 && db.count(&held).await == 2
    })
    .await;
    let (status, _, err) = db.row(events[0].event_id).await.unwrap();
    assert_eq!(status, "failed");
    let err = err.unwrap();
    assert!(
        err.contains("field next_attempt_at: infinity is never due"),
        "{err}"
    );
    assert!(
        n::read_stream(&b.js, &b.stream).await.is_empty(),
        "nothing overtook it"
    );
    let store = outbox_relay::store::Store::connect(
        &db.config().database,
        &outbox_relay::store::Session {
            application_name: "never-due-replay".into(),
            idle_in_transaction_timeout: None,
            operator: true,
        },
    )
    .await
    .unwrap();
    store
        .replay(
            outbox_relay::store::ops::Target::Failed,
            &outbox_relay::store::ops::Filter {
                aggregate_id: Some("inf".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    wait_for(DEADLINE, "all three published after the replay", || async {
        db.total().await == 0
    })
    .await;
    stop.cancel();
    h.await.unwrap();
    let got = n::read_stream(&b.js, &b.stream).await;
    assert_eq!(got.len(), 3);
    assert_in_order(&got);
    b.delete().await;
    db.drop_schema().await;
}

/// A table whose status CHECK was dropped, with an earlier row of an aggregate in a status the
/// relay does not know: the row behind it fails naming the value (its order cannot be known),
/// and another aggregate is published as usual.
#[tokio::test]
async fn a_predecessor_in_an_unknown_status_fails_the_row_behind_it_naming_the_value() {
    let b = JetStream::new().await;
    let db = TestDb::new().await;
    let topic = format!("{}.orders", b.prefix);
    let odd: Vec<NewEvent> = (0..2).map(|seq| numbered_on(&topic, "odd", seq)).collect();
    let other = numbered_on(&topic, "other", 0);
    db.enqueue(&odd).await;
    db.enqueue(std::slice::from_ref(&other)).await;
    db.sql(&format!(
        "ALTER TABLE {{t}} DROP CONSTRAINT {}_status_check",
        db.names.table
    ))
    .await;
    db.sql(&format!(
        "UPDATE {{t}} SET status = 'paused', next_attempt_at = now() WHERE event_id = '{}'",
        odd[0].event_id
    ))
    .await;
    let relay = db
        .relay_with(
            &db.config(),
            vec![("nats", b.publisher.clone())],
            &[common::route("*", "nats")],
        )
        .await;
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "the row behind the odd one failed", || async {
        db.count("status = 'failed'").await == 1 && db.row(other.event_id).await.is_none()
    })
    .await;
    let (status, _, err) = db.row(odd[1].event_id).await.unwrap();
    assert_eq!(status, "failed");
    let err = err.unwrap();
    assert!(
        err.contains("field prev_status: \"paused\" is not pending, failed or published"),
        "{err}"
    );
    let (status, _, _) = db.row(odd[0].event_id).await.unwrap();
    assert_eq!(status, "paused", "the odd row itself is left as it is");
    stop.cancel();
    h.await.unwrap();
    let got = n::read_stream(&b.js, &b.stream).await;
    assert_eq!(got.len(), 1, "only the other aggregate's event");
    assert_eq!(event_id(&got[0]), other.event_id);
    b.delete().await;
    db.drop_schema().await;
}

/// A pending event dated past chrono's last year (262 142; Postgres takes up to 294 276), alone
/// in the backlog: the backlog gauge and `status` leave it out of "oldest pending" instead of
/// panicking in sqlx's date decoding (which would kill the housekeeping task).
#[tokio::test]
async fn an_event_dated_past_chronos_range_leaves_the_backlog_and_status_readable() {
    let db = TestDb::new().await;
    let far = numbered_on("orders", "far", 0);
    db.enqueue(std::slice::from_ref(&far)).await;
    db.sql(&format!(
        "UPDATE {{t}} SET occurred_at = '270000-01-01 00:00:00+00' WHERE event_id = '{}'",
        far.event_id
    ))
    .await;
    let store = outbox_relay::store::Store::with_pool(db.pool.clone(), db.names.clone());
    let backlog = store.backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.oldest_pending), (1, None));
    let status = store.status().await.unwrap();
    assert_eq!(status.oldest_pending_at, None);
    assert_eq!(status.totals.pending, 1);
    db.drop_schema().await;
}
