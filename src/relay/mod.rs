//! The pipeline: claim -> dispatch -> publish -> ACK channel -> mark.
//!
//! One task runs the loop. It keeps up to `relay.pipeline_depth` claims open at once, each a
//! transaction holding its rows locked (see [`crate::store`]). Claimed rows go through the
//! `dispatch::Dispatcher`, which hands them to publishers (at most one per aggregate in flight)
//! and turns the results arriving on the ACK channel into verdicts. When every row of a claim
//! has its verdict, the claim is finished (all verdicts written in one transaction) on a task of
//! its own while the loop goes on.
//!
//! The loop claims again at once while claims come back full; otherwise it waits for a
//! notification (LISTEN/NOTIFY, see `wake.rs`) or the poll interval.

mod accounting;
pub(crate) mod dispatch;
mod housekeeping;
pub(crate) mod ownership;
mod pipeline;
pub(crate) mod retry;
pub(crate) mod wake;

use crate::config::{MonitorConfig, OrderingMode, RelayConfig, RouteConfig};
use crate::metrics::{BackendLabels, Metrics};
use crate::otel::Tracer;
use crate::publisher::{AckSender, AckTicket, Outgoing, Publisher};
use crate::routing::Router;
use crate::snapshot::Observed;
pub use crate::snapshot::Stats;
use crate::store::{ClaimTx, Store, StoreError};
use dispatch::{Completed, Dispatcher, Handoff, Tally, TopicTally};
use futures::future::BoxFuture;
use futures::FutureExt;
use housekeeping::Housekeeping;

use opentelemetry_sdk::trace::Span;
use prometheus_client::metrics::histogram::Histogram;
use retry::Backoff;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Why the relay could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("backend {name}: {message}")]
    Backend { name: String, message: String },
    #[error("{0}")]
    Tracing(String),
}

/// A named backend.
pub struct Backend {
    pub name: String,
    pub publisher: Arc<dyn Publisher>,
}

pub struct Relay {
    store: Arc<Store>,
    backends: Vec<Backend>,
    router: Arc<Router>,
    cfg: RelayConfig,
    stats: Arc<Stats>,
    metrics: Arc<Metrics>,
    observed: Arc<Observed>,
    monitor: MonitorConfig,
    instance: String,
    /// Per backend (by index): publish and end-to-end latency histograms, resolved once so an
    /// acknowledgement costs no label lookup.
    latency: Vec<(Histogram, Histogram)>,
    tracer: Tracer,
    /// Open spans while tracing is on (never touched when off): per claim, and per hand-off
    /// (row, token).
    spans: Mutex<SpanBook>,
}

#[derive(Default)]
struct SpanBook {
    claims: HashMap<u64, Span>,
    events: HashMap<(i64, u64), Span>,
}

/// What a claim's finish comes back with: its number, the commit's result, and its tallies.
type FinishedClaim = (u64, Result<(), StoreError>, Tally, Vec<TopicTally>);

/// A claim opened and not yet finished.
type Finishing = BoxFuture<'static, FinishedClaim>;

impl Relay {
    pub fn new(
        store: Store,
        backends: Vec<Backend>,
        routes: &[RouteConfig],
        cfg: RelayConfig,
    ) -> Relay {
        let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
        let metrics = Arc::new(Metrics::new());
        let latency = names
            .iter()
            .map(|n| {
                let l = BackendLabels { backend: n.clone() };
                (
                    metrics.publish_latency.get_or_create(&l).clone(),
                    metrics.end_to_end_latency.get_or_create(&l).clone(),
                )
            })
            .collect();
        let keep = !cfg.published_retention.0.is_zero();
        Relay {
            store: Arc::new(
                store
                    .keeping_published(keep)
                    .bounded_in_bytes(cfg.max_payload_bytes, cfg.batch_max_bytes),
            ),
            router: Arc::new(Router::new(routes, &names)),
            backends,
            cfg,
            stats: Arc::new(Stats::default()),
            metrics,
            observed: Arc::new(Observed::default()),
            monitor: MonitorConfig::default(),
            instance: format!("relay-{}", uuid::Uuid::new_v4().simple()),
            latency,
            tracer: Tracer::off(),
            spans: Mutex::new(SpanBook::default()),
        }
    }

