//! Traces over OTLP (HTTP/protobuf), when the standard `OTEL_*` variables ask for them: the
//! tracer provider, the exporter that gives each service its own `service.name` although
//! `mercato up` runs seven in one process, and the HTTP client the exporter sends with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::trace::SpanId;
use opentelemetry::{Key, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use super::otlp;

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
    #[error("OTLP compression {0} is not built in: leave OTEL_EXPORTER_OTLP_COMPRESSION unset")]
    Compression(String),
    #[error("{name} is not a valid {what}: {value}")]
    Setting {
        name: &'static str,
        what: &'static str,
        value: String,
    },
}

/// The first of the trace-specific and the general `OTEL_EXPORTER_OTLP_*` variables that is
/// set: the variable's name and its value.
fn setting(traces: &'static str, general: &'static str) -> Option<(&'static str, String)> {
    [traces, general].into_iter().find_map(|name| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (name, v.trim().to_owned()))
    })
}

/// Where and how spans are sent, from the OTLP exporter variables of the OpenTelemetry
/// specification (endpoint, headers, timeout, protocol, compression).
#[derive(Debug)]
struct Destination {
    url: reqwest::Url,
    headers: HeaderMap,
    timeout: Duration,
}

impl Destination {
    fn from_env() -> Result<Destination, OtelError> {
        if let Some((_, protocol)) = setting(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ) && protocol != "http/protobuf"
        {
            return Err(OtelError::Protocol(protocol));
        }
        if let Some((_, compression)) = setting(
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ) && compression != "none"
        {
            return Err(OtelError::Compression(compression));
        }
        // The signal's own endpoint is used as is; the general one is a base for /v1/traces.
        let (name, url) = match setting(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ) {
            Some((name @ "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)) => (name, url),
            Some((name, base)) => (name, format!("{}/v1/traces", base.trim_end_matches('/'))),
            None => (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://localhost:4318/v1/traces".to_owned(),
            ),
        };
        let url = reqwest::Url::parse(&url)
            .ok()
            .filter(|u| u.scheme() == "http")
            .ok_or_else(|| OtelError::Setting {
                name,
                what: "http:// URL",
                value: url.clone(),
            })?;
        let headers = match setting(
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ) {
            Some((name, list)) => parse_headers(&list).ok_or(OtelError::Setting {
                name,
                what: "list of key=value headers",
                // Header values are credentials (API keys): never repeated in an error.
                value: "(not shown)".to_owned(),
            })?,
            None => HeaderMap::new(),
        };
        let timeout = match setting(
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ) {
            Some((name, ms)) => ms
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .ok_or(OtelError::Setting {
                    name,
                    what: "timeout in milliseconds",
                    value: ms,
                })?,
            None => Duration::from_secs(10),
        };
        Ok(Destination {
            url,
            headers,
            timeout,
        })
    }
}

/// `key1=value1,key2=value2`, values percent-decoded (the W3C baggage format the
/// specification names).
fn parse_headers(list: &str) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair.split_once('=')?;
        let name = HeaderName::from_bytes(key.trim().as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(&percent_decoded(value.trim())?).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}

/// Our own: ten lines, not worth a crate.
fn percent_decoded(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(*crate::digest::from_hex(hex)?.first()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The provider: a batch of finished spans at a time (the `OTEL_BSP_*` variables tune it),
/// sampled as `OTEL_TRACES_SAMPLER` says (the SDK's default: parent-based, always on), each
/// span sent under its own service's resource. `fallback` names spans of no service.
pub fn provider(fallback: &str) -> Result<SdkTracerProvider, OtelError> {
    let destination = Destination::from_env()?;
    let fallback = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| fallback.to_owned());
    let exporter = ByService::new(destination, fallback)?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build())
}

/// Sends each span under the resource of the service it belongs to, every service's spans of a
/// batch in one OTLP request. The SDK has one resource per provider and `tracing` one
/// subscriber per process, so nothing upstream can do this for seven services in one process
/// (our own: no crate routes spans by service).
#[derive(Debug)]
struct ByService {
    sender: Sender,
    fallback: String,
    /// The provider's resource (SDK, `OTEL_RESOURCE_ATTRIBUTES`), each service's name added.
    base: Resource,
    /// Each service's resource, encoded once.
    resources: Mutex<HashMap<Arc<str>, Arc<[u8]>>>,
    owners: Mutex<Owners>,
}

impl ByService {
    fn new(destination: Destination, fallback: String) -> Result<ByService, OtelError> {
        Ok(ByService {
            sender: Sender::new(destination)?,
            fallback,
            base: Resource::builder().build(),
            resources: Mutex::default(),
            owners: Mutex::default(),
        })
    }

    fn resource(&self, service: &Arc<str>) -> Arc<[u8]> {
        let mut resources = self
            .resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        resources
            .entry(service.clone())
            .or_insert_with(|| otlp::resource_field(&self.base, service).into())
            .clone()
    }
}

impl SpanExporter for ByService {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let groups = self
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .assign(batch, &self.fallback);
        if groups.is_empty() {
            return Ok(());
        }
        let resources: Vec<Arc<[u8]>> = groups.iter().map(|(s, _)| self.resource(s)).collect();
        let services: Vec<otlp::ServiceSpans<'_>> = groups
            .iter()
            .zip(&resources)
            .map(|((_, spans), resource)| otlp::ServiceSpans {
                resource,
                schema_url: self.base.schema_url(),
                spans,
            })
            .collect();
        let body = otlp::export_request(&services);
        self.sender.send(body).await
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.base = resource.clone();
        self.resources
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
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
    fn assign(&mut self, batch: Vec<SpanData>, fallback: &str) -> Vec<(Arc<str>, Vec<SpanData>)> {
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
        let mut groups: Vec<(Arc<str>, Vec<SpanData>)> = Vec::new();
        for (owner, span) in placed {
            match groups
                .iter_mut()
                .find(|(name, _)| Arc::ptr_eq(name, &owner))
            {
                Some((_, spans)) => spans.push(span),
                None => groups.push((owner, vec![span])),
            }
        }
        groups
    }
}

/// Posts OTLP requests. The SDK's batch thread is not a tokio thread and hyper needs a reactor,
/// so each post runs on the process's runtime and the batch thread waits for it.
#[derive(Debug)]
struct Sender {
    runtime: tokio::runtime::Handle,
    http: reqwest::Client,
    url: reqwest::Url,
}

impl Sender {
    fn new(destination: Destination) -> Result<Sender, OtelError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OtelError::NoRuntime)?;
        let mut headers = destination.headers;
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        let http = reqwest::Client::builder()
            .timeout(destination.timeout)
            .default_headers(headers)
            .build()
            .map_err(|e| OtelError::Client(e.to_string()))?;
        Ok(Sender {
            runtime,
            http,
            url: destination.url,
        })
    }

