//! Spans of the asynchronous legs, per OpenTelemetry's messaging conventions: the relay's
//! `send` (a producer span, child of the span that wrote the event, whose context then
//! travels in the record's `traceparent`), and a consumer's `process` (a child of that
//! producer span, or, for a batch folded into one update, a span linked to each).

use kit::telemetry::propagation::{continue_from_traceparent, link_to_traceparent, traceparent_of};
use kit::telemetry::traces_on;

use crate::Headers;
use crate::event::attr;

/// The producer span of one record the relay sends to `destination` (a topic or queue name),
/// continuing the trace of the transaction that wrote it; the record's `traceparent` is set
/// to this span, so its consumers are children of the send. `owner` is the service whose
/// outbox it is. `None` while traces are off.
pub fn send_span(
    owner: &'static str,
    system: &'static str,
    destination: &str,
    headers: &mut Headers,
) -> Option<tracing::Span> {
    if !traces_on() {
        return None;
    }
    let span = tracing::info_span!(
        "send",
        otel.name = format!("send {destination}"),
        otel.kind = "producer",
        mercato.service = owner,
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.destination.name = destination,
        messaging.message.id = headers.get(attr::ID).map(String::as_str),
        cloudevents.event_type = headers.get(attr::TYPE).map(String::as_str),
    );
    continue_from_traceparent(&span, headers.get(attr::TRACEPARENT).map(String::as_str));
    if let Some(traceparent) = traceparent_of(&span) {
        headers.insert(attr::TRACEPARENT.to_owned(), traceparent);
    }
    Some(span)
}

/// The consumer span of one record `service` handles from `source` (a topic or queue): a
/// child of the record's send. Log lines inside it carry the order's trace id.
pub fn process_span(
    service: &'static str,
    system: &'static str,
    source: &str,
    headers: &Headers,
) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = tracing::field::Empty,
        otel.kind = "consumer",
        mercato.service = service,
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.destination.name = source,
        messaging.message.id = headers.get(attr::ID).map(String::as_str),
        cloudevents.event_type = headers.get(attr::TYPE).map(String::as_str),
        messaging.batch.message_count = tracing::field::Empty,
    );
    if traces_on() {
        span.record("otel.name", format!("process {source}"));
        continue_from_traceparent(&span, headers.get(attr::TRACEPARENT).map(String::as_str));
    }
    span
}

/// The consumer span of a batch `service` folds into one update (analytics' windows): a new
/// trace, linked to each record's send, since one update serves many orders' traces.
pub fn process_batch_span<'a>(
    service: &'static str,
    system: &'static str,
    source: &str,
    batch: impl ExactSizeIterator<Item = &'a Headers>,
) -> tracing::Span {
    // A record's span without a record: no parent, no message id.
    let span = process_span(service, system, source, &Headers::new());
    span.record("messaging.batch.message_count", batch.len());
    if traces_on() {
        for headers in batch {
            link_to_traceparent(&span, headers.get(attr::TRACEPARENT).map(String::as_str));
        }
    }
    span
}
