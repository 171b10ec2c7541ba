//! NATS backend: JetStream for persistent topics (a PubAck per message), core NATS for
//! ephemeral ones (the flush is the acknowledgement), chosen per topic as the EventBus did.
//!
//! * JetStream publishes are pipelined: each carries a reply subject of the publisher's own
//!   subscription, and one task matches the PubAcks to their tickets as they come (`acks.rs`).
//!   `max_in_flight` bounds how many wait at once; a full window makes `publish` wait
//!   (backpressure).
//! * Every message carries `Nats-Msg-Id` = event id, so a re-publish after a crash is dropped
//!   by the server within the stream's duplicate window; a PubAck marked duplicate is a success.
//! * The client reconnects by itself with capped exponential backoff; publishes made while it
//!   is away time out into retryable results, and the rows stay pending.
//! * "No responders" to a JetStream publish means no stream took the subject: either none
//!   covers it, or the one that does has no leader right now (an election, servers
//!   restarting). `NoResponders` asks JetStream which: the first fails the event, the second
//!   waits for the stream like any outage.

mod acks;
pub mod config;
pub mod error;
mod message;
pub mod provision;

pub use config::NatsConfig;
use message::Payload;
pub use message::{nats_headers, nats_headers_size, nats_message, NatsMessage};

use super::{AckTicket, Health, Outgoing, PublishError, Publisher};
use acks::AckPath;
use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Subject};
use bytes::Bytes;
use config::Persistence;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct NatsPublisher {
    client: Client,
    js: async_nats::jetstream::Context,
    cfg: Arc<NatsConfig>,
    acks: AckPath,
    reconnects: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
#[error("connecting to NATS: {0}")]
pub struct ConnectError(String);

impl NatsPublisher {
    /// Connects (or, when no server answers now, keeps trying in the background: the relay
    /// starts and its publishes time out until a server is back).
    pub async fn connect(cfg: &NatsConfig) -> Result<Self, ConnectError> {
        let reconnects = Arc::new(AtomicU64::new(0));
        let opts = with_credentials(client_options(cfg, reconnects.clone()), cfg).await?;
        let servers: Vec<async_nats::ServerAddr> = cfg
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| ConnectError(format!("a server URL: {e}")))?;
        let client = async_nats::connect_with_options(servers, opts)
            .await
            .map_err(|e| ConnectError(e.to_string()))?;
        wait_for_first_connection(&client, cfg).await;
        // For the JetStream API (stream lookups, health, provisioning); publishes go through
        // the ack path.
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(cfg.ack_timeout.0)
            .build(client.clone());
        let acks = AckPath::start(
            &client,
            Arc::new(NoResponders::new(js.clone(), cfg.ack_timeout.0)),
            cfg.ack_timeout.0,
            cfg.max_in_flight as usize,
        )
        .await
        .map_err(|e| ConnectError(format!("subscribing to the PubAck inbox: {e}")))?;
        Ok(NatsPublisher {
            client,
            js,
            cfg: Arc::new(cfg.clone()),
            acks,
            reconnects,
        })
    }

    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.js
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Times the connection was lost since start.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// How long an answer about a subject's stream is reused: a burst of "no responders" costs
/// one lookup, and a stream created or elected since is seen within this.
const STREAM_LOOKUP_TTL: Duration = Duration::from_secs(1);

/// What a lookup learned about a subject: the covering stream (`None`: no stream covers it),
/// or that JetStream did not say (why).
#[derive(Clone)]
enum StreamSeen {
    Covered(Option<String>),
    Unknown(String),
}

/// Tells the two meanings of "no responders" apart by asking JetStream which stream covers
/// the subject (`STREAM.NAMES` with a subject filter).
struct NoResponders {
    js: async_nats::jetstream::Context,
    timeout: Duration,
    /// Per subject: when it was looked up, and what was learned.
    known: std::sync::Mutex<HashMap<Arc<str>, (std::time::Instant, StreamSeen)>>,
    /// One lookup at a time: the events of a burst wait for the first one's answer instead of
    /// each asking JetStream (which, away, would have each wait the timeout).
    asking: tokio::sync::Mutex<()>,
}

impl NoResponders {
    fn new(js: async_nats::jetstream::Context, timeout: Duration) -> Self {
        NoResponders {
            js,
            timeout,
            known: Default::default(),
            asking: Default::default(),
        }
    }

    fn cached(&self, subject: &Arc<str>) -> Option<StreamSeen> {
        self.known
            .lock()
            .ok()
            .and_then(|k| k.get(subject).cloned())
            .filter(|(at, _)| at.elapsed() < STREAM_LOOKUP_TTL)
            .map(|(_, seen)| seen)
    }

    async fn classify(&self, subject: &Arc<str>) -> PublishError {
        let seen = match self.cached(subject) {
            Some(seen) => seen,
            None => {
                let _one = self.asking.lock().await;
                match self.cached(subject) {
                    // Asked while this one waited its turn.
                    Some(seen) => seen,
                    None => self.look_up(subject).await,
                }
            }
        };
        match seen {
            StreamSeen::Covered(stream) => error::no_responders(subject, stream.as_deref()),
            StreamSeen::Unknown(why) => error::no_responders_unknown(subject, &why),
        }
    }

    async fn look_up(&self, subject: &Arc<str>) -> StreamSeen {
        use async_nats::jetstream::context::GetStreamByNameErrorKind;
        let found =
            tokio::time::timeout(self.timeout, self.js.stream_by_subject(subject.to_string()))
                .await;
        let seen = match found {
            Ok(Ok(name)) => StreamSeen::Covered(Some(name)),
            Ok(Err(e)) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                StreamSeen::Covered(None)
            }
            // JetStream itself did not answer: nothing is known about the stream.
            Ok(Err(e)) => StreamSeen::Unknown(e.to_string()),
            Err(_) => StreamSeen::Unknown("no answer in time".into()),
        };
        if let Ok(mut k) = self.known.lock() {
            // Subjects are topics, few; a flood of distinct ones only costs lookups.
            if k.len() >= 4096 {
                k.clear();
            }
            k.insert(subject.clone(), (std::time::Instant::now(), seen.clone()));
        }
        seen
    }
}

