//! Taking in a claim: each row tracked, placed behind its predecessor (or deferred), and
//! handed over, decided or left waiting as its gate says.

use super::*;

impl Dispatcher {
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
                // Filled by `add_row` with the rows this claim tracks (not those it leaves to
                // an older claim).
                rows: Vec::with_capacity(claimed.len()),
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
    pub(super) fn add_row(
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
        if let Some(b) = self.batches.get_mut(&batch) {
            b.rows.push(id);
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
                invalid,
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
        self.start(id, gate, out, completed_rows);
    }

    /// Links a row behind its predecessor (when it has one here) and says whether it may go.
    pub(super) fn link(&mut self, id: i64, placement: Placement) -> Gate {
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
    pub(super) fn start(
        &mut self,
        id: i64,
        gate: Gate,
        out: &mut Vec<Handoff>,
        completed_rows: &mut Vec<i64>,
    ) {
        match gate {
            Gate::Wait => {}
            Gate::Go => match self.go(id) {
                Ok(handoff) => out.push(handoff),
                Err(v) => self.decide(id, v, out, completed_rows),
            },
            Gate::Defer(until) => self.decide(id, Verdict::Deferred(until), out, completed_rows),
        }
    }

    /// A row claimed again while an older claim still tracks it: that claim's session died (a
    /// live claim holds the row locked), or it completed and its commit is not heard of yet.
    /// Only in the second case may the new claim take the row: in the first, its hand-off may
    /// be in flight still, and the row comes back once the old claim is given up. True when
    /// the row is left to the old claim (and counted released in this one).
    pub(super) fn left_to_older_claim(&mut self, batch: u64, id: i64) -> bool {
        if let Some(old) = self.rows.get(&id) {
            let old_open = self.batches.get(&old.batch).is_some_and(|b| b.open > 0);
            if old_open || !matches!(old.state, State::Done(_)) {
                if let Some(b) = self.batches.get_mut(&batch) {
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

    /// Entries remembered as recently published (for the memory checks in tests).
    #[cfg(test)]
    pub fn recent_len(&self) -> usize {
        self.recent.len()
    }

    pub(super) fn place(
        &self,
        id: i64,
        prev: Option<&Prev>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Placement {
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
}
