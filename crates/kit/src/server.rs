//! What every service's HTTP server has in common: `/health`, `/ready`, `/metrics`, request ids,
//! request metrics labelled by route template and known method, panics turned into problem+json,
//! problem+json 404/405, a body limit, a request timeout, and a listener that times out slow
//! and idle clients, caps its connections, speaks HTTP/1.1 and HTTP/2 (h2c) and drains on
//! shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::config::HttpSettings;
use crate::problem::Problem;
use crate::telemetry::exemplars;

/// A boxed future that may borrow for `'a` (readiness checks, `kit::pg::batch` writes).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A service's readiness probe: `Err` names what is not ready.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

pub fn ready_check<F, Fut>(check: F) -> ReadyCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move || Box::pin(check()))
}

tokio::task_local! {
    /// The `x-request-id` of the request being served, forwarded on outbound calls.
    pub static REQUEST_ID: Option<String>;
}

/// Wraps a service's API routes with `/health` and the shared middleware. Readiness and
/// metrics are on the operations listener ([`ops_app`]), never on a public one.
pub fn app(service: &'static str, api: Router, http: &HttpSettings) -> Router {
    let request_timeout = Duration::from_millis(http.request_timeout_ms);
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .merge(api)
        .fallback(|| async { Problem::not_found("this route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            )
        })
        .layer(CatchPanicLayer::custom(|_| {
            Problem::internal().into_response()
        }))
        .layer(DefaultBodyLimit::max(http.body_limit_bytes))
        .layer(middleware::from_fn_with_state(
            Served {
                service,
                request_timeout,
            },
            serve_request,
        ))
}

/// What [`serve_request`] needs: the service's name (a label) and its request timeout.
#[derive(Debug, Clone, Copy)]
struct Served {
    service: &'static str,
    request_timeout: Duration,
}

/// Every request of a service, in one middleware (each layer is an allocation and a boxed
/// future per request; `perf` counted them on the gateway's path): a request id kept if
/// usable, else minted, and answered back; the answer within the request timeout; the
/// request's span, metrics and failure log.
async fn serve_request(
    State(served): State<Served>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let (request_id, header) = request_id_of(&mut req);
    let mut response = track_request(served.service, matched, request_id, req, |req| {
        answer_in_time(served, req, next)
    })
    .await;
    // The header value the request carried, not a second parse of the text.
    response.headers_mut().entry(X_REQUEST_ID).or_insert(header);
    response
}

/// The request id's header, as a name: a `&str` name is parsed again on every use.
pub const X_REQUEST_ID: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-request-id");

/// The client's `x-request-id` when usable (one, short, plain characters), else a fresh UUID,
/// set on the request either way: as text (for logs and outbound calls) and as the header.
fn request_id_of(req: &mut Request) -> (String, axum::http::HeaderValue) {
    let mut ids = req.headers().get_all(X_REQUEST_ID).iter();
    if let (Some(only), None) = (ids.next(), ids.next())
        && usable_request_id(only.as_bytes())
        && let Ok(id) = only.to_str()
    {
        return (id.to_owned(), only.clone());
    }
    let fresh = uuid::Uuid::new_v4().to_string();
    // A UUID's text is always a valid header value.
    let header = axum::http::HeaderValue::from_str(&fresh)
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static("-"));
    req.headers_mut().insert(X_REQUEST_ID, header.clone());
    (fresh, header)
}

/// The service that faces the internet: its request spans start a trace of their own (linked
/// to a caller's `traceparent`, never its child), so clients cannot pick traces or sampling.
const EDGE: &str = crate::wiring::Service::Gateway.as_str();

/// The longest `x-request-id` kept from a client; it goes into every log line of the request.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Whether a client's request id may be kept: short, and of characters that need no escaping.
fn usable_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Answers 503 when the handler has not started its answer within the request timeout (a
/// stuck dependency, a client trickling its body); a started stream runs on. An injected
/// route fault (`kit::faults`: added latency, a 503) happens inside that time, as a slow or
/// failing handler would.
async fn answer_in_time(served: Served, req: Request, next: Next) -> Response {
    let answer = async {
        if crate::faults::registry().routes_touched()
            && let Some(failed) = crate::faults::on_route(served.service, req.uri().path()).await
        {
            return failed;
        }
        next.run(req).await
    };
    match tokio::time::timeout(served.request_timeout, answer).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "request-timeout",
            "Request timed out",
        )
        .with_detail("the request was not answered in time; retry later")
        .into_response(),
    }
}

