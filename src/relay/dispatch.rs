//! The dispatcher: decides, for every claimed row, when it may be handed to a publisher and
//! what its verdict is. Pure state, no I/O: the relay loop feeds it claims and results and
//! carries out what it returns.
//!
//! # Ordering
//! An event is handed to a publisher only when no earlier unfinished event of its aggregate
//! exists, or when that earlier event is this relay's own and has been acknowledged. The claim
//! tells each row its nearest unfinished predecessor (`Claimed::prev`):
//!
//! * none: the row heads its aggregate; hand it now.
//! * ours, still in flight: the row waits behind it (a chain, one link per aggregate step) and
//!   is handed the moment the predecessor's success arrives.
//! * ours, acknowledged or recently committed as published: hand it now.
//! * ours, failed or retrying: the row is not handed; it is deferred behind the predecessor.
//! * someone else's (another relay has it, it waits for a retry, or it failed): the row is
//!   deferred, and its lock released, so it never blocks this relay's pipeline.
//!
//! A row therefore never overtakes its predecessor, within a batch, across batches, across
//! relays, or across retries: a retried event keeps every later event of its aggregate behind
//! it until it is published or failed (and then replayed or purged).

use super::retry::Backoff;
use crate::envelope::{BodyFormat, Event};
use crate::publisher::{AckResult, ErrorKind};
use crate::routing::Router;
use crate::store::{Claimed, DeferUntil, Marks, Prev, RowStatus};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A row to hand to a publisher now.
#[derive(Debug)]
pub struct Handoff {
    pub backend: usize,
    pub format: BodyFormat,
    pub event: Arc<Event>,
    pub token: u64,
    /// The claim the row came with.
    pub batch: u64,
}

/// A row's final verdict within its claim.
#[derive(Debug, Clone)]
pub enum Verdict {
    Published,
    Retry {
        delay: Duration,
        reason: String,
        /// Counts as a publish attempt (false: the broker was unavailable).
        counted: bool,
    },
    Failed {
        attempted: bool,
        reason: String,
    },
    Deferred(DeferUntil),
    /// No write: the row's lock is released and it is claimed again later (shutdown).
    Released,
}

#[derive(Debug)]
enum State {
    Waiting,
    Handed { token: u64, at: Instant },
    Done(Verdict),
}

#[derive(Debug)]
struct RowState {
    batch: u64,
    event: Arc<Event>,
    route: Option<(usize, BodyFormat)>,
    /// Why the row cannot be published, if it cannot.
    invalid: Option<String>,
    state: State,
    successor: Option<i64>,
    /// The row it follows in its aggregate's chain, while that row is in memory.
    pred: Option<i64>,
    /// In flight while an earlier row of its chain failed or was retried: nothing may be
    /// handed behind it.
    tainted: bool,
    claimed_at: Instant,
    /// Its aggregate's chain (see [`Chain`]; `NO_CHAIN` while no row was placed behind it)
    /// and its place in it.
    chain: u64,
    seq: u64,
    /// `aggregate_key` of its aggregate id.
    aggregate_key: u64,
}

/// The rows of one aggregate (by key) this relay tracks: most aggregates have one at a time.
#[derive(Debug)]
enum Tracked {
    One(i64),
    Many(BTreeSet<i64>),
}

/// `RowState::chain` of a row no other row was placed behind.
const NO_CHAIN: u64 = 0;

/// One aggregate's rows in memory, in order, so that settling an acknowledgement costs the
/// same with a window of 1 000 events in flight as with 1: where the next row to hand is and
/// how far the oldest unacknowledged row is behind it are kept, not found by walking the chain.
///
/// Slot `seq - base` holds the row placed `seq`-th; a row that left memory (its claim ended)
/// leaves a hole, which the zone passes: it was decided, and had it not been published, the
/// rows behind it were tainted or deferred when it was.
#[derive(Debug, Default)]
struct Chain {
    ids: VecDeque<i64>,
    base: u64,
    /// Every slot before it is published (or a hole): the oldest unacknowledged row is here
    /// or later.
    zone: u64,
    /// Every slot before it is handed or decided (or a hole): the next row to hand is here
    /// or later. Rows are handed in chain order and never become waiting again.
    frontier: u64,
    /// Rows in memory that belong to it; at 0 it goes.
    members: usize,
}

#[derive(Debug, Default)]
struct BatchState {
    rows: Vec<i64>,
    open: usize,
    /// Rows left unchanged because an older claim still tracks them.
    released: u64,
}

/// What a batch contributed when it completed, for counters and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub published: u64,
    pub failed: u64,
    pub retried: u64,
    pub deferred: u64,
    pub released: u64,
}

/// A completed batch's verdicts for one topic and backend, for the per-topic counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTally {
    pub topic: String,
    /// The route's backend; `None` for rows that had none (unrouted topics).
    pub backend: Option<usize>,
    pub published: u64,
    pub failed: u64,
    pub retried: u64,
}

/// Everything a completed batch must write.
#[derive(Debug, Default)]
pub struct Completed {
    pub batch: u64,
    pub marks: Marks,
    pub tally: Tally,
    pub by_topic: Vec<TopicTally>,
}

impl Completed {
    fn count(&mut self, event: &Event, backend: Option<usize>) -> &mut TopicTally {
        // A batch holds few topics: a linear search beats hashing here.
        let i = match self
            .by_topic
            .iter()
            .position(|t| t.backend == backend && t.topic == event.topic)
        {
            Some(i) => i,
            None => {
                self.by_topic.push(TopicTally {
                    topic: event.topic.clone(),
                    backend,
                    published: 0,
                    failed: 0,
                    retried: 0,
                });
                self.by_topic.len() - 1
            }
        };
        &mut self.by_topic[i]
    }
}

pub struct Dispatcher {
    router: Arc<Router>,
    backoff: Backoff,
    max_attempts: u32,
    max_payload_bytes: usize,
    rows: HashMap<i64, RowState>,
    /// Per aggregate (by a hash of its id), the rows of it in `rows`. The claim probes the
    /// database for a row's predecessor only where its own order could have missed one (see
    /// `Store::probe_predecessors`); otherwise the row's predecessors are these, or done.
    /// Ordered, so a hot aggregate's thousands of rows in memory cost a tree step, not a scan.
    by_aggregate: HashMap<u64, Tracked>,
    /// The chains, by number.
    chains: HashMap<u64, Chain>,
    next_chain: u64,
    /// Shutting down: verdicts settle nothing behind them (see `release_all`).
    closing: bool,
    batches: HashMap<u64, BatchState>,
    /// Rows this relay published and committed lately: a claim that started before that commit
    /// still sees them as predecessors. Each is tagged with the number of claims started when
    /// the commit was heard of; once a claim started after that has been placed, no claim can
    /// see the row any more and the entry goes.
    recent: HashSet<i64>,
    recent_order: VecDeque<(u64, i64)>,
    next_token: u64,
    /// Events of one aggregate in flight at once (1: strict order).
    window: usize,
    /// Per backend: keeps the order of messages sent on it (see `Publisher::keeps_order`).
    ordered: Vec<bool>,
    /// Per backend (by index), its outage if any.
    outage: Vec<Outage>,
    /// Rows rescheduled so far without being handed over, their backend being down.
    held_back: u64,
    /// Per backend (by index), when it last reported a success.
    last_success: Vec<Option<Instant>>,
    /// The time of the call in progress, read once at each entry that may hand rows over
    /// (`add_batch`, `on_result_at`, `expire`, `release_stale`) rather than once per row.
    clock: Instant,
}

/// A backend's outage: while its latest result was "unavailable", its rows are not handed over
/// but rescheduled, except one probe event per outage delay, so a broker that is down is asked
/// once per delay however many of its events are claimed, and other backends flow on.
#[derive(Debug, Clone, Copy)]
struct Outage {
    /// Unavailable results since the backend's last success (0: not down).
    rounds: u32,
    /// When it may be asked again.
    next_probe: Instant,
    /// The row sent as its latest probe. While that row is in flight no other goes, so a
    /// down backend keeps at most one claim open (a probe waits up to the publish timeout).
    probe: Option<i64>,
}

/// The longest an event waits between looks while its broker is unavailable.
const OUTAGE_RETRY_MAX: Duration = Duration::from_secs(5);

/// May a waiting row go now?
enum Gate {
    Go,
    Wait,
    Defer(DeferUntil),
}

