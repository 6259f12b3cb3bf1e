//! The pages' way to the platform: the public API, called in memory through the gateway's own
//! router with the visitor's token and address, so every rule (access, limits, validation)
//! applies to a click exactly as to curl.

use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::ServiceExt as _;

/// The largest API answer a page reads (a page of 100 products is far below it).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// The request headers a page passes on to the API: the client's address as the proxies in
/// front reported it (the gateway's limits trust them only from its trusted proxies), the
/// request id and the trace.
const PASSED_ON: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "traceparent",
];

/// Who is calling the API for a page: the visitor's token and address. Not `Debug`: the token
/// must never reach a log line.
#[derive(Clone)]
pub struct Visit {
    pub token: Option<String>,
    connect_info: Option<ConnectInfo<SocketAddr>>,
    passed_on: Vec<(HeaderName, HeaderValue)>,
}

impl Visit {
    pub fn new(
        connect_info: Option<ConnectInfo<SocketAddr>>,
        headers: &HeaderMap,
        token: Option<String>,
    ) -> Visit {
        let passed_on = PASSED_ON
            .iter()
            .flat_map(|name| {
                headers
                    .get_all(*name)
                    .iter()
                    .map(|value| (HeaderName::from_static(name), value.clone()))
            })
            .collect();
        Visit {
            token,
            connect_info,
            passed_on,
        }
    }
}

/// What went wrong with an API call, as a page shows it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API said no (problem+json): its `detail` is written for people.
    #[error("{status}: {message}")]
    Problem {
        status: StatusCode,
        /// The problem type's slug (`insufficient-stock`).
        kind: String,
        message: String,
    },
    /// The API could not be reached or answered something we cannot read.
    #[error("the platform did not answer usably: {0}")]
    Unusable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Problem { status, .. } => *status,
            ApiError::Unusable(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The sentence a page shows for it.
    pub fn message(&self) -> String {
        match self {
            ApiError::Problem { message, .. } => message.clone(),
            ApiError::Unusable(_) => {
                "The shop could not complete this just now. Please try again in a moment."
                    .to_owned()
            }
        }
    }
}

impl axum::response::IntoResponse for ApiError {
    /// The live views' answer (`{"error": message}` with the API's status): their script
    /// shows nothing of it and asks again.
    fn into_response(self) -> Response {
        (
            self.status(),
            axum::Json(serde_json::json!({"error": self.message()})),
        )
            .into_response()
    }
}

/// One page of a listing and the cursor of the next, when there is one.
pub struct Listed<T> {
    pub items: T,
    pub next: Option<String>,
}

/// The public API, reached in memory.
#[derive(Clone)]
pub struct Api {
    router: Router,
}

impl Api {
    /// `router` is the gateway's API router (the routes `PUBLIC_ROUTES` lists).
    pub fn new(router: Router) -> Api {
        Api { router }
    }

