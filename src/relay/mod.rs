//! The pipeline: claim -> dispatch -> publish -> ACK channel -> mark.
//!
//! One task runs the loop. It keeps up to `relay.pipeline_depth` claims open at once, each a
//! transaction holding its rows locked (see [`crate::store`]). Claimed rows go through the
//! [`dispatch::Dispatcher`], which hands them to publishers (at most one per aggregate in flight)
//! and turns the results arriving on the ACK channel into verdicts. When every row of a claim
//! has its verdict, the claim is finished (all verdicts written in one transaction) on a task of
//! its own while the loop goes on.
//!
//! The loop claims again at once while claims come back full; otherwise it waits for a
//! notification (LISTEN/NOTIFY, see [`wake`]) or the poll interval.

pub mod dispatch;
pub mod monitor;
pub mod ownership;
pub mod retry;
pub mod wake;

use crate::config::{
    BackendConfig, Config, MonitorConfig, OrderingMode, Provisioning, RelayConfig, RouteConfig,
};
use crate::metrics::{BackendLabels, Metrics};
use crate::otel::Tracer;
use crate::publisher::kafka::{self, KafkaPublisher};
use crate::publisher::memory::MemoryPublisher;
use crate::publisher::nats::{self, NatsPublisher};
use crate::publisher::pulsar::PulsarPublisher;
use crate::publisher::stdout::StdoutPublisher;
use crate::publisher::ProvisionReport;
use crate::publisher::{AckSender, AckTicket, Outgoing, Publisher};
use crate::routing::Router;
use crate::store::{Claim, ClaimTx, Cursor, Session, Store, StoreError, Walk};
use dispatch::{Completed, Dispatcher, Handoff, Tally, TopicTally};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use monitor::{Monitor, Observed};
use opentelemetry::trace::{Span as _, Status};
use opentelemetry_sdk::trace::Span;
use prometheus_client::metrics::histogram::Histogram;
use retry::Backoff;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// On the way out, a backend counts as unreachable (its events released without waiting out
/// `shutdown_timeout`) only after this long without a success from it.
const UNREACHABLE_QUIET: Duration = Duration::from_secs(2);

/// Waits after a failed claim: 0.2 s, doubling with each failure in a row, at most 5 s.
const CLAIM_RETRY: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

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

/// Running totals, readable while the relay runs.
#[derive(Debug, Default)]
pub struct Stats {
    pub claims: AtomicU64,
    pub claimed: AtomicU64,
    pub published: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub deferred: AtomicU64,
    pub released: AtomicU64,
    pub lost_claims: AtomicU64,
    /// Handed to a backend and not yet answered, now.
    pub in_flight: AtomicU64,
    /// Partitions this relay may claim from, now.
    pub owned_partitions: AtomicU64,
    /// Relays working on the outbox at the last look (this one included).
    pub members: AtomicU64,
    /// Changes of this relay's share of the partitions.
    pub rebalances: AtomicU64,
}

