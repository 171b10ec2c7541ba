//! Hard faults around a relay process: the broker frozen (SIGSTOP) while events are in flight
//! and Postgres black-holed (its connections stay open and nothing comes back) when SIGTERM
//! arrives. The relay must still exit within `relay.shutdown_timeout` plus a few seconds, and
//! nothing may be lost: what it could not record is published by the next relay.

mod common;

use common::nats::{self as n, PrivateNats};
use common::{conformance, interleaved, relay_bin, wait_for, watchdog, TestDb};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// A TCP proxy in front of Postgres that can turn into a black hole: bytes are read and
/// dropped, connections stay open, nothing is answered. Dropping it closes every connection.
struct Proxy {
    port: u16,
    black_hole: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let black_hole = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let (hole, halt) = (black_hole.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = halt.cancelled() => return,
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => return },
                };
                let (hole, halt, upstream) = (hole.clone(), halt.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = halt.cancelled() => {}
                        _ = futures::future::join(
                            pipe(cr, sw, hole.clone()),
                            pipe(sr, cw, hole),
                        ) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            black_hole,
            stop,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies until either side closes; once the hole is open, swallows everything forever.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if hole.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Sends SIGTERM and waits for the exit: the status and how long it took. Kills the process
/// and fails the test if it is still running after `limit`.
async fn sigterm_and_wait(
    child: &mut std::process::Child,
    limit: Duration,
) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM");
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (s, t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the relay did not exit within {limit:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// host:port of a postgres:// URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_in_time_with_a_frozen_broker_and_a_black_holed_database() {
    let _watchdog = watchdog(
        "sigterm_exits_in_time_with_a_frozen_broker_and_a_black_holed_database",
        Duration::from_secs(240),
    );
    let nats = PrivateNats::start();
    let (prefix, stream) = n::unique();
    let js = n::create_stream(&nats.url(), &stream, &prefix).await;
    let db = TestDb::new().await;
    let proxy = Proxy::start(host_port(&db.url)).await;
    let proxied = db
        .url
        .replacen(&host_port(&db.url), &format!("127.0.0.1:{}", proxy.port), 1);
    let dir = tempfile::tempdir().unwrap();
    // Results are waited for far longer than the test: only the shutdown bound can end it.
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            "[database]\nurl = \"{proxied}\"\nschema = \"{}\"\n\
             [relay]\nshutdown_timeout = \"2s\"\npublish_timeout = \"120s\"\npoll_interval = \"100ms\"\n\
             [http]\naddress = \"\"\n\
             [backends.nats]\ntype = \"nats\"\nservers = [\"{}\"]\nack_timeout = \"120s\"\n\
             [[routes]]\ntopic = \"*\"\nbackend = \"nats\"\n",
            db.schema(),
            nats.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(relay_bin())
        .current_dir(dir.path())
        .arg("run")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the relay binary");
    let topic = format!("{prefix}.orders");
    let on_topic = |evs: Vec<outbox_relay::store::NewEvent>| -> Vec<_> {
        evs.into_iter()
            .map(|mut e| {
                e.topic = topic.clone();
                e
            })
            .collect()
    };
    let first = on_topic(interleaved(10, 10, 0));
    db.enqueue(&first).await;
    wait_for(DEADLINE, "the first events published", || async {
        db.total().await == 0
    })
    .await;
    // The broker freezes; new events are claimed and handed over, and stay unanswered.
    nats.freeze(true);
    let second = on_topic(interleaved(10, 5, 10));
    db.enqueue(&second).await;
    wait_for(DEADLINE, "a claim open on the frozen broker", || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name LIKE 'outbox-relay%' AND state = 'idle in transaction'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        open > 0
    })
    .await;
    // Postgres goes silent too, then the stop.
    proxy.black_hole.store(true, Ordering::SeqCst);
    let (status, took) = sigterm_and_wait(&mut child, Duration::from_secs(30)).await;
    eprintln!("exited after {took:?} with {status}");
    // shutdown_timeout 2 s, then at most the 5 s grace, plus the process' own start of exit.
    assert!(
        took <= Duration::from_secs(9),
        "SIGTERM took {took:?} with a frozen broker and a silent database"
    );
    // The broker and the database come back; the connections of the dead relay close, its
    // claims end, and a new relay publishes everything that was left.
    nats.freeze(false);
    drop(proxy);
    let publisher = Arc::new(
        outbox_relay::publisher::nats::NatsPublisher::connect(&n::config(&nats.url()))
            .await
            .unwrap(),
    );
    let relay = db
        .relay_with(
            &db.config(),
            vec![("nats", publisher)],
            &[common::route("*", "nats")],
        )
        .await;
    common::run_until_empty(&db, relay, DEADLINE).await;
    let got = n::read_stream(&js, &stream).await;
    conformance::assert_every_event_arrived(&got, first.iter().chain(&second));
    db.drop_schema().await;
}

/// SIGTERM while the only event in flight waits on a broker that is down (down from the
/// start, so no result has said so; its health probe has): the relay does not wait out
/// `shutdown_timeout` for an answer that cannot come. It exits 0 within seconds, and the event
/// stays pending with no attempt spent.
#[tokio::test]
async fn sigterm_does_not_wait_for_a_broker_that_is_down() {
    let _watchdog = watchdog(
        "sigterm_does_not_wait_for_a_broker_that_is_down",
        Duration::from_secs(180),
    );
    let db = TestDb::new().await;
    let (closed, http) = (common::free_port(), common::free_port());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            "[database]\nurl = \"{}\"\nschema = \"{}\"\n\
             [relay]\nshutdown_timeout = \"60s\"\npublish_timeout = \"120s\"\npoll_interval = \"100ms\"\n\
             [monitor]\nhealth_interval = \"200ms\"\n\
             [http]\naddress = \"127.0.0.1:{http}\"\n\
             [backends.kafka]\ntype = \"kafka\"\nbootstrap_servers = \"127.0.0.1:{closed}\"\n\
             health_timeout = \"1s\"\n\
             [[routes]]\ntopic = \"*\"\nbackend = \"kafka\"\n",
            db.url,
            db.schema(),
        ),
    )
    .unwrap();
    db.enqueue(&[common::numbered("a", 0)]).await;
    let mut child = Command::new(relay_bin())
        .current_dir(dir.path())
        .arg("run")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the relay binary");
    let err = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(err), &mut text);
        text
    });
    // The event handed to a client that cannot reach its broker, and the probe saying so.
    wait_for(
        DEADLINE,
        "the event in flight and the backend down",
        || async {
            let health = common::http_get(http, "/health").map(|(_, body)| body);
            let Some(health) =
                health.and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            else {
                return false;
            };
            health["backends"][0]["up"] == serde_json::json!(false)
                && health["relay"]["in_flight"] == serde_json::json!(1)
        },
    )
    .await;
    let (status, took) = sigterm_and_wait(&mut child, Duration::from_secs(90)).await;
    let logs = logs.join().unwrap();
    assert!(
        status.success(),
        "exit {status}: {}",
        common::last_lines(&logs, 30)
    );
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM took {took:?} (shutdown_timeout 60 s) with only a down broker's event in \
         flight: {}",
        common::last_lines(&logs, 30)
    );
    assert!(
        logs.contains("waits only on brokers that are down"),
        "{}",
        common::last_lines(&logs, 30)
    );
    let row: (String, i32) = sqlx::query_as(&format!(
        "SELECT status, attempts FROM {}.outbox",
        db.schema()
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        ("pending".to_string(), 0),
        "the event stays pending, unattempted"
    );
    db.drop_schema().await;
}

