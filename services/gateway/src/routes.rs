//! The public route table: every route's method, template, service and who may call it; the
//! early access check; the OpenAPI document that describes the table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use kit::Problem;
use kit::auth::{Auth, Caller, Rejection};

use crate::limits::{Limits, RouteClass};
use crate::proxy::{Proxy, Upstream};

/// Base URLs of the services behind the gateway, and the apps of those that run in this
/// process (called in memory: see [`crate::proxy::Upstream::served_by`]).
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub users: String,
    pub products: String,
    pub orders: String,
    pub payments: String,
    pub notifications: String,
    pub analytics: String,
    pub in_process: Vec<(Service, Router)>,
}

/// The service behind a route (`Gateway`: the gateway itself, for its OpenAPI document).
pub use kit::wiring::Service;

/// Who may call a route. The gateway refuses early what it can tell from the token alone;
/// every service checks again, and decides ownership (someone else's order is a 404 there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, signed in or not.
    Anyone,
    /// A signed-in customer or administrator; ownership is checked by the service.
    SignedIn,
    /// Administrators (operators) only.
    Admin,
}

impl Access {
    /// How the OpenAPI document names it (`x-mercato-access`).
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Anyone => "anyone",
            Access::SignedIn => "signed-in",
            Access::Admin => "admin",
        }
    }
}

/// One public route: method, template, the service behind it and who may call it.
#[derive(Debug, Clone, Copy)]
pub struct PublicRoute {
    pub method: &'static str,
    pub template: &'static str,
    pub service: Service,
    pub access: Access,
}

const fn route(
    method: &'static str,
    template: &'static str,
    service: Service,
    access: Access,
) -> PublicRoute {
    PublicRoute {
        method,
        template,
        service,
        access,
    }
}

/// Every public route a service answers. Anything else but the gateway's own
/// ([`OPENAPI_ROUTE`], [`FAULT_ROUTES`]) is a 404 here (`/internal/*`, `/metrics`, `/ready`).
pub const PUBLIC_ROUTES: &[PublicRoute] = &[
    route("POST", "/api/v1/users", Service::Users, Access::Anyone),
    route("GET", "/api/v1/users", Service::Users, Access::Admin),
    route("GET", "/api/v1/users/me", Service::Users, Access::SignedIn),
    route(
        "GET",
        "/api/v1/users/{id}",
        Service::Users,
        Access::SignedIn,
    ),
    route(
        "DELETE",
        "/api/v1/users/{id}",
        Service::Users,
        Access::SignedIn,
    ),
    route("POST", "/api/v1/auth/token", Service::Users, Access::Anyone),
    route(
        "POST",
        "/api/v1/auth/logout",
        Service::Users,
        Access::Anyone,
    ),
    route(
        "GET",
        "/.well-known/jwks.json",
        Service::Users,
        Access::Anyone,
    ),
    route("GET", "/api/v1/products", Service::Products, Access::Anyone),
    route("POST", "/api/v1/products", Service::Products, Access::Admin),
    route(
        "GET",
        "/api/v1/products/{id}",
        Service::Products,
        Access::Anyone,
    ),
    route(
        "PUT",
        "/api/v1/products/{id}",
        Service::Products,
        Access::Admin,
    ),
    route(
        "DELETE",
        "/api/v1/products/{id}",
        Service::Products,
        Access::Admin,
    ),
    route(
        "GET",
        "/api/v1/products/{id}/stock",
        Service::Products,
        Access::Anyone,
    ),
    route(
        "PUT",
        "/api/v1/products/{id}/stock",
        Service::Products,
        Access::Admin,
    ),
    route("POST", "/api/v1/orders", Service::Orders, Access::SignedIn),
    route(
        "GET",
        "/api/v1/orders/{id}",
        Service::Orders,
        Access::SignedIn,
    ),
    route(
        "PUT",
        "/api/v1/orders/{id}/status",
        Service::Orders,
        Access::SignedIn,
    ),
    route(
        "GET",
        "/api/v1/orders/user/{user_id}",
        Service::Orders,
        Access::SignedIn,
    ),
    route(
        "POST",
        "/api/v1/payments",
        Service::Payments,
        Access::SignedIn,
    ),
    route(
        "GET",
        "/api/v1/payments/{id}",
        Service::Payments,
        Access::SignedIn,
    ),
    route(
        "POST",
        "/api/v1/payments/{id}/refund",
        Service::Payments,
        Access::Admin,
    ),
    // Stripe calls it; its signature, not a token, is checked (by the payments service).
    route(
        "POST",
        "/api/v1/payments/webhooks/stripe",
        Service::Payments,
        Access::Anyone,
    ),
    route(
        "GET",
        "/api/v1/payments/order/{order_id}",
        Service::Payments,
        Access::SignedIn,
    ),
    route(
        "GET",
        "/api/v1/notifications",
        Service::Notifications,
        Access::SignedIn,
    ),
    route(
        "GET",
        "/api/v1/analytics/windows",
        Service::Analytics,
        Access::Admin,
    ),
    route(
        "GET",
        "/api/v1/analytics/summary",
        Service::Analytics,
        Access::Admin,
    ),
    route(
        "GET",
        "/api/v1/analytics/top-products",
        Service::Analytics,
        Access::Admin,
    ),
    route(
        "GET",
        "/api/v1/analytics/stream",
        Service::Analytics,
        Access::Admin,
    ),
];

