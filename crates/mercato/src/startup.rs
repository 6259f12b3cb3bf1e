//! Builds and starts the platform, or any subset of it, from settings.
//!
//! Every listener is bound before anything else starts, so a taken port fails fast with its
//! name; services then reach each other over real HTTP on the bound addresses, exactly as
//! they would in separate containers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bus::embedded::{EmbeddedBus, EmbeddedOptions};
use bus::outbox::Relay;
use bus::{Queue, Stream};
use kit::auth::{Auth, OwnKeys, TokenIssuer, Verifier};
use kit::client::{ServiceClient, http_client};
use kit::config::{AuthMode, ServiceSettings, Settings};
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

/// Closes one store at shutdown, whatever its backend (stores behind a trait close
/// themselves; the others hand over their SQLite `Db` in `closers`).
type Closing = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The database a service's store opens, chosen by its `database_url`.
enum Backend {
    Sqlite(String),
    #[cfg(feature = "postgres")]
    Postgres(String),
    /// Orders, payments and notifications only: the seed keeps those three in DynamoDB.
    #[cfg(feature = "dynamodb")]
    Dynamo(String),
}

/// Users and products (relational by nature: unique e-mails, stock arithmetic) stay in SQL.
fn not_on_dynamo(service: ServiceName) -> anyhow::Error {
    anyhow::anyhow!(
        "the {name} database url is a DynamoDB one, but only orders, payments and notifications \
         can keep their data in DynamoDB; give {name} a postgres:// or sqlite:// url of its own \
         (MERCATO_{upper}__DATABASE_URL)",
        name = service.as_str(),
        upper = service.as_str().to_uppercase()
    )
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
    closing: Vec<Closing>,
    bus: Option<EmbeddedBus>,
    /// The demo accounts created at this start (`mercato up`'s first start), and the file
    /// that keeps their passwords.
    pub demo_accounts: Option<DemoAccounts>,
    /// The operations listener: `/health`, `/ready`, `/metrics`.
    pub ops_addr: SocketAddr,
}

