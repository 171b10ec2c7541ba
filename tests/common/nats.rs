//! NATS test support: a stream of the test's own on the shared server (subjects under a
//! unique prefix), an independent pull-consumer reader, and private nats-server instances for
//! tests that stop the server.

use super::conformance::{
    BackendUnderTest, BrokerAway, Ephemeral, Kept, Outage, Received, Restart, SizeLimit,
};
use super::free_port;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use outbox_relay::config::{Dur, Provisioning};
use outbox_relay::publisher::nats::config::{Persistence, StreamSettings, TopicSettings};
use outbox_relay::publisher::nats::{provision, NatsConfig, NatsPublisher};
use outbox_relay::publisher::Publisher;
use outbox_relay::store::NewEvent;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The shared server; `TEST_NATS_URL` overrides.
pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A unique subject prefix and stream name for one test.
pub fn unique() -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    (format!("t{id}"), format!("T{id}"))
}

pub fn config(url: &str) -> NatsConfig {
    NatsConfig {
        servers: vec![url.to_string()],
        ack_timeout: outbox_relay::config::Dur::secs(5),
        reconnect_delay_max: outbox_relay::config::Dur::ms(500),
        ..NatsConfig::default()
    }
}

/// Creates a stream `name` over `<prefix>.>` on `url`.
pub async fn create_stream(url: &str, name: &str, prefix: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![format!("{prefix}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create the test stream");
    js
}

/// Reads a stream from its start with a pull consumer, independent of the relay.
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Received> {
    let s = js.get_stream(stream).await.expect("the stream");
    let c = s
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("a pull consumer");
    let mut info = s.clone();
    let total = info.info().await.unwrap().state.messages as usize;
    let mut out = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    let mut msgs = c.messages().await.expect("consume");
    while out.len() < total {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .expect("the stream's messages within 10 s")
            .expect("a message")
            .expect("no consume error");
        out.push(received(&m.message));
    }
    out
}

pub fn received(m: &async_nats::Message) -> Received {
    let headers = m
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.to_string(), v[0].to_string()))
                .collect()
        })
        .unwrap_or_default();
    let mut r = Received {
        topic: m.subject.to_string(),
        key: String::new(),
        headers,
        body: m.payload.to_vec(),
    };
    r.key = r.headers.get("X-Aggregate-ID").cloned().unwrap_or_default();
    r
}

/// JetStream as a backend under the conformance suite: its own stream, read by a pull consumer.
pub struct JetStream {
    pub publisher: Arc<NatsPublisher>,
    pub js: jetstream::Context,
    pub prefix: String,
    pub stream: String,
}

impl JetStream {
    pub async fn new() -> JetStream {
        let (prefix, stream) = unique();
        let js = create_stream(&nats_url(), &stream, &prefix).await;
        let publisher = NatsPublisher::connect(&config(&nats_url()))
            .await
            .expect("connect the publisher");
        JetStream {
            publisher: Arc::new(publisher),
            js,
            prefix,
            stream,
        }
    }

    pub async fn delete(self) {
        let _ = self.js.delete_stream(&self.stream).await;
    }
}

impl BackendUnderTest for JetStream {
    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }
    fn topic(&self) -> String {
        format!("{}.conformance", self.prefix)
    }
    async fn received(&self) -> Vec<Received> {
        read_stream(&self.js, &self.stream).await
    }
    fn check_message(&self, r: &Received) {
        assert_eq!(r.headers["Nats-Msg-Id"], r.headers["X-Event-ID"]);
    }
    async fn clean_up(&self) {
        let _ = self.js.delete_stream(&self.stream).await;
    }
}

/// The stream's own limit (`max_message_size`, set by the relay's provisioning) refuses an
/// oversized message; a subject with an empty token, and one no stream covers, are refused too.
impl SizeLimit for JetStream {
    async fn with_a_size_limit() -> JetStream {
        let (prefix, stream) = unique();
        let mut cfg = config(&nats_url());
        cfg.provisioning = Provisioning::CreateOnly;
        cfg.streams.insert(
            stream.clone(),
            StreamSettings {
                subjects: vec![format!("{prefix}.>")],
                max_message_size: 1000,
                ..StreamSettings::default()
            },
        );
        let publisher = NatsPublisher::connect(&cfg)
            .await
            .expect("connect the publisher");
        provision::provision(publisher.jetstream(), &cfg, cfg.provisioning)
            .await
            .expect("provision the stream");
        let client = async_nats::connect(nats_url())
            .await
            .expect("connect to NATS");
        JetStream {
            publisher: Arc::new(publisher),
            js: jetstream::new(client),
            prefix,
            stream,
        }
    }
    fn oversized(&self) -> usize {
        4000
    }
    fn oversized_reason(&self) -> &'static [&'static str] {
        &["maximum"]
    }
    fn refused_topics(&self) -> Vec<(String, Vec<String>)> {
        vec![
            (
                format!("{}..double", self.prefix),
                vec!["token 2 is empty".into()],
            ),
            (
                "nostream.anywhere".into(),
                vec!["no JetStream stream covers subject \"nostream.anywhere\"".into()],
            ),
        ]
    }
}