/// The gateway's own public route (not forwarded).
pub const OPENAPI_ROUTE: PublicRoute =
    route("GET", "/openapi.json", Service::Gateway, Access::Anyone);

/// Fault injection (`kit::faults::admin`): answered by the gateway itself, which passes each
/// change on to the services in other processes.
pub const FAULT_ROUTES: &[PublicRoute] = &[
    route(
        "GET",
        "/api/v1/admin/faults",
        Service::Gateway,
        Access::Admin,
    ),
    route(
        "DELETE",
        "/api/v1/admin/faults",
        Service::Gateway,
        Access::Admin,
    ),
    route(
        "PUT",
        "/api/v1/admin/faults/{name}",
        Service::Gateway,
        Access::Admin,
    ),
    route(
        "DELETE",
        "/api/v1/admin/faults/{name}",
        Service::Gateway,
        Access::Admin,
    ),
];

impl Upstreams {
    fn base(&self, service: Service) -> &str {
        match service {
            Service::Gateway => "",
            Service::Users => &self.users,
            Service::Products => &self.products,
            Service::Orders => &self.orders,
            Service::Payments => &self.payments,
            Service::Notifications => &self.notifications,
            Service::Analytics => &self.analytics,
        }
    }
}

/// One method of a route template: where it goes, who may call it, its limit class.
type RouteMethod = (Method, Arc<Upstream>, Access, RouteClass);

/// The class of a route for the limits all clients share.
fn class_of(method: &Method, template: &str) -> RouteClass {
    let signs_in =
        *method == Method::POST && matches!(template, "/api/v1/auth/token" | "/api/v1/users");
    if signs_in {
        RouteClass::SignIn
    } else if *method == Method::GET || *method == Method::HEAD {
        RouteClass::Read
    } else {
        RouteClass::Write
    }
}

/// The gateway's API routes (the shared endpoints come from `kit::server::app`).
pub fn router(
    upstreams: &Upstreams,
    body_limit: usize,
    timeout: Duration,
    limits: Arc<Limits>,
) -> Result<Router, crate::proxy::ProxyError> {
    let proxy = Proxy::new(body_limit, timeout);
    let mut router = Router::new().route(OPENAPI_ROUTE.template, get(openapi));
    // One upstream (and so one circuit breaker) per service, shared by its routes.
    let mut by_service: Vec<(Service, Arc<Upstream>)> = Vec::new();
    for r in PUBLIC_ROUTES {
        if !by_service.iter().any(|(s, _)| *s == r.service) {
            let mut upstream = Upstream::parse(upstreams.base(r.service))?;
            if let Some((_, app)) = upstreams.in_process.iter().find(|(s, _)| *s == r.service) {
                upstream = upstream.served_by(app.clone());
            }
            let upstream = Arc::new(upstream);
            upstream.watch_health(&proxy);
            by_service.push((r.service, upstream));
        }
    }
    let upstream_of = |service: Service| {
        by_service
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, u)| u.clone())
    };
    let mut templates: Vec<&'static str> = Vec::new();
    for r in PUBLIC_ROUTES {
        if !templates.contains(&r.template) {
            templates.push(r.template);
        }
    }
    for template in templates {
        // The methods of this template, with their service and access.
        let methods: Arc<Vec<RouteMethod>> = Arc::new(
            PUBLIC_ROUTES
                .iter()
                .filter(|r| r.template == template)
                .map(|r| {
                    let method = Method::from_bytes(r.method.as_bytes())
                        .map_err(|_| crate::proxy::ProxyError::Method(r.method))?;
                    let class = class_of(&method, r.template);
                    let upstream = upstream_of(r.service).ok_or_else(|| {
                        crate::proxy::ProxyError::InvalidUpstream(r.template.to_owned())
                    })?;
                    Ok((method, upstream, r.access, class))
                })
                .collect::<Result<_, crate::proxy::ProxyError>>()?,
        );
        let limits = limits.clone();
        router = router.route(
            template,
            any(move |State(proxy): State<Proxy>, req: Request| {
                let (methods, limits) = (methods.clone(), limits.clone());
                async move {
                    let started = std::time::Instant::now();
                    let peer = req
                        .extensions()
                        .get::<ConnectInfo<SocketAddr>>()
                        .map(|info| info.0.ip());
                    let client = peer.map(|p| limits.client_address(p, req.headers()));
                    let response = async {
                        let Some((_, upstream, access, class)) =
                            methods.iter().find(|(m, ..)| m == req.method())
                        else {
                            return method_not_allowed();
                        };
                        let scheme =
                            peer.map_or("http", |p| limits.client_scheme(p, req.headers()));
                        if let Some(client) = client
                            && let Err(limited) = limits.admit_request(*class, client)
                        {
                            return limited.into_response();
                        }
                        let auth = req.extensions().get::<Arc<Auth>>().cloned();
                        let (parts, body) = req.into_parts();
                        let caller = match admit(*access, auth.as_deref(), &parts.headers).await {
                            Ok(caller) => caller,
                            Err(refused) => return refused.into_response(),
                        };
                        if let Some(user) = caller.as_ref().and_then(|c| c.user_id())
                            && let Err(limited) = limits.admit_user(user)
                        {
                            return limited.into_response();
                        }
                        let req = Request::from_parts(parts, body);
                        proxy.forward(upstream, req, client, scheme).await
                    }
                    .await;
                    access_log(client, response.status(), started);
                    response
                }
            }),
        );
    }
    Ok(router.with_state(proxy))
}