/// The method as a metric label: the standard ones by name, any other token (each would be a
/// new series) as `other`.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Runs each check (2 s at most): (name, `Err(reason)` when it failed).
async fn run_checks<N: Clone>(checks: &[(N, ReadyCheck)]) -> Vec<(N, Result<(), String>)> {
    let mut results = Vec::with_capacity(checks.len());
    for (name, check) in checks {
        let result = tokio::time::timeout(Duration::from_secs(2), check())
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()));
        results.push((name.clone(), result));
    }
    results
}

/// The operations listener (`ops.port`): `/health`, `/ready` (every service this process
/// runs, each named; 503 when one cannot work) and `/metrics`, for the Kubernetes probes and
/// the Prometheus scrape. `/ready` also reports each service's `dependencies` (the bus, the
/// queue: `up` or why not), which never make it 503. `warning` (open mode) is repeated in
/// every `/ready` answer.
pub fn ops_app(
    checks: Vec<(&'static str, ReadyCheck)>,
    dependencies: Vec<(String, ReadyCheck)>,
    warning: Option<String>,
) -> Router {
    let checks = Arc::new(checks);
    let dependencies = Arc::new(dependencies);
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/ready",
            get(move || {
                let (checks, dependencies, warning) =
                    (checks.clone(), dependencies.clone(), warning.clone());
                async move {
                    let results = run_checks(&checks).await;
                    let mut needed = serde_json::Map::new();
                    for (name, result) in run_checks(&dependencies).await {
                        let state = match result {
                            Ok(()) => "up".to_owned(),
                            Err(reason) => format!("down: {reason}"),
                        };
                        needed.insert(name, state.into());
                    }
                    let mut services = serde_json::Map::new();
                    let mut failing = Vec::new();
                    for (name, result) in results {
                        let status = match result {
                            Ok(()) => "ready".to_owned(),
                            Err(reason) => {
                                failing.push(format!("{name}: {reason}"));
                                format!("not ready: {reason}")
                            }
                        };
                        services.insert(name.to_owned(), status.into());
                    }
                    if failing.is_empty() {
                        let mut body = json!({"status": "ready", "services": services, "dependencies": needed});
                        if let Some(warning) = warning {
                            body["warning"] = warning.into();
                        }
                        (StatusCode::OK, axum::Json(body)).into_response()
                    } else {
                        let mut problem =
                            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
                                .with_detail(failing.join("; "))
                                .with("services", services)
                                .with("dependencies", needed);
                        if let Some(warning) = warning {
                            problem = problem.with("warning", warning);
                        }
                        problem.into_response()
                    }
                }
            }),
        )
        .route("/metrics", get(render_metrics))
        .fallback(|| async { Problem::not_found("this route") })
        .layer(CatchPanicLayer::custom(|_| {
            Problem::internal().into_response()
        }))
}

/// The 0.0.4 text format, or OpenMetrics (with exemplars) when the scraper asks for it.
async fn render_metrics(headers: HeaderMap) -> Response {
    let text = crate::telemetry::metrics().render();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if exemplars::wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, exemplars::OPENMETRICS)],
            exemplars::openmetrics(&text),
        )
            .into_response()
    } else {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
    }
}

/// Counts and times every request by route *template* (never the raw path, which would
/// explode label cardinality), and scopes the request id for logs and outbound calls.
async fn track_request<F, Fut>(
    service: &'static str,
    matched: Option<MatchedPath>,
    request_id: String,
    req: Request,
    run: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let start = Instant::now();
    let method = method_label(req.method());
    let route = matched.map_or("unmatched", |m| route_label(m.as_str()));
    let span = tracing::info_span!(
        "request",
        method,
        route,
        request_id = request_id.as_str(),
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        mercato.service = service,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if crate::telemetry::traces_on() {
        // Named as the semantic conventions say (`{method} {route}`); built only for export.
        span.record("otel.name", format!("{method} {route}"));
        if service == EDGE {
            crate::telemetry::propagation::link_from_headers(&span, req.headers());
        } else {
            crate::telemetry::propagation::continue_from_headers(&span, req.headers());
        }
    }
    let response = REQUEST_ID
        .scope(Some(request_id), run(req).instrument(span.clone()))
        .await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
        span.in_scope(|| tracing::warn!(status = status.as_u16(), "request failed"));
    }
    let status = status_label(status);
    let (count, duration) = request_metrics(service, method, route, status);
    let seconds = start.elapsed().as_secs_f64();
    count.increment(1);
    duration.record(seconds);
    if crate::telemetry::traces_on() {
        exemplars::record_request([service, method, route, status], seconds, || {
            crate::telemetry::sampled_trace_id(&span)
        });
    }
    response
}

