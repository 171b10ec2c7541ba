//! NATS backend: JetStream for persistent topics (a PubAck per message), core NATS for
//! ephemeral ones (the flush is the acknowledgement), chosen per topic as the EventBus did.
//!
//! * JetStream publishes are pipelined: each returns a PubAck future at once, which a collector
//!   task awaits while more are sent. The context's window (`max_in_flight`) bounds how many
//!   wait at once; a full window makes `publish` wait (backpressure) instead of hanging, which
//!   is what collecting more futures than the window without awaiting any would do.
//! * Every message carries `Nats-Msg-Id` = event id, so a re-publish after a crash is dropped
//!   by the server within the stream's duplicate window; a PubAck marked duplicate is a success.
//! * The client reconnects by itself with capped exponential backoff; publishes made while it
//!   is away time out into retryable results, and the rows stay pending.
//! * "No responders" to a JetStream publish means no stream took the subject: either none
//!   covers it, or the one that does has no leader right now (an election, servers
//!   restarting). [`NoResponders`] asks JetStream which: the first fails the event, the second
//!   waits for the stream like any outage.

pub mod config;
pub mod error;
pub mod provision;

pub use config::NatsConfig;

use super::{AckTicket, Health, Outgoing, PublishError, Publisher};
use crate::envelope::{shown, BodyFormat, Event, InvalidEvent, Wire};
use async_nats::connection::State;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{Client, ConnectOptions, HeaderMap, HeaderName, HeaderValue};
use config::Persistence;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

type PendingAck = (PublishAckFuture, AckTicket, Arc<str>);

pub struct NatsPublisher {
    client: Client,
    js: async_nats::jetstream::Context,
    cfg: Arc<NatsConfig>,
    acks: mpsc::UnboundedSender<PendingAck>,
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
        let counter = reconnects.clone();
        let max_delay = cfg.reconnect_delay_max.0;
        let mut opts = ConnectOptions::new()
            .name(&cfg.name)
            .connection_timeout(cfg.connect_timeout.0)
            .request_timeout(Some(cfg.ack_timeout.0))
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
            });
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
        let servers: Vec<async_nats::ServerAddr> = cfg
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| ConnectError(format!("a server URL: {e}")))?;
        let client = async_nats::connect_with_options(servers, opts)
            .await
            .map_err(|e| ConnectError(e.to_string()))?;
        // The client connects in the background (so a server that is down now is no start-up
        // error); give it the connect timeout to come up before the first publish.
        let deadline = tokio::time::Instant::now() + cfg.connect_timeout.0;
        while client.connection_state() != State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if client.connection_state() != State::Connected {
            tracing::warn!(
                servers = ?cfg.servers.iter().map(|s| crate::config::redact_url(s)).collect::<Vec<_>>(),
                "nats: no server reachable yet; connecting in the background"
            );
        }
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(cfg.ack_timeout.0)
            .max_ack_inflight(cfg.max_in_flight as usize)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let (acks, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect_acks(
            rx,
            Arc::new(NoResponders::new(js.clone(), cfg.ack_timeout.0)),
        ));
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

