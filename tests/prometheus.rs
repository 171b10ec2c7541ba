//! The alert rules and the Grafana dashboard against a real Prometheus (Debian's `prometheus`
//! binary) scraping a running relay: the series the rules and panels name exist under those
//! names, the backlog alerts fire on a real backlog, and every panel query returns data.
//!
//! The relay has three kinds of traffic, so that every series exists:
//! * `orders.*` goes to the stdout backend and is published (rates, latencies, claim sizes);
//! * `stuck.*` goes to a Kafka backend whose bootstrap address has no listener, so its events
//!   time out and are retried and stay pending: the backlog, deterministically, and
//!   `backend_up{backend="stuck"} == 0`;
//! * a topic no route matches is marked failed at once.
//!
//! Prometheus evaluates a copy of deploy/prometheus/alerts.yaml with every `for:` set to 0s;
//! the durations are covered by `promtool test rules deploy/prometheus/alerts.test.yaml`.

mod common;

use common::{free_port, http_get, numbered_on, relay_bin, wait_for, watchdog, TestDb};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(90);

/// The job name the rules and the dashboard select on.
const JOB: &str = "outbox-relay";

/// Above the OutboxBacklogHigh threshold (10000).
const STUCK_EVENTS: i64 = 10_050;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Debian's prometheus package puts it on PATH; a missing binary fails the test, never skips it.
fn prometheus_bin() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the prometheus binary is not on PATH: install Debian's prometheus package \
             (`source scripts/deploy-check.sh && ensure_prometheus`, or \
             `apt-get install -y --no-install-recommends prometheus`)"
        )
    })
}

