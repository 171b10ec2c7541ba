//! The writer examples (examples/), each run as its users would run it: the example program
//! writes its order and events into a schema of the test's own on the real Postgres, the relay
//! binary drains them to the real NATS JetStream (a stream of the test's own), and an
//! independent pull consumer checks that exactly the example's five events arrived, in order,
//! with their headers, traceparent and payload bytes.
//!
//! The toolchains come from scripts/example-tools.sh (`ensure_example_tools`); a missing one
//! fails its test naming that script, never skips it.

mod common;

use common::conformance::Received;
use common::nats::{create_stream, nats_url, read_stream, unique};
use common::{output_text, relay_bin, watchdog, TestDb};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

const INSTALL: &str = "install the examples' toolchains with \
    `source scripts/example-tools.sh && ensure_example_tools` (scripts/example-tools.sh)";

/// Generous: the first run of the Rust example links it, and the Go one compiles.
const EXAMPLE_DEADLINE: Duration = Duration::from_secs(300);
const RELAY_DEADLINE: Duration = Duration::from_secs(60);

/// The protobuf bytes every example writes as OrderPaid's payload.
const ORDER_PAID_PROTO: &[u8] = b"\x0a\x03EUR\x10\xde\x4d\x18\x00";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn examples() -> PathBuf {
    root().join("examples")
}

/// Fails the test, naming the install script, unless `program args` runs and succeeds.
async fn require(stack: &str, program: &str, args: &[&str], what: &str) {
    match Command::new(program).args(args).output().await {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{stack} example: {what} is missing (`{program} {}` failed: {}); {INSTALL}",
            args.join(" "),
            output_text(&o).trim()
        ),
        Err(e) => panic!("{stack} example: {what} is missing (`{program}`: {e}); {INSTALL}"),
    }
}

fn require_path(stack: &str, path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{stack} example: {what} is missing ({} not found); {INSTALL}",
        path.display()
    );
}

