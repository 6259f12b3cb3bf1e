//! How the payments service starts inside a platform process: its store on the backend its
//! database url names (SQLite, PostgreSQL or DynamoDB) with its outbox relay and
//! Idempotency-Key records, its payment provider (the simulator refused in production; behind
//! the payment faults where faults may be injected), the reconciler of pending payments, and
//! its router with a client of the orders service.

use std::sync::Arc;
use std::time::Duration;

use bus::outbox::Relay;
use bus::transports::Transports;
use bus::{Queue, Stream};
use kit::config::{PaymentProvider as ProviderChoice, Secret, Settings};
use kit::idempotency::Idempotency;
use kit::wiring::{
    Backend, Context as _, HOUSEKEEPING, Service, Shared, Started, WiringError, ready_when,
};

use crate::provider::PaymentProvider;
use crate::simulator::Simulator;
use crate::store::{PaymentStore, SqlitePaymentStore};
use crate::stripe::Stripe;

/// A secret alone in a file (a mounted Kubernetes secret), surrounding whitespace dropped.
fn secret_from(path: &std::path::Path, setting: &str) -> Result<Secret, WiringError> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {setting} ({})", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(WiringError::config(format!(
            "{setting} ({}) is empty",
            path.display()
        )));
    }
    Ok(Secret(secret.to_owned()))
}

/// Where the payment simulator may run; everywhere else a real provider is required.
pub const SIMULATOR_ENVIRONMENTS: [&str; 2] = kit::config::DEVELOPMENT_ENVIRONMENTS;

/// The configured provider and, for Stripe, its webhook secret.
pub fn provider(
    settings: &Settings,
) -> Result<(Arc<dyn PaymentProvider>, Option<Secret>), WiringError> {
    match settings.payments.provider {
        // An allow-list, not `== "production"`: a deployment that names itself anything else
        // (`prod`, `live`, `staging`) must choose a real provider (Stripe's test mode for staging).
        ProviderChoice::Simulator
            if !SIMULATOR_ENVIRONMENTS.contains(&settings.environment.as_str()) =>
        {
            Err(WiringError::config(format!(
                "payments.provider = \"simulator\" takes no money and runs only when environment \
                 is one of {SIMULATOR_ENVIRONMENTS:?} (this one is {:?}): set payments.provider = \
                 \"stripe\" with payments.stripe.secret_key_file",
                settings.environment
            )))
        }
        ProviderChoice::Simulator => Ok((Arc::new(Simulator::default()), None)),
        ProviderChoice::Stripe => {
            let stripe = &settings.payments.stripe;
            let Some(key_file) = &stripe.secret_key_file else {
                return Err(WiringError::config(
                    "payments.provider = \"stripe\" needs payments.stripe.secret_key_file",
                ));
            };
            let key = secret_from(key_file, "payments.stripe.secret_key_file")?;
            let webhook = match &stripe.webhook_secret_file {
                Some(file) => Some(secret_from(file, "payments.stripe.webhook_secret_file")?),
                None => {
                    tracing::warn!(
                        "payments.stripe.webhook_secret_file is not set: Stripe webhooks are refused, pending payments wait for the reconciler"
                    );
                    None
                }
            };
            let client = Stripe::new(
                &stripe.api_base,
                key,
                Duration::from_millis(stripe.timeout_ms),
            )
            .context("building the Stripe client")?;
            Ok((Arc::new(client), webhook))
        }
    }
}

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
            let relay = Relay::on_postgres(pg.clone(), stream, queue).owned_by("payments");
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
            let relay =
                Relay::on_dynamo(store.outbox().clone(), stream, queue).owned_by("payments");
            let idempotency = store.idempotency_keys(shared.idempotency_ttl(), shared.body_limit());
            let store = store.with_relay_waker(relay.waker());
            return Ok((Arc::new(store), relay, idempotency));
        }
        other => return Err(other.unsupported(Service::Payments)),
    };
    let store = SqlitePaymentStore::open(&url, &shared.settings.sqlite)
        .await
        .context("opening the payments store")?;
    let relay = Relay::new(store.db().clone(), stream, queue).owned_by("payments");
    let idempotency = shared.idempotency(store.db());
    let store = store.with_relay_waker(relay.waker());
    Ok((Arc::new(store), relay, idempotency))
}

/// Starts the payments service on `transports` (the `payments` stream it publishes to).
pub async fn start(shared: &Shared<'_>, transports: &Transports) -> Result<Started, WiringError> {
    // Before anything opens: a refused provider is a configuration error, not a half start.
    let (mut provider, webhook_secret) = provider(shared.settings)?;
    if kit::faults::allowed(shared.settings) {
        // `payment-decline` and `payment-timeout` act on whichever provider is configured.
        provider = Arc::new(crate::faults::WithFaults(provider));
    }
    let (store, relay, idempotency) =
        open(shared, transports.stream.clone(), transports.queue.clone()).await?;
    let closed = store.clone();
    let lifecycle = shared.lifecycle;
    lifecycle.close_at_stop(move || async move { closed.close().await });
    let ctx = crate::ApiContext {
        store: store.clone(),
        orders: shared.client(Service::Payments, Service::Orders),
        idempotency,
        provider,
        webhook_secret,
    };
    lifecycle.spawn(relay.run(lifecycle.shutdown()));
    let settings = &shared.settings.payments;
    lifecycle.spawn(crate::flow::run_reconciler(
        ctx.clone(),
        Duration::from_secs(settings.reconcile_after_secs),
        Duration::from_secs(settings.reconcile_interval_secs.max(1)),
        lifecycle.shutdown(),
    ));
    lifecycle.spawn(
        ctx.idempotency
            .clone()
            .run_purger(HOUSEKEEPING, lifecycle.shutdown()),
    );
    let ready = ready_when(move || {
        let store = store.clone();
        async move { store.ping().await.is_ok() }
    });
    Ok(Started {
        router: crate::router(ctx),
        ready,
        dependencies: transports.dependencies(false),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_simulator_is_refused_in_production_and_stripe_needs_its_key() {
        let mut settings = Settings::default();
        assert_eq!(provider(&settings).unwrap().0.name(), "simulator");
        settings.environment = "test".into();
        assert_eq!(provider(&settings).unwrap().0.name(), "simulator");
        for elsewhere in ["staging", "prod", "Production"] {
            settings.environment = elsewhere.into();
            let refused = provider(&settings).unwrap_err().to_string();
            assert!(refused.contains("simulator"), "{elsewhere}: {refused}");
        }
        settings.environment = "production".into();
        let refused = provider(&settings).unwrap_err().to_string();
        assert!(refused.contains("simulator"), "{refused}");

        settings.payments.provider = ProviderChoice::Stripe;
        let refused = provider(&settings).unwrap_err().to_string();
        assert!(refused.contains("secret_key_file"), "{refused}");

        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "  \n").unwrap();
        settings.payments.stripe.secret_key_file = Some(key.clone());
        assert!(provider(&settings).is_err(), "an empty key file");
        std::fs::write(&key, "sk_live_secret_value\n").unwrap();
        let (stripe, webhook) = provider(&settings).unwrap();
        assert_eq!(stripe.name(), "stripe");
        assert!(stripe.needs_token());
        assert!(webhook.is_none());
        assert!(!format!("{stripe:?}").contains("secret_value"));
    }
}
