//! The Pulsar backend against a real Pulsar-protocol broker (pulsar-lite on 127.0.0.1:6650, or
//! TEST_PULSAR_URL), read back by an independent subscription (the official client, tests/pulsar_read.py). Each
//! test has its own topic; the tests that stop the broker run one of their own.

mod common;

use common::conformance;
use common::pulsar::{self as p, PrivatePulsar, PulsarUnderTest, Reader};
use common::pulsar_tls::TlsFront;
use common::{numbered_on, run_until_empty, spawn, wait_for, watchdog, TestDb};
use outbox_relay::config::{Dur, OrderingMode, RouteConfig};
use outbox_relay::publisher::pulsar::PulsarPublisher;
use outbox_relay::publisher::{Health, Publisher};
use outbox_relay::store::NewEvent;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(120);

// The broker killed and restarted on its data, the backend's size limit and non-persistent
// topics are the suite's cases, with the hooks in tests/common/pulsar.rs.
crate::conformance_suite!(
    suite,
    PulsarUnderTest::new().await,
    pipelined,
    restart,
    size_limit,
    ephemeral
);

fn routes() -> Vec<RouteConfig> {
    vec![common::route("*", "pulsar")]
}

/// A relay whose broker is not there at start-up starts anyway, reports the backend down,
/// and keeps the events pending without spending their attempts; once the broker is up they
/// are all published.
#[tokio::test]
async fn a_broker_down_at_start_fails_nothing_and_is_used_once_up() {
    let _watchdog = watchdog(
        "a_broker_down_at_start_fails_nothing_and_is_used_once_up",
        Duration::from_secs(300),
    );
    let mut broker = PrivatePulsar::start();
    broker.stop_server();
    let publisher = Arc::new(PulsarPublisher::connect(&p::config(&broker.url())).await);
    assert!(
        matches!(publisher.health().await, Health::Down(_)),
        "health while nothing listens"
    );
    let topic = p::unique_topic();
    let db = TestDb::new().await;
    let mut cfg = db.config();
    cfg.relay.backoff_initial = Dur::ms(20);
    cfg.relay.backoff_max = Dur::ms(100);
    cfg.relay.max_attempts = 3;
    let events: Vec<NewEvent> = (0..30)
        .map(|i| numbered_on(&topic, &format!("a{}", i % 3), i / 3))
        .collect();
    db.enqueue(&events).await;
    let relay = db
        .relay_with(&cfg, vec![("pulsar", publisher.clone())], &routes())
        .await;
    let stats = relay.stats();
    let (h, stop) = spawn(relay);
    wait_for(
        DEADLINE,
        "hand-offs answered while the broker is away",
        || async { stats.retried.load(Ordering::Relaxed) > 30 },
    )
    .await;
    assert_eq!(db.count("status = 'failed'").await, 0);
    assert_eq!(
        db.count("attempts > 0").await,
        0,
        "an outage spent attempts"
    );
    broker.start_server();
    let reader = Reader::start(&broker.url(), &p::full_name(&topic)).await;
    wait_for(
        DEADLINE,
        "every row published once the broker is up",
        || async { db.total().await == 0 },
    )
    .await;
    wait_for(DEADLINE, "the reader to have every event", || async {
        reader.received().len() >= events.len()
    })
    .await;
    assert!(matches!(publisher.health().await, Health::Up));
    stop.cancel();
    h.await.unwrap();
    conformance::assert_every_event_arrived(&reader.received(), &events);
    conformance::assert_first_deliveries_in_order(&reader.received());
    db.drop_schema().await;
}

