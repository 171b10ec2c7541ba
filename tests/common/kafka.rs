//! Kafka test support: topics of the test's own on the shared broker (tansu on 127.0.0.1:9092,
//! or TEST_KAFKA_BROKERS), a separate consumer in a consumer group reading them, and private
//! broker instances for tests that stop the broker.

use super::conformance::{
    BackendUnderTest, BrokerAway, Kept, Outage, Received, Restart, SizeLimit,
};
use super::free_port;
use outbox_relay::config::Dur;
use outbox_relay::publisher::kafka::{KafkaConfig, KafkaPublisher};
use outbox_relay::publisher::Publisher;
use outbox_relay::store::NewEvent;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn unique_topic() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub fn config(brokers: &str) -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: brokers.into(),
        ..KafkaConfig::default()
    }
}

pub fn publisher(brokers: &str) -> Arc<KafkaPublisher> {
    Arc::new(KafkaPublisher::new(&config(brokers), Dur::secs(30)).expect("a producer"))
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let res = admin
        .create_topics([&t], &AdminOptions::new())
        .await
        .expect("create topic");
    for r in res {
        r.expect("topic created");
    }
}

/// A consumer in a consumer group of its own, polling on a thread until dropped, collecting
/// every message of `topic`.
pub struct GroupReader {
    pub got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

/// How long dropping a reader waits for its consumer to leave the group. librdkafka's close
/// (leave the group, commit offsets) waits on the broker without a deadline of its own, and a
/// broker that was paused or replaced may never answer: past this the thread is left behind
/// to finish with the process instead of holding the test.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

impl GroupReader {
    pub fn start(brokers: &str, topic: &str) -> GroupReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("g-{}", uuid::Uuid::new_v4().simple()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            // tansu waits half of this on every fetch, data or not.
            .set("fetch.wait.max.ms", "50")
            .set("session.timeout.ms", "30000")
            .create()
            .expect("a consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, halt) = (got.clone(), stop.clone());
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                // Errors (transport, while a broker restarts) are skipped: the consumer
                // reconnects by itself.
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|hd| {
                                    (
                                        hd.key.to_string(),
                                        String::from_utf8_lossy(hd.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    sink.lock().unwrap().push(Received {
                        topic: m.topic().to_string(),
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        headers,
                        body: m.payload().unwrap_or_default().to_vec(),
                    });
                }
            }
            drop(consumer);
            let _ = done_tx.send(());
        });
        GroupReader {
            got,
            stop,
            done: Mutex::new(Some(done)),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Whether every one of `events` has arrived (by its `X-Event-ID`).
    pub fn has_all<'a>(&self, events: impl IntoIterator<Item = &'a NewEvent>) -> bool {
        super::conformance::has_every_event(&self.got.lock().unwrap(), events)
    }
}

impl Drop for GroupReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(done) = self.done.get_mut().unwrap().take() {
            if done.recv_timeout(CLOSE_WAIT).is_err() {
                eprintln!("kafka test consumer: no clean close within {CLOSE_WAIT:?}; left behind");
            }
        }
    }
}

/// Kafka as a backend under the conformance suite: its own topic, read by a consumer group.
pub struct KafkaUnderTest {
    pub publisher: Arc<KafkaPublisher>,
    pub topic: String,
    pub reader: GroupReader,
}

impl KafkaUnderTest {
    pub async fn new() -> KafkaUnderTest {
        KafkaUnderTest::with(config(&brokers())).await
    }

    /// With a producer configured so, on the shared broker.
    pub async fn with(cfg: KafkaConfig) -> KafkaUnderTest {
        let topic = unique_topic();
        create_topic(&brokers(), &topic, 3).await;
        KafkaUnderTest {
            publisher: Arc::new(KafkaPublisher::new(&cfg, Dur::secs(30)).expect("a producer")),
            reader: GroupReader::start(&brokers(), &topic),
            topic,
        }
    }
}

impl BackendUnderTest for KafkaUnderTest {
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

/// tansu enforces no message size, so the limit is the producer's own `message.max.bytes`:
/// the relay knows it and refuses the row before it is sent, naming the field.
impl SizeLimit for KafkaUnderTest {
    async fn with_a_size_limit() -> KafkaUnderTest {
        let mut cfg = config(&brokers());
        cfg.properties
            .insert("message.max.bytes".into(), "10000".into());
        KafkaUnderTest::with(cfg).await
    }
    fn oversized(&self) -> usize {
        20_000
    }
    fn oversized_reason(&self) -> &'static [&'static str] {
        &["field payload", "message.max.bytes of 10000"]
    }
    fn refused_topics(&self) -> Vec<(String, Vec<String>)> {
        vec![("orders/created".into(), vec!["'/'".into()])]
    }
}

