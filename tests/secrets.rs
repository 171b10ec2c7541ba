//! No secret in any output: distinctive secrets are set through every path (relay.toml, the
//! environment, flags, the database URL's userinfo and `?password=`), every command of the
//! binary runs (successfully and failing), and its stdout and stderr must not contain one.
//! The operator commands and the HTTP endpoints must not print payloads either (`inspect` is
//! the one that does).

mod common;

use common::{free_port, last_lines, numbered_on, output_text as text, relay_bin, TestDb};
use outbox_relay::store::NewEvent;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const URL_ENV_PW: &str = "EnvUrlUserinfo-s3cr3t-1a2b";
const URL_FLAG_PW: &str = "FlagUrlUserinfo-s3cr3t-3c4d";
const URL_QUERY_PW: &str = "FlagUrlQuery-s3cr3t-5e6f";
const KAFKA_SASL: &str = "FileKafkaSasl-s3cr3t-7a8b";
const KAFKA_SSL_KEY: &str = "EnvKafkaSslKey-s3cr3t-9c0d";
const KAFKA_PROP: &str = "FileKafkaProperty-s3cr3t-1e2f";
const NATS_PASSWORD: &str = "EnvNatsPassword-s3cr3t-3a4b";
const NATS_TOKEN: &str = "UrlNatsToken-s3cr3t-5c6d";
const NATS_SEED: &str = "SUACSECRETNKEYSEEDFORTESTSONLY7E8F9A0B1C2D3E4F5A6B7C8D9E0F1A2B3";
const CREDS_JWT: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.credsjwtsecret.sig4c5d";
const CREDS_SEED: &str = "SUACREDSFILESEEDSECRETFORTESTSONLY6E7F8A9B0C1D2E3F4A5B6C7D8E9F0";
const KV_PASSWORD: &str = "LibpqKeyValue-s3cr3t-7e8f";
const TYPE_ERROR_SECRET: &str = "TypeError-s3cr3t-9a0b";
const PULSAR_TOKEN: &str = "PulsarJwtToken-s3cr3t-1c2d";
const PULSAR_OAUTH: &str = "PulsarOauthClientSecret-s3cr3t-3e4f";

const ALL: [&str; 15] = [
    URL_ENV_PW,
    URL_FLAG_PW,
    URL_QUERY_PW,
    KAFKA_SASL,
    KAFKA_SSL_KEY,
    KAFKA_PROP,
    NATS_PASSWORD,
    NATS_TOKEN,
    NATS_SEED,
    CREDS_JWT,
    CREDS_SEED,
    KV_PASSWORD,
    TYPE_ERROR_SECRET,
    PULSAR_TOKEN,
    PULSAR_OAUTH,
];

/// In every payload written here; operator commands must never show it.
const PAYLOAD_MARKER: &str = "PayloadMarker-do-not-print-4f5e";

fn assert_no_secret(what: &str, out: &str) {
    for s in ALL {
        // Also a part of it: a secret cut in half is still half a secret.
        let half = &s[..s.len() / 2 + 2];
        if let Some(at) = out.find(half) {
            let from = out[..at]
                .char_indices()
                .rev()
                .nth(80)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let around: String = out[from..].chars().take(200).collect();
            panic!("{what}: secret {s:?} in the output: ...{around}...");
        }
    }
}

fn assert_no_payload(what: &str, out: &str) {
    assert!(
        !out.contains(PAYLOAD_MARKER),
        "{what}: a payload in the output:\n{out}"
    );
}

/// Base URL with `password` put into its userinfo.
fn with_password(password: &str) -> String {
    let base = common::base_url();
    let (scheme, rest) = base.split_once("://").unwrap();
    let rest = match rest.split_once('@') {
        Some((user, host)) => format!("{}:{password}@{host}", user.split(':').next().unwrap()),
        None => format!("postgres:{password}@{rest}"),
    };
    format!("{scheme}://{rest}")
}

fn relay_toml(schema: &str, kafka_port: u16, http: &str) -> String {
    format!(
        r#"
[database]
schema = "{schema}"
connect_timeout = "2s"

[relay]
poll_interval = "100ms"
summary_interval = "1h"

[monitor]
health_interval = "200ms"
backlog_interval = "200ms"

[http]
address = "{http}"

[backends.out]
type = "stdout"

[backends.kafka]
type = "kafka"
bootstrap_servers = "127.0.0.1:{kafka_port}"
security_protocol = "sasl_plaintext"
sasl_mechanism = "PLAIN"
sasl_username = "relay"
sasl_password = "{KAFKA_SASL}"
health_timeout = "1s"

[backends.kafka.properties]
"ssl.keystore.password" = "{KAFKA_PROP}"

[backends.nats]
type = "nats"
servers = ["nats://127.0.0.1:4222"]
user = "relay"
connect_timeout = "1s"

[[routes]]
topic = "orders.*"
backend = "out"

[[routes]]
topic = "kafka.*"
backend = "kafka"
"#
    )
}

