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
//!   [`config::Config::load`];
//! * running it: [`wiring::relay`] builds a [`relay::Relay`] from the configuration;
//!   [`main`] is the whole command line.
//!
//! The other public modules (`store`'s operator queries, the backends' own types, `relay`'s
//! parts) are public so that the project's own tests and benchmarks can reach what they
//! measure; they are the binary's internals and change without notice. Everything else is
//! private to the crate (`pub(crate)`), and `internals` (hidden from these docs) names the
//! few pieces of it the tests use.
//!
//! # Layout
//! * [`config`]: settings in layers (relay.toml, `RELAY__` environment, flags), validated.
//! * [`envelope`]: the event envelope, its validation and wire encodings.
//! * [`store`]: every SQL statement: migrations, claim, mark, enqueue, counts.
//! * [`relay`]: the pipeline: claim, dispatch (ordering), publish, ACK channel, mark, retry.
//! * [`publisher`]: the backend seam and its backends (`memory`, `stdout`, `kafka`, `nats`,
//!   `pulsar`).
//! * [`wiring`]: the parts put together from the configuration (store session, backends,
//!   tracer, relay), for `run` and `check`.
//! * Private: `metrics` (Prometheus), `http` (/metrics, /livez, /readyz, /health),
//!   `snapshot` (what a running relay shows of itself), `routing` (topic patterns to
//!   backends), `otel` (traces), `cli` (the commands), `telemetry` (logging), `allocator`.
//!
//! docs/ARCHITECTURE.md has the data flow and the invariants; docs/PERFORMANCE.md the figures.

pub mod config;
pub mod envelope;
pub mod publisher;
pub mod relay;
pub mod store;
pub mod wiring;

pub(crate) mod allocator;
pub(crate) mod cli;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod otel;
pub(crate) mod routing;
pub(crate) mod snapshot;
pub(crate) mod telemetry;

/// The `outbox-relay` command line: parses the arguments, runs the command, returns its exit
/// code (the binary's `main` is this and a runtime).
pub use cli::main;

/// Allocator settings for a relay process, applied before its runtime starts.
pub use allocator::tune as tune_allocator;

/// Internals the project's own tests and benchmarks reach. Not part of the API: they change
/// without notice.
#[doc(hidden)]
pub mod internals {
    pub use crate::otel::Tracer;
    pub use crate::relay::ownership::target as partitions_of_relay;
    pub use crate::routing::glob_match;
}
