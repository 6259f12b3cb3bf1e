//! Forwarding one request to a service's upstream, streaming both bodies. An upstream may be
//! several replicas (`http://a:8003,http://b:8003`): each request goes to the next one in
//! turn whose circuit breaker lets it through, and a replica that refuses the connection
//! (nothing was sent) hands the request to the next. Replicas are also checked actively
//! ([`Upstream::watch_health`]): one whose `/health` does not answer 2xx twice in a row gets
//! no requests until it answers again, so a replica that hangs (accepts connections, never
//! answers) costs no client a timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kit::Problem;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "invalid upstream url `{0}`: expected http://host:port, or several separated by commas"
    )]
    InvalidUpstream(String),
    #[error("invalid method `{0}` in the route table")]
    Method(&'static str),
}

/// Replicas of one service at most (a comma-separated url longer than this is refused).
const MAX_REPLICAS: usize = 64;

/// A service's upstream: its replicas, each with its circuit breaker, taken in turn; or, when
/// the service runs in this process, its app, called in memory.
#[derive(Debug)]
pub struct Upstream {
    members: Vec<Member>,
    next: AtomicUsize,
    local: Option<axum::Router>,
}

/// One replica: where it listens, and how it has been answering.
#[derive(Debug)]
struct Member {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    breaker: Breaker,
    /// What the last health checks said (true until they say otherwise).
    healthy: AtomicBool,
    /// Health checks failed in a row.
    checks_failed: AtomicU32,
}

/// How often each replica's `/health` is asked, and how long it has to answer.
const HEALTH_EVERY: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Failed checks in a row that take a replica out of turn (one passed check brings it back).
const UNHEALTHY_AFTER: u32 = 2;

impl Upstream {
    /// The same upstream, served in memory by `app` (the service's whole app, as its listener
    /// serves it), with no socket, connection pool or HTTP encoding in between.
    pub fn served_by(mut self, app: axum::Router) -> Upstream {
        self.local = Some(app);
        self
    }

    /// `http://host:port`, or several separated by commas (the replicas of one service).
    pub fn parse(base: &str) -> Result<Upstream, ProxyError> {
        let members = base
            .split(',')
            .map(str::trim)
            .filter(|one| !one.is_empty())
            .map(|one| {
                Member::parse(one).ok_or_else(|| ProxyError::InvalidUpstream(base.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if members.is_empty() || members.len() > MAX_REPLICAS {
            return Err(ProxyError::InvalidUpstream(base.to_owned()));
        }
        Ok(Upstream {
            members,
            next: AtomicUsize::new(0),
            local: None,
        })
    }

    /// The replicas in the order one request tries them: round robin from the next one, the
    /// healthy ones first. Those the health checks took out come last rather than never, so a
    /// check that is wrong (or every replica out at once) cannot take the service down.
    fn in_turn(&self) -> impl Iterator<Item = &Member> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let turn = move |i| &self.members[(start + i) % n];
        let healthy = (0..n)
            .map(turn)
            .filter(|m| m.healthy.load(Ordering::Relaxed));
        let unhealthy = (0..n)
            .map(turn)
            .filter(|m| !m.healthy.load(Ordering::Relaxed));
        healthy.chain(unhealthy)
    }

    /// Checks each replica's `/health` every [`HEALTH_EVERY`] while the upstream is in use
    /// (the task ends when the last route holding it is dropped). Only for several replicas
    /// reached over TCP: one replica has nowhere else to send its requests.
    pub fn watch_health(self: &Arc<Upstream>, proxy: &Proxy) {
        if self.members.len() < 2 || self.local.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let upstream = Arc::downgrade(self);
        let client = proxy.client.clone();
        runtime.spawn(async move {
            let mut every = tokio::time::interval(HEALTH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(upstream) = upstream.upgrade() else {
                    return;
                };
                let checks = upstream.members.iter().map(|m| m.check_health(&client));
                futures_util::future::join_all(checks).await;
            }
        });
    }
}

impl Member {
    fn parse(base: &str) -> Option<Member> {
        let uri: Uri = base.parse().ok()?;
        match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) if scheme == &http::uri::Scheme::HTTP => Some(Member {
                scheme: scheme.clone(),
                authority: authority.clone(),
                breaker: Breaker::default(),
                healthy: AtomicBool::new(true),
                checks_failed: AtomicU32::new(0),
            }),
            _ => None,
        }
    }

    /// Asks the replica's `/health` (the service's own listener: it answers while the process
    /// serves requests) and records the answer.
    async fn check_health(&self, client: &Client<HttpConnector, Body>) {
        let request = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/health")
            .build()
            .ok()
            .and_then(|uri| Request::get(uri).body(Body::empty()).ok());
        let passed = match request {
            Some(request) => matches!(
                tokio::time::timeout(HEALTH_TIMEOUT, client.request(request)).await,
                Ok(Ok(response)) if response.status().is_success()
            ),
            None => false,
        };
        let upstream = self.authority.as_str();
        if passed {
            self.checks_failed.store(0, Ordering::Relaxed);
            if !self.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    upstream,
                    "a replica passes its health check again; back in turn"
                );
            }
        } else {
            let failed = self
                .checks_failed
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if failed >= UNHEALTHY_AFTER && self.healthy.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    upstream,
                    failed,
                    "a replica fails its health checks; out of turn until it passes"
                );
            }
        }
        metrics::gauge!("gateway_upstream_healthy", "upstream" => upstream.to_owned()).set(
            if self.healthy.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
    }
}

