//! Pulsar test support: topics of the test's own on the shared broker (pulsar-lite on
//! 127.0.0.1:6650, or TEST_PULSAR_URL), an independent reader (the official Python client,
//! an exclusive subscription from the earliest message), and private broker instances for
//! tests that stop the broker.

use super::conformance::{
    BackendUnderTest, BrokerAway, Ephemeral, Kept, Outage, Received, Restart, SizeLimit,
};
use super::free_port;
use base64::Engine as _;
use outbox_relay::publisher::pulsar::config::{Persistence, TopicSettings};
use outbox_relay::publisher::pulsar::{PulsarConfig, PulsarPublisher};
use outbox_relay::publisher::Publisher;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The shared broker; `TEST_PULSAR_URL` overrides.
pub fn pulsar_url() -> String {
    std::env::var("TEST_PULSAR_URL").unwrap_or_else(|_| "pulsar://127.0.0.1:6650".into())
}

pub fn unique_topic() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub fn config(url: &str) -> PulsarConfig {
    PulsarConfig {
        service_url: url.into(),
        // Shorter than the default, so the outage tests wait less for expiries; long enough
        // that a loaded machine's receipts do not expire.
        send_timeout: outbox_relay::config::Dur::secs(15),
        operation_timeout: outbox_relay::config::Dur::secs(5),
        connection_timeout: outbox_relay::config::Dur::secs(2),
        ..PulsarConfig::default()
    }
}

/// The full name the backend's default config gives an outbox topic.
pub fn full_name(topic: &str) -> String {
    format!("persistent://public/default/{topic}")
}

/// An exclusive subscription of its own on `topic` (a full name), from the earliest message,
/// held by the official client (tests/pulsar_read.py, a child process) until dropped; what
/// arrives is acknowledged and kept. (pulsar-rs as a consumer cannot read from pulsar-lite: it
/// drops the connection on the broker's message frames.)
pub struct Reader {
    pub got: Arc<Mutex<Vec<Received>>>,
    /// The topic (or partition, `...-partition-<n>`) each message came from, in arrival order.
    pub from: Arc<Mutex<Vec<String>>>,
    child: tokio::process::Child,
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

impl Reader {
    pub async fn start(url: &str, topic: &str) -> Reader {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pulsar_read.py");
        let mut child = tokio::process::Command::new(python())
            .args([script, url, topic])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start tests/pulsar_read.py (pulsar-client from scripts/consumer-tools.sh)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the Pulsar reader subscribed within 60 s")
            .expect("the Pulsar reader's output");
        assert_eq!(
            ready.as_deref(),
            Some("ready"),
            "the Pulsar reader's first line"
        );
        let got = Arc::new(Mutex::new(Vec::new()));
        let from = Arc::new(Mutex::new(Vec::new()));
        let (sink, sources) = (got.clone(), from.clone());
        let short = topic.rsplit('/').next().unwrap_or(topic).to_string();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
                let headers: HashMap<String, String> =
                    serde_json::from_value(v["properties"].clone()).expect("properties");
                let body = base64::engine::general_purpose::STANDARD
                    .decode(v["data"].as_str().unwrap_or_default())
                    .expect("base64 body");
                sources
                    .lock()
                    .unwrap()
                    .push(v["topic"].as_str().unwrap_or_default().to_string());
                sink.lock().unwrap().push(Received {
                    topic: short.clone(),
                    key: v["key"].as_str().unwrap_or_default().to_string(),
                    headers,
                    body,
                });
            }
        });
        Reader { got, from, child }
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Pulsar as a backend under the conformance suite: its own topic, read by its own
/// subscription.
pub struct PulsarUnderTest {
    pub publisher: Arc<PulsarPublisher>,
    pub topic: String,
    pub reader: Reader,
}

impl PulsarUnderTest {
    pub async fn new() -> PulsarUnderTest {
        PulsarUnderTest::with(config(&pulsar_url())).await
    }

    pub async fn with(cfg: PulsarConfig) -> PulsarUnderTest {
        let topic = unique_topic();
        let full = full_name(&topic);
        PulsarUnderTest::reading(cfg, topic, &full).await
    }

    /// On `topic`, read by a subscription on `full`, its full name as the config makes it.
    async fn reading(cfg: PulsarConfig, topic: String, full: &str) -> PulsarUnderTest {
        // The subscription exists before the first event, so the reader sees them all
        // whatever the topic's retention.
        let reader = Reader::start(&cfg.service_url, full).await;
        PulsarUnderTest {
            publisher: Arc::new(PulsarPublisher::connect(&cfg).await),
            reader,
            topic,
        }
    }
}

/// The limit is the backend's own `max_message_bytes` (less a batch's bytes and framing):
/// the relay refuses the row before it is sent, naming the field; and a topic Pulsar cannot
/// name.
impl SizeLimit for PulsarUnderTest {
    async fn with_a_size_limit() -> PulsarUnderTest {
        let mut cfg = config(&pulsar_url());
        cfg.batching_max_bytes = 1024;
        cfg.max_message_bytes = 1024 + 16 * 1024 + 10_000;
        PulsarUnderTest::with(cfg).await
    }
    fn oversized(&self) -> usize {
        20_000
    }
    fn oversized_reason(&self) -> &'static [&'static str] {
        &["field payload", "max_message_bytes", "of 10000 bytes"]
    }
    fn refused_topics(&self) -> Vec<(String, Vec<String>)> {
        vec![(
            "orders/created".into(),
            vec!["field topic".into(), "'/'".into()],
        )]
    }
}

