//! The loop of a running relay, as a value: its state is the fields below, and what it waits
//! on (a claim, results on the ACK channel, a written claim, the tick, the stop and its
//! deadline) has a method of its own; a wake-up and the poll only ask for a claim.
//!
//! One turn: take in a new share of the partitions if there is one, resume claiming if a
//! broker answered after an outage, start a claim if one is wanted and allowed, while stopping
//! look whether only brokers that are down are awaited, then wait for the first of the events
//! ([`Step`]) and handle it.

use super::accounting::Summary;
use super::dispatch::{Completed, Dispatcher};
use super::ownership::{Assignment, Ownership};
use super::retry::Backoff;
use super::{on_task, FinishedClaim, Finishing, Relay};

mod claiming;
use crate::publisher::{AckResult, AckSender};
use crate::store::{Claim, ClaimTx, Cursor, StoreError, Walk};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use opentelemetry::trace::{Span as _, Status};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Interval;
use tokio_util::sync::CancellationToken;

/// On the way out, a backend counts as unreachable (its events released without waiting out
/// `shutdown_timeout`) only after this long without a success from it.
const UNREACHABLE_QUIET: Duration = Duration::from_secs(2);

type ClaimResult = Result<Claim, StoreError>;

/// What ended one wait of the loop.
enum Step {
    Claimed(ClaimResult),
    Acked(AckResult),
    Finished(FinishedClaim),
    Woken,
    /// The poll interval passed: claim from the front again.
    Polled,
    /// A new share of the partitions, or the end of a pause between claims: nothing to do but
    /// go round.
    Nothing,
    /// The housekeeping tick (timeouts, gauges, the summary line).
    Tick,
    Shutdown,
    StopDeadline,
}

pub(super) struct Pipeline<'r> {
    relay: &'r Relay,
    /// `run --drain`: stop once a claim finds nothing due while nothing is in flight.
    drain: bool,
    shutdown: CancellationToken,
    /// Notified by LISTEN/NOTIFY (see [`super::wake`]).
    wake: Arc<Notify>,
    ownership: Ownership,
    assign_rx: watch::Receiver<Arc<Assignment>>,
    /// The share of the partitions claims use now.
    assignment: Arc<Assignment>,
    /// Versions of the assignment each open claim was started with (by claim), so the
    /// ownership manager gives a partition up only once no claim can hold its rows.
    claim_versions: HashMap<u64, u64>,
    /// The version the claim in progress was started with.
    claiming_version: Option<u64>,
    /// The ACK channel: every backend answers every hand-off on it.
    ack_tx: AckSender,
    ack_rx: mpsc::UnboundedReceiver<AckResult>,
    dispatcher: Dispatcher,
    /// Open claims (by claim number), each a transaction holding its rows locked.
    txs: HashMap<u64, ClaimTx>,
    /// The claim in progress, on a task of its own.
    claiming: Option<BoxFuture<'static, ClaimResult>>,
    /// Claims start past the last key taken while they come back full; from the front of the
    /// due index again when one comes back short and at least once per poll interval, so rows
    /// committed late (behind the cursor) are found too. With the key goes the oldest
    /// transaction running when the walk began (see `Store::probe_predecessors`).
    cursor: Option<(Cursor, i64)>,
    /// When the walk last began from the front.
    cursor_since: Instant,
    /// Claims cut short by their byte budget and still open: they hold rows locked that nobody
    /// tracks, so claims started meanwhile probe every row.
    cut_open: HashSet<u64>,
    /// The claim in progress was started before the loop heard that rows a walk had passed
    /// came back unchanged (released, a lost claim, a cut claim ended): its rows are given
    /// back untouched and the walk begins again from the front.
    suspect: bool,
    claims_started: u64,
    /// Claims being written (all verdicts in one transaction) on tasks of their own.
    finishing: FuturesUnordered<Finishing>,
    /// The number of the last claim that brought rows.
    next_batch: u64,
    want_claim: bool,
    /// Failed claims in a row.
    claim_errors: u32,
    claim_not_before: tokio::time::Instant,
    /// While every broker is unreachable, claiming pauses: a claim with events for them is
    /// followed by the next only after the outage delay (the retry backoff, capped at 5 s),
    /// instead of claiming and rewriting the whole backlog over and over. The first success
    /// resumes claiming at full speed. With one backend down among others, claims go on and
    /// the dispatcher holds that backend's events back (one probe per outage delay).
    probes: u32,
    /// No more claims; the loop ends once every open claim is written.
    stopping: bool,
    /// When what is still in flight is released unanswered.
    stop_deadline: Option<tokio::time::Instant>,
    /// When a signal asked to stop, the end of `shutdown_timeout`: what the backends get to
    /// flush in closing is what is left of it.
    stop_by: Option<tokio::time::Instant>,
    /// While stopping, when to look again whether only unreachable brokers are awaited.
    recheck_at: tokio::time::Instant,
    poll: Interval,
    tick: Interval,
    summary: Summary,
}

