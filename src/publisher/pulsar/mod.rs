//! Pulsar backend: pulsar-rs producers, asynchronous, with every send receipt turned into a
//! result on the ACK channel.
//!
//! * One producer per Pulsar topic, created on first use and kept. Sends to one producer are
//!   taken one at a time, in the order given (a lock per producer), so an aggregate's events
//!   reach the broker in order: Pulsar keeps one producer's order, and pulsar-rs resends what
//!   was pending, in sequence, after it re-creates a producer on a new connection.
//! * Each send returns a receipt future; one collector task awaits them all and resolves the
//!   tickets. No task per message on our side.
//! * `max_pending_messages` bounds the messages sent and not yet acknowledged (a semaphore):
//!   when full, [`PulsarPublisher::publish`] waits; nothing is dropped.
//! * Key: the aggregate id is the partition key (the partition of a partitioned topic) and the
//!   ordering key (`Key_Shared` subscriptions). Properties: the relay's headers and the row's
//!   own. Event time: occurred_at (left unset before 1970, which Pulsar cannot carry).
//! * The client connects in the background: a broker that is down at start-up is not an
//!   error; sends report it as unavailable (no attempt counted) until it is back.
//! * pulsar-rs gives no way to set a message's sequence id, so the broker's deduplication
//!   cannot drop a re-publish after a crash; consumers deduplicate by `X-Event-ID`.

pub mod config;
mod connection;
pub mod error;
mod message;

pub use config::PulsarConfig;

use super::ErrorKind;
use super::{AckTicket, Health, Outgoing, PublishError, Publisher};
use crate::envelope::InvalidEvent;
use config::Compression;
use futures::future::{BoxFuture, Shared};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use pulsar::producer::{Message, SendFuture};
use pulsar::routing_policy::RoutingPolicy;
use pulsar::{Producer, ProducerOptions, TokioExecutor};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use connection::{connector, Client, Conn};
pub(crate) use message::FRAMING;
pub use message::{message_limit, pulsar_message};
/// The messages of one Pulsar topic in a burst: (Pulsar topic, the first outbox topic that
/// maps to it, the messages).
type Run = (String, String, Vec<(Message, AckTicket)>);
type SharedProducer = Arc<Mutex<Producer<TokioExecutor>>>;

/// A receipt on its way, with the ticket it answers and the window slot it holds.
struct Pending {
    receipt: SendFuture,
    ticket: AckTicket,
    _slot: OwnedSemaphorePermit,
}

/// Awaits receipts in whatever order they come and resolves their tickets, until `abandon`:
/// then what is still waiting is dropped, which resolves those tickets as retryable.
async fn collect(mut rx: mpsc::UnboundedReceiver<Pending>, abandon: CancellationToken) {
    let mut waiting = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            _ = abandon.cancelled() => return,
            Some(()) = waiting.next(), if !waiting.is_empty() => {}
            p = rx.recv() => match p {
                Some(Pending { receipt, ticket, _slot }) => waiting.push(async move {
                    match receipt.await {
                        Ok(_) => ticket.ack(),
                        Err(e) => ticket.nack(error::classify(&e)),
                    }
                    drop(_slot);
                }),
                None => break,
            },
        }
    }
    while waiting.next().await.is_some() {}
}

type Building = Shared<BoxFuture<'static, Result<SharedProducer, PublishError>>>;

/// A topic's producer, or its creation under way.
enum Slot {
    Ready(SharedProducer),
    Building(Building),
}

/// A lookup of the health topic under way, shared by the probes that come while it runs.
type Probe = Shared<BoxFuture<'static, Result<(), String>>>;

pub struct PulsarPublisher {
    cfg: PulsarConfig,
    conn: watch::Receiver<Conn>,
    producers: Arc<StdMutex<HashMap<String, Slot>>>,
    probe: StdMutex<Option<Probe>>,
    room: Arc<Semaphore>,
    receipts: mpsc::UnboundedSender<Pending>,
    abandon: CancellationToken,
    collector: StdMutex<Option<tokio::task::JoinHandle<()>>>,
    /// Producer names are `<prefix>-<this>-<n>`: unique per topic across relays.
    instance: String,
    made: AtomicU64,
    /// What a message above it is refused for, before it is sent: see [`message_limit`].
    limit: usize,
}

