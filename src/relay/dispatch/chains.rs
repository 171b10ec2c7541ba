//! The rows of each aggregate in memory: which are tracked (for predecessors without a
//! probe), and the chains a row waits in, with where the next row to hand is and how far the
//! oldest unacknowledged row is behind it.

use super::*;

impl Dispatcher {
    /// The latest row of `aggregate` before `id` this relay tracks.
    pub(super) fn tracked_before(&self, key: u64, aggregate: &str, id: i64) -> Option<i64> {
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

    pub(super) fn track(&mut self, key: u64, id: i64) {
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

    pub(super) fn untrack(&mut self, key: u64, id: i64) {
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
    pub(super) fn join_chain(&mut self, id: i64, placement: &Placement) -> (u64, u64) {
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
    pub(super) fn slot(&self, chain: u64, seq: u64) -> Option<i64> {
        let c = self.chains.get(&chain)?;
        Self::slot_row(&self.rows, c, chain, seq).map(|(id, _)| id)
    }

    /// The row in slot `seq` of chain `c` (numbered `chain`), with its id, if it is still in
    /// memory: a slot whose row left memory, or was claimed again into another chain, is a
    /// hole.
    pub(super) fn slot_row<'a>(
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
    pub(super) fn frontier(&mut self, chain: u64) -> Option<i64> {
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
    pub(super) fn zone(&mut self, chain: u64, upto: u64) -> u64 {
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

    /// A row of `chain` left memory: the holes at its front go, and so does the chain once
    /// no row of it is left.
    pub(super) fn leave_chain(&mut self, chain: u64) {
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