impl Restart for KafkaUnderTest {
    type OnItsOwnBroker = KafkaOnItsOwnBroker;
    async fn on_a_broker_of_its_own() -> KafkaOnItsOwnBroker {
        let broker = PrivateKafka::start();
        let topic = unique_topic();
        create_topic(&broker.brokers(), &topic, 3).await;
        KafkaOnItsOwnBroker {
            publisher: Arc::new(
                KafkaPublisher::new(
                    &config(&broker.brokers()),
                    KafkaOnItsOwnBroker::PUBLISH_TIMEOUT,
                )
                .expect("a producer"),
            ),
            reader: Some(GroupReader::start(&broker.brokers(), &topic)),
            topic,
            broker,
        }
    }
}

/// Kafka on a broker of the test's own, for the `restart` case: stopped for a while (SIGSTOP)
/// and going on, then killed and replaced by a fresh one on the same port. The producer is
/// replaced by the relay where the new broker does not know its producer id. Events the killed
/// broker had acknowledged are gone with its memory (tansu's only engine that survives
/// nothing), so its topic is made again and a new consumer group reads what comes after.
pub struct KafkaOnItsOwnBroker {
    pub publisher: Arc<KafkaPublisher>,
    pub topic: String,
    /// None while the broker is killed: dropped before, to leave its group cleanly.
    pub reader: Option<GroupReader>,
    pub broker: PrivateKafka,
}

impl KafkaOnItsOwnBroker {
    /// The producer's delivery timeout and the relay's publish timeout.
    const PUBLISH_TIMEOUT: Dur = Dur::secs(5);
}

impl BackendUnderTest for KafkaOnItsOwnBroker {
    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }
    fn topic(&self) -> String {
        self.topic.clone()
    }
    async fn received(&self) -> Vec<Received> {
        self.reader
            .as_ref()
            .map(GroupReader::received)
            .unwrap_or_default()
    }
}

impl BrokerAway for KafkaOnItsOwnBroker {
    const OUTAGES: &'static [Outage] = &[Outage::Frozen, Outage::Killed];
    fn publish_timeout(&self) -> Dur {
        Self::PUBLISH_TIMEOUT
    }
    async fn take_away(&mut self, how: Outage) {
        match how {
            Outage::Frozen => self.broker.pause(),
            Outage::Killed => {
                self.reader = None;
                self.broker.stop_server();
            }
        }
    }
    async fn bring_back(&mut self, how: Outage) -> Kept {
        match how {
            Outage::Frozen => {
                self.broker.resume();
                Kept::Everything
            }
            Outage::Killed => {
                self.broker.start_server();
                create_topic(&self.broker.brokers(), &self.topic, 3).await;
                self.reader = Some(GroupReader::start(&self.broker.brokers(), &self.topic));
                Kept::Nothing
            }
        }
    }
}

/// The tansu binary the test script built (see scripts/services.sh); `TANSU_BIN` overrides.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
    let built = std::env::var("OUTBOX_RELAY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache.join("outbox-relay"))
        .join("tansu-0.6.0/bin/tansu");
    if built.exists() {
        built
    } else {
        PathBuf::from("tansu")
    }
}

/// A tansu broker of the test's own on a free port, for tests that stop it. It stores in
/// memory: tansu 0.6's SQLite engine panics on its own data after a restart ("more or less
/// than one row", lite.rs:503), so a restart here is a fresh, empty broker.
pub struct PrivateKafka {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl PrivateKafka {
    pub fn start() -> PrivateKafka {
        let mut k = PrivateKafka {
            dir: tempfile::Builder::new()
                .prefix("outbox-relay-kafka-")
                .tempdir()
                .unwrap(),
            port: free_port(),
            child: None,
        };
        k.start_server();
        k
    }

    /// The broker's log (both runs), in its directory while the test runs.
    fn log(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .unwrap()
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start_server(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(self.log())
            .spawn()
            .expect("start tansu (built by scripts/test.sh)");
        self.child = Some(child);
        super::wait_listening(self.port, "tansu");
    }

    /// The last `n` lines of the broker's log, for a failure message.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default();
        super::last_lines(&text, n)
    }

    /// Freezes the broker (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        assert!(self.signal("-STOP"), "SIGSTOP to the broker");
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        assert!(self.signal("-CONT"), "SIGCONT to the broker");
    }

    fn signal(&self, sig: &str) -> bool {
        let Some(child) = self.child.as_ref() else {
            return false;
        };
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Kills the broker at once, as a crash would.
    pub fn stop_server(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        // A paused broker must go on before it can be killed cleanly.
        self.signal("-CONT");
        self.stop_server();
    }
}
