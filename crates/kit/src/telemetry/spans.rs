//! The `tracing` layer that makes OpenTelemetry spans of `tracing` spans, and the handles the
//! rest of the crate uses to read and steer a span's trace context (its parent across a hop,
//! its links, its ids for a log line or an exemplar).
//!
//! Our own, in place of `tracing-opentelemetry`: that layer built a `SpanBuilder`, an
//! OpenTelemetry `Context` and the SDK's own span object for every span, and kept switching
//! contexts on enter and exit; with the propagator's text maps that was four fifths of what
//! traces cost an order (docs/benchmarks.md). Here a span is one small record in the
//! registry's extensions: ids at creation (the sampler asked only for a trace's first span,
//! or one continuing a remote parent), fields only when it is sampled, and one `SpanData`
//! handed to the SDK's batch processor when it closes. Each span also carries the service it
//! belongs to (its own `mercato.service` field, else its parent's), so the exporter needs no
//! map of span owners.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use opentelemetry::trace::{
    Event, Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState,
};
use opentelemetry::{Context, InstrumentationScope, Key, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, IdGenerator as _, RandomIdGenerator, SamplingDecision, ShouldSample,
    SpanData, SpanEvents, SpanLinks, SpanProcessor as _,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context as LayerContext, Layer};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

use super::otel::SERVICE_ATTRIBUTE;

/// How many events (`warn` and up) one span keeps; the rest are counted as dropped.
const MAX_EVENTS: usize = 32;
/// How many links one span keeps (a batch's consumer span links to each record).
const MAX_LINKS: usize = 128;

/// What the layer and the span handles share: the sampler and id source, set once when traces
/// are turned on (one subscriber per process).
struct Tracer {
    sampler: Box<dyn ShouldSample>,
    ids: RandomIdGenerator,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// The layer: spans in, `SpanData` out to `processor` when they close.
pub(crate) struct SpanLayer {
    processor: Arc<BatchSpanProcessor>,
    scope: InstrumentationScope,
}

impl SpanLayer {
    /// A layer exporting through `processor`, sampling as `sampler` says (the SDK's, from the
    /// `OTEL_TRACES_SAMPLER` variables). The first layer made in a process sets the sampler.
    pub(crate) fn new(processor: Arc<BatchSpanProcessor>, sampler: Box<dyn ShouldSample>) -> Self {
        let _ = TRACER.set(Tracer {
            sampler,
            ids: RandomIdGenerator::default(),
        });
        SpanLayer {
            processor,
            scope: InstrumentationScope::builder("mercato").build(),
        }
    }
}

/// A span's trace context, and, when it is sampled, what will be exported when it closes.
pub(crate) struct OtelSpan {
    context: SpanContext,
    parent: SpanId,
    parent_is_remote: bool,
    /// The service the span belongs to (its own field, else its parent's).
    service: Option<Arc<str>>,
    /// Kept for a trace's first span (its sampling may still change when it learns a remote
    /// parent) and for every sampled span; dropped at close unless sampled.
    pending: Option<Box<Pending>>,
}

#[derive(Debug)]
struct Pending {
    name: Cow<'static, str>,
    kind: SpanKind,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    events: SpanEvents,
    links: SpanLinks,
    status: Status,
    status_description: Option<String>,
}

impl Pending {
    fn new(name: &'static str) -> Box<Pending> {
        Box::new(Pending {
            name: Cow::Borrowed(name),
            kind: SpanKind::Internal,
            start: SystemTime::now(),
            attributes: Vec::new(),
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            status_description: None,
        })
    }
}

/// The sampler's decision for a span of trace `trace_id` whose parent (if any) is `parent`,
/// as W3C trace flags and the trace state to carry on.
fn sample(
    parent: Option<&SpanContext>,
    trace_id: TraceId,
    pending: &Pending,
) -> (TraceFlags, TraceState) {
    let Some(tracer) = TRACER.get() else {
        return (TraceFlags::default(), TraceState::default());
    };
    let parent_context = parent.map(|p| Context::new().with_remote_span_context(p.clone()));
    let result = tracer.sampler.should_sample(
        parent_context.as_ref(),
        trace_id,
        &pending.name,
        &pending.kind,
        &pending.attributes,
        &pending.links,
    );
    let flags = match result.decision {
        SamplingDecision::RecordAndSample => TraceFlags::SAMPLED,
        SamplingDecision::RecordOnly | SamplingDecision::Drop => TraceFlags::default(),
    };
    (flags, result.trace_state)
}

fn new_span_id() -> SpanId {
    TRACER
        .get()
        .map_or(SpanId::INVALID, |tracer| tracer.ids.new_span_id())
}

/// How many service names a thread keeps; past it a name is allocated each time.
const SERVICE_NAMES: usize = 32;

/// Each service's name, allocated once per thread (a handful of names, found by comparison).
fn service_name(name: &str) -> Arc<str> {
    thread_local! {
        static NAMES: RefCell<Vec<Arc<str>>> = const { RefCell::new(Vec::new()) };
    }
    NAMES.with_borrow_mut(|names| {
        if let Some(known) = names.iter().find(|known| ***known == *name) {
            return known.clone();
        }
        let known: Arc<str> = Arc::from(name);
        if names.len() < SERVICE_NAMES {
            names.push(known.clone());
        }
        known
    })
}

/// Records a span's (or an event's) fields: the `otel.*` ones steer the span, the service's
/// names its owner, the rest become attributes.
struct Fields<'a> {
    pending: &'a mut Pending,
    service: Option<&'a mut Option<Arc<str>>>,
}

