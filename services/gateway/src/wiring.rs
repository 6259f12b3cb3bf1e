//! How the gateway starts inside a platform process: its route table over the other
//! services' URLs, ready whenever it runs.

use std::sync::Arc;
use std::time::Duration;

use kit::server::ready_check;
use kit::wiring::{Context as _, Service, Shared, Started, WiringError};

/// Starts the gateway in front of the services at `shared`'s URLs; `in_process` are the apps
/// of those running in this process (handed their requests in memory when
/// `http.in_process_upstreams` is on).
pub fn start(
    shared: &Shared<'_>,
    in_process: &[(Service, axum::Router)],
) -> Result<Started, WiringError> {
    let upstreams = crate::Upstreams {
        users: shared.url(Service::Users),
        products: shared.url(Service::Products),
        orders: shared.url(Service::Orders),
        payments: shared.url(Service::Payments),
        notifications: shared.url(Service::Notifications),
        analytics: shared.url(Service::Analytics),
        in_process: if shared.settings.http.in_process_upstreams {
            in_process.to_vec()
        } else {
            Vec::new()
        },
    };
    let timeout = Duration::from_millis(shared.settings.http.upstream_timeout_ms);
    let limits = crate::limits::Limits::new(&shared.settings.rate_limit)
        .map_err(|e| WiringError::config(e.to_string()))?;
    let router = crate::router(&upstreams, shared.body_limit(), timeout, Arc::new(limits))
        .context("configuring the gateway")?;
    // The gateway is ready when it runs: one sick service must not take every gateway pod
    // (and so the whole shop) out of the load balancer; its routes answer 503.
    let ready = ready_check(|| async { Ok(()) });
    Ok(Started {
        router,
        ready,
        dependencies: Vec::new(),
    })
}
