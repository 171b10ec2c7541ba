//! The pipeline's claims: when one starts (wanted, owned partitions, room in the pipeline,
//! no backoff), where it starts in the walk, and what its rows become.

use super::*;

/// Waits after a failed claim: 0.2 s, doubling with each failure in a row, at most 5 s.
const CLAIM_RETRY: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

impl Pipeline<'_> {
    /// Starts a claim if one is wanted, this relay owns partitions, none is in progress, the
    /// pipeline has room and no backoff is running.
    pub(super) fn start_claim(&mut self, now: tokio::time::Instant) {
        if self.stopping
            || !self.want_claim
            || self.assignment.share.is_none()
            || self.claiming.is_some()
            // Claims being published and claims being committed both hold a connection and
            // their rows: together at most `pipeline_depth`.
            || self.txs.len() + self.finishing.len() >= self.relay.cfg.pipeline_depth as usize
            || now < self.claim_not_before
        {
            return;
        }
        self.want_claim = false;
        if self.cursor_since.elapsed() >= self.relay.cfg.poll_interval.0 {
            self.cursor = None;
        }
        if self.cursor.is_none() {
            self.cursor_since = Instant::now();
        }
        self.claims_started += 1;
        let store = self.relay.store.clone();
        let limit = self.relay.cfg.batch_size;
        let from = match self.cursor {
            _ if !self.cut_open.is_empty() => Walk::ProbeAll(self.cursor.map(|(c, _)| c)),
            Some((c, xmin)) => Walk::After(c, xmin),
            None => Walk::Front,
        };
        let share = self.assignment.share.clone().expect("guarded");
        self.claiming_version = Some(self.assignment.version);
        // On a task of its own: decoding a batch overlaps with the loop's work.
        self.claiming = Some(on_task("claiming", async move {
            store.claim_share(limit, from, &share).await
        }));
    }

    pub(super) async fn on_claimed(&mut self, res: ClaimResult) {
        let version = self
            .claiming_version
            .take()
            .unwrap_or(self.assignment.version);
        self.relay.stats.claims.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(Claim { tx, .. }) if std::mem::take(&mut self.suspect) => {
                drop(tx);
                self.dispatcher.forget_recent_before(self.claims_started);
                self.cursor = None;
                self.want_claim = true;
            }
            Ok(claim) => self.on_rows(claim, version).await,
            Err(e) => {
                self.claim_errors += 1;
                let wait = CLAIM_RETRY.step(self.claim_errors);
                if self.claim_errors == 1 || self.claim_errors.is_multiple_of(20) {
                    tracing::warn!(error = %e, retry_in = ?wait, failures = self.claim_errors, "claim failed");
                }
                self.claim_not_before = tokio::time::Instant::now() + wait;
                self.cursor = None;
                self.want_claim = true;
            }
        }
    }

    /// A claim came back: its rows go to the dispatcher and what may go is handed over.
    pub(super) async fn on_rows(&mut self, claim: Claim, version: u64) {
        let Claim {
            tx,
            rows,
            next,
            cut,
            walk_xmin,
        } = claim;
        // A claim made with an older share says nothing about where the rows of partitions
        // added since begin: start from the front. (One cut short by its byte budget has no
        // `next`: the rows it holds past its last key are found from the front once released.)
        self.cursor = if version == self.assignment.version {
            next.zip(walk_xmin)
        } else {
            None
        };
        if cut {
            self.want_claim = true;
        }
        if self.claim_errors > 0 {
            tracing::info!("database reachable again, claiming resumed");
            self.claim_errors = 0;
        }
        let n = rows.len();
        // Full (as many rows as it asked for, which the byte budget may have made fewer than
        // the batch size): more may be due.
        if next.is_some() {
            self.want_claim = true;
        }
        if n == 0 && self.drain && self.txs.is_empty() && self.finishing.is_empty() {
            tracing::info!("nothing due and nothing in flight: drained");
            self.stopping = true;
        }
        if n == 0 || self.stopping {
            self.dispatcher.forget_recent_before(self.claims_started);
            drop(tx);
            return;
        }
        self.relay
            .stats
            .claimed
            .fetch_add(n as u64, Ordering::Relaxed);
        self.relay.metrics.claim_batch_size.observe(n as f64);
        self.next_batch += 1;
        if let Some(span) = self.relay.tracer.claim_span(n) {
            self.relay.book().claims.insert(self.next_batch, span);
        }
        self.txs.insert(self.next_batch, tx);
        if cut {
            self.cut_open.insert(self.next_batch);
        }
        self.claim_versions.insert(self.next_batch, version);
        let held = self.dispatcher.held_back();
        let (h, c) = self
            .dispatcher
            .add_batch(self.next_batch, self.claims_started, rows);
        if self.dispatcher.brokers_unavailable()
            && (!h.is_empty() || self.dispatcher.held_back() > held)
        {
            // Every backend is down and this claim had events for them (a probe handed, the
            // rest rescheduled): the next claim waits. Claims that only defer rows behind
            // waiting events ask nothing and are not spaced.
            if self.probes == 0 {
                tracing::warn!(
                    "brokers unavailable: claiming paused between probes until one answers"
                );
            }
            self.probes += 1;
            self.claim_not_before =
                tokio::time::Instant::now() + self.dispatcher.outage_delay(self.probes);
            self.want_claim = true;
        }
        self.relay.publish(h, &self.ack_tx).await;
        self.finish(c);
    }
}
