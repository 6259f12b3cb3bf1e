//! OTLP's trace protobuf (`ExportTraceServiceRequest`), written straight from the SDK's
//! `SpanData`: the bytes an OTLP/HTTP receiver decodes, for several services in one request.
//!
//! Our own: `opentelemetry-proto` first converts every span into owned proto structs (each id,
//! name and attribute copied into a new allocation) and prost then walks them twice (lengths,
//! then bytes). That was a third of what traces cost an order. Here each field is written once
//! into one buffer; a nested message's length is patched in after it is written.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;

/// Field numbers of opentelemetry-proto's trace, resource and common messages (v1).
mod field {
    pub const REQUEST_RESOURCE_SPANS: u32 = 1;
    pub const RESOURCE_SPANS_RESOURCE: u32 = 1;
    pub const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
    pub const RESOURCE_SPANS_SCHEMA_URL: u32 = 3;
    pub const RESOURCE_ATTRIBUTES: u32 = 1;
    pub const SCOPE_SPANS_SCOPE: u32 = 1;
    pub const SCOPE_SPANS_SPANS: u32 = 2;
    pub const SCOPE_SPANS_SCHEMA_URL: u32 = 3;
    pub const SCOPE_NAME: u32 = 1;
    pub const SCOPE_VERSION: u32 = 2;
    pub const SCOPE_ATTRIBUTES: u32 = 3;
    pub const SPAN_TRACE_ID: u32 = 1;
    pub const SPAN_SPAN_ID: u32 = 2;
    pub const SPAN_TRACE_STATE: u32 = 3;
    pub const SPAN_PARENT_SPAN_ID: u32 = 4;
    pub const SPAN_NAME: u32 = 5;
    pub const SPAN_KIND: u32 = 6;
    pub const SPAN_START: u32 = 7;
    pub const SPAN_END: u32 = 8;
    pub const SPAN_ATTRIBUTES: u32 = 9;
    pub const SPAN_DROPPED_ATTRIBUTES: u32 = 10;
    pub const SPAN_EVENTS: u32 = 11;
    pub const SPAN_DROPPED_EVENTS: u32 = 12;
    pub const SPAN_LINKS: u32 = 13;
    pub const SPAN_DROPPED_LINKS: u32 = 14;
    pub const SPAN_STATUS: u32 = 15;
    pub const SPAN_FLAGS: u32 = 16;
    pub const EVENT_TIME: u32 = 1;
    pub const EVENT_NAME: u32 = 2;
    pub const EVENT_ATTRIBUTES: u32 = 3;
    pub const EVENT_DROPPED_ATTRIBUTES: u32 = 4;
    pub const LINK_TRACE_ID: u32 = 1;
    pub const LINK_SPAN_ID: u32 = 2;
    pub const LINK_TRACE_STATE: u32 = 3;
    pub const LINK_ATTRIBUTES: u32 = 4;
    pub const LINK_DROPPED_ATTRIBUTES: u32 = 5;
    pub const LINK_FLAGS: u32 = 6;
    pub const STATUS_MESSAGE: u32 = 2;
    pub const STATUS_CODE: u32 = 3;
    pub const KEY_VALUE_KEY: u32 = 1;
    pub const KEY_VALUE_VALUE: u32 = 2;
    pub const ANY_STRING: u32 = 1;
    pub const ANY_BOOL: u32 = 2;
    pub const ANY_INT: u32 = 3;
    pub const ANY_DOUBLE: u32 = 4;
    pub const ANY_ARRAY: u32 = 5;
    pub const ARRAY_VALUES: u32 = 1;
}

/// Span flags: the W3C trace flags in the low byte, then whether the parent's remoteness is
/// known (always, here) and whether it was remote.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const FIXED32: u8 = 5;

