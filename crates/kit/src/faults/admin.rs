//! The fault-injection routes, for administrators (`Admin`: 401 without a token, 403 for a
//! customer), on the gateway and on every service:
//!
//! - `GET /api/v1/admin/faults`: 200 `{"allowed": bool, "faults": [{"name", "params",
//!   "since", "until", "injected"}]}`.
//! - `PUT /api/v1/admin/faults/{name}` with the fault's parameters as a JSON object: 200 the
//!   fault; 400 `unknown-fault` for a name that is none, 400 `bad-request` for a body that is
//!   not JSON, 422 `validation-error` for parameters that are not the fault's.
//! - `DELETE /api/v1/admin/faults/{name}`, `DELETE /api/v1/admin/faults`: 204.
//!
//! Where faults are not [allowed](super::allowed), `PUT` and `DELETE` answer 403
//! `faults-disabled` (saying how to allow them) and `GET` says `"allowed": false`.
//!
//! The gateway passes each change on to the services at its upstream URLs ([`Peer`]), with
//! the administrator's own token (the gateway holds no service key), so that with one service
//! per process (`mercato serve`) every process gets it; its `GET` adds up their counts.
//! Services in the gateway's own process share its faults: a forwarded request names the
//! process it comes from (`x-mercato-fault-origin`), and one that reaches the process it came
//! from is answered 204 without doing anything again.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;

use super::{Fault, FaultError, FaultList, FaultName};
use crate::auth::Admin;
use crate::config::Settings;
use crate::extract::Path;
use crate::problem::Problem;

/// The routes, as the router registers them.
pub const ROUTE: &str = "/api/v1/admin/faults";
pub const ROUTE_ONE: &str = "/api/v1/admin/faults/{name}";

/// Names the process a forwarded change comes from.
pub const ORIGIN: HeaderName = HeaderName::from_static("x-mercato-fault-origin");

/// This process, as [`ORIGIN`] names it.
static PROCESS: LazyLock<String> = LazyLock::new(|| uuid::Uuid::new_v4().to_string());

/// A service the gateway passes fault changes on to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub service: &'static str,
    /// Its base URL.
    pub url: String,
}

/// The fault routes' state: whether faults may be set here, and where changes are passed on.
#[derive(Debug, Clone)]
pub struct FaultAdmin {
    allowed: bool,
    environment: Arc<str>,
    peers: Arc<[Peer]>,
    http: Option<reqwest::Client>,
}

impl FaultAdmin {
    /// The routes of a process with `settings`, applying changes to this process only.
    pub fn new(settings: &Settings) -> FaultAdmin {
        FaultAdmin {
            allowed: super::allowed(settings),
            environment: Arc::from(settings.environment.as_str()),
            peers: Arc::from(Vec::new()),
            http: None,
        }
    }

    /// Also passes every change on to `peers` (the gateway's upstreams in other processes).
    pub fn forwarding_to(mut self, peers: Vec<Peer>, http: reqwest::Client) -> FaultAdmin {
        self.peers = Arc::from(peers);
        self.http = Some(http);
        self
    }

    pub fn allowed(&self) -> bool {
        self.allowed
    }

    /// `GET`, `DELETE` on [`ROUTE`]; `PUT`, `DELETE` on [`ROUTE_ONE`]. They need the platform's
    /// identity layer (`Auth::layer`) like every route.
    pub fn router(self) -> Router {
        if self.allowed {
            super::describe_metrics();
        }
        Router::new()
            .route(ROUTE, get(list).delete(clear_all))
            .route(ROUTE_ONE, axum::routing::put(set).delete(clear))
            .with_state(self)
    }

