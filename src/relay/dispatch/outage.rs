//! Backends that are down: their rows are rescheduled instead of handed over, one probe per
//! outage delay, while other backends flow on.

use super::*;

impl Dispatcher {
    /// Whether every backend is known to be unreachable: the latest result from each was
    /// "unavailable" (or a hand-off timed out unanswered) and nothing has succeeded since. The
    /// relay then spaces its claims (see `Relay::run`).
    pub fn brokers_unavailable(&self) -> bool {
        let n = self.router.backend_count();
        n > 0 && (0..n).all(|b| self.down(b))
    }

    /// Whether backend `b` is in an outage: its latest result was "unavailable".
    pub(super) fn down(&self, b: usize) -> bool {
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
    pub(super) fn hold(&mut self, id: i64) -> Option<Verdict> {
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
}