    /// Traces claims and publications through `tracer` (see `otel.rs`).
    pub fn with_tracer(mut self, tracer: Tracer) -> Relay {
        self.tracer = tracer;
        self
    }

    fn book(&self) -> std::sync::MutexGuard<'_, SpanBook> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the monitor's settings and the name this relay's heartbeat row goes by.
    pub fn with_monitor(mut self, monitor: MonitorConfig, instance: String) -> Relay {
        self.monitor = monitor;
        self.instance = instance;
        self
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn observed(&self) -> Arc<Observed> {
        self.observed.clone()
    }

    /// The name of this relay's heartbeat row (`outbox-relay status`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn dispatcher(&self) -> Dispatcher {
        let window = match self.cfg.ordering {
            OrderingMode::Strict => 1,
            OrderingMode::Pipelined => self.cfg.aggregate_window as usize,
        };
        Dispatcher::new(
            self.router.clone(),
            Backoff::new(self.cfg.backoff_initial.0, self.cfg.backoff_max.0),
            self.cfg.max_attempts,
            self.cfg.max_payload_bytes,
        )
        .pipelined(
            window,
            self.backends
                .iter()
                .map(|b| b.publisher.keeps_order())
                .collect(),
        )
    }

    async fn publish(&self, handoffs: Vec<Handoff>, acks: &AckSender) {
        if handoffs.is_empty() {
            return;
        }
        let mut bursts: Vec<Vec<Outgoing>> = (0..self.backends.len()).map(|_| Vec::new()).collect();
        let handed_at = chrono::Utc::now();
        for mut h in handoffs {
            if self.tracer.is_on() {
                let mut book = self.book();
                let kind = self.backends[h.backend].publisher.kind();
                if let Some((span, wire)) =
                    self.tracer
                        .publish_span(&h.event, kind, book.claims.get(&h.batch))
                {
                    book.events.insert((h.event.id, h.token), span);
                    h.event = Arc::new(wire);
                }
            }
            let ticket = AckTicket::handed_at(h.event.id, h.token, acks.clone(), handed_at)
                .with_origin(h.backend, h.event.occurred_at);
            bursts[h.backend].push(Outgoing {
                event: h.event,
                format: h.format,
                ticket,
            });
        }
        for (i, burst) in bursts.into_iter().enumerate() {
            if !burst.is_empty() {
                self.backends[i].publisher.publish(burst).await;
            }
        }
    }

    /// Writes a completed claim on a task of its own, so commits overlap with the loop's work.
    fn finishing(&self, tx: ClaimTx, c: Completed) -> Finishing {
        let store = self.store.clone();
        let blocked_retry = self.cfg.blocked_retry.0;
        let (batch, tally, by_topic) = (c.batch, c.tally, c.by_topic);
        let task = on_task("recording a batch", async move {
            store.finish(tx, &c.marks, blocked_retry).await
        });
        async move { (batch, task.await, tally, by_topic) }.boxed()
    }

    /// One step, for tests and tools: claims one batch, publishes it, waits for every result
    /// (at most `relay.publish_timeout` per hand-off), writes the verdicts and commits.
    pub async fn run_once(&self) -> Result<Tally, RelayError> {
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        let mut d = self.dispatcher();
        let (tx, rows) = self.store.claim(self.cfg.batch_size).await?;
        if rows.is_empty() {
            drop(tx);
            return Ok(Tally::default());
        }
        self.stats
            .claimed
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        let (handoffs, mut completed) = d.add_batch(1, 1, rows);
        self.publish(handoffs, &ack_tx).await;
        let deadline = tokio::time::Instant::now() + self.cfg.publish_timeout.0;
        while completed.is_empty() {
            match tokio::time::timeout_at(deadline, ack_rx.recv()).await {
                Ok(Some(ack)) => {
                    self.observe(&ack);
                    let (h, c) = d.on_result(ack);
                    completed.extend(c);
                    self.publish(h, &ack_tx).await;
                }
                Ok(None) => unreachable!("the loop holds a sender"),
                Err(_) => {
                    let (h, c) = d.expire(Duration::ZERO);
                    completed.extend(c);
                    self.publish(h, &ack_tx).await;
                }
            }
        }
        let c = completed.pop().expect("one batch");
        let tally = c.tally;
        self.store
            .finish(tx, &c.marks, self.cfg.blocked_retry.0)
            .await?;
        self.record(&tally, &c.by_topic);
        Ok(tally)
    }