/// The request counter and histogram of one label set. Building a metric key and looking it
/// up in the registry costs an allocation and four string hashes per request; every label
/// here is a `'static` str from a fixed set (interned routes, known methods and statuses), so
/// their addresses name the set and each worker thread keeps the handles it has used.
fn request_metrics(
    service: &'static str,
    method: &'static str,
    route: &'static str,
    status: &'static str,
) -> (metrics::Counter, metrics::Histogram) {
    type Handles =
        std::collections::HashMap<[(usize, usize); 4], (metrics::Counter, metrics::Histogram)>;
    thread_local! {
        static HANDLES: std::cell::RefCell<Handles> = std::cell::RefCell::default();
    }
    let key = [service, method, route, status].map(|label| (label.as_ptr() as usize, label.len()));
    HANDLES.with(|handles| {
        handles
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| {
                (
                    metrics::counter!("http_requests_total", "service" => service, "method" => method, "route" => route, "status" => status),
                    metrics::histogram!("http_request_duration_seconds", "service" => service, "method" => method, "route" => route, "status" => status),
                )
            })
            .clone()
    })
}

/// A route template as a `'static` label: templates are a fixed set (the routers'), so each
/// is leaked once and looked up after that.
fn route_label(template: &str) -> &'static str {
    // A catch-all route (the gateway's page for unknown addresses) matches what no route does.
    if template.contains("{*") {
        return "unmatched";
    }
    intern(template)
}

/// `text` as a `'static` str, leaked on first sight: only for small fixed sets (templates,
/// status codes), never for what a client chooses.
fn intern(text: &str) -> &'static str {
    let template = text;
    static ROUTES: std::sync::OnceLock<
        std::sync::RwLock<std::collections::HashMap<String, &'static str>>,
    > = std::sync::OnceLock::new();
    let routes = ROUTES.get_or_init(Default::default);
    if let Some(label) = routes.read().ok().and_then(|r| r.get(template).copied()) {
        return label;
    }
    let Ok(mut routes) = routes.write() else {
        return "unmatched";
    };
    routes
        .entry(template.to_owned())
        .or_insert_with(|| Box::leak(template.to_owned().into_boxed_str()))
}

/// The status as a label, without formatting it for the common ones.
fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        402 => "402",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        // Any other code: interned once, like templates (at most 900 of them).
        other => intern(&other.to_string()),
    }
}

/// How a listener treats its connections (from [`HttpSettings`]).
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub http2_keep_alive: Duration,
    pub drain_timeout: Duration,
}

impl ListenerLimits {
    pub fn from_settings(http: &HttpSettings) -> ListenerLimits {
        ListenerLimits {
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            max_connections: http.max_connections.max(1),
            http2_keep_alive: Duration::from_millis(http.http2_keep_alive_ms),
            drain_timeout: Duration::from_millis(http.drain_timeout_ms),
        }
    }
}

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `app` until `shutdown` is cancelled, then lets in-flight requests finish for up to
/// the drain timeout.
///
/// Its own accept loop rather than `axum::serve`, which sets no timer (so hyper reads headers
/// forever), has no connection limit, and no HTTP/2 keep-alive.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    limits: ListenerLimits,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        // At the limit, new connections wait in the kernel's queue, not in memory here.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was taken: pause
                    // rather than spin, as hyper's own examples do.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (app, limits, watcher) = (app.clone(), limits.clone(), graceful.watcher());
        tokio::spawn(async move {
            serve_connection(tcp, peer, app, &limits, watcher).await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still busy after the drain timeout were cut");
    }
    Ok(())
}

/// Serves one connection as HTTP/2 when it opens with the HTTP/2 preface (h2c with prior
/// knowledge), else as HTTP/1.1; a client that sends nothing in time is dropped.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: &ListenerLimits,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let Some(http2) = opens_with_h2_preface(&tcp, limits.header_read_timeout).await else {
        return;
    };
    // Handlers read the peer address (`ClientAddress`, the gateway's X-Forwarded-For).
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
    let io = TokioIo::new(tcp);
    let served = if http2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.http2_keep_alive)
            .keep_alive_timeout(limits.http2_keep_alive)
            .max_concurrent_streams(256);
        watcher.watch(builder.serve_connection(io, service)).await
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(true);
        watcher.watch(builder.serve_connection(io, service)).await
    };
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// `Some(true)` when the client opened with the HTTP/2 preface, `Some(false)` for anything
/// else (HTTP/1), `None` when it sent nothing recognisable within `within` or closed.
async fn opens_with_h2_preface(tcp: &TcpStream, within: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 24];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if !H2_PREFACE.starts_with(&buf[..n]) {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // Part of the preface so far: peek answers at once while bytes wait, so pause.
        tokio::time::sleep_until(
            (tokio::time::Instant::now() + Duration::from_millis(10)).min(deadline),
        )
        .await;
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