/// Accounts `mercato up` created with random passwords, kept in `file` (mode 0600).
#[derive(Debug, Clone)]
pub struct DemoAccounts {
    pub file: std::path::PathBuf,
    /// `(email, password)` of the accounts created now; empty on later starts.
    pub created: Vec<(String, String)>,
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
        for close in self.closing.drain(..) {
            close().await;
        }
        if let Some(bus) = &self.bus {
            bus.close().await;
        }
    }

    /// The operations listener's base URL (`/ready`, `/metrics`).
    pub fn ops_url(&self) -> String {
        format!("http://{}", self.ops_addr)
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Kafka when `bus.kafka.bootstrap_servers` (`KAFKA_BOOTSTRAP_SERVERS`) is set; the topics are
/// created where missing when `bus.kafka.create_topics` is on (local brokers).
#[cfg(feature = "kafka")]
async fn external_stream(settings: &Settings) -> anyhow::Result<Option<Arc<dyn Stream>>> {
    if settings.bus.kafka.bootstrap_servers.is_none() {
        return Ok(None);
    }
    let kafka = bus::kafka::KafkaStream::new(&settings.bus.kafka).context("configuring Kafka")?;
    if settings.bus.kafka.create_topics {
        let partitions = i32::try_from(settings.bus.stream_partitions.max(1)).unwrap_or(1);
        kafka
            .ensure_topics(
                &[
                    bus::names::ORDERS_TOPIC,
                    bus::names::PAYMENTS_TOPIC,
                    analytics::results::RESULTS_TOPIC,
                ],
                partitions,
            )
            .await
            .context("creating the Kafka topics")?;
    }
    Ok(Some(Arc::new(kafka)))
}

#[cfg(not(feature = "kafka"))]
async fn external_stream(settings: &Settings) -> anyhow::Result<Option<Arc<dyn Stream>>> {
    if settings.bus.kafka.bootstrap_servers.is_some() {
        anyhow::bail!(
            "KAFKA_BOOTSTRAP_SERVERS is set but this binary was built without Kafka: \
             build with `cargo build --release --features kafka`, or unset it to use the embedded stream"
        );
    }
    Ok(None)
}

/// A queue that is not the embedded one (SQS), with its readiness check.
struct ExternalQueue {
    queue: Arc<dyn Queue>,
    ping: ReadyCheck,
}

/// Where the SQS API is: `bus.sqs.endpoint_url`; else none of ours when `AWS_ENDPOINT_URL_SQS`
/// or `AWS_ENDPOINT_URL` is set (the AWS SDK reads those); else the origin of a queue URL
/// that is not AWS's (an SQS-compatible server: its queue URLs are on itself); else AWS's.
#[cfg(feature = "sqs")]
fn sqs_endpoint(settings: &Settings, queue_url: &str) -> Option<String> {
    if let Some(endpoint) = &settings.bus.sqs.endpoint_url {
        return Some(endpoint.clone());
    }
    let from_env = ["AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    if from_env {
        return None;
    }
    let (scheme, rest) = queue_url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host = authority.split(':').next()?;
    (!host.ends_with(".amazonaws.com") && !host.ends_with(".amazonaws.com.cn"))
        .then(|| format!("{scheme}://{authority}"))
}

/// SQS when `bus.queue_url` (`SQS_QUEUE_URL`) is set: that URL is the `order-events` queue.
/// The queue and its dead-letter queue are created where missing when `bus.sqs.create_queues`
/// is on (local servers).
#[cfg(feature = "sqs")]
async fn external_queue(settings: &Settings) -> anyhow::Result<Option<ExternalQueue>> {
    let Some(url) = settings.bus.queue_url.clone() else {
        return Ok(None);
    };
    let sqs = bus::sqs::SqsQueue::connect(
        settings.aws_region.clone(),
        sqs_endpoint(settings, &url),
        [(bus::names::ORDER_EVENTS_QUEUE.to_owned(), url)].into(),
    )
    .await;
    if settings.bus.sqs.create_queues {
        sqs.ensure_queues(
            bus::names::ORDER_EVENTS_QUEUE,
            settings.bus.max_receives,
            Duration::from_millis(settings.bus.visibility_timeout_ms),
        )
        .await
        .context("creating the SQS queues")?;
    }
    let pinged = sqs.clone();
    let ping = ready_check(move || {
        let sqs = pinged.clone();
        async move { sqs.ping().await.map_err(|e| e.to_string()) }
    });
    Ok(Some(ExternalQueue {
        queue: Arc::new(sqs),
        ping,
    }))
}

#[cfg(not(feature = "sqs"))]
async fn external_queue(settings: &Settings) -> anyhow::Result<Option<ExternalQueue>> {
    if settings.bus.queue_url.is_some() {
        anyhow::bail!(
            "SQS_QUEUE_URL is set but this binary was built without SQS: \
             build with `cargo build --release --features sqs`, or unset it to use the embedded queue"
        );
    }
    Ok(None)
}

/// Everything the services being started share while the platform is assembled.
struct Assembly<'a> {
    settings: &'a Settings,
    /// How each service reaches each other one.
    urls: Vec<(ServiceName, String)>,
    http: reqwest::Client,
    bus: Option<EmbeddedBus>,
    /// The stream when it is not the embedded one (Kafka).
    external_stream: Option<Arc<dyn Stream>>,
    /// The queue when it is not the embedded one (SQS).
    external_queue: Option<ExternalQueue>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    closers: Vec<kit::db::Db>,
    closing: Vec<Closing>,
    apps: Vec<(ServiceName, axum::Router)>,
    /// Verifies user and service tokens in every service.
    auth: Arc<Auth>,
    /// Signs access tokens: only where the users service runs.
    issuer: Option<Arc<TokenIssuer>>,
    /// Whether to create the demo accounts (`mercato up` with its demo catalog).
    demo_accounts: bool,
    created_demo_accounts: Option<DemoAccounts>,
    /// Each started service's readiness, for the operations listener.
    readiness: Vec<(&'static str, ReadyCheck)>,
}

impl Assembly<'_> {
    fn url(&self, service: ServiceName) -> String {
        self.urls
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, u)| u.clone())
            .unwrap_or_default()
    }

    /// The analytics engine's window state: a SQLite file of the instance's own (a state store,
    /// as Kafka Streams keeps one in RocksDB), or `analytics.database_url`; never the shared
    /// `DATABASE_URL`, which names the other services' PostgreSQL. What leaves an instance (its
    /// final windows) goes to the results stream and object store.
    fn analytics_state_url(&self) -> String {
        let own = &self.settings.analytics.database_url;
        own.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.settings.data_dir.join("analytics.db").display()
            )
        })
    }

    /// SQLite for `sqlite://` urls; PostgreSQL (schema = the service's name) for
    /// `postgres://` ones, which need the `postgres` feature; DynamoDB for `dynamodb://` ones
    /// (orders, payments, notifications), which need the `dynamodb` feature.
    fn backend(&self, service: ServiceName) -> anyhow::Result<Backend> {
        backend(self.settings, service)
    }

    /// Closes a store at shutdown, after every task has drained.
    fn close_at_stop<F, Fut>(&mut self, close: F)
    where
        F: FnOnce() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.closing.push(Box::new(move || Box::pin(close())));
    }

    /// A client of `service`'s internal routes, signed as `caller`.
    fn client(&self, caller: ServiceName, service: ServiceName) -> ServiceClient {
        ServiceClient::new(service.as_str(), &self.url(service), self.http.clone())
            .signed_by(self.auth.service_key().clone(), caller.as_str())
    }

    fn body_limit(&self) -> usize {
        self.settings.http.body_limit_bytes
    }

    fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.settings.saga.sweep_interval_ms.max(10))
    }

    fn retention(&self) -> Duration {
        Duration::from_secs(self.settings.bus.retention_hours.saturating_mul(3600))
    }

    fn idempotency(&self, db: &kit::db::Db) -> Idempotency {
        Idempotency::new(db.clone(), self.idempotency_ttl(), self.body_limit())
    }

    /// The stream and the queue: Kafka and SQS where configured, else the embedded bus (the
    /// services that need one only start with it).
    fn transports(&self) -> anyhow::Result<(Arc<dyn Stream>, Arc<dyn Queue>)> {
        let bus = self.bus.clone().context("the bus is not open")?;
        let stream: Arc<dyn Stream> = match &self.external_stream {
            Some(stream) => stream.clone(),
            None => Arc::new(bus.clone()),
        };
        let queue: Arc<dyn Queue> = match &self.external_queue {
            Some(external) => external.queue.clone(),
            None => Arc::new(bus),
        };
        Ok((stream, queue))
    }

    /// Ready when the service's SQLite database (and the bus, if it uses one) answers.
    fn ready(&self, db: &kit::db::Db, uses_bus: bool) -> ReadyCheck {
        let db = db.clone();
        self.ready_when(
            move || {
                let db = db.clone();
                async move { db.ping().await.is_ok() }
            },
            uses_bus,
            false,
        )
    }

    /// Ready when `database` answers true (a store behind a trait, whatever its backend), the
    /// bus answers if the service uses one, and, for the queue's consumer, the external queue
    /// answers. Producers (orders, payments) stay ready while the queue is down: their outbox
    /// holds events until it is back, so accepting orders is still right.
    fn ready_when<F, Fut>(&self, database: F, uses_bus: bool, consumes_queue: bool) -> ReadyCheck
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let bus = if uses_bus { self.bus.clone() } else { None };
        let queue = match (&self.external_queue, consumes_queue) {
            (Some(external), true) => Some(external.ping.clone()),
            _ => None,
        };
        ready_check(move || {
            let (up, bus, queue) = (database(), bus.clone(), queue.clone());
            async move {
                if !up.await {
                    return Err("database".to_owned());
                }
                if let Some(bus) = bus {
                    bus.ping().await.map_err(|_| "bus".to_owned())?;
                }
                if let Some(ping) = queue {
                    ping().await.map_err(|_| "queue".to_owned())?;
                }
                Ok(())
            }
        })
    }

    fn serve(&mut self, service: ServiceName, router: axum::Router, ready: ReadyCheck) {
        let app = server::app(
            service.as_str(),
            router.layer(self.auth.layer()),
            self.body_limit(),
        );
        self.apps.push((service, app));
        self.readiness.push((service.as_str(), ready));
    }

    /// Spawns `job` to run now and then every `period` until shutdown.
    fn every<F, Fut>(&mut self, period: Duration, job: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            loop {
                job().await;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(period) => {}
                }
            }
        });
    }

    /// Runs a pruning `job` every [`HOUSEKEEPING`], logging what it removed or why it failed.
    fn housekeeping<F, Fut, E>(&mut self, what: &'static str, job: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<usize, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.every(HOUSEKEEPING, move || {
            let run = job();
            async move {
                match run.await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "{what}"),
                    Err(e) => tracing::warn!(error = %e, "housekeeping failed: {what}"),
                }
            }
        });
    }

    async fn users(&mut self) -> anyhow::Result<()> {
        let store = open_users_store(self.settings).await?;
        let (pinged, closed) = (store.clone(), store.clone());
        self.close_at_stop(move || async move { closed.close().await });
        let ready = self.ready_when(
            move || {
                let store = pinged.clone();
                async move { store.ping().await.is_ok() }
            },
            false,
            false,
        );
        let hasher = users::password::Hasher::new(2).context("preparing password hashing")?;
        let auth = &self.settings.auth;
        match (&auth.admin_email, &auth.admin_password) {
            (Some(email), Some(password)) => {
                let (user, outcome) = users::bootstrap::ensure_admin(
                    store.as_ref(),
                    &hasher,
                    email,
                    password.expose(),
                )
                .await
                .context("creating the administrator from auth.admin_email")?;
                tracing::info!(user_id = %user.id, ?outcome, "administrator from configuration");
            }
            (None, None) => {}
            _ => anyhow::bail!("auth.admin_email and auth.admin_password must be set together"),
        }
        if self.demo_accounts {
            let created = users::bootstrap::demo_accounts(store.as_ref(), &hasher)
                .await
                .context("creating the demo accounts")?;
            let file = self.settings.data_dir.join("demo-accounts.txt");
            if !created.is_empty() {
                write_private(
                    &file,
                    &created
                        .iter()
                        .map(|(email, password)| format!("{email} {password}\n"))
                        .collect::<String>(),
                )?;
            }
            self.created_demo_accounts = Some(DemoAccounts { file, created });
        }
        let issuer = self
            .issuer
            .clone()
            .context("the users service needs the token signing key")?;
        let ctx = users::ApiContext {
            store,
            hasher,
            issuer,
            throttle: Arc::new(users::throttle::LoginThrottle::new(
                auth.login_max_failures,
                auth.login_client_max_failures,
                Duration::from_secs(auth.login_failure_window_secs),
            )),
            refresh_ttl: Duration::from_secs(auth.refresh_token_ttl_secs),
        };
        self.serve(ServiceName::Users, users::router(ctx), ready);
        Ok(())
    }

    async fn products(&mut self) -> anyhow::Result<()> {
        let store: Arc<dyn products::ProductStore> = match self.backend(ServiceName::Products)? {
            Backend::Sqlite(url) => Arc::new(
                products::SqliteProductStore::open(&url, &self.settings.sqlite)
                    .await
                    .context("opening the products store")?,
            ),
            #[cfg(feature = "postgres")]
            Backend::Postgres(url) => Arc::new(
                products::pg::PgProductStore::open(&url, "products", &self.settings.postgres)
                    .await
                    .context("opening the products store (PostgreSQL)")?,
            ),
            #[cfg(feature = "dynamodb")]
            Backend::Dynamo(_) => return Err(not_on_dynamo(ServiceName::Products)),
        };
        let closed = store.clone();
        self.close_at_stop(move || async move { closed.close().await });
        if self.settings.demo {
            let added = products::demo::seed_if_empty(store.as_ref())
                .await
                .context("seeding the demo catalog")?;
            if added > 0 {
                tracing::info!(products = added, "demo catalog seeded");
            }
        }
        // Gives back stock held for orders that were never created or never settled.
        let sweeper = store.clone();
        self.every(self.sweep_interval(), move || {
            let store = sweeper.clone();
            async move {
                match store.release_expired(100).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(released = n, "expired stock reservations released"),
                    Err(e) => tracing::warn!(error = %e, "releasing expired reservations failed"),
                }
            }
        });
        let pinged = store.clone();
        let ready = self.ready_when(
            move || {
                let store = pinged.clone();
                async move { store.ping().await.is_ok() }
            },
            false,
            false,
        );
        self.serve(ServiceName::Products, products::router(store), ready);
        Ok(())
    }

    fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.settings.http.idempotency_ttl_secs)
    }

    /// Opens a PostgreSQL schema for `service` with its tables, the outbox and idempotency keys.
    #[cfg(feature = "postgres")]
    async fn open_pg(
        &self,
        url: &str,
        service: ServiceName,
        steps: &'static [kit::pg::PgStep],
    ) -> anyhow::Result<kit::pg::Pg> {
        kit::pg::Pg::open(url, service.as_str(), &self.settings.postgres, steps)
            .await
            .with_context(|| format!("opening the {} store on PostgreSQL", service.as_str()))
    }

    /// A store (trait object) to close at stop.
    fn close_store_at_stop<S, F>(&mut self, store: Arc<S>, close: F)
    where
        S: ?Sized + Send + Sync + 'static,
        F: for<'a> FnOnce(&'a S) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>
            + Send
            + Sync
            + 'static,
    {
        self.closing.push(Box::new(move || {
            Box::pin(async move { close(&store).await })
        }));
    }

    /// The orders store on the backend its URL names, with its relay and idempotency keys.
    // Without the postgres feature `Backend` has one variant.
    #[allow(clippy::infallible_destructuring_match)]
    async fn orders_backend(
        &self,
        stream: Arc<dyn Stream>,
        queue: Arc<dyn Queue>,
    ) -> anyhow::Result<(Arc<dyn orders::OrderStore>, Relay, Idempotency)> {
        let url = match self.backend(ServiceName::Orders)? {
            Backend::Sqlite(url) => url,
            #[cfg(feature = "postgres")]
            Backend::Postgres(url) => {
                let pg = self
                    .open_pg(&url, ServiceName::Orders, orders::pg::MIGRATIONS)
                    .await?;
                let relay = Relay::on_postgres(pg.clone(), stream, queue);
                let idempotency =
                    Idempotency::on_postgres(pg.clone(), self.idempotency_ttl(), self.body_limit());
                let store = orders::PgOrderStore::new(pg).with_relay_waker(relay.waker());
                return Ok((Arc::new(store), relay, idempotency));
            }
            #[cfg(feature = "dynamodb")]
            Backend::Dynamo(url) => {
                let store = orders::dynamo::DynamoOrderStore::from_url(&url)
                    .await
                    .context("opening the orders store (DynamoDB)")?;
                if self.settings.dynamodb.create_tables {
                    store
                        .ensure_table()
                        .await
                        .context("creating the orders tables")?;
                }
                let relay = Relay::on_dynamo(store.outbox().clone(), stream, queue);
                let idempotency = store.idempotency_keys(self.idempotency_ttl(), self.body_limit());
                let store = store.with_relay_waker(relay.waker());
                return Ok((Arc::new(store), relay, idempotency));
            }
        };
        let store = orders::SqliteOrderStore::open(&url, &self.settings.sqlite)
            .await
            .context("opening the orders store")?;
        let relay = Relay::new(store.db().clone(), stream, queue);
        let idempotency = self.idempotency(store.db());
        let store = store.with_relay_waker(relay.waker());
        Ok((Arc::new(store), relay, idempotency))
    }

    async fn orders(&mut self) -> anyhow::Result<()> {
        let (stream, queue) = self.transports()?;
        let (store, relay, idempotency) = self.orders_backend(stream.clone(), queue).await?;
        self.close_store_at_stop(store.clone(), |s| s.close());
        let ctx = orders::ApiContext {
            store: store.clone(),
            deps: orders::clients::Dependencies {
                users: self.client(ServiceName::Orders, ServiceName::Users),
                products: self.client(ServiceName::Orders, ServiceName::Products),
            },
            order_ttl: chrono::Duration::seconds(
                i64::try_from(self.settings.saga.pending_order_ttl_secs).unwrap_or(900),
            ),
            idempotency,
            currency: Arc::from(self.settings.currency.as_str()),
        };
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(relay.run(shutdown.clone()));
        self.tasks.spawn(
            ctx.idempotency
                .clone()
                .run_purger(HOUSEKEEPING, shutdown.clone()),
        );
        self.tasks.spawn(orders::saga::run_payment_listener(
            ctx.clone(),
            stream,
            shutdown.clone(),
        ));
        self.tasks.spawn(orders::saga::run_expiry_sweeper(
            ctx.clone(),
            self.sweep_interval(),
            shutdown,
        ));
        let (pruned, retention) = (store.clone(), self.retention());
        self.housekeeping("processed event ids past retention dropped", move || {
            let store = pruned.clone();
            async move { store.prune_processed(retention).await }
        });
        let pinged = store.clone();
        let ready = self.ready_when(
            move || {
                let store = pinged.clone();
                async move { store.ping().await.is_ok() }
            },
            true,
            false,
        );
        self.serve(ServiceName::Orders, orders::router(ctx), ready);
        Ok(())
    }

    /// The payments store on the backend its URL names, with its relay and idempotency keys.
    // Without the postgres feature `Backend` has one variant.
    #[allow(clippy::infallible_destructuring_match)]
    async fn payments_backend(
        &self,
        stream: Arc<dyn Stream>,
        queue: Arc<dyn Queue>,
    ) -> anyhow::Result<(Arc<dyn payments::PaymentStore>, Relay, Idempotency)> {
        let url = match self.backend(ServiceName::Payments)? {
            Backend::Sqlite(url) => url,
            #[cfg(feature = "postgres")]
            Backend::Postgres(url) => {
                let pg = self
                    .open_pg(&url, ServiceName::Payments, payments::pg::MIGRATIONS)
                    .await?;
                let relay = Relay::on_postgres(pg.clone(), stream, queue);
                let idempotency =
                    Idempotency::on_postgres(pg.clone(), self.idempotency_ttl(), self.body_limit());
                let store = payments::PgPaymentStore::new(pg).with_relay_waker(relay.waker());
                return Ok((Arc::new(store), relay, idempotency));
            }
            #[cfg(feature = "dynamodb")]
            Backend::Dynamo(url) => {
                let store = payments::dynamo::DynamoPaymentStore::from_url(&url)
                    .await
                    .context("opening the payments store (DynamoDB)")?;
                if self.settings.dynamodb.create_tables {
                    store
                        .ensure_table()
                        .await
                        .context("creating the payments tables")?;
                }
                let relay = Relay::on_dynamo(store.outbox().clone(), stream, queue);
                let idempotency = store.idempotency_keys(self.idempotency_ttl(), self.body_limit());
                let store = store.with_relay_waker(relay.waker());
                return Ok((Arc::new(store), relay, idempotency));
            }
        };
        let store = payments::SqlitePaymentStore::open(&url, &self.settings.sqlite)
            .await
            .context("opening the payments store")?;
        let relay = Relay::new(store.db().clone(), stream, queue);
        let idempotency = self.idempotency(store.db());
        let store = store.with_relay_waker(relay.waker());
        Ok((Arc::new(store), relay, idempotency))
    }

    async fn payments(&mut self) -> anyhow::Result<()> {
        let (stream, queue) = self.transports()?;
        let (store, relay, idempotency) = self.payments_backend(stream, queue).await?;
        self.close_store_at_stop(store.clone(), |s| s.close());
        let ctx = payments::ApiContext {
            store: store.clone(),
            orders: self.client(ServiceName::Payments, ServiceName::Orders),
            idempotency,
        };
        self.tasks.spawn(relay.run(self.shutdown.clone()));
        self.tasks.spawn(
            ctx.idempotency
                .clone()
                .run_purger(HOUSEKEEPING, self.shutdown.clone()),
        );
        let ready = self.ready_when(
            move || {
                let store = store.clone();
                async move { store.ping().await.is_ok() }
            },
            true,
            false,
        );
        self.serve(ServiceName::Payments, payments::router(ctx), ready);
        Ok(())
    }

    async fn notifications(&mut self) -> anyhow::Result<()> {
        let (_, queue) = self.transports()?;
        let store: Arc<dyn notifications::NotificationStore> =
            match self.backend(ServiceName::Notifications)? {
                Backend::Sqlite(url) => Arc::new(
                    notifications::SqliteNotificationStore::open(&url, &self.settings.sqlite)
                        .await
                        .context("opening the notifications store")?,
                ),
                #[cfg(feature = "postgres")]
                Backend::Postgres(url) => Arc::new(
                    notifications::pg::PgNotificationStore::open(
                        &url,
                        "notifications",
                        &self.settings.postgres,
                    )
                    .await
                    .context("opening the notifications store (PostgreSQL)")?,
                ),
                // The seed's `notifications` table, as the Lambda keeps it.
                #[cfg(feature = "dynamodb")]
                Backend::Dynamo(url) => {
                    let store = notifications::dynamo::DynamoNotificationStore::from_url(&url)
                        .await
                        .context("opening the notifications store (DynamoDB)")?;
                    if self.settings.dynamodb.create_tables {
                        store
                            .ensure_table()
                            .await
                            .context("creating the notifications table")?;
                    }
                    Arc::new(store)
                }
            };
        let (pinged, closed) = (store.clone(), store.clone());
        self.close_at_stop(move || async move { closed.close().await });
        let ready = self.ready_when(
            move || {
                let store = pinged.clone();
                async move { store.ping().await.is_ok() }
            },
            true,
            true,
        );
        let poller = notifications::poller::Poller {
            queue,
            store: store.clone(),
            sender: Arc::new(notifications::sender::LogSender),
            batch_size: self.settings.notifier.batch_size.clamp(1, 100),
        };
        self.tasks.spawn(poller.run(self.shutdown.clone()));
        self.serve(
            ServiceName::Notifications,
            notifications::router(store),
            ready,
        );
        Ok(())
    }

    async fn analytics(&mut self) -> anyhow::Result<()> {
        let (stream, _) = self.transports()?;
        let engine = &self.settings.analytics_engine;
        let windows = analytics::engine::Windows::of_secs(engine.window_secs)
            .context("analytics_engine.window_secs must be positive")?;
        let lateness = analytics::engine::Lateness::of_secs(engine.allowed_lateness_secs)
            .context("analytics_engine.allowed_lateness_secs must not be negative")?;
        let objects = match &engine.results_url {
            Some(url) => analytics::results::ObjectSink::from_url(url),
            None => analytics::results::ObjectSink::local_dir(
                &self.settings.data_dir.join("analytics-results"),
            ),
        }
        .context("opening analytics_engine.results_url")?;
        let instance = engine
            .instance_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "analytics".into());
        let store = analytics::AnalyticsStore::open(
            &self.analytics_state_url(),
            &self.settings.sqlite,
            windows,
            lateness,
        )
        .await
        .context("opening the analytics store")?;
        self.closers.push(store.db().clone());
        let feed = analytics::feed::Feed::new(self.shutdown.clone());
        let emitter = analytics::results::Emitter {
            store: store.clone(),
            objects: Some(objects),
            stream: Some(stream.clone()),
            instance,
        };
        self.tasks.spawn(analytics::consumer::run(
            store.clone(),
            feed.clone(),
            emitter,
            stream,
            analytics::consumer::Subscription::default(),
            self.shutdown.clone(),
        ));
        let (pruned, retention) = (store.clone(), self.retention());
        self.housekeeping("processed event ids past retention dropped", move || {
            let store = pruned.clone();
            async move { store.prune_processed(retention).await }
        });
        let ready = self.ready(store.db(), true);
        self.serve(
            ServiceName::Analytics,
            analytics::router(store, feed),
            ready,
        );
        Ok(())
    }

    fn gateway(&mut self) -> anyhow::Result<()> {
        let upstreams = gateway::Upstreams {
            users: self.url(ServiceName::Users),
            products: self.url(ServiceName::Products),
            orders: self.url(ServiceName::Orders),
            payments: self.url(ServiceName::Payments),
            notifications: self.url(ServiceName::Notifications),
            analytics: self.url(ServiceName::Analytics),
        };
        let timeout = Duration::from_millis(self.settings.http.upstream_timeout_ms);
        let routes = gateway::router(&upstreams, self.body_limit(), timeout)
            .context("configuring the gateway")?;
        // The gateway is ready when it runs: one sick service must not take every gateway
        // pod (and so the whole shop) out of the load balancer; its routes answer 503.
        let ready = ready_check(|| async { Ok(()) });
        self.serve(ServiceName::Gateway, routes, ready);
        Ok(())
    }
}

