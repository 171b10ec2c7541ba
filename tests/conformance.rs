//! The conformance suite (tests/common/conformance.rs) against every backend of the core.

mod common;

use common::conformance::{BackendUnderTest, Received};
use outbox_relay::publisher::memory::{MemoryPublisher, RecordKind};
use outbox_relay::publisher::stdout::StdoutPublisher;
use outbox_relay::publisher::Publisher;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncBufReadExt;

struct Memory(MemoryPublisher);

impl BackendUnderTest for Memory {
    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.0.clone())
    }
    fn topic(&self) -> String {
        "conformance.memory".into()
    }
    async fn received(&self) -> Vec<Received> {
        self.0
            .log()
            .records()
            .into_iter()
            .filter(|r| r.kind == RecordKind::Acked)
            .map(|r| Received {
                topic: r.event.topic.clone(),
                key: r.event.aggregate_id.clone(),
                headers: r
                    .event
                    .wire_headers()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.into_owned()))
                    .collect(),
                body: r.body,
            })
            .collect()
    }
}

/// Reads the stdout backend's lines back, as a downstream reader of the stream would.
struct Stdout {
    publisher: Arc<StdoutPublisher>,
    lines: Arc<Mutex<Vec<Received>>>,
}

impl Stdout {
    fn new() -> Self {
        let (client, server) = tokio::io::duplex(1 << 20);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(server).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
                let body = match v.get("body") {
                    Some(b) => serde_json::to_vec(b).unwrap(),
                    None => {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD
                            .decode(v["body_base64"].as_str().unwrap())
                            .unwrap()
                    }
                };
                sink.lock().unwrap().push(Received {
                    topic: v["topic"].as_str().unwrap().into(),
                    key: v["key"].as_str().unwrap().into(),
                    headers: v["headers"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect(),
                    body,
                });
            }
        });
        Stdout {
            publisher: Arc::new(StdoutPublisher::to_writer(client)),
            lines,
        }
    }
}

impl BackendUnderTest for Stdout {
    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }
    fn topic(&self) -> String {
        "conformance.stdout".into()
    }
    async fn received(&self) -> Vec<Received> {
        self.lines.lock().unwrap().clone()
    }
}

crate::conformance_suite!(memory, Memory(MemoryPublisher::new()));

crate::conformance_suite!(stdout, Stdout::new(), pipelined);
