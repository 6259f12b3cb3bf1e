//! The deployment under load, over HTTP: one call at a time, answered as a [`Reply`] that says
//! whether the step got what it expected and, if not, what kind of failure it was (a status
//! with its problem type, a timeout, a refused connection), which is how the report counts
//! errors.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::LoadError;

/// The platform's base URL and one connection pool for every virtual user.
#[derive(Clone)]
pub struct Target {
    http: reqwest::Client,
    base: String,
}

/// A call's answer. `failure` is `None` when the status was one the step expected.
#[derive(Debug)]
pub struct Reply {
    pub status: Option<StatusCode>,
    pub body: bytes::Bytes,
    pub failure: Option<String>,
    /// The `Link: <…>; rel="next"` page, as a path with its query.
    pub next: Option<String>,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        self.failure.is_none()
    }

    pub fn status_is(&self, code: u16) -> bool {
        self.status.map(|s| s.as_u16()) == Some(code)
    }

    /// The body as `T`, or a failure kind saying the answer was unreadable.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body).map_err(|_| "unreadable answer".to_owned())
    }

    /// The outcome is not known: the request may or may not have taken effect.
    pub fn outcome_unknown(&self) -> bool {
        match self.status {
            None => true,
            Some(s) => s.is_server_error(),
        }
    }
}

/// One request: method, path (with query), bearer token, JSON body, `Idempotency-Key`.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub token: Option<String>,
    pub body: Option<serde_json::Value>,
    pub idempotency_key: Option<String>,
    /// Statuses that count as success for this step (a decline is success for a step that
    /// pays with a declined card).
    pub expect: &'static [u16],
}

impl Call {
    pub fn get(path: impl Into<String>, token: Option<String>) -> Call {
        Call {
            method: Method::GET,
            path: path.into(),
            token,
            body: None,
            idempotency_key: None,
            expect: &[200],
        }
    }

    pub fn send(
        method: Method,
        path: impl Into<String>,
        token: Option<String>,
        body: serde_json::Value,
    ) -> Call {
        Call {
            method,
            path: path.into(),
            token,
            body: Some(body),
            idempotency_key: None,
            expect: &[200, 201],
        }
    }

    pub fn expecting(mut self, expect: &'static [u16]) -> Call {
        self.expect = expect;
        self
    }

    pub fn idempotent(mut self, key: String) -> Call {
        self.idempotency_key = Some(key);
        self
    }
}

impl Target {
    pub fn new(base: &str, timeout: Duration) -> Result<Target, LoadError> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(LoadError::Plan(format!(
                "--target `{base}` must be an http:// or https:// URL"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .pool_max_idle_per_host(1024)
            .user_agent(concat!("mercato-load/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LoadError::Setup(format!("building the HTTP client: {e}")))?;
        Ok(Target { http, base })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn call(&self, call: Call) -> Reply {
        let mut request = self
            .http
            .request(call.method, format!("{}{}", self.base, call.path));
        if let Some(token) = call.token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = call.idempotency_key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return transport_failure(&e),
        };
        let status = response.status();
        let next = response
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_page);
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return transport_failure(&e),
        };
        let failure = if call.expect.contains(&status.as_u16()) {
            None
        } else {
            Some(failure_kind(status, &body))
        };
        Reply {
            status: Some(status),
            body,
            failure,
            next,
        }
    }

    /// A whole text resource (Prometheus metrics), outside the API's base path.
    pub async fn get_text(&self, url: &str) -> Result<String, String> {
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        response.text().await.map_err(|e| e.to_string())
    }
}

fn transport_failure(e: &reqwest::Error) -> Reply {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection refused or reset"
    } else {
        "transport error"
    };
    Reply {
        status: None,
        body: bytes::Bytes::new(),
        failure: Some(kind.to_owned()),
        next: None,
    }
}

/// The path and query of a Link header's `rel="next"` target (absolute or not).
fn next_page(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        if !params.contains("rel=\"next\"") {
            return None;
        }
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let path = match target.find("://") {
            Some(scheme) => {
                let rest = &target[scheme + 3..];
                &rest[rest.find('/')?..]
            }
            None => target,
        };
        Some(path.to_owned())
    })
}

/// `503 fault-injected`: the status and the problem type's slug, which is what an operator
/// needs to tell an injected failure from an overload or a bug.
fn failure_kind(status: StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Problem {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let slug = serde_json::from_slice::<Problem>(body)
        .ok()
        .and_then(|p| p.kind)
        .map(|k| k.rsplit('/').next().unwrap_or_default().to_owned())
        .filter(|s| !s.is_empty() && s.len() <= 64);
    match slug {
        Some(slug) => format!("{} {slug}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_pages_come_from_the_link_header() {
        assert_eq!(
            next_page(r#"<http://x:1/api/v1/users?limit=2&cursor=abc>; rel="next""#).as_deref(),
            Some("/api/v1/users?limit=2&cursor=abc")
        );
        assert_eq!(
            next_page(r#"</api/v1/users?cursor=z>; rel="next""#).as_deref(),
            Some("/api/v1/users?cursor=z")
        );
        assert_eq!(next_page(r#"</a>; rel="prev""#), None);
    }

    #[test]
    fn failures_are_named_by_status_and_problem_type() {
        let body = br#"{"type":"/problems/fault-injected","title":"x","status":503}"#;
        assert_eq!(
            failure_kind(StatusCode::SERVICE_UNAVAILABLE, body),
            "503 fault-injected"
        );
        assert_eq!(failure_kind(StatusCode::BAD_GATEWAY, b"<html>"), "502");
    }
}
