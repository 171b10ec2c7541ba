//! JetStream PubAcks on one subscription of the publisher's own.
//!
//! The client's request path costs, per message, an inbox string, a oneshot channel, a timer,
//! an entry in a map keyed by a string token and a boxed future; at tens of thousands of
//! events a second that was a third of the relay's CPU. Here every JetStream publish carries
//! the reply subject `<inbox>.<n>`, where `<inbox>` is subscribed once (`<inbox>.*`) and `n`
//! counts publishes. One task reads the replies, finds each one's ticket by `n` and resolves
//! it; the same task times out the ones unanswered for `ack_timeout`, with one sweep instead
//! of a timer each.
//!
//! * At most `max_in_flight` publishes wait for their PubAck: [`AckPath::send`] waits for room
//!   (backpressure). The subscription's buffer holds more replies than that, so the client
//!   never drops one as a slow consumer.
//! * A reply to a publish already timed out (or to anything else) finds no ticket and is
//!   ignored: the event was reported unavailable and goes again with the same `Nats-Msg-Id`,
//!   which the stream drops as a duplicate if the first one was stored.
//! * While the connection is away replies are lost; those publishes time out into
//!   unavailable results. The client subscribes again on reconnect by itself.

use super::error;
use super::NoResponders;
use crate::publisher::{AckTicket, PublishError};
use async_nats::{Client, HeaderMap, Message, StatusCode, Subject};
use futures::{FutureExt, StreamExt};
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// A publish waiting for its PubAck.
struct Waiting {
    ticket: AckTicket,
    subject: Arc<str>,
    sent_at: Instant,
}

#[derive(Default)]
struct Pending {
    next: u64,
    by_n: FxHashMap<u64, Waiting>,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Room for one more publish per permit.
    room: Semaphore,
    /// Signalled whenever nothing waits any more (for `close`).
    emptied: Notify,
    timeout: Duration,
}

impl Shared {
    /// Registers a publish about to go, under the next number (its reply subject's).
    fn wait_for(&self, ticket: AckTicket, subject: Arc<str>) -> u64 {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = p.next;
        p.next += 1;
        p.by_n.insert(
            n,
            Waiting {
                ticket,
                subject,
                sent_at: Instant::now(),
            },
        );
        n
    }

    fn take(&self, n: u64) -> Option<Waiting> {
        let mut taken = Vec::with_capacity(1);
        self.take_all([n], &mut taken);
        taken.pop().map(|(_, w)| w)
    }

    /// Takes the publishes numbered `ns` that still wait (one lock and one release of room
    /// for a run of PubAcks that arrived together) into `taken`.
    fn take_all(&self, ns: impl IntoIterator<Item = u64>, taken: &mut Vec<(u64, Waiting)>) {
        let before = taken.len();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        taken.extend(
            ns.into_iter()
                .filter_map(|n| p.by_n.remove(&n).map(|w| (n, w))),
        );
        let empty = p.by_n.is_empty();
        drop(p);
        let got = taken.len() - before;
        if got > 0 {
            self.room.add_permits(got);
            if empty {
                self.emptied.notify_waiters();
            }
        }
    }

    /// Reports unavailable, with `why`, every publish still unanswered that was sent at or
    /// before `sent_by` (every one, with `None`).
    fn give_up(&self, sent_by: Option<Instant>, why: &str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let out: Vec<Waiting> = p
            .by_n
            .extract_if(|_, w| sent_by.is_none_or(|t| w.sent_at <= t))
            .map(|(_, w)| w)
            .collect();
        let empty = p.by_n.is_empty();
        drop(p);
        self.room.add_permits(out.len());
        if empty && !out.is_empty() {
            self.emptied.notify_waiters();
        }
        for w in out {
            w.ticket.nack(PublishError::unavailable(format!(
                "nats: subject {:?}: {why}",
                w.subject
            )));
        }
    }

    fn subject_of(&self, n: u64) -> Option<Arc<str>> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.by_n.get(&n).map(|w| w.subject.clone())
    }

    fn is_empty(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_n
            .is_empty()
    }
}

