//! Handing rows over and deciding them: a verdict settles the rows waiting behind it (handed
//! on, tainted or deferred), and a claim completes once every row has one.

use super::*;

impl Dispatcher {
    /// A row whose turn has come: handed over, or the verdict deciding it instead. An invalid
    /// row fails only now, in its turn, never ahead of its predecessor; a row for a backend
    /// that is down is held as `hold` says.
    pub(super) fn go(&mut self, id: i64) -> Result<Handoff, Verdict> {
        if let Some(reason) = self.rows.get(&id).and_then(|r| r.invalid.clone()) {
            return Err(Verdict::Failed {
                attempted: false,
                reason,
            });
        }
        match self.hold(id) {
            Some(v) => Err(v),
            None => Ok(self.hand(id)),
        }
    }

    pub(super) fn hand(&mut self, id: i64) -> Handoff {
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
    pub(super) fn decide(
        &mut self,
        id: i64,
        verdict: Verdict,
        out: &mut Vec<Handoff>,
        done: &mut Vec<i64>,
    ) {
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
    pub(super) fn hand_on(
        &mut self,
        chain: u64,
        out: &mut Vec<Handoff>,
        work: &mut Vec<(i64, Verdict)>,
    ) {
        while let Some(s) = self.frontier(chain) {
            match self.gate(s) {
                Gate::Wait => return,
                Gate::Defer(until) => {
                    work.push((s, Verdict::Deferred(until)));
                    return;
                }
                Gate::Go => match self.go(s) {
                    Ok(handoff) => out.push(handoff),
                    Err(v) => {
                        work.push((s, v));
                        return;
                    }
                },
            }
        }
    }

    /// After anything but a success at place `seq` of `chain`: taints the rows in flight
    /// behind it and defers the first waiting one (whose verdict defers the next, and so on).
    pub(super) fn settle_behind(
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
    pub(super) fn gate(&mut self, s: i64) -> Gate {
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
    pub(super) fn behind(id: i64, before: &RowState) -> Option<Gate> {
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
    pub(super) fn may_overlap(&self, before: &RowState, r: &RowState) -> bool {
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

    pub(super) fn collect_completed(&mut self, rows: Vec<i64>) -> Vec<Completed> {
        let mut batches: Vec<u64> = rows
            .iter()
            .filter_map(|id| self.rows.get(id).map(|r| r.batch))
            .filter(|b| self.batches.get(b).is_some_and(|s| s.open == 0))
            .collect();
        batches.sort_unstable();
        batches.dedup();
        batches.into_iter().map(|b| self.complete(b)).collect()
    }

    pub(super) fn complete(&mut self, batch: u64) -> Completed {
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
}
