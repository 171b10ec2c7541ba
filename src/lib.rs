//! outbox-relay: publishes events that services write into a Postgres outbox table to Kafka,
//! NATS and Pulsar, at least once, in order per aggregate.
//!
//! # The public API
//! What a program built on this library may rely on:
//! * the producer API: [`store::Outbox`] and [`store::NewEvent`] write events inside the
//!   caller's own transaction (any other language writes the row with plain SQL);
//! * the publisher seam: [`publisher::Publisher`], [`publisher::Outgoing`],
//!   [`publisher::AckTicket`] and [`publisher::PublishError`], the contract in their docs;
//! * the configuration: [`config::Config`] and its sections, loaded and checked by
//!   [`config::Config::load`], and [`wiring::relay`], which builds a relay from it.
//!
//! The other modules are public so that the project's own tests and benchmarks can reach the
//! parts they measure; they are the binary's internals and change without notice.
//!
//! # Layout
//! * [`config`]: settings in layers (relay.toml, `RELAY__` environment, flags), validated.
//! * [`envelope`]: the event envelope, its validation and wire encodings.
//! * [`store`]: every SQL statement: migrations, claim, mark, enqueue, counts.
//! * [`relay`]: the pipeline: claim, dispatch (ordering), publish, ACK channel, mark, retry.
//! * [`publisher`]: the backend seam and its backends (`memory`, `stdout`, `kafka`, `nats`,
//!   `pulsar`).
//! * [`metrics`]: the Prometheus metrics; [`http`]: /metrics, /livez, /readyz, /health.
//! * [`snapshot`]: what a running relay shows of itself (totals, last probes and counts).
//! * [`routing`]: topic patterns to backends.
//! * [`cli`]: the `outbox-relay` commands.
//! * [`telemetry`]: logging setup.
//! * [`wiring`]: the parts put together from the configuration (store session, backends,
//!   tracer, relay), for `run` and `check`.
//!
//! docs/ARCHITECTURE.md has the data flow and the invariants; docs/PERFORMANCE.md the figures.

pub mod allocator;
pub mod cli;
pub mod config;
pub mod envelope;
pub mod http;
pub mod metrics;
pub mod otel;
pub mod publisher;
pub mod relay;
pub mod routing;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod wiring;
