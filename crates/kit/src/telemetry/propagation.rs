//! W3C trace context (`traceparent`, `tracestate`) in and out: HTTP headers on every hop, and
//! the `traceparent` text events carry through the outbox, the stream and the queue. All of
//! it is a no-op while traces are off ([`super::traces_on`]).

use std::collections::HashMap;

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` continue the trace the request's headers carry (the caller's span as its
/// parent). Without a `traceparent` the span keeps its place (a new trace, or the span it
/// was created in).
pub fn continue_from_headers(span: &tracing::Span, headers: &HeaderMap) {
    if !super::traces_on() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to the trace the request's headers carry, without joining it: for the public
/// edge, where a client must not choose the trace (nor, through its sampled flag, force every
/// span of the request to be recorded and exported).
pub fn link_from_headers(span: &tracing::Span, headers: &HeaderMap) {
    if !super::traces_on() || !headers.contains_key("traceparent") {
        return;
    }
    let caller = TraceContextPropagator::new().extract(&Headers(headers));
    let caller = caller.span().span_context().clone();
    if caller.is_valid() {
        span.add_link(caller);
    }
}

/// Writes `span`'s context into outgoing headers, so the callee's span is its child.
pub fn inject_into_headers(span: &tracing::Span, headers: &mut HeaderMap) {
    if !super::traces_on() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
}

/// `span`'s context as a `traceparent` value (what an event carries), if it has one.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !super::traces_on() {
        return None;
    }
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut fields);
    fields.remove("traceparent")
}

/// The trace context a `traceparent` value names.
fn context_of(traceparent: &str) -> Option<opentelemetry::Context> {
    let fields = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&fields);
    context.span().span_context().is_valid().then_some(context)
}

/// Makes `span` (a consumer's, a relay's) a child of the span that wrote the event.
pub fn continue_from_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if !super::traces_on() {
        return;
    }
    if let Some(parent) = traceparent.and_then(context_of) {
        let _ = span.set_parent(parent);
    }
}

/// Links `span` (one that handles many events, such as a window update) to the span that
/// wrote an event.
pub fn link_to_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if !super::traces_on() {
        return;
    }
    if let Some(context) = traceparent.and_then(context_of) {
        span.add_link(context.span().span_context().clone());
    }
}
