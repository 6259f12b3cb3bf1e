//! What every service's wiring needs to start, and nothing service-specific.
//!
//! Each service crate exports `wiring::start(&Shared, ...) -> Result<Started, WiringError>`:
//! it opens its store on the backend its database url names ([`Shared::backend`]), spawns its
//! background work on the [`Lifecycle`], and hands back its router and readiness check. The
//! binary binds the listeners, builds the [`Shared`] context once and serves what comes back.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::client::{LocalApp, ServiceClient};
use crate::config::{ServiceSettings, Settings};
use crate::db::Db;
use crate::idempotency::Idempotency;
use crate::server::{ReadyCheck, ready_check};

/// How often retention, dedup and idempotency tables are pruned.
pub const HOUSEKEEPING: Duration = Duration::from_secs(600);

/// Why a service could not be wired: a setting that cannot work, or a start-up step that
/// failed (displayed as the step, with the failure as its source).
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// A setting (or a combination of them) that cannot work; the message says what to do.
    #[error("{0}")]
    Config(String),
    /// A start-up step that failed.
    #[error("{step}")]
    Step {
        step: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl WiringError {
    pub fn config(message: impl Into<String>) -> WiringError {
        WiringError::Config(message.into())
    }
}

/// Names the start-up step a failure happened in, as `anyhow::Context` does.
pub trait Context<T> {
    fn context(self, step: &str) -> Result<T, WiringError>;
    fn with_context<S: Into<String>>(self, step: impl FnOnce() -> S) -> Result<T, WiringError>;
}

impl<T, E> Context<T> for Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn context(self, step: &str) -> Result<T, WiringError> {
        self.with_context(|| step)
    }

    fn with_context<S: Into<String>>(self, step: impl FnOnce() -> S) -> Result<T, WiringError> {
        self.map_err(|e| WiringError::Step {
            step: step().into(),
            source: Box::new(e),
        })
    }
}

/// The services of the platform, as the wiring names them (the binary's command line has its
/// own enum for `mercato serve <service>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Gateway,
    Users,
    Products,
    Orders,
    Payments,
    Notifications,
    Analytics,
}

impl Service {
    pub const ALL: [Service; 7] = [
        Service::Gateway,
        Service::Users,
        Service::Products,
        Service::Orders,
        Service::Payments,
        Service::Notifications,
        Service::Analytics,
    ];

    /// The service called `name` ([`Service::as_str`]).
    pub fn from_name(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Users => "users",
            Service::Products => "products",
            Service::Orders => "orders",
            Service::Payments => "payments",
            Service::Notifications => "notifications",
            Service::Analytics => "analytics",
        }
    }

    pub fn settings(self, s: &Settings) -> &ServiceSettings {
        match self {
            Service::Gateway => &s.gateway,
            Service::Users => &s.users,
            Service::Products => &s.products,
            Service::Orders => &s.orders,
            Service::Payments => &s.payments,
            Service::Notifications => &s.notifications,
            Service::Analytics => &s.analytics,
        }
    }

    /// Orders, payments and notifications only: the seed keeps those three in DynamoDB.
    fn may_use_dynamo(self) -> bool {
        matches!(
            self,
            Service::Orders | Service::Payments | Service::Notifications
        )
    }
}

/// The database a service's store opens, chosen by its `database_url`. A service matches the
/// backends its build supports and refuses the rest with [`Backend::unsupported`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Sqlite(String),
    Postgres(String),
    /// Orders, payments and notifications only ([`backend`] refuses it for the others).
    Dynamo(String),
}

impl Backend {
    /// Refuses this backend for `service`, whose crate was built without its feature.
    pub fn unsupported(self, service: Service) -> WiringError {
        let name = service.as_str();
        match self {
            Backend::Postgres(_) => WiringError::config(format!(
                "the {name} database url is a PostgreSQL one, but this mercato was built without \
                 the `postgres` feature; rebuild with `--features postgres` or use a sqlite:// url"
            )),
            Backend::Dynamo(_) if !service.may_use_dynamo() => not_on_dynamo(service),
            Backend::Dynamo(_) => WiringError::config(format!(
                "the {name} database url is a DynamoDB one, but this mercato was built without \
                 the `dynamodb` feature; rebuild with `--features dynamodb` or use a sqlite:// url"
            )),
            Backend::Sqlite(_) => {
                WiringError::config(format!("the {name} store cannot open a sqlite:// url"))
            }
        }
    }
}