/// Runs a command to its end within `deadline` and returns its output; kills it past that.
async fn run(what: &str, cmd: &mut Command, deadline: Duration) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}; {INSTALL}"));
    tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {deadline:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// One example run end to end: its own schema and stream, the example, the relay, the reader.
struct Run {
    stack: &'static str,
    db: TestDb,
    prefix: String,
    stream: String,
    run_id: String,
    traceparent: String,
}

impl Run {
    async fn new(stack: &'static str) -> Run {
        let (prefix, stream) = unique();
        let hex = || uuid::Uuid::new_v4().simple().to_string();
        Run {
            stack,
            db: TestDb::new().await,
            run_id: format!("{stack}-{}", &hex()[..12]),
            traceparent: format!("00-{}-{}-01", hex(), &hex()[..16]),
            prefix,
            stream,
        }
    }

    /// The example's settings, as its README documents them.
    fn configure<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("DATABASE_URL", &self.db.url)
            .env("OUTBOX_SCHEMA", self.db.schema())
            .env("OUTBOX_TABLE", &self.db.names.table)
            .env("EXAMPLE_TOPIC_PREFIX", &self.prefix)
            .env("EXAMPLE_RUN_ID", &self.run_id)
            .env("TRACEPARENT", &self.traceparent)
    }

    /// Runs the example, then the relay, then checks what the stream holds.
    async fn check(self, mut example: Command) {
        let js = create_stream(&nats_url(), &self.stream, &self.prefix).await;
        let what = format!("the {} example", self.stack);
        let out = run(&what, self.configure(&mut example), EXAMPLE_DEADLINE).await;
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{}",
            out.status,
            output_text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&self.run_id),
            "{what} printed no line naming its run:\n{}",
            output_text(&out)
        );
        self.business_row_committed().await;
        assert_eq!(
            self.db.total().await,
            5,
            "{what} left five events in the outbox"
        );

        self.drain_with_the_relay().await;
        assert_eq!(
            self.db.total().await,
            0,
            "every event published and removed"
        );

        let got = read_stream(&js, &self.stream).await;
        self.assert_exactly_the_example_events(&got);
        let _ = js.delete_stream(&self.stream).await;
        self.db.drop_schema().await;
    }

    /// The order was written in the events' transaction, in its final state.
    async fn business_row_committed(&self) {
        let status: Option<String> = sqlx::query_scalar(&format!(
            "SELECT status FROM {}.example_orders WHERE run_id = $1",
            self.db.schema()
        ))
        .bind(&self.run_id)
        .fetch_optional(&self.db.pool)
        .await
        .unwrap_or_else(|e| panic!("{} example: no example_orders table: {e}", self.stack));
        assert_eq!(
            status.as_deref(),
            Some("paid"),
            "{} example: its order",
            self.stack
        );
    }

    /// The relay binary, as deployed: a config file naming the schema and a JetStream backend,
    /// `run --drain`, which exits 0 once nothing is due.
    async fn drain_with_the_relay(&self) {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[database]
url = "{url}"
schema = "{schema}"

[relay]
poll_interval = "100ms"

[backends.nats]
type = "nats"
servers = ["{nats}"]

[[routes]]
topic = "*"
backend = "nats"
"#,
                url = self.db.url,
                schema = self.db.schema(),
                nats = nats_url(),
            ),
        )
        .unwrap();
        let out = run(
            "outbox-relay run --drain",
            Command::new(relay_bin())
                .current_dir(dir.path())
                .arg("--config")
                .arg(&config)
                .args(["run", "--drain"])
                .env("RUST_LOG", "warn"),
            RELAY_DEADLINE,
        )
        .await;
        assert!(
            out.status.success(),
            "the relay's drain exits 0, got {}:\n{}",
            out.status,
            output_text(&out)
        );
    }

    fn assert_exactly_the_example_events(&self, got: &[Received]) {
        let stack = self.stack;
        let order_id = format!("order-{}", self.run_id);
        let summary: Vec<String> = got
            .iter()
            .map(|r| format!("{} {:?}", r.topic, r.headers.get("X-Event-Type")))
            .collect();
        assert_eq!(
            got.len(),
            5,
            "{stack} example: exactly its five events in the stream, got {summary:#?}"
        );
        let expected = [
            ("orders.placed", "OrderPlaced", "application/json"),
            ("orders.line_added", "OrderLineAdded", "application/json"),
            ("orders.line_added", "OrderLineAdded", "application/json"),
            ("orders.line_added", "OrderLineAdded", "application/json"),
            ("orders.paid", "OrderPaid", "application/x-protobuf"),
        ];
        let mut ids = std::collections::HashSet::new();
        for (i, (r, (topic, event_type, content_type))) in got.iter().zip(expected).enumerate() {
            let at = format!("{stack} example, message {i} ({event_type})");
            let header = |name: &str| {
                r.headers
                    .get(name)
                    .unwrap_or_else(|| panic!("{at}: no {name} header in {:?}", r.headers))
                    .as_str()
            };
            // In the order written: one aggregate, so the relay keeps the transaction's order.
            assert_eq!(r.topic, format!("{}.{topic}", self.prefix), "{at}: subject");
            assert_eq!(header("X-Event-Type"), event_type, "{at}");
            assert_eq!(header("run-id"), self.run_id, "{at}: the run's own event");
            assert_eq!(header("tenant"), "acme", "{at}: the row's headers");
            assert_eq!(
                header("traceparent"),
                self.traceparent,
                "{at}: the writer's trace"
            );
            assert_eq!(header("X-Correlation-ID"), self.run_id, "{at}");
            assert_eq!(header("X-Aggregate-ID"), order_id, "{at}");
            assert_eq!(header("X-Aggregate-Type"), "Order", "{at}");
            assert_eq!(header("X-Event-Version"), "1", "{at}");
            assert_eq!(header("content-type"), content_type, "{at}");
            assert_eq!(header("Nats-Msg-Id"), header("X-Event-ID"), "{at}");
            assert!(
                ids.insert(header("X-Event-ID").to_string()),
                "{at}: a new id"
            );

            if event_type == "OrderPaid" {
                assert_eq!(
                    r.body, ORDER_PAID_PROTO,
                    "{at}: the protobuf bytes as written"
                );
                continue;
            }
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
                panic!("{at}: JSON body: {e}: {}", String::from_utf8_lossy(&r.body))
            });
            let want = if event_type == "OrderPlaced" {
                serde_json::json!({"order_id": order_id, "total": 99.5})
            } else {
                serde_json::json!({"order_id": order_id, "line": i, "sku": format!("sku-{i}"), "qty": i})
            };
            assert_eq!(body, want, "{at}: payload");
        }
    }
}