/// A child process killed when the test ends, pass or fail.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An instant query's result vector (`data.result`); panics on a query Prometheus refuses, so a
/// panel with a syntax error fails with the query named.
fn query(prom_port: u16, promql: &str) -> Vec<serde_json::Value> {
    let Some((code, body)) = http_get(
        prom_port,
        &format!("/api/v1/query?query={}", url_encode(promql)),
    ) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("query {promql}: not JSON ({e}): {body}"));
    assert_eq!(code, 200, "query {promql} refused: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// True when some series of the result holds a number (histogram_quantile over a window
/// without observations gives NaN: a series, but no data to look at).
fn has_finite_value(result: &[serde_json::Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// The names of the alerts Prometheus has firing.
fn firing(prom_port: u16) -> Vec<String> {
    let Some((200, body)) = http_get(prom_port, "/api/v1/alerts") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == "firing")
        .filter_map(|a| a["labels"]["alertname"].as_str().map(String::from))
        .collect()
}

/// The rules file with every `for:` at 0s: the expressions as shipped, evaluated at once.
fn rules_without_for() -> String {
    let rules = std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yaml")).unwrap();
    rules
        .lines()
        .map(|line| {
            let indent = line.len() - line.trim_start().len();
            if line.trim_start().starts_with("for:") {
                format!("{}for: 0s", &line[..indent])
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every panel target's expression, with Grafana's variables as the dashboard resolves them
/// for this job: (panel title, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("deploy/grafana/outbox-relay.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("a target with an expr");
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$job", JOB)
                .replace("$instance", ".*");
            assert!(
                !expr.contains('$'),
                "panel {title}: a variable the test does not resolve: {expr}"
            );
            out.push((title.clone(), expr));
        }
    }
    out
}

fn relay_config(db: &TestDb, http_port: u16, dead_port: u16) -> String {
    format!(
        r#"
[database]
url = "{url}"
schema = "{schema}"

[relay]
poll_interval = "100ms"
backoff_initial = "100ms"
backoff_max = "1s"
# The stuck events must stay pending for the whole test.
max_attempts = 1000000
publish_timeout = "2s"

[http]
address = "127.0.0.1:{http_port}"

[monitor]
health_interval = "300ms"
backlog_interval = "300ms"

[backends.stdout]
type = "stdout"

[backends.stuck]
type = "kafka"
bootstrap_servers = "127.0.0.1:{dead_port}"
health_timeout = "300ms"

[[routes]]
topic = "orders.*"
backend = "stdout"

[[routes]]
topic = "stuck.*"
backend = "stuck"
"#,
        url = db.url,
        schema = db.schema(),
    )
}

fn start_prometheus(bin: &Path, dir: &Path, port: u16, relay_port: u16) -> Killed {
    std::fs::write(dir.join("alerts.yaml"), rules_without_for()).unwrap();
    let config = format!(
        r#"
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: {JOB}
    static_configs:
      - targets: ["127.0.0.1:{relay_port}"]
"#,
        rules = dir.join("alerts.yaml").display(),
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start prometheus");
    Killed(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_relay_fires_the_backlog_alerts_and_answers_every_panel() {
    let _watchdog = watchdog(
        "prometheus_scrapes_the_relay_fires_the_backlog_alerts_and_answers_every_panel",
        Duration::from_secs(300),
    );
    // First, so a machine without Prometheus fails here, naming the package.
    let prometheus = prometheus_bin();
    let db = Arc::new(TestDb::new().await);

    // The backlog: old events on a few aggregates (so the age alerts have something to see at
    // once, and strict ordering keeps only one per aggregate in flight), and one event that no
    // route takes, marked failed at once.
    db.sql(&format!(
        "INSERT INTO {{t}} (event_id, topic, aggregate_id, event_type, payload, occurred_at) \
         SELECT gen_random_uuid(), 'stuck.events', 'agg-' || (i % 4), 'Stuck', '\\x7b7d', \
                now() - interval '2 hours' \
         FROM generate_series(1, {STUCK_EVENTS}) AS i"
    ))
    .await;
    db.enqueue(&[numbered_on("unrouted.events", "u1", 0)]).await;

    let dir = tempfile::tempdir().unwrap();
    let relay_port = free_port();
    // Nothing listens there: the Kafka backend never connects.
    let dead_port = free_port();
    std::fs::write(
        dir.path().join("relay.toml"),
        relay_config(&db, relay_port, dead_port),
    )
    .unwrap();
    let _relay = Killed(
        Command::new(relay_bin())
            .current_dir(dir.path())
            .args(["--config", "relay.toml", "run"])
            // librdkafka reports every refused connection to the dead bootstrap address.
            .env("RUST_LOG", "error,librdkafka=off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the relay binary"),
    );

    // A producer of published traffic for as long as the test runs, so the rate and latency
    // panels see fresh observations in every window.
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (db, producing) = (db.clone(), producing.clone());
        tokio::spawn(async move {
            let mut seq = 0;
            while producing.load(Ordering::Relaxed) {
                let events: Vec<_> = (0..5)
                    .map(|a| numbered_on("orders.created", &format!("o{a}"), seq))
                    .collect();
                db.enqueue(&events).await;
                seq += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let prom_port = free_port();
    let _prom = start_prometheus(&prometheus, dir.path(), prom_port, relay_port);
    wait_for(DEADLINE, "Prometheus ready", || async {
        matches!(http_get(prom_port, "/-/ready"), Some((200, _)))
    })
    .await;
    wait_for(DEADLINE, "the relay's target up in Prometheus", || async {
        has_finite_value(&query(prom_port, &format!("up{{job=\"{JOB}\"}} == 1")))
    })
    .await;

    // The series the rules name, under their exposed names.
    for series in [
        "outbox_relay_pending_events",
        "outbox_relay_pending_due_events",
        "outbox_relay_failed_events",
        "outbox_relay_oldest_pending_age_seconds",
        "outbox_relay_database_up",
        "outbox_relay_backend_up",
        "outbox_relay_owned_partitions",
        "outbox_relay_relays",
        "outbox_relay_events_published_total",
        "outbox_relay_events_failed_total",
        "outbox_relay_events_retried_total",
        "outbox_relay_publish_latency_seconds_bucket",
        "outbox_relay_end_to_end_latency_seconds_bucket",
        "outbox_relay_claim_batch_size_bucket",
    ] {
        wait_for(
            DEADLINE,
            &format!("series {series} in Prometheus"),
            || async { !query(prom_port, &format!("{series}{{job=\"{JOB}\"}}")).is_empty() },
        )
        .await;
    }

    let expected = [
        "OutboxBacklogHigh",
        "OutboxOldestPendingOld",
        "OutboxOldestPendingCritical",
        "OutboxEventsFailed",
        "OutboxRelayNotReady",
    ];
    wait_for(DEADLINE, &format!("alerts {expected:?} firing"), || async {
        let now = firing(prom_port);
        expected.iter().all(|a| now.iter().any(|f| f == a))
    })
    .await;
    let pending = query(prom_port, "max(outbox_relay_pending_events)");
    assert!(
        pending[0]["value"][1]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            >= STUCK_EVENTS as f64,
        "the backlog the alert saw: {pending:?}"
    );
    // A relay alone on its outbox owns every partition, so the ownership alert stays quiet.
    let now = firing(prom_port);
    assert!(
        !now.iter()
            .any(|a| a == "OutboxPartitionsUnowned" || a == "OutboxRelayAbsent"),
        "alerts that must not fire with one healthy relay scraped: {now:?}"
    );

    // Every panel of the dashboard answers with data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 12, "the dashboard's queries: {queries:?}");
    for (title, expr) in &queries {
        wait_for(
            DEADLINE,
            &format!("panel {title:?}: data for {expr}"),
            || async { has_finite_value(&query(prom_port, expr)) },
        )
        .await;
    }

    producing.store(false, Ordering::Relaxed);
    producer.await.unwrap();
    Arc::try_unwrap(db)
        .ok()
        .expect("the producer holds no handle now")
        .drop_schema()
        .await;
}