    /// Runs until `shutdown` is cancelled; then stops claiming, waits up to
    /// `relay.shutdown_timeout` for results of what is in flight, marks them, releases the
    /// rest unchanged and closes the backends.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), RelayError> {
        self.run_inner(shutdown, false).await
    }

    /// As [`Relay::run`], and also stops once a claim finds nothing due while nothing is in
    /// flight (`run --drain`). Events waiting for a retry stay pending.
    pub async fn run_until_drained(&self, shutdown: CancellationToken) -> Result<(), RelayError> {
        self.run_inner(shutdown, true).await
    }

    async fn run_inner(&self, shutdown: CancellationToken, drain: bool) -> Result<(), RelayError> {
        let wake = Arc::new(Notify::new());
        let listener = if self.cfg.listen {
            Some(tokio::spawn(wake::listen(
                self.store.pool().clone(),
                self.store.names().channel(),
                wake.clone(),
                shutdown.child_token(),
            )))
        } else {
            None
        };
        let monitor_stop = CancellationToken::new();
        let monitor = tokio::spawn(
            Housekeeping {
                store: self.store.clone(),
                backends: self
                    .backends
                    .iter()
                    .map(|b| (b.name.clone(), b.publisher.clone()))
                    .collect(),
                stats: self.stats.clone(),
                metrics: self.metrics.clone(),
                observed: self.observed.clone(),
                cfg: self.monitor.clone(),
                relay: self.cfg.clone(),
                heartbeat: housekeeping::heartbeat_row(self.instance.clone()),
            }
            .run(monitor_stop.clone()),
        );
        let ownership = ownership::Ownership::start(
            self.store.clone(),
            self.instance.clone(),
            self.cfg.rebalance_interval.0,
        );
        let pipeline = pipeline::Pipeline::new(self, ownership, wake, shutdown, drain);
        tracing::info!(
            outbox = %self.store.names().qualified(),
            batch_size = self.cfg.batch_size,
            pipeline_depth = self.cfg.pipeline_depth,
            listen = self.cfg.listen,
            backends = %self.backends.iter().map(|b| format!("{}={}", b.name, b.publisher.kind())).collect::<Vec<_>>().join(","),
            "relay started"
        );
        let (ownership, stop_by, summary) = pipeline.run().await;
        if let Some(l) = listener {
            l.abort();
        }
        // Every claim is closed: the partitions go to the other relays at once.
        ownership.leave(Duration::from_secs(5)).await;
        self.stats.owned_partitions.store(0, Ordering::Relaxed);
        for b in &self.backends {
            // Events still unanswered by now were released (they stay pending): flushing them
            // longer only delays the exit.
            let budget = stop_by.map_or(self.cfg.shutdown_timeout.0, |by| {
                by.saturating_duration_since(tokio::time::Instant::now())
                    .max(Duration::from_millis(500))
            });
            b.publisher.close(budget).await;
        }
        self.stats.in_flight.store(0, Ordering::Relaxed);
        monitor_stop.cancel();
        // The monitor removes this relay's heartbeat row on its way out; a database that is
        // gone must not hold up the exit.
        let _ = tokio::time::timeout(Duration::from_secs(5), monitor).await;
        if self.tracer.is_on() {
            *self.book() = SpanBook::default();
            self.tracer.flush(Duration::from_secs(5)).await;
        }
        summary.log_final(&self.stats);
        Ok(())
    }
}

/// Runs store work on a task of its own (so it overlaps with the loop) and reports a task
/// that died as the store error it stands for.
fn on_task<T: Send + 'static>(
    what: &'static str,
    work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> BoxFuture<'static, Result<T, StoreError>> {
    let task = tokio::spawn(work);
    async move {
        task.await
            .unwrap_or_else(|e| Err(StoreError::Task(format!("{what}: {e}"))))
    }
    .boxed()
}