impl Dispatcher {
    pub fn new(
        router: Arc<Router>,
        backoff: Backoff,
        max_attempts: u32,
        max_payload_bytes: usize,
    ) -> Self {
        let backends = router.backend_count();
        Dispatcher {
            router,
            backoff,
            max_attempts,
            max_payload_bytes,
            rows: HashMap::default(),
            by_aggregate: HashMap::default(),
            chains: HashMap::default(),
            next_chain: 0,
            closing: false,
            batches: HashMap::default(),
            recent: HashSet::default(),
            recent_order: VecDeque::new(),
            next_token: 1,
            window: 1,
            ordered: Vec::new(),
            outage: vec![
                Outage {
                    rounds: 0,
                    next_probe: Instant::now(),
                    probe: None,
                };
                backends
            ],
            held_back: 0,
            last_success: vec![None; backends],
            clock: Instant::now(),
        }
    }

    /// Pipelined ordering: up to `window` events of an aggregate in flight at once, on the
    /// backends flagged in `ordered` (by index), for rows of one topic. `window` 1 is strict.
    pub fn pipelined(mut self, window: usize, ordered: Vec<bool>) -> Self {
        self.window = window.max(1);
        self.ordered = ordered;
        self
    }

    /// Whether every backend is known to be unreachable: the latest result from each was
    /// "unavailable" (or a hand-off timed out unanswered) and nothing has succeeded since. The
    /// relay then spaces its claims (see `Relay::run`).
    pub fn brokers_unavailable(&self) -> bool {
        let n = self.router.backend_count();
        n > 0 && (0..n).all(|b| self.down(b))
    }

    /// Whether backend `b` is in an outage: its latest result was "unavailable".
    fn down(&self, b: usize) -> bool {
        self.outage.get(b).is_some_and(|o| o.rounds > 0)
    }

    /// Whether something is in flight and all of it waits on backends that are unreachable:
    /// in an outage here, or named in `probed_down` (their latest health probe failed, which
    /// is how a broker that was down from the start is known before any result comes back),
    /// and in either case without a success for `quiet` up to `now` (a probe can be stale
    /// and "latest result unavailable" can be one partition's while others deliver). On the
    /// way out, waiting `shutdown_timeout` for those answers is waiting for brokers that are
    /// not there: the relay releases the rows instead (they stay pending).
    pub fn only_unreachable_in_flight(
        &self,
        probed_down: &[String],
        now: Instant,
        quiet: Duration,
    ) -> bool {
        let unreachable: Vec<bool> = (0..self.router.backend_count())
            .map(|b| {
                let silent = self
                    .last_success
                    .get(b)
                    .copied()
                    .flatten()
                    .is_none_or(|t| now.saturating_duration_since(t) >= quiet);
                silent
                    && (self.down(b)
                        || probed_down
                            .iter()
                            .any(|n| n.as_str() == self.router.backend_name(b)))
            })
            .collect();
        if !unreachable.contains(&true) {
            return false;
        }
        let mut any = false;
        for r in self.rows.values() {
            if let State::Handed { .. } = r.state {
                match r.route {
                    Some((b, _)) if unreachable.get(b) == Some(&true) => any = true,
                    _ => return false,
                }
            }
        }
        any
    }

    /// Rows rescheduled so far without a hand-off because their backend was down.
    pub fn held_back(&self) -> u64 {
        self.held_back
    }

    /// For a row about to be handed over: `None` to hand it, or the verdict rescheduling it
    /// when its backend is down and was asked less than an outage delay ago. The first row
    /// after that delay goes as the probe.
    fn hold(&mut self, id: i64) -> Option<Verdict> {
        let backend = self.rows.get(&id)?.route?.0;
        let o = *self.outage.get(backend).filter(|o| o.rounds > 0)?;
        let now = Instant::now();
        let delay = self.outage_delay(o.rounds);
        let probing = o.probe.is_some_and(|p| {
            self.rows
                .get(&p)
                .is_some_and(|r| matches!(r.state, State::Handed { .. }))
        });
        if now >= o.next_probe && !probing {
            self.outage[backend].next_probe = now + delay;
            self.outage[backend].probe = Some(id);
            return None;
        }
        self.held_back += 1;
        Some(Verdict::Retry {
            delay,
            reason: format!(
                "waiting for the broker: backend {} is unavailable; asked again once it answers",
                self.router.backend_name(backend)
            ),
            counted: false,
        })
    }

    /// How long to wait before asking an unavailable broker again, after `rounds` unanswered
    /// asks: the retry backoff, capped at OUTAGE_RETRY_MAX.
    pub fn outage_delay(&self, rounds: u32) -> Duration {
        self.backoff.delay(rounds.min(16)).min(OUTAGE_RETRY_MAX)
    }

    /// The latest row of `aggregate` before `id` this relay tracks.
    fn tracked_before(&self, key: u64, aggregate: &str, id: i64) -> Option<i64> {
        // The latest before `id` whose aggregate really is this one (a hash may be shared).
        let ours = |t: &i64| {
            self.rows
                .get(t)
                .is_some_and(|r| r.event.aggregate_id == aggregate)
        };
        match self.by_aggregate.get(&key)? {
            Tracked::One(t) => Some(*t).filter(|t| *t < id && ours(t)),
            Tracked::Many(ids) => ids.range(..id).rev().copied().find(ours),
        }
    }

    fn track(&mut self, key: u64, id: i64) {
        match self.by_aggregate.get_mut(&key) {
            None => {
                self.by_aggregate.insert(key, Tracked::One(id));
            }
            Some(tracked) => match tracked {
                Tracked::One(t) => *tracked = Tracked::Many(BTreeSet::from([*t, id])),
                Tracked::Many(ids) => {
                    ids.insert(id);
                }
            },
        }
    }

    fn untrack(&mut self, key: u64, id: i64) {
        let gone = match self.by_aggregate.get_mut(&key) {
            None => false,
            Some(Tracked::One(t)) => *t == id,
            Some(Tracked::Many(ids)) => {
                ids.remove(&id);
                ids.is_empty()
            }
        };
        if gone {
            self.by_aggregate.remove(&key);
        }
    }

    /// The chain row `id` joins and its place in it: its predecessor's, at the end, when it
    /// is placed behind one (the predecessor starts the chain if it has none yet). A row with
    /// nothing behind it needs no chain (`NO_CHAIN`): most rows, with many aggregates.
    fn join_chain(&mut self, id: i64, placement: &Placement) -> (u64, u64) {
        let Placement::Behind(prev) = placement else {
            return (NO_CHAIN, 0);
        };
        let Some(p) = self.rows.get_mut(prev) else {
            return (NO_CHAIN, 0);
        };
        if p.chain == NO_CHAIN {
            self.next_chain += 1;
            p.chain = self.next_chain;
            p.seq = 0;
            self.chains.insert(
                self.next_chain,
                Chain {
                    ids: VecDeque::from([*prev]),
                    members: 1,
                    ..Chain::default()
                },
            );
        }
        let chain = p.chain;
        let c = self.chains.entry(chain).or_default();
        let seq = c.base + c.ids.len() as u64;
        c.ids.push_back(id);
        c.members += 1;
        (chain, seq)
    }

    /// The row in slot `seq` of `chain`, if it is still in memory.
    fn slot(&self, chain: u64, seq: u64) -> Option<i64> {
        let c = self.chains.get(&chain)?;
        Self::slot_row(&self.rows, c, chain, seq).map(|(id, _)| id)
    }