/// An event as a NATS message: its headers (the relay's metadata, the row's own headers and
/// `Nats-Msg-Id` = event id) and its body.
#[derive(Debug)]
pub struct NatsMessage {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Builds the NATS message of an event without a connection, or says why the row cannot be
/// sent: a subject NATS refuses, headers HPUB cannot carry, a row header standing in for a
/// `Nats-*` control header, a row the route's format cannot carry (see [`Event::message`]),
/// or (with the server's `max_payload`, when known) a message larger than the server takes.
/// CloudEvents in binary mode follow the NATS binding: `ce-*` headers, values
/// percent-encoded. Never panics, whatever the row holds.
pub fn nats_message(
    event: &Event,
    format: BodyFormat,
    max_payload: Option<usize>,
) -> Result<NatsMessage, InvalidEvent> {
    config::validate_subject(&event.topic).map_err(InvalidEvent::BackendTopic)?;
    event.validate_for(Wire::Nats)?;
    let (wire, body) = event.message(format, Wire::Nats)?;
    let headers = header_map(event, wire)?;
    if let Some(limit) = max_payload.filter(|m| *m > 0) {
        let overhead = nats_headers_size(&headers);
        let size = overhead.saturating_add(body.len());
        if size > limit {
            return Err(InvalidEvent::MessageTooLarge {
                backend: "NATS",
                size,
                payload: body.len(),
                overhead,
                limit_name: "server's max_payload",
                limit,
            });
        }
    }
    Ok(NatsMessage { headers, body })
}

/// The headers of an event's NATS message in the route's format; see [`nats_message`].
pub fn nats_headers(event: &Event, format: BodyFormat) -> Result<HeaderMap, InvalidEvent> {
    event.validate_for(Wire::Nats)?;
    header_map(event, event.headers_for(format, Wire::Nats)?)
}

/// The message's headers as the client's map, with `Nats-Msg-Id` = event id.
fn header_map(event: &Event, wire: Vec<(&str, String)>) -> Result<HeaderMap, InvalidEvent> {
    let mut h = HeaderMap::new();
    // validate_for has checked every name and value (and CloudEvents values are
    // percent-encoded); the fallible conversions keep a rule the client adds later from
    // becoming a panic (its `&str` conversions assert).
    for (k, v) in wire {
        let name = HeaderName::from_str(k).map_err(|e| InvalidEvent::Header {
            name: shown(k),
            problem: e.to_string(),
        })?;
        let value = HeaderValue::from_str(&v).map_err(|e| InvalidEvent::Header {
            name: shown(k),
            problem: format!("its value {}: {e}", shown(&v)),
        })?;
        h.append(name, value);
    }
    let id =
        HeaderValue::from_str(&event.event_id.to_string()).map_err(|e| InvalidEvent::Header {
            name: shown(async_nats::header::NATS_MESSAGE_ID.as_ref()),
            problem: e.to_string(),
        })?;
    h.insert(async_nats::header::NATS_MESSAGE_ID, id);
    Ok(h)
}

/// The size of a header block on the wire ("NATS/1.0\r\n", "name: value\r\n" each, "\r\n"),
/// which the server counts against max_payload with the body.
pub fn nats_headers_size(headers: &HeaderMap) -> usize {
    let mut len = "NATS/1.0\r\n".len() + "\r\n".len();
    for (k, vs) in headers.iter() {
        let name: &str = k.as_ref();
        for v in vs {
            len = len.saturating_add(name.len() + ": ".len() + v.as_str().len() + "\r\n".len());
        }
    }
    len
}

/// Awaits PubAcks as they come and resolves their tickets.
async fn collect_acks(mut rx: mpsc::UnboundedReceiver<PendingAck>, lookup: Arc<NoResponders>) {
    let mut waiting = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some((fut, ticket, subject)) => {
                    let lookup = lookup.clone();
                    waiting.push(async move {
                        let outcome = match fut.await {
                            // A duplicate PubAck means the stream already has this event id:
                            // delivered.
                            Ok(_) => Ok(()),
                            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                                Err(lookup.classify(&subject).await)
                            }
                            Err(e) => Err(error::classify(&subject, &e)),
                        };
                        (outcome, ticket)
                    })
                }
                None if waiting.is_empty() => return,
                None => {
                    while let Some((outcome, ticket)) = waiting.next().await {
                        ticket.resolve(outcome);
                    }
                    return;
                }
            },
            Some((outcome, ticket)) = waiting.next(), if !waiting.is_empty() => {
                ticket.resolve(outcome);
            }
        }
    }
}

/// How long an answer about a subject's stream is reused: a burst of "no responders" costs
/// one lookup, and a stream created or elected since is seen within this.
const STREAM_LOOKUP_TTL: Duration = Duration::from_secs(1);

/// When a subject's stream was looked up, and its name (`None`: no stream covers it).
type StreamSeen = (std::time::Instant, Option<String>);

/// Tells the two meanings of "no responders" apart by asking JetStream which stream covers
/// the subject (`STREAM.NAMES` with a subject filter).
struct NoResponders {
    js: async_nats::jetstream::Context,
    timeout: Duration,
    /// Per subject: when it was looked up, and the covering stream (`None`: none covers it).
    known: std::sync::Mutex<HashMap<Arc<str>, StreamSeen>>,
}

