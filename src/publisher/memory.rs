//! In-process backend: keeps every message in memory for tests and the demo.
//!
//! Behaviour is scriptable ([`MemoryPublisher::with_script`]): acknowledge at once, after a
//! delay, or fail with a chosen error, per event and attempt. Several publishers (several
//! relays) can share one [`MemoryLog`], whose single sequence orders every hand-off and every
//! result, so tests can check ordering across relays.

use super::{Health, Outgoing, PublishError, Publisher};
use crate::envelope::{BodyFormat, Event};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;

/// What the scripted backend does with one message.
#[derive(Debug, Clone)]
pub enum Verdict {
    Ack,
    AckAfter(Duration),
    Fail(PublishError),
    FailAfter(Duration, PublishError),
}

/// Decides the verdict from the event and how many times this log has seen its event id before.
pub type Script = Arc<dyn Fn(&Event, u32) -> Verdict + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    Handed,
    Acked,
    Failed(String),
}

/// One entry in the shared log.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub relay: String,
    pub kind: RecordKind,
    pub event: Arc<Event>,
    pub body: Vec<u8>,
    pub format: BodyFormat,
}

#[derive(Default)]
struct LogInner {
    seq: u64,
    records: Vec<Record>,
    seen: HashMap<Uuid, u32>,
}

/// A log shared by any number of memory publishers.
#[derive(Clone, Default)]
pub struct MemoryLog {
    inner: Arc<Mutex<LogInner>>,
    changed: Arc<Notify>,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, relay: &str, kind: RecordKind, o: &Outgoing) -> u32 {
        let mut g = self.inner.lock().unwrap();
        g.seq += 1;
        let seq = g.seq;
        let seen = if kind == RecordKind::Handed {
            let n = g.seen.entry(o.event.event_id).or_insert(0);
            *n += 1;
            *n - 1
        } else {
            0
        };
        g.records.push(Record {
            seq,
            relay: relay.to_string(),
            kind,
            event: o.event.clone(),
            body: o.body(),
            format: o.format,
        });
        drop(g);
        self.changed.notify_waiters();
        seen
    }

    /// Every record so far, in order.
    pub fn records(&self) -> Vec<Record> {
        self.inner.lock().unwrap().records.clone()
    }

    /// Events acknowledged as published, in acknowledgement order (with any duplicates).
    pub fn acked(&self) -> Vec<Arc<Event>> {
        self.inner
            .lock()
            .unwrap()
            .records
            .iter()
            .filter(|r| r.kind == RecordKind::Acked)
            .map(|r| r.event.clone())
            .collect()
    }

    /// How many hand-offs were recorded.
    pub fn handed_count(&self) -> usize {
        let g = self.inner.lock().unwrap();
        g.records
            .iter()
            .filter(|r| r.kind == RecordKind::Handed)
            .count()
    }

    /// Waits until `cond` holds on the records, or the deadline passes; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&[Record]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if cond(&self.inner.lock().unwrap().records) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return cond(&self.inner.lock().unwrap().records);
            }
        }
    }
}

/// The in-memory backend.
#[derive(Clone)]
pub struct MemoryPublisher {
    name: String,
    log: MemoryLog,
    script: Option<Script>,
    /// Keep records; off for benchmarks, where only the count matters.
    record: bool,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for MemoryPublisher {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryPublisher {
    /// Acknowledges every message at once, into a log of its own.
    pub fn new() -> Self {
        MemoryPublisher {
            name: "memory".into(),
            log: MemoryLog::new(),
            script: None,
            record: true,
            count: Default::default(),
        }
    }

    /// Acknowledges at once and only counts (for benchmarks): no records, no copies.
    pub fn counting() -> Self {
        MemoryPublisher {
            record: false,
            ..Self::new()
        }
    }

    /// Messages acknowledged so far.
    pub fn acked_count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records into a shared log under the given relay name.
    pub fn shared(log: MemoryLog, name: impl Into<String>) -> Self {
        MemoryPublisher {
            name: name.into(),
            log,
            script: None,
            record: true,
            count: Default::default(),
        }
    }

    pub fn with_script(mut self, script: Script) -> Self {
        self.script = Some(script);
        self
    }

    pub fn log(&self) -> &MemoryLog {
        &self.log
    }

    fn settle(&self, o: Outgoing, result: Result<(), PublishError>) {
        if result.is_ok() {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if !self.record {
            o.ticket.resolve(result);
            return;
        }
        match &result {
            Ok(()) => self.log.push(&self.name, RecordKind::Acked, &o),
            Err(e) => self
                .log
                .push(&self.name, RecordKind::Failed(e.reason.clone()), &o),
        };
        o.ticket.resolve(result);
    }
}

impl Publisher for MemoryPublisher {
    fn kind(&self) -> &'static str {
        "memory"
    }

    /// Messages are recorded (or fail by script) one by one in the order taken.
    fn keeps_order(&self) -> bool {
        true
    }

    fn publish(&self, burst: Vec<Outgoing>) -> BoxFuture<'_, ()> {
        for o in burst {
            // A row the route's format cannot carry fails as it would on a broker (only
            // CloudEvents has such rows; raw and envelope skip the check).
            if let BodyFormat::CloudEvents(_) = o.format {
                if let Err(e) = o.event.validate_format(o.format) {
                    self.settle(o, Err(PublishError::permanent(e.to_string())));
                    continue;
                }
            }
            if !self.record && self.script.is_none() {
                self.settle(o, Ok(()));
                continue;
            }
            let seen = self.log.push(&self.name, RecordKind::Handed, &o);
            let verdict = match &self.script {
                Some(s) => s(&o.event, seen),
                None => Verdict::Ack,
            };
            match verdict {
                Verdict::Ack => self.settle(o, Ok(())),
                Verdict::Fail(e) => self.settle(o, Err(e)),
                Verdict::AckAfter(d) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        me.settle(o, Ok(()));
                    });
                }
                Verdict::FailAfter(d, e) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        me.settle(o, Err(e));
                    });
                }
            }
        }
        futures::future::ready(()).boxed()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        futures::future::ready(Health::Up).boxed()
    }

    fn close(&self, _timeout: Duration) -> BoxFuture<'_, ()> {
        futures::future::ready(()).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{sample_event, CeSource, CloudEventsFormat, CloudEventsMode};
    use crate::publisher::AckTicket;

    #[tokio::test]
    async fn a_row_its_cloudevents_route_cannot_carry_fails_as_on_a_broker() {
        let p = MemoryPublisher::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let format = BodyFormat::CloudEvents(CloudEventsFormat {
            mode: CloudEventsMode::Binary,
            source: CeSource::new("/orders"),
        });
        let mut bad = sample_event(1, "a");
        bad.headers = vec![("ce_id".into(), "spoofed".into())];
        let good = sample_event(2, "b");
        let burst = [bad, good]
            .into_iter()
            .map(|e| {
                let e = Arc::new(e);
                Outgoing {
                    ticket: AckTicket::new(e.id, 1, tx.clone()),
                    event: e,
                    format,
                }
            })
            .collect();
        p.publish(burst).await;
        let bad = rx.recv().await.unwrap();
        let err = bad.outcome.unwrap_err();
        assert!(
            !err.is_retryable() && err.reason.contains("ce_id"),
            "{err:?}"
        );
        assert!(rx.recv().await.unwrap().outcome.is_ok());
        assert_eq!(p.log().acked().len(), 1);
    }
}
