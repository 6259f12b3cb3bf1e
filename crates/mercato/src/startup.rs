//! Composes the platform, or any subset of it, from settings.
//!
//! Every listener is bound before anything else starts, so a taken port fails fast with its
//! name; services then reach each other over real HTTP on the bound addresses, exactly as
//! they would in separate containers. Each service crate builds itself (`<service>::wiring`);
//! this module binds the listeners, sets up identity and the transports, calls each
//! service's `start` and serves what comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bus::embedded::EmbeddedBus;
use bus::transports::Transports;
use kit::auth::{Auth, OwnKeys, TokenIssuer, Verifier};
use kit::client::http_client;
use kit::config::{AuthMode, ServiceSettings, Settings};
use kit::server;
use kit::wiring::{Closing, Lifecycle, Service, Shared, Started};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use users::wiring::DemoAccounts;

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

    /// The service as the services' wiring names it.
    fn service(self) -> Service {
        match self {
            ServiceName::Gateway => Service::Gateway,
            ServiceName::Users => Service::Users,
            ServiceName::Products => Service::Products,
            ServiceName::Orders => Service::Orders,
            ServiceName::Payments => Service::Payments,
            ServiceName::Notifications => Service::Notifications,
            ServiceName::Analytics => Service::Analytics,
        }
    }

    fn settings(self, s: &Settings) -> &ServiceSettings {
        self.service().settings(s)
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
    closing: Vec<Closing>,
    bus: Option<EmbeddedBus>,
    /// The demo accounts created at this start (`mercato up`'s first start), and the file
    /// that keeps their passwords.
    pub demo_accounts: Option<DemoAccounts>,
    /// The operations listener: `/health`, `/ready`, `/metrics`.
    pub ops_addr: SocketAddr,
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

/// Opens the users store the settings name (for `mercato admin create` and the service).
pub async fn open_users_store(settings: &Settings) -> anyhow::Result<Arc<dyn users::UserStore>> {
    Ok(users::wiring::open_store(settings).await?)
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
    // The gateway alone calls no internal route and must not hold the services' key: it gets a
    // throw-away one, never written anywhere.
    let service_key = if services == [ServiceName::Gateway] {
        kit::auth::ServiceKey::new(
            kit::auth::SigningKey::generate().context("generating a throw-away service key")?,
        )
    } else {
        kit::auth::service_key(auth, &settings.data_dir)
            .context("loading the service key (auth.service_key)")?
    };
    let issuer = ring.map(|ring| Arc::new(TokenIssuer::new(ring, auth)));
    Ok((
        Auth::new(auth.mode, verifier, Arc::new(service_key)),
        issuer,
    ))
}

/// Starts `services` (all seven for `mercato up`).
pub async fn start(settings: &Settings, services: &[ServiceName]) -> anyhow::Result<Platform> {
    let started = Instant::now();
    // Install the recorder before anything records, or early samples are lost.
    let _ = kit::telemetry::metrics();
    settings
        .http
        .validate()
        .and_then(|()| settings.saga.validate())
        .map_err(|e| anyhow::anyhow!("invalid settings: {e}"))?;
    let wants = |s: ServiceName| services.contains(&s);
    if kit::faults::allowed(settings)
        && !kit::config::DEVELOPMENT_ENVIRONMENTS.contains(&settings.environment.as_str())
    {
        tracing::warn!(
            environment = settings.environment,
            "FAULT INJECTION IS ALLOWED (faults.allowed = true) outside development and test: \
             administrators can make this platform fail on purpose"
        );
    }

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
    let urls: Vec<(Service, String)> = ServiceName::ALL
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
            (service.service(), url)
        })
        .collect();

    // The stream and the queue: Kafka and SQS where configured, else the embedded bus (the
    // services that need one only start with it).
    let needs_bus = [
        ServiceName::Orders,
        ServiceName::Payments,
        ServiceName::Notifications,
        ServiceName::Analytics,
    ]
    .into_iter()
    .any(wants);
    let transports =
        Transports::open(settings, needs_bus, &[analytics::results::RESULTS_TOPIC]).await?;

    let http = http_client(&settings.http).context("building the HTTP client")?;
    let users_url = urls
        .iter()
        .find(|(s, _)| *s == Service::Users)
        .map(|(_, u)| u.clone())
        .unwrap_or_default();
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating {}", settings.data_dir.display()))?;
    let (auth, issuer) = identity(settings, services, &users_url, &http)?;
    let lifecycle = Lifecycle::new();
    let ops_url = {
        let addr = ops_listener
            .local_addr()
            .context("reading the operations address")?;
        let host = if addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            addr.ip()
        };
        format!("http://{}", std::net::SocketAddr::new(host, addr.port()))
    };
    // The services here, but for the gateway; one whose URL is configured is reached there,
    // even from here. With `http.in_process_upstreams` the gateway and the other services call
    // these in memory.
    let here: Vec<Service> = ServiceName::ALL
        .into_iter()
        .filter(|s| wants(*s) && *s != ServiceName::Gateway)
        .filter(|s| s.settings(settings).url.is_none())
        .map(ServiceName::service)
        .collect();
    let local: Vec<(Service, kit::client::LocalApp)> = if settings.http.in_process_upstreams {
        let timeout = Duration::from_millis(settings.http.client_timeout_ms);
        here.iter()
            .map(|s| (*s, kit::client::LocalApp::new(timeout)))
            .collect()
    } else {
        Vec::new()
    };
    let shared = Shared {
        local: &local,
        ops_url: &ops_url,
        settings,
        urls: &urls,
        http: &http,
        lifecycle: &lifecycle,
        auth: &auth,
    };
    if let Some(transports) = &transports {
        let (bus, retention) = (transports.embedded.clone(), shared.retention());
        lifecycle.housekeeping("stream records past retention dropped", move || {
            let bus = bus.clone();
            async move { bus.prune(retention).await }
        });
    }
    let bus = || transports.as_ref().context("the bus is not open");
    let mut apps: Vec<(ServiceName, axum::Router)> = Vec::new();
    let mut readiness = Vec::new();
    let mut dependencies = Vec::new();
    let mut demo_accounts = None;
    // The gateway last: it is handed the apps of the services in this process.
    let order = ServiceName::ALL
        .into_iter()
        .filter(|s| wants(*s) && *s != ServiceName::Gateway)
        .chain(wants(ServiceName::Gateway).then_some(ServiceName::Gateway));
    for service in order {
        let Started {
            router,
            ready,
            dependencies: needs,
        } = match service {
            ServiceName::Users => {
                let issuer = issuer
                    .clone()
                    .context("the users service needs the token signing key")?;
                let demo = demo_accounts_allowed(settings, services);
                let (started, created) = users::wiring::start(&shared, issuer, demo).await?;
                demo_accounts = created;
                started
            }
            ServiceName::Products => products::wiring::start(&shared).await?,
            ServiceName::Orders => orders::wiring::start(&shared, bus()?).await?,
            ServiceName::Payments => payments::wiring::start(&shared, bus()?).await?,
            ServiceName::Notifications => notifications::wiring::start(&shared, bus()?).await?,
            ServiceName::Analytics => analytics::wiring::start(&shared, bus()?).await?,
            ServiceName::Gateway => gateway::wiring::start(&shared, &here)?,
        };
        // Every service answers the fault-injection routes for its own process; the
        // gateway's (in its wiring) also passes changes on to the others.
        let router = if service == ServiceName::Gateway {
            router
        } else {
            router.merge(kit::faults::FaultAdmin::new(settings).router())
        };
        let app = server::app(service.as_str(), router.layer(auth.layer()), &settings.http);
        if let Some((_, local)) = local.iter().find(|(s, _)| *s == service.service()) {
            local.serve(app.clone());
        }
        apps.push((service, app));
        readiness.push((service.as_str(), ready));
        dependencies.extend(
            needs
                .into_iter()
                .map(|(name, check)| (format!("{}/{name}", service.as_str()), check)),
        );
    }

    let (shutdown, mut tasks, closing) = lifecycle.into_parts();
    let warning = (settings.auth.mode == AuthMode::Open).then(|| {
        "access control is off (auth.mode = open): anyone may read and change everything".to_owned()
    });
    let ops_addr = ops_listener
        .local_addr()
        .context("reading the operations address")?;
    {
        let shutdown = shutdown.clone();
        let app = server::ops_app(readiness, dependencies, warning);
        let limits = server::ListenerLimits::from_settings(&settings.http);
        tasks.spawn(async move {
            if let Err(e) = server::serve(ops_listener, app, shutdown, limits).await {
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
        let limits = server::ListenerLimits::from_settings(&settings.http);
        tasks.spawn(async move {
            if let Err(e) = server::serve(listener, app, shutdown, limits).await {
                tracing::error!(service = service.as_str(), error = %e, "server stopped with an error");
            }
        });
    }
    Ok(Platform {
        addresses,
        startup: started.elapsed(),
        shutdown,
        tasks,
        closing,
        bus: transports.map(|t| t.embedded),
        demo_accounts,
        ops_addr,
    })
}

/// Whether this start creates the demo accounts: `mercato up` (every service in this process)
/// with its demo data on, never `serve`, and never outside a development or test environment
/// (the same allow-list as the payment simulator): a deployment that calls itself anything
/// else gets no account with a password printed on its console.
fn demo_accounts_allowed(settings: &Settings, services: &[ServiceName]) -> bool {
    let everything = ServiceName::ALL.iter().all(|s| services.contains(s));
    let allowed = payments::wiring::SIMULATOR_ENVIRONMENTS.contains(&settings.environment.as_str());
    if settings.demo && everything && !allowed {
        tracing::warn!(
            environment = settings.environment,
            "no demo accounts outside development and test (demo = true is ignored for them)"
        );
    }
    settings.demo && everything && allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_accounts_only_for_the_whole_platform_in_development_or_test() {
        let mut settings = Settings {
            demo: true,
            ..Default::default()
        };
        assert!(demo_accounts_allowed(&settings, &ServiceName::ALL));
        assert!(!demo_accounts_allowed(&settings, &[ServiceName::Users]));
        for environment in ["production", "staging", "prod"] {
            settings.environment = environment.into();
            assert!(
                !demo_accounts_allowed(&settings, &ServiceName::ALL),
                "{environment}"
            );
        }
        settings.environment = "test".into();
        settings.demo = false;
        assert!(!demo_accounts_allowed(&settings, &ServiceName::ALL));
    }
}