    /// A call's raw answer.
    pub async fn call(
        &self,
        visit: &Visit,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        idempotency_key: Option<&str>,
    ) -> Result<Response, ApiError> {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in &visit.passed_on {
            request = request.header(name, value);
        }
        if let Some(token) = &visit.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let body = match body {
            Some(bytes) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(bytes)
            }
            None => Body::empty(),
        };
        let mut request = request
            .body(body)
            .map_err(|e| ApiError::Unusable(e.to_string()))?;
        if let Some(info) = visit.connect_info {
            request.extensions_mut().insert(info);
        }
        // The router's error type is Infallible.
        let Ok(response) = self.router.clone().oneshot(request).await;
        Ok(response)
    }

    async fn read(response: Response) -> Result<(StatusCode, HeaderMap, Bytes), ApiError> {
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| ApiError::Unusable(e.to_string()))?;
        Ok((parts.status, parts.headers, bytes))
    }

    fn problem(status: StatusCode, bytes: &[u8]) -> ApiError {
        match serde_json::from_slice::<kit::problem::Problem>(bytes) {
            Ok(problem) => ApiError::Problem {
                status,
                kind: problem
                    .kind
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                message: problem
                    .detail
                    .map(|detail| sentence(&detail))
                    .unwrap_or_else(|| problem.title.into_owned()),
            },
            Err(_) => ApiError::Unusable(format!("{status} without a problem body")),
        }
    }

    fn parse<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, ApiError> {
        if !status.is_success() {
            return Err(Self::problem(status, bytes));
        }
        serde_json::from_slice(bytes).map_err(|e| ApiError::Unusable(e.to_string()))
    }

    /// `GET path` as JSON.
    pub async fn get<T: DeserializeOwned>(&self, visit: &Visit, path: &str) -> Result<T, ApiError> {
        let response = self.call(visit, Method::GET, path, None, None).await?;
        let (status, _, bytes) = Self::read(response).await?;
        Self::parse(status, &bytes)
    }

    /// `GET path` of a paged listing: the items and the next page's cursor (from `Link`).
    pub async fn list<T: DeserializeOwned>(
        &self,
        visit: &Visit,
        path: &str,
    ) -> Result<Listed<T>, ApiError> {
        let response = self.call(visit, Method::GET, path, None, None).await?;
        let (status, headers, bytes) = Self::read(response).await?;
        let items = Self::parse(status, &bytes)?;
        Ok(Listed {
            items,
            next: next_cursor(&headers),
        })
    }

    /// A write with a JSON body; the answer parsed as `T`.
    pub async fn send<T: DeserializeOwned>(
        &self,
        visit: &Visit,
        method: Method,
        path: &str,
        body: &impl Serialize,
        idempotency_key: Option<&str>,
    ) -> Result<T, ApiError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Unusable(e.to_string()))?;
        let response = self
            .call(visit, method, path, Some(bytes), idempotency_key)
            .await?;
        let (status, _, bytes) = Self::read(response).await?;
        Self::parse(status, &bytes)
    }
}

/// A problem's detail as a sentence: capitalised, ending with a full stop.
fn sentence(detail: &str) -> String {
    let detail = detail.trim();
    let mut chars = detail.chars();
    let mut text: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => return String::new(),
    };
    if !text.ends_with(['.', '!', '?']) {
        text.push('.');
    }
    text
}

/// The `cursor` of a `Link: <...?cursor=X>; rel="next"` header.
fn next_cursor(headers: &HeaderMap) -> Option<String> {
    let link = headers.get(header::LINK)?.to_str().ok()?;
    let target = link.split(';').next()?.trim().trim_matches(['<', '>']);
    let query = target.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "cursor")
        .map(|(_, value)| value.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_cursor_comes_from_the_link_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::LINK,
            HeaderValue::from_static("</api/v1/products?limit=2&cursor=abc-1>; rel=\"next\""),
        );
        assert_eq!(next_cursor(&headers).as_deref(), Some("abc-1"));
        assert_eq!(next_cursor(&HeaderMap::new()), None);
    }

    #[test]
    fn details_read_as_sentences() {
        assert_eq!(sentence("only 2 left"), "Only 2 left.");
        assert_eq!(sentence("Done!"), "Done!");
        assert_eq!(sentence(""), "");
    }

    #[test]
    fn problems_become_messages() {
        let body = br#"{"type":"/problems/insufficient-stock","title":"Conflict","status":409,"detail":"not enough stock for Tea"}"#;
        match Api::problem(StatusCode::CONFLICT, body) {
            ApiError::Problem {
                status,
                kind,
                message,
            } => {
                assert_eq!(status, StatusCode::CONFLICT);
                assert_eq!(kind, "insufficient-stock");
                assert_eq!(message, "Not enough stock for Tea.");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Api::problem(StatusCode::BAD_GATEWAY, b"<html>"),
            ApiError::Unusable(_)
        ));
    }
}