/// The producer settings of a backend: batching, compression, waiting for room in the
/// client's queue, and the partition by the key. The drain benchmark's bare producer uses
/// them too.
pub fn producer_options(c: &PulsarConfig) -> ProducerOptions {
    let compression = match c.compression {
        Compression::None => None,
        Compression::Lz4 => Some(pulsar::compression::Compression::Lz4(Default::default())),
        Compression::Zlib => Some(pulsar::compression::Compression::Zlib(Default::default())),
        Compression::Zstd => Some(pulsar::compression::Compression::Zstd(Default::default())),
        Compression::Snappy => Some(pulsar::compression::Compression::Snappy(Default::default())),
    };
    ProducerOptions {
        batch_size: c.batching.then_some(c.batching_max_messages),
        batch_byte_size: c.batching.then_some(c.batching_max_bytes as usize),
        batch_timeout: c.batching.then_some(c.batching_max_publish_delay.0),
        compression,
        // Wait for room in the connection's queue instead of failing the send.
        block_queue_if_full: true,
        // A partitioned topic: the partition by the key's hash (pulsar-rs' default
        // without a policy is round robin, which would split an aggregate).
        routing_policy: Some(RoutingPolicy::RoundRobin),
        ..Default::default()
    }
}

impl PulsarPublisher {
    /// Sets the publisher up and starts connecting in the background, waiting at most
    /// `connection_timeout` for the first attempt; a broker that is down now is only logged:
    /// sends report it until it is back.
    pub async fn connect(cfg: &PulsarConfig) -> PulsarPublisher {
        let (tx, rx) = mpsc::unbounded_channel();
        let abandon = CancellationToken::new();
        let collector = tokio::spawn(collect(rx, abandon.clone()));
        let (conn_tx, mut conn) = watch::channel(Conn::Connecting);
        tokio::spawn(connector(cfg.clone(), conn_tx, abandon.clone()));
        let first = tokio::time::timeout(cfg.connection_timeout.0, conn.changed()).await;
        if first.is_err() {
            tracing::warn!("pulsar: broker not reachable yet; sends wait for it");
        } else if let Conn::Down(why) = &*conn.borrow() {
            tracing::warn!(reason = %why, "pulsar: broker not reachable yet; sends wait for it");
        }
        PulsarPublisher {
            cfg: cfg.clone(),
            conn,
            producers: Arc::new(StdMutex::new(HashMap::new())),
            probe: StdMutex::new(None),
            room: Arc::new(Semaphore::new(cfg.max_pending_messages as usize)),
            receipts: tx,
            abandon,
            collector: StdMutex::new(Some(collector)),
            instance: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            made: AtomicU64::new(0),
            limit: message_limit(cfg),
        }
    }

    /// The connected client, or why there is none (never waits).
    fn client(&self) -> Result<Client, PublishError> {
        match &*self.conn.borrow() {
            Conn::Up(c) => Ok(c.clone()),
            Conn::Connecting => Err(PublishError::unavailable("pulsar: still connecting")),
            Conn::Down(why) => Err(PublishError::unavailable(why.clone())),
        }
    }

    /// The producer of `topic` (a full Pulsar name). Its creation runs as a task of its own,
    /// shared by whoever needs it meanwhile, and is waited for at most `operation_timeout`;
    /// a failed one is forgotten, so the next send tries again.
    async fn producer(&self, topic: &str) -> Result<SharedProducer, PublishError> {
        let building = {
            let mut map = self.producers.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(topic) {
                Some(Slot::Ready(p)) => return Ok(p.clone()),
                Some(Slot::Building(b)) => b.clone(),
                None => {
                    let b = self.build_producer(self.client()?, topic);
                    map.insert(topic.to_string(), Slot::Building(b.clone()));
                    b
                }
            }
        };
        match tokio::time::timeout(self.cfg.operation_timeout.0, building).await {
            Ok(r) => r,
            Err(_) => Err(PublishError::unavailable(format!(
                "pulsar: no producer for {topic} within {:?}",
                self.cfg.operation_timeout.0
            ))),
        }
    }