/// A protobuf writer: scalar fields are skipped at their default value (proto3), as prost does.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.buf.push((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        self.buf.push(value as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    fn bytes(&mut self, field: u32, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.bytes_always(field, bytes);
        }
    }

    /// A length-delimited field written even when empty (a oneof member is present when set).
    fn bytes_always(&mut self, field: u32, bytes: &[u8]) {
        self.key(field, LENGTH_DELIMITED);
        self.varint(bytes.len() as u64);
        self.buf.extend_from_slice(bytes);
    }

    fn uint(&mut self, field: u32, value: u64) {
        if value != 0 {
            self.key(field, VARINT);
            self.varint(value);
        }
    }

    fn fixed64(&mut self, field: u32, value: u64) {
        if value != 0 {
            self.key(field, FIXED64);
            self.buf.extend_from_slice(&value.to_le_bytes());
        }
    }

    fn fixed32(&mut self, field: u32, value: u32) {
        if value != 0 {
            self.key(field, FIXED32);
            self.buf.extend_from_slice(&value.to_le_bytes());
        }
    }

    /// A nested message: one byte is kept for its length (most attributes fit), and the length
    /// is widened in place when the message turns out longer.
    fn message(&mut self, field: u32, write: impl FnOnce(&mut Writer)) {
        self.key(field, LENGTH_DELIMITED);
        let at = self.buf.len();
        self.buf.push(0);
        write(self);
        let len = self.buf.len() - at - 1;
        if len < 0x80 {
            self.buf[at] = len as u8;
        } else {
            let mut prefix = Writer::default();
            prefix.varint(len as u64);
            self.buf.splice(at..=at, prefix.buf);
        }
    }

    /// Bytes that are a whole field already (a service's encoded resource).
    fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
}

/// One service's spans and the resource field (already encoded) they are sent under.
pub(crate) struct ServiceSpans<'a> {
    pub resource: &'a [u8],
    pub schema_url: Option<&'a str>,
    pub spans: &'a [SpanData],
}

/// `resource` as the `resource` field of a `ResourceSpans`, its `service.name` replaced by
/// `service`: encoded once per service, copied into every request.
pub(crate) fn resource_field(resource: &Resource, service: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.message(field::RESOURCE_SPANS_RESOURCE, |w| {
        for (key, value) in resource.iter() {
            if key.as_str() != "service.name" {
                key_value(w, field::RESOURCE_ATTRIBUTES, key.as_str(), value);
            }
        }
        w.message(field::RESOURCE_ATTRIBUTES, |w| {
            w.bytes(field::KEY_VALUE_KEY, b"service.name");
            w.message(field::KEY_VALUE_VALUE, |w| {
                w.bytes_always(field::ANY_STRING, service.as_bytes());
            });
        });
    });
    w.into_bytes()
}

