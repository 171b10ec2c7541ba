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
    let t0 = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the relay did not exit within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = t0.elapsed();
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
