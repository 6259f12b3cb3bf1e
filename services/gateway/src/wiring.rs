//! How the gateway starts inside a platform process: its route table over the other
//! services' URLs, the storefront and console, the fault-injection routes, ready whenever it
//! runs.

use std::sync::Arc;
use std::time::Duration;

use kit::faults::FaultAdmin;
use kit::faults::admin::Peer;
use kit::server::ready_check;
use kit::wiring::{Context as _, Service, Shared, Started, WiringError};

/// Starts the gateway in front of the services at `shared`'s URLs; those in `shared.local`
/// are handed their requests in memory. `here` are the services running in this process (they
/// share its faults).
pub fn start(shared: &Shared<'_>, here: &[Service]) -> Result<Started, WiringError> {
    let upstreams = crate::Upstreams {
        users: shared.url(Service::Users),
        products: shared.url(Service::Products),
        orders: shared.url(Service::Orders),
        payments: shared.url(Service::Payments),
        notifications: shared.url(Service::Notifications),
        analytics: shared.url(Service::Analytics),
        in_process: shared
            .local
            .iter()
            .filter_map(|(service, local)| local.app().map(|app| (*service, app)))
            .collect(),
    };
    let timeout = Duration::from_millis(shared.settings.http.upstream_timeout_ms);
    let limits = crate::limits::Limits::new(&shared.settings.rate_limit)
        .map_err(|e| WiringError::config(e.to_string()))?;
    let limits = Arc::new(limits);
    let api = crate::router(&upstreams, shared.body_limit(), timeout, limits.clone())
        .context("configuring the gateway")?;
    // The storefront and console call the API above in memory, as the visitor.
    let is_https: web::IsHttps = Arc::new(move |req: &axum::extract::Request| {
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        peer.is_some_and(|peer| limits.client_scheme(peer, req.headers()) == "https")
    });
    let pages = web::Web::new(
        // The same identity layer as the served router gets where the platform is assembled.
        web::Api::new(api.clone().layer(shared.auth.layer())),
        shared.auth.clone(),
        is_https,
        web::WebSettings {
            currency: shared.settings.currency.clone(),
            ops_url: Some(shared.ops_url.to_owned()),
        },
    );
    // Fault injection: answered here and passed on to the services in other processes (those
    // in this one share its faults).
    let peers = Service::ALL
        .into_iter()
        .filter(|s| *s != Service::Gateway && !here.contains(s))
        // Each replica of a service named by several URLs holds faults of its own.
        .flat_map(|s| {
            shared
                .url(s)
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(|url| Peer {
                    service: s.as_str(),
                    url: url.to_owned(),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let faults = FaultAdmin::new(shared.settings).forwarding_to(peers, shared.http.clone());
    let router = api.merge(web::router(pages)).merge(faults.router());
    // The gateway is ready when it runs: one sick service must not take every gateway pod
    // (and so the whole shop) out of the load balancer; its routes answer 503.
    let ready = ready_check(|| async { Ok(()) });
    Ok(Started {
        router,
        ready,
        dependencies: Vec::new(),
    })
}