impl Fields<'_> {
    fn text(&mut self, field: &Field, value: Cow<'_, str>) {
        match field.name() {
            "otel.name" => self.pending.name = Cow::Owned(value.into_owned()),
            "otel.kind" => self.pending.kind = kind(&value),
            "otel.status_code" => {
                self.pending.status = if value.eq_ignore_ascii_case("error") {
                    Status::error(self.pending.status_description.clone().unwrap_or_default())
                } else if value.eq_ignore_ascii_case("ok") {
                    Status::Ok
                } else {
                    Status::Unset
                }
            }
            "otel.status_description" | "otel.status_message" => {
                if let Status::Error { .. } = self.pending.status {
                    self.pending.status = Status::error(value.clone().into_owned());
                }
                self.pending.status_description = Some(value.into_owned());
            }
            SERVICE_ATTRIBUTE if self.service.is_some() => {
                if let Some(service) = self.service.as_deref_mut() {
                    *service = Some(service_name(&value));
                }
            }
            name => self.pending.attributes.push(KeyValue::new(
                Key::from_static_str(name),
                value.into_owned(),
            )),
        }
    }

    fn value(&mut self, field: &Field, value: Value) {
        self.pending
            .attributes
            .push(KeyValue::new(Key::from_static_str(field.name()), value));
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, Cow::Borrowed(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.text(field, Cow::Owned(format!("{value:?}")));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.text(field, Cow::Owned(value.to_string()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.value(field, Value::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.value(field, Value::I64(i64::try_from(value).unwrap_or(i64::MAX)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.value(field, Value::Bool(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.value(field, Value::F64(value));
    }
}

fn kind(value: &str) -> SpanKind {
    let is = |name: &str| value.eq_ignore_ascii_case(name);
    if is("server") {
        SpanKind::Server
    } else if is("client") {
        SpanKind::Client
    } else if is("producer") {
        SpanKind::Producer
    } else if is("consumer") {
        SpanKind::Consumer
    } else {
        SpanKind::Internal
    }
}

/// The nearest span at or above `span` that this layer keeps (spans below its level are not).
fn nearest<'a, S: for<'l> LookupSpan<'l>>(span: SpanRef<'a, S>) -> Option<SpanRef<'a, S>> {
    span.scope()
        .find(|span| span.extensions().get::<OtelSpan>().is_some())
}

impl<S> Layer<S> for SpanLayer
where
    S: tracing::Subscriber + for<'l> LookupSpan<'l>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let parent = if let Some(parent) = attrs.parent() {
            ctx.span(parent).and_then(nearest)
        } else if attrs.is_contextual() {
            ctx.lookup_current().and_then(nearest)
        } else {
            None
        };
        let inherited = parent.as_ref().and_then(|parent| {
            let extensions = parent.extensions();
            let otel = extensions.get::<OtelSpan>()?;
            Some((otel.context.clone(), otel.service.clone()))
        });
        let mut service = None;
        let otel = match inherited {
            // A local parent: its trace and its sampling, fields only if that is a yes.
            Some((parent, parent_service)) => {
                let pending = parent.is_sampled().then(|| {
                    let mut pending = Pending::new(attrs.metadata().name());
                    attrs.record(&mut Fields {
                        pending: &mut pending,
                        service: Some(&mut service),
                    });
                    pending
                });
                OtelSpan {
                    context: SpanContext::new(
                        parent.trace_id(),
                        new_span_id(),
                        parent.trace_flags(),
                        false,
                        parent.trace_state().clone(),
                    ),
                    parent: parent.span_id(),
                    parent_is_remote: false,
                    service: service.or(parent_service),
                    pending,
                }
            }
            // A trace's first span: the sampler decides (again, if a remote parent comes).
            None => {
                let mut pending = Pending::new(attrs.metadata().name());
                attrs.record(&mut Fields {
                    pending: &mut pending,
                    service: Some(&mut service),
                });
                let trace_id = TRACER
                    .get()
                    .map_or(TraceId::INVALID, |tracer| tracer.ids.new_trace_id());
                let (flags, state) = sample(None, trace_id, &pending);
                OtelSpan {
                    context: SpanContext::new(trace_id, new_span_id(), flags, false, state),
                    parent: SpanId::INVALID,
                    parent_is_remote: false,
                    service,
                    pending: Some(pending),
                }
            }
        };
        span.extensions_mut().insert(otel);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(OtelSpan {
            pending: Some(pending),
            service,
            ..
        }) = extensions.get_mut::<OtelSpan>()
        {
            values.record(&mut Fields {
                pending,
                service: Some(service),
            });
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.event_span(event).and_then(nearest) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        let Some(OtelSpan {
            pending: Some(pending),
            ..
        }) = extensions.get_mut::<OtelSpan>()
        else {
            return;
        };
        if pending.events.len() >= MAX_EVENTS {
            pending.events.dropped_count += 1;
            return;
        }
        // The event's fields, recorded on a scratch span: its message names it.
        let mut fields = Pending::new(event.metadata().name());
        event.record(&mut Fields {
            pending: &mut fields,
            service: None,
        });
        let level = *event.metadata().level();
        let mut attributes = Vec::with_capacity(fields.attributes.len() + 1);
        attributes.push(KeyValue::new("level", level.as_str()));
        let mut name: Cow<'static, str> = Cow::Borrowed(event.metadata().name());
        for attribute in fields.attributes {
            if attribute.key.as_str() == "message" {
                name = Cow::Owned(attribute.value.to_string());
            } else {
                attributes.push(attribute);
            }
        }
        if level == tracing::Level::ERROR && pending.status == Status::Unset {
            pending.status = Status::error(name.clone());
        }
        pending
            .events
            .events
            .push(Event::new(name, SystemTime::now(), attributes, 0));
    }

    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(otel) = span.extensions_mut().remove::<OtelSpan>() else {
            return;
        };
        let Some(pending) = otel.pending else {
            return;
        };
        if !otel.context.is_sampled() {
            return;
        }
        let Pending {
            name,
            kind,
            start,
            mut attributes,
            events,
            links,
            status,
            status_description: _,
        } = *pending;
        if let Some(service) = otel.service {
            attributes.push(KeyValue::new(SERVICE_ATTRIBUTE, StringValue::from(service)));
        }
        self.processor.on_end(SpanData {
            span_context: otel.context,
            parent_span_id: otel.parent,
            parent_span_is_remote: otel.parent_is_remote,
            span_kind: kind,
            name,
            start_time: start,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events,
            links,
            status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

/// Runs `f` on the layer's record of `span`, if it has one (traces on, span enabled), with the
/// span's static name.
fn with_span<T>(
    span: &tracing::Span,
    f: impl FnOnce(&mut OtelSpan, &'static str) -> T,
) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let span = registry.span(id)?;
        let name = span.metadata().name();
        let mut extensions = span.extensions_mut();
        extensions.get_mut::<OtelSpan>().map(|otel| f(otel, name))
    })
    .flatten()
}

/// The trace context of `span` (or of the nearest span above it that is traced).
pub(crate) fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let span = nearest(registry.span(id)?)?;
        let extensions = span.extensions();
        extensions
            .get::<OtelSpan>()
            .map(|otel| otel.context.clone())
    })
    .flatten()
}

/// Makes `span` a child of `parent`, a span of another process: its trace, and the sampler's
/// decision again with that parent (parent-based samplers follow the remote flag). Call it
/// before the span has children.
pub(crate) fn set_remote_parent(span: &tracing::Span, parent: &SpanContext) {
    with_span(span, |otel, name| {
        // A span under an unsampled local parent recorded no fields; if the remote parent is
        // sampled it is exported under its static name.
        let pending = otel.pending.get_or_insert_with(|| Pending::new(name));
        let (flags, state) = sample(Some(parent), parent.trace_id(), pending);
        otel.context = SpanContext::new(
            parent.trace_id(),
            otel.context.span_id(),
            flags,
            false,
            state,
        );
        otel.parent = parent.span_id();
        otel.parent_is_remote = true;
    });
}

/// Links `span` to `linked` (a span of another trace it serves or was started by).
pub(crate) fn add_link(span: &tracing::Span, linked: SpanContext) {
    with_span(span, |otel, _| {
        if let Some(pending) = otel.pending.as_deref_mut() {
            if pending.links.len() < MAX_LINKS {
                pending.links.links.push(Link::new(linked, Vec::new(), 0));
            } else {
                pending.links.dropped_count += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SpanExporter};
    use std::sync::Mutex;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Debug, Clone, Default)]
    struct Collected(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collected {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    /// Runs `f` under a subscriber with the span layer (parent-based, always on), and returns
    /// the spans exported.
    fn exported(f: impl FnOnce()) -> Vec<SpanData> {
        let collected = Collected::default();
        let processor = Arc::new(BatchSpanProcessor::builder(collected.clone()).build());
        let layer = SpanLayer::new(
            processor.clone(),
            Box::new(Sampler::ParentBased(Box::new(Sampler::AlwaysOn))),
        );
        tracing::subscriber::with_default(Registry::default().with(layer), f);
        processor.force_flush().unwrap();
        collected.0.lock().unwrap().clone()
    }

    fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
        spans.iter().find(|s| s.name == name).unwrap()
    }

    fn service(span: &SpanData) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == SERVICE_ATTRIBUTE)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn children_join_their_parents_trace_and_service_and_otel_fields_steer_the_span() {
        let spans = exported(|| {
            let request = tracing::info_span!(
                "request",
                otel.name = "POST /api/v1/orders",
                otel.kind = "server",
                mercato.service = "orders",
                route = "/api/v1/orders",
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            request.in_scope(|| {
                let call =
                    tracing::info_span!("call", otel.kind = "client", peer.service = "products");
                call.in_scope(|| tracing::warn!(attempt = 2, "retrying"));
            });
            request.record("http.response.status_code", 503_u16);
            request.record("otel.status_code", "ERROR");
        });
        assert_eq!(spans.len(), 2);
        let request = named(&spans, "POST /api/v1/orders");
        let call = named(&spans, "call");
        assert_eq!(request.span_kind, SpanKind::Server);
        assert_eq!(call.span_kind, SpanKind::Client);
        assert_eq!(request.parent_span_id, SpanId::INVALID);
        assert_eq!(call.parent_span_id, request.span_context.span_id());
        assert_eq!(
            call.span_context.trace_id(),
            request.span_context.trace_id()
        );
        assert!(request.span_context.is_sampled() && call.span_context.is_sampled());
        assert_eq!(service(request).as_deref(), Some("orders"));
        assert_eq!(service(call).as_deref(), Some("orders"), "inherited");
        assert!(matches!(request.status, Status::Error { .. }));
        assert!(request.attributes.iter().any(|kv| {
            kv.key.as_str() == "http.response.status_code" && kv.value == Value::I64(503)
        }));
        assert!(
            request
                .attributes
                .iter()
                .all(|kv| !kv.key.as_str().starts_with("otel."))
        );
        let event = &call.events.events[0];
        assert_eq!(event.name, "retrying");
        assert!(
            event
                .attributes
                .iter()
                .any(|kv| kv.key.as_str() == "attempt")
        );
    }

    #[test]
    fn a_remote_parent_decides_the_trace_and_its_sampling() {
        let parent = |flags| {
            SpanContext::new(
                TraceId::from(0x4bf9_2f35),
                SpanId::from(0x00f0_67aa),
                flags,
                true,
                TraceState::default(),
            )
        };
        let (sampled, unsampled) = (parent(TraceFlags::SAMPLED), parent(TraceFlags::default()));
        let mut child_of_unsampled = None;
        let spans = exported(|| {
            let consumer = tracing::info_span!("process", otel.kind = "consumer");
            set_remote_parent(&consumer, &sampled);
            consumer.in_scope(|| tracing::info_span!("transaction").in_scope(|| {}));
            let dropped = tracing::info_span!("dropped");
            set_remote_parent(&dropped, &unsampled);
            dropped.in_scope(|| {
                let child = tracing::info_span!("child of dropped");
                child_of_unsampled = span_context(&child);
            });
            let linked = tracing::info_span!("linked");
            add_link(&linked, sampled.clone());
        });
        let names: Vec<&str> = spans.iter().map(|s| &*s.name).collect();
        assert!(
            !names.contains(&"dropped") && !names.contains(&"child of dropped"),
            "{names:?}"
        );
        let consumer = named(&spans, "process");
        assert_eq!(consumer.span_context.trace_id(), sampled.trace_id());
        assert_eq!(consumer.parent_span_id, sampled.span_id());
        assert!(consumer.parent_span_is_remote);
        let transaction = named(&spans, "transaction");
        assert_eq!(transaction.parent_span_id, consumer.span_context.span_id());
        assert!(!transaction.parent_span_is_remote);
        // An unsampled trace is still carried on, unsampled.
        let carried = child_of_unsampled.unwrap();
        assert_eq!(carried.trace_id(), unsampled.trace_id());
        assert!(!carried.is_sampled());
        let linked = named(&spans, "linked");
        assert_ne!(linked.span_context.trace_id(), sampled.trace_id());
        assert_eq!(linked.links.links[0].span_context, sampled);
    }
}