/// Consecutive failures (unreachable or timed out) that open an upstream's breaker.
const OPEN_AFTER: u32 = 5;
/// How long an open breaker answers 503 at once before letting one probe through.
const OPEN_FOR_MS: u64 = 2_000;

/// A circuit breaker per upstream: after [`OPEN_AFTER`] failures in a row its routes answer
/// 503 at once (no connect attempt, no timeout to wait out) for [`OPEN_FOR_MS`]; then one
/// request probes (half-open): a success closes it, a failure opens it again. Other
/// upstreams' routes are untouched.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    /// When it opened (ms since the gateway's start), while open.
    opened_at: AtomicU64,
    probing: AtomicBool,
}

/// What the breaker lets a request do.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    Go,
    /// The one request that tests an upstream whose breaker was open.
    Probe,
    Refuse,
}

fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
    .saturating_add(1)
}

impl Breaker {
    fn pass(&self) -> Pass {
        if self.failures.load(Ordering::Relaxed) < OPEN_AFTER {
            return Pass::Go;
        }
        let opened = self.opened_at.load(Ordering::Relaxed);
        if now_ms().saturating_sub(opened) < OPEN_FOR_MS {
            return Pass::Refuse;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => Pass::Probe,
            Err(_) => Pass::Refuse,
        }
    }

    fn succeeded(&self, pass: &Pass) {
        if self.failures.swap(0, Ordering::Relaxed) >= OPEN_AFTER {
            tracing::info!("an upstream answers again; its breaker is closed");
        }
        if *pass == Pass::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    /// The request ended for a reason that says nothing about the upstream (the client went
    /// away): counts neither way, but a probe lets the next request probe.
    fn undecided(&self, pass: &Pass) {
        if *pass == Pass::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    fn failed(&self, pass: &Pass, upstream: &http::uri::Authority) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures == OPEN_AFTER || *pass == Pass::Probe {
            self.opened_at.store(now_ms(), Ordering::Relaxed);
            if failures == OPEN_AFTER {
                tracing::warn!(%upstream, "an upstream keeps failing; its breaker is open");
                metrics::counter!("gateway_breaker_opened_total", "upstream" => upstream.to_string())
                    .increment(1);
            }
        }
        if *pass == Pass::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }
}

fn unavailable() -> Response {
    let mut response = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream-unavailable",
        "Service unavailable",
    )
    .with_detail("the service behind this route is not reachable; retry later")
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    response
}