/// SQLite for `sqlite://` urls; PostgreSQL (schema = the service's name) for `postgres://` ones,
/// which need the `postgres` feature; DynamoDB for `dynamodb://` ones (orders, payments,
/// notifications), which need the `dynamodb` feature.
fn backend(settings: &Settings, service: ServiceName) -> anyhow::Result<Backend> {
    let url = settings.database_url(service.settings(settings), service.as_str());

    // Spelled out rather than `kit::pg::is_postgres_url`: without the feature there is no
    // `kit::pg`, and that is exactly when the url must be recognised to refuse it clearly.
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Backend::Postgres(url));
        #[cfg(not(feature = "postgres"))]
        anyhow::bail!(
            "the {} database url is a PostgreSQL one, but this mercato was built without the \
                 `postgres` feature; rebuild with `--features postgres` or use a sqlite:// url",
            service.as_str()
        )
    }
    if kit::dynamo_url::is_dynamo_url(&url) {
        if !matches!(
            service,
            ServiceName::Orders | ServiceName::Payments | ServiceName::Notifications
        ) {
            return Err(not_on_dynamo(service));
        }
        #[cfg(feature = "dynamodb")]
        return Ok(Backend::Dynamo(url));
        #[cfg(not(feature = "dynamodb"))]
        anyhow::bail!(
            "the {} database url is a DynamoDB one, but this mercato was built without the \
                 `dynamodb` feature; rebuild with `--features dynamodb` or use a sqlite:// url",
            service.as_str()
        )
    }
    Ok(Backend::Sqlite(url))
}

