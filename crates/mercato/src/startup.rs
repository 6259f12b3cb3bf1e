//! Builds and starts the platform, or any subset of it, from settings.
//!
//! Every listener is bound before anything else starts, so a taken port fails fast with its
//! name; services then reach each other over real HTTP on the bound addresses, exactly as
//! they would in separate containers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bus::embedded::{EmbeddedBus, EmbeddedOptions};
use bus::outbox::Relay;
use bus::{Queue, Stream};
use kit::client::{ServiceClient, http_client};
use kit::config::{ServiceSettings, Settings};
use kit::idempotency::Idempotency;
use kit::server::{self, ReadyCheck, ready_check};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ServiceName {
    Gateway,
    Users,
    Products,
    Orders,
    Payments,
    Notifications,
    Analytics,
}

impl ServiceName {
    pub const ALL: [ServiceName; 7] = [
        ServiceName::Gateway,
        ServiceName::Users,
        ServiceName::Products,
        ServiceName::Orders,
        ServiceName::Payments,
        ServiceName::Notifications,
        ServiceName::Analytics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::Gateway => "gateway",
            ServiceName::Users => "users",
            ServiceName::Products => "products",
            ServiceName::Orders => "orders",
            ServiceName::Payments => "payments",
            ServiceName::Notifications => "notifications",
            ServiceName::Analytics => "analytics",
        }
    }

    fn settings(self, s: &Settings) -> &ServiceSettings {
        match self {
            ServiceName::Gateway => &s.gateway,
            ServiceName::Users => &s.users,
            ServiceName::Products => &s.products,
            ServiceName::Orders => &s.orders,
            ServiceName::Payments => &s.payments,
            ServiceName::Notifications => &s.notifications,
            ServiceName::Analytics => &s.analytics,
        }
    }
}

/// A running platform (or part of one).
pub struct Platform {
    /// Where each started service listens.
    pub addresses: Vec<(ServiceName, SocketAddr)>,
    /// Time from `start` until every listener accepted connections.
    pub startup: Duration,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    closers: Vec<kit::db::Db>,
    bus: Option<EmbeddedBus>,
}