    /// The row in slot `seq` of chain `c` (numbered `chain`), with its id, if it is still in
    /// memory: a slot whose row left memory, or was claimed again into another chain, is a
    /// hole.
    fn slot_row<'a>(
        rows: &'a HashMap<i64, RowState>,
        c: &Chain,
        chain: u64,
        seq: u64,
    ) -> Option<(i64, &'a RowState)> {
        let id = *c.ids.get(usize::try_from(seq.checked_sub(c.base)?).ok()?)?;
        rows.get(&id)
            .filter(|r| r.chain == chain && r.seq == seq)
            .map(|r| (id, r))
    }

    /// The next waiting row of `chain`, moving its frontier past what is handed or decided.
    fn frontier(&mut self, chain: u64) -> Option<i64> {
        // One look-up of the chain for the whole walk (this runs for every acknowledgement
        // of a chained row).
        let c = self.chains.get_mut(&chain)?;
        let end = c.base + c.ids.len() as u64;
        while c.frontier < end {
            let seq = c.frontier;
            if let Some((id, r)) = Self::slot_row(&self.rows, c, chain, seq) {
                if matches!(r.state, State::Waiting) {
                    return Some(id);
                }
            }
            c.frontier = seq + 1;
        }
        None
    }

    /// The place of the oldest row of `chain` before `upto` not yet published (`upto` if
    /// none), moving its zone past what is published.
    fn zone(&mut self, chain: u64, upto: u64) -> u64 {
        let Some(c) = self.chains.get_mut(&chain) else {
            return upto;
        };
        while c.zone < upto {
            let seq = c.zone;
            if let Some((_, r)) = Self::slot_row(&self.rows, c, chain, seq) {
                // A tainted row was sent behind a failure: nothing behind it goes, so it never
                // counts as settled.
                if r.tainted || !matches!(r.state, State::Done(Verdict::Published)) {
                    return seq;
                }
            }
            c.zone = seq + 1;
        }
        upto
    }

    /// Rows claimed and not yet committed.
    pub fn in_flight(&self) -> usize {
        self.rows.len()
    }

    pub fn open_batches(&self) -> usize {
        self.batches.len()
    }

    /// Takes a new claim. Returns the rows to hand over now and, if every row was decided at
    /// once, the completed batch.
    ///
    /// `claim_seq` numbers the claim (1, 2, ... in the order claims were started).
    pub fn add_batch(
        &mut self,
        batch: u64,
        claim_seq: u64,
        mut claimed: Vec<Claimed>,
    ) -> (Vec<Handoff>, Vec<Completed>) {
        // In id order, so a row's predecessor within the same batch is registered first.
        claimed.sort_by_key(|c| c.event.id);
        let now = chrono::Utc::now();
        let claimed_at = Instant::now();
        self.clock = claimed_at;
        self.batches.insert(
            batch,
            BatchState {
                rows: claimed.iter().map(|c| c.event.id).collect(),
                open: claimed.len(),
                released: 0,
            },
        );
        let mut out = Vec::new();
        let mut completed_rows = Vec::new();
        for c in claimed {
            self.add_row(batch, c, now, claimed_at, &mut out, &mut completed_rows);
        }
        self.forget_recent_before(claim_seq);
        let mut completed = self.collect_completed(completed_rows);
        let settled = self.batches.get(&batch).is_some_and(|b| b.open == 0);
        if settled && !completed.iter().any(|c| c.batch == batch) {
            // Its last open row was one left to an older claim: nothing decided it, so it
            // completes here.
            completed.push(self.complete(batch));
        }
        (out, completed)
    }

    /// One claimed row: left to an older claim that still holds it, or tracked, placed behind
    /// its predecessor and handed over, deferred or decided as its gate says.
    fn add_row(
        &mut self,
        batch: u64,
        c: Claimed,
        now: chrono::DateTime<chrono::Utc>,
        claimed_at: Instant,
        out: &mut Vec<Handoff>,
        completed_rows: &mut Vec<i64>,
    ) {
        let id = c.event.id;
        if self.left_to_older_claim(batch, id) {
            return;
        }
        let route = self.router.route(&c.event.topic);
        let invalid = c
            .invalid
            .clone()
            .or_else(|| {
                c.event
                    .validate(self.max_payload_bytes)
                    .err()
                    .map(|e| e.to_string())
            })
            .or_else(|| {
                route
                    .is_none()
                    .then(|| self.router.no_route_reason(&c.event.topic))
            });
        if let Some(old) = self.rows.remove(&id) {
            // Its older claim completed: that claim's bookkeeping lets go of it here.
            self.untrack(old.aggregate_key, id);
            self.leave_chain(old.chain);
        }
        // The probe's answer, or the aggregate's latest row still in memory if that is later
        // (or the probe was skipped).
        let key = aggregate_key(&c.event.aggregate_id);
        let prev = match (c.prev, self.tracked_before(key, &c.event.aggregate_id, id)) {
            // A row this relay still tracks goes first; so it does when the database named
            // a row published lately (the claim began before that commit), as an earlier
            // row of the aggregate may still be in flight behind that one.
            (Some(p), Some(t)) if t > p.id || self.recent.contains(&p.id) => {
                Some(tracked_prev(t, now))
            }
            (Some(p), _) => Some(p),
            (None, t) => t.map(|t| tracked_prev(t, now)),
        };
        self.track(key, id);
        // Order first: an invalid row still may not be decided before its predecessor,
        // or a later valid row could be published while an earlier one retries.
        let placement = self.place(id, prev.as_ref(), now);
        let (chain, seq) = self.join_chain(id, &placement);
        let event = c.event;
        self.rows.insert(
            id,
            RowState {
                batch,
                event,
                route,
                invalid: invalid.clone(),
                state: State::Waiting,
                successor: None,
                pred: None,
                tainted: false,
                claimed_at,
                chain,
                seq,
                aggregate_key: key,
            },
        );
        let gate = self.link(id, placement);
        self.start(id, gate, invalid, out, completed_rows);
    }

    /// Links a row behind its predecessor (when it has one here) and says whether it may go.
    fn link(&mut self, id: i64, placement: Placement) -> Gate {
        match placement {
            Placement::Ready => Gate::Go,
            Placement::Behind(prev) => {
                if let Some(p) = self.rows.get_mut(&prev) {
                    p.successor = Some(id);
                }
                if let Some(r) = self.rows.get_mut(&id) {
                    r.pred = Some(prev);
                }
                self.gate(id)
            }
            Placement::Defer(until) => Gate::Defer(until),
        }
    }

    /// Acts on a new row's gate: hand it over, or decide it (an invalid row fails only now, in
    /// its turn, never ahead of its predecessor), or defer it, or leave it waiting.
    fn start(
        &mut self,
        id: i64,
        gate: Gate,
        invalid: Option<String>,
        out: &mut Vec<Handoff>,
        completed_rows: &mut Vec<i64>,
    ) {
        match gate {
            Gate::Wait => {}
            // An invalid row fails only now, in its turn, never ahead of its predecessor.
            Gate::Go => match invalid {
                None => match self.hold(id) {
                    None => out.push(self.hand(id)),
                    Some(v) => self.decide(id, v, out, completed_rows),
                },
                Some(reason) => self.decide(
                    id,
                    Verdict::Failed {
                        attempted: false,
                        reason,
                    },
                    out,
                    completed_rows,
                ),
            },
            Gate::Defer(until) => self.decide(id, Verdict::Deferred(until), out, completed_rows),
        }
    }

    /// A row claimed again while an older claim still tracks it: that claim's session died (a
    /// live claim holds the row locked), or it completed and its commit is not heard of yet.
    /// Only in the second case may the new claim take the row: in the first, its hand-off may
    /// be in flight still, and the row comes back once the old claim is given up. True when
    /// the row is left to the old claim (and counted released in this one).
    fn left_to_older_claim(&mut self, batch: u64, id: i64) -> bool {
        if let Some(old) = self.rows.get(&id) {
            let old_open = self.batches.get(&old.batch).is_some_and(|b| b.open > 0);
            if old_open || !matches!(old.state, State::Done(_)) {
                if let Some(b) = self.batches.get_mut(&batch) {
                    b.rows.retain(|r| *r != id);
                    b.open -= 1;
                    b.released += 1;
                }
                return true;
            }
        }
        false
    }

    /// A claim numbered `claim_seq` has been placed: entries tagged before it are visible to
    /// no claim still to come.
    pub fn forget_recent_before(&mut self, claim_seq: u64) {
        while let Some((tag, id)) = self.recent_order.front().copied() {
            if tag >= claim_seq {
                break;
            }
            self.recent_order.pop_front();
            self.recent.remove(&id);
        }
    }

    /// Entries remembered as recently published (for tests and memory checks).
    pub fn recent_len(&self) -> usize {
        self.recent.len()
    }

    fn place(&self, id: i64, prev: Option<&Prev>, now: chrono::DateTime<chrono::Utc>) -> Placement {
        let Some(p) = prev else {
            return Placement::Ready;
        };
        if let Some(mut ps) = self.rows.get(&p.id) {
            // The database names the nearest *unfinished* earlier row; later rows of the chain
            // may already be committed (gone from memory) or still here: the row goes behind
            // the last one this relay still tracks.
            let mut tail = p.id;
            while let Some(s) = ps.successor {
                match self.rows.get(&s) {
                    Some(next) => {
                        tail = s;
                        ps = next;
                    }
                    None => break,
                }
            }
            if tail >= id {
                // Cannot happen with consistent claims; stay safe and look again soon.
                return Placement::Defer(DeferUntil::Soon);
            }
            return match &ps.state {
                // Published rows too: an earlier row of the chain may still be in flight
                // (pipelined), and the gate must see it.
                State::Waiting | State::Handed { .. } | State::Done(Verdict::Published) => {
                    Placement::Behind(tail)
                }
                State::Done(Verdict::Failed { .. }) => {
                    Placement::Defer(DeferUntil::Predecessor(Prev {
                        id: tail,
                        status: RowStatus::Failed,
                        next_attempt_at: p.next_attempt_at,
                    }))
                }
                State::Done(_) => Placement::Defer(DeferUntil::Soon),
            };
        }
        if self.recent.contains(&p.id) {
            return Placement::Ready;
        }
        if p.status == RowStatus::Failed
            || (p.status == RowStatus::Pending && p.next_attempt_at > now)
        {
            Placement::Defer(DeferUntil::Predecessor(p.clone()))
        } else {
            Placement::Defer(DeferUntil::Soon)
        }
    }

    fn hand(&mut self, id: i64) -> Handoff {
        let token = self.next_token;
        self.next_token += 1;
        let r = self.rows.get_mut(&id).expect("handing a known row");
        r.state = State::Handed {
            token,
            at: self.clock,
        };
        let (backend, format) = r.route.expect("handed rows have a route");
        Handoff {
            backend,
            format,
            event: r.event.clone(),
            batch: r.batch,
            token,
        }
    }

    /// Records a verdict and settles the rows behind it in its chain: a success lets the next
    /// waiting rows go (as far as the gate allows); anything else defers the first waiting
    /// row (and through it the rest) and taints rows already in flight behind it.
    fn decide(&mut self, id: i64, verdict: Verdict, out: &mut Vec<Handoff>, done: &mut Vec<i64>) {
        // Most verdicts settle nothing behind them: the work list allocates only when one does.
        let mut work = Vec::new();
        let mut first = Some((id, verdict));
        while let Some((id, verdict)) = first.take().or_else(|| work.pop()) {
            let Some(r) = self.rows.get_mut(&id) else {
                continue;
            };
            if matches!(r.state, State::Done(_)) {
                continue;
            }
            let ok = matches!(verdict, Verdict::Published);
            let failed = matches!(verdict, Verdict::Failed { .. });
            r.state = State::Done(verdict);
            let (batch, chain, seq) = (r.batch, r.chain, r.seq);
            if let Some(b) = self.batches.get_mut(&batch) {
                b.open -= 1;
                if b.open == 0 {
                    done.push(id);
                }
            }
            if self.closing {
                continue;
            }
            if ok {
                self.hand_on(chain, out, &mut work);
            } else {
                let until = if failed {
                    DeferUntil::Predecessor(Prev {
                        id,
                        status: RowStatus::Failed,
                        next_attempt_at: chrono::Utc::now(),
                    })
                } else {
                    DeferUntil::Soon
                };
                self.settle_behind(chain, seq, until, &mut work);
            }
        }
    }

    /// After a success in `chain`: hands its next waiting rows, as far as the gate allows.
    fn hand_on(&mut self, chain: u64, out: &mut Vec<Handoff>, work: &mut Vec<(i64, Verdict)>) {
        while let Some(s) = self.frontier(chain) {
            match self.gate(s) {
                Gate::Wait => return,
                Gate::Defer(until) => {
                    work.push((s, Verdict::Deferred(until)));
                    return;
                }
                Gate::Go => match self.rows[&s].invalid.clone() {
                    None => {
                        if let Some(v) = self.hold(s) {
                            work.push((s, v));
                            return;
                        }
                        out.push(self.hand(s));
                    }
                    Some(reason) => {
                        work.push((
                            s,
                            Verdict::Failed {
                                attempted: false,
                                reason,
                            },
                        ));
                        return;
                    }
                },
            }
        }
    }

    /// After anything but a success at place `seq` of `chain`: taints the rows in flight
    /// behind it and defers the first waiting one (whose verdict defers the next, and so on).
    fn settle_behind(
        &mut self,
        chain: u64,
        seq: u64,
        until: DeferUntil,
        work: &mut Vec<(i64, Verdict)>,
    ) {
        let end = self
            .chains
            .get(&chain)
            .map_or(0, |c| c.base + c.ids.len() as u64);
        for q in seq + 1..end {
            let Some(id) = self.slot(chain, q) else {
                continue;
            };
            let r = self.rows.get_mut(&id).expect("a slot's row is in memory");
            match r.state {
                State::Handed { .. } | State::Done(Verdict::Published) => r.tainted = true,
                State::Done(_) => return,
                State::Waiting => {
                    work.push((id, Verdict::Deferred(until)));
                    return;
                }
            }
        }
    }

    /// Whether waiting row `s` may be handed now: every earlier row of its chain still in
    /// memory is published or (pipelined, same backend keeping order, same topic) in flight,
    /// `s` is fewer than the window behind the oldest of them not yet acknowledged, and none
    /// of them failed.
    ///
    /// Two rows are looked at, not the whole chain: the one just before `s` (if still in
    /// memory) and the oldest one not yet published (the chain's zone), from which the window
    /// is measured. Rows are handed in order, each compared with the zone's row then, so the
    /// rows in flight share a backend and topic; a failure or retry of any of them tainted
    /// every row in flight behind it and deferred the first waiting one (`settle_behind`),
    /// and a tainted row stops the zone.
    fn gate(&mut self, s: i64) -> Gate {
        let Some(r) = self.rows.get(&s) else {
            return Gate::Wait;
        };
        let (chain, seq) = (r.chain, r.seq);
        if let Some((pid, pr)) = r.pred.and_then(|p| self.rows.get(&p).map(|pr| (p, pr))) {
            if let Some(g) = Self::behind(pid, pr) {
                return g;
            }
        }
        // The oldest row of the chain before `s` not yet settled (the row before `s` may have
        // left memory already: the zone still sees what is in flight before it).
        let zone = self.zone(chain, seq);
        if zone == seq {
            return Gate::Go;
        }
        let Some(zid) = self.slot(chain, zone) else {
            return Gate::Wait;
        };
        let zr = &self.rows[&zid];
        if let Some(g) = Self::behind(zid, zr) {
            return g;
        }
        // The window is the distance from the oldest event not yet acknowledged, not the
        // count in flight: that bounds what can overtake a failing event. What is in flight
        // shares a backend and topic (each was compared with the zone's row when handed), so
        // comparing with the zone's row compares with all of them.
        let r = &self.rows[&s];
        if self.window <= 1 || !self.may_overlap(zr, r) || seq - zone >= self.window as u64 {
            return Gate::Wait;
        }
        Gate::Go
    }

    /// What an earlier row `id` of the chain says about handing a row behind it: `None` if it
    /// is in flight or published cleanly, so the window and the route decide.
    fn behind(id: i64, before: &RowState) -> Option<Gate> {
        if before.tainted {
            return Some(Gate::Defer(DeferUntil::Soon));
        }
        match &before.state {
            State::Done(Verdict::Published) | State::Handed { .. } => None,
            State::Waiting => Some(Gate::Wait),
            State::Done(Verdict::Failed { .. }) => {
                Some(Gate::Defer(DeferUntil::Predecessor(Prev {
                    id,
                    status: RowStatus::Failed,
                    next_attempt_at: chrono::Utc::now(),
                })))
            }
            State::Done(_) => Some(Gate::Defer(DeferUntil::Soon)),
        }
    }

    /// May `r` be sent while `before`, an earlier event of its aggregate, is in flight?
    fn may_overlap(&self, before: &RowState, r: &RowState) -> bool {
        match (before.route, r.route) {
            (Some((b1, _)), Some((b2, _))) => {
                b1 == b2
                    && r.invalid.is_none()
                    && self.ordered.get(b1).copied().unwrap_or(false)
                    && before.event.topic == r.event.topic
            }
            _ => false,
        }
    }

    fn collect_completed(&mut self, rows: Vec<i64>) -> Vec<Completed> {
        let mut batches: Vec<u64> = rows
            .iter()
            .filter_map(|id| self.rows.get(id).map(|r| r.batch))
            .filter(|b| self.batches.get(b).is_some_and(|s| s.open == 0))
            .collect();
        batches.sort_unstable();
        batches.dedup();
        batches.into_iter().map(|b| self.complete(b)).collect()
    }

    fn complete(&mut self, batch: u64) -> Completed {
        let state = self.batches.get(&batch).expect("completing a known batch");
        let mut c = Completed {
            batch,
            ..Default::default()
        };
        c.tally.released += state.released;
        for id in &state.rows {
            let r = &self.rows[id];
            let State::Done(v) = &r.state else { continue };
            let backend = r.route.as_ref().map(|(b, _)| *b);
            match v {
                Verdict::Published => {
                    c.marks.published.push(*id);
                    c.tally.published += 1;
                    c.count(&r.event, backend).published += 1;
                }
                Verdict::Retry {
                    delay,
                    reason,
                    counted,
                } => {
                    c.marks
                        .retry
                        .push((*id, delay.as_secs_f64(), reason.clone(), *counted));
                    c.tally.retried += 1;
                    c.count(&r.event, backend).retried += 1;
                }
                Verdict::Failed { attempted, reason } => {
                    c.marks.failed.push((*id, *attempted, reason.clone()));
                    c.tally.failed += 1;
                    c.count(&r.event, backend).failed += 1;
                }
                Verdict::Deferred(d) => {
                    c.marks.deferred.push((*id, d.clone()));
                    c.tally.deferred += 1;
                }
                Verdict::Released => c.tally.released += 1,
            }
        }
        c
    }

    /// Takes one result from the ACK channel. Results for rows no longer in flight (their
    /// claim was abandoned, or the hand-off timed out) are ignored.
    pub fn on_result(&mut self, ack: AckResult) -> (Vec<Handoff>, Vec<Completed>) {
        self.on_result_at(ack, Instant::now())
    }

    /// As [`Dispatcher::on_result`], read at `now`.
    pub fn on_result_at(&mut self, ack: AckResult, now: Instant) -> (Vec<Handoff>, Vec<Completed>) {
        let (mut out, mut completed) = (Vec::new(), Vec::new());
        self.on_result_into(ack, now, &mut out, &mut completed);
        (out, completed)
    }

    /// As [`Dispatcher::on_result_at`], adding to the caller's lists: the relay reads results
    /// in runs and hands on what they free in one burst, with no lists per result.
    pub fn on_result_into(
        &mut self,
        ack: AckResult,
        now: Instant,
        out: &mut Vec<Handoff>,
        completed: &mut Vec<Completed>,
    ) {
        self.clock = now;
        // Even a late answer to an abandoned hand-off shows the backend is there.
        if ack.outcome.is_ok() {
            if let Some(t) = self.last_success.get_mut(ack.backend) {
                *t = Some(now);
            }
        }
        let mut done = Vec::new();
        let Some(r) = self.rows.get(&ack.row_id) else {
            return;
        };
        match r.state {
            State::Handed { token, .. } if token == ack.token => {}
            _ => return,
        }
        let attempts = r.event.attempts as u32 + 1;
        let backend = ack.backend;
        let verdict = match ack.outcome {
            Ok(()) => {
                if let Some(o) = self.outage.get_mut(backend) {
                    o.rounds = 0;
                }
                Verdict::Published
            }
            Err(e) => self.failure_verdict(backend, attempts, e.kind, e.reason),
        };
        self.decide(ack.row_id, verdict, out, &mut done);
        if !done.is_empty() {
            completed.extend(self.collect_completed(done));
        }
    }

    fn failure_verdict(
        &mut self,
        backend: usize,
        attempts: u32,
        kind: ErrorKind,
        reason: String,
    ) -> Verdict {
        match kind {
            ErrorKind::Unavailable => {
                // Waits for the broker, however long: the delay grows with the outage (per
                // backend, reset by the next success) up to OUTAGE_RETRY_MAX, so the backlog
                // is looked at again promptly once the broker is back.
                let rounds = self
                    .outage
                    .get(backend)
                    .map_or(0, |o| o.rounds)
                    .saturating_add(1);
                let delay = self.outage_delay(rounds);
                let now = Instant::now();
                if let Some(o) = self.outage.get_mut(backend) {
                    o.rounds = rounds;
                    // The first unanswered result starts the wait for the next probe; results
                    // of events already in flight do not push it further.
                    if o.next_probe <= now {
                        o.next_probe = now + delay;
                    }
                }
                Verdict::Retry {
                    delay,
                    reason: format!("waiting for the broker: {reason}"),
                    counted: false,
                }
            }
            ErrorKind::Retryable if attempts < self.max_attempts => Verdict::Retry {
                delay: self.backoff.delay(attempts),
                reason,
                counted: true,
            },
            ErrorKind::Retryable => Verdict::Failed {
                attempted: true,
                reason: format!("gave up after {attempts} attempts: {reason}"),
            },
            ErrorKind::Permanent => Verdict::Failed {
                attempted: true,
                reason,
            },
        }
    }

    /// Hand-offs without a result after `timeout` count as unavailable: nothing was heard
    /// about the event, so no attempt is counted.
    pub fn expire(&mut self, timeout: Duration) -> (Vec<Handoff>, Vec<Completed>) {
        let now = Instant::now();
        self.clock = now;
        let expired: Vec<(i64, u32, usize)> = self
            .rows
            .iter()
            .filter_map(|(id, r)| match r.state {
                State::Handed { at, .. } if now.duration_since(at) >= timeout => Some((
                    *id,
                    r.event.attempts as u32 + 1,
                    r.route.map_or(0, |(b, _)| b),
                )),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (id, attempts, backend) in expired {
            // No answer at all: nothing was learned about the event.
            let v = self.failure_verdict(
                backend,
                attempts,
                ErrorKind::Unavailable,
                format!("no acknowledgement within {timeout:?}"),
            );
            self.decide(id, v, &mut out, &mut done);
        }
        let completed = self.collect_completed(done);
        (out, completed)
    }

    /// Releases the rows of claims open longer than `age` that are still waiting behind an
    /// earlier event (a long chain of one aggregate), so no claim stays open past its
    /// session's idle timeout: the claim completes once its hand-offs are answered, and the
    /// released rows are claimed again.
    pub fn release_stale(&mut self, age: Duration) -> (Vec<Handoff>, Vec<Completed>) {
        let now = Instant::now();
        self.clock = now;
        let mut stale: Vec<i64> = self
            .rows
            .iter()
            .filter(|(_, r)| {
                matches!(r.state, State::Waiting) && now.duration_since(r.claimed_at) >= age
            })
            .map(|(id, _)| *id)
            .collect();
        stale.sort_unstable();
        let mut out = Vec::new();
        let mut done = Vec::new();
        for id in stale {
            self.decide(id, Verdict::Released, &mut out, &mut done);
        }
        let completed = self.collect_completed(done);
        (out, completed)
    }

    /// Gives up on every undecided row (shutdown): they are released unchanged, and every open
    /// batch completes with what it has.
    pub fn release_all(&mut self) -> Vec<Completed> {
        let mut undecided: Vec<i64> = self
            .rows
            .iter()
            .filter(|(_, r)| !matches!(r.state, State::Done(_)))
            .map(|(id, _)| *id)
            .collect();
        undecided.sort_unstable();
        let mut out = Vec::new();
        let mut done = Vec::new();
        // Nothing behind a released row may be handed or deferred: release, never publish,
        // on the way out.
        self.closing = true;
        for id in undecided {
            self.decide(id, Verdict::Released, &mut out, &mut done);
        }
        debug_assert!(out.is_empty());
        self.collect_completed(done)
    }

    /// The batch's transaction ended: committed (`ok`) or lost (its rows are pending again in
    /// the database). Forgets its rows. Every row was decided, and every decision already
    /// settled the row's successor, so nothing else waits on them.
    pub fn finished(&mut self, batch: u64, ok: bool, claims_started: u64) {
        let Some(state) = self.batches.remove(&batch) else {
            return;
        };
        for id in &state.rows {
            if let Some(r) = self.rows.remove(id) {
                // The row may already belong to a newer claim: a claim that ran after this
                // commit can take it again before the loop hears of the commit.
                if r.batch != batch {
                    self.rows.insert(*id, r);
                    continue;
                }
                self.untrack(r.aggregate_key, *id);
                self.leave_chain(r.chain);
                if ok && matches!(r.state, State::Done(Verdict::Published)) {
                    self.recent.insert(*id);
                    self.recent_order.push_back((claims_started, *id));
                }
            }
        }
    }

    /// A row of `chain` left memory: the holes at its front go, and so does the chain once
    /// no row of it is left.
    fn leave_chain(&mut self, chain: u64) {
        let Some(c) = self.chains.get_mut(&chain) else {
            return;
        };
        c.members = c.members.saturating_sub(1);
        if c.members == 0 {
            self.chains.remove(&chain);
            return;
        }
        while let Some(&id) = c.ids.front() {
            let held = self
                .rows
                .get(&id)
                .is_some_and(|r| r.chain == chain && r.seq == c.base);
            if held {
                break;
            }
            c.ids.pop_front();
            c.base += 1;
        }
        c.zone = c.zone.max(c.base);
        c.frontier = c.frontier.max(c.base);
    }
}

/// A row this relay tracks, as a predecessor.
fn tracked_prev(id: i64, now: chrono::DateTime<chrono::Utc>) -> Prev {
    Prev {
        id,
        status: RowStatus::Pending,
        next_attempt_at: now,
    }
}

/// A hash of an aggregate id, for `by_aggregate`. Rows whose ids share one are told apart
/// by comparing the ids (`tracked_before`), so a fast hash does; the keys never leave memory.
fn aggregate_key(aggregate: &str) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(aggregate)
}

