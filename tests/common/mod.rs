//! Shared test support: a schema of its own per test on the real Postgres, relays driven in
//! process or as child processes, waits with deadlines, and private Postgres instances for
//! tests that stop the server.
#![allow(dead_code)]

pub mod certs;
pub mod conformance;
pub mod kafka;
pub mod nats;
pub mod pulsar;
pub mod pulsar_tls;

use outbox_relay::config::{Config, Dur, RouteConfig};
use outbox_relay::envelope::BodyFormat;
use outbox_relay::publisher::Publisher;
use outbox_relay::relay::{Backend, Relay};
use outbox_relay::store::{migrate, Names, NewEvent, Outbox, Store};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A finished command's stdout and stderr as one text, for searching.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The last `n` lines of a log, for a failure message.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The server tests use; `TEST_DATABASE_URL` overrides.
pub fn base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A schema of this test's own, migrated, dropped when the test passes.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    pub names: Names,
    pub outbox: Outbox,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::on(&base_url()).await
    }

    pub async fn on(url: &str) -> TestDb {
        let schema = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach the test Postgres at {url}: {e}"));
        let names = Names::new(schema.clone(), "outbox");
        migrate::run(&pool, &names).await.expect("migrate");
        let outbox = Outbox::new(&schema, "outbox").unwrap();
        TestDb {
            url: url.to_string(),
            pool,
            names,
            outbox,
        }
    }

    pub fn schema(&self) -> &str {
        &self.names.schema
    }

    /// A config for this schema with test-friendly timings.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.database.url = outbox_relay::config::Secret::new(self.url.clone());
        c.database.schema = self.names.schema.clone();
        c.relay.poll_interval = Dur::ms(100);
        c.relay.backoff_initial = Dur::ms(20);
        c.relay.backoff_max = Dur::ms(200);
        c.relay.summary_interval = Dur::secs(3600);
        c.relay.shutdown_timeout = Dur::secs(5);
        c.relay.blocked_retry = Dur::ms(20);
        c.apply_defaults();
        c
    }

    /// A relay on this schema with one backend named "main" taking every topic.
    pub async fn relay(&self, cfg: &Config, publisher: Arc<dyn Publisher>) -> Relay {
        self.relay_with(cfg, vec![("main", publisher)], &[route("*", "main")])
            .await
    }

    pub async fn relay_with(
        &self,
        cfg: &Config,
        backends: Vec<(&str, Arc<dyn Publisher>)>,
        routes: &[RouteConfig],
    ) -> Relay {
        let store = Store::connect(&cfg.database, &outbox_relay::wiring::session(cfg))
            .await
            .unwrap();
        let backends = backends
            .into_iter()
            .map(|(name, publisher)| Backend {
                name: name.to_string(),
                publisher,
            })
            .collect();
        Relay::new(store, backends, routes, cfg.relay.clone())
    }

    pub async fn enqueue(&self, events: &[NewEvent]) {
        let mut tx = self.pool.begin().await.unwrap();
        self.outbox.enqueue(&mut tx, events).await.unwrap();
        tx.commit().await.unwrap();
    }

    /// Writes [`interleaved`] events (in chunks of 1000 per transaction) and returns them.
    pub async fn enqueue_interleaved(
        &self,
        aggregates: usize,
        per_aggregate: usize,
    ) -> Vec<NewEvent> {
        let all = interleaved(aggregates, per_aggregate, 0);
        for chunk in all.chunks(1000) {
            self.enqueue(chunk).await;
        }
        all
    }

    pub async fn sql(&self, sql: &str) {
        sqlx::raw_sql(
            &self
                .names
                .render(&sql.replace("{t}", "{{schema}}.{{table}}")),
        )
        .execute(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn count(&self, filter: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE {filter}",
            self.names.qualified()
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub async fn total(&self) -> i64 {
        self.count("true").await
    }

    /// The rows as groups of (status, attempts, due or not, last error), for a failure message.
    pub async fn summary(&self) -> String {
        let rows: Vec<(String, i32, bool, Option<String>, i64)> = sqlx::query_as(&format!(
            "SELECT status, attempts, next_attempt_at <= now(), last_error, count(*) \
             FROM {} GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC LIMIT 20",
            self.names.qualified()
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        rows.iter()
            .map(|(status, attempts, due, error, n)| {
                format!("{n} x {status}, {attempts} attempts, due {due}, last error {error:?}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// (status, attempts, last_error) of one event.
    pub async fn row(&self, event_id: uuid::Uuid) -> Option<(String, i32, Option<String>)> {
        sqlx::query_as(&format!(
            "SELECT status, attempts, last_error FROM {} WHERE event_id = $1",
            self.names.qualified()
        ))
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    pub async fn drop_schema(self) {
        let _ = sqlx::raw_sql(&format!("DROP SCHEMA {} CASCADE", self.names.schema))
            .execute(&self.pool)
            .await;
    }
}

/// One event of aggregate `agg` with its sequence number in the payload:
/// `{"agg": "a3", "seq": 7}`, which the ordering checks read back.
pub fn numbered(agg: &str, seq: usize) -> NewEvent {
    numbered_on("orders.created", agg, seq)
}

/// [`numbered`] on another topic.
pub fn numbered_on(topic: &str, agg: &str, seq: usize) -> NewEvent {
    NewEvent::json(
        topic,
        agg,
        "OrderCreated",
        &serde_json::json!({"agg": agg, "seq": seq}),
    )
    .unwrap()
}

/// `n` events of one aggregate, in order.
pub fn sequence(agg: &str, n: usize) -> Vec<NewEvent> {
    (0..n).map(|seq| numbered(agg, seq)).collect()
}

/// Sequence numbers `from..from + per` for each of aggregates `a0..`, interleaved round-robin.
pub fn interleaved(aggregates: usize, per: usize, from: usize) -> Vec<NewEvent> {
    (from..from + per)
        .flat_map(|seq| (0..aggregates).map(move |a| numbered(&format!("a{a}"), seq)))
        .collect()
}

pub fn route(topic: &str, backend: &str) -> RouteConfig {
    RouteConfig {
        topic: topic.into(),
        backend: backend.into(),
        format: BodyFormat::Raw,
    }
}

/// Runs the relay on a task; cancel the token to stop it.
pub fn spawn(relay: Relay) -> (tokio::task::JoinHandle<Relay>, CancellationToken) {
    let token = CancellationToken::new();
    let t = token.clone();
    let h = tokio::spawn(async move {
        relay.run(t).await.expect("relay run");
        relay
    });
    (h, token)
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_or_dump(timeout, what, cond, || async { String::new() }).await
}

/// [`wait_for`], and on timeout the panic message carries what `dump` says then (the relay's
/// stats, the rows), for a failure seen only in CI.
pub async fn wait_for_or_dump<F, Fut, D, DFut>(timeout: Duration, what: &str, mut cond: F, dump: D)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
    D: FnOnce() -> DFut,
    DFut: Future<Output = String>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let state = dump().await;
            let sep = if state.is_empty() { "" } else { "\n" };
            panic!("timed out after {timeout:?} waiting for: {what}{sep}{state}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET over HTTP/1.0 from 127.0.0.1:`port`, so the answer is never chunked and ends when the
/// server closes: (status code, body), or `None` while nothing listens.
pub fn http_get(port: u16, path_and_query: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Runs `relay` until the test's outbox is empty (every row published or deleted), then stops
/// it and hands it back.
pub async fn run_until_empty(db: &TestDb, relay: Relay, deadline: Duration) -> Relay {
    let (h, stop) = spawn(relay);
    wait_for(deadline, "every row published", || async {
        db.total().await == 0
    })
    .await;
    stop.cancel();
    h.await.unwrap()
}

pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

/// A Postgres server of the test's own, on a free port, for tests that stop and start it.
pub struct PrivatePostgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    /// Extra server settings, as `-c name=value` options.
    settings: String,
}

fn pg_bin() -> PathBuf {
    let base = PathBuf::from("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(&base)
        .expect("Postgres server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

pub fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
}

/// Runs a Postgres binary, as the postgres user when we are root (initdb refuses root).
fn pg_cmd(bin: &std::path::Path, args: &[&str]) -> std::process::Output {
    let out = if is_root() {
        Command::new("runuser")
            .arg("-u")
            .arg("postgres")
            .arg("--")
            .arg(bin)
            .args(args)
            .output()
    } else {
        Command::new(bin).args(args).output()
    };
    out.unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

/// Waits (at most 30 s) until something listens on 127.0.0.1:`port`; `what` names it.
pub fn wait_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        Self::start_with(&[])
    }

    /// Starts one with server settings of its own (`("autovacuum_naptime", "1")`, say).
    pub fn start_with(settings: &[(&str, &str)]) -> PrivatePostgres {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pg-")
            .tempdir()
            .unwrap();
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
        }
        let data = dir.path().join("data");
        let out = pg_cmd(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
            bin,
            settings: settings
                .iter()
                .map(|(k, v)| format!(" -c {k}={v}"))
                .collect(),
        };
        pg.start_server();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start_server(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.dir.path().display(),
            self.settings
        );
        let out = pg_cmd(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop_server(&self) {
        let data = self.dir.path().join("data");
        let out = pg_cmd(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = pg_cmd(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

/// Ends the whole test process with a message when a test runs past `limit`. Waits inside a
/// test have deadlines of their own; this bounds what they cannot: a client library blocking in
/// a destructor or a server that never answers. A hang then fails the run in minutes and says
/// where, instead of holding CI until its own time limit.
pub struct Watchdog {
    disarm: Option<std::sync::mpsc::Sender<()>>,
}

pub fn watchdog(test: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: test {test} still running after {limit:?}; aborting the run");
            std::process::exit(99);
        }
    });
    Watchdog { disarm: Some(tx) }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
    }
}