/// The request body: each service's spans under its resource, grouped by instrumentation scope.
pub(crate) fn export_request(services: &[ServiceSpans<'_>]) -> Vec<u8> {
    let mut w = Writer {
        buf: Vec::with_capacity(services.iter().map(|s| s.spans.len() * 320).sum()),
    };
    for service in services {
        w.message(field::REQUEST_RESOURCE_SPANS, |w| {
            w.raw(service.resource);
            // A batch has one scope (tracing-opentelemetry's) or a handful: a linear search.
            let mut scopes: Vec<&InstrumentationScope> = Vec::new();
            for span in service.spans {
                if !scopes.contains(&&span.instrumentation_scope) {
                    scopes.push(&span.instrumentation_scope);
                }
            }
            for scope in scopes {
                w.message(field::RESOURCE_SPANS_SCOPE_SPANS, |w| {
                    scope_field(w, scope);
                    for span in service.spans {
                        if span.instrumentation_scope == *scope {
                            w.message(field::SCOPE_SPANS_SPANS, |w| span_fields(w, span));
                        }
                    }
                    w.bytes(
                        field::SCOPE_SPANS_SCHEMA_URL,
                        scope.schema_url().unwrap_or_default().as_bytes(),
                    );
                });
            }
            w.bytes(
                field::RESOURCE_SPANS_SCHEMA_URL,
                service.schema_url.unwrap_or_default().as_bytes(),
            );
        });
    }
    w.into_bytes()
}

fn scope_field(w: &mut Writer, scope: &InstrumentationScope) {
    w.message(field::SCOPE_SPANS_SCOPE, |w| {
        w.bytes(field::SCOPE_NAME, scope.name().as_bytes());
        w.bytes(
            field::SCOPE_VERSION,
            scope.version().unwrap_or_default().as_bytes(),
        );
        attributes(w, field::SCOPE_ATTRIBUTES, scope.attributes());
    });
}

fn span_fields(w: &mut Writer, span: &SpanData) {
    let context = &span.span_context;
    w.bytes(field::SPAN_TRACE_ID, &context.trace_id().to_bytes());
    w.bytes(field::SPAN_SPAN_ID, &context.span_id().to_bytes());
    w.bytes(
        field::SPAN_TRACE_STATE,
        context.trace_state().header().as_bytes(),
    );
    if span.parent_span_id != SpanId::INVALID {
        w.bytes(field::SPAN_PARENT_SPAN_ID, &span.parent_span_id.to_bytes());
    }
    w.bytes(field::SPAN_NAME, span.name.as_bytes());
    w.uint(field::SPAN_KIND, kind(&span.span_kind));
    w.fixed64(field::SPAN_START, nanos(span.start_time));
    w.fixed64(field::SPAN_END, nanos(span.end_time));
    attributes(w, field::SPAN_ATTRIBUTES, &span.attributes);
    w.uint(
        field::SPAN_DROPPED_ATTRIBUTES,
        u64::from(span.dropped_attributes_count),
    );
    for event in span.events.iter() {
        w.message(field::SPAN_EVENTS, |w| {
            w.fixed64(field::EVENT_TIME, nanos(event.timestamp));
            w.bytes(field::EVENT_NAME, event.name.as_bytes());
            attributes(w, field::EVENT_ATTRIBUTES, &event.attributes);
            w.uint(
                field::EVENT_DROPPED_ATTRIBUTES,
                u64::from(event.dropped_attributes_count),
            );
        });
    }
    w.uint(
        field::SPAN_DROPPED_EVENTS,
        u64::from(span.events.dropped_count),
    );
    for link in span.links.iter() {
        let linked = &link.span_context;
        w.message(field::SPAN_LINKS, |w| {
            w.bytes(field::LINK_TRACE_ID, &linked.trace_id().to_bytes());
            w.bytes(field::LINK_SPAN_ID, &linked.span_id().to_bytes());
            w.bytes(
                field::LINK_TRACE_STATE,
                linked.trace_state().header().as_bytes(),
            );
            attributes(w, field::LINK_ATTRIBUTES, &link.attributes);
            w.uint(
                field::LINK_DROPPED_ATTRIBUTES,
                u64::from(link.dropped_attributes_count),
            );
            w.fixed32(
                field::LINK_FLAGS,
                flags(linked.trace_flags().to_u8(), linked.is_remote()),
            );
        });
    }
    w.uint(
        field::SPAN_DROPPED_LINKS,
        u64::from(span.links.dropped_count),
    );
    w.message(field::SPAN_STATUS, |w| {
        if let Status::Error { description } = &span.status {
            w.bytes(field::STATUS_MESSAGE, description.as_bytes());
        }
        w.uint(field::STATUS_CODE, status_code(&span.status));
    });
    w.fixed32(
        field::SPAN_FLAGS,
        flags(context.trace_flags().to_u8(), span.parent_span_is_remote),
    );
}

fn flags(trace_flags: u8, remote: bool) -> u32 {
    let mut flags = u32::from(trace_flags) | FLAG_HAS_IS_REMOTE;
    if remote {
        flags |= FLAG_IS_REMOTE;
    }
    flags
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn status_code(status: &Status) -> u64 {
    match status {
        Status::Unset => 0,
        Status::Ok => 1,
        Status::Error { .. } => 2,
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

fn attributes<'a>(w: &mut Writer, field: u32, attributes: impl IntoIterator<Item = &'a KeyValue>) {
    for kv in attributes {
        key_value(w, field, kv.key.as_str(), &kv.value);
    }
}

fn key_value(w: &mut Writer, field: u32, key: &str, value: &Value) {
    w.message(field, |w| {
        w.bytes(field::KEY_VALUE_KEY, key.as_bytes());
        w.message(field::KEY_VALUE_VALUE, |w| any_value(w, value));
    });
}

fn any_value(w: &mut Writer, value: &Value) {
    match value {
        Value::Bool(b) => bool_value(w, *b),
        Value::I64(i) => int_value(w, *i),
        Value::F64(f) => double_value(w, *f),
        Value::String(s) => w.bytes_always(field::ANY_STRING, s.as_str().as_bytes()),
        Value::Array(array) => w.message(field::ANY_ARRAY, |w| match array {
            Array::Bool(values) => array_values(w, values, |w, b| bool_value(w, *b)),
            Array::I64(values) => array_values(w, values, |w, i| int_value(w, *i)),
            Array::F64(values) => array_values(w, values, |w, f| double_value(w, *f)),
            Array::String(values) => array_values(w, values, |w, s| {
                w.bytes_always(field::ANY_STRING, s.as_str().as_bytes());
            }),
            // A kind of array newer than this encoder: its text, not nothing.
            other => array_values(w, &[other.to_string()], |w, s| {
                w.bytes_always(field::ANY_STRING, s.as_bytes());
            }),
        }),
        other => w.bytes_always(field::ANY_STRING, other.to_string().as_bytes()),
    }
}

fn array_values<T>(w: &mut Writer, values: &[T], mut each: impl FnMut(&mut Writer, &T)) {
    for value in values {
        w.message(field::ARRAY_VALUES, |w| each(w, value));
    }
}

// Oneof members: written even at their default value (their presence is the value's kind).
fn bool_value(w: &mut Writer, value: bool) {
    w.key(field::ANY_BOOL, VARINT);
    w.varint(u64::from(value));
}

fn int_value(w: &mut Writer, value: i64) {
    w.key(field::ANY_INT, VARINT);
    w.varint(value as u64);
}

fn double_value(w: &mut Writer, value: f64) {
    w.key(field::ANY_DOUBLE, FIXED64);
    w.buf.extend_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::Link;
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceId, TraceState};
    use opentelemetry::{InstrumentationScope, KeyValue, StringValue};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::KeyValue as ProtoKeyValue;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;
    use std::borrow::Cow;
    use std::time::Duration;

    fn context(trace: u128, span: u64, remote: bool) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            TraceState::from_key_value([("vendor", "value")]).unwrap(),
        )
    }

    /// Every kind of value, event, link and status the SDK can hand over.
    fn spans(scope: &InstrumentationScope) -> Vec<SpanData> {
        let at = UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789);
        let mut events = SpanEvents::default();
        events.events.push(opentelemetry::trace::Event::new(
            "exception",
            at,
            vec![KeyValue::new("exception.message", "x".repeat(300))],
            1,
        ));
        events.dropped_count = 2;
        let mut links = SpanLinks::default();
        links.links.push(Link::new(
            context(9, 10, true),
            vec![KeyValue::new("messaging.operation", "receive")],
            3,
        ));
        let full = SpanData {
            span_context: context(0xabcdef, 2, false),
            parent_span_id: SpanId::from(1),
            parent_span_is_remote: true,
            span_kind: SpanKind::Consumer,
            name: Cow::Borrowed("orders process"),
            start_time: at,
            end_time: at + Duration::from_micros(1500),
            attributes: vec![
                KeyValue::new("http.route", "/api/v1/orders/{id}"),
                KeyValue::new("empty", ""),
                KeyValue::new("http.response.status_code", 0_i64),
                KeyValue::new("negative", -42_i64),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("zero", 0.0),
                KeyValue::new("retried", false),
                KeyValue::new("ok", true),
                KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("ints", Value::Array(Array::I64(vec![0, -1, 1 << 40]))),
                KeyValue::new("floats", Value::Array(Array::F64(vec![1.5]))),
                KeyValue::new(
                    "strings",
                    Value::Array(Array::String(vec![StringValue::from(""), "b".into()])),
                ),
                KeyValue::new("long", "y".repeat(20_000)),
            ],
            dropped_attributes_count: 4,
            events,
            links,
            status: Status::error("payment declined"),
            instrumentation_scope: scope.clone(),
        };
        let root = SpanData {
            span_context: context(0xabcdef, 1, false),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: Cow::Owned("POST /api/v1/orders".to_owned()),
            start_time: at,
            end_time: at,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Ok,
            instrumentation_scope: scope.clone(),
        };
        let other_scope = SpanData {
            instrumentation_scope: InstrumentationScope::builder("other").build(),
            status: Status::Unset,
            span_kind: SpanKind::Internal,
            ..root.clone()
        };
        vec![full, root, other_scope, {
            let mut client = fill(SpanKind::Client, scope);
            client.span_kind = SpanKind::Producer;
            client
        }]
    }

    fn fill(kind: SpanKind, scope: &InstrumentationScope) -> SpanData {
        SpanData {
            span_context: context(u128::MAX, u64::MAX, false),
            parent_span_id: SpanId::from(7),
            parent_span_is_remote: false,
            span_kind: kind,
            name: Cow::Borrowed(""),
            start_time: UNIX_EPOCH,
            end_time: UNIX_EPOCH,
            attributes: vec![KeyValue::new("messaging.system", "kafka")],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        }
    }

    fn sorted(mut attributes: Vec<ProtoKeyValue>) -> Vec<ProtoKeyValue> {
        attributes.sort_by(|a, b| a.key.cmp(&b.key));
        attributes
    }

    /// What `opentelemetry-proto` (the SDK's own conversion, which prost then encodes) makes
    /// of the same spans, resource attributes in a stable order.
    fn expected(resource: &Resource, spans: Vec<SpanData>) -> ExportTraceServiceRequest {
        let mut resource_spans =
            group_spans_by_resource_and_scope(spans, &ResourceAttributesWithSchema::from(resource));
        for r in &mut resource_spans {
            if let Some(resource) = &mut r.resource {
                resource.attributes = sorted(std::mem::take(&mut resource.attributes));
            }
        }
        ExportTraceServiceRequest { resource_spans }
    }

    fn decoded(bytes: &[u8]) -> ExportTraceServiceRequest {
        let mut request = ExportTraceServiceRequest::decode(bytes).unwrap();
        for r in &mut request.resource_spans {
            if let Some(resource) = &mut r.resource {
                resource.attributes = sorted(std::mem::take(&mut resource.attributes));
            }
        }
        request
    }

    #[test]
    fn decodes_to_what_the_sdks_own_conversion_makes() {
        let scope = InstrumentationScope::builder("tracing-opentelemetry")
            .with_version("0.34.0")
            .with_schema_url("https://opentelemetry.io/schemas/1.30.0")
            .with_attributes([KeyValue::new("scope.kind", "library")])
            .build();
        let spans = spans(&scope);
        let base = Resource::builder_empty()
            .with_schema_url(
                [KeyValue::new("deployment.environment", "test")],
                "https://example.com/schema",
            )
            .with_service_name("unknown_service")
            .build();
        let resource = |service: &str| {
            Resource::builder_empty()
                .with_schema_url(
                    base.iter()
                        .filter(|(k, _)| k.as_str() != "service.name")
                        .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                    "https://example.com/schema",
                )
                .with_service_name(service.to_owned())
                .build()
        };
        let orders = resource_field(&base, "orders");
        let products = resource_field(&base, "products");
        let bytes = export_request(&[
            ServiceSpans {
                resource: &orders,
                schema_url: base.schema_url(),
                spans: &spans,
            },
            ServiceSpans {
                resource: &products,
                schema_url: base.schema_url(),
                spans: &spans[1..2],
            },
        ]);
        let mut want = expected(&resource("orders"), spans.clone());
        want.resource_spans
            .extend(expected(&resource("products"), spans[1..2].to_vec()).resource_spans);
        assert_eq!(decoded(&bytes), want);
    }

    #[test]
    fn lengths_widen_past_one_byte_at_every_depth() {
        let mut w = Writer::default();
        w.message(1, |w| {
            w.message(2, |w| w.bytes(3, &[7; 200]));
            w.bytes(4, &[8; 20_000]);
        });
        let bytes = w.into_bytes();
        // Outer: key, a 3-byte length (20,210 bytes inside: 206 + 20,004), then the inner
        // message.
        assert_eq!(&bytes[..4], &[0x0a, 0xf2, 0x9d, 0x01]);
        assert_eq!(bytes.len(), 4 + 20_210);
        assert_eq!(&bytes[4..7], &[0x12, 0xcb, 0x01]); // 203 bytes: key 3, length 200 in two
    }
}
