//! Results from the ACK channel and the clock: acknowledgements, failures (retry, fail or
//! defer), timeouts, stale claims, the stop, and claims written.

use super::*;

impl Dispatcher {
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

    pub(super) fn failure_verdict(
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
}