enum Placement {
    Ready,
    Behind(i64),
    Defer(DeferUntil),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;
    use crate::envelope::sample_event;
    use crate::publisher::PublishError;
    use chrono::Utc;

    fn dispatcher(max_attempts: u32) -> Dispatcher {
        let router = Router::new(
            &[RouteConfig {
                topic: "orders.*".into(),
                backend: "m".into(),
                format: BodyFormat::Raw,
            }],
            &["m".to_string()],
        );
        Dispatcher::new(
            Arc::new(router),
            Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            max_attempts,
            1024,
        )
    }

    fn row(id: i64, agg: &str, prev: Option<i64>) -> Claimed {
        Claimed {
            event: Arc::new(sample_event(id, agg)),
            invalid: None,
            prev: prev.map(|p| Prev {
                id: p,
                status: RowStatus::Pending,
                next_attempt_at: Utc::now() - chrono::Duration::seconds(1),
            }),
        }
    }

    fn ack(h: &Handoff, outcome: Result<(), PublishError>) -> AckResult {
        AckResult {
            row_id: h.event.id,
            token: h.token,
            outcome,
            at: Utc::now(),
            handed_at: Utc::now(),
            backend: h.backend,
            occurred_at: Some(h.event.occurred_at),
        }
    }

    fn ids(h: &[Handoff]) -> Vec<i64> {
        h.iter().map(|h| h.event.id).collect()
    }

