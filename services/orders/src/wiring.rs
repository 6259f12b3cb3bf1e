//! How the orders service starts inside a platform process: its store on the backend its
//! database url names (SQLite, PostgreSQL or DynamoDB) with its outbox relay and
//! Idempotency-Key records, the saga's payment listener (with its payments client, for
//! compensations) and expiry sweeper, and its router.

use std::sync::Arc;

use bus::outbox::Relay;
use bus::transports::Transports;
use bus::{Queue, Stream};
use kit::idempotency::Idempotency;
use kit::wiring::{
    Backend, Context as _, HOUSEKEEPING, Service, Shared, Started, WiringError, ready_when,
};

use crate::store::{OrderStore, SqliteOrderStore};

/// The orders store on the backend its URL names, with its relay and idempotency keys.
async fn open(
    shared: &Shared<'_>,
    stream: Arc<dyn Stream>,
    queue: Arc<dyn Queue>,
) -> Result<(Arc<dyn OrderStore>, Relay, Idempotency), WiringError> {
    let url = match shared.backend(Service::Orders)? {
        Backend::Sqlite(url) => url,
        #[cfg(feature = "postgres")]
        Backend::Postgres(url) => {
            let pg = shared
                .open_pg(&url, Service::Orders, crate::pg::MIGRATIONS)
                .await?;
            let relay = Relay::on_postgres(pg.clone(), stream, queue).owned_by("orders");
            let idempotency = shared.idempotency_on_postgres(&pg);
            let store = crate::PgOrderStore::new(pg).with_relay_waker(relay.waker());
            return Ok((Arc::new(store), relay, idempotency));
        }
        #[cfg(feature = "dynamodb")]
        Backend::Dynamo(url) => {
            let store = crate::dynamo::DynamoOrderStore::from_url(&url)
                .await
                .context("opening the orders store (DynamoDB)")?;
            if shared.settings.dynamodb.create_tables {
                store
                    .ensure_table()
                    .await
                    .context("creating the orders tables")?;
            }
            let relay = Relay::on_dynamo(store.outbox().clone(), stream, queue).owned_by("orders");
            let idempotency = store.idempotency_keys(shared.idempotency_ttl(), shared.body_limit());
            let store = store.with_relay_waker(relay.waker());
            return Ok((Arc::new(store), relay, idempotency));
        }
        other => return Err(other.unsupported(Service::Orders)),
    };
    let store = SqliteOrderStore::open(&url, &shared.settings.sqlite)
        .await
        .context("opening the orders store")?;
    let relay = Relay::new(store.db().clone(), stream, queue).owned_by("orders");
    let idempotency = shared.idempotency(store.db());
    let store = store.with_relay_waker(relay.waker());
    Ok((Arc::new(store), relay, idempotency))
}

/// Starts the orders service on `transports` (the `orders` stream it publishes to and the
/// `payments` stream it listens to; the `order-events` queue).
pub async fn start(shared: &Shared<'_>, transports: &Transports) -> Result<Started, WiringError> {
    // Counters exist from the start, at zero: `increase()` (dashboards, the alerts) then sees
    // the first event instead of a series that appears already at 1.
    for counter in [
        "orders_created_total",
        "orders_expired_total",
        "payment_events_dead_lettered_total",
    ] {
        metrics::counter!(counter).increment(0);
    }
    for counter in ["revenue_minor_units_total", "refunded_minor_units_total"] {
        metrics::counter!(counter, "currency" => shared.settings.currency.clone()).increment(0);
    }
    shared
        .settings
        .limits
        .validate()
        .map_err(WiringError::config)?;
    // Products holds stock for the order's TTL plus a minute, and holds nothing past a day.
    let longest = u64::from(kit::config::LimitsSettings::MAX_HOLD_SECS) - 60;
    if !(1..=longest).contains(&shared.settings.saga.pending_order_ttl_secs) {
        return Err(WiringError::config(format!(
            "saga.pending_order_ttl_secs must be between 1 and {longest}"
        )));
    }
    let stream = transports.stream.clone();
    let (store, relay, idempotency) =
        open(shared, stream.clone(), transports.queue.clone()).await?;
    let closed = store.clone();
    let lifecycle = shared.lifecycle;
    lifecycle.close_at_stop(move || async move { closed.close().await });
    let ctx = crate::ApiContext {
        store: store.clone(),
        deps: crate::clients::Dependencies {
            users: shared.client(Service::Orders, Service::Users),
            products: shared.client(Service::Orders, Service::Products),
        },
        order_ttl: chrono::Duration::seconds(
            i64::try_from(shared.settings.saga.pending_order_ttl_secs).unwrap_or(900),
        ),
        idempotency,
        currency: Arc::from(shared.settings.currency.as_str()),
        limits: shared.settings.limits.clone(),
    };
    let shutdown = lifecycle.shutdown();
    lifecycle.spawn(relay.run(shutdown.clone()));
    lifecycle.spawn(
        ctx.idempotency
            .clone()
            .run_purger(HOUSEKEEPING, shutdown.clone()),
    );
    let saga = crate::saga::Saga {
        ctx: ctx.clone(),
        payments: crate::compensation::PaymentsClient::new(
            shared.client(Service::Orders, Service::Payments),
        ),
        retry: crate::saga::Retry::default(),
    };
    lifecycle.spawn(crate::saga::run_payment_listener(
        saga,
        stream,
        shutdown.clone(),
    ));
    lifecycle.spawn(crate::saga::run_expiry_sweeper(
        ctx.clone(),
        shared.sweep_interval(),
        shutdown,
    ));
    let (pruned, retention) = (store.clone(), shared.retention());
    lifecycle.housekeeping("processed event ids past retention dropped", move || {
        let store = pruned.clone();
        async move { store.prune_processed(retention).await }
    });
    let pinged = store.clone();
    let ready = ready_when(move || {
        let store = pinged.clone();
        async move { store.ping().await.is_ok() }
    });
    Ok(Started {
        router: crate::router(ctx),
        ready,
        dependencies: transports.dependencies(false),
    })
}
