//! How the analytics engine starts inside a platform process: its window state store, the
//! consumer of the `orders` stream, the emitter of final windows (results stream and object
//! store), and its router.

use bus::transports::Transports;
use kit::config::Settings;
use kit::wiring::{Context as _, Shared, Started, WiringError, ready_on_db};

use crate::engine::{Lateness, Windows};

/// The analytics engine's window state: a SQLite file of the instance's own (a state store,
/// as Kafka Streams keeps one in RocksDB), or `analytics.database_url`; never the shared
/// `DATABASE_URL`, which names the other services' PostgreSQL. What leaves an instance (its
/// final windows) goes to the results stream and object store.
fn state_url(settings: &Settings) -> String {
    let own = &settings.analytics.database_url;
    own.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            settings.data_dir.join("analytics.db").display()
        )
    })
}

/// Starts the analytics engine on `transports` (the `orders` stream it reads and the results
/// stream it writes).
pub async fn start(shared: &Shared<'_>, transports: &Transports) -> Result<Started, WiringError> {
    // At zero from the start (see orders' wiring).
    for counter in ["analytics_events_total", "late_events_total"] {
        metrics::counter!(counter).increment(0);
    }
    let settings = shared.settings;
    let stream = transports.stream.clone();
    let engine = &settings.analytics_engine;
    let windows = Windows::of_secs(engine.window_secs)
        .ok_or_else(|| WiringError::config("analytics_engine.window_secs must be positive"))?;
    let lateness = Lateness::of_secs(engine.allowed_lateness_secs).ok_or_else(|| {
        WiringError::config("analytics_engine.allowed_lateness_secs must not be negative")
    })?;
    let objects = match &engine.results_url {
        Some(url) => crate::results::ObjectSink::from_url(url),
        None => crate::results::ObjectSink::local_dir(&settings.data_dir.join("analytics-results")),
    }
    .context("opening analytics_engine.results_url")?;
    let instance = engine
        .instance_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "analytics".into());
    let store =
        crate::AnalyticsStore::open(&state_url(settings), &settings.sqlite, windows, lateness)
            .await
            .context("opening the analytics store")?;
    let lifecycle = shared.lifecycle;
    let db = store.db().clone();
    lifecycle.close_at_stop(move || async move { db.close().await });
    let feed = crate::feed::Feed::new(lifecycle.shutdown());
    let emitter = crate::results::Emitter {
        store: store.clone(),
        objects: Some(objects),
        stream: Some(stream.clone()),
        instance,
    };
    lifecycle.spawn(crate::consumer::run(
        store.clone(),
        feed.clone(),
        emitter,
        stream,
        crate::consumer::Subscription::default(),
        lifecycle.shutdown(),
    ));
    let (pruned, retention) = (store.clone(), shared.retention());
    lifecycle.housekeeping("processed event ids past retention dropped", move || {
        let store = pruned.clone();
        async move { store.prune_processed(retention).await }
    });
    let ready = ready_on_db(store.db());
    Ok(Started {
        router: crate::router(store, feed),
        ready,
        dependencies: transports.dependencies(false),
    })
}