/// Opens the users store the settings name (for `mercato admin create` and the service).
pub async fn open_users_store(settings: &Settings) -> anyhow::Result<Arc<dyn users::UserStore>> {
    Ok(match backend(settings, ServiceName::Users)? {
        Backend::Sqlite(url) => Arc::new(
            users::SqliteUserStore::open(&url, &settings.sqlite)
                .await
                .context("opening the users store")?,
        ),
        #[cfg(feature = "postgres")]
        Backend::Postgres(url) => Arc::new(
            users::pg::PgUserStore::open(&url, "users", &settings.postgres)
                .await
                .context("opening the users store (PostgreSQL)")?,
        ),
        #[cfg(feature = "dynamodb")]
        Backend::Dynamo(_) => return Err(not_on_dynamo(ServiceName::Users)),
    })
}

/// Writes a file only its owner may read (appending to what it holds).
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Identity for this process: the token verifier (and, where the users service runs, the
/// signing keys) and the service key for internal calls.
fn identity(
    settings: &Settings,
    services: &[ServiceName],
    users_url: &str,
    http: &reqwest::Client,
) -> anyhow::Result<(Arc<Auth>, Option<Arc<TokenIssuer>>)> {
    let auth = &settings.auth;
    if auth.mode == AuthMode::Open {
        tracing::warn!(
            "ACCESS CONTROL IS OFF (auth.mode = open): anyone may read and change everything. \
             Use it only for the seed's clients on a private network."
        );
    }
    // `mercato up` keeps its keys in its data dir; a service run alone (one per pod) must get
    // them from configuration, or each replica would sign and check with a key of its own.
    let all_in_one = ServiceName::ALL.iter().all(|s| services.contains(s));
    let signing_configured = auth.signing_key.is_some() || auth.signing_key_file.is_some();
    let service_key_configured = auth.service_key.is_some() || auth.service_key_file.is_some();
    if !all_in_one && services.contains(&ServiceName::Users) && !signing_configured {
        anyhow::bail!(
            "the users service run alone needs auth.signing_key or auth.signing_key_file \
             (MERCATO_AUTH__SIGNING_KEY_FILE): an Ed25519 PKCS#8 PEM, e.g. from \
             `openssl genpkey -algorithm ed25519`; `mercato up` keeps one in its data dir"
        );
    }
    if !all_in_one && services.iter().any(|s| *s != ServiceName::Gateway) && !service_key_configured
    {
        anyhow::bail!(
            "a service run alone needs auth.service_key or auth.service_key_file \
             (MERCATO_AUTH__SERVICE_KEY_FILE), the same Ed25519 PKCS#8 PEM in every service but \
             the gateway; `mercato up` keeps one in its data dir"
        );
    }
    let holds_signing_key = services.contains(&ServiceName::Users) || signing_configured;
    let ring = if holds_signing_key {
        Some(
            kit::auth::signing_ring(auth, &settings.data_dir)
                .context("loading the token signing keys")?,
        )
    } else {
        None
    };
    let own_keys = match (&ring, &auth.jwks_url) {
        (Some(ring), _) => OwnKeys::Local(ring.public_keys()),
        (None, Some(url)) => OwnKeys::Remote(url.clone()),
        (None, None) => OwnKeys::Remote(format!(
            "{}/.well-known/jwks.json",
            users_url.trim_end_matches('/')
        )),
    };
    let verifier = Verifier::new(
        &auth.issuer,
        &auth.audience,
        own_keys,
        &auth.issuers,
        http.clone(),
    );
    let service_key = kit::auth::service_key(auth, &settings.data_dir)
        .context("loading the service key (auth.service_key)")?;
    let issuer = ring.map(|ring| Arc::new(TokenIssuer::new(ring, auth)));
    Ok((
        Auth::new(auth.mode, verifier, Arc::new(service_key)),
        issuer,
    ))
}

/// How often retention, dedup and idempotency tables are pruned.
const HOUSEKEEPING: Duration = Duration::from_secs(600);

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
    let ops_listener = TcpListener::bind((settings.host, settings.ops.port))
        .await
        .with_context(|| {
            format!(
                "the operations listener cannot listen on {}:{}",
                settings.host, settings.ops.port
            )
        })?;
    // A service's URL: configured, else where it was just bound, else its configured port.
    let urls: Vec<(ServiceName, String)> = ServiceName::ALL
        .into_iter()
        .map(|service| {
            let configured = &service.settings(settings).url;
            let bound = listeners
                .iter()
                .find(|(s, _)| *s == service)
                .and_then(|(_, l)| l.local_addr().ok());
            let url = match (configured, bound) {
                (Some(url), _) => url.clone(),
                (None, Some(addr)) => format!("http://{addr}"),
                (None, None) => format!(
                    "http://{}:{}",
                    settings.host,
                    service.settings(settings).port
                ),
            };
            (service, url)
        })
        .collect();

    let external_stream = external_stream(settings).await?;
    let external_queue = external_queue(settings).await?;
    let needs_bus = [
        ServiceName::Orders,
        ServiceName::Payments,
        ServiceName::Notifications,
        ServiceName::Analytics,
    ]
    .into_iter()
    .any(wants);
    let bus = if needs_bus {
        let options = EmbeddedOptions {
            partitions: settings.bus.stream_partitions,
            visibility_timeout: Duration::from_millis(settings.bus.visibility_timeout_ms),
            max_receives: settings.bus.max_receives,
        };
        Some(
            EmbeddedBus::open(&settings.bus_url(), &settings.sqlite, options)
                .await
                .context("opening the embedded bus")?,
        )
    } else {
        None
    };

    let http = http_client(&settings.http).context("building the HTTP client")?;
    let users_url = urls
        .iter()
        .find(|(s, _)| *s == ServiceName::Users)
        .map(|(_, u): &(ServiceName, String)| u.clone())
        .unwrap_or_default();
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating {}", settings.data_dir.display()))?;
    let (auth, issuer) = identity(settings, services, &users_url, &http)?;
    let mut assembly = Assembly {
        settings,
        urls,
        http,
        bus: bus.clone(),
        external_stream,
        external_queue,
        shutdown: CancellationToken::new(),
        tasks: JoinSet::new(),
        closers: Vec::new(),
        closing: Vec::new(),
        apps: Vec::new(),
        auth,
        issuer,
        // `mercato up` (every service) with its demo catalog; never `serve`.
        demo_accounts: settings.demo && ServiceName::ALL.iter().all(|s| services.contains(s)),
        created_demo_accounts: None,
        readiness: Vec::new(),
    };
    if let Some(bus) = bus.clone() {
        let retention = assembly.retention();
        assembly.housekeeping("stream records past retention dropped", move || {
            let bus = bus.clone();
            async move { bus.prune(retention).await }
        });
    }
    for service in ServiceName::ALL.into_iter().filter(|s| wants(*s)) {
        match service {
            ServiceName::Users => assembly.users().await?,
            ServiceName::Products => assembly.products().await?,
            ServiceName::Orders => assembly.orders().await?,
            ServiceName::Payments => assembly.payments().await?,
            ServiceName::Notifications => assembly.notifications().await?,
            ServiceName::Analytics => assembly.analytics().await?,
            ServiceName::Gateway => assembly.gateway()?,
        }
    }

    let Assembly {
        shutdown,
        mut tasks,
        closers,
        closing,
        mut apps,
        created_demo_accounts,
        readiness,
        ..
    } = assembly;
    let warning = (settings.auth.mode == AuthMode::Open).then(|| {
        "access control is off (auth.mode = open): anyone may read and change everything".to_owned()
    });
    let ops_addr = ops_listener
        .local_addr()
        .context("reading the operations address")?;
    {
        let shutdown = shutdown.clone();
        let app = server::ops_app(readiness, warning);
        tasks.spawn(async move {
            if let Err(e) = server::serve(ops_listener, app, shutdown).await {
                tracing::error!(error = %e, "the operations listener stopped with an error");
            }
        });
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
        closing,
        bus,
        demo_accounts: created_demo_accounts,
        ops_addr,
    })
}
