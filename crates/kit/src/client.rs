//! Service-to-service HTTP: JSON in and out, a hard timeout on every call, the caller's
//! request id forwarded, and failures sorted into "the other side said no" (4xx, with its
//! problem) and "the other side is not there" (timeouts, refused connections, 5xx).
//!
//! A callee running in the same process (`mercato up`) can be called in memory instead
//! ([`LocalApp`]): the same request, headers and whole middleware stack of the callee, without
//! a socket, a connection pool or HTTP encoding in between.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth::ServiceKey;
use crate::config::HttpSettings;
use crate::problem::Problem;
use crate::server::REQUEST_ID;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Timed out, refused, 5xx or an unreadable answer: the caller should answer 503.
    #[error("{service} is unavailable: {reason}")]
    Unavailable {
        service: &'static str,
        reason: String,
    },
    /// The dependency answered with a 4xx.
    #[error("{service} answered {status}")]
    Rejected {
        service: &'static str,
        status: StatusCode,
        problem: Option<Box<Problem>>,
    },
}

impl CallError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            CallError::Rejected { status, .. } => Some(*status),
            CallError::Unavailable { .. } => None,
        }
    }
}

/// One pooled client for the whole process.
pub fn http_client(settings: &HttpSettings) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.client_timeout_ms))
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(256)
        .build()
}

/// A client for one named dependency at one base URL, or at several (its replicas,
/// `http://a:8002,http://b:8002`), taken in turn; a replica that refuses the connection (the
/// call was not sent) passes the call to the next.
#[derive(Debug, Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    bases: Arc<[Arc<str>]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    service: &'static str,
    /// The calling service's credential for the callee's `/internal/*` routes.
    credentials: Option<(Arc<ServiceKey>, &'static str)>,
    /// The callee's app when it runs in this process (filled once it is built).
    local: Option<LocalApp>,
}

/// A service's app in this process, filled in once the service is assembled (services call
/// each other both ways, so a client is made before its callee's app exists), with the time
/// limit a call over the network would have.
#[derive(Debug, Clone)]
pub struct LocalApp {
    app: Arc<std::sync::OnceLock<axum::Router>>,
    timeout: Duration,
}

impl LocalApp {
    pub fn new(timeout: Duration) -> LocalApp {
        LocalApp {
            app: Arc::default(),
            timeout,
        }
    }

    /// Serves the calls from now on; a second app for the same service is ignored.
    pub fn serve(&self, app: axum::Router) {
        let _ = self.app.set(app);
    }

    /// The app, once it is served.
    pub fn app(&self) -> Option<axum::Router> {
        self.app.get().cloned()
    }
}

/// The most an in-memory answer may hold: the callee is this process's own code, whose
/// internal answers are pages of bounded size; this only bounds a bug.
const LOCAL_ANSWER_LIMIT: usize = 16 * 1024 * 1024;

impl ServiceClient {
    pub fn new(service: &'static str, base_url: &str, http: reqwest::Client) -> Self {
        let mut bases: Vec<Arc<str>> = base_url
            .split(',')
            .map(|b| b.trim().trim_end_matches('/'))
            .filter(|b| !b.is_empty())
            .map(Arc::from)
            .collect();
        if bases.is_empty() {
            // Calls then fail as unavailable, naming the empty URL, as they always did.
            bases.push(Arc::from(""));
        }
        ServiceClient {
            http,
            bases: bases.into(),
            next: Arc::default(),
            service,
            credentials: None,
            local: None,
        }
    }

    /// Calls go to `local`'s app in memory once it is there (over the network until then).
    pub fn served_by(mut self, local: LocalApp) -> Self {
        self.local = Some(local);
        self
    }

    /// Signs every call as coming from `caller` (a service token in `Authorization`).
    pub fn signed_by(mut self, key: Arc<ServiceKey>, caller: &'static str) -> Self {
        self.credentials = Some((key, caller));
        self
    }

    /// The first replica's base URL.
    pub fn base_url(&self) -> &str {
        self.bases.first().map_or("", |b| b)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// A call whose answer body does not matter (204s, deletes).
    pub async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), CallError> {
        self.exchange(method, path, body).await.map(|_| ())
    }

    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CallError> {
        let bytes = self.exchange(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| self.unavailable(format!("unreadable answer: {e}")))
    }