    fn build_producer(&self, client: Client, topic: &str) -> Building {
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{}-{n}", self.cfg.producer_name_prefix, self.instance);
        let options = producer_options(&self.cfg);
        let map = self.producers.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            let made = client
                .producer()
                .with_topic(&topic)
                .with_name(name)
                .with_options(options)
                .build()
                .await;
            let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
            match made {
                Ok(p) => {
                    let p = Arc::new(Mutex::new(p));
                    map.insert(topic, Slot::Ready(p.clone()));
                    Ok(p)
                }
                Err(e) => {
                    map.remove(&topic);
                    Err(error::classify(&e))
                }
            }
        })
        .map(|joined| {
            joined.unwrap_or_else(|e| {
                Err(PublishError::unavailable(format!(
                    "pulsar: creating a producer: {e}"
                )))
            })
        })
        .boxed()
        .shared()
    }

    /// How long handing one message to the client may take: it takes messages at once while
    /// connected, so waiting longer than a connection attempt tells nothing more.
    fn hand_off_limit(&self) -> Duration {
        self.cfg.connection_timeout.0.min(self.cfg.send_timeout.0)
    }

    /// Sends the messages of one topic, in order. Once a send says the broker is away
    /// (`away`, shared by the whole burst), the rest are reported the same way at once
    /// instead of each waiting for it.
    async fn send_topic(
        &self,
        topic: &str,
        msgs: Vec<(Message, AckTicket)>,
        away: &mut Option<PublishError>,
    ) {
        let producer = match &*away {
            Some(e) => Err(e.clone()),
            None => self.producer(topic).await,
        };
        let producer = match producer {
            Ok(p) => p,
            Err(e) => {
                if e.kind == ErrorKind::Unavailable {
                    *away = Some(e.clone());
                }
                for (_, t) in msgs {
                    t.nack(e.clone());
                }
                return;
            }
        };
        let mut producer = producer.lock().await;
        for (msg, ticket) in msgs {
            if let Some(e) = &*away {
                ticket.nack(e.clone());
                continue;
            }
            match self.hand_off(&mut producer, topic, msg).await {
                Ok((receipt, slot)) => {
                    let pending = Pending {
                        receipt,
                        ticket,
                        _slot: slot,
                    };
                    if let Err(mpsc::error::SendError(p)) = self.receipts.send(pending) {
                        p.ticket
                            .nack(PublishError::unavailable("pulsar: the publisher is closed"));
                    }
                }
                Err(e) => {
                    if e.kind == ErrorKind::Unavailable {
                        *away = Some(e.clone());
                    }
                    ticket.nack(e);
                }
            }
        }
    }

    /// Takes a window slot and hands one message to the client: its receipt and the slot, or
    /// why not (unavailable when the window or the client did not move in time).
    async fn hand_off(
        &self,
        producer: &mut Producer<TokioExecutor>,
        topic: &str,
        msg: Message,
    ) -> Result<(SendFuture, OwnedSemaphorePermit), PublishError> {
        // A full window frees a slot per receipt, and every receipt comes (or expires) within
        // send_timeout: waiting longer would mean the broker is away.
        let room = self.room.clone().acquire_owned();
        let slot = match tokio::time::timeout(self.cfg.send_timeout.0, room).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(PublishError::unavailable("pulsar: the publisher is closed")),
            Err(_) => {
                return Err(PublishError::unavailable(format!(
                    "pulsar: {} messages awaiting receipts for {:?}",
                    self.cfg.max_pending_messages, self.cfg.send_timeout.0
                )))
            }
        };
        let limit = self.hand_off_limit();
        match tokio::time::timeout(limit, producer.send_non_blocking(msg)).await {
            Ok(Ok(receipt)) => Ok((receipt, slot)),
            Ok(Err(e)) => Err(error::classify(&e)),
            Err(_) => Err(PublishError::unavailable(format!(
                "pulsar: the client did not take a message for {topic} within {limit:?}"
            ))),
        }
    }

    /// One lookup of the health topic at a time, as a task of its own (never dropped
    /// half-way); probes arriving meanwhile wait for the same answer.
    fn probe(&self, client: Client) -> Probe {
        let mut slot = self.probe.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = slot.as_ref() {
            if p.peek().is_none() {
                return p.clone();
            }
        }
        let topic = format!(
            "persistent://{}/{}/outbox-relay-health",
            self.cfg.tenant, self.cfg.namespace
        );
        let p = tokio::spawn(async move {
            client
                .lookup_topic(topic)
                .await
                .map(drop)
                .map_err(|e| format!("pulsar: topic lookup failed: {e}"))
        })
        .map(|joined| joined.unwrap_or_else(|e| Err(format!("pulsar: health probe: {e}"))))
        .boxed()
        .shared();
        *slot = Some(p.clone());
        p
    }
}