/// Users and products (relational by nature: unique e-mails, stock arithmetic) stay in SQL.
fn not_on_dynamo(service: Service) -> WiringError {
    WiringError::config(format!(
        "the {name} database url is a DynamoDB one, but only orders, payments and notifications \
         can keep their data in DynamoDB; give {name} a postgres:// or sqlite:// url of its own \
         (MERCATO_{upper}__DATABASE_URL)",
        name = service.as_str(),
        upper = service.as_str().to_uppercase()
    ))
}

/// SQLite for `sqlite://` urls; PostgreSQL (schema = the service's name) for `postgres://`
/// ones; DynamoDB for `dynamodb://` ones, which only orders, payments and notifications may use.
pub fn backend(settings: &Settings, service: Service) -> Result<Backend, WiringError> {
    let url = settings.database_url(service.settings(settings), service.as_str());
    // Spelled out rather than `crate::pg::is_postgres_url`: without the feature there is no
    // `crate::pg`, and that is exactly when the url must be recognised to refuse it clearly.
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Backend::Postgres(url));
    }
    if crate::dynamo_url::is_dynamo_url(&url) {
        if !service.may_use_dynamo() {
            return Err(not_on_dynamo(service));
        }
        return Ok(Backend::Dynamo(url));
    }
    Ok(Backend::Sqlite(url))
}

