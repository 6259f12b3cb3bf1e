//! Traces over OTLP (HTTP/protobuf), when the standard `OTEL_*` variables ask for them: the
//! tracer provider, the exporter that gives each service its own `service.name` although
//! `mercato up` runs seven in one process, and the HTTP client the exporter sends with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use std::borrow::Cow;

use opentelemetry::{Key, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{BatchSpanProcessor, Config, ShouldSample, SpanData, SpanExporter};
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
            let [byte] = crate::digest::from_hex_array::<1>(hex)?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The batch processor the span layer hands finished spans to (the `OTEL_BSP_*` variables
/// tune it), and the sampler `OTEL_TRACES_SAMPLER` names (the SDK's default: parent-based,
/// always on). Each span is sent under its own service's resource; `fallback` names spans of
/// no service.
pub(crate) fn processor(
    fallback: &str,
) -> Result<(BatchSpanProcessor, Box<dyn ShouldSample>), OtelError> {
    let destination = Destination::from_env()?;
    let fallback = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| fallback.to_owned());
    let exporter = ByService::new(destination, fallback)?;
    let sampler = Config::default().sampler;
    Ok((BatchSpanProcessor::builder(exporter).build(), sampler))
}

/// Sends each span under the resource of the service it belongs to, every service's spans of a
/// batch in one OTLP request. The SDK has one resource per provider and `tracing` one
/// subscriber per process, so nothing upstream can do this for seven services in one process
/// (our own: no crate routes spans by service). The span layer names each span's service in
/// its [`SERVICE_ATTRIBUTE`] (inherited from its parent), which is taken out here.
#[derive(Debug)]
struct ByService {
    sender: Sender,
    fallback: Arc<str>,
    /// The process's resource (SDK detectors, `OTEL_RESOURCE_ATTRIBUTES`), each service's name
    /// added.
    base: Resource,
    /// Each service's resource, encoded once.
    resources: Mutex<HashMap<Arc<str>, Arc<[u8]>>>,
}

impl ByService {
    fn new(destination: Destination, fallback: String) -> Result<ByService, OtelError> {
        Ok(ByService {
            sender: Sender::new(destination)?,
            fallback: fallback.into(),
            base: Resource::builder().build(),
            resources: Mutex::default(),
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

/// `batch` grouped by the service each span names (its attribute taken out), in order of
/// first appearance; spans that name none go to `fallback`.
fn by_service(batch: Vec<SpanData>, fallback: &Arc<str>) -> Vec<(Arc<str>, Vec<SpanData>)> {
    let key = Key::from_static_str(SERVICE_ATTRIBUTE);
    let mut groups: Vec<(Arc<str>, Vec<SpanData>)> = Vec::new();
    for mut span in batch {
        let named = span.attributes.iter().rposition(|kv| kv.key == key);
        let named = named.map(|at| span.attributes.swap_remove(at).value);
        let owner: Cow<'_, str> = match &named {
            Some(Value::String(name)) => Cow::Borrowed(name.as_str()),
            Some(other) => Cow::Owned(other.to_string()),
            None => Cow::Borrowed(&**fallback),
        };
        match groups.iter_mut().find(|(name, _)| **name == *owner) {
            Some((_, spans)) => spans.push(span),
            None => groups.push((Arc::from(owner.as_ref()), vec![span])),
        }
    }
    groups
}

impl SpanExporter for ByService {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let groups = by_service(batch, &self.fallback);
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
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
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
    fn spans_are_grouped_by_the_service_they_name_and_the_name_is_not_exported() {
        let batch = vec![
            span(4, 3, Some("products")),
            span(3, 2, Some("orders")),
            span(5, 1, None),
            span(1, 0, Some("products")),
        ];
        let groups = by_service(batch, &Arc::from("mercato"));
        let names: Vec<&str> = groups.iter().map(|(name, _)| &**name).collect();
        assert_eq!(names, ["products", "orders", "mercato"]);
        assert_eq!(ids(&groups, "products"), vec![1, 4]);
        assert_eq!(ids(&groups, "orders"), vec![3]);
        assert_eq!(ids(&groups, "mercato"), vec![5]);
        assert!(
            groups
                .iter()
                .flat_map(|(_, s)| s)
                .all(|s| s.attributes.is_empty()),
            "the routing attribute is not exported"
        );
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
}
