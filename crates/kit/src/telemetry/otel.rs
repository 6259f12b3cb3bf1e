//! Traces over OTLP (HTTP/protobuf), when the standard `OTEL_*` variables ask for them: the
//! tracer provider, the exporter that gives each service its own `service.name` although
//! `mercato up` runs seven in one process, and the HTTP client the exporter sends with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::trace::SpanId;
use opentelemetry::{Key, KeyValue, Value};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

/// The span attribute that names the service a span (and every span under it) belongs to.
/// Set on each service's entry spans (a request, a consumed event, a relay pass); the exporter
/// turns it into the `service.name` of the resource the span is sent under, and drops it.
pub const SERVICE_ATTRIBUTE: &str = "mercato.service";

/// Whether the environment asks for traces: an OTLP endpoint is set, and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says otherwise.
pub fn wanted() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let says = |name: &str, value: &str| {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    !says("OTEL_SDK_DISABLED", "true")
        && !says("OTEL_TRACES_EXPORTER", "none")
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("traces need a tokio runtime to send from: start telemetry inside it")]
    NoRuntime,
    #[error("the exporter's HTTP client cannot be built: {0}")]
    Client(String),
    #[error("OTLP over {0} is not built in: use http/protobuf (a collector's port 4318)")]
    Protocol(String),
    #[error("the OTLP exporter cannot be built: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The provider: a batch of finished spans at a time (the `OTEL_BSP_*` variables tune it),
/// sampled as `OTEL_TRACES_SAMPLER` says (the SDK's default: parent-based, always on), each
/// span sent under its own service's resource. `fallback` names spans of no service.
pub fn provider(fallback: &str) -> Result<SdkTracerProvider, OtelError> {
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    if !matches!(protocol.trim(), "" | "http/protobuf") {
        return Err(OtelError::Protocol(protocol));
    }
    let client: Arc<dyn HttpClient> = Arc::new(RuntimeClient::new()?);
    let fallback = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| fallback.to_owned());
    // One exporter proves the configuration at start-up; the others are made as services
    // first appear.
    let exporter = ByService::new(client, fallback)?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build())
}

/// Sends each span under the resource of the service it belongs to. The SDK has one resource
/// per provider and `tracing` one subscriber per process, so nothing upstream can do this
/// for seven services in one process (our own: no crate routes spans by service).
#[derive(Debug)]
struct ByService {
    client: Arc<dyn HttpClient>,
    fallback: String,
    /// The provider's resource (SDK, `OTEL_RESOURCE_ATTRIBUTES`), each service's name added.
    base: Resource,
    exporters: Mutex<HashMap<String, Arc<opentelemetry_otlp::SpanExporter>>>,
    owners: Mutex<Owners>,
}

impl ByService {
    fn new(client: Arc<dyn HttpClient>, fallback: String) -> Result<ByService, OtelError> {
        let by_service = ByService {
            client,
            fallback,
            base: Resource::builder().build(),
            exporters: Mutex::default(),
            owners: Mutex::default(),
        };
        let fallback = by_service.fallback.clone();
        by_service.exporter(&fallback)?;
        Ok(by_service)
    }