/// The reply subscription and the publishes waiting on it; see the module doc.
pub(super) struct AckPath {
    shared: Arc<Shared>,
    /// `<inbox>.`; a publish's reply subject is this and its number.
    prefix: String,
    stop: CancellationToken,
}

impl AckPath {
    /// Subscribes `<inbox>.*` and starts the task that reads the replies.
    pub(super) async fn start(
        client: &Client,
        lookup: Arc<NoResponders>,
        timeout: Duration,
        max_in_flight: usize,
    ) -> Result<AckPath, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let replies = client.subscribe(format!("{inbox}.*")).await?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            room: Semaphore::new(max_in_flight),
            emptied: Notify::new(),
            timeout,
        });
        let stop = CancellationToken::new();
        tokio::spawn(read_replies(replies, shared.clone(), lookup, stop.clone()));
        Ok(AckPath {
            shared,
            prefix: format!("{inbox}."),
            stop,
        })
    }

    /// Publishes one message to JetStream with its reply subject, once there is room; the
    /// ticket is resolved by the PubAck, its absence or the publish's own failure. Returns
    /// whether the client looks away: its command queue took nothing for `ack_timeout` (it
    /// stops reading the queue while it reconnects), so the rest of a burst need not wait too.
    pub(super) async fn send(
        &self,
        client: &Client,
        subject: Arc<str>,
        to: Subject,
        headers: HeaderMap,
        body: bytes::Bytes,
        ticket: AckTicket,
    ) -> bool {
        if let Err(why) = self.room(&subject).await {
            ticket.nack(why);
            return true;
        }
        let n = self.shared.wait_for(ticket, subject.clone());
        let reply = Subject::from(reply_subject(&self.prefix, n));
        // The queue's send is cancel-safe: on a timeout the message was never queued.
        let sent = tokio::time::timeout(
            self.shared.timeout,
            client.publish_with_reply_and_headers(to, reply, headers, body),
        )
        .await;
        let (why, away) = match sent {
            Ok(Ok(())) => return false,
            Ok(Err(e)) => {
                use async_nats::client::PublishErrorKind as Core;
                let reason = format!("nats: publishing to {subject:?}: {e}");
                match e.kind() {
                    // About this message only: the connection is fine.
                    Core::MaxPayloadExceeded | Core::InvalidSubject => {
                        (PublishError::permanent(reason), false)
                    }
                    Core::Send => (PublishError::unavailable(reason), true),
                }
            }
            Err(_) => (
                PublishError::unavailable(format!(
                    "nats: publishing to {subject:?}: the client took nothing within {:?} \
                     (reconnecting)",
                    self.shared.timeout
                )),
                true,
            ),
        };
        // The message never left.
        if let Some(w) = self.shared.take(n) {
            w.ticket.nack(why);
        }
        away
    }

    /// A place in the window of publishes awaiting a PubAck: at once, or once one frees within
    /// a PubAck's time.
    async fn room(&self, subject: &str) -> Result<(), PublishError> {
        let room = match self.shared.room.try_acquire() {
            Ok(permit) => Ok(Ok(permit)),
            // A full window: wait for room, as long as a PubAck may take.
            Err(_) => tokio::time::timeout(self.shared.timeout, self.shared.room.acquire()).await,
        };
        match room {
            Ok(Ok(permit)) => {
                permit.forget();
                Ok(())
            }
            Ok(Err(_)) => Err(PublishError::unavailable(
                "nats: the PubAck reader has stopped (the client was closed)",
            )),
            Err(_) => Err(PublishError::unavailable(format!(
                "nats: subject {subject:?}: no room among the publishes awaiting a PubAck \
                 within {:?}",
                self.shared.timeout
            ))),
        }
    }

    /// Waits at most `timeout` for every PubAck still due; the ones that do not come are
    /// reported unavailable (the rows stay pending and go again).
    pub(super) async fn settle(&self, timeout: Duration) {
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let emptied = self.shared.emptied.notified();
                if self.shared.is_empty() {
                    return;
                }
                emptied.await;
            }
        })
        .await;
        if waited.is_err() {
            self.shared
                .give_up(None, "the relay stopped before JetStream acknowledged");
        }
    }
}

