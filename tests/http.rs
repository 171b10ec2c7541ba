//! The HTTP endpoints of a running relay (the binary, against the real Postgres and, for
//! backend readiness, a NATS server of the test's own): /metrics, /livez, /readyz, /health read
//! real values; readiness follows Postgres and the backends; backlog thresholds log once and set
//! their gauge.

mod common;

use common::nats::PrivateNats;
use common::{free_port, relay_bin, wait_for, watchdog, PrivatePostgres, TestDb};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

/// A relay process with its HTTP endpoints on a free port and its log lines collected.
struct RelayProcess {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    fn start(url: &str, schema: &str, config: &str, env: &[(&str, &str)]) -> RelayProcess {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("relay.toml"), config).unwrap();
        let port = free_port();
        let mut cmd = Command::new(relay_bin());
        cmd.current_dir(dir.path())
            .args([
                "--database-url",
                url,
                "--schema",
                schema,
                "--log-format",
                "json",
                "run",
            ])
            .env("RELAY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
            .env("RELAY__MONITOR__HEALTH_INTERVAL", "200ms")
            .env("RELAY__MONITOR__BACKLOG_INTERVAL", "200ms")
            .env("RELAY__RELAY__POLL_INTERVAL", "100ms")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        RelayProcess {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// GET `path`: (status code, body); `None` while nothing listens.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        common::http_get(self.port, path)
    }

    fn status(&self, path: &str) -> u16 {
        self.get(path).map(|(c, _)| c).unwrap_or(0)
    }

    fn health(&self) -> serde_json::Value {
        let (_, body) = self.get("/health").expect("the relay answers /health");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health is JSON ({e}): {body}"))
    }

    /// The value of one series in /metrics, by its exact name and labels as exposed.
    fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn log_lines_with(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the relay exits 0 on SIGTERM: {status}");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // A failed wait says what it waited for; the relay's own last words say why.
        if std::thread::panicking() {
            let log = self.log.lock().unwrap();
            let from = log.len().saturating_sub(40);
            eprintln!("--- the relay's last {} log lines ---", log.len() - from);
            for line in &log[from..] {
                eprintln!("{line}");
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!("--- the relay had exited: {status} ---");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rows the relay will not take for an hour, written that way in one statement (an INSERT and
/// then an UPDATE would race the relay): a backlog that stays put.
async fn scheduled_later(db: &TestDb, n: usize, agg: &str) {
    db.sql(&format!(
        "INSERT INTO {{t}} (event_id, topic, aggregate_id, event_type, payload, next_attempt_at) \
         SELECT gen_random_uuid(), 'orders.later', '{agg}', 'T', 'x', now() + interval '1 hour' \
         FROM generate_series(1, {n})"
    ))
    .await;
}

#[tokio::test]
async fn metrics_health_livez_and_readyz_report_real_values() {
    let _watchdog = watchdog(
        "metrics_health_livez_and_readyz_report_real_values",
        Duration::from_secs(180),
    );
    let db = TestDb::new().await;
    let relay = RelayProcess::start(&db.url, db.schema(), "", &[]);
    wait_for(DEADLINE, "/readyz 200", || async {
        relay.status("/readyz") == 200
    })
    .await;
    assert_eq!(relay.status("/livez"), 200);
    assert_eq!(relay.status("/nowhere"), 404);

    // The backlog rises: 7 rows scheduled for later, 1 failed.
    scheduled_later(&db, 7, "later").await;
    db.sql("INSERT INTO {t} (event_id, topic, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'bad topic', 'z', 'T', 'x')")
        .await;
    wait_for(DEADLINE, "pending 7 and failed 1 in /metrics", || async {
        relay.metric("outbox_relay_pending_events") == Some(7.0)
            && relay.metric("outbox_relay_failed_events") == Some(1.0)
    })
    .await;
    assert_eq!(relay.metric("outbox_relay_pending_due_events"), Some(0.0));
    let age = relay
        .metric("outbox_relay_oldest_pending_age_seconds")
        .unwrap();
    assert!((0.0..60.0).contains(&age), "oldest pending age {age}");
    assert_eq!(
        relay.metric(r#"outbox_relay_events_failed_total{topic="bad topic",backend="stdout"}"#),
        Some(1.0)
    );

    // 12 events published: per-topic counters, both latency histograms, claim sizes.
    db.enqueue(&common::interleaved(4, 3, 0)).await;
    wait_for(DEADLINE, "12 published in /metrics", || async {
        relay.metric(
            r#"outbox_relay_events_published_total{topic="orders.created",backend="stdout"}"#,
        ) == Some(12.0)
    })
    .await;
    for series in [
        r#"outbox_relay_publish_latency_seconds_count{backend="stdout"}"#,
        r#"outbox_relay_end_to_end_latency_seconds_count{backend="stdout"}"#,
    ] {
        assert_eq!(relay.metric(series), Some(12.0), "{series}");
    }
    assert!(relay.metric("outbox_relay_claim_batch_size_count").unwrap() >= 1.0);
    assert!(relay.metric("outbox_relay_claim_batch_size_sum").unwrap() >= 13.0);
    assert_eq!(
        relay.metric(r#"outbox_relay_backend_up{backend="stdout"}"#),
        Some(1.0)
    );
    assert_eq!(relay.metric("outbox_relay_database_up"), Some(1.0));

    let h = relay.health();
    assert_eq!(h["status"], "ready", "{h}");
    assert_eq!(h["database"]["up"], true, "{h}");
    assert_eq!(h["backends"][0]["name"], "stdout", "{h}");
    assert_eq!(h["backends"][0]["up"], true, "{h}");
    assert_eq!(h["backlog"]["pending"], 7, "{h}");
    assert_eq!(h["backlog"]["failed"], 1, "{h}");
    assert_eq!(h["relay"]["published"], 12, "{h}");
    let last: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(h["last_publish_at"].clone()).expect("a last publish time");
    assert!((chrono::Utc::now() - last).num_seconds() < 60, "{h}");
    relay.stop();
    db.drop_schema().await;
}

#[tokio::test]
async fn readiness_turns_false_while_postgres_is_stopped() {
    let _watchdog = watchdog(
        "readiness_turns_false_while_postgres_is_stopped",
        Duration::from_secs(180),
    );
    let pg = PrivatePostgres::start();
    let db = TestDb::on(&pg.url()).await;
    let relay = RelayProcess::start(&db.url, db.schema(), "", &[]);
    wait_for(DEADLINE, "/readyz 200", || async {
        relay.status("/readyz") == 200
    })
    .await;
    db.pool.close().await;
    pg.stop_server();
    // Probes run every 200ms with a 1s limit, in a loop of their own: readiness turns within
    // seconds. (It once waited behind backlog counts, each stuck up to the pool's 5s acquire
    // timeout, and took 3 to over 60 seconds.)
    wait_for(
        Duration::from_secs(10),
        "/readyz 503 naming postgres",
        || async { matches!(relay.get("/readyz"), Some((503, body)) if body.contains("postgres")) },
    )
    .await;
    let h = relay.health();
    assert_eq!(h["status"], "not_ready", "{h}");
    assert_eq!(h["database"]["up"], false, "{h}");
    assert_eq!(relay.metric("outbox_relay_database_up"), Some(0.0));
    assert_eq!(
        relay.status("/livez"),
        200,
        "alive while the database is away"
    );
    pg.start_server();
    wait_for(DEADLINE, "/readyz 200 again", || async {
        relay.status("/readyz") == 200
    })
    .await;
    relay.stop();
}

#[tokio::test]
async fn readiness_turns_false_while_a_backend_is_unreachable() {
    let _watchdog = watchdog(
        "readiness_turns_false_while_a_backend_is_unreachable",
        Duration::from_secs(180),
    );
    let mut nats = PrivateNats::start();
    let db = TestDb::new().await;
    let config = format!(
        "[backends.bus]\ntype = \"nats\"\nservers = [\"{}\"]\npersistence = \"ephemeral\"\n",
        nats.url()
    );
    let relay = RelayProcess::start(&db.url, db.schema(), &config, &[]);
    wait_for(DEADLINE, "/readyz 200", || async {
        relay.status("/readyz") == 200
    })
    .await;
    assert_eq!(
        relay.metric(r#"outbox_relay_backend_up{backend="bus"}"#),
        Some(1.0)
    );
    nats.stop_server();
    wait_for(DEADLINE, "/readyz 503 naming the backend", || async {
        matches!(relay.get("/readyz"), Some((503, body)) if body.contains("bus (nats) down"))
    })
    .await;
    assert_eq!(
        relay.metric(r#"outbox_relay_backend_up{backend="bus"}"#),
        Some(0.0)
    );
    let h = relay.health();
    assert_eq!(h["backends"][0]["up"], false, "{h}");
    nats.start_server();
    wait_for(DEADLINE, "/readyz 200 after the server is back", || async {
        relay.status("/readyz") == 200
    })
    .await;
    wait_for(DEADLINE, "a reconnect counted", || async {
        relay
            .metric(r#"outbox_relay_backend_reconnects_total{backend="bus"}"#)
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    relay.stop();
    db.drop_schema().await;
}

#[tokio::test]
async fn backlog_thresholds_log_once_per_crossing_and_set_the_state_gauge() {
    let _watchdog = watchdog(
        "backlog_thresholds_log_once_per_crossing_and_set_the_state_gauge",
        Duration::from_secs(180),
    );
    let db = TestDb::new().await;
    let config = "[monitor]\npending_warning = 5\npending_critical = 20\n";
    let relay = RelayProcess::start(&db.url, db.schema(), config, &[]);
    let state = r#"outbox_relay_backlog_state{kind="pending"}"#;
    wait_for(DEADLINE, "state ok", || async {
        relay.metric(state) == Some(0.0)
    })
    .await;
    scheduled_later(&db, 8, "warn").await;
    wait_for(DEADLINE, "state warning", || async {
        relay.metric(state) == Some(1.0)
    })
    .await;
    scheduled_later(&db, 20, "crit").await;
    wait_for(DEADLINE, "state critical", || async {
        relay.metric(state) == Some(2.0)
    })
    .await;
    // Several more samples at the same level: still one line per crossing.
    let samples = |relay: &RelayProcess| relay.log_lines_with("\"kind\":\"pending\"");
    let seen = samples(&relay);
    let stamps = std::cell::RefCell::new(std::collections::HashSet::new());
    wait_for(DEADLINE, "four more backlog samples", || {
        if let Some(at) = relay.health()["backlog"]["counted_at"].as_str() {
            stamps.borrow_mut().insert(at.to_string());
        }
        let n = stamps.borrow().len();
        async move { n >= 4 }
    })
    .await;
    assert_eq!(samples(&relay), seen, "no repeated lines at the same level");
    assert_eq!(relay.log_lines_with("past its warning threshold"), 1);
    assert_eq!(relay.log_lines_with("past its critical threshold"), 1);
    db.sql("DELETE FROM {t}").await;
    wait_for(DEADLINE, "state ok again", || async {
        relay.metric(state) == Some(0.0)
    })
    .await;
    assert_eq!(relay.log_lines_with("backlog back under its thresholds"), 1);
    assert_eq!(
        relay.health()["backlog"]["pending_state"],
        "ok",
        "the state in /health too"
    );
    relay.stop();
    db.drop_schema().await;
}

#[tokio::test]
async fn the_oldest_pending_age_has_thresholds_of_its_own() {
    let db = TestDb::new().await;
    let config = "[monitor]\nage_warning = \"10m\"\nage_critical = \"1h\"\n";
    let relay = RelayProcess::start(&db.url, db.schema(), config, &[]);
    let state = r#"outbox_relay_backlog_state{kind="age"}"#;
    scheduled_later(&db, 1, "recent").await;
    wait_for(DEADLINE, "a recent backlog is ok", || async {
        relay.metric(state) == Some(0.0) && relay.metric("outbox_relay_pending_events") == Some(1.0)
    })
    .await;
    db.sql("UPDATE {t} SET occurred_at = now() - interval '20 minutes'")
        .await;
    wait_for(DEADLINE, "20 minutes old: warning", || async {
        relay.metric(state) == Some(1.0)
    })
    .await;
    db.sql("UPDATE {t} SET occurred_at = now() - interval '2 hours'")
        .await;
    wait_for(DEADLINE, "2 hours old: critical", || async {
        relay.metric(state) == Some(2.0)
    })
    .await;
    let age = relay
        .metric("outbox_relay_oldest_pending_age_seconds")
        .unwrap();
    assert!((7200.0..7300.0).contains(&age), "{age}");
    assert_eq!(relay.health()["backlog"]["age_state"], "critical");
    assert_eq!(relay.log_lines_with("past its critical threshold"), 1);
    relay.stop();
    db.drop_schema().await;
}

#[tokio::test]
async fn a_taken_http_port_stops_start_up_naming_the_key() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(relay_bin())
        .args(["--database-url", &db.url, "--schema", db.schema(), "run"])
        .env("RELAY__HTTP__ADDRESS", &addr)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("http.address") && err.contains(&addr), "{err}");
    let out = Command::new(relay_bin())
        .args(["--database-url", &db.url, "--schema", db.schema(), "run"])
        .env("RELAY__HTTP__ADDRESS", "localhost")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("http.address") && err.contains("localhost"),
        "{err}"
    );
    db.drop_schema().await;
}