impl Platform {
    pub fn url(&self, service: ServiceName) -> Option<String> {
        self.addresses
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, a)| format!("http://{a}"))
    }

    /// Stops accepting, lets in-flight requests and worker batches finish, closes databases.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10 s; aborting them");
            self.tasks.abort_all();
        }
        for db in &self.closers {
            db.close().await;
        }
        if let Some(bus) = &self.bus {
            bus.close().await;
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

fn with_url(settings: &Settings, service: ServiceName, bound: Option<SocketAddr>) -> String {
    if let Some(url) = &service.settings(settings).url {
        return url.clone();
    }
    match bound {
        Some(addr) => format!("http://{addr}"),
        None => format!(
            "http://{}:{}",
            settings.host,
            service.settings(settings).port
        ),
    }
}

/// Starts `services` (all seven for `mercato up`).
pub async fn start(settings: &Settings, services: &[ServiceName]) -> anyhow::Result<Platform> {
    let started = Instant::now();
    // Install the recorder before anything records, or early samples are lost.
    let _ = kit::telemetry::metrics();
    let wants = |s: ServiceName| services.contains(&s);

    let mut listeners = Vec::new();
    for service in ServiceName::ALL.into_iter().filter(|s| wants(*s)) {
        let port = service.settings(settings).port;
        let listener = TcpListener::bind((settings.host, port))
            .await
            .with_context(|| {
                format!(
                    "{} cannot listen on {}:{port}",
                    service.as_str(),
                    settings.host
                )
            })?;
        listeners.push((service, listener));
    }
    let bound = |s: ServiceName| {
        listeners
            .iter()
            .find(|(n, _)| *n == s)
            .and_then(|(_, l)| l.local_addr().ok())
    };
    let url = |s: ServiceName| with_url(settings, s, bound(s));

    if settings.bus.queue_url.is_some() || settings.bus.kafka.bootstrap_servers.is_some() {
        bail!(
            "Kafka and SQS transports are not built into this version; unset SQS_QUEUE_URL / KAFKA_BOOTSTRAP_SERVERS to use the embedded bus"
        );
    }
    let needs_bus = [
        ServiceName::Orders,
        ServiceName::Payments,
        ServiceName::Notifications,
        ServiceName::Analytics,
    ]
    .into_iter()
    .any(wants);
    let bus = if needs_bus {
        Some(
            EmbeddedBus::open(
                &settings.bus_url(),
                &settings.sqlite,
                EmbeddedOptions {
                    partitions: settings.bus.stream_partitions,
                    visibility_timeout: Duration::from_millis(settings.bus.visibility_timeout_ms),
                    max_receives: settings.bus.max_receives,
                },
            )
            .await
            .context("opening the embedded bus")?,
        )
    } else {
        None
    };
    let retention = Duration::from_secs(settings.bus.retention_hours.saturating_mul(3600));
    let stream: Option<Arc<dyn Stream>> = bus.clone().map(|b| Arc::new(b) as Arc<dyn Stream>);
    let queue: Option<Arc<dyn Queue>> = bus.clone().map(|b| Arc::new(b) as Arc<dyn Queue>);
    let http = http_client(&settings.http).context("building the HTTP client")?;
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut closers = Vec::new();
    if let Some(bus) = &bus {
        let bus = bus.clone();
        tasks.spawn(every(HOUSEKEEPING, shutdown.clone(), move || {
            let bus = bus.clone();
            async move {
                match bus.prune(retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "stream records past retention dropped"),
                    Err(e) => tracing::warn!(error = %e, "pruning the stream failed"),
                }
            }
        }));
    }
    let limit = settings.http.body_limit_bytes;
    let db_url = |s: ServiceName| settings.database_url(s.settings(settings), s.as_str());
    let sweep_every = Duration::from_millis(settings.saga.sweep_interval_ms.max(10));
    let idempotency_ttl = Duration::from_secs(settings.http.idempotency_ttl_secs);

    let mut apps: Vec<(ServiceName, axum::Router)> = Vec::new();

    if wants(ServiceName::Users) {
        let store = users::UserStore::open(&db_url(ServiceName::Users), &settings.sqlite)
            .await
            .context("opening the users store")?;
        closers.push(store.db().clone());
        let db = store.db().clone();
        let ready = ready_check(move || {
            let db = db.clone();
            async move { db.ping().await.map_err(|_| "database".to_owned()) }
        });
        apps.push((
            ServiceName::Users,
            server::app("users", users::router(store), ready, limit),
        ));
    }

    if wants(ServiceName::Products) {
        let store = products::ProductStore::open(&db_url(ServiceName::Products), &settings.sqlite)
            .await
            .context("opening the products store")?;
        closers.push(store.db().clone());
        if settings.demo {
            let added = products::demo::seed_if_empty(&store)
                .await
                .context("seeding the demo catalog")?;
            if added > 0 {
                tracing::info!(products = added, "demo catalog seeded");
            }
        }
        let products_store = store.clone();
        // Gives back stock held for orders that were never created or never settled.
        tasks.spawn(every(sweep_every, shutdown.clone(), move || {
            let store = products_store.clone();
            async move {
                match store.release_expired(100).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(released = n, "expired stock reservations released"),
                    Err(e) => tracing::warn!(error = %e, "releasing expired reservations failed"),
                }
            }
        }));
        let db = store.db().clone();
        let ready = ready_check(move || {
            let db = db.clone();
            async move { db.ping().await.map_err(|_| "database".to_owned()) }
        });
        apps.push((
            ServiceName::Products,
            server::app("products", products::router(store), ready, limit),
        ));
    }

    let bus_ready = |extra: kit::db::Db| -> ReadyCheck {
        let bus = bus.clone();
        ready_check(move || {
            let (db, bus) = (extra.clone(), bus.clone());
            async move {
                db.ping().await.map_err(|_| "database".to_owned())?;
                match bus {
                    Some(bus) => bus.ping().await.map_err(|_| "bus".to_owned()),
                    None => Ok(()),
                }
            }
        })
    };

    if let (true, Some(stream), Some(queue)) = (wants(ServiceName::Orders), &stream, &queue) {
        let store = orders::OrderStore::open(&db_url(ServiceName::Orders), &settings.sqlite)
            .await
            .context("opening the orders store")?;
        closers.push(store.db().clone());
        let relay = Relay::new(store.db().clone(), stream.clone(), queue.clone());
        let store = store.with_relay_waker(relay.waker());
        let ctx = orders::ApiContext {
            store: store.clone(),
            deps: orders::clients::Dependencies {
                users: ServiceClient::new("users", &url(ServiceName::Users), http.clone()),
                products: ServiceClient::new("products", &url(ServiceName::Products), http.clone()),
            },
            order_ttl: chrono::Duration::seconds(
                i64::try_from(settings.saga.pending_order_ttl_secs).unwrap_or(900),
            ),
            idempotency: Idempotency::new(store.db().clone(), idempotency_ttl, limit),
        };
        tasks.spawn(
            ctx.idempotency
                .clone()
                .run_purger(Duration::from_secs(600), shutdown.clone()),
        );
        tasks.spawn(relay.run(shutdown.clone()));
        let orders_store = store.clone();
        tasks.spawn(every(HOUSEKEEPING, shutdown.clone(), move || {
            let store = orders_store.clone();
            async move {
                if let Err(e) = store.prune_processed(retention).await {
                    tracing::warn!(error = %e, "pruning processed event ids failed");
                }
            }
        }));
        tasks.spawn(orders::saga::run_payment_listener(
            ctx.clone(),
            stream.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(orders::saga::run_expiry_sweeper(
            ctx.clone(),
            sweep_every,
            shutdown.clone(),
        ));
        let ready = bus_ready(store.db().clone());
        apps.push((
            ServiceName::Orders,
            server::app("orders", orders::router(ctx), ready, limit),
        ));
    }

    if let (true, Some(stream), Some(queue)) = (wants(ServiceName::Payments), &stream, &queue) {
        let store = payments::PaymentStore::open(&db_url(ServiceName::Payments), &settings.sqlite)
            .await
            .context("opening the payments store")?;
        closers.push(store.db().clone());
        let relay = Relay::new(store.db().clone(), stream.clone(), queue.clone());
        let store = store.with_relay_waker(relay.waker());
        tasks.spawn(relay.run(shutdown.clone()));
        let ctx = payments::ApiContext {
            store: store.clone(),
            orders: ServiceClient::new("orders", &url(ServiceName::Orders), http.clone()),
            idempotency: Idempotency::new(store.db().clone(), idempotency_ttl, limit),
        };
        tasks.spawn(
            ctx.idempotency
                .clone()
                .run_purger(Duration::from_secs(600), shutdown.clone()),
        );
        let ready = bus_ready(store.db().clone());
        apps.push((
            ServiceName::Payments,
            server::app("payments", payments::router(ctx), ready, limit),
        ));
    }

    if let (true, Some(queue)) = (wants(ServiceName::Notifications), &queue) {
        let store = notifications::SqliteNotificationStore::open(
            &db_url(ServiceName::Notifications),
            &settings.sqlite,
        )
        .await
        .context("opening the notifications store")?;
        closers.push(store.db().clone());
        let ready = bus_ready(store.db().clone());
        let store: Arc<dyn notifications::NotificationStore> = Arc::new(store);
        let poller = notifications::poller::Poller {
            queue: queue.clone(),
            store: store.clone(),
            sender: Arc::new(notifications::sender::LogSender),
            batch_size: settings.notifier.batch_size.clamp(1, 100),
        };
        tasks.spawn(poller.run(shutdown.clone()));
        apps.push((
            ServiceName::Notifications,
            server::app("notifications", notifications::router(store), ready, limit),
        ));
    }

    if let (true, Some(stream)) = (wants(ServiceName::Analytics), &stream) {
        let windows = analytics::engine::Windows::of_secs(settings.analytics_engine.window_secs)
            .context("analytics_engine.window_secs must be positive")?;
        let store = analytics::AnalyticsStore::open(
            &db_url(ServiceName::Analytics),
            &settings.sqlite,
            windows,
        )
        .await
        .context("opening the analytics store")?;
        closers.push(store.db().clone());
        let analytics_store = store.clone();
        tasks.spawn(every(HOUSEKEEPING, shutdown.clone(), move || {
            let store = analytics_store.clone();
            async move {
                if let Err(e) = store.prune_processed(retention).await {
                    tracing::warn!(error = %e, "pruning processed event ids failed");
                }
            }
        }));
        tasks.spawn(analytics::consumer::run(
            store.clone(),
            stream.clone(),
            shutdown.clone(),
        ));
        let ready = bus_ready(store.db().clone());
        apps.push((
            ServiceName::Analytics,
            server::app("analytics", analytics::router(store), ready, limit),
        ));
    }

    if wants(ServiceName::Gateway) {
        let upstreams = gateway::Upstreams {
            users: url(ServiceName::Users),
            products: url(ServiceName::Products),
            orders: url(ServiceName::Orders),
            payments: url(ServiceName::Payments),
            notifications: url(ServiceName::Notifications),
            analytics: url(ServiceName::Analytics),
        };
        let routes = gateway::router(
            &upstreams,
            limit,
            Duration::from_millis(settings.http.upstream_timeout_ms),
        )
        .context("configuring the gateway")?;
        let probe = gateway::routes::probe::client();
        let ready = ready_check(move || {
            let (upstreams, probe) = (upstreams.clone(), probe.clone());
            async move { gateway::routes::check_upstreams(&upstreams, &probe).await }
        });
        apps.push((
            ServiceName::Gateway,
            server::app("gateway", routes, ready, limit),
        ));
    }

    let mut addresses = Vec::new();
    for (service, listener) in listeners {
        let Some(pos) = apps.iter().position(|(s, _)| *s == service) else {
            continue;
        };
        let (_, app) = apps.swap_remove(pos);
        let addr = listener.local_addr().context("reading a bound address")?;
        addresses.push((service, addr));
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = server::serve(listener, app, shutdown).await {
                tracing::error!(service = service.as_str(), error = %e, "server stopped with an error");
            }
        });
    }
    Ok(Platform {
        addresses,
        startup: started.elapsed(),
        shutdown,
        tasks,
        closers,
        bus,
    })
}

/// How often retention and dedup tables are pruned.
const HOUSEKEEPING: Duration = Duration::from_secs(600);

/// Runs `job` now and then every `period` until `shutdown`.
async fn every<F, Fut>(period: Duration, shutdown: CancellationToken, job: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        job().await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}
