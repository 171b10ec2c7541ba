//! Writes one JSON line per event to standard output: the demo backend, and the one the
//! process-level tests read (crash and shutdown tests run the relay as a child process).
//!
//! A message is acknowledged only after its line was written and flushed, so a line on stdout
//! means the event was delivered before the relay marked it.

use super::{Health, Outgoing, PublishError, Publisher};
use crate::envelope::{InvalidEvent, Wire};
use base64::Engine as _;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Mutex};

enum Cmd {
    /// A message and its rendered line.
    Write(Outgoing, Vec<u8>),
    Flush(oneshot::Sender<()>),
}

/// The stdout backend. Writing happens on a task of its own; `publish` waits for room in its
/// queue, which is the backpressure when the reader of stdout is slow.
pub struct StdoutPublisher {
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
}

impl StdoutPublisher {
    pub fn new() -> Self {
        Self::to_writer(tokio::io::stdout())
    }

    /// Writes to any sink instead of stdout (for tests).
    pub fn to_writer<W: AsyncWrite + Unpin + Send + 'static>(out: W) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer(out, rx));
        StdoutPublisher {
            tx: Mutex::new(Some(tx)),
        }
    }
}

impl Default for StdoutPublisher {
    fn default() -> Self {
        Self::new()
    }
}

/// One event as a JSON line: metadata, headers and the body. A JSON body is embedded as JSON;
/// any other body as base64. An event the route's format cannot carry gets a line saying why
/// (the backend itself fails such a row before rendering it; see [`try_render_line`]).
pub fn render_line(o: &Outgoing) -> Vec<u8> {
    try_render_line(o).unwrap_or_else(|e| {
        let mut line = serde_json::to_vec(&json!({
            "event_id": o.event.event_id,
            "error": format!("cannot render: {e}"),
        }))
        .unwrap_or_default();
        line.push(b'\n');
        line
    })
}

/// As [`render_line`], or why the route's format cannot carry the event (see
/// [`crate::envelope::Event::message`]). CloudEvents headers are named as on Kafka (`ce_*`,
/// values as they are): JSON carries any string.
pub fn try_render_line(o: &Outgoing) -> Result<Vec<u8>, InvalidEvent> {
    let e = &o.event;
    let (wire, body) = e.message(o.format, Wire::Kafka)?;
    let headers: serde_json::Map<String, serde_json::Value> = wire
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.into_owned())))
        .collect();
    let mut line = json!({
        "topic": e.topic,
        "key": e.aggregate_id,
        "event_id": e.event_id,
        "format": o.format.name(),
        "headers": headers,
    });
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => line["body"] = v,
        Err(_) => {
            line["body_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&body)
                .into()
        }
    }
    // A Value of strings and objects always serialises; should it ever not, the line says so
    // instead of taking the relay down.
    let mut out = serde_json::to_vec(&line).unwrap_or_else(|e| {
        format!(
            r#"{{"event_id":"{}","error":"cannot render: {e}"}}"#,
            e_id(o)
        )
        .into_bytes()
    });
    out.push(b'\n');
    Ok(out)
}

fn e_id(o: &Outgoing) -> String {
    o.event.event_id.to_string()
}

