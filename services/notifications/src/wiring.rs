//! How the notifier starts inside a platform process: its store on the backend its database
//! url names (SQLite, PostgreSQL or the seed's DynamoDB table), the poller that feeds the
//! handler from the `order-events` queue, and its router.

use std::sync::Arc;

use bus::transports::Transports;
use kit::wiring::{Backend, Context as _, Service, Shared, Started, WiringError, ready_when};

use crate::store::{NotificationStore, SqliteNotificationStore};

/// Starts the notifier on `transports` (the `order-events` queue it consumes).
pub async fn start(shared: &Shared<'_>, transports: &Transports) -> Result<Started, WiringError> {
    // At zero from the start (see orders' wiring).
    metrics::counter!("queue_dead_lettered_total", "queue" => bus::names::ORDER_EVENTS_QUEUE)
        .increment(0);
    let settings = shared.settings;
    let store: Arc<dyn NotificationStore> = match shared.backend(Service::Notifications)? {
        Backend::Sqlite(url) => Arc::new(
            SqliteNotificationStore::open(&url, &settings.sqlite)
                .await
                .context("opening the notifications store")?,
        ),
        #[cfg(feature = "postgres")]
        Backend::Postgres(url) => Arc::new(
            crate::pg::PgNotificationStore::open(&url, "notifications", &settings.postgres)
                .await
                .context("opening the notifications store (PostgreSQL)")?,
        ),
        // The seed's `notifications` table, as the Lambda keeps it.
        #[cfg(feature = "dynamodb")]
        Backend::Dynamo(url) => {
            let store = crate::dynamo::DynamoNotificationStore::from_url(&url)
                .await
                .context("opening the notifications store (DynamoDB)")?;
            if settings.dynamodb.create_tables {
                store
                    .ensure_table()
                    .await
                    .context("creating the notifications table")?;
            }
            Arc::new(store)
        }
        other => return Err(other.unsupported(Service::Notifications)),
    };
    let (pinged, closed) = (store.clone(), store.clone());
    shared
        .lifecycle
        .close_at_stop(move || async move { closed.close().await });
    let ready = ready_when(move || {
        let store = pinged.clone();
        async move { store.ping().await.is_ok() }
    });
    let poller = crate::poller::Poller {
        queue: transports.queue.clone(),
        store: store.clone(),
        sender: Arc::new(crate::sender::LogSender),
        batch_size: settings.notifier.batch_size.clamp(1, 100),
    };
    shared
        .lifecycle
        .spawn(poller.run(shared.lifecycle.shutdown()));
    Ok(Started {
        router: crate::router(store),
        ready,
        dependencies: transports.dependencies(true),
    })
}