    async fn exchange<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<bytes_compat::Bytes, CallError> {
        use tracing::Instrument as _;
        if !crate::telemetry::traces_on() {
            // No span to export: none is made (a span per internal call costs on every call).
            return self
                .exchange_in(method, path, body, &tracing::Span::none())
                .await;
        }
        // The client side of the hop (the callee's request span is its child).
        let span = tracing::info_span!(
            "call",
            otel.name = method.as_str(),
            otel.kind = "client",
            peer.service = self.service,
            http.request.method = method.as_str(),
            url.path = path,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let answer = self
            .exchange_in(method, path, body, &span)
            .instrument(span.clone())
            .await;
        if let Err(CallError::Unavailable { .. }) = &answer {
            span.record("otel.status_code", "ERROR");
        }
        answer
    }

    async fn exchange_in<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        span: &tracing::Span,
    ) -> Result<bytes_compat::Bytes, CallError> {
        if let Some(local) = &self.local
            && let Some(app) = local.app.get()
        {
            return self
                .exchange_in_memory(app, local.timeout, method, path, body, span)
                .await;
        }
        let n = self.bases.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        let mut attempt = 0;
        let headers = self.call_headers(span)?;
        let response = loop {
            let base = &self.bases[(start + attempt) % n];
            let mut request = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .headers(headers.clone());
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => break response,
                // Refused: nothing was sent, so another replica may take the same call.
                Err(e) if e.is_connect() && attempt + 1 < n => attempt += 1,
                Err(e) => return Err(self.unavailable(describe(&e))),
            }
        };
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.unavailable(describe(&e)))?;
        self.answer(status, bytes, span)
    }

    /// The call as [`exchange_in`](Self::exchange_in) sends it, handed to `app` as its
    /// listener would hand it over: the same headers, an origin-form target, the same limit.
    async fn exchange_in_memory<B: Serialize>(
        &self,
        app: &axum::Router,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<&B>,
        span: &tracing::Span,
    ) -> Result<bytes_compat::Bytes, CallError> {
        use tower::ServiceExt as _;
        let mut headers = self.call_headers(span)?;
        let body = match body {
            Some(body) => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                let json = serde_json::to_vec(body)
                    .map_err(|e| self.unavailable(format!("unwritable request: {e}")))?;
                axum::body::Body::from(json)
            }
            None => axum::body::Body::empty(),
        };
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .body(body)
            .map_err(|_| self.unavailable(format!("invalid path {path}")))?;
        *request.headers_mut() = headers;
        let call = async {
            let response = match app.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let status = response.status();
            axum::body::to_bytes(response.into_body(), LOCAL_ANSWER_LIMIT)
                .await
                .map(|bytes| (status, bytes))
                .map_err(|_| self.unavailable("unreadable answer".into()))
        };
        let (status, bytes) = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| self.unavailable("timed out".into()))??;
        self.answer(status, bytes, span)
    }

    /// What every call carries, over the network or in memory: the trace context, the
    /// service token and the request id.
    fn call_headers(&self, span: &tracing::Span) -> Result<http::HeaderMap, CallError> {
        let mut headers = http::HeaderMap::new();
        if !span.is_none() {
            crate::telemetry::propagation::inject_into_headers(span, &mut headers);
        }
        if let Some((key, caller)) = &self.credentials {
            let value = key
                .authorization_for(caller)
                .map_err(|e| self.unavailable(format!("cannot sign the call: {e}")))?;
            headers.insert(http::header::AUTHORIZATION, value);
        }
        if let Ok(Some(id)) = REQUEST_ID.try_with(Clone::clone)
            && let Ok(value) = http::HeaderValue::try_from(id)
        {
            headers.insert(crate::server::X_REQUEST_ID, value);
        }
        Ok(headers)
    }

    /// Sorts an answer into its body, a refusal or an outage.
    fn answer(
        &self,
        status: StatusCode,
        bytes: bytes_compat::Bytes,
        span: &tracing::Span,
    ) -> Result<bytes_compat::Bytes, CallError> {
        span.record("http.response.status_code", status.as_u16());
        if status.is_success() {
            Ok(bytes)
        } else if status.is_client_error() {
            Err(CallError::Rejected {
                service: self.service,
                status,
                problem: serde_json::from_slice(&bytes).ok().map(Box::new),
            })
        } else {
            Err(self.unavailable(format!("answered {status}")))
        }
    }

    fn unavailable(&self, reason: String) -> CallError {
        CallError::Unavailable {
            service: self.service,
            reason,
        }
    }
}