/// The client's options: its name, timeouts, the PubAck subscription's capacity, reconnects
/// forever with a capped backoff, counted in `reconnects`.
fn client_options(cfg: &NatsConfig, counter: Arc<AtomicU64>) -> ConnectOptions {
    let max_delay = cfg.reconnect_delay_max.0;
    ConnectOptions::new()
        .name(&cfg.name)
        .connection_timeout(cfg.connect_timeout.0)
        .request_timeout(Some(cfg.ack_timeout.0))
        // PubAcks arrive on one subscription; its buffer holds every one that can be due,
        // so none is dropped as a slow consumer's.
        .subscription_capacity((cfg.max_in_flight as usize * 2).max(64 * 1024))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| {
            let exp = Duration::from_millis(100) * 2u32.saturating_pow(attempts.min(16) as u32);
            exp.min(max_delay)
        })
        .event_callback(move |event| {
            let counter = counter.clone();
            async move {
                // async-nats logs every connection event itself; we count the losses.
                if matches!(event, async_nats::Event::Disconnected) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
}

/// Adds the configured credentials and TLS to `opts`.
async fn with_credentials(
    mut opts: ConnectOptions,
    cfg: &NatsConfig,
) -> Result<ConnectOptions, ConnectError> {
    if let Some(t) = &cfg.token {
        opts = opts.token(t.expose().to_string());
    }
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.expose().to_string());
    }
    if let Some(seed) = &cfg.nkey_seed {
        opts = opts.nkey(seed.expose().to_string());
    }
    if let Some(path) = &cfg.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| ConnectError(format!("reading creds_file {path:?}: {e}")))?;
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.into());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(cert.into(), key.into());
    }
    Ok(opts)
}

/// The client connects in the background (so a server that is down now is no start-up error);
/// it gets the connect timeout to come up before the first publish.
async fn wait_for_first_connection(client: &async_nats::Client, cfg: &NatsConfig) {
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout.0;
    while client.connection_state() != State::Connected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if client.connection_state() != State::Connected {
        tracing::warn!(
            servers = ?cfg.servers.iter().map(|s| crate::config::secrets::redact_url(s)).collect::<Vec<_>>(),
            "nats: no server reachable yet; connecting in the background"
        );
    }
}

/// Why a core NATS publish failed, and whether the connection (not the message) is at fault.
struct CoreFailure {
    reason: String,
    connection: bool,
}

impl NatsPublisher {
    /// A core NATS publish (ephemeral topics): written to the connection, no acknowledgement.
    async fn publish_core(
        &self,
        subject: &str,
        to: Subject,
        headers: async_nats::HeaderMap,
        body: Bytes,
    ) -> Result<(), CoreFailure> {
        self.client
            .publish_with_headers(to, headers, body)
            .await
            .map_err(|e| {
                use async_nats::client::PublishErrorKind as Core;
                CoreFailure {
                    reason: format!("nats: publishing to {subject:?}: {e}"),
                    // About this message only (the publisher's checks make them unlikely):
                    // the connection is fine.
                    connection: !matches!(
                        e.kind(),
                        Core::MaxPayloadExceeded | Core::InvalidSubject
                    ),
                }
            })
    }
}