/// On a partitioned topic (the broker creates topics with 3 partitions), an aggregate's events
/// all go to one partition, the one its key hashes to, in order; the aggregates spread over
/// the partitions.
#[tokio::test]
async fn on_a_partitioned_topic_each_aggregate_stays_on_one_partition_in_order() {
    let _watchdog = watchdog(
        "on_a_partitioned_topic_each_aggregate_stays_on_one_partition_in_order",
        Duration::from_secs(300),
    );
    let broker = PrivatePulsar::with_config("default_partitions = 3");
    let topic = p::unique_topic();
    // Subscribed first: the subscription creates the topic, with its 3 partitions.
    let reader = Reader::start(&broker.url(), &p::full_name(&topic)).await;
    let publisher = Arc::new(PulsarPublisher::connect(&p::config(&broker.url())).await);
    let db = TestDb::new().await;
    let events: Vec<NewEvent> = (0..20)
        .flat_map(|seq| (0..30).map(move |a| (a, seq)))
        .map(|(a, seq)| numbered_on(&topic, &format!("a{a}"), seq))
        .collect();
    db.enqueue(&events).await;
    let mut cfg = db.config();
    cfg.relay.ordering = OrderingMode::Pipelined;
    let relay = db
        .relay_with(&cfg, vec![("pulsar", publisher)], &routes())
        .await;
    run_until_empty(&db, relay, DEADLINE).await;
    wait_for(DEADLINE, "the reader to have every event", || async {
        reader.received().len() >= events.len()
    })
    .await;
    let got = reader.received();
    let from = reader.from.lock().unwrap().clone();
    let mut partition_of: std::collections::HashMap<&str, &str> = Default::default();
    for (r, f) in got.iter().zip(&from) {
        assert!(f.contains("-partition-"), "read from a partition: {f}");
        let first = partition_of.entry(r.key.as_str()).or_insert(f.as_str());
        assert_eq!(*first, f.as_str(), "aggregate {} on two partitions", r.key);
    }
    let partitions: HashSet<&&str> = partition_of.values().collect();
    assert!(partitions.len() > 1, "30 aggregates on one partition");
    conformance::assert_every_event_arrived(&got, &events);
    conformance::assert_in_order(&got);
    db.drop_schema().await;
}

/// OAuth2 client credentials against an issuer of the test's own (discovery, token endpoint):
/// the client reads the credentials file, posts the client id and secret with the audience,
/// and connects with the token (pulsar-lite takes any token), and the events flow.
#[tokio::test]
async fn oauth2_client_credentials_fetch_a_token_and_the_events_flow() {
    use axum::extract::State;
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use outbox_relay::config::Secret;
    use outbox_relay::publisher::pulsar::config::AuthMethod;
    use serde_json::json;
    use std::sync::Mutex;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // As issuers name themselves, with the trailing slash of a bare host (pulsar-rs parses
    // the issuer URL, which adds it, and discovery compares the two exactly).
    let base = format!("http://{}", listener.local_addr().unwrap());
    let issuer = format!("{base}/");
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let discovery = json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    });
    let app = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move || async move { Json(discovery) }),
        )
        .route("/jwks", get(|| async { Json(json!({"keys": []})) }))
        .route(
            "/token",
            post(
                |State(asked): State<Arc<Mutex<Vec<String>>>>, body: String| async move {
                    asked.lock().unwrap().push(body);
                    Json(json!({
                        "access_token": "test-access-token",
                        "token_type": "bearer",
                        "expires_in": 3600,
                    }))
                },
            ),
        )
        .with_state(asked.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials.json");
    std::fs::write(
        &creds,
        r#"{"client_id": "relay", "client_secret": "client-secret-1a2b"}"#,
    )
    .unwrap();
    let mut cfg = p::config(&p::pulsar_url());
    cfg.auth = AuthMethod::Oauth2;
    cfg.oauth2_issuer_url = Some(issuer.clone());
    cfg.oauth2_credentials_url = Some(Secret::new(format!("file://{}", creds.display())));
    cfg.oauth2_audience = Some("urn:test:pulsar".into());
    cfg.validate("backends.p", Dur::secs(30)).unwrap();
    let b = PulsarUnderTest::with(cfg).await;
    conformance::one_result_per_message(&b).await;
    let asked = asked.lock().unwrap().clone();
    let first = asked.first().expect("the token endpoint was asked");
    for part in [
        "grant_type=client_credentials",
        "client_id=relay",
        "client_secret=client-secret-1a2b",
        "audience=urn%3Atest%3Apulsar",
    ] {
        assert!(first.contains(part), "{part} in the token request: {first}");
    }
}