mod bytes_compat {
    pub type Bytes = axum::body::Bytes;
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused".into()
    } else {
        "transport error".into()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_replica_refusing_connections_passes_the_call_to_the_next() {
        let app = axum::Router::new().route(
            "/internal/echo",
            axum::routing::post(|axum::Json(v): axum::Json<serde_json::Value>| async move {
                axum::Json(v)
            }),
        );
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_url = format!("http://{}", live.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(live, app).await });
        // A port nothing listens on any more: connections to it are refused.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone_url = format!("http://{}", gone.local_addr().unwrap());
        drop(gone);

        let client = ServiceClient::new(
            "echo",
            &format!("{gone_url}, {live_url}/"),
            reqwest::Client::new(),
        );
        assert_eq!(client.base_url(), gone_url);
        // Every call lands, whichever replica its turn starts at, body included.
        for i in 0..6 {
            let answer: serde_json::Value = client
                .post("/internal/echo", &serde_json::json!({"n": i}))
                .await
                .unwrap();
            assert_eq!(answer["n"], i);
        }
        // With only the refusing one, the call fails as unavailable.
        let alone = ServiceClient::new("echo", &gone_url, reqwest::Client::new());
        let failed = alone
            .post::<_, serde_json::Value>("/internal/echo", &serde_json::json!({}))
            .await;
        assert!(matches!(failed, Err(CallError::Unavailable { .. })));
    }

    /// The app an in-memory callee runs: echoes the body with the headers a callee reads.
    fn echo_app() -> axum::Router {
        use axum::response::IntoResponse as _;
        axum::Router::new()
            .route(
                "/internal/echo",
                axum::routing::post(
                    |headers: http::HeaderMap, axum::Json(v): axum::Json<serde_json::Value>| async move {
                        let header = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        axum::Json(serde_json::json!({
                            "body": v,
                            "authorization": header("authorization"),
                            "request_id": header("x-request-id"),
                        }))
                    },
                ),
            )
            .route(
                "/internal/missing",
                axum::routing::get(|| async {
                    Problem::not_found("the thing").into_response()
                }),
            )
            .route(
                "/internal/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
    }

    #[tokio::test]
    async fn a_callee_in_this_process_is_called_in_memory_once_it_is_served() {
        // Nothing listens at the URL: a call over the network is refused.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone_url = format!("http://{}", gone.local_addr().unwrap());
        drop(gone);
        let key = Arc::new(ServiceKey::new(
            crate::auth::SigningKey::generate().unwrap(),
        ));
        let local = LocalApp::new(Duration::from_millis(200));
        let client = ServiceClient::new("echo", &gone_url, reqwest::Client::new())
            .signed_by(key.clone(), "orders")
            .served_by(local.clone());
        let before = client
            .post::<_, serde_json::Value>("/internal/echo", &serde_json::json!({"n": 1}))
            .await;
        assert!(
            matches!(before, Err(CallError::Unavailable { .. })),
            "{before:?}"
        );

        local.serve(echo_app());
        let answer: serde_json::Value = REQUEST_ID
            .scope(Some("req-7".into()), async {
                client
                    .post("/internal/echo", &serde_json::json!({"n": 2}))
                    .await
            })
            .await
            .unwrap();
        assert_eq!(answer["body"]["n"], 2);
        assert_eq!(answer["request_id"], "req-7");
        // Signed as over the network: the callee checks the same service token.
        let token = answer["authorization"]
            .as_str()
            .unwrap()
            .strip_prefix("Bearer ")
            .unwrap();
        assert_eq!(key.verify(token).unwrap(), "orders");

        // A refusal keeps its status and problem; a callee too slow times out as unavailable.
        let missing = client
            .get::<serde_json::Value>("/internal/missing")
            .await
            .unwrap_err();
        match missing {
            CallError::Rejected {
                status, problem, ..
            } => {
                assert_eq!(status, StatusCode::NOT_FOUND);
                assert!(problem.is_some());
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let slow = client.get::<serde_json::Value>("/internal/slow").await;
        match slow {
            Err(CallError::Unavailable { reason, .. }) => assert_eq!(reason, "timed out"),
            other => panic!("expected a time-out, got {other:?}"),
        }
    }
}