impl<'r> Pipeline<'r> {
    pub(super) fn new(
        relay: &'r Relay,
        ownership: Ownership,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        drain: bool,
    ) -> Self {
        let mut assign_rx = ownership.assignment.clone();
        let assignment = assign_rx.borrow_and_update().clone();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut poll = tokio::time::interval(relay.cfg.poll_interval.0);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Pipeline {
            relay,
            drain,
            shutdown,
            wake,
            ownership,
            assign_rx,
            assignment,
            claim_versions: HashMap::new(),
            claiming_version: None,
            ack_tx,
            ack_rx,
            dispatcher: relay.dispatcher(),
            txs: HashMap::new(),
            claiming: None,
            cursor: None,
            cursor_since: Instant::now(),
            cut_open: HashSet::new(),
            suspect: false,
            claims_started: 0,
            finishing: FuturesUnordered::new(),
            next_batch: 0,
            want_claim: true,
            claim_errors: 0,
            claim_not_before: tokio::time::Instant::now(),
            probes: 0,
            stopping: false,
            stop_deadline: None,
            stop_by: None,
            recheck_at: tokio::time::Instant::now(),
            poll,
            tick,
            summary: Summary::new(relay.cfg.summary_interval.0),
        }
    }

    /// Runs until stopped and every claim is written; returns the ownership (to leave), the
    /// end of the stop's time budget (None after a drain), and the summary (for the last
    /// line).
    pub(super) async fn run(mut self) -> (Ownership, Option<tokio::time::Instant>, Summary) {
        loop {
            self.follow_assignment();
            let now = tokio::time::Instant::now();
            self.resume_after_outage(now);
            self.start_claim(now);
            self.stop_early_if_only_down_brokers_remain(now);
            if self.stopping
                && self.claiming.is_none()
                && self.txs.is_empty()
                && self.finishing.is_empty()
            {
                break;
            }
            match self.next_step(now).await {
                Step::Claimed(res) => self.on_claimed(res).await,
                Step::Acked(ack) => self.on_acks(ack).await,
                Step::Finished(done) => self.on_finished(done),
                Step::Woken => self.on_woken(),
                Step::Polled => self.want_claim = true,
                Step::Nothing => {}
                Step::Tick => self.on_tick().await,
                Step::Shutdown => self.on_shutdown(),
                Step::StopDeadline => self.on_stop_deadline(),
            }
        }
        (self.ownership, self.stop_by, self.summary)
    }

    /// A notification: claim, `debounce` after the first of a burst so the burst is one claim.
    /// The wait is the claim's own (`claim_not_before`), not a sleep of the loop, so results
    /// and finishes go on being handled meanwhile.
    fn on_woken(&mut self) {
        let debounce = self.relay.cfg.debounce.0;
        let now = tokio::time::Instant::now();
        if !debounce.is_zero() && self.claim_not_before <= now {
            self.claim_not_before = now.checked_add(debounce).unwrap_or(now);
        }
        self.want_claim = true;
    }

