//! Forwarding one request to one upstream, streaming both bodies.

use std::sync::Arc;
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
    #[error("invalid upstream url `{0}`: expected http://host:port")]
    InvalidUpstream(String),
    #[error("invalid method `{0}` in the route table")]
    Method(&'static str),
}

/// An upstream's scheme and authority.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
}

impl Upstream {
    pub fn parse(base: &str) -> Result<Upstream, ProxyError> {
        let uri: Uri = base
            .parse()
            .map_err(|_| ProxyError::InvalidUpstream(base.to_owned()))?;
        match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) if scheme == &http::uri::Scheme::HTTP => Ok(Upstream {
                scheme: scheme.clone(),
                authority: authority.clone(),
            }),
            _ => Err(ProxyError::InvalidUpstream(base.to_owned())),
        }
    }
}

#[derive(Clone)]
pub struct Proxy {
    client: Arc<Client<HttpConnector, Body>>,
    body_limit: usize,
    timeout: Duration,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

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
    for name in HOP_BY_HOP {
        headers.remove(*name);
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

    pub async fn forward(&self, upstream: &Upstream, req: Request) -> Response {
        let (mut parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.body_limit as u64) {
            return kit::extract::too_large().into_response();
        }
        let path_and_query = parts.uri.path_and_query().cloned();
        let mut uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone());
        if let Some(pq) = path_and_query {
            uri = uri.path_and_query(pq);
        }
        let Ok(uri) = uri.build() else {
            return Problem::bad_request("the request target is not valid").into_response();
        };
        if let Some(host) = parts.headers.get(header::HOST).cloned() {
            parts.headers.insert("x-forwarded-host", host);
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
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(earlier) => format!("{earlier}, {peer}"),
                None => peer,
            };
            if let Ok(value) = HeaderValue::from_str(&chain) {
                parts.headers.insert("x-forwarded-for", value);
            }
        }
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static("http"));
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let upstream_req =
            Request::from_parts(parts, Body::new(Limited::new(body, self.body_limit)));

        match tokio::time::timeout(self.timeout, self.client.request(upstream_req)).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Ok(Err(e)) => {
                if caused_by_body_limit(&e) {
                    return kit::extract::too_large().into_response();
                }
                tracing::warn!(upstream = %upstream.authority, error = %e, "upstream request failed");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream-unavailable",
                    "Service unavailable",
                )
                .with_detail("the service behind this route is not reachable; retry later")
                .into_response()
            }
            Err(_) => {
                tracing::warn!(upstream = %upstream.authority, "upstream timed out");
                Problem::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    "Upstream timed out",
                )
                .with_detail("the service behind this route did not answer in time")
                .into_response()
            }
        }
    }
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
