//! outbox-relay: publishes events that services write into a Postgres outbox table to Kafka
//! and NATS, at least once, in order per aggregate.
//!
//! # Layout
//! * [`config`]: settings in layers (relay.toml, `RELAY__` environment, flags), validated.
//! * [`envelope`]: the event envelope, its validation and wire encodings.
//! * [`store`]: every SQL statement: migrations, claim, mark, enqueue, counts.
//! * [`relay`]: the pipeline: claim, dispatch (ordering), publish, ACK channel, mark, retry.
//! * [`publisher`]: the backend seam and its backends (`memory`, `stdout`, `kafka`, `nats`).
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