/// Core NATS has no acknowledgement; a flushed write is as far as it goes. The flush waits for
/// a reconnect while disconnected, so it runs off the relay's loop; the publish timeout bounds
/// it.
fn ack_once_flushed(client: async_nats::Client, flushed: Vec<AckTicket>) {
    tokio::spawn(async move {
        match client.flush().await {
            Ok(()) => flushed.into_iter().for_each(AckTicket::ack),
            Err(e) => {
                for t in flushed {
                    t.nack(PublishError::unavailable(format!("nats: flush: {e}")));
                }
            }
        }
    });
}

impl Publisher for NatsPublisher {
    fn reconnects(&self) -> u64 {
        Self::reconnects(self)
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    /// One connection: the server receives (and JetStream stores) messages in the order they
    /// were written to it.
    fn keeps_order(&self) -> bool {
        true
    }

    fn publish(&self, burst: Vec<Outgoing>) -> BoxFuture<'_, ()> {
        async move {
            let mut flushed: Vec<AckTicket> = Vec::new();
            // While the client is away its command queue fills and every send would wait for
            // its timeout, holding up the relay; the rows are retried after a backoff instead.
            let mut away = self.client.connection_state() != State::Connected;
            let max_payload = self.client.max_payload();
            // A burst's events mostly share a topic: its subject and persistence are worked
            // out once for a run of them.
            let mut topic: Option<(Arc<str>, Subject, Persistence)> = None;
            for o in burst {
                // A row NATS cannot carry fails now, connected or not: the same row would fail
                // the same way after a reconnect.
                let (headers, body) = match nats_message(&o.event, o.format, Some(max_payload)) {
                    Ok(NatsMessage { headers, body }) => (
                        headers,
                        match body {
                            // The payload as it is: the message holds the event, not a copy.
                            Cow::Borrowed(_) => Bytes::from_owner(Payload(o.event.clone())),
                            Cow::Owned(body) => Bytes::from(body),
                        },
                    ),
                    Err(e) => {
                        o.ticket.nack(PublishError::permanent(e.to_string()));
                        continue;
                    }
                };
                if away {
                    o.ticket.nack(PublishError::unavailable(
                        "nats: not connected to the server; waiting for the reconnect",
                    ));
                    continue;
                }
                let (subject, to, persistence) = match &topic {
                    Some((s, to, p)) if **s == *o.event.topic => (s.clone(), to.clone(), *p),
                    _ => {
                        let s: Arc<str> = o.event.topic.as_str().into();
                        let seen = (s.clone(), Subject::from(&*s), self.cfg.persistence_for(&s));
                        topic = Some(seen.clone());
                        seen
                    }
                };
                match persistence {
                    Persistence::Ephemeral => {
                        let sent = self.publish_core(&subject, to, headers, body).await;
                        match sent {
                            Ok(()) => flushed.push(o.ticket),
                            Err(CoreFailure { reason, connection }) => {
                                away |= connection;
                                o.ticket.nack(if connection {
                                    PublishError::unavailable(reason)
                                } else {
                                    PublishError::permanent(reason)
                                })
                            }
                        }
                    }
                    Persistence::Persistent | Persistence::Auto => {
                        // A client that took nothing spares the rest of the burst the
                        // same wait.
                        away |= self
                            .acks
                            .send(&self.client, subject, to, headers, body, o.ticket)
                            .await;
                    }
                }
            }
            if !flushed.is_empty() {
                ack_once_flushed(self.client.clone(), flushed);
            }
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        async move {
            match self.client.connection_state() {
                State::Connected => {}
                other => return Health::Down(format!("not connected to NATS ({other})")),
            }
            let wants_jetstream = self.cfg.default_persistence() == Persistence::Persistent
                || self
                    .cfg
                    .topics
                    .values()
                    .any(|t| t.persistence == Persistence::Persistent);
            if wants_jetstream {
                // Any answer from the JetStream API (here: "stream not found") shows it is up;
                // no responders or a timeout shows it is not. Cheap, and works across server
                // versions, unlike parsing the account info.
                use async_nats::jetstream::context::GetStreamErrorKind;
                match self.js.get_stream("outbox-relay-health-probe").await {
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(_)) => {}
                    Err(e) => return Health::Down(format!("JetStream is not available: {e}")),
                }
            }
            Health::Up
        }
        .boxed()
    }

    fn close(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        async move {
            // A final flush sends what the client still buffers; then the PubAcks still due
            // get the rest of the time, and those that do not come are reported unavailable.
            let started = tokio::time::Instant::now();
            let _ = tokio::time::timeout(timeout, self.client.flush()).await;
            self.acks
                .settle(timeout.saturating_sub(started.elapsed()))
                .await;
        }
        .boxed()
    }
}
