//! The relay as a process: SIGKILL at random moments, SIGTERM and SIGINT, and Postgres
//! restarted underneath a running relay. The child processes use the stdout backend, whose
//! lines are what "handed to the backend" means here (a line is written and flushed before the
//! event counts as published).

mod common;

use common::{interleaved, relay_bin, spawn, wait_for, PrivatePostgres, TestDb};
use outbox_relay::publisher::memory::MemoryPublisher;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A relay child process and the event ids it printed.
struct Child_ {
    child: Child,
    lines: Arc<Mutex<Vec<(String, String, i64)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn start_relay(db: &TestDb, extra: &[&str]) -> Child_ {
    // An empty working directory, so no relay.toml but the test's own settings apply.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(relay_bin())
        .current_dir(dir.path())
        .args(["--database-url", &db.url, "--schema", db.schema(), "run"])
        .args(extra)
        .env("RELAY__RELAY__POLL_INTERVAL", "100ms")
        .env("RELAY__RELAY__BACKOFF_INITIAL", "20ms")
        .env("RELAY__RELAY__BATCH_SIZE", "100")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the relay binary");
    let out = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            sink.lock().unwrap().push((
                v["event_id"].as_str().unwrap().to_string(),
                v["key"].as_str().unwrap().to_string(),
                v["body"]["seq"].as_i64().unwrap_or(-1),
            ));
        }
    });
    Child_ {
        child,
        lines,
        reader: Some(reader),
        _dir: dir,
    }
}

impl Child_ {
    fn printed(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the exit (deadline), then for the reader to see the end of stdout.
    fn finish(
        mut self,
        timeout: Duration,
    ) -> (std::process::ExitStatus, Vec<(String, String, i64)>) {
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the relay did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.reader.take().unwrap().join().unwrap();
        let lines = self.lines.lock().unwrap().clone();
        (status, lines)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_keeps_order() {
    let db = Arc::new(TestDb::new().await);
    // A backlog, so kills land mid-stream, and a producer that keeps committing while the
    // relay is killed and restarted.
    let backlog = interleaved(25, 80, 0);
    db.enqueue(&backlog).await;
    let producer = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut all = backlog;
            for round in 0..40 {
                let evs = interleaved(25, 2, 80 + round * 2);
                db.enqueue(&evs).await;
                all.extend(evs);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            all
        })
    };
    let mut printed = Vec::new();
    for _ in 0..8 {
        let relay = start_relay(&db, &["--log-format", "json"]);
        // Once it is publishing, at a random moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while relay.printed() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let after = rand::thread_rng().gen_range(0..100);
        tokio::time::sleep(Duration::from_millis(after)).await;
        relay.signal("KILL");
        let (status, lines) = relay.finish(Duration::from_secs(30));
        assert!(!status.success(), "killed");
        printed.extend(lines);
    }
    let sent = producer.await.unwrap();
    let last = start_relay(&db, &["--drain"]);
    let (status, lines) = last.finish(Duration::from_secs(120));
    assert!(status.success(), "the draining run exits 0");
    printed.extend(lines);

    let seen: HashSet<&str> = printed.iter().map(|(id, _, _)| id.as_str()).collect();
    let missing: Vec<_> = sent
        .iter()
        .filter(|e| !seen.contains(e.event_id.to_string().as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events never reached the backend",
        missing.len()
    );
    assert_eq!(db.total().await, 0, "every row marked");
    // Duplicates are only re-sends (same id); first sightings keep each aggregate's order.
    let mut first: HashSet<&str> = HashSet::new();
    let mut next: HashMap<&str, i64> = HashMap::new();
    for (id, key, seq) in &printed {
        if first.insert(id.as_str()) {
            let expect = next.entry(key.as_str()).or_insert(0);
            assert_eq!(
                *seq, *expect,
                "aggregate {key}: first sighting of #{seq}, expected #{expect}"
            );
            *expect += 1;
        }
    }
    eprintln!(
        "sigkill: {} events, {} lines printed ({} re-sends)",
        sent.len(),
        printed.len(),
        printed.len() - sent.len()
    );
    Arc::try_unwrap(db).ok().unwrap().drop_schema().await;
}

async fn stop_with(sig: &str) {
    let db = TestDb::new().await;
    let sent = interleaved(100, 100, 0);
    for chunk in sent.chunks(2000) {
        db.enqueue(chunk).await;
    }
    let relay = start_relay(&db, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while relay.printed() < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "relay printed nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.signal(sig);
    let (status, lines) = relay.finish(Duration::from_secs(30));
    assert!(status.success(), "exit 0 after SIG{sig}, got {status}");
    // Everything it printed it also marked: no printed event is still in the outbox.
    let printed: Vec<uuid::Uuid> = lines.iter().map(|(id, _, _)| id.parse().unwrap()).collect();
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE event_id = ANY($1)",
        db.names.qualified()
    ))
    .bind(&printed)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "printed events left unmarked after SIG{sig}");
    let distinct: HashSet<_> = printed.iter().collect();
    assert_eq!(distinct.len(), printed.len(), "no event printed twice");
    assert!(
        printed.len() < sent.len(),
        "stopped before the end (test too slow to mean anything)"
    );
    assert_eq!(
        db.total().await as usize + printed.len(),
        sent.len(),
        "nothing lost"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn sigterm_stops_claiming_records_results_in_flight_and_exits_zero() {
    stop_with("TERM").await;
}

#[tokio::test]
async fn sigint_stops_claiming_records_results_in_flight_and_exits_zero() {
    stop_with("INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_a_running_relay_is_reconnected_and_caught_up() {
    let pg = PrivatePostgres::start();
    let db = TestDb::on(&pg.url()).await;
    let mem = MemoryPublisher::new();
    let mut cfg = db.config();
    cfg.database.connect_timeout = outbox_relay::config::Dur::secs(2);
    let relay = db.relay(&cfg, Arc::new(mem.clone())).await;
    let (h, stop) = spawn(relay);
    let first = interleaved(10, 20, 0);
    db.enqueue(&first).await;
    wait_for(Duration::from_secs(60), "first half published", || async {
        mem.log().acked().len() >= first.len()
    })
    .await;

    pg.stop_server();
    // The outage itself: the relay's claims fail meanwhile and back off.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.start_server();

    let second = interleaved(10, 20, 20);
    let mut attempts = 0;
    loop {
        // The test's own pool reconnects too; its first tries may meet dead connections.
        let r = async {
            let mut tx = db.pool.begin().await?;
            db.outbox
                .enqueue(&mut tx, &second)
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            tx.commit().await
        }
        .await;
        match r {
            Ok(()) => break,
            Err(e) => {
                attempts += 1;
                assert!(attempts < 50, "cannot write after the restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    wait_for(
        Duration::from_secs(60),
        "second half published without a relay restart",
        || async { db.total().await == 0 },
    )
    .await;
    stop.cancel();
    h.await.unwrap();
    let ids: HashSet<_> = mem.log().acked().iter().map(|e| e.event_id).collect();
    assert!(first
        .iter()
        .chain(second.iter())
        .all(|e| ids.contains(&e.event_id)));
}