#[derive(Clone)]
pub struct Proxy {
    client: Arc<Client<HttpConnector, Body>>,
    body_limit: usize,
    timeout: Duration,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). Names, not
/// text: a `&str` name is parsed again on every use, twice per proxied request.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The de-facto forwarding headers, as names (see [`HOP_BY_HOP`]).
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

impl Proxy {
    pub fn new(body_limit: usize, timeout: Duration) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Proxy {
            client: Arc::new(client),
            body_limit,
            timeout,
        }
    }

    /// Forwards `req` to `upstream`. `client` is who the gateway decided the client is (see
    /// [`crate::limits::Limits::client_address`]) and `scheme` the scheme it used.
    pub async fn forward(
        &self,
        upstream: &Upstream,
        req: Request,
        client: Option<std::net::IpAddr>,
        scheme: &'static str,
    ) -> Response {
        let (mut parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.body_limit as u64) {
            return kit::extract::too_large().into_response();
        }
        if let Some(host) = parts.headers.get(header::HOST).cloned() {
            parts.headers.insert(X_FORWARDED_HOST, host);
        }
        parts.headers.remove(header::HOST);
        strip_hop_by_hop(&mut parts.headers);
        // The client's address, appended so upstreams (login throttling) read the last hop.
        if let Some(peer) = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip().to_string())
        {
            let chain = match parts
                .headers
                .get(X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok())
            {
                Some(earlier) => format!("{earlier}, {peer}"),
                None => peer,
            };
            if let Ok(value) = HeaderValue::from_str(&chain) {
                parts.headers.insert(X_FORWARDED_FOR, value);
            }
        }
        // The client as the gateway resolved it (RFC 7239), replacing whatever a client sent:
        // services read it for login throttling and logs.
        parts.headers.remove(header::FORWARDED);
        if let Some(client) = client {
            let node = match client {
                std::net::IpAddr::V4(v4) => v4.to_string(),
                std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
            };
            if let Ok(value) = HeaderValue::from_str(&format!("for={node};proto={scheme}")) {
                parts.headers.insert(header::FORWARDED, value);
            }
        }
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
        parts.version = http::Version::HTTP_11;
        if !kit::telemetry::traces_on() {
            return self.send(upstream, parts, body).await;
        }
        // The client side of the hop, when traces are exported (the upstream's request span
        // is its child, in memory or over TCP alike).
        let span = tracing::info_span!(
            "forward",
            otel.name = parts.method.as_str(),
            otel.kind = "client",
            server.address = tracing::field::Empty,
            http.request.method = parts.method.as_str(),
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        kit::telemetry::propagation::inject_into_headers(&span, &mut parts.headers);
        let response =
            tracing::Instrument::instrument(self.send(upstream, parts, body), span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        if response.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        response
    }

    /// Sends the prepared request to `upstream`: in memory when it runs in this process, else
    /// to its replicas in turn.
    async fn send(&self, upstream: &Upstream, parts: http::request::Parts, body: Body) -> Response {
        if let Some(app) = &upstream.local {
            return self.call_in_memory(app, parts, body).await;
        }
        if let [only] = upstream.members.as_slice() {
            let pass = only.breaker.pass();
            if pass == Pass::Refuse {
                return unavailable();
            }
            return match self.send_to(only, parts, Body::new(body), pass).await {
                Ok(response) | Err(Unsent(response)) => response,
            };
        }
        // Several replicas: the body is read first (it is at most the body limit), so a
        // replica that refuses the connection can hand the same request to the next one.
        let body = match http_body_util::BodyExt::collect(Limited::new(body, self.body_limit)).await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if caused_by_body_limit(e.as_ref()) => {
                return kit::extract::too_large().into_response();
            }
            Err(_) => return Problem::bad_request("the request body was cut off").into_response(),
        };
        let mut last = None;
        for member in upstream.in_turn() {
            let pass = member.breaker.pass();
            if pass == Pass::Refuse {
                continue;
            }
            match self
                .send_to(member, parts.clone(), Body::from(body.clone()), pass)
                .await
            {
                Ok(response) => return response,
                Err(Unsent(response)) => last = Some(response),
            }
        }
        last.unwrap_or_else(unavailable)
    }

    /// Sends the request to one replica, with its breaker told how it went. `Err` when the
    /// connection was refused and nothing was sent: the next replica may take it.
    async fn send_to(
        &self,
        member: &Member,
        mut parts: http::request::Parts,
        body: Body,
        pass: Pass,
    ) -> Result<Response, Unsent> {
        if kit::telemetry::traces_on() {
            tracing::Span::current().record("server.address", member.authority.as_str());
        }
        let path_and_query = parts.uri.path_and_query().cloned();
        let mut uri = Uri::builder()
            .scheme(member.scheme.clone())
            .authority(member.authority.clone());
        if let Some(pq) = path_and_query {
            uri = uri.path_and_query(pq);
        }
        let Ok(uri) = uri.build() else {
            member.breaker.undecided(&pass);
            return Ok(Problem::bad_request("the request target is not valid").into_response());
        };
        parts.uri = uri;
        // Whether the client's body failed (it went away mid-upload): the upstream is not at
        // fault then, and its breaker must not count it.
        let client_body_failed = Arc::new(AtomicBool::new(false));
        let watched = {
            let failed = client_body_failed.clone();
            http_body_util::BodyExt::map_err(body, move |e| {
                failed.store(true, Ordering::Relaxed);
                e
            })
        };
        let upstream_req =
            Request::from_parts(parts, Body::new(Limited::new(watched, self.body_limit)));

        match tokio::time::timeout(self.timeout, self.client.request(upstream_req)).await {
            Ok(Ok(response)) => {
                member.breaker.succeeded(&pass);
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, Body::new(body)))
            }
            Ok(Err(e)) => {
                if caused_by_body_limit(&e) {
                    member.breaker.succeeded(&pass);
                    return Ok(kit::extract::too_large().into_response());
                }
                if client_body_failed.load(Ordering::Relaxed) {
                    // Nobody is left to read this answer; it says nothing about the upstream.
                    member.breaker.undecided(&pass);
                    return Ok(Problem::bad_request("the request body was cut off").into_response());
                }
                member.breaker.failed(&pass, &member.authority);
                tracing::warn!(upstream = %member.authority, error = %e, "upstream request failed");
                if e.is_connect() {
                    Err(Unsent(unavailable()))
                } else {
                    Ok(unavailable())
                }
            }
            Err(_) => {
                member.breaker.failed(&pass, &member.authority);
                tracing::warn!(upstream = %member.authority, "upstream timed out");
                Ok(timed_out())
            }
        }
    }
}

/// A request a replica never received (its connection was refused), with the answer to give
/// if no other replica takes it.
struct Unsent(Response);

impl Proxy {
    /// Hands the request to an app in this process, as its listener would: a fresh request
    /// (none of the gateway's extensions; the client is in `Forwarded`), the origin-form
    /// target, the same time limit. The app enforces the body limit itself.
    async fn call_in_memory(
        &self,
        app: &axum::Router,
        mut parts: http::request::Parts,
        body: Body,
    ) -> Response {
        use tower::ServiceExt as _;
        parts.extensions = http::Extensions::new();
        let request = Request::from_parts(parts, body);
        match tokio::time::timeout(self.timeout, app.clone().oneshot(request)).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body)
            }
            Ok(Err(never)) => match never {},
            Err(_) => timed_out(),
        }
    }
}

fn timed_out() -> Response {
    Problem::new(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream-timeout",
        "Upstream timed out",
    )
    .with_detail("the service behind this route did not answer in time")
    .into_response()
}

fn caused_by_body_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}