#[tokio::test]
async fn sql_example_events_arrive_exactly_with_headers_trace_and_payloads() {
    let _w = watchdog("sql example", Duration::from_secs(300));
    require("sql", "psql", &["--version"], "psql (postgresql-client)").await;
    let r = Run::new("sql").await;
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-f"])
        .arg(examples().join("sql/example.sql"))
        .arg(&r.db.url);
    r.check(cmd).await;
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

async fn python_example(stack: &'static str, file: &str) {
    let py = python();
    require(stack, &py, &["-c", "import psycopg"], "psycopg 3").await;
    let r = Run::new(stack).await;
    let mut cmd = Command::new(py);
    cmd.arg(examples().join("python").join(file));
    r.check(cmd).await;
}

#[tokio::test]
async fn python_sync_example_events_arrive_exactly_with_headers_trace_and_payloads() {
    let _w = watchdog("python sync example", Duration::from_secs(300));
    python_example("python-sync", "outbox_sync.py").await;
}

#[tokio::test]
async fn python_async_example_events_arrive_exactly_with_headers_trace_and_payloads() {
    let _w = watchdog("python async example", Duration::from_secs(300));
    python_example("python-async", "outbox_async.py").await;
}

#[tokio::test]
async fn node_example_type_checks_and_its_events_arrive_exactly() {
    let _w = watchdog("node example", Duration::from_secs(300));
    let dir = examples().join("node");
    require("node", "node", &["--version"], "Node.js").await;
    require_path("node", &dir.join("node_modules/pg"), "the pg package");
    require_path("node", &dir.join("node_modules/typescript"), "typescript");
    // The JavaScript against the row's types in outbox.d.ts.
    let tsc = run(
        "tsc -p examples/node",
        Command::new("node")
            .current_dir(&dir)
            .args(["node_modules/typescript/bin/tsc", "-p", "."]),
        Duration::from_secs(120),
    )
    .await;
    assert!(
        tsc.status.success(),
        "the node example does not type-check:\n{}",
        output_text(&tsc)
    );
    let r = Run::new("node").await;
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir).arg("example.js");
    r.check(cmd).await;
}

#[tokio::test]
async fn go_example_events_arrive_exactly_with_headers_trace_and_payloads() {
    let _w = watchdog("go example", Duration::from_secs(300));
    require("go", "go", &["version"], "Go (golang-go)").await;
    // GOPATH mode against Debian's packaged driver: the module proxy is out of reach here.
    let gopath = "/usr/share/gocode";
    require_path(
        "go",
        &Path::new(gopath).join("src/github.com/lib/pq"),
        "lib/pq (golang-github-lib-pq-dev)",
    );
    let bin = tempfile::tempdir().unwrap();
    let build = run(
        "go build examples/go",
        Command::new("go")
            .current_dir(examples().join("go"))
            .env("GO111MODULE", "off")
            .env("GOPATH", gopath)
            .env("GOFLAGS", "")
            .arg("build")
            .arg("-o")
            .arg(bin.path().join("example"))
            .arg("."),
        EXAMPLE_DEADLINE,
    )
    .await;
    assert!(
        build.status.success(),
        "the go example does not build:\n{}",
        output_text(&build)
    );
    let r = Run::new("go").await;
    r.check(Command::new(bin.path().join("example"))).await;
}

#[tokio::test]
async fn rust_example_events_arrive_exactly_with_headers_trace_and_payloads() {
    let _w = watchdog("rust example", Duration::from_secs(600));
    let r = Run::new("rust").await;
    // As its users run it; builds the example first when this test run did not.
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root())
        .args(["run", "--quiet", "--locked", "--example", "rust"]);
    r.check(cmd).await;
}