/// A topic configured ephemeral goes to `non-persistent://`, where a connected subscriber
/// gets it.
impl Ephemeral for PulsarUnderTest {
    type Live = PulsarUnderTest;
    async fn with_an_ephemeral_topic() -> PulsarUnderTest {
        let mut cfg = config(&pulsar_url());
        cfg.topics.insert(
            "eph*".into(),
            TopicSettings {
                persistence: Persistence::Ephemeral,
                ..TopicSettings::default()
            },
        );
        let topic = format!("eph{}", unique_topic());
        let full = format!("non-persistent://public/default/{topic}");
        PulsarUnderTest::reading(cfg, topic, &full).await
    }
}

impl Restart for PulsarUnderTest {
    type OnItsOwnBroker = PulsarOnItsOwnBroker;
    async fn on_a_broker_of_its_own() -> PulsarOnItsOwnBroker {
        let broker = PrivatePulsar::start();
        let topic = unique_topic();
        PulsarOnItsOwnBroker {
            reader: Some(Reader::start(&broker.url(), &full_name(&topic)).await),
            publisher: Arc::new(PulsarPublisher::connect(&config(&broker.url())).await),
            topic,
            broker,
        }
    }
}

/// Pulsar on a broker of the test's own, for the `restart` case: killed (SIGKILL) and started
/// again on its data. The reader goes with the broker; once it is back, a new subscription
/// from the earliest message reads what the broker stored before the kill and after.
pub struct PulsarOnItsOwnBroker {
    pub publisher: Arc<PulsarPublisher>,
    pub topic: String,
    pub reader: Option<Reader>,
    pub broker: PrivatePulsar,
}

impl BackendUnderTest for PulsarOnItsOwnBroker {
    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }
    fn topic(&self) -> String {
        self.topic.clone()
    }
    async fn received(&self) -> Vec<Received> {
        self.reader
            .as_ref()
            .map(Reader::received)
            .unwrap_or_default()
    }
}

impl BrokerAway for PulsarOnItsOwnBroker {
    const OUTAGES: &'static [Outage] = &[Outage::Killed];
    async fn take_away(&mut self, how: Outage) {
        assert_eq!(how, Outage::Killed);
        self.broker.stop_server();
        self.reader = None;
    }
    async fn bring_back(&mut self, how: Outage) -> Kept {
        assert_eq!(how, Outage::Killed);
        self.broker.start_server();
        self.reader = Some(Reader::start(&self.broker.url(), &full_name(&self.topic)).await);
        Kept::Everything
    }
}

impl BackendUnderTest for PulsarUnderTest {
    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }
    fn topic(&self) -> String {
        self.topic.clone()
    }
    async fn received(&self) -> Vec<Received> {
        self.reader.received()
    }
}

/// The pulsar-lite binary the test script installed (see scripts/services.sh);
/// `PULSAR_LITE_BIN` overrides.
pub fn pulsar_lite_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PULSAR_LITE_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
    std::env::var("OUTBOX_RELAY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache.join("outbox-relay"))
        .join("pulsar-lite-0.2.0/pulsar_lite/bin/pulsar-lite")
}

/// A pulsar-lite broker of the test's own on a free port, for tests that stop it. Its data
/// (RocksDB) stays in its directory across a restart, as a real broker's would.
pub struct PrivatePulsar {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl PrivatePulsar {
    pub fn start() -> PrivatePulsar {
        PrivatePulsar::with_config("")
    }

    /// A broker with more settings in its config file (e.g. `default_partitions = 3`).
    pub fn with_config(extra: &str) -> PrivatePulsar {
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pulsar-")
            .tempdir()
            .unwrap();
        // Metrics off: pulsar-lite would otherwise bind 0.0.0.0:8080 for each instance.
        std::fs::write(
            dir.path().join("pulsar-lite.toml"),
            format!("{extra}\n[metrics]\nenabled = false\n"),
        )
        .unwrap();
        let mut p = PrivatePulsar {
            dir,
            port: free_port(),
            child: None,
        };
        p.start_server();
        p
    }

    pub fn url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.port)
    }

    pub fn start_server(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("pulsar-lite.log"))
            .unwrap();
        let child = Command::new(pulsar_lite_bin())
            .current_dir(self.dir.path())
            .arg("--config")
            .arg(self.dir.path().join("pulsar-lite.toml"))
            .arg("--addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--db-path")
            .arg(self.dir.path().join("db"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pulsar-lite (installed by scripts/test.sh)");
        self.child = Some(child);
        super::wait_listening(self.port, "pulsar-lite");
    }

    /// Kills the broker at once, as a crash would.
    pub fn stop_server(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivatePulsar {
    fn drop(&mut self) {
        self.stop_server();
    }
}
