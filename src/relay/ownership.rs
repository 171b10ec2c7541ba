//! Partition ownership: which share of the aggregates this relay may claim.
//!
//! Aggregates are hashed into [`PARTITIONS`] partitions (the outbox's `part` column). The
//! members (relays whose ownership session is alive) are ordered by their member key; member
//! `i` of `n` is meant to own the contiguous range `[i*P/n, (i+1)*P/n)`. Each relay, every
//! `relay.rebalance_interval`:
//! 1. reads the members ([`OwnerSession::members`]) and computes its target range;
//! 2. stops claiming partitions outside its target and gives each up once no claim that could
//!    hold its rows is open any more (the loop reports the oldest open claim's version);
//! 3. takes the partitions of its target that nobody holds, records itself as their owner, and
//!    claims there once their fence shows no claim of a previous owner is still open.
//!
//! Safety does not depend on the members agreeing: a partition is claimed only by the holder
//! of its lock, and only after the fence. A relay that dies releases everything with its
//! sessions; one whose ownership session alone was cut is fenced out by the claim's check of
//! `<table>_partitions` (see [`crate::store::Store::claim_share`]) and drops its share when
//! its next statement on the session fails.

use crate::store::partitions::OwnerSession;
use crate::store::{Share, Store, PARTITIONS};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the loop may claim now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Bumped on every change of the share.
    pub version: u64,
    /// `None`: nothing may be claimed.
    pub share: Option<Share>,
    /// Relays seen at the last look.
    pub members: usize,
    /// Rebalances (changes of the share) since start.
    pub rebalances: u64,
}

impl Assignment {
    pub fn owned(&self) -> usize {
        self.share.as_ref().map_or(0, |s| s.parts.len())
    }
}

/// The partitions member `index` of `members` is meant to own.
pub fn target(index: usize, members: usize) -> std::ops::Range<i16> {
    let p = PARTITIONS as usize;
    let lo = (index * p).div_ceil(members);
    let hi = ((index + 1) * p).div_ceil(members);
    lo as i16..hi as i16
}

/// The handle the loop keeps: the current assignment, and where it reports the oldest claim
/// still open (by the assignment version it was started with; `u64::MAX` when none is open).
pub struct Ownership {
    pub assignment: watch::Receiver<Arc<Assignment>>,
    pub oldest_open: watch::Sender<u64>,
    leave: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Ownership {
    /// Starts the manager task for the relay named `owner`.
    pub fn start(store: Arc<Store>, owner: String, every: Duration) -> Ownership {
        let (assign_tx, assignment) = watch::channel(Arc::new(Assignment::default()));
        let (oldest_open, oldest_rx) = watch::channel(u64::MAX);
        let leave = CancellationToken::new();
        let manager = Manager {
            store,
            owner,
            every,
            session: None,
            owned: BTreeSet::new(),
            unfenced: BTreeSet::new(),
            releasing: Vec::new(),
            current: Assignment::default(),
            assign_tx,
            oldest_rx,
            failures: 0,
        };
        let task = tokio::spawn(manager.run(leave.clone()));
        Ownership {
            assignment,
            oldest_open,
            leave,
            task,
        }
    }

    /// Leaves the relays: no new share, and every partition is given up as soon as no claim
    /// holds it. Returns once all are given up (or `timeout` passed: they are released by
    /// Postgres when the session closes anyway).
    pub async fn leave(self, timeout: Duration) {
        self.leave.cancel();
        let _ = self.oldest_open.send(u64::MAX);
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
        }
    }
}

struct Manager {
    store: Arc<Store>,
    owner: String,
    every: Duration,
    session: Option<OwnerSession>,
    /// Claimable (in the published share).
    owned: BTreeSet<i16>,
    /// Held and recorded, waiting for the fence.
    unfenced: BTreeSet<i16>,
    /// Held, out of the share since the given version: given up once no claim started with an
    /// earlier version is open.
    releasing: Vec<(i16, u64)>,
    current: Assignment,
    assign_tx: watch::Sender<Arc<Assignment>>,
    oldest_rx: watch::Receiver<u64>,
    failures: u32,
}