async fn writer<W: AsyncWrite + Unpin>(mut out: W, mut rx: mpsc::Receiver<Cmd>) {
    let mut pending: Vec<Outgoing> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        let mut flushes = Vec::new();
        let mut next = Some(first);
        // Take whatever is queued, then write and flush it in one go.
        while let Some(cmd) = next {
            match cmd {
                Cmd::Write(o, line) => {
                    buf.extend_from_slice(&line);
                    pending.push(o);
                }
                Cmd::Flush(done) => flushes.push(done),
            }
            if pending.len() >= 1024 {
                break;
            }
            next = rx.try_recv().ok();
        }
        let result = async {
            out.write_all(&buf).await?;
            out.flush().await
        }
        .await;
        buf.clear();
        for o in pending.drain(..) {
            match &result {
                Ok(()) => o.ticket.ack(),
                Err(e) => o
                    .ticket
                    .nack(PublishError::retryable(format!("writing to stdout: {e}"))),
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

impl Publisher for StdoutPublisher {
    fn kind(&self) -> &'static str {
        "stdout"
    }

    /// Lines are written in the order taken.
    fn keeps_order(&self) -> bool {
        true
    }

    fn publish(&self, burst: Vec<Outgoing>) -> BoxFuture<'_, ()> {
        async move {
            let tx = self.tx.lock().await.clone();
            for o in burst {
                // Rendered here so that a row the format cannot carry fails at once, as on
                // the brokers.
                let line = match try_render_line(&o) {
                    Ok(line) => line,
                    Err(e) => {
                        o.ticket.nack(PublishError::permanent(e.to_string()));
                        continue;
                    }
                };
                match &tx {
                    Some(tx) => {
                        if let Err(mpsc::error::SendError(Cmd::Write(o, _))) =
                            tx.send(Cmd::Write(o, line)).await
                        {
                            o.ticket
                                .nack(PublishError::retryable("stdout backend is closed"));
                        }
                    }
                    None => o
                        .ticket
                        .nack(PublishError::retryable("stdout backend is closed")),
                }
            }
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        futures::future::ready(Health::Up).boxed()
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        async move {
            let tx = self.tx.lock().await.take();
            if let Some(tx) = tx {
                let (done, wait) = oneshot::channel();
                if tx.send(Cmd::Flush(done)).await.is_ok() {
                    let _ = tokio::time::timeout(timeout, wait).await;
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{sample_event, BodyFormat};
    use crate::publisher::AckTicket;
    use std::sync::Arc;

    #[tokio::test]
    async fn writes_one_json_line_per_event_then_acks() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let p = StdoutPublisher::to_writer(client);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let e = Arc::new(sample_event(1, "order-9"));
        let ticket = AckTicket::new(1, 1, tx);
        p.publish(vec![Outgoing {
            event: e.clone(),
            format: BodyFormat::Raw,
            ticket,
        }])
        .await;
        let ack = rx.recv().await.unwrap();
        assert!(ack.outcome.is_ok());
        p.close(Duration::from_secs(1)).await;
        let mut text = String::new();
        use tokio::io::AsyncReadExt;
        let mut chunk = vec![0u8; 4096];
        let n = server.read(&mut chunk).await.unwrap();
        text.push_str(std::str::from_utf8(&chunk[..n]).unwrap());
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["key"], "order-9");
        assert_eq!(v["body"]["n"], 1);
        assert_eq!(v["headers"]["X-Event-ID"], e.event_id.to_string());
    }

    #[tokio::test]
    async fn cloudevents_lines_carry_the_event_and_rows_it_cannot_carry_fail() {
        use crate::envelope::{CeSource, CloudEventsFormat, CloudEventsMode};
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let p = StdoutPublisher::to_writer(client);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let format = BodyFormat::CloudEvents(CloudEventsFormat {
            mode: CloudEventsMode::Structured,
            source: CeSource::new("urn:example:orders"),
        });
        let good = Arc::new(sample_event(1, "order-9"));
        let bad = Arc::new(sample_event(2, "a\tb"));
        let outgoing = |e: &Arc<crate::envelope::Event>| Outgoing {
            event: e.clone(),
            format,
            ticket: AckTicket::new(e.id, 1, tx.clone()),
        };
        p.publish(vec![outgoing(&bad), outgoing(&good)]).await;
        let first = rx.recv().await.unwrap();
        assert_eq!(first.row_id, 2);
        let err = first.outcome.unwrap_err();
        assert!(
            !err.is_retryable() && err.reason.contains("CloudEvents attribute subject"),
            "{err:?}"
        );
        let second = rx.recv().await.unwrap();
        assert!(second.outcome.is_ok());
        p.close(Duration::from_secs(1)).await;
        use tokio::io::AsyncReadExt;
        let mut chunk = vec![0u8; 8192];
        let n = server.read(&mut chunk).await.unwrap();
        let text = std::str::from_utf8(&chunk[..n]).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["format"], "cloudevents");
        assert_eq!(v["body"]["id"], good.event_id.to_string());
        assert_eq!(v["body"]["source"], "urn:example:orders");
        assert_eq!(v["body"]["data"]["n"], 1);
        assert_eq!(
            v["headers"]["content-type"],
            "application/cloudevents+json; charset=UTF-8"
        );
    }
}