    async fn send(&self, body: Vec<u8>) -> OTelSdkResult {
        let (http, url) = (self.http.clone(), self.url.clone());
        // Built inside the task: the client's timeout is a tokio timer, and this thread is
        // the SDK's, outside the runtime.
        let sent = self.runtime.spawn(async move {
            let response = http.post(url).body(body).send().await?;
            let status = response.status();
            // Read to the end, so the connection goes back to the pool.
            response.bytes().await?;
            Ok::<_, reqwest::Error>(status)
        });
        match sent.await {
            Ok(Ok(status)) if status.is_success() => Ok(()),
            Ok(Ok(status)) => Err(OTelSdkError::InternalFailure(format!(
                "the OTLP receiver answered {status}"
            ))),
            Ok(Err(e)) => Err(OTelSdkError::InternalFailure(format!(
                "OTLP request failed: {e}"
            ))),
            Err(e) => Err(OTelSdkError::InternalFailure(format!(
                "OTLP request did not finish: {e}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;
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

    fn ids(groups: &[(Arc<str>, Vec<SpanData>)], service: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = groups
            .iter()
            .filter(|(name, _)| **name == *service)
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
    fn header_lists_are_parsed_and_percent_decoded() {
        let headers = parse_headers("api-key=s3cr%3Dt%2C, x-team = shop ,").unwrap();
        assert_eq!(headers["api-key"], "s3cr=t,");
        assert_eq!(headers["x-team"], "shop");
        assert!(parse_headers("no-equals-sign").is_none());
        assert!(parse_headers("bad header=1").is_none());
        assert!(parse_headers("k=%zz").is_none());
        assert!(parse_headers("k=%4").is_none());
        assert!(parse_headers("").unwrap().is_empty());
    }

    #[test]
    fn later_batches_find_parents_exported_earlier() {
        let mut owners = Owners::default();
        owners.assign(vec![span(1, 0, Some("payments"))], "mercato");
        let later = owners.assign(vec![span(2, 1, None)], "mercato");
        assert_eq!(ids(&later, "payments"), vec![2]);
    }
}