impl Manager {
    async fn run(mut self, leave: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The loop reports its oldest open claim on every claim started or closed: only
            // partitions waiting to be given up care, and only the release runs then (the
            // full look, with its scan of pg_locks, stays at one per interval).
            let result = tokio::select! {
                _ = tick.tick() => self.step(false).await,
                r = self.oldest_rx.changed(), if !self.releasing.is_empty() => match r {
                    Ok(()) => self.release_ready().await,
                    Err(_) => break,
                },
                _ = leave.cancelled() => break,
            };
            if let Err(e) = result {
                self.lost(e);
            }
        }
        // Leaving: no new claims; give everything up as claims close.
        if let Some(s) = self.session.as_mut() {
            let _ = s.leave().await;
        }
        loop {
            match self.step(true).await {
                Ok(()) if self.owned.is_empty() && self.releasing.is_empty() => break,
                Ok(()) => {}
                Err(e) => {
                    self.lost(e);
                    break;
                }
            }
            if self.oldest_rx.changed().await.is_err() {
                break;
            }
        }
        if let Some(s) = self.session.take() {
            s.close().await;
        }
        tracing::info!("partitions handed over");
    }

    /// The session failed: everything it held is gone with it.
    fn lost(&mut self, e: crate::store::StoreError) {
        self.failures += 1;
        if self.failures == 1 || self.failures.is_multiple_of(20) {
            tracing::warn!(error = %e, owned = self.owned.len(),
                "ownership session lost: claiming nothing until partitions are taken again");
        }
        self.session = None;
        self.owned.clear();
        self.unfenced.clear();
        self.releasing.clear();
        self.publish(0);
    }

    async fn step(&mut self, leaving: bool) -> Result<(), crate::store::StoreError> {
        let mut session = match self.session.take() {
            Some(s) => s,
            None if leaving => return Ok(()),
            None => {
                let s = OwnerSession::join(&self.store, &self.owner).await?;
                if self.failures > 0 {
                    tracing::info!("ownership session back");
                    self.failures = 0;
                }
                s
            }
        };
        let r = self.step_on(&mut session, leaving).await;
        if r.is_ok() {
            self.session = Some(session);
        }
        r
    }

    async fn step_on(
        &mut self,
        session: &mut OwnerSession,
        leaving: bool,
    ) -> Result<(), crate::store::StoreError> {
        let members = session.members().await?;
        let me = session.member();
        let target: BTreeSet<i16> = match members.iter().position(|m| *m == me) {
            Some(i) if !leaving => target(i, members.len()).collect(),
            _ => BTreeSet::new(),
        };
        let mut changed = false;
        // Out of the share first: the next claim no longer includes them.
        let next_version = self.current.version + 1;
        let leaving_parts: Vec<i16> = self.owned.difference(&target).copied().collect();
        for p in leaving_parts {
            self.owned.remove(&p);
            self.releasing.push((p, next_version));
            changed = true;
        }
        let never_claimed: Vec<i16> = self.unfenced.difference(&target).copied().collect();
        if !never_claimed.is_empty() {
            session.release(&never_claimed).await?;
            for p in &never_claimed {
                self.unfenced.remove(p);
            }
        }
        if !leaving {
            let busy: BTreeSet<i16> = self.releasing.iter().map(|(p, _)| *p).collect();
            let want: Vec<i16> = target
                .iter()
                .filter(|p| !self.owned.contains(p) && !self.unfenced.contains(p))
                .filter(|p| !busy.contains(p))
                .copied()
                .collect();
            self.unfenced.extend(session.acquire(&want).await?);
            let waiting: Vec<i16> = self.unfenced.iter().copied().collect();
            for p in session.fence(&waiting).await? {
                self.unfenced.remove(&p);
                self.owned.insert(p);
                changed = true;
            }
        }
        if changed || members.len() != self.current.members {
            self.current.members = members.len();
            self.publish(if changed { 1 } else { 0 });
        }
        release_ready(session, &mut self.releasing, &mut self.oldest_rx).await
    }

    /// Gives up the releasing partitions no open claim can hold rows of any more.
    async fn release_ready(&mut self) -> Result<(), crate::store::StoreError> {
        match self.session.as_mut() {
            Some(session) => release_ready(session, &mut self.releasing, &mut self.oldest_rx).await,
            None => Ok(()),
        }
    }

    fn publish(&mut self, rebalanced: u64) {
        self.current.version += 1;
        self.current.rebalances += rebalanced;
        self.current.share = (!self.owned.is_empty()).then(|| Share {
            owner: self.owner.clone(),
            parts: self.owned.iter().copied().collect(),
        });
        let _ = self.assign_tx.send(Arc::new(self.current.clone()));
    }
}

/// Gives up the partitions of `releasing` that every claim which may hold their rows has
/// closed (the loop's oldest open claim is at or past the version they left the share in).
async fn release_ready(
    session: &mut OwnerSession,
    releasing: &mut Vec<(i16, u64)>,
    oldest_rx: &mut watch::Receiver<u64>,
) -> Result<(), crate::store::StoreError> {
    let oldest = *oldest_rx.borrow_and_update();
    let ready: Vec<i16> = releasing
        .iter()
        .filter(|(_, v)| oldest >= *v)
        .map(|(p, _)| *p)
        .collect();
    if !ready.is_empty() {
        session.release(&ready).await?;
        releasing.retain(|(_, v)| oldest < *v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_cover_every_partition_once() {
        for n in 1..=7 {
            let mut seen = Vec::new();
            for i in 0..n {
                seen.extend(target(i, n));
            }
            assert_eq!(seen, (0..PARTITIONS).collect::<Vec<_>>(), "{n} members");
        }
        assert_eq!(target(0, 2), 0..128);
        assert_eq!(target(2, 3), 171..256);
    }
}
