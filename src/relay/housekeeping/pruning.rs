//! Published rows kept for `relay.published_retention` (when it is not 0) are deleted past
//! it, `relay.prune_batch` at a time, every `relay.prune_interval`.

use crate::metrics::Metrics;
use crate::store::Store;
use std::time::Duration;

pub(super) struct Pruning<'a> {
    pub store: &'a Store,
    pub metrics: &'a Metrics,
    pub retention: Duration,
    pub batch: u32,
}

impl Pruning<'_> {
    /// Whether rows are kept at all (else they are deleted as they are published).
    pub(super) fn on(&self) -> bool {
        !self.retention.is_zero()
    }

    pub(super) async fn prune(&self) {
        match self.store.prune_published(self.retention, self.batch).await {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.pruned.inc_by(n);
                tracing::debug!(rows = n, "pruned published rows past their retention");
            }
            Err(e) => tracing::warn!(error = %e, "could not prune published rows"),
        }
    }
}