impl Stats {
    fn add(&self, t: &Tally) {
        self.published.fetch_add(t.published, Ordering::Relaxed);
        self.failed.fetch_add(t.failed, Ordering::Relaxed);
        self.retried.fetch_add(t.retried, Ordering::Relaxed);
        self.deferred.fetch_add(t.deferred, Ordering::Relaxed);
        self.released.fetch_add(t.released, Ordering::Relaxed);
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

/// A named backend.
pub struct Backend {
    pub name: String,
    pub publisher: Arc<dyn Publisher>,
}

/// Builds the publisher for each configured backend, provisioning its topics or streams as
/// configured (what changed or differs is logged).
pub async fn build_backends(cfg: &Config) -> Result<Vec<Backend>, RelayError> {
    let mut out = Vec::new();
    for (name, b) in &cfg.backends {
        let (publisher, report) = open_backend(name, b, cfg, None).await?;
        for line in report.created.iter().chain(&report.updated) {
            tracing::info!(backend = %name, "provisioning: {line}");
        }
        for line in &report.drift {
            tracing::warn!(backend = %name, "provisioning: drift {line}");
        }
        out.push(Backend {
            name: name.clone(),
            publisher,
        });
    }
    Ok(out)
}

/// Connects one backend and applies its provisioning (`strategy` overrides the configured one;
/// `check` passes `validate_only`, so it changes nothing).
pub async fn open_backend(
    name: &str,
    b: &BackendConfig,
    cfg: &Config,
    strategy: Option<Provisioning>,
) -> Result<(Arc<dyn Publisher>, ProvisionReport), RelayError> {
    let fail = |message: String| RelayError::Backend {
        name: name.to_string(),
        message,
    };
    Ok(match b {
        BackendConfig::Memory {} => (Arc::new(MemoryPublisher::new()), ProvisionReport::default()),
        BackendConfig::Stdout {} => (Arc::new(StdoutPublisher::new()), ProvisionReport::default()),
        BackendConfig::Kafka(k) => {
            let strategy = strategy.unwrap_or(k.provisioning);
            let report = kafka::provision::provision(k, strategy, cfg.relay.publish_timeout)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let publisher = KafkaPublisher::new(k, cfg.relay.publish_timeout)
                .map_err(|e| fail(e.to_string()))?;
            (Arc::new(publisher), report)
        }
        BackendConfig::Nats(n) => {
            let strategy = strategy.unwrap_or(n.provisioning);
            let publisher = NatsPublisher::connect(n)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let report = nats::provision::provision(publisher.jetstream(), n, strategy)
                .await
                .map_err(|e| fail(e.to_string()))?;
            (Arc::new(publisher), report)
        }
        // Pulsar creates topics on first use (the broker's auto-creation); nothing to provision.
        BackendConfig::Pulsar(p) => (
            Arc::new(PulsarPublisher::connect(p).await),
            ProvisionReport::default(),
        ),
    })
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

/// A claim opened and not yet finished.
type Finishing = BoxFuture<'static, (u64, Result<(), StoreError>, Tally, Vec<TopicTally>)>;

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

    /// Traces claims and publications through `tracer` (see [`crate::otel`]).
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

    /// Connects to Postgres and builds every configured backend.
    pub async fn from_config(cfg: &Config) -> Result<Relay, RelayError> {
        let store = Store::connect(&cfg.database, &session(cfg)).await?;
        let backends = build_backends(cfg).await?;
        let tracer = Tracer::from_config(&cfg.tracing).map_err(RelayError::Tracing)?;
        Ok(Relay::new(store, backends, &cfg.routes, cfg.relay.clone())
            .with_monitor(cfg.monitor.clone(), cfg.instance_id())
            .with_tracer(tracer))
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

    /// Adds a committed batch to the counters.
    fn record(&self, tally: &Tally, by_topic: &[TopicTally]) {
        self.stats.add(tally);
        if tally.published > 0 {
            self.observed.published_now();
        }
        for t in by_topic {
            let backend = t
                .backend
                .and_then(|b| self.backends.get(b))
                .map(|b| b.name.as_str())
                .unwrap_or("none");
            let labels = self.metrics.topic_labels(&t.topic, backend);
            if t.published > 0 {
                self.metrics
                    .published
                    .get_or_create(&labels)
                    .inc_by(t.published);
            }
            if t.failed > 0 {
                self.metrics.failed.get_or_create(&labels).inc_by(t.failed);
            }
            if t.retried > 0 {
                self.metrics
                    .retried
                    .get_or_create(&labels)
                    .inc_by(t.retried);
            }
        }
    }

    /// Shows a new share of the partitions in the stats (heartbeat, `/health`) and metrics.
    fn note_assignment(&self, a: &ownership::Assignment) {
        let s = &self.stats;
        s.owned_partitions
            .store(a.owned() as u64, Ordering::Relaxed);
        s.members.store(a.members as u64, Ordering::Relaxed);
        let before = s.rebalances.swap(a.rebalances, Ordering::Relaxed);
        self.metrics.owned_partitions.set(a.owned() as i64);
        self.metrics.relays.set(a.members as i64);
        self.metrics
            .rebalances
            .inc_by(a.rebalances.saturating_sub(before));
    }

    /// Observes one acknowledgement's latencies.
    fn observe(&self, ack: &crate::publisher::AckResult) {
        if self.tracer.is_on() {
            if let Some(span) = self.book().events.remove(&(ack.row_id, ack.token)) {
                Tracer::end_publish(
                    span,
                    ack.outcome
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| e.reason.as_str()),
                );
            }
        }
        if ack.outcome.is_err() {
            return;
        }
        if let Some((publish, end_to_end)) = self.latency.get(ack.backend) {
            publish.observe(ack.publish_latency().as_secs_f64());
            if let Some(at) = ack.occurred_at {
                let ms = (ack.at - at).num_microseconds().unwrap_or(i64::MAX).max(0);
                end_to_end.observe(ms as f64 / 1e6);
            }
        }
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
        d.finished(1, true, 1);
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
            Monitor {
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
                heartbeat: monitor::heartbeat(self.instance.clone()),
            }
            .run(monitor_stop.clone()),
        );
        let ownership = ownership::Ownership::start(
            self.store.clone(),
            self.instance.clone(),
            self.cfg.rebalance_interval.0,
        );
        let mut assign_rx = ownership.assignment.clone();
        let mut assignment = assign_rx.borrow_and_update().clone();
        // Versions of the assignment each open claim was started with (by claim), so the
        // ownership manager gives a partition up only once no claim can hold its rows.
        let mut claim_versions: HashMap<u64, u64> = HashMap::new();
        let mut claiming_version: Option<u64> = None;
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        let mut d = self.dispatcher();
        let mut txs: HashMap<u64, ClaimTx> = HashMap::new();
        type ClaimResult = Result<Claim, StoreError>;
        let mut claiming: Option<BoxFuture<'static, ClaimResult>> = None;
        // Claims start past the last key taken while they come back full; from the front of the
        // due index again when one comes back short and at least once per poll interval, so
        // rows committed late (behind the cursor) are found too. With the key goes the oldest
        // transaction running when the walk began (see `Store::probe_predecessors`).
        let mut cursor: Option<(Cursor, i64)> = None;
        // Claims cut short by their byte budget and still open: they hold rows locked that
        // nobody tracks, so claims started meanwhile probe every row.
        let mut cut_open: HashSet<u64> = HashSet::new();
        // The claim in progress was started before the loop heard that rows a walk had passed
        // came back unchanged (released, a lost claim, a cut claim ended): its rows are given
        // back untouched and the walk begins again from the front.
        let mut suspect = false;
        let mut cursor_since = Instant::now();
        let mut claims_started: u64 = 0;
        let mut finishing: FuturesUnordered<Finishing> = FuturesUnordered::new();
        let mut next_batch: u64 = 0;
        let mut want_claim = true;
        let mut claim_errors: u32 = 0;
        let mut claim_not_before = tokio::time::Instant::now();
        // While every broker is unreachable, claiming pauses: a claim with events for them is
        // followed by the next only after the outage delay (the retry backoff, capped at 5 s),
        // instead of claiming and rewriting the whole backlog over and over. The first success
        // resumes claiming at full speed. With one backend down among others, claims go on and
        // the dispatcher holds that backend's events back (one probe per outage delay).
        let mut probes: u32 = 0;
        let mut stopping = false;
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        // When a signal asked to stop, the end of `shutdown_timeout`: what the backends get to
        // flush in closing is what is left of it.
        let mut stop_by: Option<tokio::time::Instant> = None;
        // While stopping, when to look again whether only unreachable brokers are awaited.
        let mut recheck_at = tokio::time::Instant::now();
        let depth = self.cfg.pipeline_depth as usize;
        let mut poll = tokio::time::interval(self.cfg.poll_interval.0);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut summary = Summary::new(self.cfg.summary_interval.0);
        tracing::info!(
            outbox = %self.store.names().qualified(),
            batch_size = self.cfg.batch_size,
            pipeline_depth = depth,
            listen = self.cfg.listen,
            backends = %self.backends.iter().map(|b| format!("{}={}", b.name, b.publisher.kind())).collect::<Vec<_>>().join(","),
            "relay started"
        );

        loop {
            // `changed()` in the select below marks the value seen: compare versions instead.
            if assign_rx.borrow().version != assignment.version {
                let next = assign_rx.borrow_and_update().clone();
                if next.share != assignment.share {
                    // Another set of partitions: the cursor belongs to the old one.
                    cursor = None;
                    want_claim = true;
                    tracing::info!(
                        owned = next.owned(),
                        relays = next.members,
                        "partitions rebalanced"
                    );
                }
                self.note_assignment(&next);
                assignment = next;
            }
            // The oldest assignment a claim may still hold rows under: open claims', and the
            // one the next claim would use.
            let oldest = claim_versions
                .values()
                .copied()
                .chain(claiming_version)
                .chain(std::iter::once(assignment.version))
                .min()
                .unwrap_or(u64::MAX);
            ownership.oldest_open.send_if_modified(|v| {
                let changed = *v != oldest;
                *v = oldest;
                changed
            });
            let now = tokio::time::Instant::now();
            if probes > 0 && !d.brokers_unavailable() {
                tracing::info!(probes, "a broker answered: claiming resumed");
                probes = 0;
                want_claim = true;
                if claim_errors == 0 {
                    claim_not_before = now;
                }
            }
            if !stopping
                && want_claim
                && assignment.share.is_some()
                && claiming.is_none()
                // Claims being published and claims being committed both hold a connection
                // and their rows: together at most `pipeline_depth`.
                && txs.len() + finishing.len() < depth
                && now >= claim_not_before
            {
                want_claim = false;
                if cursor_since.elapsed() >= self.cfg.poll_interval.0 {
                    cursor = None;
                }
                if cursor.is_none() {
                    cursor_since = Instant::now();
                }
                claims_started += 1;
                let store = self.store.clone();
                let limit = self.cfg.batch_size;
                let from = match cursor {
                    _ if !cut_open.is_empty() => Walk::ProbeAll(cursor.map(|(c, _)| c)),
                    Some((c, xmin)) => Walk::After(c, xmin),
                    None => Walk::Front,
                };
                let share = assignment.share.clone().expect("guarded");
                claiming_version = Some(assignment.version);
                // On a task of its own: decoding a batch overlaps with the loop's work.
                claiming = Some(on_task("claiming", async move {
                    store.claim_share(limit, from, &share).await
                }));
            }
            if stopping && stop_deadline.is_some() && now >= recheck_at {
                recheck_at = now + Duration::from_millis(200);
                let probed_down: Vec<String> = self
                    .observed
                    .snapshot()
                    .backends
                    .into_iter()
                    .filter(|b| !b.up)
                    .map(|b| b.name)
                    .collect();
                if d.only_unreachable_in_flight(&probed_down, now.into_std(), UNREACHABLE_QUIET) {
                    // No answer is coming: the stop need not wait for brokers that are down,
                    // nor give their clients the rest of the timeout to flush in closing.
                    tracing::info!(
                        "shutting down: what is in flight waits only on brokers that are down"
                    );
                    stop_deadline = Some(now);
                    stop_by = stop_deadline;
                }
            }
            if stopping && claiming.is_none() && txs.is_empty() && finishing.is_empty() {
                break;
            }
            let claim_backoff = want_claim && claiming.is_none() && now < claim_not_before;
            tokio::select! {
                res = async { claiming.as_mut().expect("guarded").await }, if claiming.is_some() => {
                    claiming = None;
                    let version = claiming_version.take().unwrap_or(assignment.version);
                    self.stats.claims.fetch_add(1, Ordering::Relaxed);
                    match res {
                        Ok(Claim { tx, .. }) if std::mem::take(&mut suspect) => {
                            drop(tx);
                            d.forget_recent_before(claims_started);
                            cursor = None;
                            want_claim = true;
                        }
                        Ok(Claim { tx, rows, next, cut, walk_xmin }) => {
                            // A claim made with an older share says nothing about where the
                            // rows of partitions added since begin: start from the front. (One
                            // cut short by its byte budget has no `next`: the rows it holds
                            // past its last key are found from the front once released.)
                            cursor = if version == assignment.version {
                                next.zip(walk_xmin)
                            } else {
                                None
                            };
                            if cut {
                                want_claim = true;
                            }
                            if claim_errors > 0 {
                                tracing::info!("database reachable again, claiming resumed");
                                claim_errors = 0;
                            }
                            let n = rows.len();
                            // Full (as many rows as it asked for, which the byte budget may
                            // have made fewer than the batch size): more may be due.
                            if next.is_some() {
                                want_claim = true;
                            }
                            if n == 0 && drain && txs.is_empty() && finishing.is_empty() {
                                tracing::info!("nothing due and nothing in flight: drained");
                                stopping = true;
                            }
                            if n == 0 || stopping {
                                d.forget_recent_before(claims_started);
                                drop(tx);
                            } else {
                                self.stats.claimed.fetch_add(n as u64, Ordering::Relaxed);
                                self.metrics.claim_batch_size.observe(n as f64);
                                next_batch += 1;
                                if let Some(span) = self.tracer.claim_span(n) {
                                    self.book().claims.insert(next_batch, span);
                                }
                                txs.insert(next_batch, tx);
                                if cut {
                                    cut_open.insert(next_batch);
                                }
                                claim_versions.insert(next_batch, version);
                                let held = d.held_back();
                                let (h, c) = d.add_batch(next_batch, claims_started, rows);
                                if d.brokers_unavailable() && (!h.is_empty() || d.held_back() > held) {
                                    // Every backend is down and this claim had events for
                                    // them (a probe handed, the rest rescheduled): the next
                                    // claim waits. Claims that only defer rows behind waiting
                                    // events ask nothing and are not spaced.
                                    if probes == 0 {
                                        tracing::warn!("brokers unavailable: claiming paused between probes until one answers");
                                    }
                                    probes += 1;
                                    claim_not_before = tokio::time::Instant::now() + d.outage_delay(probes);
                                    want_claim = true;
                                }
                                self.publish(h, &ack_tx).await;
                                for c in c {
                                    let tx = txs.remove(&c.batch).expect("open claim");
                                    finishing.push(self.finishing(tx, c));
                                }
                            }
                        }
                        Err(e) => {
                            claim_errors += 1;
                            let wait = CLAIM_RETRY.step(claim_errors);
                            if claim_errors == 1 || claim_errors.is_multiple_of(20) {
                                tracing::warn!(error = %e, retry_in = ?wait, failures = claim_errors, "claim failed");
                            }
                            claim_not_before = tokio::time::Instant::now() + wait;
                            cursor = None;
                            want_claim = true;
                        }
                    }
                }
                Some(ack) = ack_rx.recv() => {
                    let mut handoffs = Vec::new();
                    let mut completed = Vec::new();
                    let mut next = Some(ack);
                    // One clock reading for the results read together (the dispatcher's
                    // hand-off times; the latencies come with the results).
                    let read_at = Instant::now();
                    while let Some(ack) = next {
                        summary.latency(ack.publish_latency());
                        self.observe(&ack);
                        d.on_result_into(ack, read_at, &mut handoffs, &mut completed);
                        next = ack_rx.try_recv().ok();
                    }
                    self.publish(handoffs, &ack_tx).await;
                    for c in completed {
                        let tx = txs.remove(&c.batch).expect("open claim");
                        finishing.push(self.finishing(tx, c));
                    }
                }
                Some((batch, res, tally, by_topic)) = finishing.next(), if !finishing.is_empty() => {
                    d.finished(batch, res.is_ok(), claims_started);
                    let was_cut = cut_open.remove(&batch);
                    if was_cut || tally.released > 0 || res.is_err() {
                        // Rows are pending again unchanged, possibly behind the cursor.
                        cursor = None;
                        suspect = claiming.is_some();
                    }
                    claim_versions.remove(&batch);
                    if self.tracer.is_on() {
                        if let Some(mut span) = self.book().claims.remove(&batch) {
                            if let Err(e) = &res {
                                span.set_status(Status::error(e.to_string()));
                            }
                            span.end();
                        }
                    }
                    if drain {
                        // Look again at once: the drain ends on an empty claim with nothing open.
                        want_claim = true;
                    }
                    match res {
                        Ok(()) => {
                            self.record(&tally, &by_topic);
                            summary.add(&tally);
                        }
                        Err(e) => {
                            self.stats.lost_claims.fetch_add(1, Ordering::Relaxed);
                            self.metrics.lost_claims.inc();
                            tracing::warn!(error = %e, published = tally.published,
                                "could not record a batch's results; its rows stay pending and \
                                 will be published again (same event ids)");
                        }
                    }
                }
                _ = wake.notified(), if !stopping => {
                    if !self.cfg.debounce.0.is_zero() {
                        tokio::time::sleep(self.cfg.debounce.0).await;
                    }
                    want_claim = true;
                }
                _ = poll.tick(), if !stopping => want_claim = true,
                _ = assign_rx.changed(), if !stopping => {}
                _ = tokio::time::sleep_until(claim_not_before), if claim_backoff && !stopping => {}
                _ = tick.tick() => {
                    let in_flight = d.in_flight();
                    self.stats.in_flight.store(in_flight as u64, Ordering::Relaxed);
                    self.metrics.in_flight.set(in_flight as i64);
                    let (mut h, mut c) = d.expire(self.cfg.publish_timeout.0);
                    // A claim is never older than its session may stay idle in a transaction.
                    let (h2, c2) = d.release_stale(self.cfg.publish_timeout.0);
                    h.extend(h2);
                    c.extend(c2);
                    self.publish(h, &ack_tx).await;
                    for c in c {
                        let tx = txs.remove(&c.batch).expect("open claim");
                        finishing.push(self.finishing(tx, c));
                    }
                    if summary.due() {
                        summary.log(&self.store, d.in_flight(), assignment.owned());
                    }
                }
                _ = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    stop_deadline = Some(tokio::time::Instant::now() + self.cfg.shutdown_timeout.0);
                    stop_by = stop_deadline;
                    tracing::info!(in_flight = d.in_flight(), claims = txs.len(),
                        timeout = ?self.cfg.shutdown_timeout.0, "shutting down: claiming stopped, waiting for results");
                }
                _ = async { tokio::time::sleep_until(stop_deadline.expect("guarded")).await }, if stop_deadline.is_some() => {
                    stop_deadline = None;
                    let c = d.release_all();
                    tracing::warn!(claims = c.len(), "shutdown timeout: releasing events still without a result; they stay pending");
                    for c in c {
                        let tx = txs.remove(&c.batch).expect("open claim");
                        finishing.push(self.finishing(tx, c));
                    }
                }
            }
        }
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

/// The database session settings of a relay.
pub fn session(cfg: &Config) -> Session {
    Session {
        application_name: format!("outbox-relay {}", cfg.instance_id()),
        // A claim is open while its events are published; past this, Postgres ends a session
        // whose relay hangs, releasing its rows.
        idle_in_transaction_timeout: Some(
            cfg.relay.publish_timeout.0 * 2 + cfg.database.statement_timeout.0,
        ),
        operator: false,
    }
}

/// The periodic summary line.
struct Summary {
    every: Duration,
    last: Instant,
    window: Tally,
    lat_sum: Duration,
    lat_n: u64,
    lat_max: Duration,
}

impl Summary {
    fn new(every: Duration) -> Self {
        Summary {
            every,
            last: Instant::now(),
            window: Tally::default(),
            lat_sum: Duration::ZERO,
            lat_n: 0,
            lat_max: Duration::ZERO,
        }
    }

    fn add(&mut self, t: &Tally) {
        self.window.published += t.published;
        self.window.failed += t.failed;
        self.window.retried += t.retried;
        self.window.deferred += t.deferred;
    }

    fn latency(&mut self, d: Duration) {
        self.lat_sum += d;
        self.lat_n += 1;
        self.lat_max = self.lat_max.max(d);
    }

    fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }

    fn log(&mut self, store: &Arc<Store>, in_flight: usize, partitions: usize) {
        let secs = self.last.elapsed().as_secs_f64();
        let w = std::mem::take(&mut self.window);
        let avg = if self.lat_n > 0 {
            self.lat_sum / self.lat_n as u32
        } else {
            Duration::ZERO
        };
        let max = self.lat_max;
        self.lat_sum = Duration::ZERO;
        self.lat_n = 0;
        self.lat_max = Duration::ZERO;
        self.last = Instant::now();
        let store = store.clone();
        // Counting may take a moment on a big backlog; never in the loop's way.
        tokio::spawn(async move {
            const CAP: i64 = 1_000_000;
            let pending = match store.count_pending(CAP).await {
                Ok(n) if n >= CAP => format!("{CAP}+"),
                Ok(n) => n.to_string(),
                Err(_) => "unknown".into(),
            };
            tracing::info!(
                published = w.published,
                failed = w.failed,
                retried = w.retried,
                deferred = w.deferred,
                rate = format!("{:.0}/s", w.published as f64 / secs),
                pending = %pending,
                in_flight,
                partitions,
                ack_latency_avg = ?avg,
                ack_latency_max = ?max,
                "summary"
            );
        });
    }

    fn log_final(&self, s: &Stats) {
        tracing::info!(
            published = s.published.load(Ordering::Relaxed),
            failed = s.failed.load(Ordering::Relaxed),
            retried = s.retried.load(Ordering::Relaxed),
            released = s.released.load(Ordering::Relaxed),
            "relay stopped"
        );
    }
}
