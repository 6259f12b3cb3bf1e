//! What every service's HTTP server has in common: `/health`, `/ready`, `/metrics`, request ids,
//! request metrics labelled by route template, panics turned into problem+json, problem+json
//! 404/405, a body limit, and graceful shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;

use crate::problem::Problem;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A service's readiness probe: `Err` names what is not ready.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<Result<(), String>> + Send + Sync>;

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
pub fn app(service: &'static str, api: Router, body_limit: usize) -> Router {
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
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(service, track_request))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The operations listener (`ops.port`): `/health`, `/ready` (every service this process
/// runs, each named) and `/metrics`, for the Kubernetes probes and the Prometheus scrape.
/// `warning` (open mode) is repeated in every `/ready` answer.
pub fn ops_app(checks: Vec<(&'static str, ReadyCheck)>, warning: Option<String>) -> Router {
    let checks = Arc::new(checks);
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/ready",
            get(move || {
                let (checks, warning) = (checks.clone(), warning.clone());
                async move {
                    let mut results = Vec::with_capacity(checks.len());
                    for (name, check) in checks.iter() {
                        let result = tokio::time::timeout(Duration::from_secs(2), check())
                            .await
                            .unwrap_or_else(|_| Err("timed out".to_owned()));
                        results.push((*name, result));
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
                        let mut body = json!({"status": "ready", "services": services});
                        if let Some(warning) = warning {
                            body["warning"] = warning.into();
                        }
                        (StatusCode::OK, axum::Json(body)).into_response()
                    } else {
                        let mut problem =
                            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
                                .with_detail(failing.join("; "))
                                .with("services", services);
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

async fn render_metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
        .into_response()
}

/// Counts and times every request by route *template* (never the raw path, which would
/// explode label cardinality), and scopes the request id for logs and outbound calls.
async fn track_request(
    State(service): State<&'static str>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let span = tracing::info_span!("request", service, method = %method, route = %route, request_id = request_id.as_deref().unwrap_or(""));
    let response = REQUEST_ID
        .scope(request_id, next.run(req).instrument(span.clone()))
        .await;
    let status = response.status();
    if status.is_server_error() {
        span.in_scope(|| tracing::warn!(status = status.as_u16(), "request failed"));
    }
    let labels = [
        ("service", service.to_owned()),
        ("method", method.as_str().to_owned()),
        ("route", route),
        ("status", status.as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Serves `app` until `shutdown` is cancelled, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // Peer addresses for `ClientAddress` (login throttling, forwarded-for at the gateway).
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
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