/// Counts the messages handed to the backend it wraps.
struct Counting {
    inner: Arc<dyn outbox_relay::publisher::Publisher>,
    handed: Arc<std::sync::atomic::AtomicU64>,
}

impl outbox_relay::publisher::Publisher for Counting {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn publish(
        &self,
        burst: Vec<outbox_relay::publisher::Outgoing>,
    ) -> futures::future::BoxFuture<'_, ()> {
        self.handed.fetch_add(burst.len() as u64, Ordering::Relaxed);
        self.inner.publish(burst)
    }
    fn health(&self) -> futures::future::BoxFuture<'_, outbox_relay::publisher::Health> {
        self.inner.health()
    }
    fn close(&self, timeout: Duration) -> futures::future::BoxFuture<'_, ()> {
        self.inner.close(timeout)
    }
    fn keeps_order(&self) -> bool {
        self.inner.keeps_order()
    }
}

/// Two backends, one of them down for far longer than the retry budget: the other's events
/// flow on meanwhile; the one that is down is asked once per outage delay (a probe), not once
/// per waiting event; nothing fails; and once it is back its events are published in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_down_holds_back_only_its_own_events() {
    use common::kafka::{self as k, GroupReader};
    use outbox_relay::config::Dur;
    use outbox_relay::publisher::kafka::KafkaPublisher;
    let _watchdog = watchdog(
        "one_backend_down_holds_back_only_its_own_events",
        Duration::from_secs(300),
    );
    let mut server = PrivateNats::start();
    let (prefix, stream) = n::unique();
    let js = n::create_stream(&server.url(), &stream, &prefix).await;
    let kafka_topic = k::unique_topic();
    k::create_topic(&k::brokers(), &kafka_topic, 3).await;
    let reader = GroupReader::start(&k::brokers(), &kafka_topic);
    let db = TestDb::new().await;
    let mut cfg = db.config();
    cfg.relay.publish_timeout = Dur::secs(2);
    cfg.relay.backoff_initial = Dur::ms(20);
    cfg.relay.backoff_max = Dur::ms(200);
    cfg.relay.max_attempts = 3;
    let handed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let nats = Counting {
        inner: Arc::new(
            outbox_relay::publisher::nats::NatsPublisher::connect(&n::config(&server.url()))
                .await
                .unwrap(),
        ),
        handed: handed.clone(),
    };
    let kafka = Arc::new(
        KafkaPublisher::new(&k::config(&k::brokers()), cfg.relay.publish_timeout).unwrap(),
    );
    let routes = vec![
        common::route(&format!("{prefix}.*"), "nats"),
        common::route("*", "kafka"),
    ];
    let relay = db
        .relay_with(
            &cfg,
            vec![("nats", Arc::new(nats)), ("kafka", kafka)],
            &routes,
        )
        .await;
    let stats = relay.stats();
    let (h, stop) = common::spawn(relay);
    let retried = || stats.retried.load(Ordering::Relaxed);
    let nats_topic = format!("{prefix}.orders");
    // Aggregates of their own per backend: an aggregate's events keep their order across
    // topics, so a Kafka event of an aggregate waiting on NATS would rightly wait too.
    let on = |topic: &str, n: usize, from: usize| -> Vec<outbox_relay::store::NewEvent> {
        (0..n)
            .map(|i| common::numbered_on(topic, &format!("{topic}-{}", i % 10), from + i / 10))
            .collect()
    };
    let first = on(&nats_topic, 50, 0);
    db.enqueue(&first).await;
    wait_for(DEADLINE, "the first NATS events through", || async {
        db.total().await == 0
    })
    .await;

    server.stop_server();
    let waiting = on(&nats_topic, 50, 5);
    db.enqueue(&waiting).await;
    // The down backend's head events come back again and again; wait for a stretch of that.
    let before = retried();
    wait_for(DEADLINE, "the NATS events rescheduled a while", || async {
        retried() > before + 10 * 3 * 4
    })
    .await;
    // Kafka's events flow meanwhile, at the relay's pace (no claim spacing).
    let flowing = on(&kafka_topic, 2_000, 0);
    let asked_before = handed.load(Ordering::Relaxed);
    let retried_before = retried();
    for chunk in flowing.chunks(500) {
        db.enqueue(chunk).await;
    }
    let kafka_rows = format!("topic = '{kafka_topic}'");
    wait_for(
        DEADLINE,
        "every Kafka event published while NATS is down",
        || async { db.count(&kafka_rows).await == 0 },
    )
    .await;
    wait_for(DEADLINE, "more NATS reschedules", || async {
        retried() > retried_before + 100
    })
    .await;
    let asked = handed.load(Ordering::Relaxed) - asked_before;
    let rescheduled = retried() - retried_before;
    assert!(
        asked * 5 < rescheduled,
        "the down backend was asked {asked} times for {rescheduled} reschedules: probes only"
    );
    assert_eq!(
        db.count("status = 'failed'").await,
        0,
        "an outage failed events"
    );
    assert_eq!(db.count("status = 'pending'").await, 50, "NATS events wait");
    wait_for(
        DEADLINE,
        "the consumer group to have every Kafka event",
        || async { reader.has_all(&flowing) },
    )
    .await;

    server.start_server();
    wait_for(
        DEADLINE,
        "every NATS event published once it is back",
        || async { db.total().await == 0 },
    )
    .await;
    stop.cancel();
    h.await.unwrap();
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    let client = async_nats::connect(server.url()).await.unwrap();
    let got = n::read_stream(&async_nats::jetstream::new(client), &stream).await;
    conformance::assert_every_event_arrived(&got, first.iter().chain(&waiting));
    conformance::assert_in_order(&got);
    conformance::assert_first_deliveries_in_order(&reader.received());
    drop(js);
    db.drop_schema().await;
}
