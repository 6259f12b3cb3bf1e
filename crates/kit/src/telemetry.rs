//! Logs (JSON lines by default), traces over OTLP when the `OTEL_*` variables ask for them
//! ([`otel`]), trace context across HTTP calls and events ([`propagation`]), and the
//! process-wide Prometheus registry.

pub mod exemplars;
pub mod otel;
mod otlp;
pub mod propagation;
mod spans;

use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TraceId;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SpanProcessor as _};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, Registry};

use crate::config::LogSettings;

/// What [`init`] started; [`Telemetry::shutdown`] sends the spans still buffered.
#[derive(Debug, Default)]
#[must_use = "shut it down to send the last spans"]
pub struct Telemetry {
    traces: Option<Arc<BatchSpanProcessor>>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn traces_on(&self) -> bool {
        self.traces.is_some()
    }

    /// Sends what is buffered (a Lambda invocation's spans before the sandbox freezes).
    pub fn flush(&self) {
        if let Some(traces) = &self.traces {
            let _ = traces.force_flush();
        }
    }

    /// Sends what is buffered and stops the exporter. Call it outside async code (it blocks)
    /// while the runtime still runs (the export runs there).
    pub fn shutdown(self) {
        if let Some(traces) = self.traces {
            let _ = traces.shutdown();
        }
    }
}

static TRACES_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process exports spans (so that span names are worth building).
pub fn traces_on() -> bool {
    TRACES_ON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether spans are exported and the caller is inside one (a request, a consumed event): the
/// condition for a store's transaction span. Background writes outside any trace (a relay
/// marking rows sent, a consumer's offsets) would each be a trace of one span nobody reads.
pub fn in_exported_trace() -> bool {
    traces_on() && tracing::Span::current().id().is_some()
}

/// The trace id of `span` if it is exported (sampled): what an exemplar points to.
pub(crate) fn sampled_trace_id(span: &tracing::Span) -> Option<TraceId> {
    if !traces_on() {
        return None;
    }
    spans::span_context(span)
        .filter(|context| context.is_sampled())
        .map(|context| context.trace_id())
}

/// Installs the global subscriber once (later calls, as in tests or several services in one
/// process, start nothing): logs as `settings` say, and, when the environment asks
/// ([`otel::wanted`]), spans exported over OTLP with `trace_id` and `span_id` on every log
/// line inside one. `process` names spans that belong to no service. Call it inside the
/// tokio runtime the exporter is to use.
pub fn init(settings: &LogSettings, process: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = settings.format.eq_ignore_ascii_case("pretty");
    let traces = if otel::wanted() {
        match otel::processor(process) {
            Ok((processor, sampler)) => Some((Arc::new(processor), sampler)),
            Err(e) => {
                eprintln!("traces are off: {e}");
                None
            }
        }
    } else {
        None
    };
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let json = format::format()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false);
    let logs = match (pretty, traces.is_some()) {
        (true, _) => logs.boxed(),
        (false, false) => logs.json().event_format(json).boxed(),
        (false, true) => logs.json().event_format(WithTraceIds(json)).boxed(),
    };
    // Spans at `info` and above whatever the log level (a quiet log must not cost the
    // traces); events only from `warn` up, as span events (the log has the rest, with trace
    // ids).
    let (traces, spans) = match traces {
        Some((processor, sampler)) => {
            let layer = spans::SpanLayer::new(processor.clone(), sampler).with_filter(
                tracing_subscriber::filter::filter_fn(|meta| {
                    let floor = if meta.is_span() {
                        LevelFilter::INFO
                    } else {
                        LevelFilter::WARN
                    };
                    *meta.level() <= floor
                }),
            );
            (Some(processor), Some(layer))
        }
        None => (None, None),
    };
    let installed = Registry::default()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init()
        .is_ok();
    if !installed {
        // Another subscriber is global (a test's, an earlier call's): these spans go nowhere.
        if let Some(processor) = traces {
            let _ = processor.shutdown();
        }
        return Telemetry::default();
    }
    if traces.is_some() {
        TRACES_ON.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Telemetry { traces }
}

/// The JSON line of an event with the `trace_id` and `span_id` of the span it happened in, so
/// a log line leads to its trace.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some(ids) = spans::span_context(&tracing::Span::current()) else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The JSON formatter writes one object (and the layer the newline): the ids go in
        // before its closing brace.
        match line.trim_end().strip_suffix('}') {
            // An event that names its trace itself (the notifier's, from the message) keeps it.
            Some(_) if line.contains("\"trace_id\":") => writer.write_str(&line),
            Some(object) => writeln!(
                writer,
                "{object},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                ids.trace_id(),
                ids.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide registry every `/metrics` renders. Installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("duration_seconds".into()),
                &exemplars::DURATION_BUCKETS,
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is already global (an embedding application's): keep ours private.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        };
        // Histogram samples pile up until drained: by a scrape, or here. Without it a process
        // nobody scrapes grows with every request (the soak measured 40-55 MiB/min).
        let upkept = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkept.run_upkeep();
                }
            });
        handle
    })
}

#[cfg(test)]
mod tests {
    /// Histogram samples are drained even if nothing ever scrapes `/metrics` (the soak saw a
    /// process grow 40-55 MiB/min without it): a thread does the upkeep.
    #[test]
    fn histogram_samples_are_drained_without_a_scrape() {
        let _ = super::metrics();
        // A new thread takes its name once it runs: look for a while.
        let named = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .any(|name| name.trim() == "metrics-upkeep")
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !named() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(named(), "no metrics-upkeep thread");
    }
}
