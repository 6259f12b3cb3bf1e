//! Accounts that exist before anyone registers: the first administrator (from configuration or
//! `mercato admin create`), and the demo administrator and customer of `mercato up`.
//! There is never a default password.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kit::auth::Role;

use crate::domain::{Email, UserName};
use crate::password::{Hasher, Password};
use crate::store::{StoreError, User, UserStore};

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hash(#[from] crate::password::HashError),
}

/// What [`ensure_admin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOutcome {
    Created,
    /// An account with this e-mail existed: it is now an administrator with this password.
    Promoted,
}

/// Makes `email` an administrator with `password`: creates the account, or promotes it.
pub async fn ensure_admin(
    store: &dyn UserStore,
    hasher: &Hasher,
    email: &str,
    password: &str,
) -> Result<(User, AdminOutcome), BootstrapError> {
    let email = Email::parse(email).map_err(|e| BootstrapError::Invalid(e.to_string()))?;
    let password = Password::parse(password)
        .map_err(|e| BootstrapError::Invalid(format!("admin password: {e}")))?;
    let hash = hasher.hash(password).await?;
    if let Some((user, _)) = store.credentials(&email).await? {
        store.set_role(user.id, Role::Admin, Some(&hash)).await?;
        let user = store.get(user.id).await?.unwrap_or(user);
        return Ok((user, AdminOutcome::Promoted));
    }
    let name =
        UserName::parse("Administrator").map_err(|e| BootstrapError::Invalid(e.to_string()))?;
    let user = store
        .register(&name, &email, None, Some(&hash), Role::Admin)
        .await?;
    Ok((user, AdminOutcome::Created))
}

/// A password nobody chose: 18 random bytes, base64url (24 characters).
pub fn random_password() -> Result<String, BootstrapError> {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).map_err(|e| BootstrapError::Invalid(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The demo accounts `mercato up` creates on its first start.
pub const DEMO_ADMIN: &str = "admin@mercato.local";
pub const DEMO_CUSTOMER: &str = "customer@mercato.local";

/// Creates the demo administrator and customer with random passwords unless they exist;
/// returns `(email, password)` of the accounts created now (empty when both existed).
pub async fn demo_accounts(
    store: &dyn UserStore,
    hasher: &Hasher,
) -> Result<Vec<(String, String)>, BootstrapError> {
    let mut created = Vec::new();
    for (email, name, role) in [
        (DEMO_ADMIN, "Demo Operator", Role::Admin),
        (DEMO_CUSTOMER, "Demo Customer", Role::Customer),
    ] {
        let parsed = Email::parse(email).map_err(|e| BootstrapError::Invalid(e.to_string()))?;
        if store.credentials(&parsed).await?.is_some() {
            continue;
        }
        let password = random_password()?;
        let hash = hasher
            .hash(Password::parse(&password).map_err(|e| BootstrapError::Invalid(e.to_string()))?)
            .await?;
        let name = UserName::parse(name).map_err(|e| BootstrapError::Invalid(e.to_string()))?;
        match store
            .register(&name, &parsed, None, Some(&hash), role)
            .await
        {
            Ok(_) => created.push((email.to_owned(), password)),
            // Another instance created it first.
            Err(StoreError::DuplicateEmail) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(created)
}
