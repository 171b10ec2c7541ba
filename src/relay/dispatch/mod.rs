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

mod chains;
mod intake;
mod outage;
mod results;
mod verdicts;

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

    /// Rows claimed and not yet committed.
    pub fn in_flight(&self) -> usize {
        self.rows.len()
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
mod tests;
