//! How the payments service starts inside a platform process: its store on the backend its
//! database url names (SQLite, PostgreSQL or DynamoDB) with its outbox relay and
//! Idempotency-Key records, and its router with a client of the orders service.

use std::sync::Arc;

use bus::outbox::Relay;
use bus::transports::Transports;
use bus::{Queue, Stream};
use kit::idempotency::Idempotency;
use kit::wiring::{
    Backend, Context as _, HOUSEKEEPING, Service, Shared, Started, WiringError, ready_when,
};

use crate::store::{PaymentStore, SqlitePaymentStore};

/// The payments store on the backend its URL names, with its relay and idempotency keys.
async fn open(
    shared: &Shared<'_>,
    stream: Arc<dyn Stream>,
    queue: Arc<dyn Queue>,
) -> Result<(Arc<dyn PaymentStore>, Relay, Idempotency), WiringError> {
    let url = match shared.backend(Service::Payments)? {
        Backend::Sqlite(url) => url,
        #[cfg(feature = "postgres")]
        Backend::Postgres(url) => {
            let pg = shared
                .open_pg(&url, Service::Payments, crate::pg::MIGRATIONS)
                .await?;
            let relay = Relay::on_postgres(pg.clone(), stream, queue);
            let idempotency = shared.idempotency_on_postgres(&pg);
            let store = crate::PgPaymentStore::new(pg).with_relay_waker(relay.waker());
            return Ok((Arc::new(store), relay, idempotency));
        }
        #[cfg(feature = "dynamodb")]
        Backend::Dynamo(url) => {
            let store = crate::dynamo::DynamoPaymentStore::from_url(&url)
                .await
                .context("opening the payments store (DynamoDB)")?;
            if shared.settings.dynamodb.create_tables {
                store
                    .ensure_table()
                    .await
                    .context("creating the payments tables")?;
            }
            let relay = Relay::on_dynamo(store.outbox().clone(), stream, queue);
            let idempotency = store.idempotency_keys(shared.idempotency_ttl(), shared.body_limit());
            let store = store.with_relay_waker(relay.waker());
            return Ok((Arc::new(store), relay, idempotency));
        }
        other => return Err(other.unsupported(Service::Payments)),
    };
    let store = SqlitePaymentStore::open(&url, &shared.settings.sqlite)
        .await
        .context("opening the payments store")?;
    let relay = Relay::new(store.db().clone(), stream, queue);
    let idempotency = shared.idempotency(store.db());
    let store = store.with_relay_waker(relay.waker());
    Ok((Arc::new(store), relay, idempotency))
}

/// Starts the payments service on `transports` (the `payments` stream it publishes to).
pub async fn start(shared: &Shared<'_>, transports: &Transports) -> Result<Started, WiringError> {
    let (store, relay, idempotency) =
        open(shared, transports.stream.clone(), transports.queue.clone()).await?;
    let closed = store.clone();
    let lifecycle = shared.lifecycle;
    lifecycle.close_at_stop(move || async move { closed.close().await });
    let ctx = crate::ApiContext {
        store: store.clone(),
        orders: shared.client(Service::Payments, Service::Orders),
        idempotency,
    };
    lifecycle.spawn(relay.run(lifecycle.shutdown()));
    lifecycle.spawn(
        ctx.idempotency
            .clone()
            .run_purger(HOUSEKEEPING, lifecycle.shutdown()),
    );
    let ready = ready_when(
        move || {
            let store = store.clone();
            async move { store.ping().await.is_ok() }
        },
        transports.readiness(false),
    );
    Ok(Started {
        router: crate::router(ctx),
        ready,
    })
}