/// One line per request at the edge, target `access` (filter it like any target, e.g.
/// `MERCATO_LOG__LEVEL=info,access=off`): the client's address as the rate limits saw it, the
/// answer and the time taken; the request span adds the method, route template and request id.
fn access_log(client: Option<std::net::IpAddr>, status: StatusCode, started: std::time::Instant) {
    tracing::info!(
        target: "access",
        client = %client.map_or_else(|| "-".to_owned(), |c| c.to_string()),
        status = status.as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
    );
}

fn method_not_allowed() -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
    )
    .into_response()
}

/// The early check: a missing or bad token on a signed-in route is a 401, a customer on an
/// administrators' route a 403, before anything reaches a service. Open mode admits all.
/// Returns the caller of a route that needs sign-in (for the per-user limit).
async fn admit(
    access: Access,
    auth: Option<&Auth>,
    headers: &axum::http::HeaderMap,
) -> Result<Option<Caller>, Rejection> {
    if access == Access::Anyone {
        return Ok(None);
    }
    let auth = auth.ok_or(Rejection::NotConfigured)?;
    let caller = auth.caller(headers).await?.ok_or(Rejection::Missing)?;
    if access == Access::Admin && !caller.is_admin() {
        return Err(Rejection::NotAdmin);
    }
    Ok(Some(caller))
}

/// The public API's OpenAPI 3.1 document, kept next to the route table it describes (a test
/// holds the two together).
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_exactly_the_public_routes_and_their_access() {
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(spec["openapi"], "3.1.0");
        assert_eq!(
            spec["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let all: Vec<&PublicRoute> = PUBLIC_ROUTES
            .iter()
            .chain([&OPENAPI_ROUTE])
            .chain(FAULT_ROUTES)
            .collect();
        for r in &all {
            let op = &spec["paths"][r.template][r.method.to_lowercase()];
            assert!(op.is_object(), "{} {} undocumented", r.method, r.template);
            assert_eq!(
                op["x-mercato-access"],
                r.access.as_str(),
                "{} {}: documented access differs from the gateway's",
                r.method,
                r.template
            );
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|req| req.get("bearer").is_some()));
            assert_eq!(
                secured,
                r.access != Access::Anyone,
                "{} {}: security requirement",
                r.method,
                r.template
            );
            if r.access != Access::Anyone {
                assert!(
                    op["responses"]["401"].is_object(),
                    "{} {} documents no 401",
                    r.method,
                    r.template
                );
            }
            if r.access == Access::Admin {
                assert!(
                    op["responses"]["403"].is_object(),
                    "{} {} documents no 403",
                    r.method,
                    r.template
                );
            }
        }
        for (path, ops) in spec["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                assert!(
                    all.iter()
                        .any(|r| r.template == path && r.method.eq_ignore_ascii_case(method)),
                    "{method} {path} is documented but not routed"
                );
            }
        }
    }
}