impl Ephemeral for JetStream {
    type Live = CoreNats;
    async fn with_an_ephemeral_topic() -> CoreNats {
        let (prefix, _) = unique();
        let mut cfg = config(&nats_url());
        cfg.topics.insert(
            format!("{prefix}.live.*"),
            TopicSettings {
                persistence: Persistence::Ephemeral,
            },
        );
        let topic = format!("{prefix}.live.prices");
        assert_eq!(cfg.persistence_for(&topic), Persistence::Ephemeral);
        let got = subscribe(&nats_url(), &format!("{prefix}.live.>")).await;
        CoreNats {
            publisher: Arc::new(NatsPublisher::connect(&cfg).await.unwrap()),
            topic,
            got,
        }
    }
}

/// An ephemeral topic: published through core NATS, read by a core subscriber.
pub struct CoreNats {
    pub publisher: Arc<NatsPublisher>,
    pub topic: String,
    pub got: Arc<Mutex<Vec<Received>>>,
}

impl BackendUnderTest for CoreNats {
    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }
    fn topic(&self) -> String {
        self.topic.clone()
    }
    async fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

impl Restart for JetStream {
    type OnItsOwnBroker = JetStreamOnItsOwnServer;
    async fn on_a_broker_of_its_own() -> JetStreamOnItsOwnServer {
        let server = PrivateNats::start();
        let (prefix, stream) = unique();
        let js = create_stream(&server.url(), &stream, &prefix).await;
        let publisher = NatsPublisher::connect(&config(&server.url()))
            .await
            .expect("connect the publisher");
        JetStreamOnItsOwnServer {
            on_it: JetStream {
                publisher: Arc::new(publisher),
                js,
                prefix,
                stream,
            },
            server,
        }
    }
}

/// JetStream on a nats-server of the test's own, for the `restart` case: killed and started
/// again on the same port and store.
pub struct JetStreamOnItsOwnServer {
    pub on_it: JetStream,
    pub server: PrivateNats,
}

impl BackendUnderTest for JetStreamOnItsOwnServer {
    fn publisher(&self) -> Arc<dyn Publisher> {
        self.on_it.publisher()
    }
    fn topic(&self) -> String {
        self.on_it.topic()
    }
    async fn received(&self) -> Vec<Received> {
        self.on_it.received().await
    }
    fn check_message(&self, r: &Received) {
        self.on_it.check_message(r)
    }
}

impl BrokerAway for JetStreamOnItsOwnServer {
    const OUTAGES: &'static [Outage] = &[Outage::Killed];
    fn publish_timeout(&self) -> Dur {
        Dur::secs(3)
    }
    async fn take_away(&mut self, how: Outage) {
        assert_eq!(how, Outage::Killed);
        self.server.stop_server();
    }
    async fn bring_back(&mut self, how: Outage) -> Kept {
        assert_eq!(how, Outage::Killed);
        self.server.start_server();
        // The reader on a client of its own, connected afresh.
        let client = async_nats::connect(self.server.url())
            .await
            .expect("connect to the restarted server");
        self.on_it.js = jetstream::new(client);
        Kept::Everything
    }
    fn check_after_the_outages(&self, got: &[Received], sent: &[NewEvent]) {
        assert!(
            self.on_it.publisher.reconnects() >= 1,
            "the client saw the disconnect"
        );
        assert_eq!(
            got.len(),
            sent.len(),
            "the duplicate window dropped re-publishes"
        );
    }
}

/// Collects what a core NATS subscription receives.
pub async fn subscribe(url: &str, subject: &str) -> Arc<Mutex<Vec<Received>>> {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let mut sub = client.subscribe(subject.to_string()).await.unwrap();
    client.flush().await.unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Some(m) = sub.next().await {
            sink.lock().unwrap().push(received(&m));
        }
    });
    got
}

/// A nats-server with JetStream of the test's own, on a free port, for tests that stop it.
pub struct PrivateNats {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

fn nats_server_bin() -> PathBuf {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl PrivateNats {
    pub fn start() -> PrivateNats {
        let mut n = PrivateNats {
            dir: tempfile::Builder::new()
                .prefix("outbox-relay-nats-")
                .tempdir()
                .unwrap(),
            port: free_port(),
            child: None,
        };
        n.start_server();
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn start_server(&mut self) {
        self.launch(true);
    }

    /// The same server (port, store) with JetStream off: its API and streams answer nothing,
    /// so a JetStream publish gets "no responders".
    pub fn start_server_without_jetstream(&mut self) {
        self.launch(false);
    }

    fn launch(&mut self, jetstream: bool) {
        let mut cmd = Command::new(nats_server_bin());
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if jetstream {
            cmd.arg("-js");
        }
        let child = cmd
            .arg("-sd")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not answer on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a NATS server greets on the port (its INFO line), not merely whether something
    /// accepts connections there.
    fn answers(&self) -> bool {
        use std::io::Read;
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        let mut greeting = [0u8; 4];
        conn.read_exact(&mut greeting).is_ok() && &greeting == b"INFO"
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: a frozen broker keeps its connections
    /// open and answers nothing.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("the server runs").id();
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} nats-server");
    }

    /// Kills the server at once (no shutdown), as a crash would.
    pub fn stop_server(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop_server();
    }
}
