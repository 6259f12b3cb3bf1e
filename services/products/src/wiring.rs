//! How the products service starts inside a platform process: its store on the backend its
//! database url names, the demo catalog, the sweeper that releases expired reservations, and
//! its router.

use std::sync::Arc;

use kit::wiring::{Backend, Context as _, Service, Shared, Started, WiringError, ready_when};

use crate::store::{ProductStore, SqliteProductStore};

/// Starts the products service.
pub async fn start(shared: &Shared<'_>) -> Result<Started, WiringError> {
    let settings = shared.settings;
    settings.limits.validate().map_err(WiringError::config)?;
    let store: Arc<dyn ProductStore> = match shared.backend(Service::Products)? {
        Backend::Sqlite(url) => Arc::new(
            SqliteProductStore::open(&url, &settings.sqlite)
                .await
                .context("opening the products store")?,
        ),
        #[cfg(feature = "postgres")]
        Backend::Postgres(url) => Arc::new(
            crate::pg::PgProductStore::open(&url, "products", &settings.postgres)
                .await
                .context("opening the products store (PostgreSQL)")?,
        ),
        other => return Err(other.unsupported(Service::Products)),
    };
    let closed = store.clone();
    shared
        .lifecycle
        .close_at_stop(move || async move { closed.close().await });
    if settings.demo {
        let added = crate::demo::seed_if_empty(store.as_ref())
            .await
            .context("seeding the demo catalog")?;
        if added > 0 {
            tracing::info!(products = added, "demo catalog seeded");
        }
    }
    // Gives back stock held for orders that were never created or never settled, and forgets
    // reservations settled longer ago than the retention.
    let sweeper = store.clone();
    let interval = shared.sweep_interval();
    let retention = i64::try_from(shared.reservation_retention().as_millis()).unwrap_or(i64::MAX);
    shared.lifecycle.every(interval, move || {
        let store = sweeper.clone();
        async move {
            match crate::store::release_all_due(store.as_ref(), interval).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(released = n, "expired stock reservations released"),
                Err(e) => tracing::warn!(error = %e, "releasing expired reservations failed"),
            }
            // What is held now, for the pipeline dashboard (stock locked by unpaid orders).
            match store.held().await {
                Ok((reservations, units)) => {
                    metrics::gauge!("reservations_held").set(reservations as f64);
                    metrics::gauge!("units_held").set(units as f64);
                }
                Err(e) => tracing::warn!(error = %e, "counting held reservations failed"),
            }
            let before = kit::db::now_ms().saturating_sub(retention);
            match crate::store::prune_all_settled(store.as_ref(), before, interval).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "settled stock reservations pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning settled reservations failed"),
            }
        }
    });
    let pinged = store.clone();
    let ready = ready_when(move || {
        let store = pinged.clone();
        async move { store.ping().await.is_ok() }
    });
    Ok(Started {
        router: crate::router(crate::api::Catalog {
            store,
            max_price: settings.limits.max_price,
        }),
        ready,
        dependencies: Vec::new(),
    })
}