/// The binary in `dir` (its relay.toml), with the secrets of the environment and the flags.
fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(relay_bin());
    c.current_dir(dir)
        .env("RELAY__DATABASE__URL", with_password(URL_ENV_PW))
        .env("RELAY__BACKENDS__KAFKA__SSL_KEY_PASSWORD", KAFKA_SSL_KEY)
        .env("RELAY__BACKENDS__NATS__PASSWORD", NATS_PASSWORD)
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn flag_url() -> String {
    format!("{}?password={URL_QUERY_PW}", with_password(URL_FLAG_PW))
}

fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let url = flag_url();
    let mut all = vec!["--database-url", url.as_str()];
    all.extend_from_slice(args);
    command(dir, &all, env)
        .output()
        .expect("run the relay binary")
}

/// [`run`] for a command that must end by itself: stopped and failed past `limit`.
fn run_bounded(dir: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let url = flag_url();
    let mut all = vec!["--database-url", url.as_str()];
    all.extend_from_slice(args);
    let child = command(dir, &all, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the relay binary");
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let o = rx.recv().unwrap().unwrap();
            panic!("{args:?} did not finish within {limit:?}: {}", text(&o));
        }
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test]
async fn no_command_prints_a_secret_or_an_unrequested_payload() {
    let _w = common::watchdog(
        "no_command_prints_a_secret_or_an_unrequested_payload",
        Duration::from_secs(300),
    );
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        dir.path().join("relay.toml"),
        relay_toml(db.schema(), free_port(), ""),
    )
    .unwrap();
    let body = serde_json::json!({ "secret": PAYLOAD_MARKER });
    let mut events: Vec<NewEvent> = (0..3)
        .map(|_| NewEvent::json("orders.created", "a1", "OrderCreated", &body).unwrap())
        .collect();
    // No route: it fails, so failed / replay have a row to show.
    let unrouted = NewEvent::json("unrouted.thing", "a2", "Thing", &body).unwrap();
    let unrouted_id = unrouted.event_id;
    events.push(unrouted);
    events.push(numbered_on("orders.created", "a3", 0));
    db.enqueue(&events).await;

    // Every command, with debug logs from every library.
    let debug = [("RUST_LOG", "debug")];
    let o = run(dir.path(), &["migrate"], &debug);
    assert!(o.status.success(), "migrate: {}", text(&o));
    assert_no_secret("migrate", &text(&o));

    // Failed as the relay would fail it, so this test does not depend on the pipeline.
    db.sql(&format!(
        "UPDATE {{t}} SET status = 'failed', attempts = 1, \
         last_error = 'no route for topic unrouted.thing' WHERE event_id = '{unrouted_id}'"
    ))
    .await;
    let o = run_bounded(
        dir.path(),
        &["run", "--drain"],
        &debug,
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "run --drain: {}", text(&o));
    assert_no_secret("run --drain", &text(&o));
    // The stdout backend prints payloads on stdout (its job); the logs must not.
    assert_no_payload("run --drain logs", &String::from_utf8_lossy(&o.stderr));

    let o = run(dir.path(), &["check"], &debug);
    assert_no_secret("check", &text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("PROBLEM  backend    kafka"),
        "the kafka backend at a closed port is a problem: {}",
        text(&o)
    );

    for args in [
        &["status"][..],
        &["status", "--json"],
        &["failed"],
        &["failed", "--json"],
        &["replay", "--dry-run"],
        &["replay", "--dry-run", "--json"],
        &["replay", "--status", "published", "--dry-run", "--json"],
        &["purge", "--dry-run"],
        &["purge", "--dry-run", "--json"],
    ] {
        let o = run(dir.path(), args, &[]);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        assert_no_secret(&format!("{args:?}"), &text(&o));
        assert_no_payload(&format!("{args:?}"), &text(&o));
    }
    // Asked for: inspect shows the payload (and so proves the marker would be seen).
    let id = unrouted_id.to_string();
    let o = run(dir.path(), &["inspect", &id], &[]);
    assert!(text(&o).contains(PAYLOAD_MARKER), "inspect: {}", text(&o));
    assert_no_secret("inspect", &text(&o));
    let o = run(dir.path(), &["replay", "--event-id", &id], &[]);
    assert!(o.status.success(), "replay: {}", text(&o));
    assert_no_secret("replay", &text(&o));
    assert_no_payload("replay", &text(&o));
    let o = run_bounded(
        dir.path(),
        &["run", "--drain"],
        &[],
        Duration::from_secs(60),
    );
    assert_no_secret("run --drain (again)", &text(&o));
    assert_no_payload(
        "run --drain (again) logs",
        &String::from_utf8_lossy(&o.stderr),
    );
    let o = run(dir.path(), &["purge", "--event-id", &id], &[]);
    assert!(o.status.success(), "purge: {}", text(&o));
    assert_no_secret("purge", &text(&o));
    assert_no_payload("purge", &text(&o));

    // The HTTP endpoints of a running relay whose Kafka backend is down.
    std::fs::write(
        dir.path().join("relay.toml"),
        relay_toml(db.schema(), free_port(), &http),
    )
    .unwrap();
    db.enqueue(&[NewEvent::json("kafka.events", "k1", "K", &body).unwrap()])
        .await;
    let url = flag_url();
    let mut child = command(dir.path(), &["--database-url", &url, "run"], &debug)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read as it comes: debug logs fill a pipe's buffer in moments and would block the relay.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let stop = |child: &mut std::process::Child| {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap()
    };
    // Until /health has seen the backends and counted the backlog; a relay that exits first
    // fails the test with its own words.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let logs = err.join().unwrap();
            panic!("the relay exited ({st}) before serving /health: {logs}");
        }
        let addr = http.clone();
        last = tokio::task::spawn_blocking(move || {
            if std::net::TcpStream::connect(&addr).is_ok() {
                http_get(&addr, "/health")
            } else {
                String::new()
            }
        })
        .await
        .unwrap_or(last);
        if last.contains("\"kafka\"") && last.contains("\"pending\"") {
            break;
        }
        if std::time::Instant::now() > deadline {
            stop(&mut child);
            let logs = err.join().unwrap();
            panic!(
                "no /health with the backends and the backlog in 60s; last: {last}\nrelay: {logs}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut served = String::new();
    for path in ["/health", "/readyz", "/metrics", "/livez"] {
        let addr = http.clone();
        let body = tokio::task::spawn_blocking(move || http_get(&addr, path))
            .await
            .unwrap();
        served.push_str(&body);
    }
    let status = stop(&mut child);
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.success(),
        "the relay stops cleanly on SIGTERM: {status}; its last log lines:\n{}",
        last_lines(&stderr, 40)
    );
    assert_no_secret("HTTP endpoints", &served);
    assert_no_payload("HTTP endpoints", &served);
    assert_no_secret("run (HTTP)", &format!("{stdout}{stderr}"));
    assert_no_payload("run (HTTP) logs", &stderr);
    db.drop_schema().await;
}