    /// 403 where faults may not be set.
    fn refuse_unless_allowed(&self) -> Result<(), Problem> {
        if self.allowed {
            return Ok(());
        }
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "faults-disabled",
            "Fault injection is not allowed here",
        )
        .with_detail(format!(
            "faults may be injected only in a development or test environment (this one is {:?}) \
             unless faults.allowed = true (MERCATO_FAULTS__ALLOWED=true) is set",
            self.environment
        )))
    }

    /// Sends the change (or the question) to every peer, at once; their answers to a `GET`,
    /// and the peers that did not take it, with why.
    async fn forward(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &HeaderMap,
    ) -> (Vec<FaultList>, Vec<(&'static str, String)>) {
        let Some(http) = &self.http else {
            return (Vec::new(), Vec::new());
        };
        let authorization = headers.get(header::AUTHORIZATION).cloned();
        let request_id = crate::server::REQUEST_ID
            .try_with(Clone::clone)
            .ok()
            .flatten();
        let mut calls = JoinSet::new();
        for peer in self.peers.iter() {
            let mut request = http
                .request(
                    method.clone(),
                    format!("{}{path}", peer.url.trim_end_matches('/')),
                )
                .header(ORIGIN, PROCESS.as_str());
            if let Some(authorization) = &authorization {
                request = request.header(header::AUTHORIZATION, authorization.clone());
            }
            if let Some(id) = &request_id {
                request = request.header(crate::server::X_REQUEST_ID, id.as_str());
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            let service = peer.service;
            calls.spawn(async move { (service, answer_of(request.send().await).await) });
        }
        let (mut lists, mut failed) = (Vec::new(), Vec::new());
        while let Some(done) = calls.join_next().await {
            match done {
                Ok((_, Ok(Some(list)))) => lists.push(list),
                Ok((_, Ok(None))) => {}
                Ok((service, Err(why))) => failed.push((service, why)),
                Err(e) => tracing::error!(error = %e, "passing a fault change on failed"),
            }
        }
        failed.sort_unstable();
        (lists, failed)
    }
}

/// A peer's answer: `Some(list)` for a `GET`'s, `None` for a change taken (or a request that
/// came back to this process), `Err(why)` otherwise.
async fn answer_of(
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<Option<FaultList>, String> {
    let response = sent.map_err(|e| {
        if e.is_timeout() {
            "timed out".to_owned()
        } else if e.is_connect() {
            "connection refused".to_owned()
        } else {
            "transport error".to_owned()
        }
    })?;
    let status = response.status();
    if status == StatusCode::NO_CONTENT {
        return Ok(None);
    }
    let body = response
        .bytes()
        .await
        .map_err(|_| "the answer could not be read".to_owned())?;
    if !status.is_success() {
        let detail = serde_json::from_slice::<Problem>(&body)
            .ok()
            .and_then(|p| p.detail)
            .unwrap_or_default();
        return Err(format!("answered {status} {detail}").trim_end().to_owned());
    }
    // A change's answer is the fault, a question's the list.
    Ok(serde_json::from_slice::<FaultList>(&body).ok())
}

/// Whether this request was passed on by this very process (its faults are already ours).
fn came_back(headers: &HeaderMap) -> bool {
    headers
        .get(ORIGIN)
        .is_some_and(|origin| origin.as_bytes() == PROCESS.as_bytes())
}

fn fault_problem(e: &FaultError) -> Problem {
    match e {
        FaultError::Unknown(_) => Problem::new(
            StatusCode::BAD_REQUEST,
            "unknown-fault",
            "There is no such fault",
        )
        .with_detail(e.to_string()),
        FaultError::Invalid { fault, .. } => {
            Problem::invalid(e.to_string()).with("fault", fault.as_str())
        }
    }
}

/// 502 when some peers did not take a change: it holds everywhere else, and repeating the
/// request is safe.
fn not_applied(failed: &[(&'static str, String)]) -> Response {
    let services: Map<String, Value> = failed
        .iter()
        .map(|(service, why)| ((*service).to_owned(), Value::from(why.as_str())))
        .collect();
    let names: Vec<&str> = failed.iter().map(|(s, _)| *s).collect();
    Problem::new(
        StatusCode::BAD_GATEWAY,
        "faults-not-applied",
        "The change did not reach every service",
    )
    .with_detail(format!(
        "the change holds here and on the other services, but not on {}; repeat the request",
        names.join(", ")
    ))
    .with("services", services)
    .into_response()
}

async fn list(State(admin): State<FaultAdmin>, _: Admin, headers: HeaderMap) -> Response {
    if came_back(&headers) {
        return StatusCode::NO_CONTENT.into_response();
    }
    let mut list = FaultList {
        allowed: admin.allowed,
        faults: super::registry().list(),
    };
    if !admin.allowed {
        return axum::Json(list).into_response();
    }
    let (lists, failed) = admin.forward(Method::GET, ROUTE, None, &headers).await;
    for theirs in lists {
        list.allowed &= theirs.allowed;
        for fault in theirs.faults {
            match list.faults.iter_mut().find(|f| f.name == fault.name) {
                Some(ours) => ours.injected += fault.injected,
                None => list.faults.push(fault),
            }
        }
    }
    let mut body = json!(list);
    if !failed.is_empty() {
        let unreachable: Map<String, Value> = failed
            .into_iter()
            .map(|(service, why)| (service.to_owned(), Value::from(why)))
            .collect();
        body["unreachable"] = Value::Object(unreachable);
    }
    axum::Json(body).into_response()
}

async fn set(
    State(admin): State<FaultAdmin>,
    _: Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    admin.refuse_unless_allowed()?;
    let name = FaultName::parse(&name).map_err(|e| fault_problem(&e))?;
    let params: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|_| {
            Problem::bad_request(
                "the body is not well-formed JSON: send the fault's parameters as a JSON object",
            )
        })?
    };
    let fault = Fault::parse(name, &params).map_err(|e| fault_problem(&e))?;
    if came_back(&headers) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let params = fault.params();
    let view = super::set(fault);
    let path = format!("{ROUTE}/{name}");
    let (_, failed) = admin
        .forward(Method::PUT, &path, Some(params), &headers)
        .await;
    if !failed.is_empty() {
        return Ok(not_applied(&failed));
    }
    Ok(axum::Json(view).into_response())
}

async fn clear(
    State(admin): State<FaultAdmin>,
    _: Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    admin.refuse_unless_allowed()?;
    let name = FaultName::parse(&name).map_err(|e| fault_problem(&e))?;
    if came_back(&headers) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    super::clear(name);
    let path = format!("{ROUTE}/{name}");
    let (_, failed) = admin.forward(Method::DELETE, &path, None, &headers).await;
    if !failed.is_empty() {
        return Ok(not_applied(&failed));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn clear_all(
    State(admin): State<FaultAdmin>,
    _: Admin,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    admin.refuse_unless_allowed()?;
    if came_back(&headers) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    super::clear_all();
    let (_, failed) = admin.forward(Method::DELETE, ROUTE, None, &headers).await;
    if !failed.is_empty() {
        return Ok(not_applied(&failed));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
