//! How the users service starts inside a platform process: its store on the backend its
//! database url names, the administrator from `auth.admin_email`/`auth.admin_password`, the
//! demo accounts of `mercato up`, and its router with the token issuer.

use std::sync::Arc;
use std::time::Duration;

use kit::auth::TokenIssuer;
use kit::config::Settings;
use kit::wiring::{Backend, Context as _, Service, Shared, Started, WiringError, ready_when};

use crate::store::{SqliteUserStore, UserStore};

/// Accounts `mercato up` created with random passwords, kept in `file` (mode 0600).
#[derive(Debug, Clone)]
pub struct DemoAccounts {
    pub file: std::path::PathBuf,
    /// `(email, password)` of the accounts created now; empty on later starts.
    pub created: Vec<(String, String)>,
}

/// Opens the users store the settings name (for `mercato admin create` and the service).
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn UserStore>, WiringError> {
    Ok(match kit::wiring::backend(settings, Service::Users)? {
        Backend::Sqlite(url) => Arc::new(
            SqliteUserStore::open(&url, &settings.sqlite)
                .await
                .context("opening the users store")?,
        ),
        #[cfg(feature = "postgres")]
        Backend::Postgres(url) => Arc::new(
            crate::pg::PgUserStore::open(&url, "users", &settings.postgres)
                .await
                .context("opening the users store (PostgreSQL)")?,
        ),
        other => return Err(other.unsupported(Service::Users)),
    })
}

/// Starts the users service: `issuer` signs its access tokens; with `demo_accounts` the demo
/// administrator and customer are created where missing (returned with the file that keeps
/// their passwords).
pub async fn start(
    shared: &Shared<'_>,
    issuer: Arc<TokenIssuer>,
    demo_accounts: bool,
) -> Result<(Started, Option<DemoAccounts>), WiringError> {
    let settings = shared.settings;
    let store = open_store(settings).await?;
    let (pinged, closed, pruned) = (store.clone(), store.clone(), store.clone());
    shared
        .lifecycle
        .close_at_stop(move || async move { closed.close().await });
    shared
        .lifecycle
        .housekeeping("expired refresh-token families dropped", move || {
            let store = pruned.clone();
            async move { store.prune_refresh(kit::db::now_ms()).await }
        });
    let ready = ready_when(move || {
        let store = pinged.clone();
        async move { store.ping().await.is_ok() }
    });
    let hasher = crate::password::Hasher::new(2).context("preparing password hashing")?;
    let auth = &settings.auth;
    match (&auth.admin_email, &auth.admin_password) {
        (Some(email), Some(password)) => {
            let (user, outcome) =
                crate::bootstrap::ensure_admin(store.as_ref(), &hasher, email, password.expose())
                    .await
                    .context("creating the administrator from auth.admin_email")?;
            tracing::info!(user_id = %user.id, ?outcome, "administrator from configuration");
        }
        (None, None) => {}
        _ => {
            return Err(WiringError::config(
                "auth.admin_email and auth.admin_password must be set together",
            ));
        }
    }
    let mut demo = None;
    if demo_accounts {
        let created = crate::bootstrap::demo_accounts(store.as_ref(), &hasher)
            .await
            .context("creating the demo accounts")?;
        let file = settings.data_dir.join("demo-accounts.txt");
        if !created.is_empty() {
            write_private(
                &file,
                &created
                    .iter()
                    .map(|(email, password)| format!("{email} {password}\n"))
                    .collect::<String>(),
            )?;
        }
        demo = Some(DemoAccounts { file, created });
    }
    let ctx = crate::ApiContext {
        store,
        hasher,
        issuer,
        throttle: Arc::new(crate::throttle::LoginThrottle::new(
            auth.login_max_failures,
            auth.login_client_max_failures,
            Duration::from_secs(auth.login_failure_window_secs),
        )),
        refresh_ttl: Duration::from_secs(auth.refresh_token_ttl_secs),
    };
    let router = crate::router(ctx);
    Ok((
        Started {
            router,
            ready,
            dependencies: Vec::new(),
        },
        demo,
    ))
}

/// Writes a file only its owner may read (appending to what it holds).
fn write_private(path: &std::path::Path, text: &str) -> Result<(), WiringError> {
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