/// `pulsar://dead:port,live:port`, as the Go and Java clients write several hosts: the
/// connector gets past the host that does not answer and the events flow through the other.
#[tokio::test]
async fn a_service_url_with_several_hosts_connects_through_the_first_that_answers() {
    let live = p::pulsar_url();
    let host = live.trim_start_matches("pulsar://");
    // A port nothing listens on.
    let dead = format!("127.0.0.1:{}", common::free_port());
    let cfg = p::config(&format!("pulsar://{dead},{host}"));
    cfg.validate("backends.p", Dur::secs(30)).unwrap();
    assert_eq!(cfg.service_urls().len(), 2);
    let b = under_test(&cfg).await;
    // The first attempt goes to the dead host, and the backend says so for the pause before
    // the next attempt (unavailable meanwhile, which the relay retries without counting);
    // the next one connects.
    let saw_dead = std::sync::atomic::AtomicBool::new(false);
    wait_for(DEADLINE, "connected through the second host", || async {
        match b.publisher.health().await {
            Health::Up => true,
            Health::Down(why) => {
                if why.contains(&dead) {
                    saw_dead.store(true, Ordering::SeqCst);
                }
                false
            }
        }
    })
    .await;
    assert!(
        saw_dead.load(Ordering::SeqCst),
        "the first host ({dead}) was tried first"
    );
    conformance::one_result_per_message(&b).await;
}

/// Token authentication: the client's CONNECT carries the `token` method and the token itself.
/// pulsar-lite takes any token, so what is checked is what goes on the wire: the CONNECT
/// frame, decoded by a proxy of the test's own between the relay and the broker.
#[tokio::test]
async fn token_auth_sends_the_token_in_the_connect_frame_and_the_events_flow() {
    use outbox_relay::config::Secret;
    use outbox_relay::publisher::pulsar::config::AuthMethod;
    use prost013::Message as _;
    use pulsar::message::proto::BaseCommand;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let live = p::pulsar_url();
    let broker = live.trim_start_matches("pulsar://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    // The first frame of each connection, as the client sent it.
    let connects: Arc<Mutex<Vec<BaseCommand>>> = Arc::default();
    let seen = connects.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (seen, broker) = (seen.clone(), broker.clone());
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&broker).await else {
                    return;
                };
                // [u32 total size][u32 command size][command]: CONNECT has no payload.
                let mut size = [0u8; 4];
                if client.read_exact(&mut size).await.is_err() {
                    return;
                }
                let mut frame = vec![0u8; u32::from_be_bytes(size) as usize];
                if client.read_exact(&mut frame).await.is_err() {
                    return;
                }
                if let Some(cmd) = frame.get(4..).and_then(|c| BaseCommand::decode(c).ok()) {
                    seen.lock().unwrap().push(cmd);
                }
                if server.write_all(&size).await.is_ok() && server.write_all(&frame).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    let token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.relay-test-jwt";
    let mut cfg = p::config(&format!("pulsar://{proxy}"));
    cfg.auth = AuthMethod::Token;
    cfg.token = Some(Secret::new(token.to_string()));
    cfg.validate("backends.p", Dur::secs(30)).unwrap();
    let b = under_test(&cfg).await;
    conformance::one_result_per_message(&b).await;
    let connects = connects.lock().unwrap().clone();
    let connect = connects
        .first()
        .and_then(|c| c.connect.clone())
        .unwrap_or_else(|| panic!("the first frame is a CONNECT: {connects:?}"));
    assert_eq!(connect.auth_method_name.as_deref(), Some("token"));
    assert_eq!(connect.auth_data.as_deref(), Some(token.as_bytes()));
}

/// A publisher for `cfg`, with a reader of its own on the plaintext broker.
async fn under_test(cfg: &outbox_relay::publisher::pulsar::PulsarConfig) -> PulsarUnderTest {
    let topic = p::unique_topic();
    let reader = Reader::start(&p::pulsar_url(), &p::full_name(&topic)).await;
    PulsarUnderTest {
        publisher: Arc::new(PulsarPublisher::connect(cfg).await),
        topic,
        reader,
    }
}