impl NoResponders {
    fn new(js: async_nats::jetstream::Context, timeout: Duration) -> Self {
        NoResponders {
            js,
            timeout,
            known: Default::default(),
        }
    }

    async fn classify(&self, subject: &Arc<str>) -> PublishError {
        let cached = self
            .known
            .lock()
            .ok()
            .and_then(|k| k.get(subject).cloned())
            .filter(|(at, _)| at.elapsed() < STREAM_LOOKUP_TTL);
        let stream = match cached {
            Some((_, stream)) => stream,
            None => {
                let found = tokio::time::timeout(
                    self.timeout,
                    self.js.stream_by_subject(subject.to_string()),
                )
                .await;
                let stream = match found {
                    Ok(Ok(name)) => Some(name),
                    Ok(Err(e))
                        if e.kind()
                            == async_nats::jetstream::context::GetStreamByNameErrorKind::NotFound =>
                    {
                        None
                    }
                    // JetStream itself did not answer: nothing is known about the stream.
                    Ok(Err(e)) => return error::no_responders_unknown(subject, &e.to_string()),
                    Err(_) => return error::no_responders_unknown(subject, "no answer in time"),
                };
                if let Ok(mut k) = self.known.lock() {
                    // Subjects are topics, few; a flood of distinct ones only costs lookups.
                    if k.len() >= 4096 {
                        k.clear();
                    }
                    k.insert(subject.clone(), (std::time::Instant::now(), stream.clone()));
                }
                stream
            }
        };
        error::no_responders(subject, stream.as_deref())
    }
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
            for o in burst {
                // A row NATS cannot carry fails now, connected or not: the same row would fail
                // the same way after a reconnect.
                let NatsMessage { headers, body } =
                    match nats_message(&o.event, o.format, Some(max_payload)) {
                        Ok(m) => m,
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
                let subject: Arc<str> = o.event.topic.as_str().into();
                match self.cfg.persistence_for(&subject) {
                    Persistence::Ephemeral => {
                        match self
                            .client
                            .publish_with_headers(subject.to_string(), headers, body.into())
                            .await
                        {
                            Ok(()) => flushed.push(o.ticket),
                            Err(e) => {
                                use async_nats::client::PublishErrorKind as Core;
                                let reason = format!("nats: publishing to {subject:?}: {e}");
                                match e.kind() {
                                    // About this message only (the checks above make them
                                    // unlikely): the connection is fine.
                                    Core::MaxPayloadExceeded | Core::InvalidSubject => {
                                        o.ticket.nack(PublishError::permanent(reason))
                                    }
                                    Core::Send => {
                                        away = true;
                                        o.ticket.nack(PublishError::unavailable(reason))
                                    }
                                }
                            }
                        }
                    }
                    Persistence::Persistent | Persistence::Auto => {
                        let msg = PublishMessage::build()
                            .payload(body.into())
                            .headers(headers);
                        match self.js.send_publish(subject.to_string(), msg).await {
                            Ok(fut) => {
                                if let Err(mpsc::error::SendError((_, ticket, _))) =
                                    self.acks.send((fut, o.ticket, subject))
                                {
                                    ticket.nack(PublishError::retryable(
                                        "nats: the acknowledgement collector has stopped",
                                    ));
                                }
                            }
                            Err(e) => {
                                // The message never left: a timeout here is the client's queue.
                                away |= e.kind() == PublishErrorKind::TimedOut;
                                o.ticket.nack(error::classify(&subject, &e))
                            }
                        }
                    }
                }
            }
            if !flushed.is_empty() {
                // Core NATS has no acknowledgement; a flushed write is as far as it goes. The
                // flush waits for a reconnect while disconnected, so it runs off the relay's
                // loop; the publish timeout bounds it.
                let client = self.client.clone();
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
            // PubAcks still outstanding resolve in the collector (or time out into retryable
            // results); a final flush sends what core NATS still buffers.
            let _ = tokio::time::timeout(timeout, self.client.flush()).await;
        }
        .boxed()
    }
}