    /// Waits for whichever comes first of what the loop listens to.
    async fn next_step(&mut self, now: tokio::time::Instant) -> Step {
        let claim_backoff =
            self.want_claim && self.claiming.is_none() && now < self.claim_not_before;
        let stopping = self.stopping;
        let (claim_not_before, stop_deadline) = (self.claim_not_before, self.stop_deadline);
        let claiming = &mut self.claiming;
        let finishing = &mut self.finishing;
        tokio::select! {
            res = async { claiming.as_mut().expect("guarded").await }, if claiming.is_some() => {
                *claiming = None;
                Step::Claimed(res)
            }
            Some(ack) = self.ack_rx.recv() => Step::Acked(ack),
            Some(done) = finishing.next(), if !finishing.is_empty() => Step::Finished(done),
            _ = self.wake.notified(), if !stopping => Step::Woken,
            _ = self.poll.tick(), if !stopping => Step::Polled,
            _ = self.assign_rx.changed(), if !stopping => Step::Nothing,
            _ = tokio::time::sleep_until(claim_not_before), if claim_backoff && !stopping => Step::Nothing,
            _ = self.tick.tick() => Step::Tick,
            _ = self.shutdown.cancelled(), if !stopping => Step::Shutdown,
            _ = async { tokio::time::sleep_until(stop_deadline.expect("guarded")).await }, if stop_deadline.is_some() => Step::StopDeadline,
        }
    }

    /// Takes in a new share of the partitions, and tells the ownership manager the oldest
    /// share an open claim may still hold rows under.
    fn follow_assignment(&mut self) {
        // `changed()` in the select marks the value seen: compare versions instead.
        if self.assign_rx.borrow().version != self.assignment.version {
            let next = self.assign_rx.borrow_and_update().clone();
            if next.share != self.assignment.share {
                // Another set of partitions: the cursor belongs to the old one.
                self.cursor = None;
                self.want_claim = true;
                tracing::info!(
                    owned = next.owned(),
                    relays = next.members,
                    "partitions rebalanced"
                );
            }
            self.relay.note_assignment(&next);
            self.assignment = next;
        }
        // Open claims' versions, and the one the next claim would use.
        let oldest = self
            .claim_versions
            .values()
            .copied()
            .chain(self.claiming_version)
            .chain(std::iter::once(self.assignment.version))
            .min()
            .unwrap_or(u64::MAX);
        self.ownership.oldest_open.send_if_modified(|v| {
            let changed = *v != oldest;
            *v = oldest;
            changed
        });
    }

    fn resume_after_outage(&mut self, now: tokio::time::Instant) {
        if self.probes > 0 && !self.dispatcher.brokers_unavailable() {
            tracing::info!(probes = self.probes, "a broker answered: claiming resumed");
            self.probes = 0;
            self.want_claim = true;
            if self.claim_errors == 0 {
                self.claim_not_before = now;
            }
        }
    }

    /// While stopping: once only brokers that are down are awaited, no answer is coming, so
    /// the stop need not wait for them, nor give their clients the rest of the timeout to
    /// flush in closing.
    fn stop_early_if_only_down_brokers_remain(&mut self, now: tokio::time::Instant) {
        if !self.stopping || self.stop_deadline.is_none() || now < self.recheck_at {
            return;
        }
        self.recheck_at = now + Duration::from_millis(200);
        let probed_down: Vec<String> = self
            .relay
            .observed
            .snapshot()
            .backends
            .into_iter()
            .filter(|b| !b.up)
            .map(|b| b.name)
            .collect();
        if self.dispatcher.only_unreachable_in_flight(
            &probed_down,
            now.into_std(),
            UNREACHABLE_QUIET,
        ) {
            tracing::info!("shutting down: what is in flight waits only on brokers that are down");
            self.stop_deadline = Some(now);
            self.stop_by = self.stop_deadline;
        }
    }