/// Waits until the publisher's health says up, then checks that messages flow.
async fn flows_once_up(b: &PulsarUnderTest, what: &str) {
    wait_for(DEADLINE, what, || async {
        matches!(b.publisher.health().await, Health::Up)
    })
    .await;
    conformance::one_result_per_message(b).await;
}

/// Waits until the publisher's health says down naming what to check over TLS (pulsar-rs does
/// not tell a refused certificate from a refused name, so neither can the reason), and returns
/// what it said.
async fn refused_over_tls(b: &PulsarUnderTest, what: &str) -> String {
    let last = std::sync::Mutex::new(String::new());
    wait_for(DEADLINE, what, || async {
        let h = b.publisher.health().await;
        *last.lock().unwrap() = format!("{h:?}");
        matches!(&h, Health::Down(r) if r.contains("tls_ca_file")
            && r.contains("tls_hostname_verification"))
    })
    .await;
    last.into_inner().unwrap()
}

/// TLS, live: `pulsar+ssl://` to a TLS front of the test's own (pulsar-lite has no TLS),
/// trusting the test CA through `tls_ca_file`, hostname verification on. The events flow, and
/// they went over TLS: the front's lookup answers send every connection through itself.
#[tokio::test]
async fn over_tls_with_the_ca_file_and_hostname_verification_the_events_flow() {
    let front = TlsFront::start(p::pulsar_url().trim_start_matches("pulsar://")).await;
    let mut cfg = p::config(&front.url("localhost"));
    cfg.tls_ca_file = Some(front.cert("ca.crt"));
    cfg.validate("backends.p", Dur::secs(30)).unwrap();
    assert!(cfg.tls_hostname_verification, "on by default");
    let b = under_test(&cfg).await;
    flows_once_up(&b, "connected over TLS").await;
    assert!(
        front.handshakes.load(Ordering::SeqCst) >= 2,
        "the lookup connection and the producer's both over TLS"
    );
}

/// A certificate the configured CA did not sign is refused, and so is a host name the
/// certificate does not carry (it is for `localhost`, the URL says 127.0.0.1): the backend
/// stays down naming what to check, and nothing gets through the handshake. With hostname
/// verification off, the same name is accepted and the events flow; with
/// `tls_allow_insecure`, so is the untrusted certificate.
#[tokio::test]
async fn over_tls_an_untrusted_certificate_or_a_wrong_host_name_is_refused() {
    let front = TlsFront::start(p::pulsar_url().trim_start_matches("pulsar://")).await;

    let mut untrusted = p::config(&front.url("localhost"));
    untrusted.tls_ca_file = Some(front.cert("other.crt"));
    let b = under_test(&untrusted).await;
    let said = refused_over_tls(&b, "refused: untrusted").await;
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 0, "{said}");

    let mut wrong_name = p::config(&front.url("127.0.0.1"));
    wrong_name.tls_ca_file = Some(front.cert("ca.crt"));
    let b = under_test(&wrong_name).await;
    let said = refused_over_tls(&b, "refused: name").await;
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 0, "{said}");

    let mut unchecked_name = wrong_name.clone();
    unchecked_name.tls_hostname_verification = false;
    unchecked_name
        .validate("backends.p", Dur::secs(30))
        .unwrap();
    let b = under_test(&unchecked_name).await;
    flows_once_up(&b, "connected, the name unchecked").await;
    let before = front.handshakes.load(Ordering::SeqCst);
    assert!(before >= 1);

    // And `tls_allow_insecure` takes a certificate no configured CA signed.
    let mut insecure = untrusted.clone();
    insecure.tls_allow_insecure = true;
    insecure.validate("backends.p", Dur::secs(30)).unwrap();
    let b = under_test(&insecure).await;
    flows_once_up(&b, "connected, the certificate unchecked").await;
    assert!(front.handshakes.load(Ordering::SeqCst) > before);
}