#[test]
fn failures_do_not_print_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let unreachable = format!(
        "postgres://relay:{URL_FLAG_PW}@127.0.0.1:{closed}/db?password={URL_QUERY_PW}&sslmode=disable"
    );
    let debug = [
        ("RUST_LOG", "debug"),
        ("RELAY__DATABASE__CONNECT_TIMEOUT", "1s"),
    ];
    // A database that cannot be reached, by every command.
    for args in [
        &["check"][..],
        &["migrate"],
        &["run", "--drain"],
        &["status"],
        &["failed"],
        &["replay", "--dry-run"],
        &["purge", "--dry-run"],
        &["inspect", "00000000-0000-0000-0000-000000000000"],
    ] {
        let mut all = vec!["--database-url", unreachable.as_str()];
        all.extend_from_slice(args);
        let o = Command::new(relay_bin())
            .current_dir(dir.path())
            .args(&all)
            .envs(debug)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}: {}", text(&o));
        assert_no_secret(&format!("unreachable database, {args:?}"), &text(&o));
    }

    let bad = |toml: &str, env: &[(&str, &str)], expect: &str| {
        std::fs::write(dir.path().join("relay.toml"), toml).unwrap();
        let o = Command::new(relay_bin())
            .current_dir(dir.path())
            .arg("check")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{toml}: {}", text(&o));
        assert!(text(&o).contains(expect), "{toml}: {}", text(&o));
        assert_no_secret(&format!("bad config {toml}"), &text(&o));
    };
    // libpq key=value strings are not understood; the message does not echo it.
    bad(
        &format!("[database]\nurl = \"host=127.0.0.1 user=relay password={KV_PASSWORD}\"\n"),
        &[],
        "database.url",
    );
    bad(
        "[database]\nurl = \"postgres://u@h/db\"\n",
        &[(
            "RELAY__DATABASE__URL",
            &format!("host=127.0.0.1 password='{KV_PASSWORD}'"),
        )],
        "database.url",
    );
    // A secret where a number belongs (type errors print values).
    bad(
        &format!(
            "[backends.n]\ntype = \"nats\"\nuser = \"u\"\npassword = \"{TYPE_ERROR_SECRET}\"\n"
        ),
        &[("RELAY__RELAY__BATCH_SIZE", TYPE_ERROR_SECRET)],
        "batch_size",
    );
    bad(
        &format!(
            "[backends.n]\ntype = \"nats\"\nuser = \"u\"\npassword = \"{TYPE_ERROR_SECRET}\"\n\
             max_in_flight = \"{TYPE_ERROR_SECRET}\"\n"
        ),
        &[],
        "backends.n",
    );
    bad(
        &format!("[backends.n]\ntype = \"nats\"\ntoken = [\"{NATS_TOKEN}\"]\n"),
        &[],
        "backends.n",
    );
    // A refused Kafka property whose value is a secret.
    bad(
        &format!(
            "[backends.k]\ntype = \"kafka\"\n[backends.k.properties]\n\
             \"sasl.oauthbearer.config\" = \"{KAFKA_PROP}\"\n\"sasl.oauthbearer.method\" = \"{KAFKA_SASL}\"\n"
        ),
        &[],
        "backends.k",
    );
    // A database URL query parameter the driver would log with its value.
    bad(
        &format!("[database]\nurl = \"postgres://u@h/db?sslpassword={URL_QUERY_PW}\"\n"),
        &[],
        "sslpassword",
    );
}

