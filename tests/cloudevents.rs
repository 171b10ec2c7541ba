//! CloudEvents routes against the real brokers (tansu on 127.0.0.1:9092, nats-server with
//! JetStream on 127.0.0.1:4222), in both content modes, decoded by an independent SDK: the
//! `cloudevents` Python package, run by tests/cloudevents_decode.py (Kafka binding on Kafka,
//! HTTP binding on NATS, which shares the NATS binding's `ce-` headers). Rows a CloudEvent
//! cannot carry end failed with their reason and never reach the broker.
//!
//! The example consumers of docs/CONSUMERS.md (examples/consumers/) are run here too, against
//! events the relay published, and their output is checked.
//!
//! Needs Python 3 with `cloudevents`, `confluent-kafka` and `nats-py`: scripts/consumer-tools.sh
//! (`ensure_consumer_tools`) installs them; a missing one fails the test naming the install.

mod common;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use common::kafka::{self as k, KafkaUnderTest};
use common::nats::{self as n, JetStream};
use common::{spawn, wait_for, TestDb};
use outbox_relay::config::RouteConfig;
use outbox_relay::envelope::{BodyFormat, CeSource, CloudEventsFormat, CloudEventsMode};
use outbox_relay::publisher::Publisher;
use outbox_relay::store::NewEvent;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(90);
const SOURCE: &str = "https://orders.example.com/relay";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs a Python script of the repository with a deadline; its stdout lines as JSON. A failure
/// (a missing package included: the scripts name the install) fails the test with its stderr.
async fn run_python(script: &str, args: &[String]) -> Vec<Value> {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(repo_file(script)).args(args).kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} still running after {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("running {} {script}: {e}", python()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{script}: {e}: {l}")))
        .collect()
}

fn cloudevents(mode: CloudEventsMode) -> BodyFormat {
    BodyFormat::CloudEvents(CloudEventsFormat {
        mode,
        source: CeSource::new(SOURCE),
    })
}

/// What the SDK should give for one event's data: the same in both modes.
struct Expected {
    event: NewEvent,
    data: Value,
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Events that make good CloudEvents (JSON, binary, JSON-declared bytes that are not UTF-8,
/// a non-ASCII aggregate with no content type, no payload), each on its own aggregate.
fn good_events(topic: &str) -> Vec<Expected> {
    let mut json_event = NewEvent::json(
        topic,
        "order-1",
        "OrderPaid",
        &json!({"order": 1, "total": 99.5}),
    )
    .unwrap();
    json_event.aggregate_type = Some("order".into());
    json_event.correlation_id = Some("corr-1".into());
    json_event.traceparent = Some(TRACEPARENT.into());
    json_event.headers = Some(json!({"tenant": "acme"}));
    json_event.occurred_at = Some(at("2026-11-28T12:34:56.123456Z"));

    let proto = vec![0x08, 0x96, 0x01, 0xff, 0x00];
    let mut protobuf = NewEvent::new(topic, "order-2", "OrderShipped", proto.clone());
    protobuf.content_type = Some("application/x-protobuf".into());
    protobuf.occurred_at = Some(at("2026-11-28T12:35:00Z"));

    let broken = b"{\"a\":\"\xff\"}".to_vec();
    let mut not_utf8 = NewEvent::new(topic, "order-3", "OrderNoted", broken.clone());
    not_utf8.content_type = Some("application/json".into());

    let untyped = NewEvent::new(
        topic,
        "kunde \u{df} 1",
        "CustomerSeen",
        br#"{"k":"\u00df"}"#,
    );

    let empty = NewEvent::new(topic, "order-5", "OrderClosed", Vec::new());

    vec![
        Expected {
            event: json_event,
            data: json!({"json": {"order": 1, "total": 99.5}}),
        },
        Expected {
            event: protobuf,
            data: json!({"bytes": b64(&proto)}),
        },
        Expected {
            event: not_utf8,
            data: json!({"bytes": b64(&broken)}),
        },
        Expected {
            event: untyped,
            data: json!({"json": {"k": "\u{df}"}}),
        },
        Expected {
            event: empty,
            data: Value::Null,
        },
    ]
}

/// Rows no CloudEvent can carry, with a piece of the reason each must fail with.
fn hostile_events(topic: &str) -> Vec<(NewEvent, &'static str)> {
    let tab = NewEvent::new(topic, "a\tb", "OrderPaid", b"{}".to_vec());
    let mut spoof = NewEvent::new(topic, "order-7", "OrderPaid", b"{}".to_vec());
    spoof.headers = Some(json!({"ce_id": "spoofed"}));
    let mut far = NewEvent::new(topic, "order-8", "OrderPaid", b"{}".to_vec());
    far.occurred_at = Some(at("+12000-01-01T00:00:00Z"));
    vec![
        (tab, "(CloudEvents attribute subject)"),
        (spoof, "reserved for CloudEvents attributes"),
        (far, "(CloudEvents attribute time)"),
    ]
}

/// Writes the events, runs a relay with one CloudEvents route until every row is published
/// or failed, and checks the failed ones' reasons. Returns the good events.
async fn relay_events(
    topic: &str,
    backend: &str,
    publisher: Arc<dyn Publisher>,
    mode: CloudEventsMode,
) -> Vec<Expected> {
    let db = TestDb::new().await;
    let good = good_events(topic);
    let hostile = hostile_events(topic);
    let mut all: Vec<NewEvent> = good.iter().map(|e| e.event.clone()).collect();
    all.extend(hostile.iter().map(|(e, _)| e.clone()));
    db.enqueue(&all).await;
    let routes = [RouteConfig {
        topic: "*".into(),
        backend: backend.into(),
        format: cloudevents(mode),
    }];
    let relay = db
        .relay_with(&db.config(), vec![(backend, publisher)], &routes)
        .await;
    let (h, stop) = spawn(relay);
    let failed = hostile.len() as i64;
    wait_for(
        DEADLINE,
        "good rows published, hostile rows failed",
        || async { db.total().await == failed && db.count("status = 'failed'").await == failed },
    )
    .await;
    stop.cancel();
    h.await.unwrap();
    for (e, reason) in &hostile {
        let (status, _, error) = db.row(e.event_id).await.expect("the hostile row");
        let error = error.unwrap_or_default();
        assert_eq!(status, "failed");
        assert!(error.contains(reason), "{}: {error}", e.aggregate_id);
    }
    db.drop_schema().await;
    good
}

/// Checks what the SDK decoded against what was written.
fn check_decoded(decoded: &[Value], expected: &[Expected], mode: CloudEventsMode, nats: bool) {
    assert_eq!(decoded.len(), expected.len(), "{decoded:#?}");
    let by_id: HashMap<&str, &Value> = decoded
        .iter()
        .map(|d| (d["id"].as_str().unwrap(), d))
        .collect();
    for x in expected {
        let e = &x.event;
        let id = e.event_id.to_string();
        let d = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} not decoded: {decoded:#?}"));
        let what = format!("{} ({:?}, nats {nats}): {d:#}", e.aggregate_id, mode);
        assert_eq!(d["mode"], mode_name(mode), "{what}");
        assert_eq!(d["specversion"], "1.0", "{what}");
        assert_eq!(d["source"], SOURCE, "{what}");
        assert_eq!(d["type"], e.event_type.as_str(), "{what}");
        assert_eq!(d["subject"], e.aggregate_id.as_str(), "{what}");
        assert_eq!(
            d["datacontenttype"].as_str(),
            e.content_type.as_deref(),
            "{what}"
        );
        let time: DateTime<Utc> = d["time"].as_str().unwrap().parse().unwrap();
        if let Some(occurred) = e.occurred_at {
            assert_eq!(time, occurred, "{what}");
        }
        assert_eq!(d["data"], x.data, "{what}");
        let ext = &d["extensions"];
        assert_eq!(ext["partitionkey"], e.aggregate_id.as_str(), "{what}");
        // A header carries the Integer's canonical string; the JSON format a number.
        let version = match mode {
            CloudEventsMode::Binary => json!("1"),
            CloudEventsMode::Structured => json!(1),
        };
        assert_eq!(ext["eventversion"], version, "{what}");
        for (name, value) in [
            ("aggregatetype", &e.aggregate_type),
            ("correlationid", &e.correlation_id),
            ("traceparent", &e.traceparent),
        ] {
            assert_eq!(ext[name].as_str(), value.as_deref(), "{name}: {what}");
        }
        // On the wire, beside what the SDK reads.
        let h = &d["headers"];
        assert_eq!(h["X-Event-ID"], id.as_str(), "{what}");
        match mode {
            CloudEventsMode::Structured => {
                assert_eq!(
                    h["content-type"], "application/cloudevents+json; charset=UTF-8",
                    "{what}"
                );
                let names = h.as_object().unwrap().keys();
                assert!(
                    names
                        .into_iter()
                        .all(|k| !k.to_lowercase().starts_with("ce")),
                    "{what}"
                );
            }
            CloudEventsMode::Binary if nats => {
                let encoded = e
                    .aggregate_id
                    .replace(' ', "%20")
                    .replace('\u{df}', "%C3%9F");
                assert_eq!(h["ce-subject"], encoded.as_str(), "{what}");
            }
            CloudEventsMode::Binary => {
                assert_eq!(h["ce_subject"], e.aggregate_id.as_str(), "{what}");
            }
        }
        if e.traceparent.is_some() {
            assert_eq!(h["traceparent"], TRACEPARENT, "{what}");
        }
    }
}

fn mode_name(mode: CloudEventsMode) -> &'static str {
    match mode {
        CloudEventsMode::Binary => "binary",
        CloudEventsMode::Structured => "structured",
    }
}

async fn kafka_round_trip(mode: CloudEventsMode) {
    let b = KafkaUnderTest::new().await;
    let good = relay_events(&b.topic, "kafka", b.publisher.clone(), mode).await;
    let decoded = run_python(
        "tests/cloudevents_decode.py",
        &[
            "kafka".into(),
            "--brokers".into(),
            k::brokers(),
            "--topic".into(),
            b.topic.clone(),
            "--count".into(),
            good.len().to_string(),
        ],
    )
    .await;
    check_decoded(&decoded, &good, mode, false);
}

async fn nats_round_trip(mode: CloudEventsMode) {
    let b = JetStream::new().await;
    let topic = format!("{}.orders", b.prefix);
    let good = relay_events(&topic, "nats", b.publisher.clone(), mode).await;
    let decoded = run_python(
        "tests/cloudevents_decode.py",
        &[
            "nats".into(),
            "--url".into(),
            n::nats_url(),
            "--stream".into(),
            b.stream.clone(),
            "--subject".into(),
            format!("{}.>", b.prefix),
            "--count".into(),
            good.len().to_string(),
        ],
    )
    .await;
    check_decoded(&decoded, &good, mode, true);
    b.delete().await;
}

#[tokio::test]
async fn kafka_binary_cloudevents_decode_with_the_python_sdk() {
    kafka_round_trip(CloudEventsMode::Binary).await;
}

#[tokio::test]
async fn kafka_structured_cloudevents_decode_with_the_python_sdk() {
    kafka_round_trip(CloudEventsMode::Structured).await;
}

#[tokio::test]
async fn nats_binary_cloudevents_decode_with_the_python_sdk() {
    nats_round_trip(CloudEventsMode::Binary).await;
}

#[tokio::test]
async fn nats_structured_cloudevents_decode_with_the_python_sdk() {
    nats_round_trip(CloudEventsMode::Structured).await;
}

// ---- The example consumers (examples/consumers/), against events the relay published ----

/// The formats the consumer tests publish, one topic each: (topic suffix, format, the format
/// the consumer reports).
fn consumer_formats() -> [(&'static str, BodyFormat, &'static str); 3] {
    [
        ("raw", BodyFormat::Raw, "raw-or-envelope"),
        (
            "ceb",
            cloudevents(CloudEventsMode::Binary),
            "cloudevents-binary",
        ),
        (
            "ces",
            cloudevents(CloudEventsMode::Structured),
            "cloudevents-structured",
        ),
    ]
}

/// Three aggregates of four numbered events on each topic, every other one with a
/// traceparent; relayed through one route per topic until all are published.
async fn relay_numbered(
    topics: &[(String, BodyFormat)],
    backend: &str,
    publisher: Arc<dyn Publisher>,
) -> Vec<NewEvent> {
    let db = TestDb::new().await;
    let mut events = Vec::new();
    for (topic, _) in topics {
        for seq in 0..4 {
            for a in 0..3 {
                let mut e = common::numbered_on(topic, &format!("{topic}-a{a}"), seq);
                if seq % 2 == 0 {
                    e.traceparent = Some(TRACEPARENT.into());
                }
                events.push(e);
            }
        }
    }
    db.enqueue(&events).await;
    let routes: Vec<RouteConfig> = topics
        .iter()
        .map(|(topic, format)| RouteConfig {
            topic: topic.clone(),
            backend: backend.into(),
            format: *format,
        })
        .collect();
    let relay = db
        .relay_with(&db.config(), vec![(backend, publisher)], &routes)
        .await;
    common::run_until_empty(&db, relay, DEADLINE).await;
    db.drop_schema().await;
    events
}

/// Checks a consumer's first run: every event once as new (the `duplicate` ids once more,
/// flagged), each topic's format recognised, each aggregate in order, the trace continued.
fn check_consumer_output(
    lines: &[Value],
    events: &[NewEvent],
    formats: &HashMap<String, &str>,
    duplicates: &[uuid::Uuid],
) {
    assert_eq!(lines.len(), events.len() + duplicates.len(), "{lines:#?}");
    let mut fresh: HashMap<String, &Value> = HashMap::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for l in lines {
        let id = l["event_id"].as_str().unwrap().to_string();
        if l["duplicate"] == json!(true) {
            assert!(
                duplicates.iter().any(|d| d.to_string() == id),
                "only the re-published event is a duplicate: {l}"
            );
            continue;
        }
        assert!(fresh.insert(id.clone(), l).is_none(), "{id} new twice");
        let payload = base64::engine::general_purpose::STANDARD
            .decode(l["payload_base64"].as_str().unwrap())
            .unwrap();
        let body: Value = serde_json::from_slice(&payload).unwrap();
        let agg = body["agg"].as_str().unwrap().to_string();
        assert_eq!(l["aggregate_id"], agg.as_str(), "{l}");
        let seq = body["seq"].as_i64().unwrap();
        let before = last_seq.insert(agg.clone(), seq);
        assert!(
            before.is_none_or(|b| b < seq),
            "{agg}: {before:?} then {seq}"
        );
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["duplicate"] == json!(true))
            .count(),
        duplicates.len()
    );
    for e in events {
        let l = fresh
            .get(&e.event_id.to_string())
            .unwrap_or_else(|| panic!("{} not consumed", e.event_id));
        assert_eq!(l["type"], "OrderCreated", "{l}");
        assert_eq!(l["format"], formats[&e.topic], "{l}");
        match &e.traceparent {
            Some(tp) => {
                let trace = tp.split('-').nth(1).unwrap();
                assert_eq!(l["trace_id"], trace, "{l}");
                let mine = l["traceparent"].as_str().unwrap();
                assert!(
                    mine.starts_with(&format!("00-{trace}-")) && mine != tp,
                    "a child span of the same trace: {l}"
                );
            }
            None => assert_eq!(l["trace_id"], Value::Null, "{l}"),
        }
    }
}

/// A second consumer (a new group or durable) with the same store of processed ids reads
/// everything again and applies nothing.
fn check_all_duplicates(lines: &[Value], expected: usize) {
    assert_eq!(lines.len(), expected, "{lines:#?}");
    assert!(
        lines.iter().all(|l| l["duplicate"] == json!(true)),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn the_kafka_consumer_example_reads_every_format_once_in_order() {
    let brokers = k::brokers();
    let publisher = k::publisher(&brokers);
    let mut topics = Vec::new();
    let mut formats = HashMap::new();
    for (_, format, shown) in consumer_formats() {
        let topic = k::unique_topic();
        k::create_topic(&brokers, &topic, 3).await;
        formats.insert(topic.clone(), shown);
        topics.push((topic, format));
    }
    let events = relay_numbered(&topics, "kafka", publisher.clone()).await;

    // As after a relay crash between publishing and marking: the first event goes out again,
    // with its event id.
    let again = events[0].clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let event = Arc::new(outbox_relay::envelope::Event {
        id: 1,
        event_id: again.event_id,
        topic: again.topic.clone(),
        aggregate_id: again.aggregate_id.clone(),
        aggregate_type: None,
        event_type: again.event_type.clone(),
        event_version: 1,
        payload: again.payload.clone(),
        headers: vec![],
        content_type: again.content_type.clone(),
        traceparent: again.traceparent.clone(),
        correlation_id: None,
        occurred_at: Utc::now(),
        attempts: 0,
    });
    let ticket = outbox_relay::publisher::AckTicket::new(1, 0, tx);
    publisher
        .publish(vec![outbox_relay::publisher::Outgoing {
            event,
            format: BodyFormat::Raw,
            ticket,
        }])
        .await;
    let ack = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(ack.outcome.is_ok(), "{:?}", ack.outcome);

    let store = tempfile::tempdir().unwrap();
    let store_path = store.path().join("processed.sqlite");
    let args = |group: &str| {
        let mut a = vec!["--brokers".to_string(), brokers.clone()];
        for (topic, _) in &topics {
            a.extend(["--topic".to_string(), topic.clone()]);
        }
        a.extend([
            "--group".to_string(),
            group.to_string(),
            "--store".to_string(),
            store_path.display().to_string(),
            "--count".to_string(),
            (events.len() + 1).to_string(),
            "--timeout".to_string(),
            "60".to_string(),
        ]);
        a
    };
    let lines = run_python(
        "examples/consumers/kafka_consumer.py",
        &args(&format!("g-{}", uuid::Uuid::new_v4().simple())),
    )
    .await;
    check_consumer_output(&lines, &events, &formats, &[again.event_id]);
    let lines = run_python(
        "examples/consumers/kafka_consumer.py",
        &args(&format!("g-{}", uuid::Uuid::new_v4().simple())),
    )
    .await;
    check_all_duplicates(&lines, events.len() + 1);
}

#[tokio::test]
async fn the_nats_consumer_example_reads_every_format_once_in_order() {
    let b = JetStream::new().await;
    let mut topics = Vec::new();
    let mut formats = HashMap::new();
    for (suffix, format, shown) in consumer_formats() {
        let topic = format!("{}.{suffix}", b.prefix);
        formats.insert(topic.clone(), shown);
        topics.push((topic, format));
    }
    let events = relay_numbered(&topics, "nats", b.publisher.clone()).await;
    let store = tempfile::tempdir().unwrap();
    let store_path = store.path().join("processed.sqlite");
    let args = |durable: &str| {
        [
            "--url",
            &n::nats_url(),
            "--stream",
            &b.stream,
            "--subject",
            &format!("{}.>", b.prefix),
            "--durable",
            durable,
            "--store",
            &store_path.display().to_string(),
            "--count",
            &events.len().to_string(),
            "--timeout",
            "60",
        ]
        .map(String::from)
        .to_vec()
    };
    let lines = run_python("examples/consumers/nats_consumer.py", &args("first")).await;
    check_consumer_output(&lines, &events, &formats, &[]);
    assert!(lines.iter().all(|l| l["redelivered"] == json!(false)));
    let lines = run_python("examples/consumers/nats_consumer.py", &args("second")).await;
    check_all_duplicates(&lines, events.len());
    b.delete().await;
}
