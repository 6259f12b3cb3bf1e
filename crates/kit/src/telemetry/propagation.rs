//! W3C trace context (`traceparent`, `tracestate`) in and out: HTTP headers on every hop, and
//! the `traceparent` text events carry through the outbox, the stream and the queue. All of
//! it is a no-op while traces are off ([`super::traces_on`]).
//!
//! The header is parsed and written here (our own: OpenTelemetry's propagator goes through
//! text maps, a `HashMap` per event and a context per call, for a 55-byte string).

use std::str::FromStr as _;

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

use super::spans;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
const MAX_TRACESTATE: usize = 512;

/// The remote span a `traceparent` value names (and the `tracestate` beside it, if any), or
/// `None` when it is not a valid one (the W3C rules: version `ff` never, version `00` exactly
/// four parts, lowercase hex, ids not all zeros).
fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    // `vv-<32 hex>-<16 hex>-ff`: 55 bytes, dashes at fixed places; a later version may go on
    // after another dash.
    let text = traceparent.trim();
    let bytes = text.as_bytes();
    let dashes = [2, 35, 52].iter().all(|&at| bytes.get(at) == Some(&b'-'));
    let rest = bytes.get(55..)?;
    if !dashes || !(rest.is_empty() || rest.first() == Some(&b'-')) {
        return None;
    }
    let [version] = hex::<1>(text.get(0..2)?)?;
    let trace_id = TraceId::from_bytes(hex::<16>(text.get(3..35)?)?);
    let span_id = SpanId::from_bytes(hex::<8>(text.get(36..52)?)?);
    let [flags] = hex::<1>(text.get(53..55)?)?;
    if version == 0xff
        || (version == 0 && !rest.is_empty())
        || trace_id == TraceId::INVALID
        || span_id == SpanId::INVALID
    {
        return None;
    }
    // A client may send any `tracestate`: past what the W3C asks a vendor to carry on (512
    // characters) it is dropped, not parsed and exported.
    let state = tracestate
        .filter(|state| state.len() <= MAX_TRACESTATE)
        .and_then(|state| TraceState::from_str(state).ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        state,
    ))
}

/// `N` bytes from exactly `2N` lowercase hex digits (the W3C format allows no capitals).
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    crate::digest::from_hex_array(text)
}

/// `context` as a `traceparent` value (version 00).
fn format(context: &SpanContext) -> String {
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    crate::digest::push_hex(&mut out, &context.trace_id().to_bytes());
    out.push('-');
    crate::digest::push_hex(&mut out, &context.span_id().to_bytes());
    out.push('-');
    crate::digest::push_hex(&mut out, &[context.trace_flags().to_u8() & 1]);
    out
}

fn from_headers(headers: &HeaderMap) -> Option<SpanContext> {
    let traceparent = headers.get(TRACEPARENT)?.to_str().ok()?;
    let tracestate = headers.get(TRACESTATE).and_then(|v| v.to_str().ok());
    parse(traceparent, tracestate)
}

/// Makes `span` continue the trace the request's headers carry (the caller's span as its
/// parent). Without a valid `traceparent` the span keeps its place (a new trace, or the span
/// it was created in).
pub fn continue_from_headers(span: &tracing::Span, headers: &HeaderMap) {
    if !super::traces_on() {
        return;
    }
    if let Some(parent) = from_headers(headers) {
        spans::set_remote_parent(span, &parent);
    }
}

/// Links `span` to the trace the request's headers carry, without joining it: for the public
/// edge, where a client must not choose the trace (nor, through its sampled flag, force every
/// span of the request to be recorded and exported).
pub fn link_from_headers(span: &tracing::Span, headers: &HeaderMap) {
    if !super::traces_on() {
        return;
    }
    if let Some(caller) = from_headers(headers) {
        spans::add_link(span, caller);
    }
}

/// Writes `span`'s context into outgoing headers, so the callee's span is its child.
pub fn inject_into_headers(span: &tracing::Span, headers: &mut HeaderMap) {
    if !super::traces_on() {
        return;
    }
    let Some(context) = spans::span_context(span) else {
        return;
    };
    if let Ok(value) = HeaderValue::from_str(&format(&context)) {
        headers.insert(TRACEPARENT, value);
    }
    let state = context.trace_state().header();
    if !state.is_empty()
        && let Ok(value) = HeaderValue::from_str(&state)
    {
        headers.insert(TRACESTATE, value);
    }
}

/// `span`'s context as a `traceparent` value (what an event carries), if it has one.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !super::traces_on() {
        return None;
    }
    spans::span_context(span).map(|context| format(&context))
}

/// Makes `span` (a consumer's, a relay's) a child of the span that wrote the event.
pub fn continue_from_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if !super::traces_on() {
        return;
    }
    if let Some(parent) = traceparent.and_then(|t| parse(t, None)) {
        spans::set_remote_parent(span, &parent);
    }
}

/// Links `span` (one that handles many events, such as a window update) to the span that
/// wrote an event.
pub fn link_to_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if !super::traces_on() {
        return;
    }
    if let Some(context) = traceparent.and_then(|t| parse(t, None)) {
        spans::add_link(span, context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_and_written_back_the_same() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parse(value, None).unwrap();
        assert_eq!(
            context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            context.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(format(&context), value);
        let unsampled = parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        );
        assert!(!unsampled.unwrap().is_sampled());
        // Unknown flag bits are not carried on.
        let flags = parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff",
            None,
        );
        assert_eq!(format(&flags.unwrap()), value);
        // A later version may add parts.
        assert!(
            parse(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                None
            )
            .is_some()
        );
        let state = parse(value, Some("vendor=a,other=b")).unwrap();
        assert_eq!(state.trace_state().header(), "vendor=a,other=b");
        let long = format!("vendor={}", "a".repeat(MAX_TRACESTATE));
        let dropped = parse(value, Some(&long)).unwrap();
        assert_eq!(
            dropped.trace_state().header(),
            "",
            "an oversized tracestate is dropped"
        );
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bg-01",
        ] {
            assert!(parse(bad, None).is_none(), "{bad:?} was accepted");
        }
    }
}
