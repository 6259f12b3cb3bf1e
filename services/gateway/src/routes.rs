//! The public route table and the gateway's readiness (every upstream ready).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{any, get};
use futures_util::future::join_all;

use crate::proxy::{Proxy, Upstream};

/// Base URLs of the services behind the gateway.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub users: String,
    pub products: String,
    pub orders: String,
    pub payments: String,
    pub notifications: String,
    pub analytics: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Users,
    Products,
    Orders,
    Payments,
    Notifications,
    Analytics,
}

/// Every public route, by template, and the service that serves it.
pub const PUBLIC_ROUTES: &[(&str, Service)] = &[
    ("/api/v1/users", Service::Users),
    ("/api/v1/users/{id}", Service::Users),
    ("/api/v1/products", Service::Products),
    ("/api/v1/products/{id}", Service::Products),
    ("/api/v1/products/{id}/stock", Service::Products),
    ("/api/v1/orders", Service::Orders),
    ("/api/v1/orders/{id}", Service::Orders),
    ("/api/v1/orders/{id}/status", Service::Orders),
    ("/api/v1/orders/user/{user_id}", Service::Orders),
    ("/api/v1/payments", Service::Payments),
    ("/api/v1/payments/{id}", Service::Payments),
    ("/api/v1/payments/{id}/refund", Service::Payments),
    ("/api/v1/payments/order/{order_id}", Service::Payments),
    ("/api/v1/notifications", Service::Notifications),
    ("/api/v1/analytics/{*rest}", Service::Analytics),
];

impl Upstreams {
    fn base(&self, service: Service) -> &str {
        match service {
            Service::Users => &self.users,
            Service::Products => &self.products,
            Service::Orders => &self.orders,
            Service::Payments => &self.payments,
            Service::Notifications => &self.notifications,
            Service::Analytics => &self.analytics,
        }
    }

    fn all(&self) -> [(&'static str, &str); 6] {
        [
            ("users", &self.users),
            ("products", &self.products),
            ("orders", &self.orders),
            ("payments", &self.payments),
            ("notifications", &self.notifications),
            ("analytics", &self.analytics),
        ]
    }
}

/// The gateway's API routes (the shared endpoints come from `kit::server::app`).
pub fn router(
    upstreams: &Upstreams,
    body_limit: usize,
    timeout: Duration,
) -> Result<Router, crate::proxy::ProxyError> {
    let proxy = Proxy::new(body_limit, timeout);
    let mut router = Router::new().route("/openapi.json", get(openapi));
    for (template, service) in PUBLIC_ROUTES {
        let upstream = Arc::new(Upstream::parse(upstreams.base(*service))?);
        router = router.route(
            template,
            any(move |State(proxy): State<Proxy>, req: Request| {
                let upstream = upstream.clone();
                async move { proxy.forward(&upstream, req).await }
            }),
        );
    }
    Ok(router.with_state(proxy))
}

/// The public API's OpenAPI 3.1 document, kept next to the route table it describes (a test
/// holds the two together).
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Ready when every upstream's `/ready` answers 200 within a second.
pub async fn check_upstreams(upstreams: &Upstreams, client: &probe::Client) -> Result<(), String> {
    let checks = upstreams.all().map(|(name, base)| async move {
        let ok = probe::ready(client, &format!("{}/ready", base.trim_end_matches('/'))).await;
        (name, ok)
    });
    let failing: Vec<&str> = join_all(checks)
        .await
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| n)
        .collect();
    if failing.is_empty() {
        Ok(())
    } else {
        Err(format!("not ready: {}", failing.join(", ")))
    }
}

/// Readiness probing over the same hyper client the proxy uses (no second HTTP stack).
pub mod probe {
    use std::time::Duration;

    use axum::body::Body;
    use hyper_util::client::legacy::Client as HyperClient;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub type Client = HyperClient<HttpConnector, Body>;

    pub fn client() -> Client {
        HyperClient::builder(TokioExecutor::new()).build_http()
    }

    pub async fn ready(client: &Client, url: &str) -> bool {
        let Ok(uri) = url.parse::<http::Uri>() else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), client.get(uri)).await,
            Ok(Ok(response)) if response.status().is_success()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_exactly_the_public_routes() {
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(spec["openapi"], "3.1.0");
        let paths: Vec<&str> = spec["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for (template, _) in PUBLIC_ROUTES {
            match template.strip_suffix("{*rest}") {
                Some(prefix) => assert!(
                    paths.iter().any(|p| p.starts_with(prefix)),
                    "{template} undocumented"
                ),
                None => assert!(paths.contains(template), "{template} undocumented"),
            }
        }
        for path in paths {
            let routed = PUBLIC_ROUTES
                .iter()
                .any(|(t, _)| match t.strip_suffix("{*rest}") {
                    Some(prefix) => path.starts_with(prefix),
                    None => *t == path,
                });
            assert!(routed, "{path} is documented but not routed");
        }
    }
}