impl Publisher for PulsarPublisher {
    fn kind(&self) -> &'static str {
        "pulsar"
    }

    /// One producer per topic, taken in order, the partition (of a partitioned topic) by the
    /// key, and pulsar-rs resends a producer's pending messages in sequence after a reconnect.
    fn keeps_order(&self) -> bool {
        true
    }

    fn publish(&self, burst: Vec<Outgoing>) -> BoxFuture<'_, ()> {
        async move {
            // Runs of one topic go to its producer together; topics keep their first-seen order.
            let mut runs: Vec<Run> = Vec::new();
            for o in burst {
                let Outgoing {
                    event,
                    format,
                    ticket,
                } = o;
                // A burst is mostly one topic: its Pulsar name is worked out once.
                let mapped = match runs.iter().find(|(_, from, _)| **from == *event.topic) {
                    Some((to, _, _)) => Ok(to.clone()),
                    None => self.cfg.pulsar_topic(&event.topic),
                };
                let topic = match mapped {
                    Ok(t) => t,
                    Err(why) => {
                        ticket.nack(PublishError::permanent(
                            InvalidEvent::BackendTopic(why).to_string(),
                        ));
                        continue;
                    }
                };
                let msg = match pulsar_message(&event, format, self.limit) {
                    Ok(m) => m,
                    Err(e) => {
                        ticket.nack(PublishError::permanent(e.to_string()));
                        continue;
                    }
                };
                match runs.iter_mut().find(|(t, _, _)| *t == topic) {
                    Some((_, _, v)) => v.push((msg, ticket)),
                    None => runs.push((topic, event.topic.clone(), vec![(msg, ticket)])),
                }
            }
            let mut away = None;
            for (topic, _, msgs) in runs {
                self.send_topic(&topic, msgs, &mut away).await;
            }
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        async move {
            let client = match self.client() {
                Ok(c) => c,
                Err(e) => return Health::Down(e.reason),
            };
            match tokio::time::timeout(self.cfg.health_timeout.0, self.probe(client)).await {
                Ok(Ok(())) => Health::Up,
                Ok(Err(why)) => Health::Down(why),
                Err(_) => Health::Down(format!(
                    "pulsar: no answer to a topic lookup within {:?}",
                    self.cfg.health_timeout.0
                )),
            }
        }
        .boxed()
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        async move {
            let deadline = tokio::time::Instant::now() + timeout;
            // Every slot back means every receipt came.
            let all = self.cfg.max_pending_messages;
            if let Ok(Ok(slots)) =
                tokio::time::timeout_at(deadline, self.room.clone().acquire_many_owned(all)).await
            {
                drop(slots);
            }
            self.room.close();
            // Stops the collector (what still waits resolves as retryable) and the connector.
            self.abandon.cancel();
            let collector = self
                .collector
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(c) = collector {
                let _ = c.await;
            }
            let producers: Vec<SharedProducer> = self
                .producers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter_map(|s| match s {
                    Slot::Ready(p) => Some(p.clone()),
                    Slot::Building(_) => None,
                })
                .collect();
            let until = deadline.max(tokio::time::Instant::now() + Duration::from_millis(200));
            futures::future::join_all(producers.iter().map(|p| async move {
                if let Ok(mut p) = tokio::time::timeout_at(until, p.lock()).await {
                    let _ = tokio::time::timeout_at(until, p.close()).await;
                }
            }))
            .await;
        }
        .boxed()
    }
}