/// `<prefix><n>`, without the formatting machinery (a tenth of the ack path's cost).
fn reply_subject(prefix: &str, mut n: u64) -> String {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut s = String::with_capacity(prefix.len() + digits.len() - i);
    s.push_str(prefix);
    s.extend(digits[i..].iter().map(|d| *d as char));
    s
}

impl Drop for AckPath {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Resolves tickets from their replies, and every so often times out the unanswered ones.
async fn read_replies(
    mut replies: async_nats::Subscriber,
    shared: Arc<Shared>,
    lookup: Arc<NoResponders>,
    stop: CancellationToken,
) {
    let every = (shared.timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let late = format!("no PubAck within {:?}", shared.timeout);
    let mut sweep = tokio::time::interval(every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The PubAcks that have arrived, a run at a time (up to RUN): one lock of the waiting
    // publishes and one release of room per run instead of per reply. Both buffers are
    // kept from run to run.
    const RUN: usize = 256;
    let mut run = Vec::new();
    let mut taken = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            reply = replies.next() => match reply {
                Some(m) => {
                    run.push(m);
                    // The subscription's `next` is a channel receive: dropping it unfinished
                    // loses nothing.
                    while run.len() < RUN {
                        match replies.next().now_or_never() {
                            Some(Some(m)) => run.push(m),
                            _ => break,
                        }
                    }
                    answer(&shared, &lookup, &mut run, &mut taken);
                }
                None => break,
            },
            _ = sweep.tick() => {
                if let Some(sent_by) = Instant::now().checked_sub(shared.timeout) {
                    shared.give_up(Some(sent_by), &late);
                }
            }
        }
    }
    // Nothing answers these any more; they go again, and so does whatever comes after.
    shared.room.close();
    shared.give_up(None, "the publisher stopped before JetStream acknowledged");
}

/// The number a reply is to: the last token of its subject.
fn reply_number(m: &Message) -> Option<u64> {
    m.subject
        .rsplit('.')
        .next()
        .and_then(|t| t.parse::<u64>().ok())
}

/// Resolves the publishes `run` answers (and empties it).
fn answer(
    shared: &Arc<Shared>,
    lookup: &Arc<NoResponders>,
    run: &mut Vec<Message>,
    taken: &mut Vec<(u64, Waiting)>,
) {
    // In the order they came, which `take_all` keeps: results reach the relay in the order
    // JetStream stored the messages.
    let mut answers: Vec<(u64, Message)> = Vec::with_capacity(run.len());
    for m in run.drain(..) {
        let Some(n) = reply_number(&m) else { continue };
        if m.status == Some(StatusCode::NO_RESPONDERS) {
            no_responders(shared, lookup, n);
        } else {
            answers.push((n, m));
        }
    }
    shared.take_all(answers.iter().map(|(n, _)| *n), taken);
    // `taken` is the part of `answers` still waiting, in the same order.
    let mut answers = answers.into_iter();
    for (n, w) in taken.drain(..) {
        let Some((_, m)) = answers.find(|(a, _)| *a == n) else {
            continue;
        };
        match m.status {
            Some(status) if status != StatusCode::OK => {
                w.ticket.nack(PublishError::retryable(format!(
                    "nats: subject {:?}: JetStream answered status {status}{}",
                    w.subject,
                    m.description
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                )))
            }
            _ => w.ticket.resolve(error::pub_ack(&w.subject, &m.payload)),
        }
    }
}

/// "No responders" to publish `n`: rare, and the lookup asks JetStream, so off this task and
/// other replies go on. The publish stays among the waiting until it has its result, so
/// `settle` waits for it (or the sweep reports it unavailable, should the lookup take longer
/// than that).
fn no_responders(shared: &Arc<Shared>, lookup: &Arc<NoResponders>, n: u64) {
    let Some(subject) = shared.subject_of(n) else {
        return;
    };
    let lookup = lookup.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        let e = lookup.classify(&subject).await;
        if let Some(w) = shared.take(n) {
            w.ticket.nack(e);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::reply_subject;

    #[test]
    fn reply_subjects_end_in_the_number() {
        for n in [0, 7, 10, 12345, u64::MAX] {
            assert_eq!(reply_subject("_INBOX.x.", n), format!("_INBOX.x.{n}"));
        }
    }
}
