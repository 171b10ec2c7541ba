//! The command line as a user meets it: help, migrate, check, configuration errors, logs.

mod common;

use common::{free_port, output_text as text, relay_bin, TestDb};
use std::process::{Command, Output};
use std::time::Duration;

fn relay(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(relay_bin());
    c.current_dir(dir).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run the relay binary")
}

#[test]
fn every_command_has_help() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["migrate", "--help"],
        vec!["check", "--help"],
    ] {
        let o = relay(dir.path(), &args, &[]);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("Usage"), "{args:?}: {}", text(&o));
    }
    let o = relay(dir.path(), &["--help"], &[]);
    for cmd in ["run", "migrate", "check"] {
        assert!(text(&o).contains(cmd));
    }
}

#[tokio::test]
async fn migrate_creates_the_outbox_and_check_reports_every_component() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let schema = format!("{}_cli", db.schema());
    let base = [
        "--database-url",
        db.url.as_str(),
        "--schema",
        schema.as_str(),
    ];
    // Before migrate: check names the problem and the fix.
    let o = relay(dir.path(), &[&base[..], &["check"]].concat(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("outbox-relay migrate"), "{}", text(&o));

    let o = relay(dir.path(), &[&base[..], &["migrate"]].concat(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = relay(dir.path(), &[&base[..], &["check"]].concat(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    for line in [
        "ok       config",
        "ok       database",
        "ok       outbox",
        "ok       backend    stdout",
        "ok       route      *",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&db.pool)
        .await
        .unwrap();
    db.drop_schema().await;
}

#[test]
fn check_against_an_unreachable_database_exits_1_without_printing_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://relay:s3cret-pw@127.0.0.1:{}/db", free_port());
    let o = relay(
        dir.path(),
        &["--database-url", &url, "check"],
        &[("RELAY__DATABASE__CONNECT_TIMEOUT", "1s")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("PROBLEM  database"), "{}", text(&o));
    assert!(
        !text(&o).contains("s3cret-pw"),
        "password printed: {}",
        text(&o)
    );
    assert!(text(&o).contains("relay:***@"), "{}", text(&o));
}

#[test]
fn an_unknown_key_in_the_file_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("relay.toml"), "[relay]\nbatchsize = 10\n").unwrap();
    let o = relay(dir.path(), &["check"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("batchsize"), "{}", text(&o));
    let o = relay(dir.path(), &["--config", "missing.toml", "check"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("missing.toml"), "{}", text(&o));
}

#[test]
fn a_bad_environment_value_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = relay(dir.path(), &["run"], &[("RELAY__RELAY__BATCH_SIZE", "0")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("relay.batch_size"), "{}", text(&o));
    let o = relay(
        dir.path(),
        &["run"],
        &[("RELAY__RELAY__PUBLISH_TIMEOUT", "soon")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("publish_timeout"), "{}", text(&o));
}

#[tokio::test]
async fn run_drain_publishes_to_stdout_and_logs_json_on_request() {
    let db = TestDb::new().await;
    db.enqueue_interleaved(3, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let o = relay(
        dir.path(),
        &[
            "--database-url",
            &db.url,
            "--schema",
            db.schema(),
            "--log-format",
            "json",
            "run",
            "--drain",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().count(), 6, "{stdout}");
    for line in String::from_utf8_lossy(&o.stderr).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    assert!(String::from_utf8_lossy(&o.stderr).contains("relay stopped"));
    assert_eq!(db.total().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_running_relay_logs_a_periodic_summary_with_published_failed_and_pending() {
    use std::io::{BufRead, BufReader};
    let db = TestDb::new().await;
    db.enqueue_interleaved(5, 2).await;
    db.sql("INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'bad topic', 'z', 'T', 'x')")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(relay_bin())
        .current_dir(dir.path())
        .args([
            "--database-url",
            &db.url,
            "--schema",
            db.schema(),
            "--log-format",
            "json",
            "run",
        ])
        .env("RELAY__RELAY__SUMMARY_INTERVAL", "300ms")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Summaries cover a window each; add them up until the whole backlog is accounted for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (mut published, mut failed, mut pending_seen) = (0, 0, None);
    while published < 10 || failed < 1 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("summary lines within the deadline");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "summary" {
            published += v["published"].as_u64().unwrap();
            failed += v["failed"].as_u64().unwrap();
            pending_seen = Some(v["pending"].as_str().unwrap().to_string());
            assert!(
                v["rate"].is_string() && v.get("in_flight").is_some(),
                "{line}"
            );
        }
    }
    assert_eq!((published, failed), (10, 1));
    assert_eq!(pending_seen.as_deref(), Some("0"));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    db.drop_schema().await;
}

/// `check` with both brokers: each reachable, each NATS topic's mode shown, provisioning
/// differences reported without changing anything; an unreachable broker is a problem.
#[tokio::test]
async fn check_reports_brokers_topic_modes_and_drift_without_changing_anything() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let stream = format!("CLI{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topic = common::kafka::unique_topic();
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            r#"
[database]
url = "{url}"
schema = "{schema}"

[backends.kafka]
type = "kafka"
bootstrap_servers = "{brokers}"
provisioning = "validate_only"
[backends.kafka.topics."{topic}"]
partitions = 3
sasl_password_is_not_a_key = 1
"#,
            url = db.url,
            schema = db.schema(),
            brokers = common::kafka::brokers(),
        ),
    )
    .unwrap();
    // A key that does not exist, even deep in a backend, stops the start naming it.
    let o = relay(dir.path(), &["check"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("sasl_password_is_not_a_key"),
        "{}",
        text(&o)
    );

    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            r#"
[database]
url = "{url}"
schema = "{schema}"

[backends.kafka]
type = "kafka"
bootstrap_servers = "{brokers}"
sasl_password = "hunter2"
provisioning = "validate_only"
[backends.kafka.topics."{topic}"]
partitions = 3

[backends.nats]
type = "nats"
servers = ["{nats}"]
provisioning = "create_only"
[backends.nats.topics."live.*"]
persistence = "ephemeral"
[backends.nats.streams.{stream}]
subjects = ["{stream_l}.>"]

[[routes]]
topic = "live.*"
backend = "nats"
[[routes]]
topic = "*"
backend = "kafka"
"#,
            url = db.url,
            schema = db.schema(),
            brokers = common::kafka::brokers(),
            nats = common::nats::nats_url(),
            stream_l = stream.to_lowercase(),
        ),
    )
    .unwrap();
    let o = relay(dir.path(), &["check"], &[]);
    let out = text(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the Kafka drift is a problem: {out}"
    );
    assert!(out.contains("ok       backend    kafka (kafka)"), "{out}");
    assert!(out.contains("ok       backend    nats (nats)"), "{out}");
    assert!(
        out.contains(&format!(
            "PROBLEM  drift      kafka: {topic}: does not exist"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "notice   drift      nats: {stream}: does not exist"
        )),
        "{out}"
    );
    assert!(
        out.contains("live.* -> nats: ephemeral (core NATS)"),
        "{out}"
    );
    assert!(
        out.contains("(others) -> nats: persistent (JetStream)"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "a secret printed: {out}");

    // Nothing was created.
    let client = async_nats::connect(common::nats::nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    assert!(
        js.get_stream(&stream).await.is_err(),
        "check created a stream"
    );

    // An unreachable broker is a problem, and says so.
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            "[database]\nurl = \"{}\"\nschema = \"{}\"\n[backends.nats]\ntype = \"nats\"\n\
             servers = [\"nats://127.0.0.1:{}\"]\nconnect_timeout = \"500ms\"\n",
            db.url,
            db.schema(),
            free_port()
        ),
    )
    .unwrap();
    let o = relay(dir.path(), &["check"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("PROBLEM  backend    nats (nats): not connected to NATS"),
        "{}",
        text(&o)
    );
    db.drop_schema().await;
}

#[test]
fn an_unknown_librdkafka_property_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("relay.toml"),
        "[backends.k]\ntype = \"kafka\"\n[backends.k.properties]\n\"linger.msec\" = \"5\"\n",
    )
    .unwrap();
    let o = relay(dir.path(), &["check"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("backends.k.properties.\"linger.msec\""),
        "{}",
        text(&o)
    );
}

/// `run` started before its database waits for it, retrying with backoff and naming the cause
/// once per attempt (connection refused, not the pool's "timed out"), then relays as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_waits_for_a_database_that_is_not_up_yet() {
    use std::io::{BufRead, BufReader};
    let pg = common::PrivatePostgres::start();
    let db = TestDb::on(&pg.url()).await;
    db.enqueue_interleaved(3, 2).await;
    pg.stop_server();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(relay_bin())
        .current_dir(dir.path())
        .args(["--database-url", &db.url, "--schema", db.schema(), "run"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = |r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    };
    let err = lines(Box::new(child.stderr.take().unwrap()));
    let out = lines(Box::new(child.stdout.take().unwrap()));
    let mut waiting = Vec::new();
    while waiting.len() < 2 {
        let line = err
            .recv_timeout(Duration::from_secs(30))
            .expect("the relay says it is waiting for the database");
        if line.contains("cannot start yet") {
            waiting.push(line);
        }
    }
    for line in &waiting {
        assert!(
            line.contains("Connection refused"),
            "the cause named: {line}"
        );
        assert!(!line.contains("pool timed out"), "{line}");
        assert_eq!(
            line.matches("Connection refused").count(),
            1,
            "once: {line}"
        );
    }
    pg.start_server();
    let mut printed = 0;
    while printed < 6 {
        out.recv_timeout(Duration::from_secs(60))
            .expect("events printed once the database is up");
        printed += 1;
    }
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(db.total().await, 0);
    db.drop_schema().await;
}