    fn chain_of(first: i64, n: i64, agg: &str) -> Vec<Claimed> {
        (first..first + n)
            .map(|id| row(id, agg, (id > first).then_some(id - 1)))
            .collect()
    }

    #[test]
    fn pipelined_rows_go_up_to_the_window_behind_the_oldest_unacknowledged() {
        let mut d = dispatcher(5).pipelined(3, vec![true]);
        let (out, _) = d.add_batch(1, 1, chain_of(1, 10, "a"));
        assert_eq!(ids(&out), vec![1, 2, 3]);
        // A later row acknowledged first moves nothing: the window counts from the oldest.
        let (more, _) = d.on_result(ack(&out[1], Ok(())));
        assert!(more.is_empty());
        // The oldest acknowledged: 2 is acknowledged too, so the window moves by two.
        let (more, _) = d.on_result(ack(&out[0], Ok(())));
        assert_eq!(ids(&more), vec![4, 5]);
        // Rows of a later claim join the same chain and the same window.
        let (later, _) = d.add_batch(2, 2, chain_of(11, 2, "a"));
        assert!(later.is_empty());
        let mut queue: VecDeque<Handoff> = more.into();
        queue.push_front(out.into_iter().nth(2).unwrap());
        let mut order = Vec::new();
        while let Some(h) = queue.pop_front() {
            order.push(h.event.id);
            let (next, _) = d.on_result(ack(&h, Ok(())));
            queue.extend(next);
        }
        assert_eq!(order, vec![3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn a_waiting_row_goes_when_its_predecessor_left_memory_before_the_oldest_was_acked() {
        // Row 2's claim completes (2 acknowledged) while row 1 is still in flight; row 3 waits
        // behind the full window. Row 1's acknowledgement must still let row 3 go.
        let mut d = dispatcher(5).pipelined(2, vec![true]);
        let (h1, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
        let (h2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1))]);
        assert_eq!(ids(&h2), vec![2]);
        let (h3, _) = d.add_batch(3, 3, vec![row(3, "a", Some(2))]);
        assert!(h3.is_empty(), "window of 2 is full");
        let (none, done) = d.on_result(ack(&h2[0], Ok(())));
        assert!(none.is_empty());
        assert_eq!(done.len(), 1, "row 2's claim completes");
        d.finished(2, true, 3);
        let (h3, _) = d.on_result(ack(&h1[0], Ok(())));
        assert_eq!(ids(&h3), vec![3]);
    }

    fn moved_to(mut c: Claimed, topic: &str) -> Claimed {
        Arc::make_mut(&mut c.event).topic = topic.into();
        c
    }

    #[test]
    fn a_row_on_another_topic_waits_for_everything_before_it_even_across_a_hole() {
        // Rows 1-3 in flight on one topic, each in its own claim; row 4 (another topic) may
        // overlap none of them. Row 3's claim ends early, leaving a hole before row 4.
        let mut d = dispatcher(5).pipelined(3, vec![true]);
        let (h1, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
        let (h2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1))]);
        let (h3, _) = d.add_batch(3, 3, vec![row(3, "a", Some(2))]);
        let (h4, _) = d.add_batch(4, 4, vec![moved_to(row(4, "a", Some(3)), "orders.other")]);
        assert!(h4.is_empty());
        let (none, done) = d.on_result(ack(&h3[0], Ok(())));
        assert!(none.is_empty());
        assert_eq!(done.len(), 1);
        d.finished(3, true, 4);
        let (none, _) = d.on_result(ack(&h2[0], Ok(())));
        assert!(
            none.is_empty(),
            "row 1 is still in flight on the other topic"
        );
        let (h4, _) = d.on_result(ack(&h1[0], Ok(())));
        assert_eq!(ids(&h4), vec![4]);
    }

    #[test]
    fn a_row_that_cannot_overlap_goes_once_everything_before_it_is_published_despite_a_hole() {
        let mut d = dispatcher(5).pipelined(4, vec![true]);
        let (h1, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
        let (h2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1))]);
        let (h3, _) = d.add_batch(
            3,
            3,
            vec![
                row(3, "a", Some(2)),
                moved_to(row(4, "a", Some(3)), "orders.other"),
            ],
        );
        assert_eq!(ids(&h3), vec![3]);
        let (_, done) = d.on_result(ack(&h2[0], Ok(())));
        assert_eq!(done.len(), 1);
        d.on_result(ack(&h3[0], Ok(())));
        d.finished(2, true, 4);
        let (h4, _) = d.on_result(ack(&h1[0], Ok(())));
        assert_eq!(
            ids(&h4),
            vec![4],
            "not left waiting until released as stale"
        );
    }

    #[test]
    fn a_row_behind_one_sent_past_a_failure_is_deferred_even_after_the_failure_left_memory() {
        let mut d = dispatcher(5).pipelined(2, vec![true]);
        let (h1, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
        let (h2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1))]);
        assert_eq!(ids(&h2), vec![2]);
        let (_, done) = d.on_result(ack(&h1[0], Err(PublishError::retryable("try again"))));
        assert_eq!(done.len(), 1);
        d.finished(1, true, 2);
        // Row 2 was sent before row 1's retry: published, but tainted.
        d.on_result(ack(&h2[0], Ok(())));
        let (h3, done) = d.add_batch(3, 3, vec![row(3, "a", Some(1))]);
        assert!(h3.is_empty(), "row 3 must not overtake row 1's retry");
        assert_eq!(done.len(), 1);
        let deferred: Vec<i64> = done[0].marks.deferred.iter().map(|(id, _)| *id).collect();
        assert_eq!(deferred, vec![3]);
    }

    #[test]
    fn rows_claimed_again_leave_no_chain_behind() {
        let mut d = dispatcher(5);
        let (h, _) = d.add_batch(1, 1, vec![row(1, "a", None), row(2, "a", Some(1))]);
        let (_, done) = d.on_result(ack(&h[0], Err(PublishError::retryable("try again"))));
        assert_eq!(
            done.len(),
            1,
            "row 2 deferred behind row 1: the claim completes"
        );
        // Claimed again before the first claim's end is heard of.
        let (h, _) = d.add_batch(2, 2, vec![row(1, "a", None), row(2, "a", Some(1))]);
        assert_eq!(ids(&h), vec![1]);
        d.finished(1, true, 2);
        let (h2, _) = d.on_result(ack(&h[0], Ok(())));
        let (_, done) = d.on_result(ack(&h2[0], Ok(())));
        assert_eq!(done.len(), 1);
        d.finished(2, true, 3);
        assert_eq!(d.in_flight(), 0);
        assert!(d.chains.is_empty(), "{:?}", d.chains);
        assert!(d.by_aggregate.is_empty());
    }

    #[test]
    fn a_pipelined_failure_taints_what_is_in_flight_and_defers_what_waits() {
        let mut d = dispatcher(5).pipelined(2, vec![true]);
        let (out, _) = d.add_batch(1, 1, chain_of(1, 4, "a"));
        assert_eq!(ids(&out), vec![1, 2]);
        let (more, _) = d.on_result(ack(
            &out[0],
            Err(PublishError::permanent("too large".to_string())),
        ));
        assert!(more.is_empty());
        // Row 2 was in flight: its success hands nothing behind the failed row.
        let (more, done) = d.on_result(ack(&out[1], Ok(())));
        assert!(more.is_empty());
        assert_eq!(done.len(), 1);
        let m = &done[0].marks;
        assert_eq!(m.failed.len(), 1);
        assert_eq!(m.published, vec![2]);
        let deferred: Vec<i64> = m.deferred.iter().map(|(id, _)| *id).collect();
        assert_eq!(deferred, vec![3, 4]);
        assert!(matches!(
            m.deferred[0].1,
            DeferUntil::Predecessor(Prev { id: 1, .. })
        ));
    }

    #[test]
    fn heads_go_at_once_and_followers_wait_for_the_predecessor_ack() {
        let mut d = dispatcher(5);
        let (out, done) = d.add_batch(
            1,
            1,
            vec![row(1, "a", None), row(2, "a", Some(1)), row(3, "b", None)],
        );
        assert_eq!(ids(&out), vec![1, 3]);
        assert!(done.is_empty());
        let (out2, _) = d.on_result(ack(&out[0], Ok(())));
        assert_eq!(ids(&out2), vec![2]);
        let (_, done) = d.on_result(ack(&out[1], Ok(())));
        assert!(done.is_empty());
        let (_, done) = d.on_result(ack(&out2[0], Ok(())));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].marks.published.len(), 3);
    }

    #[test]
    fn a_completed_batch_counts_its_verdicts_per_topic_and_backend() {
        let mut d = dispatcher(5);
        let mut other = row(3, "c", None);
        Arc::make_mut(&mut other.event).topic = "orders.paid".into();
        let mut unrouted = row(4, "d", None);
        Arc::make_mut(&mut unrouted.event).topic = "nowhere".into();
        let (out, _) = d.add_batch(
            1,
            1,
            vec![row(1, "a", None), row(2, "b", None), other, unrouted],
        );
        d.on_result(ack(&out[0], Ok(())));
        d.on_result(ack(&out[1], Err(PublishError::retryable("slow"))));
        let (_, done) = d.on_result(ack(&out[2], Err(PublishError::permanent("no"))));
        let mut by: Vec<_> = done[0]
            .by_topic
            .iter()
            .map(|t| {
                (
                    t.topic.as_str(),
                    t.backend,
                    t.published,
                    t.retried,
                    t.failed,
                )
            })
            .collect();
        by.sort();
        let first = out[0].event.topic.as_str();
        assert_eq!(
            by,
            vec![
                ("nowhere", None, 0, 0, 1),
                (first, Some(0), 1, 1, 0),
                ("orders.paid", Some(0), 0, 0, 1),
            ]
        );
    }

    #[test]
    fn a_retry_defers_the_followers_instead_of_publishing_them() {
        let mut d = dispatcher(5);
        let (out, _) = d.add_batch(
            1,
            1,
            vec![
                row(1, "a", None),
                row(2, "a", Some(1)),
                row(3, "a", Some(2)),
            ],
        );
        assert_eq!(ids(&out), vec![1]);
        let (more, done) = d.on_result(ack(&out[0], Err(PublishError::retryable("timeout"))));
        assert!(more.is_empty());
        let m = &done[0].marks;
        assert_eq!(m.retry.len(), 1);
        assert_eq!(m.deferred.len(), 2);
        assert!(m.published.is_empty());
    }

    #[test]
    fn a_permanent_failure_holds_the_next_event_behind_it() {
        let mut d = dispatcher(5);
        let (out, _) = d.add_batch(1, 1, vec![row(1, "a", None), row(2, "a", Some(1))]);
        let (_, done) = d.on_result(ack(&out[0], Err(PublishError::permanent("too large"))));
        let m = &done[0].marks;
        assert_eq!(m.failed[0].0, 1);
        assert!(
            matches!(&m.deferred[0], (2, DeferUntil::Predecessor(p)) if p.id == 1 && p.status == RowStatus::Failed)
        );
    }

    #[test]
    fn retryable_errors_fail_the_row_after_max_attempts() {
        let mut d = dispatcher(2);
        let mut r = row(1, "a", None);
        Arc::make_mut(&mut r.event).attempts = 1;
        let (out, _) = d.add_batch(1, 1, vec![r]);
        let (_, done) = d.on_result(ack(&out[0], Err(PublishError::retryable("down"))));
        let (_, attempted, reason) = &done[0].marks.failed[0];
        assert!(attempted);
        assert!(
            reason.contains("2 attempts") && reason.contains("down"),
            "{reason}"
        );
    }

    #[test]
    fn an_unavailable_broker_never_uses_attempts_up() {
        let mut d = dispatcher(2);
        let mut r = row(1, "a", None);
        Arc::make_mut(&mut r.event).attempts = 7;
        let (out, _) = d.add_batch(1, 1, vec![r]);
        let (_, done) = d.on_result(ack(
            &out[0],
            Err(PublishError::unavailable("not connected")),
        ));
        let m = &done[0].marks;
        assert!(m.failed.is_empty());
        let (id, delay, reason, counted) = &m.retry[0];
        assert_eq!(*id, 1);
        assert!(!counted, "no attempt counted");
        assert!(*delay <= OUTAGE_RETRY_MAX.as_secs_f64());
        assert!(reason.contains("waiting for the broker"), "{reason}");
    }

    /// Backend "n" takes `orders.*`, backend "k" everything else.
    fn two_backends(backoff: Backoff) -> Dispatcher {
        let route = |topic: &str, backend: &str| RouteConfig {
            topic: topic.into(),
            backend: backend.into(),
            format: BodyFormat::Raw,
        };
        let router = Router::new(
            &[route("orders.*", "n"), route("*", "k")],
            &["n".to_string(), "k".to_string()],
        );
        Dispatcher::new(Arc::new(router), backoff, 3, 1024)
    }

    /// Two backends, "n" down: its first event (row 1, aggregate "down") was answered
    /// "unavailable".
    fn with_n_down(backoff: Backoff) -> Dispatcher {
        let mut d = two_backends(backoff);
        let (out, _) = d.add_batch(1, 1, vec![on_topic(1, "down", "orders.x")]);
        d.on_result(ack(
            &out[0],
            Err(PublishError::unavailable("not connected")),
        ));
        d
    }

    fn on_topic(id: i64, agg: &str, topic: &str) -> Claimed {
        let mut r = row(id, agg, None);
        Arc::make_mut(&mut r.event).topic = topic.into();
        r
    }

    #[test]
    fn a_backend_that_is_down_is_not_asked_again_until_its_probe_while_others_flow() {
        let mut d = with_n_down(Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(10),
        ));
        assert!(
            !d.brokers_unavailable(),
            "the other backend was never asked"
        );
        // Within the outage delay: backend n's rows are rescheduled without an attempt and
        // without a hand-off; backend k's go.
        let (out, done) = d.add_batch(
            2,
            2,
            vec![
                on_topic(2, "b", "orders.x"),
                on_topic(3, "c", "payments.x"),
                on_topic(4, "d", "orders.y"),
            ],
        );
        assert_eq!(ids(&out), vec![3]);
        assert_eq!(out[0].backend, 1);
        assert_eq!(d.held_back(), 2);
        assert!(done.is_empty(), "row 3 is still in flight");
        let (_, done) = d.on_result(ack(&out[0], Ok(())));
        let m = &done[0].marks;
        assert_eq!(m.published, vec![3]);
        let mut held: Vec<_> = m.retry.iter().map(|r| (r.0, r.3)).collect();
        held.sort();
        assert_eq!(held, vec![(2, false), (4, false)], "held back uncounted");
        assert!(m
            .retry
            .iter()
            .all(|r| r.2.contains("backend n is unavailable")));
        // The other backend's success says nothing about n: its rows still wait.
        let (out, _) = d.add_batch(3, 3, vec![on_topic(5, "e", "orders.x")]);
        assert!(out.is_empty());
        // Both down: the relay spaces its claims.
        let (out, _) = d.add_batch(4, 4, vec![on_topic(6, "f", "payments.x")]);
        d.on_result(ack(
            &out[0],
            Err(PublishError::unavailable("all brokers down")),
        ));
        assert!(d.brokers_unavailable());
    }

    #[test]
    fn after_the_outage_delay_one_probe_goes_and_its_success_ends_the_outage() {
        // No delay at all: every claim may probe.
        let mut d = with_n_down(Backoff::new(Duration::ZERO, Duration::ZERO));
        let (out, _) = d.add_batch(2, 2, vec![on_topic(2, "b", "orders.x")]);
        assert_eq!(ids(&out), vec![2], "the probe");
        d.on_result(ack(&out[0], Ok(())));
        let (out, _) = d.add_batch(
            3,
            3,
            vec![on_topic(3, "c", "orders.x"), on_topic(4, "d", "orders.x")],
        );
        assert_eq!(ids(&out), vec![3, 4], "back: everything goes");
        assert_eq!(d.held_back(), 0);
    }

    #[test]
    fn in_flight_only_to_a_backend_that_is_down_is_known() {
        let mut d = with_n_down(Backoff::new(Duration::ZERO, Duration::ZERO));
        let none: &[String] = &[];
        let quiet = Duration::from_secs(2);
        let later = Instant::now() + quiet;
        assert!(
            !d.only_unreachable_in_flight(none, later, quiet),
            "nothing in flight"
        );
        // The probe to n, which is down, and an event to k, which is not.
        let (out, _) = d.add_batch(
            2,
            2,
            vec![on_topic(2, "b", "orders.x"), on_topic(3, "c", "payments.x")],
        );
        assert_eq!(ids(&out), vec![2, 3]);
        assert!(
            !d.only_unreachable_in_flight(none, later, quiet),
            "k's answer may still come"
        );
        assert!(
            d.only_unreachable_in_flight(&["k".to_string()], later, quiet),
            "k's health probe failed and k never answered: nothing is coming"
        );
        let k_answered = Instant::now();
        d.on_result_at(ack(&out[1], Ok(())), k_answered);
        assert!(
            d.only_unreachable_in_flight(none, later, quiet),
            "only the probe to n is left"
        );
        // n answers: it is back.
        d.on_result(ack(&out[0], Ok(())));
        assert!(!d.only_unreachable_in_flight(none, later, quiet));
        // A failed probe says nothing while the backend delivered lately (the probe is older,
        // or timed out on something else): only a silence of `quiet` counts.
        let (out, _) = d.add_batch(3, 3, vec![on_topic(4, "e", "payments.x")]);
        assert_eq!(ids(&out), vec![4]);
        let k = ["k".to_string()];
        assert!(!d.only_unreachable_in_flight(&k, k_answered, quiet));
        assert!(d.only_unreachable_in_flight(&k, k_answered + quiet, quiet));
    }

    #[test]
    fn a_held_back_row_defers_the_rest_of_its_chain() {
        let mut d = with_n_down(Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(10),
        ));
        let mut second = on_topic(3, "a", "orders.x");
        second.prev = Some(Prev {
            id: 2,
            status: RowStatus::Pending,
            next_attempt_at: Utc::now() - chrono::Duration::seconds(1),
        });
        let (out, done) = d.add_batch(2, 2, vec![on_topic(2, "a", "orders.x"), second]);
        assert!(out.is_empty());
        let m = &done[0].marks;
        assert_eq!(m.retry.len(), 1);
        assert_eq!(m.retry[0].0, 2);
        assert_eq!(m.deferred.len(), 1);
        assert_eq!(m.deferred[0].0, 3);
    }

    #[test]
    fn a_row_without_a_probe_still_waits_behind_its_aggregates_rows_in_memory() {
        // The claim skipped the probe (prev None), but an earlier row of the aggregate is in
        // flight from an earlier claim, and another waits in this one.
        let mut d = dispatcher(5);
        let (out, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
        assert_eq!(ids(&out), vec![1]);
        let (out2, _) = d.add_batch(
            2,
            2,
            vec![row(5, "a", None), row(7, "a", None), row(6, "b", None)],
        );
        assert_eq!(ids(&out2), vec![6], "5 and 7 wait behind 1");
        let (more, _) = d.on_result(ack(&out[0], Ok(())));
        assert_eq!(ids(&more), vec![5]);
        let (more, _) = d.on_result(ack(&more[0], Ok(())));
        assert_eq!(ids(&more), vec![7]);
        // A failure of the head defers what waits behind it, as with a probed predecessor.
        let (out3, _) = d.add_batch(3, 3, vec![row(10, "c", None)]);
        let (_, _) = d.add_batch(4, 4, vec![row(11, "c", None)]);
        let (_, done) = d.on_result(ack(&out3[0], Err(PublishError::permanent("no"))));
        let held: Vec<i64> = done
            .iter()
            .flat_map(|c| c.marks.deferred.iter().map(|(id, _)| *id))
            .collect();
        assert_eq!(held, vec![11]);
    }

    #[test]
    fn followers_in_a_later_batch_chain_behind_rows_in_flight() {
        let mut d = dispatcher(5);
        let (out, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
        let (out2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1)), row(5, "b", None)]);
        assert_eq!(ids(&out2), vec![5]);
        let (out3, done) = d.on_result(ack(&out[0], Ok(())));
        assert_eq!(ids(&out3), vec![2]);
        assert_eq!(done[0].batch, 1);
        // Heard of batch 1's commit while claim 3 was already running.
        d.finished(1, true, 3);
        // Claim 3 still saw row 1: it is known as published.
        let (out4, _) = d.add_batch(3, 3, vec![row(9, "c", Some(1))]);
        assert_eq!(ids(&out4), vec![9]);
        assert_eq!(d.recent_len(), 1);
        // Claim 4 started after the commit was heard of: the entry is no longer needed.
        d.add_batch(4, 4, vec![]);
        assert_eq!(d.recent_len(), 0);
    }

    #[test]
    fn a_predecessor_held_elsewhere_defers_the_row() {
        let mut d = dispatcher(5);
        let (out, done) = d.add_batch(1, 1, vec![row(4, "a", Some(3))]);
        assert!(out.is_empty());
        assert!(matches!(done[0].marks.deferred[0].1, DeferUntil::Soon));
        let mut failed = row(6, "b", Some(5));
        failed.prev.as_mut().unwrap().status = RowStatus::Failed;
        let (_, done) = d.add_batch(2, 2, vec![failed]);
        assert!(matches!(
            done[0].marks.deferred[0].1,
            DeferUntil::Predecessor(_)
        ));
    }

    #[test]
    fn invalid_rows_fail_without_a_hand_off_and_unrouted_topics_name_the_topic() {
        let mut d = dispatcher(5);
        let mut bad = row(1, "a", None);
        Arc::make_mut(&mut bad.event).topic = "orders.ünicode".into();
        let mut unrouted = row(2, "b", None);
        Arc::make_mut(&mut unrouted.event).topic = "billing.x".into();
        let (out, done) = d.add_batch(1, 1, vec![bad, unrouted, row(3, "c", None)]);
        assert_eq!(ids(&out), vec![3]);
        assert!(done.is_empty());
        let (_, done) = d.on_result(ack(&out[0], Ok(())));
        let f = &done[0].marks.failed;
        assert!(f[0].2.contains("position 8"), "{}", f[0].2);
        assert!(
            f[1].2.contains("billing.x") && f[1].2.contains("no route"),
            "{}",
            f[1].2
        );
        assert!(!f[0].1);
    }

    #[test]
    fn timeouts_count_as_retryable_and_late_results_are_ignored() {
        let mut d = dispatcher(5);
        let (out, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
        let (_, done) = d.expire(Duration::ZERO);
        assert_eq!(done[0].marks.retry.len(), 1);
        let (more, done) = d.on_result(ack(&out[0], Ok(())));
        assert!(more.is_empty() && done.is_empty());
    }

    #[test]
    fn a_commit_heard_after_the_row_was_claimed_again_leaves_the_new_claim_alone() {
        let mut d = dispatcher(5);
        let (_, done) = d.add_batch(1, 1, vec![row(4, "a", Some(3))]);
        assert_eq!(done.len(), 1, "deferred at once");
        // Batch 1 committed; a new claim took row 4 again before the loop heard of the commit.
        let (out, _) = d.add_batch(2, 2, vec![row(4, "a", None)]);
        d.finished(1, true, 2);
        assert_eq!(d.in_flight(), 1, "row 4 still tracked for batch 2");
        let (_, done) = d.on_result(ack(&out[0], Ok(())));
        assert_eq!(done[0].batch, 2);
        assert_eq!(done[0].marks.published, vec![4]);
    }

    #[test]
    fn release_all_completes_open_batches_without_handing_successors() {
        let mut d = dispatcher(5);
        let (out, _) = d.add_batch(
            1,
            1,
            vec![row(1, "a", None), row(2, "a", Some(1)), row(3, "b", None)],
        );
        d.on_result(ack(&out[1], Ok(())));
        let done = d.release_all();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].marks.published, vec![3]);
        assert_eq!(done[0].tally.released, 2);
    }
}