    /// Results on the ACK channel: every one already waiting is taken in, then what they let
    /// go is handed over at once.
    async fn on_acks(&mut self, first: AckResult) {
        let mut handoffs = Vec::new();
        let mut completed = Vec::new();
        let mut next = Some(first);
        // One clock reading for the results read together (the dispatcher's hand-off times;
        // the latencies come with the results).
        let read_at = Instant::now();
        while let Some(ack) = next {
            self.summary.latency(ack.publish_latency());
            self.relay.observe(&ack);
            self.dispatcher
                .on_result_into(ack, read_at, &mut handoffs, &mut completed);
            next = self.ack_rx.try_recv().ok();
        }
        self.relay.publish(handoffs, &self.ack_tx).await;
        self.finish(completed);
    }

    /// A claim was written (or could not be).
    fn on_finished(&mut self, (batch, res, tally, by_topic): FinishedClaim) {
        self.dispatcher
            .finished(batch, res.is_ok(), self.claims_started);
        let was_cut = self.cut_open.remove(&batch);
        if was_cut || tally.released > 0 || res.is_err() {
            // Rows are pending again unchanged, possibly behind the cursor.
            self.cursor = None;
            self.suspect = self.claiming.is_some();
        }
        self.claim_versions.remove(&batch);
        if self.relay.tracer.is_on() {
            if let Some(mut span) = self.relay.book().claims.remove(&batch) {
                if let Err(e) = &res {
                    span.set_status(Status::error(e.to_string()));
                }
                span.end();
            }
        }
        if self.drain {
            // Look again at once: the drain ends on an empty claim with nothing open.
            self.want_claim = true;
        }
        match res {
            Ok(()) => {
                self.relay.record(&tally, &by_topic);
                self.summary.add(&tally);
            }
            Err(e) => {
                self.relay.stats.lost_claims.fetch_add(1, Ordering::Relaxed);
                self.relay.metrics.lost_claims.inc();
                tracing::warn!(error = %e, published = tally.published,
                    "could not record a batch's results; its rows stay pending and \
                     will be published again (same event ids)");
            }
        }
    }

    /// Timeouts of hand-offs and of claims, the in-flight gauge and the summary line.
    async fn on_tick(&mut self) {
        let in_flight = self.dispatcher.in_flight();
        self.relay
            .stats
            .in_flight
            .store(in_flight as u64, Ordering::Relaxed);
        self.relay.metrics.in_flight.set(in_flight as i64);
        let timeout = self.relay.cfg.publish_timeout.0;
        let (mut h, mut c) = self.dispatcher.expire(timeout);
        // A claim is never older than its session may stay idle in a transaction.
        let (h2, c2) = self.dispatcher.release_stale(timeout);
        h.extend(h2);
        c.extend(c2);
        self.relay.publish(h, &self.ack_tx).await;
        self.finish(c);
        if self.summary.due() {
            self.summary.log(
                &self.relay.store,
                self.dispatcher.in_flight(),
                self.assignment.owned(),
            );
        }
    }

    fn on_shutdown(&mut self) {
        self.stopping = true;
        self.stop_deadline = Some(tokio::time::Instant::now() + self.relay.cfg.shutdown_timeout.0);
        self.stop_by = self.stop_deadline;
        tracing::info!(in_flight = self.dispatcher.in_flight(), claims = self.txs.len(),
            timeout = ?self.relay.cfg.shutdown_timeout.0, "shutting down: claiming stopped, waiting for results");
    }

    fn on_stop_deadline(&mut self) {
        self.stop_deadline = None;
        let c = self.dispatcher.release_all();
        tracing::warn!(
            claims = c.len(),
            "shutdown timeout: releasing events still without a result; they stay pending"
        );
        self.finish(c);
    }

    /// Claims whose every row has its verdict are written on tasks of their own.
    fn finish(&mut self, completed: Vec<Completed>) {
        for c in completed {
            let tx = self.txs.remove(&c.batch).expect("open claim");
            self.finishing.push(self.relay.finishing(tx, c));
        }
    }
}
