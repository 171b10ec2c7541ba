//! OpenTelemetry: with an OTLP endpoint configured, the relay exports a span per claim and per
//! published event to the collector (here a minimal OTLP/HTTP receiver of the test's own that
//! decodes the protobuf requests), parents event spans on the row's traceparent, and passes its
//! span on in the message's traceparent header, read back from real JetStream.

mod common;

use common::nats::{self as n, JetStream};
use common::{numbered_on, route, spawn, wait_for, TestDb};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use outbox_relay::config::TracingConfig;
use outbox_relay::internals::Tracer;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const DEADLINE: Duration = Duration::from_secs(60);

/// Receives OTLP/HTTP trace exports on a free port and keeps every span.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let mut sock = BufReader::new(sock);
                    // One request after another on a kept-alive connection.
                    loop {
                        let mut len = 0usize;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if sock.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some((k, v)) = line.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0; len];
                        if sock.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let req = ExportTraceServiceRequest::decode(body.as_slice())
                            .expect("an OTLP protobuf trace export");
                        for rs in req.resource_spans {
                            for ss in rs.scope_spans {
                                sink.lock().unwrap().extend(ss.spans);
                            }
                        }
                        let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if sock.get_mut().write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Collector { url, spans }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const ROW_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const ROW_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_rows_traceparent_reaches_the_message_with_the_same_trace_id_and_the_relays_span() {
    let collector = Collector::start().await;
    let b = JetStream::new().await;
    let db = TestDb::new().await;
    let topic = format!("{}.traced", b.prefix);
    let mut with_parent = numbered_on(&topic, "a", 0);
    with_parent.traceparent = Some(format!("00-{ROW_TRACE}-{ROW_SPAN}-01"));
    let without = numbered_on(&topic, "b", 0);
    db.enqueue(&[with_parent.clone(), without.clone()]).await;

    let tracer = Tracer::from_config(&TracingConfig {
        otlp_endpoint: collector.url.clone(),
        ..TracingConfig::default()
    })
    .unwrap();
    assert!(tracer.is_on());
    let relay = db
        .relay_with(
            &db.config(),
            vec![("bus", b.publisher.clone())],
            &[route("*", "bus")],
        )
        .await
        .with_tracer(tracer);
    let (h, stop) = spawn(relay);
    wait_for(DEADLINE, "both events published", || async {
        db.total().await == 0
    })
    .await;
    // Stopping flushes the spans to the collector.
    stop.cancel();
    h.await.unwrap();

    let got = n::read_stream(&b.js, &b.stream).await;
    assert_eq!(got.len(), 2);
    let header = |event_id: uuid::Uuid| {
        let r = got
            .iter()
            .find(|r| r.headers["X-Event-ID"] == event_id.to_string())
            .expect("the message");
        r.headers["traceparent"].clone()
    };
    let parented = header(with_parent.event_id);
    let parts: Vec<&str> = parented.split('-').collect();
    assert_eq!(parts.len(), 4, "{parented}");
    assert_eq!(parts[1], ROW_TRACE, "same trace id: {parented}");
    assert_ne!(
        parts[2], ROW_SPAN,
        "the relay's span, not the producer's: {parented}"
    );
    assert_eq!(parts[3], "01", "sampled: {parented}");
    let started = header(without.event_id);
    assert_eq!(
        started.len(),
        55,
        "a traceparent for a row without one: {started}"
    );

    wait_for(DEADLINE, "the spans at the collector", || async {
        collector.spans().len() >= 3
    })
    .await;
    let spans = collector.spans();
    let publish: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == format!("{topic} publish"))
        .collect();
    assert_eq!(publish.len(), 2, "{spans:?}");
    let claim = spans
        .iter()
        .find(|s| s.name == "outbox claim")
        .expect("a claim span");
    let p = publish
        .iter()
        .find(|s| hex(&s.trace_id) == ROW_TRACE)
        .expect("a publish span in the producer's trace");
    assert_eq!(
        hex(&p.parent_span_id),
        ROW_SPAN,
        "parented on the row's span"
    );
    assert_eq!(hex(&p.span_id), parts[2], "the header carries this span");
    assert_eq!(p.kind, SpanKind::Producer as i32);
    assert!(
        p.links.iter().any(|l| l.span_id == claim.span_id),
        "linked to its claim"
    );
    let q = publish
        .iter()
        .find(|s| hex(&s.trace_id) != ROW_TRACE)
        .expect("the other publish span");
    assert_eq!(q.parent_span_id, claim.span_id, "a child of its claim");
    assert_eq!(hex(&q.trace_id), started.split('-').nth(1).unwrap());
    b.delete().await;
    db.drop_schema().await;
}
