//! OpenTelemetry traces over OTLP/HTTP, when `tracing.otlp_endpoint` is set.
//!
//! * A span per claimed batch (`outbox claim`, from the claim until its verdicts commit).
//! * A span per published event (`<topic> publish`, kind producer, from the hand-off until the
//!   backend's acknowledgement; an error status with the reason when it fails). It is a child of
//!   the row's `traceparent` when the row has one, so the relay's work joins the trace that wrote
//!   the event; otherwise a child of its batch's span. Either way it links to the batch span.
//! * The message's `traceparent` header carries the event span's context, so consumers continue
//!   the same trace (same trace id, the relay's span as their parent).
//!
//! Off, [`Tracer`] holds nothing and every call returns at once: no span, no allocation, the
//! row's own `traceparent` passes through unchanged.
//!
//! Spans are batched and exported from the SDK's own thread with a blocking HTTP client, so
//! the relay's runtime never waits on a collector; a collector that is down costs dropped
//! spans, never events.

use crate::config::TracingConfig;
use crate::envelope::headers::TRACEPARENT;
use crate::envelope::Event;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};
use opentelemetry_sdk::Resource;
use std::borrow::Cow;
use std::time::Duration;

/// The relay's tracer: on (an SDK tracer exporting over OTLP) or off (nothing).
#[derive(Default)]
pub struct Tracer {
    on: Option<(SdkTracerProvider, SdkTracer)>,
}

/// A span of the relay's, or nothing when tracing is off.
pub type MaybeSpan = Option<Span>;

impl Tracer {
    pub fn off() -> Tracer {
        Tracer { on: None }
    }

    /// Builds the exporter and provider; `Ok(off)` when no endpoint is configured.
    pub fn from_config(cfg: &TracingConfig) -> Result<Tracer, String> {
        if cfg.otlp_endpoint.is_empty() {
            return Ok(Tracer::off());
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(cfg.otlp_endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("tracing.otlp_endpoint {}: {e}", cfg.otlp_endpoint))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            // Rows with a traceparent follow its sampled flag; traces started here are
            // sampled at the configured ratio.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("outbox-relay");
        Ok(Tracer {
            on: Some((provider, tracer)),
        })
    }

    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// The span of one claimed batch.
    pub fn claim_span(&self, rows: usize) -> MaybeSpan {
        let (_, tracer) = self.on.as_ref()?;
        Some(
            tracer
                .span_builder("outbox claim")
                .with_kind(SpanKind::Internal)
                .with_attributes([KeyValue::new("outbox.batch.rows", rows as i64)])
                .start(tracer),
        )
    }

    /// The span of one event's publication, and the event as it goes on the wire (its
    /// `traceparent` now the span's). `None` when tracing is off: publish the row as it is.
    pub fn publish_span(
        &self,
        event: &Event,
        backend: &str,
        batch: Option<&Span>,
    ) -> Option<(Span, Event)> {
        let (_, tracer) = self.on.as_ref()?;
        let batch_cx = batch.map(|b| b.span_context().clone());
        let parent = match event.traceparent.as_deref().and_then(parse_traceparent) {
            Some(remote) => Context::new().with_remote_span_context(remote),
            None => match &batch_cx {
                Some(b) => Context::new().with_remote_span_context(b.clone()),
                None => Context::new(),
            },
        };
        let mut builder = tracer
            .span_builder(format!("{} publish", event.topic))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.operation.type", "publish"),
                KeyValue::new("messaging.system", backend.to_string()),
                KeyValue::new("messaging.destination.name", event.topic.clone()),
                KeyValue::new("messaging.message.id", event.event_id.to_string()),
                KeyValue::new("outbox.aggregate_id", event.aggregate_id.clone()),
                KeyValue::new("outbox.event_type", event.event_type.clone()),
                KeyValue::new("outbox.attempt", event.attempts as i64 + 1),
            ]);
        if let Some(b) = batch_cx {
            builder = builder.with_links(vec![Link::with_context(b)]);
        }
        let span = builder.start_with_context(tracer, &parent);
        let mut wire = event.clone();
        let sc = span.span_context();
        if sc.is_valid() {
            wire.traceparent = Some(format_traceparent(sc));
        }
        Some((span, wire))
    }

    /// Ends an event's span with the backend's verdict.
    pub fn end_publish(mut span: Span, outcome: Result<(), &str>) {
        if let Err(reason) = outcome {
            span.set_status(Status::error(reason.to_string()));
        }
        span.end();
    }

    /// Exports what is buffered (at shutdown), waiting at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let Some((provider, _)) = &self.on else {
            return;
        };
        let provider = provider.clone();
        let flushing = tokio::task::spawn_blocking(move || provider.force_flush());
        if let Ok(Ok(Err(e))) = tokio::time::timeout(timeout, flushing).await {
            tracing::debug!(error = %e, "could not export the last spans");
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some((provider, _)) = self.on.take() {
            // Off the runtime's threads: shutting down exports over a blocking client.
            std::thread::spawn(move || {
                let _ = provider.shutdown_with_timeout(Duration::from_secs(5));
            });
        }
    }
}

/// One `traceparent` value as the carrier the W3C propagator reads from (borrowed from the row)
/// and writes to.
#[derive(Default)]
struct OneHeader<'a>(Option<Cow<'a, str>>);

impl Extractor for OneHeader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0.as_deref()).flatten()
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

impl Injector for OneHeader<'_> {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(Cow::Owned(value));
        }
    }
}

/// A W3C traceparent (`00-<trace id>-<span id>-<flags>`) as a remote span context, read by
/// OpenTelemetry's own propagator; `None` when malformed (rows are validated before
/// publishing, so this is belt and braces). Upper-case hex is read as lower case, as row
/// validation accepts it.
pub fn parse_traceparent(s: &str) -> Option<SpanContext> {
    let s = s.trim();
    let lower = if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    };
    let carrier = OneHeader(Some(lower));
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The `traceparent` of a span context, written by OpenTelemetry's propagator.
pub fn format_traceparent(sc: &SpanContext) -> String {
    let mut carrier = OneHeader::default();
    let cx = Context::new().with_remote_span_context(sc.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.0.map(Cow::into_owned).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_bad_ones_are_refused() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).unwrap();
        assert_eq!(format_traceparent(&sc), tp);
        let upper = parse_traceparent(&tp.to_ascii_uppercase()).unwrap();
        assert_eq!(format_traceparent(&upper), tp);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn off_creates_nothing() {
        let t = Tracer::off();
        assert!(!t.is_on());
        assert!(t.claim_span(10).is_none());
        let e = crate::envelope::sample_event(1, "a");
        assert!(t.publish_span(&e, "kafka", None).is_none());
    }
}