    fn exporter(&self, service: &str) -> Result<Arc<opentelemetry_otlp::SpanExporter>, OtelError> {
        let mut exporters = self
            .exporters
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(exporter) = exporters.get(service) {
            return Ok(exporter.clone());
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_shared_http_client(self.client.clone())
            .with_timeout(Duration::from_secs(10))
            .build()?;
        let resource = Resource::builder_empty()
            .with_attributes(
                self.base
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_service_name(service.to_owned())
            .build();
        opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
        let exporter = Arc::new(exporter);
        exporters.insert(service.to_owned(), exporter.clone());
        Ok(exporter)
    }
}

impl SpanExporter for ByService {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let groups = self
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .assign(batch, &self.fallback);
        let mut failure = None;
        for (service, spans) in groups {
            let exporter = self
                .exporter(&service)
                .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
            if let Err(e) = exporter.export(spans).await {
                failure = Some(e);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.base = resource.clone();
    }
}

/// Which service each span belongs to: its own [`SERVICE_ATTRIBUTE`], else its parent's. A
/// child ends (and is exported) before its parent, so a span whose parent has not been seen
/// waits for the next batch, once; spans remembered recently answer for parents of earlier
/// batches.
#[derive(Debug, Default)]
struct Owners {
    recent: SpanMap<Arc<str>>,
    older: SpanMap<Arc<str>>,
    waiting: Vec<SpanData>,
    /// The services seen, each name allocated once (a handful, looked up by comparison).
    names: Vec<Arc<str>>,
}

/// Span ids are random: their own bits are a hash already, so SipHash's work (a tenth of what
/// traces cost an order went into this map) buys nothing. Our own: std has no identity hasher.
#[derive(Debug, Default)]
struct SpanIdHasher(u64);

impl std::hash::Hasher for SpanIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

type SpanMap<V> = HashMap<SpanId, V, std::hash::BuildHasherDefault<SpanIdHasher>>;

/// How many span owners are remembered before the older half is forgotten.
const REMEMBERED: usize = 50_000;

impl Owners {
    fn owner_of(&self, span: SpanId) -> Option<Arc<str>> {
        self.recent
            .get(&span)
            .or_else(|| self.older.get(&span))
            .cloned()
    }

    fn name(&mut self, service: &str) -> Arc<str> {
        if let Some(known) = self.names.iter().find(|known| ***known == *service) {
            return known.clone();
        }
        let name: Arc<str> = Arc::from(service);
        self.names.push(name.clone());
        name
    }

    fn remember(&mut self, span: SpanId, owner: Arc<str>) {
        if self.recent.len() >= REMEMBERED {
            self.older = std::mem::take(&mut self.recent);
        }
        self.recent.insert(span, owner);
    }

    /// The batch (with the spans that waited) grouped by service; spans still unplaceable
    /// wait, unless they already waited once (then they go to `fallback`).
    fn assign(&mut self, batch: Vec<SpanData>, fallback: &str) -> Vec<(String, Vec<SpanData>)> {
        let waited = std::mem::take(&mut self.waiting);
        let waited_ids: SpanMap<()> = waited
            .iter()
            .map(|s| (s.span_context.span_id(), ()))
            .collect();
        let mut pending: Vec<SpanData> = waited.into_iter().chain(batch).collect();
        let mut placed: Vec<(Arc<str>, SpanData)> = Vec::with_capacity(pending.len());
        let key = Key::from_static_str(SERVICE_ATTRIBUTE);
        // Spans that name their service.
        let mut rest = Vec::with_capacity(pending.len());
        for mut span in pending.drain(..) {
            let named = span.attributes.iter().position(|kv| kv.key == key);
            match named {
                Some(at) => {
                    let owner = match &span.attributes.swap_remove(at).value {
                        Value::String(name) => self.name(name.as_str()),
                        other => self.name(&other.to_string()),
                    };
                    self.remember(span.span_context.span_id(), owner.clone());
                    placed.push((owner, span));
                }
                None => rest.push(span),
            }
        }
        // The others from their parents, as deep as the chain goes.
        loop {
            let before = rest.len();
            let mut unplaced = Vec::with_capacity(rest.len());
            for span in rest {
                match self.owner_of(span.parent_span_id) {
                    Some(owner) => {
                        self.remember(span.span_context.span_id(), owner.clone());
                        placed.push((owner, span));
                    }
                    None => unplaced.push(span),
                }
            }
            rest = unplaced;
            if rest.len() == before || rest.is_empty() {
                break;
            }
        }
        let fallback = self.name(fallback);
        for span in rest {
            let parent_may_come = span.parent_span_id != SpanId::INVALID
                && !span.parent_span_is_remote
                && !waited_ids.contains_key(&span.span_context.span_id());
            if parent_may_come {
                self.waiting.push(span);
            } else {
                placed.push((fallback.clone(), span));
            }
        }
        let mut groups: Vec<(String, Vec<SpanData>)> = Vec::new();
        for (owner, span) in placed {
            match groups.iter_mut().find(|(name, _)| **name == *owner) {
                Some((_, spans)) => spans.push(span),
                None => groups.push((owner.to_string(), vec![span])),
            }
        }
        groups
    }
}

/// The exporter's HTTP client. The SDK's batch thread is not a tokio thread and hyper needs a
/// reactor, so each export runs on the process's runtime and the batch thread waits for it.
#[derive(Debug)]
struct RuntimeClient {
    runtime: tokio::runtime::Handle,
    http: reqwest::Client,
}

impl RuntimeClient {
    fn new() -> Result<RuntimeClient, OtelError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OtelError::NoRuntime)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| OtelError::Client(e.to_string()))?;
        Ok(RuntimeClient { runtime, http })
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let http = self.http.clone();
        let sent = self.runtime.spawn(async move {
            let response = http.execute(request).await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        });
        let (status, headers, body) = sent.await??;
        let mut response = Response::new(Bytes::from(body.to_vec()));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::borrow::Cow;
    use std::time::SystemTime;

    fn span(id: u64, parent: u64, service: Option<&str>) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(7),
                SpanId::from(id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed("span"),
            start_time: SystemTime::UNIX_EPOCH,
            end_time: SystemTime::UNIX_EPOCH,
            attributes: service
                .map(|s| vec![KeyValue::new(SERVICE_ATTRIBUTE, s.to_owned())])
                .unwrap_or_default(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    fn ids(groups: &[(String, Vec<SpanData>)], service: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = groups
            .iter()
            .filter(|(name, _)| name == service)
            .flat_map(|(_, spans)| spans.iter())
            .map(|s| u64::from_be_bytes(s.span_context.span_id().to_bytes()))
            .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn spans_follow_their_parents_service_however_deep() {
        let mut owners = Owners::default();
        // Children end first: grandchild, child, then the gateway's request; products' request
        // (a child of the gateway's client call) names itself.
        let batch = vec![
            span(4, 3, None),
            span(3, 2, Some("products")),
            span(5, 1, None),
            span(1, 0, Some("gateway")),
        ];
        let groups = owners.assign(batch, "mercato");
        assert_eq!(ids(&groups, "gateway"), vec![1, 5]);
        assert_eq!(ids(&groups, "products"), vec![3, 4]);
        assert!(
            groups
                .iter()
                .flat_map(|(_, s)| s)
                .all(|s| s.attributes.is_empty()),
            "the routing attribute is not exported"
        );
    }

    #[test]
    fn a_span_whose_parent_ends_in_the_next_batch_waits_for_it_once() {
        let mut owners = Owners::default();
        let first = owners.assign(vec![span(2, 1, None)], "mercato");
        assert!(first.is_empty(), "the child waits for its parent");
        let second = owners.assign(vec![span(1, 0, Some("orders"))], "mercato");
        assert_eq!(ids(&second, "orders"), vec![1, 2]);
        // A parent that never comes: the span goes out under the fallback after one wait.
        assert!(owners.assign(vec![span(9, 8, None)], "mercato").is_empty());
        let third = owners.assign(vec![], "mercato");
        assert_eq!(ids(&third, "mercato"), vec![9]);
        // Roots and spans continuing a remote parent never wait.
        let mut remote = span(11, 10, None);
        remote.parent_span_is_remote = true;
        let fourth = owners.assign(vec![span(12, 0, None), remote], "mercato");
        assert_eq!(ids(&fourth, "mercato"), vec![11, 12]);
    }

    #[test]
    fn later_batches_find_parents_exported_earlier() {
        let mut owners = Owners::default();
        owners.assign(vec![span(1, 0, Some("payments"))], "mercato");
        let later = owners.assign(vec![span(2, 1, None)], "mercato");
        assert_eq!(ids(&later, "payments"), vec![2]);
    }
}