#[test]
fn nats_credentials_do_not_print() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("relay.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{CREDS_JWT}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\n\
             -----BEGIN USER NKEY SEED-----\n{CREDS_SEED}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
    let closed = free_port();
    for auth in [
        format!("servers = [\"nats://{NATS_TOKEN}@127.0.0.1:4222\"]\n"),
        format!("servers = [\"nats://relay:{NATS_PASSWORD}@127.0.0.1:{closed}\"]\n"),
        format!("token = \"{NATS_TOKEN}\"\nservers = [\"nats://127.0.0.1:{closed}\"]\n"),
        format!("nkey_seed = \"{NATS_SEED}\"\n"),
        format!("creds_file = \"{}\"\n", creds.display()),
    ] {
        std::fs::write(
            dir.path().join("relay.toml"),
            format!(
                "[database]\nconnect_timeout = \"1s\"\n[backends.nats]\ntype = \"nats\"\n\
                 connect_timeout = \"1s\"\n{auth}"
            ),
        )
        .unwrap();
        let o = Command::new(relay_bin())
            .current_dir(dir.path())
            .args(["--schema", "no_such_outbox", "check"])
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        assert_no_secret(&format!("check with {auth}"), &text(&o));
    }
}

/// The Pulsar token (from relay.toml and from the environment) and OAuth2 credentials (a data:
/// URL holding the client secret) never print, with the client's own debug logging on, whether
/// the broker is there or not.
#[test]
fn pulsar_credentials_do_not_print() {
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let creds = format!(
        "data:application/json,{{\"client_id\":\"relay\",\"client_secret\":\"{PULSAR_OAUTH}\"}}"
    );
    for (url, auth, env) in [
        (
            "pulsar://127.0.0.1:6650".to_string(),
            format!("auth = \"token\"\ntoken = \"{PULSAR_TOKEN}\"\n"),
            None,
        ),
        (
            format!("pulsar://127.0.0.1:{closed}"),
            "auth = \"token\"\n".to_string(),
            Some(("RELAY__BACKENDS__PULSAR__TOKEN", PULSAR_TOKEN)),
        ),
        (
            format!("pulsar://127.0.0.1:{closed}"),
            format!(
                "auth = \"oauth2\"\noauth2_issuer_url = \"http://127.0.0.1:{closed}\"\n\
                 oauth2_credentials_url = '{creds}'\n"
            ),
            None,
        ),
    ] {
        std::fs::write(
            dir.path().join("relay.toml"),
            format!(
                "[database]\nconnect_timeout = \"1s\"\n[backends.pulsar]\ntype = \"pulsar\"\n\
                 service_url = \"{url}\"\nconnection_timeout = \"1s\"\n\
                 health_timeout = \"2s\"\n{auth}"
            ),
        )
        .unwrap();
        let mut c = Command::new(relay_bin());
        c.current_dir(dir.path())
            .args(["--schema", "no_such_outbox", "check"])
            .env("RUST_LOG", "debug");
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let out = text(&o);
        assert!(out.contains("backend"), "check ran to the backend: {out}");
        assert_no_secret(&format!("check with {auth}"), &out);
    }
}