/// Closes one store at shutdown, whatever its backend.
pub type Closing = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The platform's background work: tasks that run until shutdown, and what to close after
/// they have drained.
pub struct Lifecycle {
    shutdown: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
    closing: Mutex<Vec<Closing>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            shutdown: CancellationToken::new(),
            tasks: Mutex::new(JoinSet::new()),
            closing: Mutex::new(Vec::new()),
        }
    }

    /// Cancelled when the platform stops.
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs `task` until it ends; the platform waits for it at stop.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .spawn(task);
    }

    /// Spawns `job` to run now and then every `period` until shutdown.
    pub fn every<F, Fut>(&self, period: Duration, job: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shutdown = self.shutdown.clone();
        self.spawn(async move {
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
    pub fn housekeeping<F, Fut, E>(&self, what: &'static str, job: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<usize, E>> + Send + 'static,
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

    /// Closes a store at stop, after every task has drained (in the order they were added).
    pub fn close_at_stop<F, Fut>(&self, close: F)
    where
        F: FnOnce() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.closing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(move || Box::pin(close())));
    }

    /// The shutdown token, the tasks to drain and the closers to run, for the platform to stop.
    pub fn into_parts(self) -> (CancellationToken, JoinSet<()>, Vec<Closing>) {
        (
            self.shutdown,
            self.tasks
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
            self.closing
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

/// What a service's wiring hands back: its routes (served behind the platform's common layers
/// and access control) and its readiness for the operations listener.
pub struct Started {
    pub router: axum::Router,
    /// Ready: what the service cannot work without (its own database). A load balancer
    /// stops sending it requests while this fails.
    pub ready: ReadyCheck,
    /// What it works around for a while (the bus, the queue: the outbox holds events, the
    /// notifier waits): shown under `/ready`'s `dependencies`, never making it not ready, so a
    /// queue blip does not take a service (or the shop) out of the load balancer.
    pub dependencies: Vec<(&'static str, ReadyCheck)>,
}

/// Ready when `database` answers true (a store behind a trait, whatever its backend).
pub fn ready_when<F, Fut>(database: F) -> ReadyCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    ready_check(move || {
        let up = database();
        async move {
            if up.await {
                Ok(())
            } else {
                Err("database".to_owned())
            }
        }
    })
}

/// Ready when the SQLite database answers.
pub fn ready_on_db(db: &Db) -> ReadyCheck {
    let db = db.clone();
    ready_when(move || {
        let db = db.clone();
        async move { db.ping().await.is_ok() }
    })
}

/// Everything the services being started share while the platform is assembled.
pub struct Shared<'a> {
    pub settings: &'a Settings,
    /// How each service reaches each other one.
    pub urls: &'a [(Service, String)],
    /// The process-wide HTTP client.
    pub http: &'a reqwest::Client,
    pub lifecycle: &'a Lifecycle,
    /// Verifies user and service tokens; holds the key internal calls are signed with.
    pub auth: &'a Arc<Auth>,
    /// This process's operations listener (`/ready`, `/metrics`), as a URL.
    pub ops_url: &'a str,
    /// The services in this process that the others call in memory, not over their port
    /// (`http.in_process_upstreams`).
    pub local: &'a [(Service, LocalApp)],
}

impl Shared<'_> {
    /// Where `service` is reached (empty when unknown).
    pub fn url(&self, service: Service) -> String {
        self.urls
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, u)| u.clone())
            .unwrap_or_default()
    }

    /// A client of `service`'s internal routes, signed as `caller`.
    pub fn client(&self, caller: Service, service: Service) -> ServiceClient {
        let client = ServiceClient::new(service.as_str(), &self.url(service), self.http.clone())
            .signed_by(self.auth.service_key().clone(), caller.as_str());
        match self.local.iter().find(|(s, _)| *s == service) {
            Some((_, app)) => client.served_by(app.clone()),
            None => client,
        }
    }

    /// The database `service`'s store opens ([`backend`]).
    pub fn backend(&self, service: Service) -> Result<Backend, WiringError> {
        backend(self.settings, service)
    }

    pub fn body_limit(&self) -> usize {
        self.settings.http.body_limit_bytes
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.settings.saga.sweep_interval_ms.max(10))
    }

    /// How long settled reservations are kept.
    pub fn reservation_retention(&self) -> Duration {
        Duration::from_secs(
            self.settings
                .saga
                .reservation_retention_hours
                .saturating_mul(3600),
        )
    }

    /// How long processed-event ids and stream records are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.settings.bus.retention_hours.saturating_mul(3600))
    }

    pub fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.settings.http.idempotency_ttl_secs)
    }

    /// Idempotency-Key records in a service's SQLite database.
    pub fn idempotency(&self, db: &Db) -> Idempotency {
        Idempotency::new(db.clone(), self.idempotency_ttl(), self.body_limit())
    }

    /// Idempotency-Key records in a service's PostgreSQL schema.
    #[cfg(feature = "postgres")]
    pub fn idempotency_on_postgres(&self, pg: &crate::pg::Pg) -> Idempotency {
        Idempotency::on_postgres(pg.clone(), self.idempotency_ttl(), self.body_limit())
    }

    /// Opens a PostgreSQL schema for `service` with its tables, the outbox and idempotency keys.
    #[cfg(feature = "postgres")]
    pub async fn open_pg(
        &self,
        url: &str,
        service: Service,
        steps: &'static [crate::pg::PgStep],
    ) -> Result<crate::pg::Pg, WiringError> {
        crate::pg::Pg::open(url, service.as_str(), &self.settings.postgres, steps)
            .await
            .with_context(|| format!("opening the {} store on PostgreSQL", service.as_str()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn settings_with(url: &str) -> Settings {
        Settings {
            default_database_url: Some(url.to_owned()),
            ..Settings::default()
        }
    }

    #[test]
    fn the_url_scheme_chooses_the_backend() {
        let pg = settings_with("postgres://db/shop");
        assert!(matches!(
            backend(&pg, Service::Users),
            Ok(Backend::Postgres(_))
        ));
        let dynamo = settings_with("dynamodb://orders?region=us-east-1");
        assert!(matches!(
            backend(&dynamo, Service::Orders),
            Ok(Backend::Dynamo(_))
        ));
        let error = backend(&dynamo, Service::Products).unwrap_err().to_string();
        assert!(
            error.contains("only orders, payments and notifications"),
            "{error}"
        );
        assert!(error.contains("MERCATO_PRODUCTS__DATABASE_URL"), "{error}");
    }

    #[test]
    fn a_step_keeps_its_cause_as_the_source() {
        let failed: Result<(), std::io::Error> = Err(std::io::Error::other("disk full"));
        let error = failed.context("opening the store").unwrap_err();
        assert_eq!(error.to_string(), "opening the store");
        let source = std::error::Error::source(&error).expect("a source");
        assert_eq!(source.to_string(), "disk full");
    }
}
